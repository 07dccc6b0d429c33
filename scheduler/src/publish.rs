//! Publishing task envelopes onto the priority topics, and records onto the rejected and dead
//! topics. Shared by the scheduler's ingest, the relay and the reaper.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fleet_common::Priority;
use fleet_common::store::Dispatch;
use fleet_common::task::Envelope;
use fleet_common::topics::Topics;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;

use crate::settings::Partitioner;

/// The routing fields of a stored task record (the payload is skipped, not parsed).
#[derive(Debug, Deserialize)]
struct Route {
    priority: Priority,
    #[serde(default)]
    key: Option<String>,
}

/// Sends Fleet's records with one idempotent producer.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    topics: Topics,
    partitioner: Partitioner,
    partitions: i32,
    next: std::sync::Arc<AtomicUsize>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

/// How long a send may wait for room in the producer queue and for the broker.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

impl Publisher {
    pub fn new(
        producer: FutureProducer,
        topics: Topics,
        partitioner: Partitioner,
        partitions: i32,
    ) -> Self {
        Self {
            producer,
            topics,
            partitioner,
            partitions: partitions.max(1),
            next: Default::default(),
        }
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// The partition for a task without a key, or `None` to let the producer pick.
    fn partition_for(&self, key: Option<&str>) -> Option<i32> {
        match (key, self.partitioner) {
            (Some(_), _) | (None, Partitioner::Random) => None,
            (None, Partitioner::RoundRobin) => {
                Some((self.next.fetch_add(1, Ordering::Relaxed) % self.partitions as usize) as i32)
            }
        }
    }

    /// Publishes one attempt of a task and waits for the broker's acknowledgement.
    pub async fn task(
        &self,
        id: &str,
        priority: Priority,
        key: Option<&str>,
        record_json: &str,
        attempt: u32,
    ) -> Result<(), KafkaError> {
        let topic = self.topics.tasks(priority);
        let envelope = Envelope::encode(record_json, attempt);
        let attempt_text = attempt.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "fleet-task-id",
                value: Some(id),
            })
            .insert(Header {
                key: "fleet-attempt",
                value: Some(&attempt_text),
            });
        let mut record = FutureRecord::to(&topic).payload(&envelope).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(partition) = self.partition_for(key) {
            record = record.partition(partition);
        }
        self.producer
            .send(record, SEND_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|(err, _)| err)
    }

    /// Publishes a task taken from Redis (relay or reaper), routing it from its stored record.
    pub async fn dispatch(&self, dispatch: &Dispatch) -> Result<(), KafkaError> {
        let route: Route = serde_json::from_str(&dispatch.record_json).unwrap_or(Route {
            priority: Priority::Normal,
            key: None,
        });
        self.task(
            &dispatch.id,
            route.priority,
            route.key.as_deref(),
            &dispatch.record_json,
            dispatch.attempt,
        )
        .await
    }

    /// Sends a refused submission to the rejected topic with the reason in headers.
    pub async fn rejected(
        &self,
        payload: Option<&[u8]>,
        code: &str,
        reason: &str,
        source: (&str, i32, i64),
    ) -> Result<(), KafkaError> {
        let topic = self.topics.rejected();
        let partition = source.1.to_string();
        let offset = source.2.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "fleet-reject-code",
                value: Some(code),
            })
            .insert(Header {
                key: "fleet-reject-reason",
                value: Some(reason),
            })
            .insert(Header {
                key: "fleet-source-topic",
                value: Some(source.0),
            })
            .insert(Header {
                key: "fleet-source-partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "fleet-source-offset",
                value: Some(&offset),
            });
        let mut record: FutureRecord<'_, (), [u8]> = FutureRecord::to(&topic).headers(headers);
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        self.producer
            .send(record, SEND_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|(err, _)| err)
    }

    /// Sends a dead-letter record (JSON) for a failed task.
    pub async fn dead(&self, id: &str, body: &str) -> Result<(), KafkaError> {
        let topic = self.topics.dead();
        let headers = OwnedHeaders::new().insert(Header {
            key: "fleet-task-id",
            value: Some(id),
        });
        let record = FutureRecord::to(&topic)
            .key(id)
            .payload(body)
            .headers(headers);
        self.producer
            .send(record, SEND_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|(err, _)| err)
    }
}
