//! The handler contract: what a task's code receives and returns, and the registry that maps a
//! task `kind` to its handler.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

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
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub id: Arc<str>,
    /// The attempt number: pass it to side effects as a fencing token
    /// (`Idempotency-Key: <id>:<attempt>`) so a stale attempt cannot overwrite a newer one.
    pub attempt: u32,
    pub kind: Arc<str>,
    pub worker_id: Arc<str>,
    payload: Arc<RawValue>,
    cancel: CancellationToken,
}

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
        }
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
