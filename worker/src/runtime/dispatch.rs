//! The worker's three async loops: polling Kafka into the buffers, dispatching (claim, start,
//! store offsets), and recording outcomes.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_common::retry::retry_until;
use fleet_common::store::{Claim, Completion, Outcome, Store};
use fleet_common::task::Envelope;
use fleet_common::{Priority, kafka};
use futures::FutureExt;
use rdkafka::Message;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{Consumer, StreamConsumer};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Delivery, Finished, Running, Shared};
use crate::handler::{HandlerError, Registry, TaskContext};

/// Buffered deliveries per priority above which that priority's partitions are paused.
fn high_water(shared: &Shared) -> usize {
    (shared.settings.worker.concurrency * 2).max(64)
}

/// Reads task topics into the buffers until `token` is cancelled. Never blocks on work:
/// a full priority is paused, and resumed once it drained to half.
pub(super) async fn poll_loop(
    shared: Arc<Shared>,
    consumer: Arc<StreamConsumer>,
    token: CancellationToken,
) {
    let high = high_water(&shared);
    let mut paused = [false; 4];
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut ticks = 0u32;
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
            message = consumer.recv() => {
                let message = match message {
                    Ok(m) => m,
                    Err(err) => {
                        warn!(error = %err, "Kafka consumer error; continuing.");
                        continue;
                    }
                };
                let Some(i) = shared.topic_names.iter().position(|t| t == message.topic()) else { continue };
                let priority = Priority::ALL[i];
                let delivery = Delivery {
                    priority,
                    partition: message.partition(),
                    offset: message.offset(),
                    envelope: Envelope::decode(message.payload()),
                };
                let buffered = shared.buffers().push(delivery);
                shared.work_ready.notify_one();
                if buffered >= high && !paused[i] {
                    set_paused(&consumer, &shared.topic_names[i], true);
                    paused[i] = true;
                }
            }
        }
    }
}

