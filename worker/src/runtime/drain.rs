//! The worker's drain: stop fetching and starting, leave the group at once, let running
//! handlers finish within the grace period, hand the rest back, and wait for every outcome to
//! be recorded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_common::membership;
use fleet_common::shutdown::Drain;
use fleet_common::store::Store;
use rdkafka::consumer::{CommitMode, Consumer};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{Loops, Running, Shared};

/// Drains the worker's loops; `Unclean` if a loop ended abnormally, the hand-back failed or
/// some outcome could not be recorded within one lease.
pub(super) async fn drain(
    loops: Loops,
    consumer: Arc<membership::GroupConsumer>,
    shared: &Shared,
    store: &Store,
) -> Drain {
    let mut outcome = Drain::Clean;
    loops.fetch.cancel();
    info!(
        running = shared.running().len(),
        "Draining: no new tasks are started."
    );
    for task in [loops.poller, loops.claimer] {
        if let Err(err) = task.await {
            warn!(error = %err, "A worker loop ended abnormally.");
            outcome = Drain::Unclean;
        }
    }
    let dropped = shared.buffers().clear();
    if dropped > 0 {
        info!(
            dropped,
            "Unclaimed buffered deliveries left for the next owner of their partitions."
        );
    }
    leave_group(consumer, shared).await;

    // Let running handlers finish within the grace period (their leases are still kept),
    // then hand the rest back.
    let deadline = Instant::now() + shared.settings.worker.shutdown_grace();
    while !shared.running().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    loops.lease_token.cancel();
    loops.lease_keeper.join().await;
    if !hand_back(shared, store).await {
        outcome = Drain::Unclean;
    }

    // Every outcome is recorded before the worker exits. Past one lease it no longer
    // matters: the reaper requeues what was not recorded by then.
    match tokio::time::timeout(shared.settings.lease.lease(), loops.completer).await {
        Ok(Ok(())) => {}
        _ => {
            warn!("Some completions could not be recorded before exit.");
            outcome = Drain::Unclean;
        }
    }
    outcome
}

/// Waits (up to `wait`) for the HTTP listener, told to stop with the worker, to end.
pub(super) async fn stop_http(
    http: Option<(std::net::SocketAddr, JoinHandle<std::io::Result<()>>)>,
    wait: Duration,
) -> Drain {
    let Some((_, server)) = http else {
        return Drain::Clean;
    };
    match tokio::time::timeout(wait, server).await {
        Ok(Ok(Ok(()))) => Drain::Clean,
        _ => {
            warn!("The HTTP listener did not stop cleanly.");
            Drain::Unclean
        }
    }
}

/// Commits the stored offsets and leaves the consumer group, as soon as the drain starts.
///
/// Offsets are stored once a record's claim is in Redis, so committing them does not wait on
/// outcomes, and every record left unclaimed is read again by the next owner. Leaving at once
/// matters: a draining worker no longer polls its consumer, and under the eager protocol every
/// member must rejoin a rebalance, so staying in the group would hold up every other worker's
/// rebalance (the next replica of a rolling deploy, say) until this drain ended.
async fn leave_group(consumer: Arc<membership::GroupConsumer>, shared: &Shared) {
    if let Err(err) = consumer.commit_consumer_state(CommitMode::Sync) {
        // Nothing stored since the last auto-commit, or the group is rebalancing: the next
        // owner re-reads at most the claimed deliveries, which claim as duplicates.
        info!(error = %err, "Final offset commit skipped.");
    }
    consumer.unsubscribe();
    // Heartbeats stop offering this worker's partitions to the relay and the reaper.
    *shared.assignment() = Default::default();
    // Closing serves the group's callbacks until it has left; it blocks, so off the runtime.
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    info!("Left the consumer group; draining the running tasks.");
}

/// Cancels and aborts the handlers it holds when dropped.
struct StopOnDrop(Vec<(Arc<str>, Running)>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        for (_, entry) in &self.0 {
            entry.cancel.cancel();
            if let Some(handler) = &entry.handler {
                handler.abort();
            }
        }
    }
}

/// Releases the tasks still running at the end of the grace period in Redis for immediate
/// redelivery elsewhere, then stops their handlers; also takes this worker out of the live set.
async fn hand_back(shared: &Shared, store: &Store) -> bool {
    let entries: Vec<(Arc<str>, Running)> = shared.running().drain().collect();
    let remaining: Vec<(Arc<str>, u32)> = entries
        .iter()
        .map(|(id, entry)| (id.clone(), entry.attempt))
        .collect();
    // Release first, stop the handlers after: a handler stopped earlier could report its
    // interruption as a failed attempt before the hand-back reached Redis. Once released,
    // whatever they report is fenced.
    let _stop = StopOnDrop(entries);
    let unanswered = std::mem::take(&mut *shared.unanswered());
    let refs: Vec<(&str, u32)> = remaining
        .iter()
        .chain(&unanswered)
        .map(|(id, a)| (&**id, *a))
        .collect();
    for attempt in 1..=3 {
        match store.release(&shared.worker_id, &refs).await {
            Ok(released) => {
                for (id, attempt) in &remaining {
                    info!(task_id = %id, attempt, worker_id = %shared.worker_id, "Task handed back on shutdown.");
                }
                if released > 0 {
                    info!(
                        released,
                        "Running tasks handed back for immediate redelivery."
                    );
                }
                return true;
            }
            Err(err) => {
                warn!(error = %err, attempt, "Could not hand tasks back; their leases will expire instead.");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    false
}
