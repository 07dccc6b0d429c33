//! Running a claimed attempt's handler (timeout, panics, error size) and recording outcomes in
//! batches.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_common::dependency::keep_trying;
use fleet_common::otlp;
use fleet_common::store::{Completion, NewTask, Outcome, Store};
use fleet_common::task::TaskSpec;
use fleet_common::trace::TraceParent;
use fleet_common::wire::Envelope;
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::{debug, info, warn};

use super::{Finished, Running, Shared};
use crate::handler::{Handler, HandlerError, Registry, TaskContext};
use crate::settings::WorkerSettings;

/// A claimed attempt whose start is logged and recorded, and whose handler is ready to spawn.
pub(super) struct Launch<F> {
    id: Arc<str>,
    attempt: u32,
    run: F,
}

impl<F: Future<Output = ()> + Send + 'static> Launch<F> {
    /// Runs the handler on its own task.
    pub(super) fn spawn(self, shared: &Shared) {
        let handler = tokio::spawn(self.run);
        if let Some(entry) = shared.running().get_mut(&self.id)
            && entry.attempt == self.attempt
        {
            entry.handler = Some(handler);
        }
    }
}

/// Logs the start of a claimed attempt, records it as running, and returns its handler ready
/// to spawn. The caller spawns it only once the log line is out (see `Claimer`).
pub(super) fn prepare(
    shared: &Arc<Shared>,
    registry: &Registry,
    envelope: &Envelope,
    (published_ms, trace): (Option<i64>, Option<&TraceParent>),
    slot: tokio::sync::OwnedSemaphorePermit,
    done: mpsc::UnboundedSender<Finished>,
) -> Launch<impl Future<Output = ()> + Send + 'static + use<>> {
    let task = &envelope.task;
    let metrics = shared.metrics.task(&task.kind, task.priority);
    metrics.started();
    if let Some(published) = published_ms {
        record_queue_wait(shared, envelope, published);
    }
    let id: Arc<str> = task.id.as_str().into();
    let attempt = envelope.attempt;
    let cancel = CancellationToken::new();
    let mut ctx = TaskContext::new(
        id.clone(),
        attempt,
        Arc::clone(&metrics.kind),
        shared.worker_id.clone(),
        Arc::from(task.payload.clone()),
        cancel.clone(),
    );
    if !task.depends_on.is_empty() {
        ctx = ctx.with_parents(shared.store.clone(), task.depends_on.clone());
    }
    let span = log_start(shared, &id, attempt, &task.kind, trace);
    let started = Instant::now();
    register(
        shared,
        &id,
        Running {
            attempt,
            cancel: cancel.clone(),
            handler: None,
            started,
            lost: false,
            cancelled_at: None,
            progress: ctx.progress_slot(),
            metrics: Arc::clone(&metrics),
            placed: task.is_placed(),
            _slot: slot,
        },
    );

    let call = HandlerCall {
        handler: registry.get(&task.kind),
        timeout: match task.timeout_ms {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        },
        cancel,
        // For the retry delay; the settings are shared, not copied per task.
        settings: Arc::clone(&shared.settings),
    };
    // The attempt's own span in the task's trace, exported when OTLP export is on.
    let exported = trace
        .filter(|_| otlp::enabled())
        .map(|trace| (trace.child(), otlp::now_ns(), shared.worker_id.clone()));
    let task_id = id.clone();
    let placed = task.is_placed();
    let settings = Arc::clone(&shared.settings);
    let run = async move {
        let spawner = ctx.clone();
        let mut outcome = call.run(ctx, attempt).await;
        let follow_ups = match &outcome {
            Outcome::Ok(_) => match follow_ups(&spawner, &task_id, &settings) {
                Ok(tasks) => tasks,
                Err(why) => {
                    outcome = Outcome::Fail(why);
                    Vec::new()
                }
            },
            _ => Vec::new(),
        };
        if let Some((span, start_ns, worker_id)) = exported {
            export_attempt(
                span,
                start_ns,
                (&task_id, attempt),
                &metrics.kind,
                &worker_id,
                &outcome,
            );
        }
        let _ = done.send(Finished {
            id: task_id,
            attempt,
            outcome,
            follow_ups,
            started,
            metrics,
            placed,
        });
    }
    .instrument(span);
    Launch { id, attempt, run }
}

/// Records how long the attempt waited from its envelope's publication to its start, in the
/// metrics and the dashboard's series.
fn record_queue_wait(shared: &Shared, envelope: &Envelope, published_ms: i64) {
    let task = &envelope.task;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let wait_ms = (now - published_ms).max(0) as u64;
    shared
        .metrics
        .queue_wait(task.priority)
        .record(wait_ms as f64 / 1000.0);
    shared
        .waits()
        .record(now as u64, &task.queue, task.priority, wait_ms);
}

