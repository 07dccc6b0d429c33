//! The Redis key schema. Every key Fleet reads or writes is built here and nowhere else.
//!
//! All keys of one fleet share the hash tag `{<prefix>}`, so every Lua script touches keys of a
//! single hash slot and runs unchanged on Redis Cluster. Scripts receive every key they touch
//! in `KEYS`: first the [`Keys::globals`] block, then per-task keys.

use crate::task::State;

/// Builds Fleet's Redis keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// `{prefix}`, the hash-tagged root of every key.
    root: String,
}

/// How many keys [`Keys::globals`] returns; per-task keys start after them.
pub const GLOBAL_KEYS: usize = 27;

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            root: format!("{{{prefix}}}"),
        }
    }

    /// String held while one member of consumer group `group` repairs it (see
    /// [`crate::membership`]), so that its stalled peers do not repair it again meanwhile.
    pub fn group_repair(&self, group: &str) -> String {
        join(&[&self.root, ":group-repair:", group])
    }

    /// Hash of consumer group `group`'s committed offsets, saved by a repair before it deletes
    /// the group (fields `<partition>:<topic>`, values offsets); expires after twice the
    /// stall bound.
    pub fn group_offsets(&self, group: &str) -> String {
        join(&[&self.root, ":group-offsets:", group])
    }

    /// Hash recording the key-schema version this fleet's data is written in.
    pub fn schema(&self) -> String {
        format!("{}:schema", self.root)
    }

    /// Hash of one task: state, attempt, owner, timestamps, stored record, result or error.
    pub fn task(&self, id: &str) -> String {
        join(&[&self.root, ":task:", id])
    }

    /// Sorted set of running task ids scored by lease deadline (Redis time, ms). It is also the
    /// `running` state index ([`Keys::state_index`]): a task is running exactly while it holds
    /// a lease, so a second index would only double the sorted-set writes of every claim and
    /// completion.
    pub fn leases(&self) -> String {
        format!("{}:leases", self.root)
    }

    /// Sorted set of timers: ids of scheduled tasks (delays, retry backoff) scored by when
    /// they are due for publication.
    pub fn due(&self) -> String {
        format!("{}:due", self.root)
    }

    /// Sorted set of dispatches Kafka has not acknowledged yet, members [`outbox_member`],
    /// scored by when the relay publishes them (again) unless the acknowledgement comes first.
    /// Keyed by attempt, so an acknowledgement removes exactly its own entry with a plain
    /// `ZREM`, with no need to read the task.
    pub fn outbox(&self) -> String {
        format!("{}:outbox", self.root)
    }

    /// Sorted set of failed task ids whose dead-letter record is not yet on Kafka.
    pub fn dead_outbox(&self) -> String {
        format!("{}:dead-outbox", self.root)
    }

    /// Sorted set of task ids in `state`, scored by when they entered it (ms); for `running`,
    /// the lease set, scored by when the lease ends.
    pub fn state_index(&self, state: State) -> String {
        match state {
            State::Running => self.leases(),
            _ => format!("{}:state:{}", self.root, state.as_str()),
        }
    }

    /// The `running` index of schema 3 and older, which schema 4 replaced by the lease set.
    /// Services of version 3 still running during a rolling upgrade go on writing it; the index
    /// trim removes the entries of tasks that are no longer running, until the key is gone.
    pub fn retired_running_index(&self) -> String {
        format!("{}:state:running", self.root)
    }

    /// Set of queue names that have ever had a task.
    pub fn queues(&self) -> String {
        format!("{}:queues", self.root)
    }

    /// Sorted set of the task ids of one queue, scored by creation time (ms).
    pub fn queue_index(&self, queue: &str) -> String {
        join(&[&self.root, ":queue:", queue])
    }

    /// Sorted set of worker ids scored by their last heartbeat (ms).
    pub fn workers(&self) -> String {
        format!("{}:workers", self.root)
    }

    /// Hash describing one live worker; expires when its heartbeats stop.
    pub fn worker(&self, id: &str) -> String {
        format!("{}:worker:{id}", self.root)
    }

    /// Hash of fleet-wide counters (e.g. `rejected`: submissions refused by the scheduler).
    pub fn counters(&self) -> String {
        format!("{}:counters", self.root)
    }

    /// Set of paused selectors, `queue:<name>` or `priority:<level>`: workers do not start
    /// tasks that match one.
    pub fn paused(&self) -> String {
        format!("{}:paused", self.root)
    }

    /// Sorted set of pending task ids a worker met while their queue or priority was paused,
    /// scored by when; resuming publishes them again.
    pub fn held(&self) -> String {
        format!("{}:held", self.root)
    }

    /// Hash of terminal-state totals per queue and per priority, fields
    /// `<state>:queue:<name>` and `<state>:priority:<level>`, counted when a task ends.
    pub fn totals(&self) -> String {
        format!("{}:totals", self.root)
    }

    /// Hash of one 10-second slot of the dashboard's time series, keyed by the slot's start
    /// (ms); see [`crate::store::series`].
    pub fn series(&self, slot_ms: u64) -> String {
        join(&[&self.root, ":series:", itoa::Buffer::new().format(slot_ms)])
    }

    /// Sorted set of the ids of placed tasks waiting for a worker to be chosen, scored by when
    /// they began to wait: new ones, and those handed back by a worker they did not fit.
    pub fn place_inbox(&self) -> String {
        format!("{}:place:inbox", self.root)
    }

    /// Hash of what placed tasks hold on each worker: field worker id, value
    /// [`crate::placement::Amounts::encode`] text (thousandths).
    pub fn place_used(&self) -> String {
        format!("{}:place:used", self.root)
    }

    /// Sorted set of placed tasks no live worker could take even when idle (no worker, kind,
    /// labels or capacity: not a lack of room), out of their queues so they hold up no task
    /// behind them; scored by when their placement timeout ends (`+inf`: none). They go back to
    /// the inbox when the live workers change.
    pub fn place_parked(&self) -> String {
        format!("{}:place:parked", self.root)
    }

    /// Hash of each worker's capacity, as its heartbeats report it: field worker id, value
    /// [`crate::placement::Amounts::encode`] text.
    pub fn place_capacity(&self) -> String {
        format!("{}:place:capacity", self.root)
    }

    /// Sorted set of reservations, members `<worker id>|<task id>`, all scored 0, so that one
    /// worker's are a lexicographic range.
    pub fn place_reserved(&self) -> String {
        format!("{}:place:reserved", self.root)
    }

    /// Hash of run-time queue settings: field queue name, value
    /// [`crate::placement::QueueSettings`] JSON (set through the API or `fleetctl queue set`).
    pub fn queue_settings(&self) -> String {
        format!("{}:queue-settings", self.root)
    }

    /// Set of the queues that have placed tasks waiting (in [`Keys::wait`]).
    pub fn wait_queues(&self) -> String {
        format!("{}:wait:queues", self.root)
    }

    /// Sorted set of one queue's placed tasks waiting for a worker, scored by arrival (ms):
    /// the `fifo` order. [`Keys::wait_sjf`] and [`Keys::wait_fair`] hold the same tasks in the
    /// other strategies' orders, so a strategy change takes effect at once.
    pub fn wait(&self, queue: &str) -> String {
        join(&[&self.root, ":wait:", queue])
    }

    /// The same tasks as [`Keys::wait`], scored by estimate + arrival (`sjf`).
    pub fn wait_sjf(&self, queue: &str) -> String {
        join(&[&self.root, ":wait-sjf:", queue])
    }

    /// The same tasks as [`Keys::wait`], scored by their start-time fair-queuing tag (`fair`).
    pub fn wait_fair(&self, queue: &str) -> String {
        join(&[&self.root, ":wait-fair:", queue])
    }

    /// Hash of one queue's fair-queuing state: `vtime` (the tag of the last task placed) and
    /// `key:<key>` (the last tag given to a waiting task of that key).
    pub fn wait_fair_state(&self, queue: &str) -> String {
        join(&[&self.root, ":wait-fair-state:", queue])
    }

    /// Hash of recent run times of placed tasks by kind: field kind, value the last 31
    /// successful run times (ms), comma-separated, newest last (`sjf`'s default estimate).
    pub fn run_times(&self) -> String {
        format!("{}:run-times", self.root)
    }

    /// Hash of the limits in force (see [`crate::flow`]): field `<scope>:<name>`, value
    /// [`crate::flow::Limit`] JSON.
    pub fn limits(&self) -> String {
        format!("{}:limits", self.root)
    }

    /// Hash of placed tasks accepted and not yet ended, by dimension (`queue:<q>`,
    /// `kind:<k>`, `key:<k>`, `tenant:<t>`, `rate:<r>`); a field at 0 is removed.
    pub fn flow_queued(&self) -> String {
        format!("{}:flow:queued", self.root)
    }

    /// Hash of placed tasks holding a reservation (placed, or running), by dimension.
    pub fn flow_running(&self) -> String {
        format!("{}:flow:running", self.root)
    }

    /// Set of the dimensions with tasks in their wait list ([`Keys::flow_wait`]).
    pub fn flow_waits(&self) -> String {
        format!("{}:flow:waits", self.root)
    }

    /// Sorted set of placed tasks waiting for a limit of `dim` (a slot or a token), scored by
    /// arrival. Scripts build this name from [`Keys::flow_waits`] (`<that>:<dim>`): a task's
    /// dimensions are data, and every such key shares the one hash tag.
    pub fn flow_wait(&self, dim: &str) -> String {
        join(&[&self.root, ":flow:waits:", dim])
    }

    /// Hash of rate limits' token buckets: field rate key, value `<tokens>,<Redis ms>`.
    pub fn flow_tokens(&self) -> String {
        format!("{}:flow:tokens", self.root)
    }

    /// Set of the tasks that wait for task `id` to end (its `depends_on` children not yet
    /// released). Deleted when `id` ends, in the script that releases them. Scripts build this
    /// name from the task key's form (see `lua/prelude.lua`), since a task's children are data.
    pub fn children(&self, id: &str) -> String {
        join(&[&self.root, ":children:", id])
    }

    /// Sorted set of one workflow's task ids, scored by acceptance (ms). Kept while any of
    /// them is not ended ([`Keys::workflows`] counts them), then expires with the tasks.
    pub fn workflow(&self, id: &str) -> String {
        join(&[&self.root, ":workflow:", id])
    }

    /// Hash of the workflows with tasks not yet ended: field workflow id, value how many.
    pub fn workflows(&self) -> String {
        format!("{}:workflows", self.root)
    }

    /// Hash of the schedules: field name, value [`crate::schedule::Schedule`] JSON.
    pub fn schedules(&self) -> String {
        format!("{}:schedules", self.root)
    }

    /// Sorted set of the schedules not paused, scored by their next occurrence (unix ms).
    pub fn schedule_next(&self) -> String {
        format!("{}:schedule-next", self.root)
    }

    /// Pub/sub channel on which scripts that release a task waiting for its parents wake the
    /// relays (message `relay`: its dispatch is in the outbox) or the dispatchers (`place`: a
    /// placed task is in the inbox), so it goes on at once rather than at their next round.
    pub fn wake(&self) -> String {
        format!("{}:wake", self.root)
    }

    /// Idempotency key → task id, expiring after the idempotency window.
    pub fn idempotency(&self, key: &str) -> String {
        join(&[&self.root, ":idem:", key])
    }

    /// The keys every transition script receives first, in this order: leases, due,
    /// dead outbox, the indexes of `pending`, `scheduled`, `succeeded`, `failed`, `cancelled`,
    /// queues, workers, paused, held, totals, outbox, then placement's inbox, use, capacity,
    /// reservations, run times and parked tasks, then flow control's queued and running
    /// counts, wait lists and token buckets, then dependencies' `waiting` and `skipped` indexes
    /// and the open workflows.
    pub fn globals(&self) -> [String; GLOBAL_KEYS] {
        [
            self.leases(),
            self.due(),
            self.dead_outbox(),
            self.state_index(State::Pending),
            self.state_index(State::Scheduled),
            self.state_index(State::Succeeded),
            self.state_index(State::Failed),
            self.state_index(State::Cancelled),
            self.queues(),
            self.workers(),
            self.paused(),
            self.held(),
            self.totals(),
            self.outbox(),
            self.place_inbox(),
            self.place_used(),
            self.place_capacity(),
            self.place_reserved(),
            self.run_times(),
            self.place_parked(),
            self.flow_queued(),
            self.flow_running(),
            self.flow_waits(),
            self.flow_tokens(),
            self.state_index(State::Waiting),
            self.state_index(State::Skipped),
            self.workflows(),
        ]
    }
}

