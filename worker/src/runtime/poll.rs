//! The poll loop: reads task topics into the per-priority buffers and pauses a priority whose
//! buffer is full (backpressure without ever blocking the consumer).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use fleet_common::wire::Envelope;
use fleet_common::{Priority, membership};
use rdkafka::Message;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::Consumer;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Delivery, Shared};

/// Buffered deliveries per priority above which that priority's partitions are paused.
/// Generous on purpose: pausing purges librdkafka's prefetched records and resuming waits for a
/// new fetch, so a small buffer turns every pause into a stall.
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
    consumer: Arc<membership::GroupConsumer>,
    token: CancellationToken,
) {
    let high = high_water(&shared);
    let mut backpressure = Backpressure::default();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut ticks = 0u32;
    // One message stream for the whole loop: `recv()` per record registered and dropped a
    // waker each time, and buffering record by record took the buffers' lock and woke the
    // claim loop once per record.
    let mut records = consumer.stream().ready_chunks(POLL_BATCH);
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            _ = tick.tick() => {
                ticks = ticks.wrapping_add(1);
                if ticks % 10 == 1 {
                    record_assignment(&shared, &consumer);
                    // Partitions assigned since a priority was paused are paused too.
                    for i in 0..4 {
                        if backpressure.is_paused(i) {
                            backpressure.pause(i, &consumer, &shared.topic_names[i]);
                        }
                    }
                }
                for priority in Priority::ALL {
                    let i = priority.index();
                    if backpressure.is_paused(i) && shared.buffers().len(priority) <= high / 2 {
                        backpressure.resume(i, &consumer, &shared.topic_names[i]);
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
                        trace: fleet_common::wire::trace_of(&message),
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
                    if is_full && !backpressure.is_paused(i) {
                        backpressure.pause(i, &consumer, &shared.topic_names[i]);
                    }
                }
            }
        }
    }
}

/// Notes which partitions of each priority topic this worker owns now, for its heartbeats (the
/// consumer's context logs every change).
fn record_assignment(shared: &Shared, consumer: &membership::GroupConsumer) {
    let mut owned: [Vec<i32>; 4] = Default::default();
    for (topic, partition) in consumer.context().state().partitions() {
        if let Some(i) = shared.topic_names.iter().position(|t| *t == topic) {
            owned[i].push(partition);
        }
    }
    *shared.assignment() = owned;
}

/// Backpressure pauses of each priority topic's partitions.
///
/// librdkafka keeps an application's pause on a partition when the partition is revoked, and
/// still has it when the partition is assigned again (it clears only its own pauses). So a
/// resume covers every partition paused since the last resume, assigned now or not; else a
/// partition that left while paused would come back paused and never be read. And partitions
/// assigned while their priority is paused are paused too (`pause` again), or they would fill
/// the buffer past its mark.
#[derive(Debug, Default)]
struct Backpressure {
    /// Partitions of each priority paused since its last resume; empty when it is not paused.
    paused: [Vec<i32>; 4],
}

impl Backpressure {
    fn is_paused(&self, i: usize) -> bool {
        !self.paused[i].is_empty()
    }

    /// Pauses the partitions of `topic` (priority `i`) assigned now that are not paused yet.
    /// With none assigned the priority stays unpaused: the next full buffer tries again.
    fn pause(&mut self, i: usize, consumer: &membership::GroupConsumer, topic: &str) {
        let fresh = self.to_pause(i, &assigned(consumer, topic));
        if !fresh.is_empty() && apply(consumer, topic, &fresh, true) {
            self.paused[i].extend(fresh);
        }
    }

    /// Resumes every partition of `topic` paused since the last resume, and those assigned now.
    /// On failure it stays paused, so the next tick tries again.
    fn resume(&mut self, i: usize, consumer: &membership::GroupConsumer, topic: &str) {
        let all = self.to_resume(i, &assigned(consumer, topic));
        if apply(consumer, topic, &all, false) {
            self.paused[i].clear();
        }
    }

    fn to_pause(&self, i: usize, assigned: &[i32]) -> Vec<i32> {
        let paused = &self.paused[i];
        assigned
            .iter()
            .filter(|p| !paused.contains(p))
            .copied()
            .collect()
    }

    fn to_resume(&self, i: usize, assigned: &[i32]) -> Vec<i32> {
        let mut all = self.paused[i].clone();
        all.extend(assigned.iter().filter(|p| !self.paused[i].contains(p)));
        all
    }
}

/// This consumer's partitions of `topic` now (none if the assignment cannot be read).
fn assigned(consumer: &membership::GroupConsumer, topic: &str) -> Vec<i32> {
    consumer.assignment().map_or_else(
        |_| Vec::new(),
        |list| {
            list.elements()
                .iter()
                .filter(|e| e.topic() == topic)
                .map(|e| e.partition())
                .collect()
        },
    )
}

/// Pauses or resumes `partitions` of `topic`; whether librdkafka took it.
fn apply(
    consumer: &membership::GroupConsumer,
    topic: &str,
    partitions: &[i32],
    pause: bool,
) -> bool {
    let mut list = TopicPartitionList::new();
    for &partition in partitions {
        list.add_partition(topic, partition);
    }
    let result = if pause {
        consumer.pause(&list)
    } else {
        consumer.resume(&list)
    };
    match result {
        Ok(()) => {
            debug!(
                topic,
                pause,
                ?partitions,
                "Backpressure: partitions {}.",
                if pause { "paused" } else { "resumed" }
            );
            true
        }
        Err(err) => {
            warn!(topic, error = %err, "Could not change the pause state of partitions.");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Backpressure;

    #[test]
    fn a_priority_with_no_partition_to_pause_stays_unpaused() {
        let bp = Backpressure::default();
        assert!(!bp.is_paused(2));
        assert!(
            bp.to_pause(2, &[]).is_empty(),
            "nothing assigned: nothing paused"
        );
    }

    #[test]
    fn partitions_assigned_while_paused_are_paused_too_and_only_once() {
        let mut bp = Backpressure::default();
        assert_eq!(bp.to_pause(2, &[0, 1]), [0, 1]);
        bp.paused[2].extend([0, 1]);
        assert!(bp.is_paused(2));
        assert!(!bp.is_paused(1), "per priority");
        // A rebalance added partition 3 and took 1.
        assert_eq!(bp.to_pause(2, &[0, 3]), [3]);
        assert!(bp.to_pause(2, &[0, 1]).is_empty());
    }

    #[test]
    fn a_resume_covers_partitions_paused_then_revoked_and_those_assigned_now() {
        let mut bp = Backpressure::default();
        bp.paused[0].extend([0, 1]);
        // Partition 1 moved to another worker while paused: librdkafka keeps its pause, so it
        // is resumed too, or it would come back paused. Partition 2 is new and unpaused.
        let mut all = bp.to_resume(0, &[0, 2]);
        all.sort_unstable();
        assert_eq!(all, [0, 1, 2]);
    }
}
