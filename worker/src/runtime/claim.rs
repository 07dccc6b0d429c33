//! The claim loop: claims buffered deliveries in one Redis call per batch, starts the
//! claimed ones, refuses records that cannot run, and stores the batch's offsets.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use fleet_common::dependency::keep_trying;
use fleet_common::placement;
use fleet_common::store::{Claim, Fit, Store, new_call_id};
use fleet_common::wire::Envelope;
use fleet_common::{kafka, membership, wire};
use rdkafka::producer::FutureProducer;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Delivery, Finished, Shared, execute};
use crate::handler::Registry;

/// What the claim loop works with; built once by the worker.
pub(super) struct Claimer {
    pub(super) shared: Arc<Shared>,
    pub(super) consumer: Arc<membership::GroupConsumer>,
    pub(super) store: Store,
    pub(super) registry: Arc<Registry>,
    pub(super) done: mpsc::UnboundedSender<Finished>,
    pub(super) refuser: Refuser,
}

impl Claimer {
    /// The claim loop: one batch after another until `token` is cancelled.
    pub(super) async fn run(self, token: CancellationToken) {
        while self.claim_next_batch(&token).await.is_continue() {}
    }

    /// One batch: waits for a free slot and buffered work, claims as many deliveries as
    /// there are free slots in one call, starts the claimed ones, refuses those that cannot
    /// run, and stores the batch's offsets once the claim has answered. Breaks on shutdown.
    async fn claim_next_batch(&self, token: &CancellationToken) -> ControlFlow<()> {
        let Some(mut slots) = self.free_slots(token).await else {
            return ControlFlow::Break(());
        };
        let picked = self.pick(&mut slots);
        let Some(claims) = self.claim(&picked, token).await else {
            return ControlFlow::Break(());
        };
        let refused = self.start_claimed(&picked, claims, &mut slots);
        // Refused records must be on the rejected topic before their offsets are stored.
        if !refuse(&self.shared, &self.store, &self.refuser, &refused, token).await {
            return ControlFlow::Break(()); // nothing of this batch is stored; claims are in Redis
        }
        drop(slots); // unused slots go back
        self.store_offsets(&picked);
        ControlFlow::Continue(())
    }

    /// Waits for a free slot and for buffered work, then takes every other free slot up to
    /// `worker.claim_batch`. `None` on shutdown.
    async fn free_slots(&self, token: &CancellationToken) -> Option<Vec<OwnedSemaphorePermit>> {
        let shared = &self.shared;
        let first = tokio::select! {
            () = token.cancelled() => return None,
            permit = shared.slots.clone().acquire_owned() => permit.ok()?,
        };
        while shared.buffers().is_empty() {
            tokio::select! {
                () = token.cancelled() => return None,
                () = shared.work_ready.notified() => {}
            }
        }
        let mut slots = vec![first];
        while slots.len() < shared.settings.worker.claim_batch {
            match shared.slots.clone().try_acquire_owned() {
                Ok(p) => slots.push(p),
                Err(_) => break,
            }
        }
        Some(slots)
    }

    /// Picks up to one delivery per slot from the buffers (by priority weight), and gives
    /// back the slots left over.
    fn pick(&self, slots: &mut Vec<OwnedSemaphorePermit>) -> Vec<Delivery> {
        let picked: Vec<Delivery> = {
            let mut buffers = self.shared.buffers();
            std::iter::from_fn(|| buffers.pick())
                .take(slots.len())
                .collect()
        };
        slots.truncate(picked.len());
        picked
    }

    /// Claims the attempts of the picked deliveries that parsed, in one Redis call (repeated
    /// until it answers). `None` on shutdown.
    async fn claim(&self, picked: &[Delivery], token: &CancellationToken) -> Option<Vec<Claim>> {
        let shared = &self.shared;
        let envelopes = || picked.iter().filter_map(|d| d.envelope.as_ref().ok());
        let attempts: Vec<(&str, u32)> = envelopes()
            .map(|e| (e.task.id.as_str(), e.attempt))
            .collect();
        let labels = &shared.settings.worker.labels;
        let fits: Vec<Fit> = envelopes()
            .map(|e| match &e.task {
                t if !t.is_placed() => Fit::Streamed,
                t if placement::labels_match(&t.require, labels) => Fit::Placed,
                _ => Fit::LabelsDiffer,
            })
            .collect();
        // One id for the call and its retries: a retry answers `Owned` for what a try whose
        // reply was lost had claimed.
        let call = new_call_id();
        let lease_ms = shared.settings.lease.lease_ms;
        let claims = keep_trying(token, "claiming tasks", || {
            self.store
                .claim_call(&shared.worker_id, lease_ms, &call, &attempts, &fits)
        })
        .await;
        if claims.is_none() {
            // Shutting down after a failed call, which may still have claimed them (a lost
            // reply): the hand-back releases them too.
            shared.unanswered().extend(
                attempts
                    .iter()
                    .map(|(id, attempt)| (Arc::from(*id), *attempt)),
            );
        }
        claims
    }

