//! `fleetctl demo`: submits a mixed workload (every priority; quick, slow and failing tasks),
//! shows live progress, and ends with a summary read from Redis.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use fleet_common::settings::CommonSettings;
use fleet_common::store::Store;
use fleet_common::task::State;
use serde_json::json;

use crate::submit;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A small deterministic generator, so every demo run submits the same mix.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn percent(&mut self) -> u64 {
        self.next() % 100
    }
}

/// The demo workload: 40 % noop, 20 % echo, 25 % sleep (20–300 ms), 10 % flaky (fails once or
/// twice, then succeeds on retry), 5 % permanent failure; priorities 10 % critical, 20 % high, 50 % normal, 20 % low.
fn workload(n: usize) -> Vec<String> {
    let mut mix = Mix(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|i| {
            let priority = match mix.percent() {
                0..10 => "critical",
                10..30 => "high",
                30..80 => "normal",
                _ => "low",
            };
            let (kind, payload) = match mix.percent() {
                0..40 => ("noop", json!(null)),
                40..60 => ("echo", json!({ "n": i })),
                60..85 => ("sleep", json!({ "ms": 20 + mix.next() % 281 })),
                85..95 => ("flaky", json!({ "failures": 1 + mix.next() % 2 })),
                _ => ("fail", json!({ "message": "bad input", "retryable": false })),
            };
            json!({ "kind": kind, "priority": priority, "payload": payload, "max_attempts": 3, "queue": "demo" })
                .to_string()
        })
        .collect()
}

/// Counts by state name.
async fn counts(store: &Store) -> anyhow::Result<HashMap<State, u64>> {
    Ok(store.counts().await?.into_iter().collect())
}

pub(crate) async fn run(
    settings: &CommonSettings,
    store: &Store,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    if n == 0 {
        bail!("--tasks must be at least 1");
    }
    let baseline = counts(store).await?;
    let terminal = |c: &HashMap<State, u64>| -> u64 {
        State::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| c.get(s).copied().unwrap_or(0))
            .sum()
    };
    let done_before = terminal(&baseline);

    let mut submissions = Vec::with_capacity(n);
    for body in workload(n) {
        submissions.push(submit::prepare(&body, settings.tasks.max_task_bytes)?);
    }
    println!(
        "demo: submitting {n} tasks (every priority; noop, echo, sleep, flaky and failing) to {}",
        settings.kafka.brokers
    );
    let started = Instant::now();
    let submitted_ms = now_ms();
    submit::publish(settings, &submissions, false).await?;
    println!(
        "demo: all {n} submissions acknowledged by the broker in {:.2}s",
        started.elapsed().as_secs_f64()
    );

    let tty = std::io::stdout().is_terminal();
    let mut last_print = Instant::now() - Duration::from_secs(10);
    loop {
        let now = counts(store).await?;
        let done = terminal(&now).saturating_sub(done_before);
        let elapsed = started.elapsed().as_secs_f64();
        let delta = |s: State| {
            now.get(&s)
                .copied()
                .unwrap_or(0)
                .saturating_sub(baseline.get(&s).copied().unwrap_or(0))
        };
        let line = format!(
            "[{elapsed:6.1}s] done {done:>6}/{n}  pending {:>5}  scheduled {:>5}  running {:>4}  succeeded {:>6}  failed {:>5}  {:>7.0} tasks/s",
            now.get(&State::Pending).copied().unwrap_or(0),
            now.get(&State::Scheduled).copied().unwrap_or(0),
            now.get(&State::Running).copied().unwrap_or(0),
            delta(State::Succeeded),
            delta(State::Failed),
            done as f64 / elapsed.max(0.001),
        );
        if tty {
            print!("\r{line}");
            let _ = std::io::stdout().flush();
        } else if last_print.elapsed() >= Duration::from_secs(1) || done >= n as u64 {
            println!("{line}");
            last_print = Instant::now();
        }
        if done >= n as u64 {
            break;
        }
        if started.elapsed() > timeout {
            println!();
            bail!(
                "timed out after {timeout:?} with {done} of {n} tasks finished; are the workers running?"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if tty {
        println!();
    }
    let wall = started.elapsed();
    summary(store, &submissions, submitted_ms, wall).await
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn summary(
    store: &Store,
    submissions: &[(String, String)],
    submitted_ms: u64,
    wall: Duration,
) -> anyhow::Result<()> {
    let mut by_state: HashMap<String, u64> = HashMap::new();
    let mut to_start = Vec::with_capacity(submissions.len());
    let mut to_finish = Vec::with_capacity(submissions.len());
    let mut retried = 0u64;
    let ids: Vec<String> = submissions.iter().map(|(id, _)| id.clone()).collect();
    for times in store.task_times(&ids).await? {
        let state = times.as_ref().and_then(|t| t.state);
        *by_state
            .entry(state.map_or("missing", State::as_str).to_string())
            .or_default() += 1;
        let Some(times) = times else { continue };
        if let Some(s) = times.first_started_ms {
            to_start.push(s.saturating_sub(submitted_ms));
        }
        if let Some(f) = times.finished_ms {
            to_finish.push(f.saturating_sub(submitted_ms));
        }
        if times.attempt > 1 {
            retried += 1;
        }
    }
    to_start.sort_unstable();
    to_finish.sort_unstable();
    let n = submissions.len();
    println!(
        "\nsummary ({n} tasks, {:.2}s wall, {:.0} tasks/s end to end)",
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64()
    );
    let mut states: Vec<_> = by_state.into_iter().collect();
    states.sort();
    for (state, count) in states {
        println!("  {state:<10} {count:>7}");
    }
    println!("  retried    {retried:>7}  (tasks that needed more than one attempt)");
    println!(
        "  submit→start  p50 {:>6} ms  p90 {:>6} ms  p99 {:>6} ms",
        percentile(&to_start, 50.0),
        percentile(&to_start, 90.0),
        percentile(&to_start, 99.0)
    );
    println!(
        "  submit→finish p50 {:>6} ms  p90 {:>6} ms  p99 {:>6} ms",
        percentile(&to_finish, 50.0),
        percentile(&to_finish, 90.0),
        percentile(&to_finish, 99.0)
    );
    println!(
        "  (latencies count from when the whole batch was submitted, so they include queueing behind it)"
    );
    Ok(())
}
