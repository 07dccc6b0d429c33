//! Kafka client configuration and topic set-up. Producer and consumer settings that Fleet's
//! guarantees depend on (idempotence, `acks=all`, manual offset store, earliest reset) are fixed
//! here, in one place.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use tracing::{info, warn};

use crate::settings::KafkaSettings;
use crate::task::RECORD_ROOM;

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
/// from `kafka.client` are applied last, so they override Fleet's defaults. The one place a
/// client configuration is made (`clippy.toml` forbids it elsewhere).
#[allow(clippy::disallowed_methods)]
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
/// (`max.message.bytes`; see [`check_topics`]). Existing topics are left as they are.
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

// The start-up checks that every link on a task's way can carry Fleet's largest record
// (`crate::task::record_limit`).

/// librdkafka's own default `message.max.bytes`: smaller than the 1 MiB default task limit.
const LIBRDKAFKA_DEFAULT: usize = 1_000_000;

/// A link cannot carry the largest record.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SizeError {
    #[error(
        "kafka.client.message.max.bytes = {configured} is smaller than the largest Fleet record \
         ({needed} bytes: tasks.max_task_bytes + {RECORD_ROOM}); raise it or lower \
         tasks.max_task_bytes"
    )]
    Producer { configured: usize, needed: usize },
    #[error(
        "topic `{topic}` accepts records of at most {limit} bytes (max.message.bytes) but Fleet \
         needs {needed} (tasks.max_task_bytes + {RECORD_ROOM}); raise the topic's \
         max.message.bytes or lower tasks.max_task_bytes"
    )]
    Topic {
        topic: String,
        limit: usize,
        needed: usize,
    },
}

/// Sets the producer's `message.max.bytes` so the largest record fits, or refuses a smaller
/// value the operator set in `kafka.client`.
pub fn fit_producer(
    config: &mut ClientConfig,
    settings: &KafkaSettings,
    needed: usize,
) -> Result<(), SizeError> {
    if let Some(configured) = settings.producer_limit_below(needed) {
        return Err(SizeError::Producer { configured, needed });
    }
    if !settings.client.contains_key("message.max.bytes") {
        config.set(
            "message.max.bytes",
            needed.max(LIBRDKAFKA_DEFAULT).to_string(),
        );
    }
    Ok(())
}

/// Checks `max.message.bytes` of each topic against `needed`. A broker that does not report
/// the setting (tansu reports none) or does not answer is logged and passes: only a limit the
/// broker states can refuse the start.
pub async fn check_topics(
    settings: &KafkaSettings,
    topics: &[String],
    needed: usize,
    timeout: Duration,
) -> Result<(), SizeError> {
    let admin: AdminClient<DefaultClientContext> = match admin_config(settings).create() {
        Ok(admin) => admin,
        Err(err) => {
            warn!(error = %err, "Cannot check topic message limits.");
            return Ok(());
        }
    };
    let specifiers: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(timeout));
    let results = match admin.describe_configs(&specifiers, &options).await {
        Ok(results) => results,
        Err(err) => {
            warn!(error = %err, "Broker did not describe topic configs; message limits unchecked.");
            return Ok(());
        }
    };
    let mut unreported = Vec::new();
    for (topic, result) in topics.iter().zip(results) {
        let limit = result.ok().and_then(|resource| {
            resource
                .entries
                .iter()
                .find(|e| e.name == "max.message.bytes")
                .and_then(|e| e.value.as_deref()?.parse::<usize>().ok())
        });
        match limit {
            Some(limit) => check_limit(topic, limit, needed)?,
            None => unreported.push(topic.as_str()),
        }
    }
    if !unreported.is_empty() {
        info!(topics = ?unreported, needed, "Broker reports no max.message.bytes for these topics; assuming they fit.");
    }
    Ok(())
}

fn check_limit(topic: &str, limit: usize, needed: usize) -> Result<(), SizeError> {
    if limit < needed {
        return Err(SizeError::Topic {
            topic: topic.to_string(),
            limit,
            needed,
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod size_tests {
    use super::*;
    use crate::task::record_limit;

    #[test]
    fn the_default_limit_needs_more_than_librdkafkas_default() {
        let needed = record_limit(1 << 20);
        assert!(needed > LIBRDKAFKA_DEFAULT);
        let mut config = ClientConfig::new();
        fit_producer(&mut config, &KafkaSettings::default(), needed).unwrap();
        assert_eq!(config.get("message.max.bytes"), Some(&*needed.to_string()));
    }

    #[test]
    fn a_configured_producer_limit_too_small_is_refused_with_both_numbers() {
        let mut settings = KafkaSettings::default();
        settings
            .client
            .insert("message.max.bytes".into(), "1000000".into());
        let err = fit_producer(&mut ClientConfig::new(), &settings, record_limit(1 << 20))
            .unwrap_err()
            .to_string();
        assert!(err.contains("1000000") && err.contains("1310720"), "{err}");
        settings
            .client
            .insert("message.max.bytes".into(), "2000000".into());
        let mut config = ClientConfig::new();
        fit_producer(&mut config, &settings, record_limit(1 << 20)).unwrap();
        assert_eq!(
            config.get("message.max.bytes"),
            None,
            "the operator's value stays"
        );
    }

    #[test]
    fn a_topic_limit_below_the_record_limit_is_refused() {
        let err = check_limit("fleet.tasks.low", 1_048_588, record_limit(1 << 20)).unwrap_err();
        assert!(err.to_string().contains("fleet.tasks.low"), "{err}");
        assert!(check_limit("t", 2 << 20, record_limit(1 << 20)).is_ok());
    }
}
