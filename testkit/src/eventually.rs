use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every 50 ms until it returns `true`, or panics with `what` after `deadline`.
/// Tests wait on conditions with this, never with bare sleeps.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
