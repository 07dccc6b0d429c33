//! Fleet's shared foundation, used by the scheduler, the workers, the reaper and `fleetctl`.
//!
//! # Layout
//! - [`cli`]: the `--config` / `--check-config` arguments of every service.
//! - [`settings`]: typed settings with defaults → TOML file → `FLEET__*` environment layering.
//! - [`priority`]: the four priority levels.
//! - [`task`]: the submission format, the stored record, the envelope, the states.
//! - [`topics`]: every Kafka topic name.
//! - [`wire`]: every Kafka record Fleet writes (envelope, rejected, dead letter) and its headers.
//! - [`kafka`]: producer/consumer/admin configuration and topic creation.
//! - [`membership`]: group consumers whose assignment is logged, measured and watched.
//! - [`placement`]: what tasks need and workers offer, and the choice of a worker.
//! - [`flow`]: concurrency and rate limits, tenant quotas and fair-share weights.
//! - [`workflow`]: dependencies between tasks (`depends_on`) and workflows.
//! - [`schedule`]: cron and interval schedules that submit tasks.
//! - [`store`]: the Redis key schema, Lua scripts and connection.
//! - [`dependency`]: calling a dependency that is briefly away until it answers.
//! - [`telemetry`]: `tracing` set-up.
//! - [`shutdown`]: signal handling and the drain-with-deadline supervisor.

pub mod cli;
pub mod dependency;
pub mod flow;
pub mod kafka;
pub mod membership;
pub mod ops;
pub mod otlp;
pub mod placement;
pub mod priority;
pub mod schedule;
pub mod settings;
pub mod shutdown;
pub mod store;
pub mod task;
pub mod telemetry;
pub mod topics;
pub mod trace;
pub mod wire;
pub mod workflow;

pub use priority::Priority;
pub use topics::Topics;
