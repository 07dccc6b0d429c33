//! Kafka client configuration and topic set-up. Producer and consumer settings that Fleet's
//! guarantees depend on (idempotence, `acks=all`, manual offset store, earliest reset) are fixed
//! here, in one place.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::settings::KafkaSettings;

/// A topic set-up step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    #[error("cannot create the Kafka admin client: {0}")]
    Client(#[source] KafkaError),
    #[error("the broker did not answer the topic request: {0}")]
    Request(#[source] KafkaError),
    #[error("cannot create topic `{topic}`: {code}")]
    Create {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("cannot read metadata of topic `{topic}`: {source}")]
    Metadata { topic: String, source: KafkaError },
}

/// Settings common to every client: where the brokers are and how to authenticate. Properties
/// from `kafka.client` are applied last, so they override Fleet's defaults.
fn client_config(settings: &KafkaSettings, defaults: &[(&str, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    config.set("security.protocol", &settings.security_protocol);
    if !settings.sasl_mechanism.is_empty() {
        config.set("sasl.mechanisms", &settings.sasl_mechanism);
        config.set("sasl.username", &settings.sasl_username);
        config.set("sasl.password", settings.sasl_password.expose());
    }
    if !settings.ssl_ca_location.is_empty() {
        config.set("ssl.ca.location", &settings.ssl_ca_location);
    }
    for (key, value) in defaults {
        config.set(*key, value);
    }
    for (key, value) in &settings.client {
        config.set(key, value);
    }
    config
}

/// An idempotent producer: `acks=all`, retries without duplicates or reordering.
pub fn producer_config(settings: &KafkaSettings, client_id: &str) -> ClientConfig {
    client_config(
        settings,
        &[
            ("client.id", client_id.to_string()),
            ("enable.idempotence", "true".into()),
            ("acks", "all".into()),
            ("linger.ms", "5".into()),
            // A record without a partition or key goes to a random partition of its own, not to
            // one "sticky" partition per linger window: a burst of tasks must spread over every
            // worker's partitions. (The scheduler routes keyless tasks itself by default; see
            // `scheduler.partitioner`.)
            ("sticky.partitioning.linger.ms", "0".into()),
            ("message.timeout.ms", "30000".into()),
        ],
    )
}

/// A group consumer for at-least-once processing: offsets are stored by the application only
/// after the record is handled (`enable.auto.offset.store=false`) and committed in the
/// background; a new group starts from the earliest record so nothing submitted before the
/// first worker started is skipped.
pub fn consumer_config(settings: &KafkaSettings, group_id: &str, client_id: &str) -> ClientConfig {
    client_config(
        settings,
        &[
            ("client.id", client_id.to_string()),
            ("group.id", group_id.to_string()),
            ("auto.offset.reset", "earliest".into()),
            ("enable.auto.offset.store", "false".into()),
            ("enable.auto.commit", "true".into()),
            ("auto.commit.interval.ms", "1000".into()),
            ("enable.partition.eof", "false".into()),
            // A fetch waits at most this long for new records: it bounds how long a task can
            // sit on the broker before a worker sees it (librdkafka's default is 500 ms).
            ("fetch.wait.max.ms", "10".into()),
            ("partition.assignment.strategy", "cooperative-sticky".into()),
            (
                "session.timeout.ms",
                settings.session_timeout_ms.to_string(),
            ),
            (
                "heartbeat.interval.ms",
                settings.heartbeat_interval_ms.to_string(),
            ),
        ],
    )
}

/// Marks the record at `offset` as handled, so the next (auto-)commit moves the group past it.
///
/// librdkafka's `rd_kafka_offset_store` commits `offset + 1` itself (the next record to read);
/// passing `offset + 1` here would skip a record at the next hand-over of the partition. This
/// is the one place offsets are stored. An error after a revoke only means the next owner of
/// the partition reads the record again, which claims treat as a duplicate.
pub fn store_handled<C: rdkafka::consumer::Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
    consumer: &C,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<(), KafkaError> {
    consumer.store_offset(topic, partition, offset)
}

/// What [`ensure_topics`] found or did for one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicStatus {
    pub name: String,
    pub created: bool,
    pub partitions: usize,
}

/// An admin client.
pub fn admin_config(settings: &KafkaSettings) -> ClientConfig {
    client_config(settings, &[("client.id", "fleet-admin".into())])
}

/// Creates each topic that does not exist yet, with `partitions` partitions, and reports every
/// topic's actual partition count. New topics accept records of up to `max_message_bytes`
/// (`max.message.bytes`; see [`crate::message_size`]). Existing topics are left as they are.
///
/// Run this before any producer starts: brokers that auto-create topics (tansu does) would
/// otherwise create them with their default partition count.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    names: &[String],
    partitions: i32,
    replication_factor: i32,
    max_message_bytes: usize,
    timeout: Duration,
) -> Result<Vec<TopicStatus>, TopicError> {
    let admin: AdminClient<DefaultClientContext> = admin_config(settings)
        .create()
        .map_err(TopicError::Client)?;
    let max_bytes = max_message_bytes.to_string();
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                partitions,
                TopicReplication::Fixed(replication_factor),
            )
            .set("max.message.bytes", &max_bytes)
        })
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(TopicError::Request)?;

    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(TopicError::Create { topic, code }),
        }
    }

    let names = names.to_vec();
    let statuses = tokio::task::spawn_blocking(move || {
        names
            .into_iter()
            .map(|name| {
                let metadata =
                    admin
                        .inner()
                        .fetch_metadata(Some(&name), timeout)
                        .map_err(|source| TopicError::Metadata {
                            topic: name.clone(),
                            source,
                        })?;
                let partitions = metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == name)
                    .map_or(0, |t| t.partitions().len());
                Ok(TopicStatus {
                    created: created.contains(&name),
                    name,
                    partitions,
                })
            })
            .collect::<Result<Vec<_>, TopicError>>()
    })
    .await
    .expect("metadata lookup does not panic")?;
    Ok(statuses)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Secret;

    #[test]
    fn consumer_defaults_protect_at_least_once_and_overrides_win() {
        let mut settings = KafkaSettings::default();
        settings
            .client
            .insert("auto.commit.interval.ms".into(), "250".into());
        let config = consumer_config(&settings, "g", "c");
        assert_eq!(config.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(config.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(config.get("group.id"), Some("g"));
        assert_eq!(config.get("auto.commit.interval.ms"), Some("250"));
    }

    #[test]
    fn producer_is_idempotent_and_sasl_is_wired() {
        let settings = KafkaSettings {
            security_protocol: "sasl_ssl".into(),
            sasl_mechanism: "SCRAM-SHA-512".into(),
            sasl_username: "fleet".into(),
            sasl_password: Secret::new("hunter2"),
            ..KafkaSettings::default()
        };
        let config = producer_config(&settings, "p");
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("sasl.password"), Some("hunter2"));
    }
}
