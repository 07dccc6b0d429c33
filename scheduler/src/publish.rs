//! Publishing task envelopes onto the priority topics, and records onto the rejected and dead
//! topics. Shared by the scheduler's ingest, the relay and the reaper.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_common::otlp;
use fleet_common::store::{Accepted, Dispatch, NewTask, Store};
use fleet_common::topics::Topics;
use fleet_common::trace::TraceParent;
use fleet_common::wire::Envelope;
use fleet_common::{Priority, wire};
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use serde::Deserialize;
use tracing::{debug, warn};

use crate::routing::Router;

/// The routing fields of a stored task record (the payload is skipped, not parsed).
#[derive(Debug, Deserialize)]
struct Route {
    priority: Priority,
    #[serde(default)]
    key: Option<String>,
}

/// Partitions of each priority topic that live workers consume, from their heartbeats. Tasks
/// the relay or the reaper publish again go to one of these, so a requeued task runs on a live
/// worker at once instead of waiting on a dead worker's partition for the group to rebalance.
#[derive(Debug, Default, Clone)]
pub struct LivePartitions([Vec<i32>; 4]);

impl LivePartitions {
    /// Reads the partitions of workers heard from within `max_age_ms`. On any error the result
    /// is empty, and publishing falls back to ordinary routing.
    pub async fn load(store: &Store, max_age_ms: u64) -> Self {
        let Ok(workers) = store.live_workers(max_age_ms).await else {
            return Self::default();
        };
        let mut live: [Vec<i32>; 4] = Default::default();
        for (_, info) in workers {
            for priority in Priority::ALL {
                if let Some(owned) = info.partitions_of(priority) {
                    live[priority.index()].extend_from_slice(owned);
                }
            }
        }
        for partitions in &mut live {
            partitions.sort_unstable();
            partitions.dedup();
        }
        Self(live)
    }

    /// A random live partition of `priority`'s topic, if any worker reported one.
    fn pick(&self, priority: Priority) -> Option<i32> {
        let partitions = &self.0[priority.index()];
        (!partitions.is_empty()).then(|| partitions[rand::random_range(0..partitions.len())])
    }
}

/// Sends Fleet's records with one idempotent producer.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    topics: Topics,
    /// The priority topics' names, made once: every envelope names its topic.
    task_topics: [Arc<str>; 4],
    router: Arc<Router>,
    /// Wakes the placement dispatcher when placed tasks were accepted.
    placing: Arc<tokio::sync::Notify>,
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
/// How long a send waits before trying again when the producer's queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(10);

/// An envelope the producer has queued: its acknowledgement, and the `publish` span to export
/// once it arrives (only when OTLP export is on).
struct Sending {
    delivery: DeliveryFuture,
    attempt: u32,
    topic: Arc<str>,
    span: Option<(TraceParent, u64)>,
}

impl Sending {
    /// Waits for the broker's acknowledgement (the producer's `message.timeout.ms` bounds it).
    async fn delivered(self, id: &str) -> Result<(), KafkaError> {
        let sent = match self.delivery.await {
            Ok(Ok(delivery)) => Ok(delivery),
            Ok(Err((err, _))) => Err(err),
            Err(_canceled) => Err(KafkaError::Canceled),
        };
        if let Some((span, start_ns)) = &self.span {
            let mut exported = otlp::Span::of("publish", otlp::SpanKind::Producer, span, *start_ns)
                .attr("task_id", id)
                .attr("attempt", self.attempt)
                .attr("messaging.destination.name", &self.topic);
            if let Err(err) = &sent {
                exported.error = Some(err.to_string());
            }
            otlp::record(exported);
        }
        let delivered = sent?;
        tracing::debug!(
            task_id = id,
            attempt = self.attempt,
            topic = %self.topic,
            partition = delivered.partition,
            offset = delivered.offset,
            "Task published."
        );
        Ok(())
    }
}

impl Publisher {
    pub fn new(producer: FutureProducer, topics: Topics, router: Router) -> Self {
        Self {
            producer,
            task_topics: Priority::ALL.map(|p| topics.tasks(p).into()),
            topics,
            router: Arc::new(router),
            placing: Arc::default(),
        }
    }

    /// Notified when this scheduler accepted placed tasks (see `crate::dispatch`).
    pub fn placing(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.placing)
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Publishes one attempt of a task and waits for the broker's acknowledgement.
    async fn send_task(
        &self,
        id: &str,
        priority: Priority,
        key: Option<&str>,
        attempt: (&str, u32, Option<&TraceParent>),
        partition: Option<i32>,
    ) -> Result<(), KafkaError> {
        let deadline = Instant::now() + SEND_TIMEOUT;
        self.enqueue(id, priority, key, attempt, partition, deadline)
            .await?
            .delivered(id)
            .await
    }