/// The outbox entry of attempt `attempt` of task `id`: `<id>#<attempt>`. Task ids never hold
/// `#`, so the last one splits it; `lua/prelude.lua`'s `outbox_member` writes the same.
pub fn outbox_member(id: &str, attempt: u32) -> String {
    join(&[id, "#", itoa::Buffer::new().format(attempt)])
}

/// `parts` end to end, in a string of exactly their length. The keys made per task (a few per
/// task in every batch) are built this way rather than with `format!`, whose formatting
/// machinery and regrowth of the string showed in the scheduler's profile.
fn join(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        out.push_str(part);
    }
    out
}

/// The task id of an outbox entry, or of a timer entry (which is the bare id).
pub fn entry_task_id(member: &str) -> &str {
    member.rsplit_once('#').map_or(member, |(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let keys = Keys::new("fleet");
        assert_eq!(keys.schema(), "{fleet}:schema");
        assert_eq!(keys.task("t1"), "{fleet}:task:t1");
        assert_eq!(keys.state_index(State::Pending), "{fleet}:state:pending");
        assert_eq!(keys.state_index(State::Running), keys.leases());
        assert_eq!(keys.retired_running_index(), "{fleet}:state:running");
        assert_eq!(keys.queue_index("emails"), "{fleet}:queue:emails");
        assert_eq!(keys.idempotency("order-9"), "{fleet}:idem:order-9");
        assert_eq!(
            keys.series(1_700_000_000_000),
            "{fleet}:series:1700000000000"
        );
        assert_eq!(outbox_member("a:b", 7), "a:b#7");
        assert_eq!(outbox_member("x", u32::MAX), "x#4294967295");
        assert_eq!(entry_task_id("a:b#7"), "a:b");
        assert_eq!(entry_task_id("a:b"), "a:b");
        for key in keys.globals() {
            assert!(key.starts_with("{fleet}:"), "{key}");
        }
        let globals = keys.globals();
        let distinct: std::collections::HashSet<_> = globals.iter().collect();
        assert_eq!(distinct.len(), GLOBAL_KEYS, "each global key once");
    }
}
