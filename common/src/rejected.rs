//! The rejected topic's record format: input Fleet refused (a submission the scheduler could
//! not accept, or a record on a task topic a worker could not use), kept with the reason in
//! headers so nothing refused disappears silently and no partition is blocked by it.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// How much of a refused record is kept: the original may be larger than any topic accepts.
pub const KEEP_BYTES: usize = 64 * 1024;

/// Where a refused record was read.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// Sends a refused record to `topic` (the rejected topic) with headers `fleet-reject-code`,
/// `fleet-reject-reason`, `fleet-original-size` and `fleet-source-{topic,partition,offset}`,
/// and waits for the broker's acknowledgement.
pub async fn send(
    producer: &FutureProducer,
    topic: &str,
    payload: Option<&[u8]>,
    code: &str,
    reason: &str,
    source: Source<'_>,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let partition = source.partition.to_string();
    let offset = source.offset.to_string();
    let size = payload.map_or(0, <[u8]>::len).to_string();
    let payload = payload.map(|p| &p[..p.len().min(KEEP_BYTES)]);
    let headers = [
        ("fleet-original-size", size.as_str()),
        ("fleet-reject-code", code),
        ("fleet-reject-reason", reason),
        ("fleet-source-topic", source.topic),
        ("fleet-source-partition", &partition),
        ("fleet-source-offset", &offset),
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
