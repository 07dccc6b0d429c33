//! The claim loop: claims buffered deliveries in one Redis call per batch, starts the
//! claimed ones, refuses records that cannot run, and stores the batch's offsets.

use std::sync::Arc;
use std::time::Duration;

use fleet_common::dependency::keep_trying;
use fleet_common::store::{Claim, Store, new_call_id};
use fleet_common::wire::Envelope;
use fleet_common::{kafka, membership, wire};
use rdkafka::producer::FutureProducer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Delivery, Finished, Shared, execute};
use crate::handler::Registry;

/// Takes deliveries as slots free up, claims them in one call per batch, starts the claimed
/// ones, and stores the batch's offsets once the claim has answered.
pub(super) async fn claim_loop(
    shared: Arc<Shared>,
    consumer: Arc<membership::GroupConsumer>,
    store: Store,
    registry: Arc<Registry>,
    done: mpsc::UnboundedSender<Finished>,
    refuser: Refuser,
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
        // One id for the call and its retries: a retry answers `Owned` for what a try whose
        // reply was lost had claimed.
        let call = new_call_id();
        let Some(claims) = keep_trying(&token, "claiming tasks", || {
            store.claim_call(&shared.worker_id, lease_ms, &call, &attempts)
        })
        .await
        else {
            // Shutting down after a failed call, which may still have claimed them (a lost
            // reply): the hand-back releases them too. Nothing of this batch is stored.
            shared.unanswered().extend(
                attempts
                    .iter()
                    .map(|(id, attempt)| (Arc::from(*id), *attempt)),
            );
            return;
        };
        let mut claims = claims.into_iter();
        let mut refused: Vec<Refusal<'_>> = Vec::new();
        let mut launches = Vec::with_capacity(picked.len());
        // The batch's log lines ("Handler started." above all) go out in a few writes, all
        // before any of its handlers is spawned: an execution is never without its line.
        fleet_common::telemetry::batched(|| {
            for delivery in &picked {
                match &delivery.envelope {
                    Err(err) => refused.push(Refusal {
                        delivery,
                        code: "invalid_envelope",
                        reason: err.to_string(),
                        payload: delivery.raw.clone(),
                    }),
                    Ok(envelope) => match owned_as_claimed(
                        &shared,
                        envelope,
                        claims.next().unwrap_or(Claim::Unknown),
                    ) {
                        Claim::Claimed => {
                            let slot = slots.pop().expect("one slot per picked delivery");
                            launches.push(execute::prepare(
                                &shared,
                                &registry,
                                envelope,
                                (delivery.published_ms, delivery.trace.as_ref()),
                                slot,
                                done.clone(),
                            ));
                        }
                        Claim::Future => refused.push(Refusal {
                            delivery,
                            code: "future_attempt",
                            reason: format!(
                                "task {} has no dispatch of attempt {}: not published by Fleet",
                                envelope.task.id, envelope.attempt
                            ),
                            payload: Some(envelope.to_json().into_bytes()),
                        }),
                        Claim::Unknown => refused.push(Refusal {
                            delivery,
                            code: "unknown_task",
                            reason: format!("task {} is not in Redis", envelope.task.id),
                            payload: Some(envelope.to_json().into_bytes()),
                        }),
                        Claim::Held => debug!(
                            task_id = %envelope.task.id, attempt = envelope.attempt,
                            "Queue or priority paused; task held until resumed."
                        ),
                        other => debug!(
                            task_id = %envelope.task.id, attempt = envelope.attempt, claim = other.as_str(),
                            "Duplicate or stale delivery skipped."
                        ),
                    },
                }
            }
        });
        for launch in launches {
            launch.spawn(&shared);
        }
        // Refused records must be on the rejected topic before their offsets are stored.
        if !refuse(&shared, &store, &refuser, &refused, &token).await {
            return; // shutting down: nothing of this batch is stored; claims are in Redis
        }
        drop(slots); // unused slots go back
        // Only the batch's last offset of each partition is stored: picks keep every
        // partition in offset order, so it covers the ones before it, with one librdkafka
        // call (and topic lookup) per partition instead of one per record.
        let mut last: Vec<(usize, i32, i64)> = Vec::new();
        for delivery in &picked {
            let (topic, partition) = (delivery.priority.index(), delivery.partition);
            match last
                .iter_mut()
                .find(|(t, p, _)| (*t, *p) == (topic, partition))
            {
                Some(entry) => entry.2 = entry.2.max(delivery.offset),
                None => last.push((topic, partition, delivery.offset)),
            }
        }
        for (topic, partition, offset) in last {
            let topic = &shared.topic_names[topic];
            if let Err(err) = kafka::store_handled(&*consumer, topic, partition, offset) {
                debug!(error = %err, "Offset not stored (partition revoked).");
            }
        }
    }
}

/// `claim`, with an attempt claimed by a try of this call whose reply was lost taken as
/// claimed: it runs now. One this worker already runs (a delivery twice in the batch) stays
/// `Owned`, a duplicate.
fn owned_as_claimed(shared: &Shared, envelope: &Envelope, claim: Claim) -> Claim {
    let runs = || {
        shared
            .running()
            .get(envelope.task.id.as_str())
            .is_some_and(|entry| entry.attempt == envelope.attempt)
    };
    match claim {
        Claim::Owned if !runs() => Claim::Claimed,
        claim => claim,
    }
}

/// A record on a task topic that cannot run, and why.
struct Refusal<'a> {
    delivery: &'a Delivery,
    code: &'static str,
    reason: String,
    payload: Option<Vec<u8>>,
}

/// Sends records on task topics that cannot run to the rejected topic.
#[derive(Clone)]
pub(super) struct Refuser {
    pub producer: FutureProducer,
    pub topic: String,
}

/// Sends refused deliveries to the rejected topic, each with its reason, and counts them.
/// Returns false if shutdown came first.
async fn refuse(
    shared: &Shared,
    store: &Store,
    refuser: &Refuser,
    refused: &[Refusal<'_>],
    token: &CancellationToken,
) -> bool {
    for Refusal {
        delivery,
        code,
        reason,
        payload,
    } in refused
    {
        let topic = &shared.topic_names[delivery.priority.index()];
        warn!(
            topic = %topic, partition = delivery.partition, offset = delivery.offset, code,
            reason = %reason, "Record on a task topic refused; sent to the rejected topic."
        );
        let source = wire::RejectedSource {
            topic,
            partition: delivery.partition,
            offset: delivery.offset,
        };
        let sent = keep_trying(token, "publishing a refused record", || async {
            wire::send_rejected(
                &refuser.producer,
                &refuser.topic,
                payload.as_deref(),
                code,
                reason,
                source,
                Duration::from_secs(30),
            )
            .await
            .map_err(|err| err.to_string())
        })
        .await;
        if sent.is_none() {
            return false;
        }
    }
    if !refused.is_empty()
        && let Err(err) = store.count("refused", refused.len() as u64).await
    {
        warn!(error = %err, "Could not count refused records.");
    }
    true
}