    /// Hands one attempt's envelope to the producer and returns without waiting for the
    /// broker, so a batch is queued in order and then awaited as a whole. Waits only while the
    /// producer's queue is full, and not past `deadline` (one for a whole batch, so a stuck
    /// producer holds a batch up for at most [`SEND_TIMEOUT`]). `trace` is the task's stored
    /// trace context, if valid; the dispatch becomes a new span of it.
    async fn enqueue(
        &self,
        id: &str,
        priority: Priority,
        key: Option<&str>,
        (record_json, attempt, trace): (&str, u32, Option<&TraceParent>),
        partition: Option<i32>,
        deadline: Instant,
    ) -> Result<Sending, KafkaError> {
        let topic = Arc::clone(&self.task_topics[priority.index()]);
        let envelope = Envelope::encode(record_json, attempt);
        let attempt_text = attempt.to_string();
        // Each dispatch is a new span of the task's trace.
        let span = trace.map(TraceParent::child);
        let traceparent = span.as_ref().map(TraceParent::as_str);
        // The span is exported, and so timed, only when OTLP export is on.
        let start_ns = otlp::enabled().then(otlp::now_ns);
        let headers = wire::task_headers(id, &attempt_text, traceparent);
        let mut record = FutureRecord::to(&topic).payload(&envelope).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        let delivery = loop {
            match self.producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                }
                Err((err, _)) => return Err(err),
            }
        };
        Ok(Sending {
            delivery,
            attempt,
            topic,
            span: span.zip(start_ns),
        })
    }

    /// Publishes a placed task's attempt to `partition` of its priority topic (the producer
    /// chooses when `None`).
    pub async fn send_placed(
        &self,
        dispatch: &Dispatch,
        priority: Priority,
        partition: Option<i32>,
    ) -> Result<(), KafkaError> {
        self.send_task(
            &dispatch.id,
            priority,
            None,
            (
                &dispatch.record_json,
                dispatch.attempt,
                TraceParent::parse(&dispatch.trace).as_ref(),
            ),
            partition,
        )
        .await
    }

    /// Publishes a task taken from Redis (relay or reaper) to a live worker's partition of its
    /// priority topic, or by ordinary routing when no worker reported its partitions.
    pub async fn dispatch(
        &self,
        dispatch: &Dispatch,
        live: &LivePartitions,
    ) -> Result<(), KafkaError> {
        let route: Route = serde_json::from_str(&dispatch.record_json).unwrap_or(Route {
            priority: Priority::Normal,
            key: None,
        });
        let key = route.key.as_deref();
        let partition = live
            .pick(route.priority)
            .or_else(|| self.router.one(route.priority, key));
        self.send_task(
            &dispatch.id,
            route.priority,
            key,
            (
                &dispatch.record_json,
                dispatch.attempt,
                TraceParent::parse(&dispatch.trace).as_ref(),
            ),
            partition,
        )
        .await
    }

    /// Publishes a batch of tasks taken from Redis (see [`Publisher::dispatch`]) all at once:
    /// every record is queued before any acknowledgement is awaited, so a batch costs one wait
    /// for the broker, not one per task. Returns the ids and attempts Kafka acknowledged, for
    /// [`Store::dispatched`]; the rest stay in the outbox for the relay.
    pub async fn dispatch_all<'a>(
        &self,
        dispatches: impl IntoIterator<Item = &'a Dispatch>,
        live: &LivePartitions,
        who: &str,
    ) -> Vec<(&'a str, u32)> {
        let dispatches: Vec<&Dispatch> = dispatches.into_iter().collect();
        let results =
            futures::future::join_all(dispatches.iter().map(|d| self.dispatch(d, live))).await;
        let mut sent = Vec::with_capacity(dispatches.len());
        for (dispatch, result) in dispatches.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    debug!(task_id = %dispatch.id, attempt = dispatch.attempt, "Task dispatched by the {who}.");
                    sent.push((dispatch.id.as_str(), dispatch.attempt));
                }
                Err(err) => {
                    warn!(task_id = %dispatch.id, error = %err, "The {who} could not publish a task; the relay will retry it.")
                }
            }
        }
        sent
    }

    /// Sends a refused submission to the rejected topic with the reason in headers.
    pub async fn rejected(
        &self,
        payload: Option<&[u8]>,
        code: &str,
        reason: &str,
        source: wire::RejectedSource<'_>,
    ) -> Result<(), KafkaError> {
        let topic = self.topics.rejected();
        wire::send_rejected(
            &self.producer,
            &topic,
            payload,
            code,
            reason,
            source,
            SEND_TIMEOUT,
        )
        .await
    }

    /// Sends the dead-letter record of a failed task (built by [`wire::dead_letter`]).
    pub async fn dead(&self, id: &str, body: &str) -> Result<(), KafkaError> {
        let topic = self.topics.dead();
        wire::send_dead_letter(&self.producer, &topic, id, body, SEND_TIMEOUT).await
    }
}

