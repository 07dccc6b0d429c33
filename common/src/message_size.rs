//! How large a Fleet record may be, and the start-up check that every link on its way can carry
//! one: a task that Redis accepted but no producer or topic can take would sit in the outbox
//! forever. `tasks.max_task_bytes` (1 MiB by default) must fit into the producer's
//! `message.max.bytes` and each topic's `max.message.bytes`, with room for the envelope,
//! headers and a dead letter's attempt history.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use tracing::{info, warn};

use crate::settings::KafkaSettings;

/// Bytes a record may take beyond `tasks.max_task_bytes`: the envelope and filled-in record
/// fields, headers, and a dead letter's error and attempt history (see `lua/prelude.lua`).
pub const RECORD_ROOM: usize = 256 * 1024;

/// librdkafka's own default `message.max.bytes`: smaller than the 1 MiB default task limit.
const LIBRDKAFKA_DEFAULT: usize = 1_000_000;

/// The largest record Fleet may produce for tasks of at most `max_task_bytes`.
pub fn record_limit(max_task_bytes: usize) -> usize {
    max_task_bytes + RECORD_ROOM
}

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
    match settings.client.get("message.max.bytes") {
        Some(value) => {
            let configured = value.trim().parse().unwrap_or(0);
            if configured < needed {
                return Err(SizeError::Producer { configured, needed });
            }
        }
        None => {
            config.set(
                "message.max.bytes",
                needed.max(LIBRDKAFKA_DEFAULT).to_string(),
            );
        }
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
    let admin: AdminClient<DefaultClientContext> =
        match crate::kafka::admin_config(settings).create() {
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
mod tests {
    use super::*;

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
