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

async fn keep_leases(
    shared: Arc<Shared>,
    kinds: String,
    done: mpsc::UnboundedSender<Finished>,
    token: CancellationToken,
) {
    let settings = &shared.settings;
    let store = loop {
        match store::connect(&settings.redis).await {
            Ok(conn) => {
                break Store::new(
                    conn,
                    store::Keys::new(&settings.redis.key_prefix),
                    &settings.tasks,
                );
            }
            Err(err) => {
                warn!(error = %err, "Lease keeper cannot reach Redis yet.");
                tokio::select! {
                    () = token.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let started_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut info = WorkerInfo {
        host: crate::settings::host_name().unwrap_or_default(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        concurrency: settings.worker.concurrency,
        group: settings.worker.group_id.clone(),
        kinds,
        // Queues share the priority topics, so every worker serves every queue.
        queues: vec!["*".to_string()],
        started_ms,
        partitions: Default::default(),
    };
    let lease = settings.lease.lease();
    let mut last_ok = Instant::now();
    let mut tick = tokio::time::interval(settings.lease.heartbeat());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = token.cancelled() => {
                flush_waits(&shared, &store).await;
                return;
            }
            _ = tick.tick() => {}
        }
        // Handlers whose lease was lost at the previous beat and that have not stopped yet.
        shared.running().retain(|id, entry| {
            if entry.lost {
                if let Some(handler) = &entry.handler {
                    handler.abort();
                }
                warn!(task_id = %id, attempt = entry.attempt, "Handler aborted after losing its lease.");
            }
            !entry.lost
        });
        abort_cancelled(&shared, &done);
        let snapshot: Vec<(Arc<str>, u32, Option<Progress>)> = shared
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
            .collect();
        let refs: Vec<store::Beat<'_>> = snapshot
            .iter()
            .map(|(id, a, p)| {
                (
                    &**id,
                    *a,
                    p.as_ref().map(|p| (p.percent, p.message.as_str())),
                )
            })
            .collect();
        info.partitions = Priority::ALL
            .into_iter()
            .zip(shared.assignment().iter())
            .map(|(p, owned)| (p.as_str().to_string(), owned.clone()))
            .collect();
        let info_text = serde_json::to_string(&info).unwrap_or_default();
        match store
            .extend(
                &shared.worker_id,
                settings.lease.lease_ms,
                &info_text,
                &refs,
            )
            .await
        {
            Ok(beat) => {
                last_ok = Instant::now();
                flush_waits(&shared, &store).await;
                let mut running = shared.running();
                for position in beat.cancel {
                    let (id, attempt, _) = &snapshot[position];
                    if let Some(entry) = running.get_mut(id)
                        && entry.attempt == *attempt
                        && entry.cancelled_at.is_none()
                    {
                        info!(task_id = %id, attempt, worker_id = %shared.worker_id, "Task cancelled; signalling its handler.");
                        entry.cancel.cancel();
                        entry.cancelled_at = Some(Instant::now());
                    }
                }
                for position in beat.lost {
                    let (id, attempt, _) = &snapshot[position];
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
            Err(err) => {
                warn!(error = %err, "Heartbeat failed.");
                if last_ok.elapsed() > lease {
                    // Every lease has expired by now: stop all handlers rather than run as a
                    // zombie whose results will be fenced anyway.
                    let mut running = shared.running();
                    for (id, entry) in running.iter_mut() {
                        if !entry.lost {
                            warn!(task_id = %id, attempt = entry.attempt, "No heartbeat for a whole lease; stopping the handler.");
                            entry.cancel.cancel();
                            entry.lost = true;
                        }
                    }
                }
            }
        }
    }
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
                started: entry.started,
                metrics: entry.metrics.clone(),
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