/// Logs "Handler started." and returns the handler's span: its logs carry the task, the
/// attempt, the worker and the trace of the request that created the task.
fn log_start(
    shared: &Shared,
    task_id: &str,
    attempt: u32,
    kind: &str,
    trace: Option<&TraceParent>,
) -> tracing::Span {
    let trace_id = trace.map_or("", TraceParent::trace_id);
    let worker = &*shared.worker_id;
    // Fields are passed as `&str`, not with `%`: a string is written as it is, where a
    // `Display` value goes through the formatting machinery (one span and one line per task).
    // The line carries the span's fields itself, so it is logged outside the span: the JSON
    // layer would otherwise write each field twice.
    info!(parent: None, task_id, attempt, kind, worker_id = worker, trace_id, "Handler started.");
    tracing::info_span!("task", task_id, attempt, kind, worker_id = worker, trace_id)
}

/// Records the attempt as running. An older attempt of the same task still running here is
/// fenced and stopped: Redis gave the task a newer attempt, and this worker claimed it, while
/// the older one ran (its lease lapsed while Redis was out of reach, before a heartbeat could
/// tell), and it must not run beside the new one.
fn register(shared: &Shared, id: &Arc<str>, running: Running) {
    let Some(older) = shared.running().insert(id.clone(), running) else {
        return;
    };
    warn!(
        task_id = &**id,
        attempt = older.attempt,
        worker_id = &*shared.worker_id,
        "A newer attempt was claimed; stopping this one's handler."
    );
    fleet_common::telemetry::metrics::leases_lost().increment(1);
    older.cancel.cancel();
    if let Some(handler) = &older.handler {
        handler.abort();
    }
}

/// A handler to call for one attempt, with what turns its end into an [`Outcome`].
struct HandlerCall {
    handler: Option<Arc<dyn Handler>>,
    timeout: Option<Duration>,
    cancel: CancellationToken,
    settings: Arc<WorkerSettings>,
}

impl HandlerCall {
    /// Runs the handler to its outcome: its value, a retry (a retryable error, a timeout or a
    /// panic, after the backoff of `attempt`) or a failure (a permanent error, no handler).
    async fn run(self, ctx: TaskContext, attempt: u32) -> Outcome {
        let run = async {
            let Some(handler) = self.handler else {
                return Err(HandlerError::permanent(format!(
                    "no handler is registered for kind `{}`",
                    ctx.kind
                )));
            };
            match self.timeout {
                None => handler.call(ctx).await,
                Some(limit) => match tokio::time::timeout(limit, handler.call(ctx)).await {
                    Ok(result) => result,
                    Err(_) => {
                        self.cancel.cancel();
                        Err(HandlerError::retryable(format!(
                            "timeout after {} ms",
                            limit.as_millis()
                        )))
                    }
                },
            }
        };
        let retry = |error: String| Outcome::Retry {
            error: clip(error),
            delay_ms: self
                .settings
                .tasks
                .retry_delay_ms(attempt, rand::random::<f64>()),
        };
        match AssertUnwindSafe(run).catch_unwind().await {
            Ok(Ok(value)) => {
                let json = value.to_string();
                let max = self.settings.tasks.max_result_bytes;
                if json.len() > max {
                    // Refused, not cut: a dependent task must read what the handler returned.
                    Outcome::Fail(format!(
                        "result is {} bytes, over the {max}-byte limit (tasks.max_result_bytes); \
                         store large results elsewhere and return a reference",
                        json.len()
                    ))
                } else {
                    Outcome::Ok(json)
                }
            }
            Ok(Err(err)) if err.retryable => retry(err.message),
            Ok(Err(err)) => Outcome::Fail(clip(err.message)),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(ToString::to_string)
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                retry(format!("handler panicked: {message}"))
            }
        }
    }
}

/// The follow-up tasks a handler added with `ctx.spawn`, validated as submissions are (a bad
/// one fails the attempt with the reason: nothing of it is created).
fn follow_ups(
    ctx: &TaskContext,
    spawner: &str,
    settings: &WorkerSettings,
) -> Result<Vec<NewTask>, String> {
    let specs = ctx.take_spawned();
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    let mut tasks = Vec::with_capacity(specs.len());
    for (n, spec) in specs.iter().enumerate() {
        let text = spec.to_string();
        let spec = TaskSpec::parse(text.as_bytes(), settings.tasks.max_task_bytes)
            .map_err(|err| format!("follow-up task {n} refused: {err}"))?;
        let task = NewTask::from_spec(spec, &settings.tasks, || {
            let id = format!("{spawner}.{n}");
            if id.len() <= fleet_common::task::MAX_NAME_LEN {
                id
            } else {
                fleet_common::task::new_task_id()
            }
        });
        tasks.push(task);
    }
    fleet_common::workflow::prepare_follow_ups(&mut tasks, spawner)
        .map_err(|err| format!("follow-up tasks refused: {err}"))?;
    Ok(tasks)
}

