//! Optional export of Fleet's spans to an OpenTelemetry collector over OTLP/HTTP (JSON), set by
//! `log.otlp_endpoint` (e.g. `http://otel-collector:4318`). Spans are recorded explicitly where
//! a task crosses a service — `accept` (scheduler), `publish` (scheduler, relay, reaper), `task`
//! (worker, one per attempt) — all in the trace of the submission's `traceparent`.
//!
//! Their ids are Fleet's own: a span's id is minted by [`TraceParent`] before its work starts,
//! stored with the task in Redis and sent in the Kafka `traceparent` header, so the next span
//! (in another process, maybe much later) can name it as its parent. A finished span is
//! therefore handed to the OpenTelemetry SDK as [`SpanData`] (not started through a `Tracer`,
//! which would mint ids of its own): the SDK's batch span processor queues and batches it on
//! its own thread, and `opentelemetry-otlp` sends the batches as OTLP/HTTP JSON.
//!
//! Export never blocks or fails the work: when the collector is slow or away, spans are
//! dropped and counted (`fleet_otlp_spans_dropped_total`). The standard `OTEL_EXPORTER_OTLP_*`
//! variables add headers (`OTEL_EXPORTER_OTLP_TRACES_HEADERS`, e.g. an API key) and
//! `OTEL_RESOURCE_ATTRIBUTES` adds resource attributes; the endpoint is `log.otlp_endpoint`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanContext, SpanId, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanEvents, SpanExporter, SpanLinks,
    SpanProcessor,
};
use tracing::{debug, info, warn};

use crate::settings::OtlpEndpoint;
use crate::trace::TraceParent;

/// OTLP span kinds used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Internal,
    Server,
    Producer,
    Consumer,
}

impl From<SpanKind> for opentelemetry::trace::SpanKind {
    fn from(kind: SpanKind) -> Self {
        match kind {
            SpanKind::Internal => Self::Internal,
            SpanKind::Server => Self::Server,
            SpanKind::Producer => Self::Producer,
            SpanKind::Consumer => Self::Consumer,
        }
    }
}

/// One finished span.
#[derive(Debug, Clone)]
pub struct Span {
    pub name: &'static str,
    pub kind: SpanKind,
    /// The span's own id, its trace and (when known) its parent.
    pub trace: TraceParent,
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
            trace: *trace,
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

