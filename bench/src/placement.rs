//! The placement run: placed tasks (each asking for a little CPU, so the dispatcher chooses
//! its worker and reserves it) through the same stack as (a), submitted at once and then at a
//! fixed rate. Reports tasks/s through placement, the dispatcher's decision latency (accepted →
//! placed, by Redis's clock) at p50 and p99, and Redis's CPU and commands per placed task, to
//! set beside (a)'s streamed tasks.

use std::time::{Duration, Instant};

use fleet_common::task::State;
use serde_json::{Value, json};

use crate::stack::{Stack, now_ms, percentile, redis_usage, task_times};

/// Submission JSON of `n` placed no-op tasks named `<prefix><i>`.
fn placed(prefix: &str, n: usize) -> (Vec<String>, Vec<String>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let bodies = ids
        .iter()
        .map(|id| format!(r#"{{"id":"{id}","kind":"noop","resources":{{"cpu":0.01}}}}"#))
        .collect();
    (ids, bodies)
}

/// Accepted → placed and accepted → finished of each task, by Redis's clock.
async fn decision_times(stack: &Stack, ids: &[String]) -> anyhow::Result<(Vec<u64>, u64)> {
    let rows = task_times(
        &stack.store,
        ids,
        &["created_ms", "placed_ms", "finished_ms"],
    )
    .await?;
    let mut decided = Vec::with_capacity(ids.len());
    let mut last_finish = 0;
    for row in rows {
        if let (Some(created), Some(placed)) = (row[0], row[1]) {
            decided.push(placed.saturating_sub(created));
        }
        last_finish = last_finish.max(row[2].unwrap_or(0));
    }
    decided.sort_unstable();
    Ok((decided, last_finish))
}

fn summary(decided: &[u64]) -> Value {
    json!({
        "p50_ms": percentile(decided, 50.0),
        "p99_ms": percentile(decided, 99.0),
        "max_ms": decided.last().copied().unwrap_or(0),
    })
}

/// `n` placed tasks at once, then `rate`/s for `secs` seconds.
pub(crate) async fn placement(
    stack: &Stack,
    n: usize,
    rate: u64,
    secs: u64,
) -> anyhow::Result<Value> {
    let (ids, bodies) = placed("p", n);
    let (commands_before, cpu_before) = redis_usage(&stack.store).await?;
    let start_ms = now_ms();
    stack.submit(&bodies).await?;
    stack
        .wait_count(State::Succeeded, n as u64, Duration::from_secs(600))
        .await?;
    let (commands_after, cpu_after) = redis_usage(&stack.store).await?;
    let (decided, last) = decision_times(stack, &ids).await?;
    let seconds = last.saturating_sub(start_ms) as f64 / 1000.0;
    let burst = json!({
        "tasks": n,
        "seconds": seconds,
        "tasks_per_s": n as f64 / seconds.max(0.001),
        "decision": summary(&decided),
        "redis_commands_per_task": (commands_after - commands_before) as f64 / n as f64,
        "redis_cpu_us_per_task": (cpu_after - cpu_before) * 1e6 / n as f64,
    });

    // A fixed rate: what a decision costs when the dispatcher is not behind.
    let total = (rate * secs) as usize;
    let (ids, bodies) = placed("r", total);
    let before = stack.count(State::Succeeded).await?;
    let began = Instant::now();
    stack.submit_paced(&bodies, rate).await?;
    stack
        .wait_count(
            State::Succeeded,
            before + total as u64,
            Duration::from_secs(300),
        )
        .await?;
    let (decided, _) = decision_times(stack, &ids).await?;
    Ok(json!({
        "burst": burst,
        "paced": {
            "rate": rate,
            "seconds": began.elapsed().as_secs_f64(),
            "tasks": total,
            "decision": summary(&decided),
        },
    }))
}
