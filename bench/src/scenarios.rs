//! The measurements of issue 6: throughput, drain, latency at fixed loads, recovery, cost per
//! task and memory. Each returns its numbers as JSON; none asserts anything about speed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use fleet_common::task::State;
use fleet_testkit::redis_persistence;
use serde_json::{Value, json};

use crate::stack::{
    Profile, Stack, cpu_seconds, now_ms, percentile, redis_commandstats, redis_usage, rss,
    steal_seconds,
};

/// CPU seconds used so far by each part of the stack and by this load generator.
fn cpu_split(stack: &Stack) -> Vec<(&'static str, f64)> {
    let workers: f64 = stack.workers.iter().map(|w| cpu_seconds(w.pid())).sum();
    vec![
        ("broker", cpu_seconds(stack.env.broker().pid())),
        ("redis", cpu_seconds(stack.env.redis.pid())),
        ("scheduler", cpu_seconds(stack.scheduler.pid())),
        ("reaper", cpu_seconds(stack.reaper.pid())),
        ("workers", workers),
        ("load generator", cpu_seconds(std::process::id())),
        // Not a process: CPU time the hypervisor gave to other guests. A run with much of it
        // was measured on a slower machine.
        ("steal", steal_seconds()),
    ]
}

/// CPU seconds each process used since `before` (a [`cpu_split`]).
fn cpu_since(stack: &Stack, before: Vec<(&'static str, f64)>) -> serde_json::Map<String, Value> {
    cpu_split(stack)
        .into_iter()
        .zip(before)
        .map(|((name, after), (_, before))| {
            (
                name.to_string(),
                json!(((after - before) * 100.0).round() / 100.0),
            )
        })
        .collect()
}

fn noop(prefix: &str, n: usize) -> (Vec<String>, Vec<String>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let bodies = ids
        .iter()
        .map(|id| format!(r#"{{"id":"{id}","kind":"noop"}}"#))
        .collect();
    (ids, bodies)
}

/// (a) end to end, (e) cost per task and (f) peak memory: `n` no-op tasks submitted as fast
/// as the producer takes them, timed from the first submit to the last `succeeded` in Redis.
pub(crate) async fn throughput(stack: &Stack, n: usize) -> anyhow::Result<Value> {
    let (ids, bodies) = noop("e", n);
    let (commands_before, cpu_before) = redis_usage(&stack.store).await?;
    let aof_before = redis_persistence(&stack.store).await?;
    let stats_before = redis_commandstats(&stack.store).await?;
    let split_before = cpu_split(stack);
    let start_ms = now_ms();
    let started = Instant::now();
    let bytes = stack.submit(&bodies).await?;
    let submitted = started.elapsed();
    stack
        .wait_count(State::Succeeded, n as u64, Duration::from_secs(600))
        .await?;
    // Read before the per-task fields below, which would count as Redis work per task.
    let (commands_after, cpu_after) = redis_usage(&stack.store).await?;
    let aof_after = redis_persistence(&stack.store).await?;
    let profile = per_task_profile(&stats_before, &redis_commandstats(&stack.store).await?, n);
    let rows = stack.times(&ids).await?;
    let last = rows
        .iter()
        .filter_map(|r| r.finished_ms)
        .max()
        .unwrap_or(start_ms);
    let seconds = (last.saturating_sub(start_ms)) as f64 / 1000.0;
    let cpu = cpu_since(stack, split_before);
    let attempts: u64 = rows.iter().map(|r| u64::from(r.attempt)).sum();
    let record = rows.first().map_or(0, |r| r.record_bytes) as u64;
    // Kafka records per task: the submission and one envelope per dispatched attempt.
    let kafka_records = n as u64 + attempts;
    let kafka_bytes = bytes + attempts * (record + 32);
    let (_, scheduler_peak) = rss(stack.scheduler.pid());
    let worker_peak = stack
        .workers
        .iter()
        .map(|w| rss(w.pid()).1)
        .max()
        .unwrap_or(0);
    Ok(json!({
        "tasks": n,
        "seconds": seconds,
        "tasks_per_s": n as f64 / seconds.max(0.001),
        "submit_seconds": submitted.as_secs_f64(),
        "redis_commands_per_task": (commands_after - commands_before) as f64 / n as f64,
        "redis_cpu_us_per_task": (cpu_after - cpu_before) * 1e6 / n as f64,
        "redis_aof": stack.env_aof().name(),
        "aof_bytes_per_task": aof_after[0].saturating_sub(aof_before[0]) as f64 / n as f64,
        "aof_rewrites": aof_after[1] - aof_before[1],
        "aof_delayed_fsyncs": aof_after[2] - aof_before[2],
        "redis_forks": aof_after[3] - aof_before[3],
        "kafka_records_per_task": kafka_records as f64 / n as f64,
        "kafka_bytes_per_task": kafka_bytes as f64 / n as f64,
        "scheduler_peak_rss_mb": scheduler_peak as f64 / 1e6,
        "worker_peak_rss_mb": worker_peak as f64 / 1e6,
        "cpu_seconds": cpu,
        "redis_profile": profile,
    }))
}

/// Where Redis spent its time during a run, per task and busiest first: calls and microseconds
/// per command (`evalsha` includes the commands its scripts call, which are listed as well).
fn per_task_profile(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    n: usize,
) -> Vec<Value> {
    let mut rows: Vec<(String, f64, f64)> = after
        .iter()
        .map(|(name, (calls, usec))| {
            let (c0, u0) = before.get(name).copied().unwrap_or((0, 0));
            let per = |now: u64, then: u64| now.saturating_sub(then) as f64 / n as f64;
            (name.clone(), per(*calls, c0), per(*usec, u0))
        })
        .filter(|(_, calls, _)| *calls > 0.0)
        .collect();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    rows.into_iter()
        .map(|(command, calls, us)| {
            json!({
                "command": command,
                "calls_per_task": (calls * 100.0).round() / 100.0,
                "us_per_task": (us * 100.0).round() / 100.0,
            })
        })
        .collect()
}

/// (b) drain: `n` tasks accepted on a fresh stack while no worker runs, then drained by
/// `workers` workers; timed from the first start to the last finish, by Redis's clock.
/// With `redis_first`, redis-server runs at a higher CPU priority than everything else.
pub(crate) async fn drain(
    n: usize,
    workers: usize,
    worker_vars: &[(&str, &str)],
    profile: Profile,
    redis_first: bool,
) -> anyhow::Result<Value> {
    let name = if redis_first {
        "bench-drain-rf"
    } else {
        "bench-drain"
    };
    let mut stack = Stack::start(name, 0, &[], profile).await?;
    if redis_first {
        stack.prioritize_redis()?;
    }
    let before = 0;
    let (ids, bodies) = noop("d", n);
    stack.submit(&bodies).await?;
    stack
        .wait_count(State::Pending, n as u64, Duration::from_secs(600))
        .await?;
    let (_, redis_before) = redis_usage(&stack.store).await?;
    let aof_before = redis_persistence(&stack.store).await?;
    let split_before = cpu_split(&stack);
    for i in 0..workers {
        stack.add_worker(&format!("drain{i}"), worker_vars);
    }
    stack
        .wait_count(
            State::Succeeded,
            before + n as u64,
            Duration::from_secs(600),
        )
        .await?;
    let (_, redis_after) = redis_usage(&stack.store).await?;
    let aof_after = redis_persistence(&stack.store).await?;
    // Workers started after `split_before` count all their CPU, start-up included.
    let cpu = cpu_since(&stack, split_before);
    let rows = stack.times(&ids).await?;
    // Each no-op task starts once: its `started_ms` is its first start.
    let mut first_by_worker: BTreeMap<&str, u64> = BTreeMap::new();
    for row in &rows {
        if let (Some(worker), Some(started)) = (row.worker.as_deref(), row.started_ms) {
            let first = first_by_worker.entry(worker).or_insert(started);
            *first = (*first).min(started);
        }
    }
    // How long after the first worker's first start the last worker started its first task:
    // the time the group took to give every worker its partitions, which the drain includes.
    let start_lag_ms = match (
        first_by_worker.values().min(),
        first_by_worker.values().max(),
    ) {
        (Some(min), Some(max)) => max - min,
        _ => 0,
    };
    let first = rows.iter().filter_map(|r| r.started_ms).min().unwrap_or(0);
    let last = rows.iter().filter_map(|r| r.finished_ms).max().unwrap_or(0);
    let seconds = last.saturating_sub(first) as f64 / 1000.0;
    Ok(json!({
        "tasks": n,
        "seconds": seconds,
        "tasks_per_s": n as f64 / seconds.max(0.001),
        "workers_started": first_by_worker.len(),
        "start_lag_ms": start_lag_ms,
        "redis_cpu_us_per_task": (redis_after - redis_before) * 1e6 / n as f64,
        "redis_aof": stack.env_aof().name(),
        "aof_bytes_per_task": aof_after[0].saturating_sub(aof_before[0]) as f64 / n as f64,
        "aof_rewrites": aof_after[1] - aof_before[1],
        "aof_delayed_fsyncs": aof_after[2] - aof_before[2],
        "redis_forks": aof_after[3] - aof_before[3],
        "cpu_seconds": cpu,
    }))
}

/// How the latency run submits: to the submit topic, or through the HTTP API.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Via {
    Kafka,
    Http,
}

/// (c) submit→start latency at a fixed offered load for `secs` seconds.
pub(crate) async fn latency(
    stack: &Stack,
    via: Via,
    rate: u64,
    secs: u64,
    tag: &str,
) -> anyhow::Result<Value> {
    // Warm-up: a second of the load, not measured, so that the load generator's producer
    // (or HTTP connections), the scheduler's and the workers' clients have their connections
    // and metadata before the first measured submission.
    let (_, warm) = noop(&format!("{tag}warm-"), rate as usize);
    let before = stack.count(State::Succeeded).await?;
    let mut sends = Vec::with_capacity(warm.len());
    for chunk in warm.chunks((rate / 100).max(1) as usize) {
        for body in chunk {
            sends.push(match via {
                Via::Kafka => tokio::spawn(stack.submit_one(body.clone())),
                Via::Http => tokio::spawn(stack.submit_http(body.clone())),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for send in sends {
        send.await??;
    }
    stack
        .wait_count(
            State::Succeeded,
            before + warm.len() as u64,
            Duration::from_secs(120),
        )
        .await?;
    let total = (rate * secs) as usize;
    let (ids, bodies) = noop(tag, total);
    let before = stack.count(State::Succeeded).await?;
    let mut submitted_at = Vec::with_capacity(total);
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1) as usize;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = Vec::with_capacity(total);
    let split_before = cpu_split(stack);
    // The broker's CPU seconds per 5 s of the run: its fetch handling is what loads it.
    let mut broker_cpu = Vec::new();
    let mut broker_mark = cpu_seconds(stack.env.broker().pid());
    for (i, chunk) in bodies.chunks(per_tick).enumerate() {
        if i > 0 && i % 500 == 0 {
            stack.check_services()?;
            let now = cpu_seconds(stack.env.broker().pid());
            broker_cpu.push(((now - broker_mark) * 100.0).round() / 100.0);
            broker_mark = now;
        }
        interval.tick().await;
        let at = now_ms();
        for body in chunk {
            submitted_at.push(at);
            // Each submission runs on its own task, so it progresses while the loop waits for
            // the next tick (an HTTP exchange needs several wake-ups).
            sends.push(match via {
                Via::Kafka => tokio::spawn(stack.submit_one(body.clone())),
                Via::Http => tokio::spawn(stack.submit_http(body.clone())),
            });
        }
    }
    for send in sends {
        send.await??;
    }
    stack
        .wait_count(
            State::Succeeded,
            before + total as u64,
            Duration::from_secs(600),
        )
        .await?;
    let cpu = cpu_since(stack, split_before);
    let rows = stack.times(&ids).await?;
    // The whole path, and its two hops: submit topic → accepted by the scheduler (created_ms),
    // then task topic → claimed by a worker (started_ms: each no-op task starts once).
    let mut latencies = Vec::with_capacity(total);
    let mut to_accept = Vec::with_capacity(total);
    let mut to_start = Vec::with_capacity(total);
    for (r, at) in rows.iter().zip(&submitted_at) {
        let (Some(created), Some(started)) = (r.created_ms, r.started_ms) else {
            continue;
        };
        latencies.push(started.saturating_sub(*at));
        to_accept.push(created.saturating_sub(*at));
        to_start.push(started.saturating_sub(created));
    }
    // p50 and p99 per 5 s of the run, in submission order: shows whether latency drifts.
    let per_window = (rate * 5) as usize;
    let windows: Vec<Value> = latencies
        .chunks(per_window.max(1))
        .map(|w| {
            let mut w = w.to_vec();
            w.sort_unstable();
            json!([percentile(&w, 50.0), percentile(&w, 99.0)])
        })
        .collect();
    for v in [&mut latencies, &mut to_accept, &mut to_start] {
        v.sort_unstable();
    }
    Ok(json!({
        "p50_p99_ms_per_5s": windows,
        "broker_cpu_s_per_5s": broker_cpu,
        "cpu_seconds": cpu,
        "submit_to_accept_p50_ms": percentile(&to_accept, 50.0),
        "submit_to_accept_p99_ms": percentile(&to_accept, 99.0),
        "accept_to_start_p50_ms": percentile(&to_start, 50.0),
        "accept_to_start_p99_ms": percentile(&to_start, 99.0),
        "via": format!("{via:?}").to_lowercase(),
        "offered_per_s": rate,
        "seconds": secs,
        "tasks": total,
        "p50_ms": percentile(&latencies, 50.0),
        "p99_ms": percentile(&latencies, 99.0),
        "p999_ms": percentile(&latencies, 99.9),
        "max_ms": latencies.last().copied().unwrap_or(0),
    }))
}

/// (d) recovery: `kill -9` of a worker holding at least `orphans` sleeping tasks, on a stack
/// of its own whose two workers have slots for everything (`3 × orphans` each), so every
/// orphan can start again at once elsewhere. Measures when each orphan started again (its
/// `started_ms`, Redis time) after the kill: first, median and last.
pub(crate) async fn recovery(orphans: usize, profile: Profile) -> anyhow::Result<Value> {
    let concurrency = (3 * orphans).to_string();
    let mut stack = Stack::start(
        "bench-recovery",
        2,
        &[
            ("FLEET__WORKER__CONCURRENCY", concurrency.as_str()),
            ("RUST_LOG", "info"),
        ],
        profile,
    )
    .await?;
    let lease_ms = stack.env.settings().lease.lease_ms;
    // Spread over both workers: the busier one holds at least half, over `orphans`.
    let n = 2 * orphans + orphans / 5;
    let ids: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
    let bodies: Vec<String> = ids
        .iter()
        .map(|id| format!(r#"{{"id":"{id}","kind":"sleep","payload":{{"ms":600000}}}}"#))
        .collect();
    stack.submit(&bodies).await?;
    stack
        .wait_count(State::Running, n as u64, Duration::from_secs(120))
        .await?;
    let rows = stack.times(&ids).await?;
    let mut per_worker: BTreeMap<&str, usize> = Default::default();
    for worker in rows.iter().filter_map(|r| r.worker.as_deref()) {
        *per_worker.entry(worker).or_default() += 1;
    }
    let (victim_name, held) = per_worker
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(w, n)| (w.to_string(), *n))
        .ok_or_else(|| anyhow::anyhow!("no recovery task started"))?;
    if held < orphans {
        bail!("the busier worker holds only {held} of {n} tasks, fewer than {orphans}");
    }
    let victims: Vec<String> = ids
        .iter()
        .zip(&rows)
        .filter(|(_, r)| r.worker.as_ref() == Some(&victim_name))
        .map(|(id, _)| id.clone())
        .collect();
    let victim = stack
        .workers
        .iter_mut()
        .find(|w| w.name() == victim_name)
        .ok_or_else(|| anyhow::anyhow!("no worker {victim_name}"))?;
    victim.signal("KILL");
    let killed = Instant::now();
    let killed_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let deadline = killed + Duration::from_secs(120);
    let rows = loop {
        let rows = stack.times(&victims).await?;
        let moved = rows
            .iter()
            .all(|r| r.state == Some(State::Running) && r.worker.as_ref() != Some(&victim_name));
        if moved {
            break rows;
        }
        if Instant::now() > deadline {
            bail!("the killed worker's tasks were not all running elsewhere after 120 s");
        }
        stack.check_services()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let all_moved_s = killed.elapsed().as_secs_f64();
    let mut restarted: Vec<u64> = rows
        .iter()
        .filter_map(|r| r.started_ms)
        .map(|ms| (ms as i64 - killed_ms).max(0) as u64)
        .collect();
    restarted.sort_unstable();
    let at = |q: f64| {
        restarted
            .get(((restarted.len() as f64 - 1.0) * q) as usize)
            .copied()
    };
    Ok(json!({
        "tasks_on_killed_worker": victims.len(),
        "seconds": all_moved_s,
        "first_restart_s": at(0.0).map(|ms| ms as f64 / 1000.0),
        "median_restart_s": at(0.5).map(|ms| ms as f64 / 1000.0),
        "last_restart_s": at(1.0).map(|ms| ms as f64 / 1000.0),
        "lease_ms": lease_ms,
        "worker_concurrency": 3 * orphans,
    }))
}

/// (g) scheduler failover: `kill -9` of a scheduler while a submission arrives on the submit
/// topic every 50 ms; the time from the kill until the first submission sent after it is
/// accepted. With one scheduler it is started again at once (as a supervisor would); with two,
/// the other takes over the killed one's partitions.
pub(crate) async fn failover(schedulers: usize, profile: Profile) -> anyhow::Result<Value> {
    let mut stack = Stack::start(
        &format!("bench-failover-{schedulers}"),
        1,
        &[("RUST_LOG", "info")],
        profile,
    )
    .await?;
    let mut extra = Vec::new();
    for i in 1..schedulers {
        extra.push(stack.add_scheduler(&format!("scheduler{i}")));
    }
    // Warm up until every scheduler holds partitions of the submit topic.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let body = |i: usize| format!(r#"{{"id":"f{i}","kind":"noop"}}"#);
    let mut sent_at = Vec::new();
    let start = Instant::now();
    let mut i = 0;
    let mut killed = None;
    while start.elapsed() < Duration::from_secs(40) {
        if killed.is_none() && start.elapsed() >= Duration::from_secs(5) {
            stack.scheduler.signal("KILL");
            killed = Some((i, now_ms()));
            if schedulers == 1 {
                stack.scheduler.wait_exit(Duration::from_secs(5));
                stack.restart_scheduler();
            }
        }
        tokio::spawn(stack.submit_one(body(i)));
        sent_at.push(now_ms());
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (first_after, killed_ms) = killed.ok_or_else(|| anyhow::anyhow!("never killed"))?;
    let ids: Vec<String> = (0..i).map(|n| format!("f{n}")).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows = stack.times(&ids).await?;
        if rows.iter().all(|r| r.created_ms.is_some()) {
            break rows;
        }
        if Instant::now() > deadline {
            bail!("not every failover submission was accepted within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let accepted: Vec<u64> = rows.iter().map(|r| r.created_ms.unwrap_or(0)).collect();
    // The first submission sent at or after the kill, and the longest any waited.
    let takeover_ms = accepted[first_after].saturating_sub(killed_ms);
    let longest_wait_ms = accepted
        .iter()
        .zip(&sent_at)
        .map(|(a, s)| a.saturating_sub(*s))
        .max()
        .unwrap_or(0);
    drop(extra);
    Ok(json!({
        "schedulers": schedulers,
        "restarted": schedulers == 1,
        "takeover_s": takeover_ms as f64 / 1000.0,
        "longest_wait_s": longest_wait_ms as f64 / 1000.0,
        "session_timeout_ms": stack.env.settings().kafka.session_timeout_ms,
        "submissions": i,
    }))
}

/// (f) worker memory holding `n` concurrent sleeping tasks.
pub(crate) async fn memory(n: usize) -> anyhow::Result<Value> {
    let concurrency = n.to_string();
    let stack = Stack::start(
        "bench-memory",
        1,
        &[("FLEET__WORKER__CONCURRENCY", &concurrency)],
        Profile::Default,
    )
    .await?;
    let (idle, _) = rss(stack.workers[0].pid());
    let bodies: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"id":"m{i}","kind":"sleep","payload":{{"ms":60000}}}}"#))
        .collect();
    stack.submit(&bodies).await?;
    stack
        .wait_count(State::Running, n as u64, Duration::from_secs(120))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (busy, peak) = rss(stack.workers[0].pid());
    Ok(json!({
        "sleeping_tasks": n,
        "idle_rss_mb": idle as f64 / 1e6,
        "rss_mb": busy as f64 / 1e6,
        "peak_rss_mb": peak as f64 / 1e6,
    }))
}
