//! The lease keeper: every heartbeat interval it extends the leases of all running tasks in one
//! Redis call, stops the handlers whose lease is gone, and cancels those whose task was
//! cancelled: a cancellation signal first, an abort once `worker.cancel_grace_ms` has passed. It runs on its own OS thread with its
//! own runtime and Redis connection, so handlers that hog the main runtime cannot starve it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleet_common::Priority;
use fleet_common::store::{self, Outcome, Store, WorkerInfo};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{Finished, Shared};
use crate::handler::Progress;

/// Handle to the lease keeper thread.
#[derive(Debug)]
pub(super) struct LeaseKeeper {
    thread: Option<std::thread::JoinHandle<()>>,
    exited: CancellationToken,
}

impl LeaseKeeper {
    /// Resolves if the thread stops before it was asked to.
    pub(super) async fn finished(&self) {
        self.exited.cancelled().await;
    }

    pub(super) async fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Adds the queue waits measured since the last flush to the dashboard's series; on failure
/// they wait for the next heartbeat.
async fn flush_waits(shared: &Shared, store: &Store) {
    let sample = std::mem::take(&mut *shared.waits());
    if sample.is_empty() {
        return;
    }
    if let Err(err) = store.add_waits(&sample).await {
        warn!(error = %err, "Cannot record queue waits for the dashboard; retrying at the next heartbeat.");
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut kept = shared.waits();
        kept.merge(sample);
        kept.forget_before(now_ms.saturating_sub(store::series::KEEP_MS));
    }
}

/// Starts the lease keeper; it runs until `token` is cancelled.
pub(super) fn spawn(
    shared: Arc<Shared>,
    kinds: String,
    done: mpsc::UnboundedSender<Finished>,
    token: CancellationToken,
) -> LeaseKeeper {
    let exited = CancellationToken::new();
    let exited_guard = exited.clone().drop_guard();
    let thread = std::thread::Builder::new()
        .name("fleet-lease".into())
        .spawn(move || {
            let _exited = exited_guard;
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(err) => {
                    error!(error = %err, "Cannot start the lease keeper runtime.");
                    return;
                }
            };
            runtime.block_on(keep_leases(shared, kinds, done, token));
        })
        .expect("spawn the lease keeper thread");
    LeaseKeeper {
        thread: Some(thread),
        exited,
    }
}

/// The heartbeat loop: one [`Keeper::beat`] per heartbeat interval until `token` is cancelled.
async fn keep_leases(
    shared: Arc<Shared>,
    kinds: String,
    done: mpsc::UnboundedSender<Finished>,
    token: CancellationToken,
) {
    let Some(store) = connect(&shared, &token).await else {
        return;
    };
    let info = worker_info(&shared, kinds);
    let capacity = fleet_common::placement::Amounts::capacity(&shared.capacity).encode();
    let mut keeper = Keeper {
        shared,
        store,
        done,
        info,
        capacity,
        last_ok: Instant::now(),
    };
    let mut tick = tokio::time::interval(keeper.shared.settings.lease.heartbeat());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = token.cancelled() => {
                flush_waits(&keeper.shared, &keeper.store).await;
                return;
            }
            _ = tick.tick() => {}
        }
        keeper.beat().await;
    }
}

