//! Handlers shipped with `fleet-worker` for demos, tests and benchmarks.
//!
//! | kind | payload | does |
//! |---|---|---|
//! | `noop` | anything | returns `null` at once |
//! | `echo` | anything | returns the payload |
//! | `sleep` | `{"ms": N, "ignore_cancel": bool}` | waits N ms in ten steps, reporting progress; stops early when cancelled unless `ignore_cancel` (then only an abort stops it) |
//! | `block` | `{"ms": N}` | blocks its thread for N ms, deaf to cancellation and aborts (a hung handler) |
//! | `fail` | `{"message": "…", "retryable": bool}` | fails with that message |
//! | `flaky` | `{"failures": N}` | fails (retryably) on attempts 1..=N, then succeeds |
//! | `crash` | anything | aborts the whole worker process (a poison task) |
//! | `panic` | `{"message": "…"}` | panics (caught by the worker: a retryable failure) |
//! | `spawn` | `{"count": N, "kind": "…", "ms": M, "random_ids": bool, "after": [ids]}` | waits M ms, then returns with N follow-up tasks of that kind (`ctx.spawn`), named `<id>.<n>` or, with `random_ids`, a fresh id each attempt, depending on `after` |
//! | `gather` | `{"ms": N}` (optional) | waits N ms, then returns how each parent (`depends_on`) ended: `{"parents": [{"id", "state", "result", "error"}…]}` |

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
        .register("crash", crash)
        .register("panic", panic)
        .register("block", block)
        .register("gather", gather)
        .register("spawn", spawn);
    registry
}

/// Other fields are ignored (a follow-up's payload names its spawner).
#[derive(Deserialize, Default)]
struct GatherPayload {
    #[serde(default)]
    ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpawnPayload {
    count: usize,
    #[serde(default = "default_spawn_kind")]
    kind: String,
    #[serde(default)]
    ms: u64,
    #[serde(default)]
    random_ids: bool,
    /// Tasks each follow-up depends on.
    #[serde(default)]
    after: Vec<String>,
}

fn default_spawn_kind() -> String {
    "noop".into()
}

/// A fan-out step: succeeds with `count` follow-up tasks.
async fn spawn(ctx: TaskContext) -> HandlerResult {
    let SpawnPayload {
        count,
        kind,
        ms,
        random_ids,
        after,
    } = ctx.payload()?;
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    for n in 0..count {
        let mut task = serde_json::json!({"kind": kind, "payload": {"spawner": &*ctx.id, "n": n}});
        if random_ids {
            task["id"] = Value::String(fleet_common::task::new_task_id());
        }
        if !after.is_empty() {
            task["depends_on"] = serde_json::json!(after);
        }
        ctx.spawn(task);
    }
    Ok(serde_json::json!({ "spawned": count }))
}

/// A fan-in step: reads its parents' outcomes (`ctx.parents()`) and returns them.
async fn gather(ctx: TaskContext) -> HandlerResult {
    let GatherPayload { ms } = if ctx.raw_payload() == "null" {
        GatherPayload::default()
    } else {
        ctx.payload()?
    };
    if ms > 0 {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(ms)) => {}
            () = ctx.cancelled() => return Err(HandlerError::retryable("gather interrupted")),
        }
    }
    let parents = ctx.parents().await?;
    Ok(serde_json::json!({ "parents": parents }))
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
    #[serde(default)]
    ignore_cancel: bool,
}

async fn sleep(ctx: TaskContext) -> HandlerResult {
    let SleepPayload { ms, ignore_cancel } = ctx.payload()?;
    // Ten steps, reporting progress after each, so it shows up in the task's status.
    let step = Duration::from_millis(ms) / 10;
    for done in 1..=10u8 {
        tokio::select! {
            () = tokio::time::sleep(step) => {
                ctx.progress(done * 10, format!("slept {} of {ms} ms", step.as_millis() * u128::from(done)));
            }
            () = ctx.cancelled(), if !ignore_cancel => return Err(HandlerError::retryable("sleep interrupted")),
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockPayload {
    ms: u64,
}

/// Blocks a runtime thread without yielding: neither the worker's timeout nor an abort can
/// stop it, only the reaper's hard deadline can take the task away.
async fn block(ctx: TaskContext) -> HandlerResult {
    let BlockPayload { ms } = ctx.payload()?;
    std::thread::sleep(Duration::from_millis(ms));
    Ok(serde_json::json!({ "blocked_ms": ms }))
}

async fn panic(ctx: TaskContext) -> HandlerResult {
    let FailPayload { message, .. } = ctx.payload()?;
    panic!("{message}");
}
