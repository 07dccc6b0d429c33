//! Handlers shipped with `fleet-worker` for demos, tests and benchmarks.
//!
//! | kind | payload | does |
//! |---|---|---|
//! | `noop` | anything | returns `null` at once |
//! | `echo` | anything | returns the payload |
//! | `sleep` | `{"ms": N}` | waits N ms in ten steps, reporting progress (stops early when cancelled) |
//! | `fail` | `{"message": "…", "retryable": bool}` | fails with that message |
//! | `flaky` | `{"failures": N}` | fails (retryably) on attempts 1..=N, then succeeds |
//! | `crash` | anything | aborts the whole worker process (a poison task) |

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::handler::{HandlerError, HandlerResult, Registry, TaskContext};

/// A registry holding every built-in handler.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    registry
        .register("noop", noop)
        .register("echo", echo)
        .register("sleep", sleep)
        .register("fail", fail)
        .register("flaky", flaky)
        .register("crash", crash);
    registry
}

async fn noop(_ctx: TaskContext) -> HandlerResult {
    Ok(Value::Null)
}

async fn echo(ctx: TaskContext) -> HandlerResult {
    ctx.payload::<Value>()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepPayload {
    ms: u64,
}

async fn sleep(ctx: TaskContext) -> HandlerResult {
    let SleepPayload { ms } = ctx.payload()?;
    // Ten steps, reporting progress after each, so it shows up in the task's status.
    let step = Duration::from_millis(ms) / 10;
    for done in 1..=10u8 {
        tokio::select! {
            () = tokio::time::sleep(step) => {
                ctx.progress(done * 10, format!("slept {} of {ms} ms", step.as_millis() * u128::from(done)));
            }
            () = ctx.cancelled() => return Err(HandlerError::retryable("sleep interrupted")),
        }
    }
    Ok(serde_json::json!({ "slept_ms": ms }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailPayload {
    #[serde(default = "default_message")]
    message: String,
    #[serde(default)]
    retryable: bool,
}

fn default_message() -> String {
    "failed on purpose".into()
}

async fn fail(ctx: TaskContext) -> HandlerResult {
    let FailPayload { message, retryable } = ctx.payload()?;
    Err(HandlerError { message, retryable })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlakyPayload {
    failures: u32,
}

async fn flaky(ctx: TaskContext) -> HandlerResult {
    let FlakyPayload { failures } = ctx.payload()?;
    if ctx.attempt <= failures {
        return Err(HandlerError::retryable(format!(
            "flaky: attempt {} of {} planned failures",
            ctx.attempt, failures
        )));
    }
    Ok(serde_json::json!({ "succeeded_on_attempt": ctx.attempt }))
}

async fn crash(ctx: TaskContext) -> HandlerResult {
    tracing::error!(task_id = %ctx.id, attempt = ctx.attempt, "Crash task: aborting the worker process.");
    std::process::abort();
}
