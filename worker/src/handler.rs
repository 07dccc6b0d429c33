//! The handler contract: what a task's code receives and returns, and the registry that maps a
//! task `kind` to its handler.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use fleet_common::store::ParentOutcome;
use fleet_common::store::Store;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

/// Why an attempt failed. Retryable failures are tried again (with backoff) while attempts
/// remain; permanent ones fail the task at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    pub message: String,
    pub retryable: bool,
}

impl HandlerError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
}

/// What a handler returns: a JSON result, or why it failed.
pub type HandlerResult = Result<serde_json::Value, HandlerError>;

/// Everything a handler gets for one attempt of one task.
#[derive(Clone)]
pub struct TaskContext {
    pub id: Arc<str>,
    /// The attempt number: pass it to side effects as a fencing token
    /// (`Idempotency-Key: <id>:<attempt>`) so a stale attempt cannot overwrite a newer one.
    pub attempt: u32,
    pub kind: Arc<str>,
    pub worker_id: Arc<str>,
    payload: Arc<RawValue>,
    cancel: CancellationToken,
    progress: ProgressSlot,
    /// Where its parents' outcomes are read from, when it has parents.
    parents: Option<(Store, Arc<[String]>)>,
    /// Follow-up tasks to create with its success (`spawn`).
    spawned: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl std::fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskContext")
            .field("id", &self.id)
            .field("attempt", &self.attempt)
            .field("kind", &self.kind)
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

/// The latest progress a handler reported and the worker has not yet sent to Redis.
pub type ProgressSlot = Arc<std::sync::Mutex<Option<Progress>>>;

/// A handler's progress: a percentage and a short message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub percent: u8,
    pub message: String,
}

/// Longest progress message kept.
pub const MAX_PROGRESS_MESSAGE: usize = 200;

impl TaskContext {
    pub fn new(
        id: Arc<str>,
        attempt: u32,
        kind: Arc<str>,
        worker_id: Arc<str>,
        payload: Arc<RawValue>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            id,
            attempt,
            kind,
            worker_id,
            payload,
            cancel,
            progress: ProgressSlot::default(),
            parents: None,
            spawned: Arc::default(),
        }
    }

    /// Adds a follow-up task (a submission, as on the submit topic) to create when this attempt
    /// succeeds. Follow-ups are recorded in the same Redis call as the success: if the worker
    /// dies before, the attempt runs again and its follow-ups with it; after, both exist exactly
    /// once. Without an `id`, the n-th follow-up is `<this task's id>.<n>`. A follow-up may
    /// depend on another follow-up or on a stored task. Invalid follow-ups fail the attempt
    /// (permanently), with the reason; an attempt that fails or retries creates none.
    pub fn spawn(&self, task: serde_json::Value) {
        self.spawned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(task);
    }

    /// The follow-ups added so far (taken: the worker calls this once, after the handler).
    pub fn take_spawned(&self) -> Vec<serde_json::Value> {
        std::mem::take(
            &mut *self
                .spawned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Lets the handler read how the task's parents (`depends_on`) ended.
    pub fn with_parents(mut self, store: Store, parents: Vec<String>) -> Self {
        self.parents = Some((store, parents.into()));
        self
    }

    /// How each of the task's parents (`depends_on`, in that order) ended: state, result (a
    /// succeeded parent's JSON) or error. Empty for a task without parents. A parent's result
    /// is at most `tasks.max_result_bytes`, and kept until every task depending on it has ended.
    /// A task runs after parents that did not all succeed only with `on_parent_failure: run`.
    /// Reading fails (retryably) only when Redis cannot be reached.
    pub async fn parents(&self) -> Result<Vec<ParentOutcome>, HandlerError> {
        let Some((store, ids)) = &self.parents else {
            return Ok(Vec::new());
        };
        store
            .parent_outcomes(ids)
            .await
            .map_err(|e| HandlerError::retryable(format!("reading the parents' results: {e}")))
    }

    /// The slot the worker reads progress from (shared with its running-task entry).
    pub fn progress_slot(&self) -> ProgressSlot {
        self.progress.clone()
    }

    /// Reports progress (0–100, clamped) and a short message. Cheap: it is stored with the task
    /// by the next heartbeat, so frequent calls cost nothing extra.
    pub fn progress(&self, percent: u8, message: impl Into<String>) {
        let mut message: String = message.into();
        if message.len() > MAX_PROGRESS_MESSAGE {
            let mut end = MAX_PROGRESS_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let update = Progress {
            percent: percent.min(100),
            message,
        };
        *self
            .progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(update);
    }

    /// The payload as raw JSON text.
    pub fn raw_payload(&self) -> &str {
        self.payload.get()
    }

    /// The payload parsed into `T`; a payload of the wrong shape is a permanent failure.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_str(self.payload.get()).map_err(|e| {
            HandlerError::permanent(format!("payload does not fit kind `{}`: {e}", self.kind))
        })
    }

    /// Resolves when the attempt should stop: its lease was lost, the task was cancelled, it
    /// timed out, or the worker is shutting down. Long handlers should select on it.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// A boxed handler future.
pub type HandlerFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send + 'static>>;

/// Runs one kind of task. Implemented for every `Fn(TaskContext) -> impl Future<…>`.
pub trait Handler: Send + Sync + 'static {
    fn call(&self, ctx: TaskContext) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn call(&self, ctx: TaskContext) -> HandlerFuture {
        Box::pin(self(ctx))
    }
}

/// Handlers by task kind.
#[derive(Default, Clone)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn Handler>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.handlers.keys()).finish()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for tasks of `kind`, replacing any earlier one.
    pub fn register(&mut self, kind: impl Into<String>, handler: impl Handler) -> &mut Self {
        self.handlers.insert(kind.into(), Arc::new(handler));
        self
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(kind).cloned()
    }

    /// The registered kinds, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        let mut kinds: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        kinds.sort_unstable();
        kinds
    }
}
