//! The Fleet worker runtime as a library: write handlers, register them by task kind, run a
//! [`Worker`]. The stock `fleet-worker` binary runs it with the [`builtin`] handlers.
//!
//! ```no_run
//! use fleet_worker::{HandlerError, Registry, TaskContext, Worker};
//!
//! async fn resize(ctx: TaskContext) -> Result<serde_json::Value, HandlerError> {
//!     #[derive(serde::Deserialize)]
//!     struct Job { url: String }
//!     let job: Job = ctx.payload()?;
//!     Ok(serde_json::json!({ "resized": job.url }))
//! }
//!
//! # async fn example(settings: fleet_worker::settings::WorkerSettings) {
//! let mut registry = Registry::new();
//! registry.register("resize", resize);
//! let token = tokio_util::sync::CancellationToken::new();
//! Worker::new(settings, registry).run(token).await.unwrap();
//! # }
//! ```

pub mod builtin;
pub mod capacity;
pub mod handler;
pub mod runtime;
pub mod settings;

pub use handler::{Handler, HandlerError, HandlerResult, ParentOutcome, Registry, TaskContext};
pub use runtime::{Worker, WorkerError};