    /// The span as the SDK carries it; `None` for ids that are not hex (never, for a
    /// [`TraceParent`]).
    fn into_data(self) -> Option<SpanData> {
        let trace_id = TraceId::from_hex(self.trace.trace_id()).ok()?;
        let span_id = SpanId::from_hex(self.trace.span_id()).ok()?;
        let parent_span_id = match self.trace.parent_span_id() {
            Some(parent) => SpanId::from_hex(parent).ok()?,
            None => SpanId::INVALID,
        };
        // The W3C flags of the header (`…-01`: sampled).
        let flags = u8::from_str_radix(&self.trace.as_str()[53..], 16).unwrap_or(1);
        let at = |ns: u64| UNIX_EPOCH + Duration::from_nanos(ns);
        Some(SpanData {
            span_context: SpanContext::new(
                trace_id,
                span_id,
                TraceFlags::new(flags),
                false,
                TraceState::NONE,
            ),
            parent_span_id,
            // A server span's parent is the caller's, a consumer span's the producer's: both
            // come from another process.
            parent_span_is_remote: matches!(self.kind, SpanKind::Server | SpanKind::Consumer),
            span_kind: self.kind.into(),
            name: self.name.into(),
            start_time: at(self.start_ns),
            end_time: at(self.end_ns.max(self.start_ns)),
            attributes: self
                .attributes
                .into_iter()
                .map(|(key, value)| KeyValue::new(key, value))
                .collect(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: match self.error {
                Some(message) => Status::error(message),
                None => Status::Ok,
            },
            instrumentation_scope: scope().clone(),
        })
    }
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Most spans waiting for export; beyond it new spans are dropped.
const QUEUE: usize = 20_000;
/// Most spans per request.
const BATCH: usize = 512;
/// How often what is waiting is sent.
const INTERVAL: Duration = Duration::from_secs(1);
/// How long one export request (with its retries) may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`shutdown`] waits for the last batches.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

static PROCESSOR: OnceLock<BatchSpanProcessor> = OnceLock::new();
/// Spans handed to the processor and not yet through an export: the queue bound is kept here,
/// so a span that does not fit is counted as dropped (the SDK would drop it silently).
static PENDING: AtomicUsize = AtomicUsize::new(0);

/// Whether spans are exported (an endpoint is configured).
pub fn enabled() -> bool {
    PROCESSOR.get().is_some()
}

/// Starts exporting to `endpoint` (`http://host:port[/base]`) as `service`; an empty endpoint
/// turns export off. Needs no Tokio runtime: export runs on the SDK's own thread.
pub fn init(endpoint: &str, service: &str) {
    if endpoint.is_empty() || enabled() {
        return;
    }
    let Some(target) = OtlpEndpoint::parse(endpoint) else {
        return; // refused by settings validation already
    };
    match processor(&target, service) {
        Ok(processor) => {
            if PROCESSOR.set(processor).is_ok() {
                info!(endpoint, "Exporting spans over OTLP/HTTP.");
            }
        }
        Err(err) => {
            warn!(endpoint, error = %err, "Cannot export spans over OTLP/HTTP; export is off.")
        }
    }
}

/// The batch span processor sending to `target`.
fn processor(
    target: &OtlpEndpoint,
    service: &str,
) -> Result<BatchSpanProcessor, Box<dyn std::error::Error + Send + Sync>> {
    // Plain HTTP to a collector or sidecar next to the service: no proxy from the environment.
    // reqwest's blocking client panics when built inside an async runtime, so it is built on
    // a thread of its own (as opentelemetry-otlp does for its default client).
    let client = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                reqwest::blocking::Client::builder()
                    .no_proxy()
                    .timeout(EXPORT_TIMEOUT)
                    .build()
            })
            .join()
    })
    .map_err(|_| "the thread building the HTTP client panicked")??;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        // Used as it is: the builder adds no `/v1/traces` to an endpoint given in code.
        .with_endpoint(format!("http://{}{}", target.authority, target.path))
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(client)
        .build()?;
    exporter.set_resource(&resource(service));
    let config = BatchConfigBuilder::default()
        .with_max_queue_size(QUEUE)
        .with_max_export_batch_size(BATCH)
        .with_scheduled_delay(INTERVAL)
        .build();
    Ok(BatchSpanProcessor::builder(Counted(exporter))
        .with_batch_config(config)
        .build())
}

/// `service.name`, `service.version` (and the SDK's `telemetry.sdk.*` and any
/// `OTEL_RESOURCE_ATTRIBUTES`).
fn resource(service: &str) -> Resource {
    Resource::builder()
        .with_service_name(service.to_string())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

fn scope() -> &'static InstrumentationScope {
    static SCOPE: OnceLock<InstrumentationScope> = OnceLock::new();
    SCOPE.get_or_init(|| {
        InstrumentationScope::builder("fleet")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build()
    })
}

/// Records a finished span for export (no-op when export is off).
pub fn record(span: Span) {
    let Some(processor) = PROCESSOR.get() else {
        return;
    };
    let Some(data) = span.into_data() else {
        return;
    };
    if PENDING.fetch_add(1, Ordering::Relaxed) >= QUEUE {
        PENDING.fetch_sub(1, Ordering::Relaxed);
        crate::telemetry::metrics::otlp_spans_dropped().increment(1);
        return;
    }
    processor.on_end(data);
}

