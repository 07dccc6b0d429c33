//! The placement dispatcher: chooses a worker for each placed task waiting in Redis (by its
//! labels and needs, then its queue's policy), reserves the task's needs there in the same
//! script that records the choice (`lua/place.lua`), and publishes the task to a partition that
//! worker consumes. A task that fits no live worker waits, with the reason in its status.
//!
//! Every scheduler runs one. Two may choose at once: the script places a task once and never
//! promises a worker more than its capacity, so the loser of a race finds it `gone` or `full`
//! and tries again next round. Streamed tasks never come here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_common::Priority;
use fleet_common::placement::{self, Amounts, Ask, Offer, QueueSettings};
use fleet_common::store::{Decision, Placed, Store, StoreError, Waiting, WorkerInfo};
use fleet_common::task::TaskRecord;
use fleet_common::telemetry::metrics;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::publish::Publisher;
use crate::queues::Queues;

/// Most waiting tasks one round sorts in, and considers per queue.
const WINDOW: usize = 500;
/// How long the dispatcher sleeps after a round that placed nothing, unless woken by a
/// submission this scheduler accepted: how soon room that frees up on a worker is used.
const IDLE: Duration = Duration::from_millis(50);
/// How often it reads the queues' run-time settings and looks for workers that are gone (and
/// takes back what they held).
const EVERY_SECOND: Duration = Duration::from_secs(1);

/// The estimate of a task with no `estimated_ms` whose kind has no successful placed run yet.
pub const DEFAULT_ESTIMATE_MS: u64 = 60_000;

/// What the dispatcher works with.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    pub store: Store,
    pub publisher: Publisher,
    /// Notified when this scheduler accepted placed tasks.
    pub wake: Arc<Notify>,
    /// A worker last heard from longer ago than this is not live (the lease).
    pub live_ms: u64,
    /// Each queue's settings, refreshed from Redis every second.
    pub queues: Queues,
}

impl Dispatcher {
    /// Rounds until `token` is cancelled.
    pub async fn run(self, token: CancellationToken) -> fleet_common::shutdown::TaskResult {
        info!("Placement dispatcher started.");
        let mut last_second = Instant::now() - EVERY_SECOND;
        let mut turn = 0usize;
        while !token.is_cancelled() {
            if last_second.elapsed() >= EVERY_SECOND {
                last_second = Instant::now();
                if let Err(err) = self.queues.refresh(&self.store).await {
                    warn!(error = %err, "Cannot read the queues' run-time settings.");
                }
                self.revoke().await;
            }
            turn = turn.wrapping_add(1);
            let more = self.round(turn).await.unwrap_or_else(|err| {
                warn!(error = %err, "Placement round failed; retrying.");
                false
            });
            if !more {
                tokio::select! {
                    () = token.cancelled() => {}
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(IDLE) => {}
                }
            }
        }
        info!("Placement dispatcher stopped.");
        Ok(())
    }

    async fn revoke(&self) {
        let now = match self.store.redis_time_ms().await {
            Ok(now) => now,
            Err(err) => {
                warn!(error = %err, "Cannot read Redis time to look for gone workers.");
                return;
            }
        };
        match self
            .store
            .revoke_gone(now.saturating_sub(self.live_ms))
            .await
        {
            Ok(0) => {}
            Ok(back) => {
                info!(
                    tasks = back,
                    "Placed tasks of a gone worker wait to be placed again."
                )
            }
            Err(err) => warn!(error = %err, "Cannot take back what gone workers held."),
        }
    }

    /// One round: sorts new arrivals into their queues, then, queue by queue (starting at a
    /// different one each `turn`, so queues share room in turn), decides for the first tasks in
    /// the queue's strategy order, records the decisions and publishes the placed tasks.
    /// Returns whether to go on at once (a full window was placed or sorted in).
    async fn round(&self, turn: usize) -> Result<bool, StoreError> {
        let medians = medians(self.store.run_times().await?);
        let sorted = self
            .store
            .sort_in(WINDOW, |record| estimate(record, &medians))
            .await?;
        let mut queues = self.store.waiting_queues().await?;
        if queues.is_empty() {
            metrics::placement_waiting().set(0.0);
            return Ok(sorted >= WINDOW);
        }
        let start = turn % queues.len();
        queues.rotate_left(start);
        let now = self.store.redis_time_ms().await?;
        let mut offers = self.offers().await?;
        let mut more = sorted >= WINDOW;
        let mut waiting_now = 0;
        for queue in &queues {
            let settings = self.queues.get(queue);
            let waiting = self
                .store
                .waiting_in(queue, settings.strategy, WINDOW)
                .await?;
            let placed = self
                .place(queue, &settings, &waiting, &mut offers, now)
                .await?;
            more |= placed > 0 && waiting.len() == WINDOW;
            waiting_now += self.store.waiting_count(queue).await?;
        }
        metrics::placement_waiting().set(waiting_now as f64);
        Ok(more)
    }

