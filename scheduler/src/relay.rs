//! The relay: publishes tasks that are due in Redis — delayed tasks whose time came, retries
//! whose backoff ended, released tasks, and dispatches Kafka never confirmed (the outbox) — and
//! writes the dead-letter records of failed tasks. It also sweeps the held set for tasks that
//! nothing pauses any more. Safe with any number of replicas: entries are taken atomically, and
//! a duplicate message is absorbed at claim.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use fleet_common::store::{Store, StoreError};
use fleet_common::task::State;
use fleet_common::wire;
use tracing::{info, warn};

use crate::publish::{LivePartitions, Publisher};

/// Most entries taken per round from each of the timers and the outbox.
pub const BATCH: usize = 500;

/// Held tasks the sweep looks at in one step, and the least time between its steps.
const SWEEP: usize = 100;
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Where the held-task sweep goes on in the held set at its next step.
///
/// A resume lifts its pause, then sends the held tasks on; if its process dies in between,
/// they stay held with nothing pausing them. The sweep walks the held set, 100 tasks a second
/// per relay, so it finds them within a second per hundred held tasks. While nothing is held
/// it costs one read of an empty set a second.
#[derive(Debug, Default)]
pub struct HeldSweep {
    from: AtomicUsize,
    last: Mutex<Option<Instant>>,
}

impl HeldSweep {
    async fn step(&self, store: &Store) -> Result<(), fleet_common::store::StoreError> {
        {
            let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < SWEEP_EVERY) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        let from = self.from.load(Ordering::Relaxed);
        let (looked, sent) = store.sweep_held(from, SWEEP).await?;
        if sent > 0 {
            info!(
                sent,
                "Held tasks sent on: nothing pauses them any more (a resume that did not finish)."
            );
        }
        // Those sent on left the set, so the next part starts that much earlier; after the
        // end of the set the walk starts over.
        let next = if looked < SWEEP {
            0
        } else {
            from + looked - sent
        };
        self.from.store(next, Ordering::Relaxed);
        Ok(())
    }
}

/// One round: due tasks, dead letters, then a step of the held-task sweep. Returns how many
/// due tasks were taken.
pub async fn round(
    store: &Store,
    publisher: &Publisher,
    live_max_age_ms: u64,
    sweep: &HeldSweep,
) -> Result<usize, fleet_common::store::StoreError> {
    let due = store.take_due(BATCH).await?;
    if !due.is_empty() {
        let live = LivePartitions::load(store, live_max_age_ms).await;
        let sent = publisher.dispatch_all(&due, &live, "relay").await;
        store.dispatched(&sent).await?;
    }

    let dead = store.take_dead_letters(100).await?;
    let mut written = Vec::with_capacity(dead.len());
    for id in dead {
        let task = match store.task(&id).await {
            Ok(Some(task)) => task,
            Ok(None) => {
                written.push(id); // expired meanwhile: nothing left to write
                continue;
            }
            Err(StoreError::NotATask(err)) => {
                warn!(task_id = %id, error = %err, "Dead-letter record skipped: no task to write.");
                written.push(id);
                continue;
            }
            Err(err) => return Err(err),
        };
        if task.state != State::Failed {
            // Redriven before its record was written: no longer dead, and the stored task
            // now describes its next round, not the failure.
            info!(task_id = %id, "Dead-letter record skipped: the task was redriven.");
            written.push(id);
            continue;
        }
        match publisher.dead(&id, &wire::dead_letter(&task)).await {
            Ok(()) => {
                info!(task_id = %id, "Dead-letter record written.");
                written.push(id);
            }
            Err(err) => {
                warn!(task_id = %id, error = %err, "Could not write a dead-letter record; will retry.")
            }
        }
    }
    store.dead_letter_sent(&written).await?;
    sweep.step(store).await?;
    record_gauges(store).await?;
    Ok(due.len())
}

/// Tasks per state, and the relay's backlog: timers (`due`), unacknowledged dispatches
/// (`outbox`) and unwritten dead letters (`dead`).
async fn record_gauges(store: &Store) -> Result<(), fleet_common::store::StoreError> {
    for (state, n) in store.counts().await? {
        fleet_common::telemetry::metrics::tasks_in_state(state.as_str()).set(n as f64);
    }
    let backlog = store.backlog().await?;
    fleet_common::telemetry::metrics::outbox_size("due").set(backlog.timers as f64);
    fleet_common::telemetry::metrics::outbox_size("dispatch").set(backlog.outbox as f64);
    fleet_common::telemetry::metrics::outbox_size("dead").set(backlog.dead as f64);
    Ok(())
}