/// Sends what is waiting and stops exporting (at exit); gives up after 5 s. Blocks: call it
/// after the runtime's work is done (or from `spawn_blocking`).
pub fn shutdown() {
    if let Some(processor) = PROCESSOR.get()
        && let Err(err) = processor.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
    {
        debug!(error = %err, "OTLP export did not finish at shutdown.");
    }
}

/// The OTLP exporter, counting the spans of failed exports as dropped.
#[derive(Debug)]
struct Counted(opentelemetry_otlp::SpanExporter);

impl SpanExporter for Counted {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.0.export(batch).await;
        PENDING.fetch_sub(spans, Ordering::Relaxed);
        if let Err(err) = &result {
            crate::telemetry::metrics::otlp_spans_dropped().increment(spans as u64);
            debug!(error = %err, spans, "OTLP export failed; spans dropped.");
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

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
    fn spans_keep_fleets_ids_parents_and_errors() {
        let root = TraceParent::new_root();
        let child = root.child();
        let span = Span::of("task", SpanKind::Consumer, &child, 5).attr("task_id", "t1");
        let data = span.clone().into_data().unwrap();
        assert_eq!(data.span_context.trace_id().to_string(), root.trace_id());
        assert_eq!(data.span_context.span_id().to_string(), child.span_id());
        assert_eq!(data.parent_span_id.to_string(), root.span_id());
        assert!(data.parent_span_is_remote);
        assert_eq!(data.span_kind, opentelemetry::trace::SpanKind::Consumer);
        assert_eq!(data.status, Status::Ok);
        assert_eq!(data.attributes, vec![KeyValue::new("task_id", "t1")]);
        let failed = Span {
            error: Some("boom".into()),
            ..span
        };
        assert_eq!(failed.into_data().unwrap().status, Status::error("boom"));
        let top = Span::of("accept", SpanKind::Server, &root, 5)
            .into_data()
            .unwrap();
        assert_eq!(top.parent_span_id, SpanId::INVALID);
    }

    /// The JSON the exporter posts (what `SpanSink` in the integration tests parses): hex
    /// ids, numeric kind and status code, string attribute values, and the service name among
    /// the resource attributes (in no fixed order).
    #[test]
    fn the_export_body_is_otlp_json() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
        use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;

        let root = TraceParent::new_root();
        let child = root.child();
        let span = Span::of("task", SpanKind::Consumer, &child, 5).attr("task_id", "t1");
        let failed = Span {
            error: Some("boom".into()),
            ..span.clone()
        };
        let resource = ResourceAttributesWithSchema::from(&resource("fleet-worker"));
        let spans = vec![span.into_data().unwrap(), failed.into_data().unwrap()];
        let request = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(spans, &resource),
        };
        let body: Value = serde_json::to_value(&request).unwrap();
        let spans = &body["resourceSpans"][0]["scopeSpans"][0]["spans"];
        assert_eq!(spans[0]["traceId"], root.trace_id());
        assert_eq!(spans[0]["spanId"], child.span_id());
        assert_eq!(spans[0]["parentSpanId"], root.span_id());
        assert_eq!(spans[0]["kind"], 5);
        assert_eq!(spans[0]["startTimeUnixNano"], "5");
        assert_eq!(spans[0]["attributes"][0]["key"], "task_id");
        assert_eq!(spans[0]["attributes"][0]["value"]["stringValue"], "t1");
        assert_eq!(spans[0]["status"]["code"], 1);
        assert_eq!(spans[1]["status"]["code"], 2);
        assert_eq!(spans[1]["status"]["message"], "boom");
        assert_eq!(
            body["resourceSpans"][0]["scopeSpans"][0]["scope"]["name"],
            "fleet"
        );
        let service = body["resourceSpans"][0]["resource"]["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == "service.name")
            .map(|a| a["value"]["stringValue"].clone());
        assert_eq!(service, Some(Value::from("fleet-worker")));
    }
}
