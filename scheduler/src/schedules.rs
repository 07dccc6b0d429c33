//! Firing schedules (see [`fleet_common::schedule`]): every scheduler replica looks for due
//! schedules a few times a second and submits each occurrence's task. Replicas racing for the
//! same occurrence create it once (its task id is derived from the schedule and the
//! occurrence's time) and move the schedule on once (`lua/advance_schedule.lua`), so any number
//! may run, be killed or be paused at any moment.

use std::time::Duration;

use fleet_common::schedule::Schedule;
use fleet_common::store::{Accepted, NewTask, Store, StoreError};
use fleet_common::task::TaskSpec;
use tracing::{info, warn};

use crate::publish::{Publisher, publish_accepted};
use crate::queues::Queues;
use crate::settings::SchedulerSettings;

/// How often a scheduler looks for due schedules: the firing's lateness at most.
pub const CHECK_EVERY: Duration = Duration::from_millis(200);

/// Most schedules fired in one round (more: the next round goes on at once).
pub const BATCH: usize = 100;

/// One round: fires every due schedule, all as of one Redis time. Their tasks are accepted
/// (and each schedule moved on) first, then published together in the background: a round
/// never waits for Kafka. A scheduler that dies before publishing leaves them in the outbox, as
/// ingest does.
pub async fn round(
    settings: &SchedulerSettings,
    store: &Store,
    publisher: &Publisher,
    queues: &Queues,
) -> Result<bool, StoreError> {
    let now = store.redis_time_ms().await?;
    let due = store.due_schedules(now, BATCH).await?;
    let (mut all_tasks, mut all_accepted) = (Vec::new(), Vec::new());
    for (name, next) in &due {
        let Some(stored) = store.schedule(name).await? else {
            // Deleted meanwhile (or unreadable): nothing to fire from it.
            store.advance_schedule(name, *next, None).await?;
            continue;
        };
        let schedule = stored.schedule;
        let firing = schedule.due(*next, now);
        let mut tasks = tasks_of(&schedule, &firing.fire, settings);
        let accepted = accept(store, queues, &schedule, &mut tasks, "occurrence").await?;
        store.advance_schedule(name, *next, firing.next).await?;
        all_tasks.extend(tasks);
        all_accepted.extend(accepted);
    }
    // Published beside the next rounds, not before them: a slow broker (its first connection,
    // a leader change) must not make the next occurrences late, which past their grace would
    // count as missed. What a publish does not send, the relay sends from the outbox.
    if !all_tasks.is_empty() {
        let (store, publisher) = (store.clone(), publisher.clone());
        tokio::spawn(async move {
            publish_accepted(&store, &publisher, &all_tasks, &all_accepted).await;
        });
    }
    Ok(due.len() >= BATCH)
}

/// The tasks of `schedule`'s occurrences at `times` (ms): each named by its occurrence, with a
/// random part of the schedule's jitter as its delay.
pub fn tasks_of(schedule: &Schedule, times: &[u64], settings: &SchedulerSettings) -> Vec<NewTask> {
    tasks_of_ids(
        schedule,
        times.iter().map(|&at| schedule.task_id(at)).collect(),
        settings,
    )
}

/// The schedule's task under each of `ids`.
pub fn tasks_of_ids(
    schedule: &Schedule,
    ids: Vec<String>,
    settings: &SchedulerSettings,
) -> Vec<NewTask> {
    ids.into_iter()
        .filter_map(|id| new_task(schedule, id, settings))
        .collect()
}

fn new_task(schedule: &Schedule, id: String, settings: &SchedulerSettings) -> Option<NewTask> {
    // Checked when the schedule was stored; a task that no longer reads (the size limit was
    // lowered since) is logged, not fired.
    let spec = match TaskSpec::parse(
        schedule.task.get().as_bytes(),
        settings.tasks.max_task_bytes,
    ) {
        Ok(spec) => spec,
        Err(err) => {
            warn!(schedule = %schedule.name, error = %err, "A schedule's task is no longer valid; nothing fired.");
            return None;
        }
    };
    let mut task = NewTask::from_spec(spec, &settings.tasks, || id);
    if schedule.jitter_ms > 0 {
        task.delay_ms += rand::random_range(0..=schedule.jitter_ms);
    }
    Some(task)
}

/// Submits a schedule's tasks as a submission is submitted: accepted in Redis (idempotent by
/// id), then published.
pub async fn fire(
    store: &Store,
    publisher: &Publisher,
    queues: &Queues,
    schedule: &Schedule,
    mut tasks: Vec<NewTask>,
    what: &str,
) -> Result<Vec<Accepted>, StoreError> {
    let accepted = accept(store, queues, schedule, &mut tasks, what).await?;
    if !tasks.is_empty() {
        publish_accepted(store, publisher, &tasks, &accepted).await;
    }
    Ok(accepted)
}

/// Accepts a schedule's tasks (marked as its queue says), logging and counting each.
async fn accept(
    store: &Store,
    queues: &Queues,
    schedule: &Schedule,
    tasks: &mut [NewTask],
    what: &str,
) -> Result<Vec<Accepted>, StoreError> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    queues.mark(tasks);
    let accepted = store.accept(tasks).await?;
    for (task, outcome) in tasks.iter().zip(&accepted) {
        match outcome {
            Accepted::Duplicate(_) => {}
            Accepted::OverQuota(why) | Accepted::Refused(why) => {
                warn!(schedule = %schedule.name, task_id = %task.record.id, reason = %why, "A schedule's {what} was refused; nothing fired for it.");
            }
            _ => {
                fleet_common::telemetry::metrics::schedule_fired(&schedule.name).increment(1);
                info!(schedule = %schedule.name, task_id = %task.record.id, "Schedule fired.");
            }
        }
    }
    Ok(accepted)
}
