//! What every service exposes to operators over HTTP: `/healthz` (the process runs),
//! `/readyz` (it reached Redis and Kafka and does its work) and `/metrics` (Prometheus text).
//! The scheduler adds its API and dashboard to the same listener.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Histogram buckets (seconds) for handler durations and queue waits: 1 ms to 5 min.
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
                .expect("valid buckets")
                .install_recorder()
                .inspect(|_| crate::telemetry::metrics::describe_all())
                .expect("one metrics recorder per process")
        })
        .clone()
}

/// Whether the service is ready for traffic; `/readyz` answers from it. Ready means started,
/// not draining, and no named problem (e.g. a consumer without partitions) is open; the answer
/// names every open problem, so nothing is idle without saying why.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<ReadinessState>);

#[derive(Debug, Default)]
struct ReadinessState {
    started: AtomicBool,
    problems: Mutex<BTreeMap<&'static str, String>>,
}

impl Readiness {
    /// Started and not draining.
    pub fn set(&self, ready: bool) {
        self.0.started.store(ready, Ordering::Relaxed);
    }

    /// Opens (`Some(reason)`) or closes (`None`) the problem named `what`.
    pub fn problem(&self, what: &'static str, reason: Option<String>) {
        let mut problems = self.problems();
        match reason {
            Some(reason) => problems.insert(what, reason),
            None => problems.remove(what),
        };
    }

    pub fn get(&self) -> bool {
        self.0.started.load(Ordering::Relaxed) && self.problems().is_empty()
    }

    /// Why the service is not ready, one reason per line; empty when it is ready.
    pub fn reasons(&self) -> Vec<String> {
        let mut reasons: Vec<String> = self
            .problems()
            .iter()
            .map(|(what, reason)| format!("{what}: {reason}"))
            .collect();
        if !self.0.started.load(Ordering::Relaxed) {
            reasons.insert(0, "starting or draining".into());
        }
        reasons
    }

    fn problems(&self) -> MutexGuard<'_, BTreeMap<&'static str, String>> {
        self.0
            .problems
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// `/healthz`, `/readyz` and `/metrics`.
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render))
        .with_state(readiness)
}

async fn ready(State(readiness): State<Readiness>) -> impl IntoResponse {
    let reasons = readiness.reasons();
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        let mut body = "not ready\n".to_string();
        for reason in reasons {
            body.push_str(&reason);
            body.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

async fn render() -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        metrics().render(),
    )
}

/// Binds `listen` and serves `app` until `token` is cancelled. Returns the bound address and
/// the server's task, or `None` when `listen` is empty.
pub async fn serve(
    listen: &str,
    app: Router,
    token: CancellationToken,
) -> std::io::Result<Option<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)>> {
    if listen.is_empty() {
        return Ok(None);
    }
    // Install the recorder before the service records anything.
    metrics();
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    info!(%addr, "HTTP listener started (/healthz, /readyz, /metrics).");
    let upkeep = token.clone();
    tokio::spawn(async move {
        // Histograms and summaries need periodic upkeep when nothing scrapes them.
        while !upkeep.is_cancelled() {
            tokio::select! {
                () = upkeep.cancelled() => {}
                () = tokio::time::sleep(Duration::from_secs(5)) => metrics().run_upkeep(),
            }
        }
    });
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await
    });
    Ok(Some((addr, server)))
}
