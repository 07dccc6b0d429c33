//! Optional export of Fleet's spans to an OpenTelemetry collector over OTLP/HTTP (JSON), set by
//! `log.otlp_endpoint` (e.g. `http://otel-collector:4318`). Spans are recorded explicitly where
//! a task crosses a service — `accept` (scheduler), `publish` (scheduler, relay, reaper), `task`
//! (worker, one per attempt) — all in the trace of the submission's `traceparent`, and sent in
//! batches by a background task. Export never blocks or fails the work: when the collector is
//! slow or away, spans are dropped and counted (`fleet_otlp_spans_dropped_total`).

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};

use crate::settings::OtlpEndpoint;
use crate::trace::TraceParent;

/// OTLP span kinds used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Internal = 1,
    Server = 2,
    Producer = 4,
    Consumer = 5,
}

/// One finished span.
#[derive(Debug, Clone)]
pub struct Span {
    pub name: &'static str,
    pub kind: SpanKind,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: Vec<(&'static str, String)>,
    /// Set when the work the span covers failed.
    pub error: Option<String>,
}

impl Span {
    /// A span for `trace` (its own id and parent) from `start_ns` until now.
    pub fn of(name: &'static str, kind: SpanKind, trace: &TraceParent, start_ns: u64) -> Self {
        Self {
            name,
            kind,
            trace_id: trace.trace_id().to_string(),
            span_id: trace.span_id().to_string(),
            parent_span_id: trace.parent_span_id().map(str::to_string),
            start_ns,
            end_ns: now_ns(),
            attributes: Vec::new(),
            error: None,
        }
    }

    pub fn attr(mut self, key: &'static str, value: impl ToString) -> Self {
        self.attributes.push((key, value.to_string()));
        self
    }
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

enum Message {
    Span(Box<Span>),
    Flush(oneshot::Sender<()>),
}

static EXPORTER: OnceLock<mpsc::Sender<Message>> = OnceLock::new();

/// Most spans waiting for export; beyond it new spans are dropped.
const QUEUE: usize = 20_000;
/// Most spans per request.
const BATCH: usize = 512;

/// Whether spans are exported (an endpoint is configured).
pub fn enabled() -> bool {
    EXPORTER.get().is_some()
}

/// Starts exporting to `endpoint` (`http://host:port[/base]`) as `service`. Must run inside a
/// Tokio runtime; an empty endpoint turns export off.
pub fn init(endpoint: &str, service: &str) {
    if endpoint.is_empty() {
        return;
    }
    let Some(target) = OtlpEndpoint::parse(endpoint) else {
        return; // refused by settings validation already
    };
    let (tx, rx) = mpsc::channel(QUEUE);
    if EXPORTER.set(tx).is_ok() {
        info!(endpoint, "Exporting spans over OTLP/HTTP.");
        tokio::spawn(export_loop(target, service.to_string(), rx));
    }
}

/// Records a finished span for export (no-op when export is off).
pub fn record(span: Span) {
    if let Some(tx) = EXPORTER.get()
        && tx.try_send(Message::Span(Box::new(span))).is_err()
    {
        crate::telemetry::metrics::otlp_spans_dropped().increment(1);
    }
}

/// Sends what is waiting (at shutdown); gives up after 5 s.
pub async fn flush() {
    let Some(tx) = EXPORTER.get() else { return };
    let (done, wait) = oneshot::channel();
    if tx.send(Message::Flush(done)).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
    }
}

async fn export_loop(target: OtlpEndpoint, service: String, mut rx: mpsc::Receiver<Message>) {
    let mut spans: Vec<Span> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let flush = tokio::select! {
            message = rx.recv() => match message {
                None => return,
                Some(Message::Span(span)) => {
                    spans.push(*span);
                    if spans.len() < BATCH { continue }
                    None
                }
                Some(Message::Flush(done)) => Some(done),
            },
            _ = tick.tick() => None,
        };
        while !spans.is_empty() {
            let batch: Vec<Span> = spans.drain(..spans.len().min(BATCH)).collect();
            if let Err(err) = post(&target, &body(&service, &batch)).await {
                crate::telemetry::metrics::otlp_spans_dropped().increment(batch.len() as u64);
                debug!(error = %err, spans = batch.len(), "OTLP export failed; spans dropped.");
            }
        }
        if let Some(done) = flush {
            let _ = done.send(());
        }
    }
}

/// The OTLP/JSON request body for one batch.
fn body(service: &str, spans: &[Span]) -> String {
    let string = |v: &str| json!({ "stringValue": v });
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut span = json!({
                "traceId": s.trace_id,
                "spanId": s.span_id,
                "name": s.name,
                "kind": s.kind as u8,
                "startTimeUnixNano": s.start_ns.to_string(),
                "endTimeUnixNano": s.end_ns.max(s.start_ns).to_string(),
                "attributes": s.attributes.iter()
                    .map(|(k, v)| json!({ "key": k, "value": string(v) }))
                    .collect::<Vec<_>>(),
                "status": match &s.error {
                    Some(message) => json!({ "code": 2, "message": message }),
                    None => json!({ "code": 1 }),
                },
            });
            if let Some(parent) = &s.parent_span_id {
                span["parentSpanId"] = json!(parent);
            }
            span
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": { "attributes": [
                { "key": "service.name", "value": string(service) },
                { "key": "service.version", "value": string(env!("CARGO_PKG_VERSION")) },
            ]},
            "scopeSpans": [{ "scope": { "name": "fleet" }, "spans": spans }],
        }]
    })
    .to_string()
}

/// Posts one export request to `target`.
async fn post(target: &OtlpEndpoint, body: &str) -> std::io::Result<()> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(&target.authority).await?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            target.path,
            target.authority,
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        let mut status = [0u8; 12];
        stream.read_exact(&mut status).await?;
        let code = std::str::from_utf8(&status[9..12]).unwrap_or("");
        if code.starts_with('2') {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("collector answered {code}")))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("collector timed out")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_map_to_the_traces_path() {
        let t = OtlpEndpoint::parse("http://collector:4318").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("collector:4318", "/v1/traces")
        );
        let t = OtlpEndpoint::parse("http://c:4318/otlp/").unwrap();
        assert_eq!(t.path, "/otlp/v1/traces");
        assert!(
            OtlpEndpoint::parse("https://c:4318").is_none(),
            "TLS is not supported"
        );
        assert!(OtlpEndpoint::parse("http://nohostport").is_none());
    }

    #[test]
    fn the_body_is_otlp_json_with_parents_and_errors() {
        let root = TraceParent::new_root();
        let child = root.child();
        let span = Span::of("task", SpanKind::Consumer, &child, 5).attr("task_id", "t1");
        let failed = Span {
            error: Some("boom".into()),
            ..span.clone()
        };
        let body: Value = serde_json::from_str(&body("fleet-worker", &[span, failed])).unwrap();
        let spans = &body["resourceSpans"][0]["scopeSpans"][0]["spans"];
        assert_eq!(spans[0]["traceId"], root.trace_id());
        assert_eq!(spans[0]["parentSpanId"], root.span_id());
        assert_eq!(spans[0]["kind"], 5);
        assert_eq!(spans[0]["attributes"][0]["value"]["stringValue"], "t1");
        assert_eq!(spans[1]["status"]["code"], 2);
        assert_eq!(
            body["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "fleet-worker"
        );
    }
}