/// Publishes the tasks [`Store::accept`] just recorded as pending, confirms the dispatches
/// Kafka acknowledged, and counts what happened. A failure here loses nothing: the tasks are
/// pending in Redis with an outbox entry, and the relay publishes them after `redeliver_ms`.
pub async fn publish_accepted(
    store: &Store,
    publisher: &Publisher,
    tasks: &[NewTask],
    accepted: &[Accepted],
) {
    let start_ns = otlp::now_ns();
    // Queued one after the other, so tasks with the same key keep their order, then awaited:
    // one wait for the whole batch, and no future per task to poll. Once a key's task could
    // not be queued, the rest of that key's tasks are left to the relay too, so they cannot
    // overtake it.
    let deadline = Instant::now() + SEND_TIMEOUT;
    let mut failed_keys: HashSet<&str> = HashSet::new();
    let mut queued = Vec::with_capacity(tasks.len());
    let mut keyless = [0; 4];
    for (task, outcome) in tasks.iter().zip(accepted) {
        if matches!(outcome, Accepted::Pending(_)) && task.record.key.is_none() {
            keyless[task.record.priority.index()] += 1;
        }
    }
    let mut batch_route = publisher.router.batch(keyless);
    for (task, outcome) in tasks.iter().zip(accepted) {
        if !matches!(outcome, Accepted::Pending(_)) {
            continue;
        }
        let r = &task.record;
        let key = r.key.as_deref();
        if key.is_some_and(|k| failed_keys.contains(k)) {
            continue;
        }
        let sending = publisher
            .enqueue(
                &r.id,
                r.priority,
                key,
                (&task.record_json, 1, Some(&task.trace)),
                batch_route.next(r.priority, key),
                deadline,
            )
            .await;
        match sending {
            Ok(sending) => queued.push((r.id.as_str(), sending)),
            Err(err) => {
                warn!(task_id = %r.id, error = %err, "Publishing a task failed; the relay will retry it.");
                failed_keys.extend(key);
            }
        }
    }
    // With OTLP export on, the acknowledgements are awaited together, so each `publish` span
    // ends when its own acknowledgement came, not when its turn in the line came.
    let results: Vec<(&str, Result<(), KafkaError>)> = if otlp::enabled() {
        futures::future::join_all(
            queued
                .into_iter()
                .map(|(id, sending)| async move { (id, sending.delivered(id).await) }),
        )
        .await
    } else {
        let mut results = Vec::with_capacity(queued.len());
        for (id, sending) in queued {
            results.push((id, sending.delivered(id).await));
        }
        results
    };
    let mut sent = Vec::with_capacity(results.len());
    for (id, delivered) in results {
        match delivered {
            Ok(()) => sent.push((id, 1)),
            Err(err) => {
                warn!(task_id = %id, error = %err, "Publishing a task failed; the relay will retry it.");
            }
        }
    }
    if accepted.iter().any(|a| matches!(a, Accepted::Placing(_))) {
        publisher.placing.notify_one();
    }
    let mut duplicates = 0;
    for (task, outcome) in tasks.iter().zip(accepted) {
        let r = &task.record;
        match outcome {
            Accepted::Duplicate(existing) => {
                duplicates += 1;
                debug!(task_id = %existing, "Duplicate submission; existing task kept.");
            }
            Accepted::OverQuota(_) | Accepted::Refused(_) => {}
            _ => {
                fleet_common::telemetry::metrics::tasks_accepted(
                    r.kind.clone(),
                    r.priority.as_str(),
                )
                .increment(1);
                debug!(task_id = %r.id, kind = %r.kind, priority = %r.priority, "Task accepted.");
            }
        }
    }
    if duplicates > 0 {
        fleet_common::telemetry::metrics::tasks_duplicate().increment(duplicates);
        if let Err(err) = store.count("duplicate", duplicates).await {
            warn!(error = %err, "Could not count duplicate submissions.");
        }
    }
    if let Err(err) = store.dispatched(&sent).await {
        warn!(error = %err, "Could not confirm dispatches; the relay may publish them again (deduplicated at claim).");
    }
    if otlp::enabled() {
        for (task, outcome) in tasks.iter().zip(accepted) {
            if !matches!(
                outcome,
                Accepted::Duplicate(_) | Accepted::OverQuota(_) | Accepted::Refused(_)
            ) {
                let r = &task.record;
                otlp::record(
                    otlp::Span::of("accept", otlp::SpanKind::Server, &task.trace, start_ns)
                        .attr("task_id", &r.id)
                        .attr("kind", &r.kind)
                        .attr("queue", &r.queue)
                        .attr("priority", r.priority),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_common::settings::KafkaSettings;

    #[test]
    fn random_means_a_partition_per_record_in_the_producer() {
        // `Partitioner::Random` leaves keyless records to librdkafka, which must then pick a
        // partition per record, not one "sticky" partition per linger window.
        let config = fleet_common::kafka::producer_config(&KafkaSettings::default(), "test");
        assert_eq!(config.get("sticky.partitioning.linger.ms"), Some("0"));
    }

    #[test]
    fn live_partitions_pick_only_reported_partitions() {
        let live = LivePartitions([vec![], vec![], vec![1, 3], vec![]]);
        for _ in 0..50 {
            assert!(matches!(live.pick(Priority::Normal), Some(1 | 3)));
        }
        assert_eq!(
            live.pick(Priority::Critical),
            None,
            "no live partition: ordinary routing"
        );
    }
}
