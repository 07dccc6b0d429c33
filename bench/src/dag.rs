//! The workflow run: what a dependency edge costs Redis, and how soon a released task starts.
//! Fan-ins of 10 parents and a join, as batch records, against the same tasks with no edges
//! (Redis CPU and commands per edge); then parent → child chains submitted at a steady rate,
//! timing each child's start from its parent's end (both by Redis's clock).

use std::time::Duration;

use fleet_common::task::State;
use serde_json::{Value, json};

use crate::stack::{Stack, percentile, redis_usage, task_times};

/// Batch records of `groups` fan-ins: 10 no-op parents and a join that depends on them when
/// `edges`, else 11 independent no-op tasks. Returns the records and the joins' ids.
fn fan_ins(prefix: &str, groups: usize, edges: bool) -> (Vec<String>, Vec<String>) {
    let mut records = Vec::with_capacity(groups);
    let mut joins = Vec::with_capacity(groups);
    for g in 0..groups {
        let parents: Vec<String> = (0..10).map(|i| format!("{prefix}{g}-p{i}")).collect();
        let mut tasks: Vec<Value> = parents
            .iter()
            .map(|id| json!({"id": id, "kind": "noop"}))
            .collect();
        let join = format!("{prefix}{g}-join");
        let mut last = json!({"id": join, "kind": "noop"});
        if edges {
            last["depends_on"] = json!(parents);
        }
        tasks.push(last);
        records.push(Value::Array(tasks).to_string());
        joins.push(join);
    }
    (records, joins)
}

/// Submits `records` and waits for `wait_for` successes; returns Redis's (commands, CPU s).
async fn cost(stack: &Stack, records: &[String], wait_for: u64) -> anyhow::Result<(u64, f64)> {
    let (commands, cpu) = redis_usage(&stack.store).await?;
    stack.submit(records).await?;
    stack
        .wait_count(State::Succeeded, wait_for, Duration::from_secs(600))
        .await?;
    let (commands_after, cpu_after) = redis_usage(&stack.store).await?;
    Ok((commands_after - commands, cpu_after - cpu))
}

/// `groups` fan-ins with and without their edges, then `chains` parent → child pairs at `rate`
/// pairs a second.
pub(crate) async fn workflows(
    stack: &Stack,
    groups: usize,
    chains: usize,
    rate: u64,
) -> anyhow::Result<Value> {
    let mut done = stack.count(State::Succeeded).await?;
    let (plain, _) = fan_ins("plain-", groups, false);
    done += 11 * groups as u64;
    let (plain_commands, plain_cpu) = cost(stack, &plain, done).await?;
    let (joined, _) = fan_ins("fan-", groups, true);
    done += 11 * groups as u64;
    let (commands, cpu) = cost(stack, &joined, done).await?;
    let edges = 10.0 * groups as f64;

    let pairs: Vec<(String, String)> = (0..chains)
        .map(|i| (format!("chain{i}-a"), format!("chain{i}-b")))
        .collect();
    let records: Vec<String> = pairs
        .iter()
        .map(|(a, b)| {
            json!([{"id": a, "kind": "noop"}, {"id": b, "kind": "noop", "depends_on": [a]}])
                .to_string()
        })
        .collect();
    stack.submit_paced(&records, rate).await?;
    done += 2 * chains as u64;
    stack
        .wait_count(State::Succeeded, done, Duration::from_secs(600))
        .await?;
    let parents: Vec<String> = pairs.iter().map(|(a, _)| a.clone()).collect();
    let children: Vec<String> = pairs.iter().map(|(_, b)| b.clone()).collect();
    let ended = task_times(&stack.store, &parents, &["finished_ms"]).await?;
    let started = task_times(&stack.store, &children, &["started_ms"]).await?;
    let mut release: Vec<u64> = ended
        .iter()
        .zip(&started)
        .map(|(e, s)| s[0].unwrap_or(0).saturating_sub(e[0].unwrap_or(0)))
        .collect();
    release.sort_unstable();
    Ok(json!({
        "fan_ins": groups,
        "edges": edges,
        "redis_us_per_edge": (cpu - plain_cpu) * 1e6 / edges,
        "redis_commands_per_edge": (commands as f64 - plain_commands as f64) / edges,
        "redis_us_per_task_with_edges": cpu * 1e6 / (11.0 * groups as f64),
        "redis_us_per_task_without": plain_cpu * 1e6 / (11.0 * groups as f64),
        "chains": chains,
        "chain_rate": rate,
        "release_p50_ms": percentile(&release, 50.0),
        "release_p99_ms": percentile(&release, 99.0),
        "release_max_ms": release.last().copied().unwrap_or(0),
    }))
}