/// The lease keeper's own Redis connection, retried every second until it connects. `None` on
/// shutdown.
async fn connect(shared: &Shared, token: &CancellationToken) -> Option<Store> {
    let settings = &shared.settings;
    loop {
        match store::connect(&settings.redis).await {
            Ok(conn) => {
                return Some(Store::new(
                    conn,
                    store::Keys::new(&settings.redis.key_prefix),
                    &settings.tasks,
                ));
            }
            Err(err) => {
                warn!(error = %err, "Lease keeper cannot reach Redis yet.");
                tokio::select! {
                    () = token.cancelled() => return None,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// What the worker tells about itself with every heartbeat (its partitions are filled in at
/// each beat).
fn worker_info(shared: &Shared, kinds: String) -> WorkerInfo {
    let settings = &shared.settings;
    WorkerInfo {
        host: crate::settings::host_name().unwrap_or_default(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        concurrency: settings.worker.concurrency,
        group: settings.worker.group_id.clone(),
        kinds,
        // Queues share the priority topics, so every worker serves every queue.
        queues: vec!["*".to_string()],
        started_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        partitions: Default::default(),
        capacity: shared.capacity.clone(),
        labels: settings.worker.labels.clone(),
        weight: settings.worker.weight,
    }
}

/// A running attempt as the heartbeat reports it: id, attempt, and progress since the last.
type Reported = (Arc<str>, u32, Option<Progress>);

/// The lease keeper's state between heartbeats.
struct Keeper {
    shared: Arc<Shared>,
    store: Store,
    done: mpsc::UnboundedSender<Finished>,
    info: WorkerInfo,
    /// The capacity as Redis keeps it, for the placement scripts.
    capacity: String,
    /// When a heartbeat last succeeded.
    last_ok: Instant,
}

impl Keeper {
    /// One heartbeat: aborts handlers lost at the previous beat and cancelled ones past their
    /// grace, extends every running attempt's lease in one call with its progress and the
    /// worker's info, then signals the handlers Redis answered cancelled or lost.
    async fn beat(&mut self) {
        abort_lost(&self.shared);
        abort_cancelled(&self.shared, &self.done);
        let reported = self.running_now();
        let beats: Vec<store::Beat<'_>> = reported
            .iter()
            .map(|(id, a, p)| {
                (
                    &**id,
                    *a,
                    p.as_ref().map(|p| (p.percent, p.message.as_str())),
                )
            })
            .collect();
        self.info.partitions = Priority::ALL
            .into_iter()
            .zip(self.shared.assignment().iter())
            .map(|(p, owned)| (p.as_str().to_string(), owned.clone()))
            .collect();
        let info = serde_json::to_string(&self.info).unwrap_or_default();
        let settings = &self.shared.settings;
        match self
            .store
            .extend(
                &self.shared.worker_id,
                settings.lease.lease_ms,
                &info,
                &self.capacity,
                &beats,
            )
            .await
        {
            Ok(answer) => {
                self.last_ok = Instant::now();
                flush_waits(&self.shared, &self.store).await;
                self.signal(&reported, &answer);
            }
            Err(err) => self.heartbeat_failed(&err),
        }
    }

    /// Every running attempt, with the progress its handler reported since the last beat.
    fn running_now(&self) -> Vec<Reported> {
        self.shared
            .running()
            .iter()
            .map(|(id, entry)| {
                let progress = entry
                    .progress
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                (id.clone(), entry.attempt, progress)
            })
            .collect()
    }

    /// Tells the handlers of cancelled tasks to stop (once), and stops those whose lease is
    /// lost; positions in `answer` index `reported`.
    fn signal(&self, reported: &[Reported], answer: &store::Heartbeat) {
        let shared = &self.shared;
        let mut running = shared.running();
        for &position in &answer.cancel {
            let (id, attempt, _) = &reported[position];
            if let Some(entry) = running.get_mut(id)
                && entry.attempt == *attempt
                && entry.cancelled_at.is_none()
            {
                info!(task_id = %id, attempt, worker_id = %shared.worker_id, "Task cancelled; signalling its handler.");
                entry.cancel.cancel();
                entry.cancelled_at = Some(Instant::now());
            }
        }
        for &position in &answer.lost {
            let (id, attempt, _) = &reported[position];
            if let Some(entry) = running.get_mut(id)
                && entry.attempt == *attempt
            {
                warn!(task_id = %id, attempt, worker_id = %shared.worker_id, "Lease lost; stopping the handler.");
                fleet_common::telemetry::metrics::leases_lost().increment(1);
                entry.cancel.cancel();
                entry.lost = true;
            }
        }
    }

    /// After a whole lease without a heartbeat every lease has expired: stops all handlers
    /// rather than run as a zombie whose results will be fenced anyway.
    fn heartbeat_failed(&self, err: &store::StoreError) {
        warn!(error = %err, "Heartbeat failed.");
        if self.last_ok.elapsed() <= self.shared.settings.lease.lease() {
            return;
        }
        let mut running = self.shared.running();
        for (id, entry) in running.iter_mut() {
            if !entry.lost {
                warn!(task_id = %id, attempt = entry.attempt, "No heartbeat for a whole lease; stopping the handler.");
                entry.cancel.cancel();
                entry.lost = true;
            }
        }
    }
}

/// Aborts the handlers whose lease was lost at the previous beat and that have not stopped
/// since.
fn abort_lost(shared: &Shared) {
    shared.running().retain(|id, entry| {
        if entry.lost {
            if let Some(handler) = &entry.handler {
                handler.abort();
            }
            warn!(task_id = %id, attempt = entry.attempt, "Handler aborted after losing its lease.");
        }
        !entry.lost
    });
}

/// Aborts the handlers of cancelled tasks that outlived the cancel grace period. Each attempt's
/// end is reported exactly once: an aborted handler is reported as cancelled (the completer
/// records it and frees its slot) once its task has stopped, but a handler that ended by
/// itself meanwhile (an abort cannot stop code that never yields) has reported its own outcome.
fn abort_cancelled(shared: &Shared, done: &mpsc::UnboundedSender<Finished>) {
    let grace = shared.settings.worker.cancel_grace();
    let mut running = shared.running();
    for (id, entry) in running.iter_mut() {
        let overdue = entry.cancelled_at.is_some_and(|at| at.elapsed() >= grace);
        if overdue && let Some(handler) = entry.handler.take() {
            handler.abort();
            warn!(task_id = %id, attempt = entry.attempt, worker_id = %shared.worker_id, "Cancelled handler did not stop within the grace period; aborted.");
            let finished = Finished {
                id: id.clone(),
                attempt: entry.attempt,
                outcome: Outcome::Cancelled,
                follow_ups: Vec::new(),
                started: entry.started,
                metrics: entry.metrics.clone(),
                placed: entry.placed,
            };
            let done = done.clone();
            tokio::spawn(async move {
                if handler.await.is_err_and(|err| err.is_cancelled()) {
                    let _ = done.send(finished);
                }
            });
        }
    }
}
