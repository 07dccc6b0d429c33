//! Calling a dependency that is briefly away (Redis restarting, a broker
//! failing over) until it answers, without ever skipping the work. ("Retry" in Fleet means a
//! task's next attempt; this is not that.)

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Runs `op` until it succeeds, backing off from 100 ms to 5 s between tries. Returns `None`
/// if `token` is cancelled first.
pub async fn keep_trying<T, E, F, Fut>(
    token: &CancellationToken,
    what: &str,
    mut op: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(value) => return Some(value),
            Err(err) => {
                warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "Failed {what}; retrying.");
                tokio::select! {
                    () = token.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
