//! The reaper: finds tasks whose lease expired (their worker died, hung, or lost Redis) and
//! requeues them with the next attempt, or fails them once their attempts are used up. Every
//! decision is re-checked inside one Lua script on Redis time, so any number of reapers may run.

use std::time::{Duration, Instant};

use fleet_common::shutdown::TaskResult;
use fleet_common::store::{Requeue, Store};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::publish::{LivePartitions, Publisher};

const BATCH: usize = 500;
/// How often terminal-state index entries past retention are trimmed.
const TRIM_EVERY: Duration = Duration::from_secs(60);

pub async fn run(
    store: Store,
    publisher: Publisher,
    interval: Duration,
    live_max_age_ms: u64,
    token: CancellationToken,
) -> TaskResult {
    info!(interval_ms = interval.as_millis() as u64, "Reaper started.");
    let mut last_trim = Instant::now();
    while !token.is_cancelled() {
        let busy = match scan(&store, &publisher, live_max_age_ms).await {
            Ok(found) => found >= BATCH,
            Err(err) => {
                warn!(error = %err, "Reaper scan failed; retrying next period.");
                false
            }
        };
        if last_trim.elapsed() >= TRIM_EVERY {
            last_trim = Instant::now();
            match store.trim_terminal_indexes().await {
                Ok(n) if n > 0 => info!(
                    removed = n,
                    "Trimmed expired entries from the state indexes."
                ),
                Ok(_) => {}
                Err(err) => warn!(error = %err, "Index trim failed."),
            }
        }
        if !busy {
            tokio::select! {
                () = token.cancelled() => {}
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
    info!("Reaper stopped.");
    Ok(())
}

/// One scan; returns how many expired leases it found.
pub async fn scan(
    store: &Store,
    publisher: &Publisher,
    live_max_age_ms: u64,
) -> Result<usize, fleet_common::store::StoreError> {
    let expired = store.expired_leases(BATCH).await?;
    if expired.is_empty() {
        return Ok(0);
    }
    let outcomes = store.requeue(&expired).await?;
    let live = if outcomes.iter().any(|o| matches!(o, Requeue::Requeued(_))) {
        LivePartitions::load(store, live_max_age_ms).await
    } else {
        LivePartitions::default()
    };
    let mut sent = Vec::new();
    for outcome in &outcomes {
        match outcome {
            Requeue::Requeued(dispatch) => {
                info!(task_id = %dispatch.id, attempt = dispatch.attempt, "Lease expired; task requeued.");
                match publisher.dispatch(dispatch, &live).await {
                    Ok(()) => sent.push((dispatch.id.as_str(), dispatch.attempt)),
                    Err(err) => {
                        warn!(task_id = %dispatch.id, error = %err, "Requeued task not published; the relay will.")
                    }
                }
            }
            Requeue::Failed(id) => {
                warn!(task_id = %id, "Lease expired with no attempts left; task failed.")
            }
            Requeue::Skipped(_) => {}
        }
    }
    store.dispatched(&sent).await?;
    Ok(expired.len())
}
