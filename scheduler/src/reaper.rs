//! The reaper: finds tasks whose lease expired (their worker died, hung, or lost Redis) and
//! requeues them with the next attempt, or fails them once their attempts are used up. Every
//! decision is re-checked inside one Lua script on Redis time, so any number of reapers may run.

use fleet_common::store::{Requeue, Store, StoreError};
use tracing::{info, warn};

use crate::publish::{LivePartitions, Publisher};

/// Most expired leases handled per scan (a full scan runs again at once).
pub const BATCH: usize = 1_000;

/// One scan; returns how many expired leases it found. `live_max_age_ms`: workers heard from
/// within this long count as live for routing the requeued tasks.
pub async fn scan(
    store: &Store,
    publisher: &Publisher,
    live_max_age_ms: u64,
) -> Result<usize, StoreError> {
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
    let mut requeued = Vec::new();
    for outcome in &outcomes {
        match outcome {
            Requeue::Requeued(dispatch) => {
                info!(task_id = %dispatch.id, attempt = dispatch.attempt, "Lease expired; task requeued.");
                let (kind, priority) = labels(&dispatch.record_json);
                fleet_common::telemetry::metrics::tasks_requeued_of(kind, priority).increment(1);
                requeued.push(dispatch);
            }
            Requeue::Failed(id) => {
                fleet_common::telemetry::metrics::tasks_failed_by_reaper().increment(1);
                warn!(task_id = %id, "Lease expired with no attempts left; task failed.")
            }
            Requeue::Cancelled(id) => {
                fleet_common::telemetry::metrics::tasks_cancelled_by_reaper().increment(1);
                info!(task_id = %id, "Lease expired after a cancel request; task cancelled.")
            }
            Requeue::Skipped(_) => {}
        }
    }
    // The whole scan's requeues go out together: a worker that died holding a thousand tasks
    // must not make them wait for one broker round trip each.
    let sent = publisher.dispatch_all(requeued, &live, "reaper").await;
    store.dispatched(&sent).await?;
    Ok(expired.len())
}

/// The metric labels of a stored task record (kind and priority), without parsing its payload.
fn labels(record_json: &str) -> (String, String) {
    #[derive(serde::Deserialize)]
    struct Labels {
        kind: String,
        priority: String,
    }
    serde_json::from_str::<Labels>(record_json)
        .map(|l| (l.kind, l.priority))
        .unwrap_or_default()
}
