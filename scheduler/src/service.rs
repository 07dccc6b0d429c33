//! Start-up shared by `fleet-scheduler` and `fleet-reaper`: Redis, schema check, topics, the
//! producer.

use std::time::Duration;

use anyhow::Context;
use fleet_common::store::{self, Store};
use fleet_common::{Topics, kafka};

use crate::publish::Publisher;
use crate::settings::SchedulerSettings;

/// Bytes allowed beyond `tasks.max_task_bytes` for the envelope, record fields and headers.
const ENVELOPE_ROOM: usize = 64 * 1024;

/// Connects to Redis (checking the schema version) and Kafka (creating missing topics).
pub async fn connect(
    settings: &SchedulerSettings,
    service: &str,
) -> anyhow::Result<(Store, Publisher)> {
    let mut conn = store::connect(&settings.redis)
        .await
        .context("connecting to Redis")?;
    let keys = store::Keys::new(&settings.redis.key_prefix);
    store::check_schema(&mut conn, &keys, service)
        .await
        .context("checking the Redis schema")?;
    let store = Store::new(conn, keys, &settings.tasks);

    let topics = Topics::from_settings(&settings.topics);
    kafka::ensure_topics(
        &settings.kafka,
        &topics.all(),
        settings.topics.partitions,
        settings.topics.replication_factor,
        Duration::from_secs(15),
    )
    .await
    .context("creating topics")?;
    let client_id = format!("{service}-{}", std::process::id());
    let mut config = kafka::producer_config(&settings.kafka, &client_id);
    if !settings.kafka.client.contains_key("message.max.bytes") {
        // Room for the largest accepted task plus its envelope and headers.
        config.set(
            "message.max.bytes",
            (settings.tasks.max_task_bytes + ENVELOPE_ROOM).to_string(),
        );
    }
    let producer = config.create().context("creating the producer")?;
    let publisher = Publisher::new(
        producer,
        topics,
        settings.scheduler.partitioner,
        settings.topics.partitions,
    );
    Ok((store, publisher))
}
