//! Every Kafka record Fleet writes, and the header names they carry: the task envelope on the
//! priority topics, the rejected record (input Fleet refused, kept with the reason in headers
//! so nothing refused disappears silently and no partition is blocked by it) and the
//! dead-letter record. Each has one builder here and one way to be sent.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use serde_json::json;

use crate::store::StoredTask;
use crate::task::TaskRecord;
use crate::trace::TraceParent;

/// The names of the headers on Fleet's records.
pub mod header {
    /// The task's id, on task and dead-letter records.
    pub const TASK_ID: &str = "fleet-task-id";
    /// The attempt a task record carries (also inside its envelope).
    pub const ATTEMPT: &str = "fleet-attempt";
    /// W3C trace context: the span of one dispatch, or a producer's own.
    pub const TRACEPARENT: &str = "traceparent";
    /// A rejected record's machine-readable reason (`RejectCode`).
    pub const REJECT_CODE: &str = "fleet-reject-code";
    /// A rejected record's human-readable reason.
    pub const REJECT_REASON: &str = "fleet-reject-reason";
    /// The refused record's size in bytes (its value may be cut to `KEEP_BYTES`).
    pub const ORIGINAL_SIZE: &str = "fleet-original-size";
    /// Where the refused record was read.
    pub const SOURCE_TOPIC: &str = "fleet-source-topic";
    pub const SOURCE_PARTITION: &str = "fleet-source-partition";
    pub const SOURCE_OFFSET: &str = "fleet-source-offset";
}

/// Version of the [`Envelope`] format on the task topics.
pub const ENVELOPE_VERSION: u32 = 1;

/// One delivery of a task on a task topic: `{"v":1,"attempt":N,"task":{…}}`. The attempt is
/// the fencing token the claim will take.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub v: u32,
    pub attempt: u32,
    pub task: TaskRecord,
}

/// Why a record on a task topic is not a usable envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidEnvelope {
    #[error("record has no value")]
    Empty,
    #[error("record is not a task envelope: {0}")]
    Malformed(String),
    #[error("envelope version {0} is not supported (this build reads {ENVELOPE_VERSION})")]
    Version(u32),
    #[error("envelope attempt must be at least 1")]
    ZeroAttempt,
}

impl Envelope {
    /// Builds the envelope text around a stored record without re-serializing it.
    pub fn encode(record_json: &str, attempt: u32) -> String {
        use std::fmt::Write;
        // Sized up front: `format!` grew the string while copying the record into it.
        let mut out = String::with_capacity(record_json.len() + 40);
        let _ = write!(
            out,
            "{{\"v\":{ENVELOPE_VERSION},\"attempt\":{attempt},\"task\":"
        );
        out.push_str(record_json);
        out.push('}');
        out
    }

    /// This envelope as JSON (the record is serialized again).
    pub fn to_json(&self) -> String {
        Self::encode(&self.task.to_json(), self.attempt)
    }

    /// Parses and checks a record from a task topic.
    pub fn decode(bytes: Option<&[u8]>) -> Result<Self, InvalidEnvelope> {
        let bytes = bytes
            .filter(|b| !b.is_empty())
            .ok_or(InvalidEnvelope::Empty)?;
        let envelope: Envelope = serde_json::from_slice(bytes).map_err(|e| {
            let mut message = e.to_string();
            message.truncate(200);
            InvalidEnvelope::Malformed(message)
        })?;
        if envelope.v != ENVELOPE_VERSION {
            return Err(InvalidEnvelope::Version(envelope.v));
        }
        if envelope.attempt == 0 {
            return Err(InvalidEnvelope::ZeroAttempt);
        }
        Ok(envelope)
    }
}

/// The trace context a Kafka record carries in its `traceparent` header, if present and valid.
pub fn trace_of(message: &impl rdkafka::Message) -> Option<TraceParent> {
    use rdkafka::message::Headers;
    message
        .headers()?
        .iter()
        .find(|h| h.key == header::TRACEPARENT)
        .and_then(|h| std::str::from_utf8(h.value?).ok())
        .and_then(TraceParent::parse)
}

/// The headers of one attempt's record on a task topic.
pub fn task_headers(id: &str, attempt: &str, traceparent: Option<&str>) -> OwnedHeaders {
    let headers = OwnedHeaders::new_with_capacity(3)
        .insert(Header {
            key: header::TASK_ID,
            value: Some(id),
        })
        .insert(Header {
            key: header::ATTEMPT,
            value: Some(attempt),
        });
    match traceparent {
        Some(traceparent) => headers.insert(Header {
            key: header::TRACEPARENT,
            value: Some(traceparent),
        }),
        None => headers,
    }
}

/// How much of a refused record is kept: the original may be larger than any topic accepts.
pub const KEEP_BYTES: usize = 64 * 1024;