/// Exports the attempt's span, named for how it ended.
fn export_attempt(
    span: TraceParent,
    start_ns: u64,
    (task_id, attempt): (&str, u32),
    kind: &str,
    worker_id: &str,
    outcome: &Outcome,
) {
    let (name, error) = match outcome {
        Outcome::Ok(_) => ("succeeded", None),
        Outcome::Retry { error, .. } => ("retry", Some(error.clone())),
        Outcome::Fail(error) => ("failed", Some(error.clone())),
        Outcome::Cancelled => ("cancelled", None),
    };
    let mut exported = otlp::Span::of("task", otlp::SpanKind::Consumer, &span, start_ns)
        .attr("task_id", task_id)
        .attr("attempt", attempt)
        .attr("kind", kind)
        .attr("worker_id", worker_id)
        .attr("outcome", name);
    exported.error = error;
    otlp::record(exported);
}

/// Most bytes of a handler's error message that are recorded.
const ERROR_KEEP: usize = 8 * 1024;

/// `message` cut to [`ERROR_KEEP`] bytes on a character boundary.
fn clip(mut message: String) -> String {
    if message.len() > ERROR_KEEP {
        let mut end = ERROR_KEEP;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str(" …(truncated)");
    }
    message
}

/// Records a success and its follow-up tasks in one call (retried until Redis answers; a
/// retry after a lost reply is answered `already`, and creates nothing twice).
async fn complete_spawning(
    shared: &Shared,
    store: &Store,
    finished: &Finished,
    never: &CancellationToken,
) -> Completion {
    let Outcome::Ok(result) = &finished.outcome else {
        return Completion::Fenced;
    };
    let answer = keep_trying(
        never,
        "recording a success with its follow-up tasks",
        || {
            store.complete_spawning(
                &shared.worker_id,
                (&finished.id, finished.attempt),
                result,
                finished.placed,
                &finished.follow_ups,
            )
        },
    )
    .await;
    match answer {
        Some((completion, accepted)) => {
            if completion == Completion::Succeeded {
                debug!(task_id = %finished.id, follow_ups = accepted.len(), "Follow-up tasks created with the success.");
            }
            completion
        }
        None => Completion::Fenced,
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
        // Successes with follow-ups go one by one, each with its follow-ups in one call.
        let plain: Vec<&Finished> = batch.iter().filter(|f| f.follow_ups.is_empty()).collect();
        let outcomes: Vec<((&str, u32), &Outcome)> = plain
            .iter()
            .map(|f| ((&*f.id, f.attempt), &f.outcome))
            .collect();
        let placed: Vec<bool> = plain.iter().map(|f| f.placed).collect();
        let never = CancellationToken::new();
        let mut plain_answers = keep_trying(&never, "recording task outcomes", || {
            store.complete_placed(&shared.worker_id, &outcomes, &placed)
        })
        .await
        .unwrap_or_default()
        .into_iter();
        let mut answers = Vec::with_capacity(batch.len());
        for finished in &batch {
            if finished.follow_ups.is_empty() {
                answers.extend(plain_answers.next());
            } else {
                answers.push(complete_spawning(&shared, &store, finished, &never).await);
            }
        }
        for (finished, answer) in batch.iter().zip(answers) {
            let elapsed_ms = finished.started.elapsed().as_millis() as u64;
            finished.metrics.ended(answer, finished.started.elapsed());
            let (id, attempt) = (&finished.id, finished.attempt);
            match (&finished.outcome, answer) {
                (_, Completion::Cancelled) => {
                    info!(task_id = %id, attempt, worker_id = %shared.worker_id, elapsed_ms, "Task cancelled.");
                }
                (_, Completion::Already) => {
                    debug!(task_id = %id, attempt, worker_id = %shared.worker_id, "Outcome already recorded.");
                }
                (_, Completion::Fenced) => {
                    warn!(task_id = %id, attempt, worker_id = %shared.worker_id, "Completion fenced: this attempt no longer owns the task.");
                }
                (Outcome::Ok(_), Completion::Failed) => {
                    warn!(task_id = %id, attempt, worker_id = %shared.worker_id, "Task failed: its follow-up tasks were refused (see its error).");
                }
                (Outcome::Ok(_), _) => {
                    // Debug, not info: with "Handler started." that made two lines per task,
                    // and formatting and writing them was a fifth of a worker's CPU at full
                    // load. The success is in Redis and in the metrics.
                    debug!(task_id = %id, attempt, worker_id = %shared.worker_id, elapsed_ms, "Task succeeded.");
                }
                (Outcome::Retry { error, delay_ms }, Completion::Scheduled) => {
                    info!(task_id = %id, attempt, worker_id = %shared.worker_id, error = %error, retry_in_ms = delay_ms, "Attempt failed; retry scheduled.");
                }
                (Outcome::Retry { error, .. } | Outcome::Fail(error), _) => {
                    warn!(task_id = %id, attempt, worker_id = %shared.worker_id, error = %error, "Task failed.");
                }
                (Outcome::Cancelled, _) => {
                    warn!(task_id = %id, attempt, worker_id = %shared.worker_id, "Aborted handler's cancellation not recorded.");
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
