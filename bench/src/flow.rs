//! The flow-control run: placed tasks of which half carry a binding concurrency limit and a
//! binding rate limit, beside the same number with no limit. Reports the unlimited half's
//! tasks/s next to a run of it alone (limits must not slow what they do not limit), the limited
//! half's observed start rate against its limit, and Redis's CPU and commands per task for
//! tasks whose limits are checked but never bind, against tasks with none.

use std::time::Duration;

use fleet_common::flow::{Limit, Scope};
use fleet_common::task::State;
use serde_json::{Value, json};

use crate::stack::{Stack, now_ms, redis_usage, task_times};

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

/// Each task's start and end (0 for none), by Redis's
/// clock.
async fn times(stack: &Stack, ids: &[String]) -> anyhow::Result<Vec<(u64, u64)>> {
    let rows = task_times(&stack.store, ids, &["started_ms", "finished_ms"]).await?;
    Ok(rows
        .into_iter()
        .map(|row| (row[0].unwrap_or(0), row[1].unwrap_or(0)))
        .collect())
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

/// Submits `bodies` at `rate`/s (in 10 ms ticks) and waits for `wait_for` successes.
async fn paced(stack: &Stack, bodies: &[String], rate: u64, wait_for: u64) -> anyhow::Result<()> {
    stack.submit_paced(bodies, rate).await?;
    stack
        .wait_count(State::Succeeded, wait_for, Duration::from_secs(600))
        .await?;
    Ok(())
}

/// Waits until every one of `ids` succeeded.
async fn wait_ids(stack: &Stack, ids: &[String]) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let done = times(stack, ids)
            .await?
            .iter()
            .filter(|(_, f)| *f > 0)
            .count();
        if done == ids.len() {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{done} of {} ended",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rate achieved (tasks/s, first start to last end) and accepted → started p50 and p99 (ms) of
/// `ids`.
async fn paced_summary(stack: &Stack, ids: &[String]) -> anyhow::Result<Value> {
    let rows = task_times(
        &stack.store,
        ids,
        &["created_ms", "started_ms", "finished_ms"],
    )
    .await?;
    let mut waits = Vec::with_capacity(ids.len());
    let (mut first, mut last) = (u64::MAX, 0);
    for row in rows {
        let (created, started) = (row[0].unwrap_or(0), row[1].unwrap_or(0));
        waits.push(started.saturating_sub(created));
        first = first.min(started);
        last = last.max(row[2].unwrap_or(0));
    }
    waits.sort_unstable();
    Ok(json!({
        "per_s": ids.len() as f64 / (last.saturating_sub(first) as f64 / 1000.0).max(0.001),
        "start_p50_ms": crate::stack::percentile(&waits, 50.0),
        "start_p99_ms": crate::stack::percentile(&waits, 99.0),
    }))
}

/// `n` unlimited placed tasks alone; `n` whose limits never bind; then `n` unlimited beside `n`
/// limited to `max_running` at once and `rate`/s, at once and then paced (each half at
/// `paced_rate`/s for 5 s, against the unlimited half alone at that rate).
pub(crate) async fn flow(
    stack: &Stack,
    n: usize,
    max_running: u64,
    rate: u32,
    paced_rate: u64,
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
    // Paced: what an unlimited task's start costs beside a limited backlog, when the
    // dispatcher is not the bottleneck.
    let m = (paced_rate * 5) as usize;
    let (alone_ids, bodies) = tasks("paced-alone-", m, free);
    done += m as u64;
    paced(stack, &bodies, paced_rate, done).await?;
    let paced_alone = paced_summary(stack, &alone_ids).await?;
    let (free_ids2, free_bodies) = tasks("paced-beside-", m, free);
    // The limited half here can start only 100/s: its backlog grows all along.
    set(
        Scope::Key,
        "slow",
        Limit {
            max_running: Some(5),
            ..Limit::default()
        },
    )
    .await?;
    set(
        Scope::Rate,
        "slow",
        Limit {
            limit: Some(100),
            period_ms: Some(1000),
            ..Limit::default()
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, limited_bodies) = tasks(
        "paced-limited-",
        m,
        r#","concurrency_key":"slow","rate_key":"slow""#,
    );
    let mut mixed: Vec<String> = Vec::with_capacity(2 * m);
    for (a, b) in free_bodies.into_iter().zip(limited_bodies) {
        mixed.push(b);
        mixed.push(a);
    }
    stack.submit_paced(&mixed, 2 * paced_rate).await?;
    wait_ids(stack, &free_ids2).await?;
    let paced_beside = paced_summary(stack, &free_ids2).await?;
    let backlog: u64 = stack.store.dim_use(&["key:slow".to_string()]).await?[0].waiting();
    // Lifted: the backlog goes on at once.
    stack.store.set_limit(Scope::Key, "slow", None).await?;
    stack.store.set_limit(Scope::Rate, "slow", None).await?;
    done += 2 * m as u64;
    stack
        .wait_count(State::Succeeded, done, Duration::from_secs(600))
        .await?;

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
        "paced": {"rate": paced_rate, "alone": paced_alone, "beside_limited": paced_beside, "limited_backlog_at_end": backlog},
    }))
}