/// Where a refused record was read.
#[derive(Debug, Clone, Copy)]
pub struct RejectedSource<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// Sends a refused record to `topic` (the rejected topic) with headers `fleet-reject-code`,
/// `fleet-reject-reason`, `fleet-original-size` and `fleet-source-{topic,partition,offset}`,
/// and waits for the broker's acknowledgement.
pub async fn send_rejected(
    producer: &FutureProducer,
    topic: &str,
    payload: Option<&[u8]>,
    code: &str,
    reason: &str,
    source: RejectedSource<'_>,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let partition = source.partition.to_string();
    let offset = source.offset.to_string();
    let size = payload.map_or(0, <[u8]>::len).to_string();
    let payload = payload.map(|p| &p[..p.len().min(KEEP_BYTES)]);
    let headers = [
        (header::ORIGINAL_SIZE, size.as_str()),
        (header::REJECT_CODE, code),
        (header::REJECT_REASON, reason),
        (header::SOURCE_TOPIC, source.topic),
        (header::SOURCE_PARTITION, &partition),
        (header::SOURCE_OFFSET, &offset),
    ]
    .into_iter()
    .fold(OwnedHeaders::new(), |headers, (key, value)| {
        headers.insert(Header {
            key,
            value: Some(value),
        })
    });
    let mut record: FutureRecord<'_, (), [u8]> = FutureRecord::to(topic).headers(headers);
    if let Some(payload) = payload {
        record = record.payload(payload);
    }
    producer
        .send(record, timeout)
        .await
        .map(|_| ())
        .map_err(|(err, _)| err)
}

/// The dead-letter record of a failed task: the envelope of the last attempt (the task as
/// stored, payload byte for byte), how many attempts it had, every attempt's end (`history`),
/// and why it failed.
pub fn dead_letter(task: &StoredTask) -> String {
    let envelope: serde_json::Value = serde_json::from_str(&Envelope::encode(
        task.record.as_deref().unwrap_or_default(),
        task.attempt,
    ))
    .unwrap_or(serde_json::Value::Null);
    json!({
        "v": 1,
        "id": task.id,
        "envelope": envelope,
        "attempts": task.attempt,
        "released": task.released.unwrap_or(0),
        "error": task.error.as_deref().unwrap_or_default(),
        "history": task.history,
        "worker": task
            .history
            .last()
            .map(|last| last.worker.as_str())
            .or(task.worker.as_deref())
            .unwrap_or_default(),
        "created_ms": task.created_ms,
        "finished_ms": task.finished_ms.unwrap_or(0),
    })
    .to_string()
}

/// Sends a task's dead-letter record (see [`dead_letter`]) to `topic`, keyed by the task id,
/// and waits for the broker's acknowledgement.
pub async fn send_dead_letter(
    producer: &FutureProducer,
    topic: &str,
    id: &str,
    body: &str,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let headers = OwnedHeaders::new().insert(Header {
        key: header::TASK_ID,
        value: Some(id),
    });
    let record = FutureRecord::to(topic)
        .key(id)
        .payload(body)
        .headers(headers);
    producer
        .send(record, timeout)
        .await
        .map(|_| ())
        .map_err(|(err, _)| err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::priority::Priority;
    use crate::task::{TaskDefaults, TaskSpec};

    const LIMIT: usize = 1 << 20;
    const DEFAULTS: TaskDefaults = TaskDefaults {
        max_attempts: 5,
        timeout_ms: 0,
    };

    #[test]
    fn full_submission_round_trips_through_an_envelope() {
        let text = br#"{"id":"a-1","kind":"echo","payload":{"x":[1,2,{"y":"z"}]},"priority":"critical",
            "queue":"emails","key":"user:7","max_attempts":3,"timeout_ms":5000,"idempotency_key":"k"}"#;
        let spec = TaskSpec::parse(text, LIMIT).unwrap();
        let record = TaskRecord::from_spec(spec, DEFAULTS, || unreachable!());
        let wire = Envelope::encode(&record.to_json(), 4);
        let envelope = Envelope::decode(Some(wire.as_bytes())).unwrap();
        assert_eq!(envelope.attempt, 4);
        assert_eq!(envelope.task.id, "a-1");
        assert_eq!(envelope.task.payload.get(), r#"{"x":[1,2,{"y":"z"}]}"#);
        assert_eq!(envelope.task.priority, Priority::Critical);
        assert_eq!(envelope.task.key.as_deref(), Some("user:7"));
    }

    #[test]
    fn envelopes_are_checked() {
        assert_eq!(Envelope::decode(None).unwrap_err(), InvalidEnvelope::Empty);
        assert!(matches!(
            Envelope::decode(Some(b"{}")),
            Err(InvalidEnvelope::Malformed(_))
        ));
        let record = r#"{"id":"a","kind":"noop","payload":null,"priority":"low","queue":"q","max_attempts":1,"timeout_ms":0}"#;
        let v2 = format!(r#"{{"v":2,"attempt":1,"task":{record}}}"#);
        assert_eq!(
            Envelope::decode(Some(v2.as_bytes())).unwrap_err(),
            InvalidEnvelope::Version(2)
        );
        let zero = Envelope::encode(record, 0);
        assert_eq!(
            Envelope::decode(Some(zero.as_bytes())).unwrap_err(),
            InvalidEnvelope::ZeroAttempt
        );
        let negative = format!(r#"{{"v":1,"attempt":-1,"task":{record}}}"#);
        assert!(Envelope::decode(Some(negative.as_bytes())).is_err());
    }
}
