//! The broker's own hop: one producer and one consumer with a run's client settings and no
//! Fleet in between. A task's submit→start beyond it is what Fleet adds (its accept, its
//! claim), so each latency row can be read as broker floor plus Fleet.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fleet_common::kafka;
use fleet_testkit::TestEnv;
use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{Value, json};

use crate::stack::{Profile, percentile};

/// Records per batch of a prefill: what a client's 5 ms linger gathers at 1,000 tasks/s.
const PREFILL_BATCH: usize = 5;

/// Sends `rate` records/s for `secs` s through `env`'s broker and reports produce→receive
/// latency in milliseconds (p50, p99, p99.9), with the profile's linger and fetch wait, on
/// one partition of a topic of its own (`topic`, created here). With `prefill` batches
/// written to that partition first, it shows what a partition's grown log costs each fetch:
/// the local broker's memory storage reads more per fetch as a partition's log grows.
pub(crate) async fn broker_hop(
    env: &TestEnv,
    profile: Profile,
    rate: u64,
    secs: u64,
    topic: &str,
    prefill: usize,
) -> anyhow::Result<Value> {
    let settings = env.settings();
    kafka::ensure_topics(
        &settings.kafka,
        &[topic.to_string()],
        1,
        1,
        1 << 20,
        Duration::from_secs(10),
    )
    .await
    .context("creating the hop probe's topic")?;
    let mut producer = kafka::producer_config(&settings.kafka, "fleet-bench-hop");
    let mut consumer =
        kafka::consumer_config(&settings.kafka, "fleet-bench-hop", "fleet-bench-hop");
    // Assigned, not subscribed: no group to join and no offsets to commit.
    consumer.set("enable.auto.commit", "false");
    for (key, value) in profile.client() {
        producer.set(*key, *value);
        consumer.set(*key, *value);
    }
    let producer: FutureProducer = producer.create()?;
    let consumer: StreamConsumer = consumer.create()?;
    // The prefill: batches of a few one-byte records, each batch sent on its own (its
    // deliveries awaited), so the partition holds as many batches as a run leaves.
    for _ in 0..prefill {
        let sends: Vec<_> = (0..PREFILL_BATCH)
            .map(|_| {
                producer
                    .send_result(
                        FutureRecord::<(), _>::to(topic)
                            .partition(0)
                            .payload(&[0u8][..]),
                    )
                    .map_err(|(err, _)| err)
            })
            .collect::<Result<_, _>>()?;
        for delivery in sends {
            delivery
                .await
                .context("delivery cancelled")?
                .map_err(|(err, _)| err)?;
        }
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;

    let base = Instant::now();
    let micros = move || base.elapsed().as_micros() as u64;
    let total = (rate * secs) as usize;
    // A first record, waited for, so that the consumer has read past the prefill and found
    // its offset before timing.
    let (caught_up, first_seen) = tokio::sync::oneshot::channel::<()>();
    let receiver = tokio::spawn(async move {
        let mut stream = consumer.stream();
        let mut latencies = Vec::with_capacity(total);
        let mut caught_up = Some(caught_up);
        while latencies.len() < total + 1 {
            let message = stream.next().await.context("the consumer stream ended")??;
            let at = micros();
            let Some(sent) = message
                .payload()
                .and_then(|p| <[u8; 8]>::try_from(p).ok())
                .map(u64::from_le_bytes)
            else {
                continue; // the prefill
            };
            if let Some(signal) = caught_up.take() {
                let _ = signal.send(());
            }
            latencies.push(at.saturating_sub(sent));
        }
        anyhow::Ok(latencies)
    });
    let send = |producer: &FutureProducer| {
        let payload = micros().to_le_bytes();
        let record = FutureRecord::<(), _>::to(topic)
            .partition(0)
            .payload(&payload);
        let delivery = producer.send_result(record).map_err(|(err, _)| err);
        async move {
            delivery?
                .await
                .context("delivery cancelled")?
                .map_err(|(err, _)| err)?;
            anyhow::Ok(())
        }
    };
    send(&producer).await?;
    tokio::time::timeout(Duration::from_secs(60), first_seen)
        .await
        .context("the probe's consumer did not read past the prefill within 60 s")?
        .context("the probe's consumer stopped")?;
    let per_tick = (rate / 100).max(1) as usize;
    let mut interval = tokio::time::interval(Duration::from_millis(10));
    let mut deliveries = Vec::with_capacity(total);
    while deliveries.len() < total {
        interval.tick().await;
        for _ in 0..per_tick.min(total - deliveries.len()) {
            deliveries.push(tokio::spawn(send(&producer)));
        }
    }
    for delivery in deliveries {
        delivery.await??;
    }
    let mut latencies = match tokio::time::timeout(Duration::from_secs(30), receiver).await {
        Ok(joined) => joined??,
        Err(_) => bail!("the hop probe's records did not all arrive within 30 s"),
    };
    latencies.remove(0);
    latencies.sort_unstable();
    let ms = |p: f64| (percentile(&latencies, p) as f64 / 100.0).round() / 10.0;
    Ok(json!({
        "prefill_batches": prefill,
        "records": latencies.len(),
        "p50_ms": ms(50.0),
        "p99_ms": ms(99.0),
        "p999_ms": ms(99.9),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every record sent is received and timed once, and the percentiles are in order.
    #[tokio::test]
    async fn the_broker_hop_times_every_record() {
        let env = TestEnv::start("hop-probe");
        let hop = broker_hop(&env, Profile::LowLatency, 300, 1, "hop-a", 0)
            .await
            .unwrap();
        assert_eq!(hop["records"], 300, "{hop}");
        // After a prefill, only the probe's own records are timed.
        let full = broker_hop(&env, Profile::LowLatency, 300, 1, "hop-b", 20)
            .await
            .unwrap();
        assert_eq!(
            (full["records"].as_u64(), full["prefill_batches"].as_u64()),
            (Some(300), Some(20)),
            "{full}"
        );
        let ms = |key: &str| hop[key].as_f64().unwrap();
        let (p50, p99, p99_9) = (ms("p50_ms"), ms("p99_ms"), ms("p999_ms"));
        assert!(
            0.0 < p50 && p50 <= p99 && p99 <= p99_9 && p99_9 < 5_000.0,
            "{hop}"
        );
    }
}
