//! The flow-control run: placed tasks of which half carry a binding concurrency limit and a
//! binding rate limit, beside the same number with no limit. Reports the unlimited half's
//! tasks/s next to a run of it alone (limits must not slow what they do not limit), the limited
//! half's observed start rate against its limit, and Redis's CPU and commands per task for
//! tasks whose limits are checked but never bind, against tasks with none.

use std::time::Duration;

use fleet_common::flow::{Limit, Scope};
use fleet_common::task::State;
use serde_json::{Value, json};

use crate::stack::{Stack, now_ms, redis_usage};

/// Submission JSON of `n` placed no-op tasks named `<prefix><i>`, with `extra` fields.
fn tasks(prefix: &str, n: usize, extra: &str) -> (Vec<String>, Vec<String>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let bodies = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let extra = extra.replace("{i}", &(i % 100).to_string());
            format!(r#"{{"id":"{id}","kind":"noop"{extra}}}"#)
        })
        .collect();
    (ids, bodies)
}

/// Each task's start (`started_ms`, else its `created_ms` if it never ran) and end, by Redis's
/// clock.
async fn times(stack: &Stack, ids: &[String]) -> anyhow::Result<Vec<(u64, u64)>> {
    let keys = stack.store.keys();
    let mut conn = stack.store.conn();
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(1000) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("HMGET")
                .arg(keys.task(id))
                .arg(&["started_ms", "finished_ms"]);
        }
        let rows: Vec<(Option<u64>, Option<u64>)> = pipe.query_async(&mut conn).await?;
        out.extend(
            rows.into_iter()
                .map(|(s, f)| (s.unwrap_or(0), f.unwrap_or(0))),
        );
    }
    Ok(out)
}

/// Runs `bodies` and waits for `before + n` successes; returns tasks/s from `start` to the
/// last of `ids` to end, and Redis's (commands, CPU s) spent meanwhile.
async fn run(
    stack: &Stack,
    bodies: &[String],
    ids: &[String],
    wait_for: u64,
) -> anyhow::Result<(f64, u64, f64)> {
    let (commands, cpu) = redis_usage(&stack.store).await?;
    let start = now_ms();
    stack.submit(bodies).await?;
    stack
        .wait_count(State::Succeeded, wait_for, Duration::from_secs(600))
        .await?;
    let (commands_after, cpu_after) = redis_usage(&stack.store).await?;
    let last = times(stack, ids)
        .await?
        .iter()
        .map(|(_, f)| *f)
        .max()
        .unwrap_or(0);
    let seconds = last.saturating_sub(start) as f64 / 1000.0;
    Ok((
        ids.len() as f64 / seconds.max(0.001),
        commands_after - commands,
        cpu_after - cpu,
    ))
}

/// `n` unlimited placed tasks alone; `n` whose limits never bind; then `n` unlimited beside `n`
/// limited to `max_running` at once and `rate`/s.
pub(crate) async fn flow(
    stack: &Stack,
    n: usize,
    max_running: u64,
    rate: u32,
) -> anyhow::Result<Value> {
    let set = |scope, name: &str, limit: Limit| {
        let store = stack.store.clone();
        let name = name.to_string();
        async move { store.set_limit(scope, &name, Some(&limit)).await }
    };
    set(
        Scope::Key,
        "wide",
        Limit {
            max_running: Some(1_000_000),
            ..Limit::default()
        },
    )
    .await?;
    set(
        Scope::Rate,
        "wide",
        Limit {
            limit: Some(1_000_000),
            period_ms: Some(1000),
            burst: Some(1_000_000),
            ..Limit::default()
        },
    )
    .await?;
    set(
        Scope::Key,
        "narrow",
        Limit {
            max_running: Some(max_running),
            ..Limit::default()
        },
    )
    .await?;
    set(
        Scope::Rate,
        "narrow",
        Limit {
            limit: Some(rate),
            period_ms: Some(1000),
            burst: Some(rate / 10),
            ..Limit::default()
        },
    )
    .await?;
    // The schedulers read the limits each second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut done = stack.count(State::Succeeded).await?;

    let free = r#","concurrency_key":"free-{i}""#;
    let (ids, bodies) = tasks("alone-", n, free);
    done += n as u64;
    let (alone, commands, cpu) = run(stack, &bodies, &ids, done).await?;

    let (ids, bodies) = tasks(
        "checked-",
        n,
        r#","concurrency_key":"wide","rate_key":"wide""#,
    );
    done += n as u64;
    let (checked, checked_commands, checked_cpu) = run(stack, &bodies, &ids, done).await?;

    let (free_ids, free_bodies) = tasks("beside-", n, free);
    let (limited_ids, limited_bodies) = tasks(
        "limited-",
        n,
        r#","concurrency_key":"narrow","rate_key":"narrow""#,
    );
    let mut mixed: Vec<String> = Vec::with_capacity(2 * n);
    for (a, b) in free_bodies.into_iter().zip(limited_bodies) {
        mixed.push(b);
        mixed.push(a);
    }
    done += 2 * n as u64;
    let (beside, _, _) = run(stack, &mixed, &free_ids, done).await?;
    let mut starts: Vec<u64> = times(stack, &limited_ids)
        .await?
        .iter()
        .map(|(s, _)| *s)
        .collect();
    starts.sort_unstable();
    let burst = u64::from(rate / 10);
    let span = (starts[starts.len() - 1] - starts[0]) as f64 / 1000.0;
    let limited_rate = (starts.len() as f64 - burst as f64) / span.max(0.001);
    Ok(json!({
        "tasks": n,
        "unlimited_alone_per_s": alone,
        "unlimited_beside_limited_per_s": beside,
        "limited": {"max_running": max_running, "rate": rate, "observed_starts_per_s": limited_rate},
        "redis_us_per_task_unlimited": cpu * 1e6 / n as f64,
        "redis_us_per_task_checked": checked_cpu * 1e6 / n as f64,
        "redis_commands_per_task_unlimited": commands as f64 / n as f64,
        "redis_commands_per_task_checked": checked_commands as f64 / n as f64,
        "checked_per_s": checked,
    }))
}