/// Notes which partitions of each priority topic this worker owns now.
fn record_assignment(shared: &Shared, consumer: &StreamConsumer) {
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
fn set_paused(consumer: &StreamConsumer, topic: &str, pause: bool) {
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

/// Takes deliveries as slots free up, claims them in one call per batch, starts the claimed
/// ones, and stores the batch's offsets once the claim has answered.
pub(super) async fn dispatch_loop(
    shared: Arc<Shared>,
    consumer: Arc<StreamConsumer>,
    store: Store,
    registry: Arc<Registry>,
    done: mpsc::UnboundedSender<Finished>,
    token: CancellationToken,
) {
    let lease_ms = shared.settings.lease.lease_ms;
    let batch_limit = shared.settings.worker.claim_batch;
    loop {
        let first = tokio::select! {
            () = token.cancelled() => return,
            permit = shared.slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        while shared.buffers().is_empty() {
            tokio::select! {
                () = token.cancelled() => return,
                () = shared.work_ready.notified() => {}
            }
        }
        let mut slots = vec![first];
        while slots.len() < batch_limit {
            match shared.slots.clone().try_acquire_owned() {
                Ok(p) => slots.push(p),
                Err(_) => break,
            }
        }
        let picked: Vec<Delivery> = {
            let mut buffers = shared.buffers();
            std::iter::from_fn(|| buffers.pick())
                .take(slots.len())
                .collect()
        };
        slots.truncate(picked.len());

        let attempts: Vec<(&str, u32)> = picked
            .iter()
            .filter_map(|d| {
                d.envelope
                    .as_ref()
                    .ok()
                    .map(|e| (e.task.id.as_str(), e.attempt))
            })
            .collect();
        let Some(claims) = retry_until(&token, "claiming tasks", || {
            store.claim(&shared.worker_id, lease_ms, &attempts)
        })
        .await
        else {
            return; // shutting down: nothing was claimed, nothing is stored
        };
        let mut claims = claims.into_iter();
        for delivery in &picked {
            match &delivery.envelope {
                Err(err) => warn!(
                    priority = %delivery.priority, partition = delivery.partition, offset = delivery.offset,
                    error = %err, "Poison record on a task topic skipped."
                ),
                Ok(envelope) => match claims.next().unwrap_or(Claim::Unknown) {
                    Claim::Claimed => {
                        let slot = slots.pop().expect("one slot per picked delivery");
                        start(&shared, &registry, envelope, slot, done.clone());
                    }
                    claim @ (Claim::Future | Claim::Unknown) => warn!(
                        task_id = %envelope.task.id, attempt = envelope.attempt, claim = claim.as_str(),
                        "Delivery does not match any dispatch of this task; skipped."
                    ),
                    other => debug!(
                        task_id = %envelope.task.id, attempt = envelope.attempt, claim = other.as_str(),
                        "Duplicate or stale delivery skipped."
                    ),
                },
            }
        }
        drop(slots); // unused slots go back
        for delivery in &picked {
            let topic = &shared.topic_names[delivery.priority.index()];
            if let Err(err) =
                kafka::store_handled(&*consumer, topic, delivery.partition, delivery.offset)
            {
                debug!(error = %err, "Offset not stored (partition revoked).");
            }
        }
    }
}

/// Starts the handler of a claimed attempt on its own task.
fn start(
    shared: &Arc<Shared>,
    registry: &Registry,
    envelope: &Envelope,
    slot: tokio::sync::OwnedSemaphorePermit,
    done: mpsc::UnboundedSender<Finished>,
) {
    let task = &envelope.task;
    let id: Arc<str> = task.id.as_str().into();
    let attempt = envelope.attempt;
    let cancel = CancellationToken::new();
    let payload: Arc<RawValue> = Arc::from(task.payload.clone());
    let ctx = TaskContext::new(
        id.clone(),
        attempt,
        task.kind.as_str().into(),
        shared.worker_id.clone(),
        payload,
        cancel.clone(),
    );
    let handler = registry.get(&task.kind);
    let timeout = match task.timeout_ms {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    };
    let tasks = shared.settings.tasks.clone();
    info!(task_id = %id, attempt, kind = %task.kind, worker_id = %shared.worker_id, "Handler started.");
    let progress = ctx.progress_slot();
    shared.running().insert(
        id.clone(),
        Running {
            attempt,
            cancel: cancel.clone(),
            abort: None,
            lost: false,
            progress,
            _slot: slot,
        },
    );

    let task_id = id.clone();
    let started = Instant::now();
    let join = tokio::spawn(async move {
        let run = async {
            let Some(handler) = handler else {
                return Err(HandlerError::permanent(format!(
                    "no handler is registered for kind `{}`",
                    ctx.kind
                )));
            };
            match timeout {
                None => handler.call(ctx).await,
                Some(limit) => match tokio::time::timeout(limit, handler.call(ctx)).await {
                    Ok(result) => result,
                    Err(_) => {
                        cancel.cancel();
                        Err(HandlerError::retryable(format!(
                            "timeout after {} ms",
                            limit.as_millis()
                        )))
                    }
                },
            }
        };
        let outcome = match AssertUnwindSafe(run).catch_unwind().await {
            Ok(Ok(value)) => Outcome::Ok(value.to_string()),
            Ok(Err(err)) if err.retryable => Outcome::Retry {
                error: err.message,
                delay_ms: tasks.retry_delay_ms(attempt, rand::random::<f64>()),
            },
            Ok(Err(err)) => Outcome::Fail(err.message),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(ToString::to_string)
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Outcome::Retry {
                    error: format!("handler panicked: {message}"),
                    delay_ms: tasks.retry_delay_ms(attempt, rand::random::<f64>()),
                }
            }
        };
        let _ = done.send(Finished {
            id: task_id,
            attempt,
            outcome,
            started,
        });
    });
    if let Some(entry) = shared.running().get_mut(&id)
        && entry.attempt == attempt
    {
        entry.abort = Some(join.abort_handle());
    }
}

/// Records outcomes in batches; frees each slot once its outcome is recorded, so the lease is
/// kept until then.
pub(super) async fn complete_loop(
    shared: Arc<Shared>,
    store: Store,
    mut done: mpsc::UnboundedReceiver<Finished>,
) {
    let mut batch = Vec::with_capacity(256);
    while done.recv_many(&mut batch, 256).await > 0 {
        let outcomes: Vec<((&str, u32), &Outcome)> = batch
            .iter()
            .map(|f| ((&*f.id, f.attempt), &f.outcome))
            .collect();
        let never = CancellationToken::new();
        let answers = retry_until(&never, "recording task outcomes", || {
            store.complete(&shared.worker_id, &outcomes)
        })
        .await
        .unwrap_or_default();
        for (finished, answer) in batch.iter().zip(answers) {
            let elapsed_ms = finished.started.elapsed().as_millis() as u64;
            let (id, attempt) = (&finished.id, finished.attempt);
            match (&finished.outcome, answer) {
                (_, Completion::Fenced) => {
                    warn!(task_id = %id, attempt, worker_id = %shared.worker_id, "Completion fenced: this attempt no longer owns the task.");
                }
                (Outcome::Ok(_), _) => {
                    info!(task_id = %id, attempt, worker_id = %shared.worker_id, elapsed_ms, "Task succeeded.");
                }
                (Outcome::Retry { error, delay_ms }, Completion::Scheduled) => {
                    info!(task_id = %id, attempt, worker_id = %shared.worker_id, error = %error, retry_in_ms = delay_ms, "Attempt failed; retry scheduled.");
                }
                (Outcome::Retry { error, .. } | Outcome::Fail(error), _) => {
                    warn!(task_id = %id, attempt, worker_id = %shared.worker_id, error = %error, "Task failed.");
                }
            }
            let mut running = shared.running();
            if running.get(id).is_some_and(|r| r.attempt == attempt) {
                running.remove(id);
            }
        }
        batch.clear();
    }
}