    /// Decides for `waiting` (tasks of `queue`, in its strategy's order), records the
    /// decisions and publishes what was placed. Returns how many were published.
    async fn place(
        &self,
        queue: &str,
        settings: &QueueSettings,
        waiting: &[Waiting],
        offers: &mut [Offer],
        now: u64,
    ) -> Result<usize, StoreError> {
        let decisions: Vec<(Decision, Option<&str>)> = waiting
            .iter()
            .filter_map(|task| {
                let decision = decide(task, offers, now, settings)?;
                let fair_key = task.record.as_ref().and_then(|r| r.key.as_deref());
                Some((decision, fair_key))
            })
            .collect();
        let live_since = now.saturating_sub(self.live_ms);
        let outcomes = self.store.place(queue, &decisions, live_since).await?;
        let mut sending = Vec::new();
        for ((decision, _), outcome) in decisions.iter().zip(&outcomes) {
            match (decision, outcome) {
                (Decision::Place { worker, .. }, Placed::Placed(dispatch)) => {
                    sending.push((worker.as_str(), dispatch));
                }
                (Decision::Wait { id, reason }, Placed::Waiting) => {
                    debug!(task_id = %id, reason = %reason, "Placed task waits.");
                }
                (Decision::Fail { id, reason }, Placed::Failed) => {
                    warn!(task_id = %id, reason = %reason, "Placed task failed: no worker took it in time.");
                }
                _ => {}
            }
        }
        let results = futures::future::join_all(sending.iter().map(|(worker, dispatch)| {
            let priority = record_priority(&dispatch.record_json);
            let owned = offers
                .iter()
                .find(|o| o.id == *worker)
                .map_or(&[][..], |o| &o.partitions[priority.index()][..]);
            let partition = (!owned.is_empty()).then(|| owned[rand::random_range(0..owned.len())]);
            self.publisher.send_placed(dispatch, priority, partition)
        }))
        .await;
        let mut sent = Vec::new();
        for ((worker, dispatch), result) in sending.iter().zip(results) {
            match result {
                Ok(()) => {
                    metrics::tasks_placed().increment(1);
                    debug!(task_id = %dispatch.id, attempt = dispatch.attempt, worker_id = %worker, "Task placed.");
                    sent.push((dispatch.id.as_str(), dispatch.attempt));
                }
                Err(err) => {
                    warn!(task_id = %dispatch.id, error = %err, "Publishing a placed task failed; the relay will retry it.")
                }
            }
        }
        self.store.dispatched(&sent).await?;
        Ok(sent.len())
    }

    /// The live workers with what they offer and what placed tasks hold on them.
    async fn offers(&self) -> Result<Vec<Offer>, StoreError> {
        let workers = self.store.live_workers(self.live_ms).await?;
        let mut used = self.store.placement_use().await?;
        Ok(workers
            .into_iter()
            .map(|(id, info)| offer(id.clone(), info, used.remove(&id).unwrap_or_default()))
            .collect())
    }
}

/// The decision for one waiting task; `None` when there is nothing to record (it waits for
/// the reason its status already shows).
fn decide(
    task: &Waiting,
    offers: &mut [Offer],
    now: u64,
    settings: &QueueSettings,
) -> Option<Decision> {
    let id = task.id.clone();
    let Some(record) = &task.record else {
        // Gone, or unreadable here: the place script drops it unless it still waits.
        return Some(Decision::Wait {
            id,
            reason: "its record is unreadable by this scheduler".into(),
        });
    };
    let ask = Ask {
        needs: &task.needs,
        require: &record.require,
        prefer: &record.prefer,
        kind: &record.kind,
        priority: record.priority.index(),
    };
    match placement::choose(ask, offers, settings.placement) {
        Ok(i) => Some(Decision::Place {
            id,
            worker: offers[i].id.clone(),
        }),
        Err(reason) => {
            let timeout = record
                .placement_timeout_ms
                .or(settings.placement_timeout_ms);
            if timeout.is_some_and(|t| now.saturating_sub(task.since_ms) >= t) {
                return Some(Decision::Fail {
                    id,
                    reason: format!("placement timeout: {reason}"),
                });
            }
            (task.wait_reason.as_deref() != Some(reason.as_str()))
                .then_some(Decision::Wait { id, reason })
        }
    }
}

/// The median of each kind's recent run times.
fn medians(run_times: BTreeMap<String, Vec<u64>>) -> BTreeMap<String, u64> {
    run_times
        .into_iter()
        .filter_map(|(kind, mut times)| {
            times.sort_unstable();
            let median = *times.get(times.len() / 2)?;
            Some((kind, median))
        })
        .collect()
}

/// A task's estimate for `sjf`: its own, else its kind's median run time, else
/// [`DEFAULT_ESTIMATE_MS`].
fn estimate(record: &TaskRecord, medians: &BTreeMap<String, u64>) -> u64 {
    record
        .estimated_ms
        .or_else(|| medians.get(&record.kind).copied())
        .unwrap_or(DEFAULT_ESTIMATE_MS)
}

/// A live worker as placement sees it.
fn offer(id: String, info: WorkerInfo, used: Amounts) -> Offer {
    let partitions = Priority::ALL.map(|p| info.partitions_of(p).unwrap_or_default().to_vec());
    Offer {
        capacity: Amounts::capacity(&info.capacity),
        labels: info.labels,
        weight: info.weight.max(1),
        kinds: info
            .kinds
            .split(',')
            .map(|k| k.trim().to_string())
            .collect(),
        partitions,
        used,
        id,
    }
}

/// The priority of a stored record (the payload is skipped, not parsed).
fn record_priority(record_json: &str) -> Priority {
    #[derive(serde::Deserialize)]
    struct Route {
        priority: Priority,
    }
    serde_json::from_str::<Route>(record_json).map_or(Priority::Normal, |r| r.priority)
}
