//! Every metric Fleet exports: its name, its help text (the `# HELP` line of `/metrics`) and
//! the one function it is emitted through, so that a name or its labels cannot drift apart
//! between two call sites. A function returns the series' handle; callers that emit often
//! keep it (registering a labelled series looks it up in the recorder each time).

use metrics::{Counter, Gauge, Histogram, SharedString};

#[allow(clippy::disallowed_macros)]
mod emit {
    //! The only place the `metrics` macros are called.
    use super::*;

    pub(super) fn counter(name: &'static str, labels: &[(&'static str, SharedString)]) -> Counter {
        metrics::counter!(name, labels)
    }

    pub(super) fn gauge(name: &'static str, labels: &[(&'static str, SharedString)]) -> Gauge {
        metrics::gauge!(name, labels)
    }

    pub(super) fn histogram(
        name: &'static str,
        labels: &[(&'static str, SharedString)],
    ) -> Histogram {
        metrics::histogram!(name, labels)
    }

    pub(super) fn describe(name: &'static str, kind: Kind, help: &'static str) {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

const TASKS_ACCEPTED: &str = "fleet_tasks_accepted_total";
const TASKS_DUPLICATE: &str = "fleet_tasks_duplicate_total";
const TASKS_REJECTED: &str = "fleet_tasks_rejected_total";
const SCHEDULE_FIRED: &str = "fleet_schedule_fired_total";
const TASKS_STARTED: &str = "fleet_tasks_started_total";
const TASKS_SUCCEEDED: &str = "fleet_tasks_succeeded_total";
const TASKS_RETRIED: &str = "fleet_tasks_retried_total";
const TASKS_FAILED: &str = "fleet_tasks_failed_total";
const TASKS_CANCELLED: &str = "fleet_tasks_cancelled_total";
const TASKS_REQUEUED: &str = "fleet_tasks_requeued_total";
const COMPLETIONS_FENCED: &str = "fleet_completions_fenced_total";
const LEASES_LOST: &str = "fleet_leases_lost_total";
const HANDLER_DURATION: &str = "fleet_handler_duration_seconds";
const QUEUE_WAIT: &str = "fleet_queue_wait_seconds";
const TASKS: &str = "fleet_tasks";
const OUTBOX_SIZE: &str = "fleet_outbox_size";
const CONSUMER_ASSIGNED_PARTITIONS: &str = "fleet_consumer_assigned_partitions";
const CONSUMER_GROUP_STALLED: &str = "fleet_consumer_group_stalled";
const CONSUMER_GROUP_REPAIRS: &str = "fleet_consumer_group_repairs_total";
const CONSUMER_LAG: &str = "fleet_consumer_lag";
const OTLP_SPANS_DROPPED: &str = "fleet_otlp_spans_dropped_total";
const PLACEMENT_WAITING: &str = "fleet_placement_waiting";
const TASKS_PLACED: &str = "fleet_tasks_placed_total";
const PLACEMENT_WAIT: &str = "fleet_placement_wait_seconds";
const PLACEMENT_UNPLACEABLE: &str = "fleet_placement_unplaceable";
const WORKER_CAPACITY: &str = "fleet_worker_capacity";
const WORKER_RESERVED: &str = "fleet_worker_reserved";
const FLOW_RUNNING: &str = "fleet_flow_running";
const FLOW_WAITING: &str = "fleet_flow_waiting";
const FLOW_BLOCKED: &str = "fleet_flow_blocked";
const FLOW_THROTTLED: &str = "fleet_flow_throttled_total";

/// Every metric: name, kind and help text.
pub const CATALOGUE: [(&str, Kind, &str); 31] = [
    (
        TASKS_ACCEPTED,
        Kind::Counter,
        "Submissions the scheduler recorded as new tasks, by kind and priority.",
    ),
    (
        TASKS_DUPLICATE,
        Kind::Counter,
        "Submissions answered with an existing task (same id or idempotency key).",
    ),
    (
        TASKS_REJECTED,
        Kind::Counter,
        "Submissions refused, by reason code (sent to the rejected topic or answered 4xx).",
    ),
    (
        SCHEDULE_FIRED,
        Kind::Counter,
        "Tasks a schedule created (occurrences and run-now), by schedule.",
    ),
    (
        TASKS_STARTED,
        Kind::Counter,
        "Attempts a worker claimed and started, by kind and priority.",
    ),
    (
        TASKS_SUCCEEDED,
        Kind::Counter,
        "Attempts that ended the task succeeded, by kind and priority.",
    ),
    (
        TASKS_RETRIED,
        Kind::Counter,
        "Attempts that failed and scheduled a retry, by kind and priority.",
    ),
    (
        TASKS_FAILED,
        Kind::Counter,
        "Tasks that ended failed: by a worker (kind, priority) or by the reaper (by).",
    ),
    (
        TASKS_CANCELLED,
        Kind::Counter,
        "Tasks that ended cancelled: running (kind, priority), waiting (where) or by the reaper.",
    ),
    (
        TASKS_REQUEUED,
        Kind::Counter,
        "Tasks the reaper requeued after their lease expired, by kind and priority.",
    ),
    (
        COMPLETIONS_FENCED,
        Kind::Counter,
        "Completions answered fenced or already recorded: a stale or repeated report.",
    ),
    (
        LEASES_LOST,
        Kind::Counter,
        "Running attempts whose lease a worker lost; their handlers were stopped.",
    ),
    (
        HANDLER_DURATION,
        Kind::Histogram,
        "How long handlers ran, in seconds, by kind.",
    ),
    (
        QUEUE_WAIT,
        Kind::Histogram,
        "Seconds from a task's publication to its start, by priority.",
    ),
    (
        TASKS,
        Kind::Gauge,
        "Tasks in each state, fleet-wide, as the relay last counted them.",
    ),
    (
        OUTBOX_SIZE,
        Kind::Gauge,
        "The relay's backlog: due timers, unacknowledged dispatches, unwritten dead letters.",
    ),
    (
        CONSUMER_ASSIGNED_PARTITIONS,
        Kind::Gauge,
        "Partitions this process's group consumer holds, by group.",
    ),
    (
        CONSUMER_GROUP_STALLED,
        Kind::Gauge,
        "1 while this member has held no partition for longer than the stall bound.",
    ),
    (
        CONSUMER_GROUP_REPAIRS,
        Kind::Counter,
        "Repairs of a stalled consumer group this member made, by outcome.",
    ),
    (
        CONSUMER_LAG,
        Kind::Gauge,
        "Records on a held partition not yet consumed, by topic and partition.",
    ),
    (
        OTLP_SPANS_DROPPED,
        Kind::Counter,
        "Spans dropped because the OTLP queue was full or the collector did not answer.",
    ),
    (
        PLACEMENT_WAITING,
        Kind::Gauge,
        "Placed tasks waiting for a worker, as this scheduler's dispatcher last counted them (at most 500 counted).",
    ),
    (
        TASKS_PLACED,
        Kind::Counter,
        "Placed tasks this scheduler's dispatcher published to a worker it chose.",
    ),
    (
        PLACEMENT_WAIT,
        Kind::Histogram,
        "Seconds a placed task waited in its queue until a worker was chosen.",
    ),
    (
        PLACEMENT_UNPLACEABLE,
        Kind::Gauge,
        "Placed tasks the last round found no worker for, by reason (no_worker, kind, labels, capacity, room; first 500 per queue).",
    ),
    (
        WORKER_CAPACITY,
        Kind::Gauge,
        "What a live worker offers placed tasks, by worker and resource (slots, cpu cores, memory MiB, …).",
    ),
    (
        WORKER_RESERVED,
        Kind::Gauge,
        "What placed tasks hold on a live worker, by worker and resource.",
    ),
    (
        FLOW_RUNNING,
        Kind::Gauge,
        "Placed tasks holding a slot (placed or running), by limited dimension (`key:<k>`, `tenant:<t>`, …; each limit defined, and the 20 with most tasks blocked, the rest summed as `other`).",
    ),
    (
        FLOW_WAITING,
        Kind::Gauge,
        "Placed tasks accepted and not yet holding a slot, by limited dimension (labels as fleet_flow_running).",
    ),
    (
        FLOW_BLOCKED,
        Kind::Gauge,
        "Placed tasks in a limit's wait list (found over it), by limited dimension (labels as fleet_flow_running).",
    ),
    (
        FLOW_THROTTLED,
        Kind::Counter,
        "Times the dispatcher found a task over a limit and moved it to the limit's wait list, by scope (queue, key, kind, rate, tenant).",
    ),
];

/// Registers every metric's help text with the installed recorder.
pub fn describe_all() {
    for (name, kind, help) in CATALOGUE {
        emit::describe(name, kind, help);
    }
}

fn kind_priority(kind: SharedString, priority: SharedString) -> [(&'static str, SharedString); 2] {
    [("kind", kind), ("priority", priority)]
}

/// Submissions recorded as new tasks.
pub fn tasks_accepted(kind: impl Into<SharedString>, priority: impl Into<SharedString>) -> Counter {
    emit::counter(TASKS_ACCEPTED, &kind_priority(kind.into(), priority.into()))
}

/// Tasks created by schedule `name`.
pub fn schedule_fired(name: &str) -> Counter {
    emit::counter(SCHEDULE_FIRED, &[("schedule", name.to_string().into())])
}

/// Submissions answered with an existing task.
pub fn tasks_duplicate() -> Counter {
    emit::counter(TASKS_DUPLICATE, &[])
}

/// Submissions refused for `reason` (a reject code).
pub fn tasks_rejected(reason: &'static str) -> Counter {
    emit::counter(TASKS_REJECTED, &[("reason", reason.into())])
}

/// Placed tasks waiting for a worker (see `scheduler/src/dispatch.rs`).
pub fn placement_waiting() -> Gauge {
    emit::gauge(PLACEMENT_WAITING, &[])
}

/// One use of a limited dimension (`running`, `waiting` or `blocked`).
pub fn flow_use(what: &'static str, dim: impl Into<SharedString>) -> Gauge {
    let name = match what {
        "running" => FLOW_RUNNING,
        "waiting" => FLOW_WAITING,
        _ => FLOW_BLOCKED,
    };
    emit::gauge(name, &[("limit", dim.into())])
}

/// Tasks found over a limit of `scope`.
pub fn flow_throttled(scope: &'static str) -> Counter {
    emit::counter(FLOW_THROTTLED, &[("scope", scope.into())])
}

/// Seconds a placed task waited for its worker.
pub fn placement_wait() -> Histogram {
    emit::histogram(PLACEMENT_WAIT, &[])
}

/// Placed tasks with no worker for them, for one reason code.
pub fn placement_unplaceable(reason: &'static str) -> Gauge {
    emit::gauge(PLACEMENT_UNPLACEABLE, &[("reason", reason.into())])
}

/// What `worker` offers (`capacity`) or holds for placed tasks, of `resource`.
pub fn worker_resource(
    reserved: bool,
    worker: impl Into<SharedString>,
    resource: impl Into<SharedString>,
) -> Gauge {
    let name = if reserved {
        WORKER_RESERVED
    } else {
        WORKER_CAPACITY
    };
    emit::gauge(
        name,
        &[("worker", worker.into()), ("resource", resource.into())],
    )
}

/// Placed tasks published to a chosen worker.
pub fn tasks_placed() -> Counter {
    emit::counter(TASKS_PLACED, &[])
}

/// Tasks requeued by the reaper: the series without labels, registered at start so that it is
/// exported (as 0) before the first requeue.
pub fn tasks_requeued() -> Counter {
    emit::counter(TASKS_REQUEUED, &[])
}

/// Tasks of `kind` and `priority` requeued by the reaper.
pub fn tasks_requeued_of(
    kind: impl Into<SharedString>,
    priority: impl Into<SharedString>,
) -> Counter {
    emit::counter(TASKS_REQUEUED, &kind_priority(kind.into(), priority.into()))
}

/// Tasks the reaper failed: lease expired with no attempts left.
pub fn tasks_failed_by_reaper() -> Counter {
    emit::counter(TASKS_FAILED, &[("by", "reaper".into())])
}

/// Tasks the reaper cancelled: lease expired after a cancel request.
pub fn tasks_cancelled_by_reaper() -> Counter {
    emit::counter(TASKS_CANCELLED, &[("by", "reaper".into())])
}

/// Waiting tasks cancelled through the API.
pub fn tasks_cancelled_waiting() -> Counter {
    emit::counter(TASKS_CANCELLED, &[("where", "waiting".into())])
}

/// Attempts started by a worker.
pub fn tasks_started(kind: impl Into<SharedString>, priority: impl Into<SharedString>) -> Counter {
    emit::counter(TASKS_STARTED, &kind_priority(kind.into(), priority.into()))
}

/// How a worker's attempt ended, as Redis recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    Succeeded,
    Retried,
    Failed,
    Cancelled,
    /// Answered fenced or already recorded.
    Fenced,
}

/// Attempts of `kind` and `priority` that ended as `end`.
pub fn attempts_ended(
    end: AttemptEnd,
    kind: impl Into<SharedString>,
    priority: impl Into<SharedString>,
) -> Counter {
    let name = match end {
        AttemptEnd::Succeeded => TASKS_SUCCEEDED,
        AttemptEnd::Retried => TASKS_RETRIED,
        AttemptEnd::Failed => TASKS_FAILED,
        AttemptEnd::Cancelled => TASKS_CANCELLED,
        AttemptEnd::Fenced => COMPLETIONS_FENCED,
    };
    emit::counter(name, &kind_priority(kind.into(), priority.into()))
}

/// Completions answered fenced: the series without labels, registered at start.
pub fn completions_fenced() -> Counter {
    emit::counter(COMPLETIONS_FENCED, &[])
}

/// Leases a worker lost.
pub fn leases_lost() -> Counter {
    emit::counter(LEASES_LOST, &[])
}

/// Handler run times of `kind`.
pub fn handler_duration(kind: impl Into<SharedString>) -> Histogram {
    emit::histogram(HANDLER_DURATION, &[("kind", kind.into())])
}

/// Publication-to-start waits of `priority`.
pub fn queue_wait(priority: &'static str) -> Histogram {
    emit::histogram(QUEUE_WAIT, &[("priority", priority.into())])
}

/// Tasks in `state`, fleet-wide.
pub fn tasks_in_state(state: &'static str) -> Gauge {
    emit::gauge(TASKS, &[("state", state.into())])
}

/// One part of the relay's backlog: `due`, `dispatch` or `dead`.
pub fn outbox_size(outbox: &'static str) -> Gauge {
    emit::gauge(OUTBOX_SIZE, &[("outbox", outbox.into())])
}

/// Partitions held by this process's consumer in `group`.
pub fn consumer_assigned_partitions(group: impl Into<SharedString>) -> Gauge {
    emit::gauge(CONSUMER_ASSIGNED_PARTITIONS, &[("group", group.into())])
}

/// Whether this member of `group` is stalled (1) or not (0).
pub fn consumer_group_stalled(group: impl Into<SharedString>) -> Gauge {
    emit::gauge(CONSUMER_GROUP_STALLED, &[("group", group.into())])
}

/// Repairs of `group` this member made, by `outcome`.
pub fn consumer_group_repairs(group: impl Into<SharedString>, outcome: &'static str) -> Counter {
    emit::counter(
        CONSUMER_GROUP_REPAIRS,
        &[("group", group.into()), ("outcome", outcome.into())],
    )
}

/// Records not yet consumed on a held partition.
pub fn consumer_lag(topic: impl Into<SharedString>, partition: i32) -> Gauge {
    emit::gauge(
        CONSUMER_LAG,
        &[
            ("topic", topic.into()),
            ("partition", partition.to_string().into()),
        ],
    )
}

/// Spans dropped by the OTLP exporter.
pub fn otlp_spans_dropped() -> Counter {
    emit::counter(OTLP_SPANS_DROPPED, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_named_once_with_help() {
        let mut names: Vec<&str> = CATALOGUE.iter().map(|(name, _, _)| *name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CATALOGUE.len(), "a name appears twice");
        for (name, kind, help) in CATALOGUE {
            assert!(name.starts_with("fleet_"), "{name}");
            assert_eq!(
                name.ends_with("_total"),
                kind == Kind::Counter,
                "{name}: counters and only counters end in _total"
            );
            assert!(help.len() > 20 && help.ends_with('.'), "{name}: {help}");
        }
    }
}
