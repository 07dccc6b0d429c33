//! `fleetctl topics create` and `fleetctl ping`: the broker and Redis, as Fleet needs them.

use std::time::{Duration, Instant};

use anyhow::Context;
use fleet_common::settings::{self, CommonSettings};
use fleet_common::{Topics, kafka};

use crate::connect;

pub async fn create_topics(settings: &CommonSettings, partitions: i32) -> anyhow::Result<()> {
    let names = Topics::from_settings(&settings.topics).all();
    let statuses = kafka::ensure_topics(
        &settings.kafka,
        &names,
        partitions,
        settings.topics.replication_factor,
        fleet_common::message_size::record_limit(settings.tasks.max_task_bytes),
        Duration::from_secs(15),
    )
    .await
    .with_context(|| format!("creating topics on {}", settings.kafka.brokers))?;
    for status in statuses {
        let what = if status.created { "created" } else { "exists " };
        let note = if !status.created && status.partitions != partitions as usize {
            format!(" (wanted {partitions}; partitions of an existing topic are not changed)")
        } else {
            String::new()
        };
        println!(
            "{what} {:<40} {} partitions{note}",
            status.name, status.partitions
        );
    }
    Ok(())
}

pub async fn ping(settings: &CommonSettings, wait: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        match ping_once(settings).await {
            Ok(report) => {
                println!("{report}");
                return Ok(());
            }
            Err(err) if start.elapsed() >= wait => return Err(err),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

async fn ping_once(settings: &CommonSettings) -> anyhow::Result<String> {
    let store = connect(settings).await?;
    let mut conn = store.conn();
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    let schema: Option<String> = redis::cmd("HGET")
        .arg(store.keys().schema())
        .arg("version")
        .query_async(&mut conn)
        .await?;

    let brokers = settings.kafka.brokers.clone();
    let config = kafka::producer_config(&settings.kafka, "fleetctl");
    let wanted = Topics::from_settings(&settings.topics).all();
    let topics = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(String, usize)>> {
        use rdkafka::producer::{BaseProducer, Producer};
        let producer: BaseProducer = config.create()?;
        let metadata = producer
            .client()
            .fetch_metadata(None, Duration::from_secs(5))?;
        Ok(wanted
            .into_iter()
            .map(|name| {
                let partitions = metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == name)
                    .map_or(0, |t| t.partitions().len());
                (name, partitions)
            })
            .collect())
    })
    .await?
    .with_context(|| format!("Kafka at {brokers}"))?;

    let mut report = format!(
        "redis   {} (version {version}, schema {})\nkafka   {brokers}\n",
        settings::redact_url(settings.redis.url.expose()),
        schema.as_deref().unwrap_or("not yet recorded"),
    );
    for (name, partitions) in topics {
        let state = if partitions == 0 {
            "missing".to_string()
        } else {
            format!("{partitions} partitions")
        };
        report.push_str(&format!("  topic {name:<40} {state}\n"));
    }
    Ok(report.trim_end().to_string())
}
