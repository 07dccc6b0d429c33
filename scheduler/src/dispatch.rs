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
use fleet_common::flow::{self, Check, DimLimit, Limits};
use fleet_common::placement::{self, Amounts, Ask, Offer, QueueSettings, Unplaced};
use fleet_common::store::{
    Decision, Placed, Store, StoreError, Unblock, Unpark, Waiting, WorkerInfo,
};
use fleet_common::task::TaskRecord;
use fleet_common::telemetry::metrics;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::publish::Publisher;
use crate::queues::Queues;

/// Most waiting tasks one round sorts in, and considers per queue.
const WINDOW: usize = 500;
/// Waiting tasks a round considers beyond the free slots (for their wait reasons).
const HEAD: usize = 32;
/// How long the dispatcher sleeps after a round that placed nothing, unless woken by a
/// submission this scheduler accepted: how soon room that frees up on a worker is used.
const IDLE: Duration = Duration::from_millis(50);
/// How long it sleeps when nothing waits at all, unless woken: how soon it sees tasks that
/// arrive through other schedulers, retries and hand-backs.
const IDLE_EMPTY: Duration = Duration::from_millis(250);
/// Placement timeouts are checked at least this often while the view does not change.
const TIMEOUT_SLOT_MS: u64 = 2_000;
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
        let mut seen = Seen::default();
        while !token.is_cancelled() {
            let every_second = last_second.elapsed() >= EVERY_SECOND;
            if every_second {
                last_second = Instant::now();
                if let Err(err) = self.queues.refresh(&self.store).await {
                    warn!(error = %err, "Cannot read the queues' run-time settings.");
                }
                self.revoke().await;
                match self.store.unpark(Unpark::Expire, WINDOW).await {
                    Ok(0) => {}
                    Ok(n) => warn!(
                        tasks = n,
                        "Parked tasks failed: no worker took them in time."
                    ),
                    Err(err) => warn!(error = %err, "Cannot fail parked tasks past their timeout."),
                }
            }
            let next_token = match self.unblock(every_second).await {
                Ok(next) => next,
                Err(err) => {
                    warn!(error = %err, "Cannot send tasks waiting for a limit back.");
                    None
                }
            };
            turn = turn.wrapping_add(1);
            let round = self.round(turn, &mut seen).await.unwrap_or_else(|err| {
                warn!(error = %err, "Placement round failed; retrying.");
                Round::Waiting
            });
            let pause = match round {
                Round::More => continue,
                Round::Waiting => IDLE,
                Round::Empty => IDLE_EMPTY,
            };
            // A rate limit's next token is taken when it comes, not a round later: a bucket
            // that is full when nobody takes from it loses what it would have gained.
            let pause = next_token.map_or(pause, |ms| pause.min(Duration::from_millis(ms)));
            tokio::select! {
                () = token.cancelled() => {}
                () = self.wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
        info!("Placement dispatcher stopped.");
        Ok(())
    }

    /// Sends tasks waiting for a limit back to be placed as far as their limits let them now:
    /// rate limits' every round (as tokens come), all of them `every_second` (a limit raised or
    /// removed at run time; a slot that comes free wakes one at once). Returns the ms until
    /// the next token of a rate limit with tasks waiting.
    async fn unblock(&self, every_second: bool) -> Result<Option<u64>, StoreError> {
        let limits = self.queues.limits();
        let dims = self.store.blocked_dims().await?;
        let lists: Vec<(String, Unblock)> = dims
            .into_iter()
            .filter_map(|dim| {
                let how = match limits.of_dim(&dim) {
                    Some(DimLimit::Rate(rate)) => Unblock::Rate(rate),
                    Some(DimLimit::Running(max)) => Unblock::Running(max),
                    None => Unblock::All,
                };
                (every_second || matches!(how, Unblock::Rate(_))).then_some((dim, how))
            })
            .collect();
        let moved = self.store.unblock(&lists, WINDOW).await?;
        let mut next = None;
        for ((dim, _), (n, next_ms)) in lists.iter().zip(moved) {
            if n > 0 {
                debug!(limit = %dim, tasks = n, "Tasks waiting for a limit go back to be placed.");
            }
            if let Some(ms) = next_ms {
                next = Some(next.map_or(ms, |m: u64| m.min(ms)));
            }
        }
        if every_second {
            export_flow(&self.store, &limits).await;
        }
        Ok(next.map(|ms| ms.max(1)))
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
    ///
    /// A round whose view (the live workers, what they hold, the queues' settings, the 2-second
    /// slot for placement timeouts) is the one the previous round ended with, with nothing new
    /// sorted in, skips the queues: nothing it could decide would differ. So a backlog that
    /// fits nowhere costs a few reads a round, not a read of every task it holds.
    async fn round(&self, turn: usize, seen: &mut Seen) -> Result<Round, StoreError> {
        let mut offers = self.offers().await?;
        // The live workers changed (one joined, left, or reports other capacity or labels):
        // parked tasks go back to be considered again, a window at a time.
        let workers = fingerprint(&offers, None, 0);
        if seen.workers != Some(workers) {
            let back = self.store.unpark(Unpark::Back, WINDOW).await?;
            if back > 0 {
                info!(
                    tasks = back,
                    "The live workers changed: parked tasks are considered again."
                );
            }
            if back < WINDOW {
                seen.workers = Some(workers);
            }
        }
        let mut sorted = 0;
        let limits = self.queues.limits();
        if self.store.inbox_len().await? > 0 {
            let medians = medians(self.store.run_times().await?);
            sorted = self
                .store
                .sort_in(
                    WINDOW,
                    |record| estimate(record, &medians),
                    |record| record.tenant.as_deref().map_or(1, |t| limits.weight(t)),
                )
                .await?;
        }
        let mut queues = self.store.waiting_queues().await?;
        let parked = self.store.parked_count().await?;
        if queues.is_empty() {
            metrics::placement_waiting().set(parked as f64);
            seen.view = None;
            return Ok(if sorted >= WINDOW {
                Round::More
            } else {
                Round::Empty
            });
        }
        let now = self.store.redis_time_ms().await?;
        let view = fingerprint(&offers, Some(&self.queues.all()), now / TIMEOUT_SLOT_MS);
        if sorted == 0 && seen.view == Some(view) {
            return Ok(Round::Waiting);
        }
        let n = queues.len();
        queues.rotate_left(turn % n);
        let mut more = sorted >= WINDOW;
        let mut changed = false;
        let mut waiting_now = parked;
        let mut unplaced = BTreeMap::new();
        for queue in &queues {
            let settings = self.queues.get(queue);
            // No more than the free slots can start (and a few more, for their reasons).
            let window = (free_slots(&offers) + HEAD).min(WINDOW);
            let waiting = self
                .store
                .waiting_in(queue, settings.strategy, window)
                .await?;
            let decided = self
                .place(
                    (queue, &settings, &limits),
                    &waiting,
                    &mut offers,
                    now,
                    &mut unplaced,
                )
                .await?;
            more |= decided.moved > 0 && waiting.len() == window;
            changed |= decided.recorded;
            waiting_now += self.store.waiting_count(queue).await?;
        }
        metrics::placement_waiting().set(waiting_now as f64);
        for code in Unplaced::CODES {
            let n = unplaced.get(code).copied().unwrap_or(0);
            metrics::placement_unplaceable(code).set(n as f64);
        }
        export_use(&self.store, &offers).await;
        // What this round recorded changes the view (and what it published, the use): only a
        // round that recorded nothing leaves a view the next can trust.
        seen.view = (!changed).then_some(view);
        Ok(if more { Round::More } else { Round::Waiting })
    }

    /// Decides for `waiting` (tasks of `queue`, in its strategy's order), records the
    /// decisions and publishes what was placed.
    async fn place(
        &self,
        (queue, settings, limits): (&str, &QueueSettings, &Limits),
        waiting: &[Waiting],
        offers: &mut [Offer],
        now: u64,
        unplaced: &mut BTreeMap<&'static str, u64>,
    ) -> Result<Decided, StoreError> {
        let checks: Vec<Vec<Check>> = waiting
            .iter()
            .map(|task| {
                task.record
                    .as_ref()
                    .map_or_else(Vec::new, |r| limits.checks(r))
            })
            .collect();
        let mut flow = FlowView::read(&self.store, &checks).await?;
        let decisions: Vec<(Decision, String, String, String)> = waiting
            .iter()
            .zip(&checks)
            .filter_map(|(task, checks)| {
                let decision = match flow.over(checks) {
                    Some((dim, reason)) if task.record.is_some() => Decision::Block {
                        id: task.id.clone(),
                        dim,
                        reason,
                    },
                    _ => decide(task, offers, (now, settings), unplaced)?,
                };
                if matches!(decision, Decision::Place { .. }) {
                    flow.take(checks);
                }
                let fair_key = task.record.as_ref().map(flow::fair_key).unwrap_or_default();
                let dims = task
                    .record
                    .as_ref()
                    .map(flow::dims_text)
                    .unwrap_or_default();
                Some((decision, fair_key, flow::checks_text(checks), dims))
            })
            .collect();
        let live_since = now.saturating_sub(self.live_ms);
        let outcomes = self.store.place(queue, &decisions, live_since).await?;
        let mut sending = Vec::new();
        let mut limited = 0;
        for ((decision, ..), outcome) in decisions.iter().zip(&outcomes) {
            if *outcome == Placed::Limited {
                limited += 1;
                if let Some(dim) = decision_dim(decision, waiting, &checks) {
                    metrics::flow_throttled(dim).increment(1);
                }
            }
            match (decision, outcome) {
                (Decision::Place { id, worker }, Placed::Placed(dispatch)) => {
                    if let Some(task) = waiting.iter().find(|w| &w.id == id) {
                        let waited = now.saturating_sub(task.since_ms);
                        metrics::placement_wait().record(waited as f64 / 1000.0);
                    }
                    sending.push((worker.as_str(), dispatch));
                }
                (Decision::Wait { id, reason }, Placed::Waiting) => {
                    debug!(task_id = %id, reason = %reason, "Placed task waits.");
                }
                (Decision::Fail { id, reason }, Placed::Failed) => {
                    warn!(task_id = %id, reason = %reason, "Placed task failed: no worker took it in time.");
                }
                (Decision::Park { id, reason, .. }, Placed::Parked) => {
                    debug!(task_id = %id, reason = %reason, "Placed task parked until the live workers change.");
                }
                (Decision::Place { id, worker }, _) => {
                    // Not placed after all (gone, or no longer fitting): its needs are not in use
                    // there for the rest of this round.
                    if let (Some(task), Some(offer)) = (
                        waiting.iter().find(|w| &w.id == id),
                        offers.iter_mut().find(|o| &o.id == worker),
                    ) {
                        offer.used.remove(&task.needs);
                    }
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
        Ok(Decided {
            moved: sent.len() + limited,
            recorded: !decisions.is_empty(),
        })
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

/// The flow counts a round decides with: running counts and bucket tokens of the limits its
/// tasks are checked against, as read at its start and counted on as it places.
#[derive(Debug, Default)]
struct FlowView {
    running: std::collections::HashMap<String, u64>,
    tokens: std::collections::HashMap<String, f64>,
}

impl FlowView {
    async fn read(store: &Store, checks: &[Vec<Check>]) -> Result<Self, StoreError> {
        let mut dims = std::collections::BTreeSet::new();
        let mut rates = BTreeMap::new();
        for check in checks.iter().flatten() {
            match check {
                Check::Running { dim, .. } => {
                    dims.insert(dim.clone());
                }
                Check::Rate { dim, rate } => {
                    rates.insert(dim.clone(), *rate);
                }
            }
        }
        let dims: Vec<String> = dims.into_iter().collect();
        let counts = store.running_counts(&dims).await?;
        let mut view = FlowView {
            running: dims.into_iter().zip(counts).collect(),
            ..FlowView::default()
        };
        for (dim, rate) in rates {
            let tokens = store.tokens(&dim, rate).await?;
            view.tokens.insert(dim, tokens);
        }
        Ok(view)
    }

    /// The limit a task with `checks` is over now, if any: its dimension, and why.
    fn over(&self, checks: &[Check]) -> Option<(String, String)> {
        checks.iter().find_map(|check| match check {
            Check::Running { dim, max } => {
                let running = self.running.get(dim).copied().unwrap_or(0);
                (running + 1 > *max).then(|| {
                    let why =
                        format!("concurrency limit of {dim} reached ({running} of {max} running)");
                    (dim.clone(), why)
                })
            }
            Check::Rate { dim, rate } => {
                let tokens = self.tokens.get(dim).copied().unwrap_or(0.0);
                (tokens < 1.0).then(|| {
                    let why = format!(
                        "rate limit of {dim} ({} per {} ms): waiting for a token",
                        rate.limit, rate.period_ms
                    );
                    (dim.clone(), why)
                })
            }
        })
    }

    /// Counts a placement under `checks`.
    fn take(&mut self, checks: &[Check]) {
        for check in checks {
            match check {
                Check::Running { dim, .. } => *self.running.entry(dim.clone()).or_default() += 1,
                Check::Rate { dim, .. } => *self.tokens.entry(dim.clone()).or_default() -= 1.0,
            }
        }
    }
}

/// The scope of the limit a decision ran into (for the throttling metric): the one the
/// dispatcher found, else its first.
fn decision_dim(
    decision: &Decision,
    waiting: &[Waiting],
    checks: &[Vec<Check>],
) -> Option<&'static str> {
    let i = waiting.iter().position(|w| w.id == decision.id())?;
    let dim = match decision {
        Decision::Block { dim, .. } => dim.as_str(),
        _ => checks[i].first()?.dim(),
    };
    let scope = dim.split_once(':').map_or("", |(scope, _)| scope);
    flow::Scope::ALL
        .into_iter()
        .find(|s| s.as_str() == scope)
        .map(flow::Scope::as_str)
}

/// Most limited dimensions exported by name besides those with a limit of their own.
const TOP_DIMS: usize = 20;

/// Exports the use of limited dimensions: each with a limit of its own, and the ones with most
/// tasks blocked; the rest summed as `other`. A dimension no longer exported is set to zero.
async fn export_flow(store: &Store, limits: &Limits) {
    static EXPORTED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let Ok(blocked) = store.blocked_dims().await else {
        return;
    };
    let mut dims: std::collections::BTreeSet<String> = limits
        .map
        .keys()
        .filter(|(_, name)| name != flow::ANY_TENANT)
        .map(|(scope, name)| format!("{}:{name}", scope.as_str()))
        .collect();
    let own = dims.len();
    dims.extend(blocked);
    let dims: Vec<String> = dims.into_iter().collect();
    let Ok(uses) = store.dim_use(&dims).await else {
        return;
    };
    let mut rows: Vec<(String, fleet_common::store::DimUse)> = dims.into_iter().zip(uses).collect();
    rows.sort_by_key(|(dim, u)| (limits.of_dim(dim).is_none(), std::cmp::Reverse(u.blocked)));
    let mut other = fleet_common::store::DimUse::default();
    let mut now = Vec::new();
    for (i, (dim, u)) in rows.into_iter().enumerate() {
        if i < own + TOP_DIMS {
            metrics::flow_use("running", dim.clone()).set(u.running as f64);
            metrics::flow_use("waiting", dim.clone()).set(u.waiting() as f64);
            metrics::flow_use("blocked", dim.clone()).set(u.blocked as f64);
            now.push(dim);
        } else {
            other.queued += u.queued;
            other.running += u.running;
            other.blocked += u.blocked;
        }
    }
    metrics::flow_use("running", "other").set(other.running as f64);
    metrics::flow_use("waiting", "other").set(other.waiting() as f64);
    metrics::flow_use("blocked", "other").set(other.blocked as f64);
    let mut exported = EXPORTED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for gone in exported.iter().filter(|d| !now.contains(d)) {
        for what in ["running", "waiting", "blocked"] {
            metrics::flow_use(what, gone.clone()).set(0.0);
        }
    }
    *exported = now;
}

/// Exports each live worker's capacity and what placed tasks hold on it (as Redis has it now,
/// this round's placements included).
async fn export_use(store: &Store, offers: &[Offer]) {
    let used = store.placement_use().await.unwrap_or_default();
    for offer in offers {
        for (resource, milli) in &offer.capacity.0 {
            let held = used.get(&offer.id).map_or(0, |u| u.get(resource));
            metrics::worker_resource(false, offer.id.clone(), resource.clone())
                .set(*milli as f64 / 1000.0);
            metrics::worker_resource(true, offer.id.clone(), resource.clone())
                .set(held as f64 / 1000.0);
        }
    }
}

/// Slots free on all live workers together.
fn free_slots(offers: &[Offer]) -> usize {
    offers
        .iter()
        .map(|o| {
            let free = o.capacity.get(placement::SLOTS)
                - o.used
                    .get(placement::SLOTS)
                    .min(o.capacity.get(placement::SLOTS));
            (free / 1000) as usize
        })
        .sum()
}

/// How a round went, and so how soon the next comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// A full window was placed or sorted in: more may wait, go on at once.
    More,
    /// Tasks wait: look again after [`IDLE`] (room frees up as tasks end).
    Waiting,
    /// Nothing waits: look again after [`IDLE_EMPTY`] or when woken by a submission.
    Empty,
}

/// What one queue's decisions came to.
#[derive(Debug, Clone, Copy)]
struct Decided {
    /// Placed tasks published, and tasks moved to a limit's wait list.
    moved: usize,
    /// Whether anything was recorded (a placement, a failure, a changed reason).
    recorded: bool,
}

/// What the dispatcher saw last, to tell what changed.
#[derive(Debug, Default)]
struct Seen {
    /// The live workers, without their use: a change brings parked tasks back.
    workers: Option<u64>,
    /// Everything decisions depend on besides the waiting tasks, when the round that saw it
    /// recorded nothing: the next round with the same view and nothing new skips the queues.
    view: Option<u64>,
}

/// A fingerprint of the live workers (with their use and `queues` when given) and `slot`.
fn fingerprint(
    offers: &[Offer],
    queues: Option<&BTreeMap<String, QueueSettings>>,
    slot: u64,
) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    slot.hash(&mut h);
    for o in offers {
        (
            &o.id,
            &o.labels,
            o.weight,
            &o.kinds,
            &o.partitions,
            &o.capacity.0,
        )
            .hash(&mut h);
    }
    if let Some(queues) = queues {
        for o in offers {
            o.used.0.hash(&mut h);
        }
        for (name, q) in queues {
            let q = (
                q.strategy.as_str(),
                q.placement.as_str(),
                q.placement_timeout_ms,
            );
            (name, q).hash(&mut h);
        }
    }
    h.finish()
}

/// The decision for one waiting task; `None` when there is nothing to record (it waits for
/// the reason its status already shows).
fn decide(
    task: &Waiting,
    offers: &mut [Offer],
    (now, settings): (u64, &QueueSettings),
    unplaced: &mut BTreeMap<&'static str, u64>,
) -> Option<Decision> {
    let id = task.id.clone();
    let expired =
        |timeout: Option<u64>| timeout.is_some_and(|t| now.saturating_sub(task.since_ms) >= t);
    let Some(record) = &task.record else {
        if !task.pending {
            // No longer waiting: the place script drops it from the queue.
            let reason = "gone".into();
            return Some(Decision::Wait { id, reason });
        }
        // A record this build cannot read (a newer release's): it waits, visibly, for a
        // scheduler that can, or its queue's placement timeout.
        let reason = "its record is unreadable by this scheduler".to_string();
        if expired(settings.placement_timeout_ms) {
            let reason = format!("placement timeout: {reason}");
            return Some(Decision::Fail { id, reason });
        }
        return (task.wait_reason.as_deref() != Some(reason.as_str()))
            .then_some(Decision::Wait { id, reason });
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
        Err(Unplaced { code, reason }) => {
            *unplaced.entry(code).or_default() += 1;
            let timeout = record
                .placement_timeout_ms
                .or(settings.placement_timeout_ms);
            if expired(timeout) {
                return Some(Decision::Fail {
                    id,
                    reason: format!("placement timeout: {reason}"),
                });
            }
            if code != "room" {
                // No live worker could take it even when idle: out of the queue, so it holds
                // up nothing behind it, until the live workers change.
                let deadline_ms = timeout.map(|t| task.since_ms + t);
                return Some(Decision::Park {
                    id,
                    reason,
                    deadline_ms,
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
/// [`DEFAULT_ESTIMATE_MS`] (also for a record this build cannot read).
fn estimate(record: Option<&TaskRecord>, medians: &BTreeMap<String, u64>) -> u64 {
    record
        .and_then(|r| r.estimated_ms.or_else(|| medians.get(&r.kind).copied()))
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
