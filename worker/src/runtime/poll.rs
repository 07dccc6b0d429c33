//! The poll loop: reads task topics into the per-priority buffers and pauses a priority whose
//! buffer is full (backpressure without ever blocking the consumer).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use fleet_common::task::Envelope;
use fleet_common::trace::TraceParent;
use fleet_common::{Priority, kafka};
use rdkafka::Message;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::Consumer;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Delivery, Shared};

/// Buffered deliveries per priority above which that priority's partitions are paused.
/// Generous on purpose: pausing purges librdkafka's prefetched records and resuming waits for a
/// new fetch, so a small buffer turns every pause into a stall (measured: 255 tasks/s with 64,
/// see the README's Performance section).
fn high_water(shared: &Shared) -> usize {
    (shared.settings.worker.concurrency * 16).max(2048)
}

/// Most records taken from the consumer in one go: they are buffered under one lock and
/// announced with one wake-up.
const POLL_BATCH: usize = 256;

/// Reads task topics into the buffers until `token` is cancelled. Never blocks on work:
/// a full priority is paused, and resumed once it drained to half.
pub(super) async fn poll_loop(
    shared: Arc<Shared>,
    consumer: Arc<kafka::MeteredConsumer>,
    token: CancellationToken,
) {
    let high = high_water(&shared);
    let mut paused = [false; 4];
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut ticks = 0u32;
    // One message stream for the whole loop: `recv()` per record registered and dropped a
    // waker each time, and buffering record by record took the buffers' lock and woke the
    // dispatcher once per record.
    let mut records = consumer.stream().ready_chunks(POLL_BATCH);
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            _ = tick.tick() => {
                ticks = ticks.wrapping_add(1);
                if ticks % 10 == 1 {
                    record_assignment(&shared, &consumer);
                }
                for priority in Priority::ALL {
                    let i = priority.index();
                    if paused[i] && shared.buffers().len(priority) <= high / 2 {
                        set_paused(&consumer, &shared.topic_names[i], false);
                        paused[i] = false;
                    }
                }
            }
            batch = records.next() => {
                let Some(batch) = batch else {
                    warn!("The Kafka message stream ended; the poll loop stops.");
                    break;
                };
                let mut deliveries = Vec::with_capacity(batch.len());
                for message in batch {
                    let message = match message {
                        Ok(m) => m,
                        Err(err) => {
                            warn!(error = %err, "Kafka consumer error; continuing.");
                            continue;
                        }
                    };
                    let Some(i) = shared.topic_names.iter().position(|t| t == message.topic()) else { continue };
                    let envelope = Envelope::decode(message.payload());
                    // The raw bytes are kept only for a record that is refused as unreadable.
                    let raw = envelope.is_err().then(|| message.payload().map(<[u8]>::to_vec)).flatten();
                    deliveries.push(Delivery {
                        priority: Priority::ALL[i],
                        partition: message.partition(),
                        offset: message.offset(),
                        envelope,
                        raw,
                        published_ms: message.timestamp().to_millis(),
                        trace: TraceParent::from_kafka(&message),
                    });
                }
                if deliveries.is_empty() {
                    continue;
                }
                let mut full = [false; 4];
                {
                    let mut buffers = shared.buffers();
                    for delivery in deliveries {
                        let i = delivery.priority.index();
                        full[i] |= buffers.push(delivery) >= high;
                    }
                }
                shared.work_ready.notify_one();
                for (i, &is_full) in full.iter().enumerate() {
                    if is_full && !paused[i] {
                        set_paused(&consumer, &shared.topic_names[i], true);
                        paused[i] = true;
                    }
                }
            }
        }
    }
}

/// Notes which partitions of each priority topic this worker owns now.
fn record_assignment(shared: &Shared, consumer: &kafka::MeteredConsumer) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let mut owned: [Vec<i32>; 4] = Default::default();
    for element in assignment.elements() {
        if let Some(i) = shared.topic_names.iter().position(|t| t == element.topic()) {
            owned[i].push(element.partition());
        }
    }
    let mut current = shared.assignment();
    if *current != owned {
        info!(worker_id = %shared.worker_id, partitions = ?owned, "Assignment changed (critical, high, normal, low).");
        *current = owned;
    }
}

/// Pauses or resumes this consumer's partitions of `topic`.
fn set_paused(consumer: &kafka::MeteredConsumer, topic: &str, pause: bool) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let mut partitions = TopicPartitionList::new();
    for element in assignment.elements().iter().filter(|e| e.topic() == topic) {
        partitions.add_partition(topic, element.partition());
    }
    if partitions.count() == 0 {
        return;
    }
    let result = if pause {
        consumer.pause(&partitions)
    } else {
        consumer.resume(&partitions)
    };
    match result {
        Ok(()) => debug!(
            topic,
            pause,
            "Backpressure: partitions {}.",
            if pause { "paused" } else { "resumed" }
        ),
        Err(err) => warn!(topic, error = %err, "Could not change the pause state of partitions."),
    }
}