    /// Starts the claimed deliveries, each with one of `slots`, and returns those that cannot
    /// run; duplicates, stale attempts and held tasks are skipped.
    fn start_claimed<'a>(
        &self,
        picked: &'a [Delivery],
        claims: Vec<Claim>,
        slots: &mut Vec<OwnedSemaphorePermit>,
    ) -> Vec<Refusal<'a>> {
        let shared = &self.shared;
        let mut claims = claims.into_iter();
        let mut refused = Vec::new();
        let mut launches = Vec::with_capacity(picked.len());
        // The batch's log lines ("Handler started." above all) go out in a few writes, all
        // before any of its handlers is spawned: an execution is never without its line.
        fleet_common::telemetry::batched(|| {
            for delivery in picked {
                let envelope = match &delivery.envelope {
                    Ok(envelope) => envelope,
                    Err(err) => {
                        refused.push(Refusal {
                            delivery,
                            code: "invalid_envelope",
                            reason: err.to_string(),
                            payload: delivery.raw.clone(),
                        });
                        continue;
                    }
                };
                let claim =
                    owned_as_claimed(shared, envelope, claims.next().unwrap_or(Claim::Unknown));
                if claim == Claim::Claimed {
                    let slot = slots.pop().expect("one slot per picked delivery");
                    launches.push(execute::prepare(
                        shared,
                        &self.registry,
                        envelope,
                        (delivery.published_ms, delivery.trace.as_ref()),
                        slot,
                        self.done.clone(),
                    ));
                } else if let Some(refusal) = refusal(delivery, envelope, claim) {
                    refused.push(refusal);
                }
            }
        });
        for launch in launches {
            launch.spawn(shared);
        }
        refused
    }

    /// Stores the batch's last offset of each partition: picks keep every partition in offset
    /// order, so it covers the ones before it, with one librdkafka call (and topic lookup) per
    /// partition instead of one per record.
    fn store_offsets(&self, picked: &[Delivery]) {
        let mut last: Vec<(usize, i32, i64)> = Vec::new();
        for delivery in picked {
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
            let topic = &self.shared.topic_names[topic];
            if let Err(err) = kafka::store_handled(&*self.consumer, topic, partition, offset) {
                debug!(error = %err, "Offset not stored (partition revoked).");
            }
        }
    }
}

/// Why a delivery whose attempt was not claimed cannot run, if it is a record to refuse
/// (not published by Fleet, or of a task Redis does not hold); a held task, a duplicate or a
/// stale attempt is only logged.
fn refusal<'a>(delivery: &'a Delivery, envelope: &Envelope, claim: Claim) -> Option<Refusal<'a>> {
    let (code, reason) = match claim {
        Claim::Future => (
            "future_attempt",
            format!(
                "task {} has no dispatch of attempt {}: not published by Fleet",
                envelope.task.id, envelope.attempt
            ),
        ),
        Claim::Unknown => (
            "unknown_task",
            format!("task {} is not in Redis", envelope.task.id),
        ),
        Claim::Unfit => {
            debug!(
                task_id = %envelope.task.id, attempt = envelope.attempt,
                "Placed task does not fit this worker; sent back to wait for placement."
            );
            return None;
        }
        Claim::Held => {
            debug!(
                task_id = %envelope.task.id, attempt = envelope.attempt,
                "Queue or priority paused; task held until resumed."
            );
            return None;
        }
        other => {
            debug!(
                task_id = %envelope.task.id, attempt = envelope.attempt, claim = other.as_str(),
                "Duplicate or stale delivery skipped."
            );
            return None;
        }
    };
    Some(Refusal {
        delivery,
        code,
        reason,
        payload: Some(envelope.to_json().into_bytes()),
    })
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
