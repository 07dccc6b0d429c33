//! Fleet in containers: `deploy/docker-compose.yml` on the Docker engine, with the images of
//! `deploy/images/build.sh`. Each test records every task it submits and checks, by counting
//! in Redis at the end, that none was lost, each ended once, and executions stayed bounded.
//! The test command runs these only where a Docker engine answers and says so otherwise.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::compose::{self, Compose, docker};
use fleet_common::store::{AttemptOutcome, Store, StoredTask};
use fleet_common::task::State;
use fleet_testkit::eventually;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(180);

fn sleep_tasks(prefix: &str, range: std::ops::Range<usize>, ms: u64) -> (Vec<String>, Vec<Value>) {
    let ids: Vec<String> = range.map(|i| format!("{prefix}-{i}")).collect();
    let tasks = ids
        .iter()
        .map(|id| json!({"id": id, "kind": "sleep", "payload": {"ms": ms}}))
        .collect();
    (ids, tasks)
}

async fn count(store: &Store, state: State) -> u64 {
    store
        .counts()
        .await
        .expect("counts")
        .into_iter()
        .find(|(s, _)| *s == state)
        .map_or(0, |(_, n)| n)
}

/// Every task succeeded; returns the tasks read.
async fn all_succeeded(store: &Store, ids: &[String]) -> HashMap<String, StoredTask> {
    let tasks = compose::tasks(store, ids).await;
    assert_eq!(tasks.len(), ids.len(), "every task is in Redis");
    for id in ids {
        assert_eq!(tasks[id].state, State::Succeeded, "{id}: {:?}", tasks[id]);
    }
    tasks
}

/// Every worker container with its hostname, which prefixes its worker id. Read before the
/// tasks are submitted: `docker` calls can take seconds on a busy machine, longer than the
/// tasks run.
fn worker_hosts(stack: &Compose) -> Vec<(String, String)> {
    stack
        .containers("worker")
        .into_iter()
        .map(|c| {
            let host = stack.hostname(&c);
            (c, host)
        })
        .collect()
}

/// A worker container once some of `ids` run on it: (container, hostname, the ids running
/// there). Whichever worker runs them first is chosen: the group may still be rebalancing when
/// the tasks arrive (a replica that joins late gets its partitions after they were fetched),
/// so no particular replica is sure to get any of them.
async fn busy_worker(
    workers: &[(String, String)],
    store: &Store,
    ids: &[String],
) -> (String, String, Vec<String>) {
    let start = Instant::now();
    loop {
        let tasks = compose::tasks(store, ids).await;
        for (container, host) in workers {
            let running: Vec<String> = tasks
                .iter()
                .filter(|(_, t)| {
                    t.state == State::Running
                        && t.worker
                            .as_deref()
                            .is_some_and(|w| w.starts_with(host.as_str()))
                })
                .map(|(id, _)| id.clone())
                .collect();
            if !running.is_empty() {
                return (container.clone(), host.clone(), running);
            }
        }
        assert!(
            start.elapsed() < WAIT,
            "no task ever ran on a worker container"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether every one of `ids` has succeeded by now.
async fn all_succeeded_now(store: &Store, ids: &[String]) -> bool {
    compose::tasks(store, ids)
        .await
        .values()
        .all(|t| t.state == State::Succeeded)
}

async fn wait_succeeded(store: &Store, n: u64) {
    eventually(WAIT, &format!("{n} tasks succeeded"), || async {
        count(store, State::Succeeded).await >= n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_from_one_worker_to_four_mid_run_spreads_the_work_and_runs_each_task_once() {
    let stack = Compose::up("scale", 1, &[("FLEET_WORKER_CONCURRENCY", "8")]).await;
    let store = stack.store().await;
    // Compose's Redis runs with deploy/redis/fleet.conf: AOF every second, no snapshots.
    let config = fleet_testkit::redis_config(&store, &["appendonly", "appendfsync", "save"]).await;
    assert_eq!(
        (
            &*config["appendonly"],
            &*config["appendfsync"],
            &*config["save"]
        ),
        ("yes", "everysec", "")
    );
    let (first, tasks) = sleep_tasks("scale", 0..1000, 50);
    stack.submit(&tasks).await;
    wait_succeeded(&store, 100).await;
    assert!(
        count(&store, State::Succeeded).await < 1000,
        "scaling happens mid-run"
    );

    assert_eq!(stack.containers("scheduler").len(), 2, "two schedulers");
    assert_eq!(stack.containers("reaper").len(), 1);
    // Redis runs every transition on one thread: under contention it gets 4x the CPU weight
    // of the others (0 means Docker's default, 1024).
    let shares = |service: &str| {
        docker(&[
            "inspect",
            "-f",
            "{{.HostConfig.CpuShares}}",
            &stack.containers(service)[0],
        ])
    };
    assert_eq!(shares("redis").trim(), "4096");
    assert_eq!(shares("worker").trim(), "0");
    stack.ok(&["up", "-d", "--no-recreate", "--scale", "worker=4"]);
    stack.wait_healthy(WAIT).await;
    let workers = stack.containers("worker");
    assert_eq!(workers.len(), 4);
    let (second, tasks) = sleep_tasks("scale", 1000..2000, 50);
    stack.submit(&tasks).await;
    wait_succeeded(&store, 2000).await;

    let ids: Vec<String> = first.iter().chain(&second).cloned().collect();
    let tasks = all_succeeded(&store, &ids).await;
    for id in &ids {
        let runs = &tasks[id].history;
        assert_eq!(tasks[id].attempt, 1, "{id} claimed once: {runs:?}");
        assert_eq!(runs.len(), 1, "{id} ran once: {runs:?}");
    }
    assert_eq!(count(&store, State::Failed).await, 0);
    // The group spread the partitions: every replica ran part of the second half.
    let ran: BTreeSet<String> = second
        .iter()
        .flat_map(|id| &tasks[id].history)
        .map(|e| {
            e.worker
                .rsplit_once('-')
                .map_or(e.worker.clone(), |(h, _)| h.to_string())
        })
        .collect();
    let hostnames: BTreeSet<String> = workers.iter().map(|c| stack.hostname(c)).collect();
    assert_eq!(ran, hostnames, "all four workers took partitions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_container_s_tasks_finish_elsewhere_within_lease_and_reaper_period() {
    // Enough slots on each worker for every task, so recovery time is not queueing time.
    let stack = Compose::up("kill", 2, &[("FLEET_WORKER_CONCURRENCY", "32")]).await;
    let store = stack.store().await;
    // Tasks of 4 s: still running when `docker kill` lands, however slow docker is.
    let (ids, tasks) = sleep_tasks("kill", 0..24, 4000);
    let workers = worker_hosts(&stack);
    stack.submit(&tasks).await;

    let (victim, host, running) = busy_worker(&workers, &store, &ids).await;
    docker(&["kill", &victim]);
    let killed_at = Instant::now();

    // Lease 3 s + reaper period 0.5 s + the task's 4 s + a few seconds.
    eventually(
        Duration::from_secs(12),
        "the victim's tasks ran again elsewhere",
        || all_succeeded_now(&store, &running),
    )
    .await;
    let recovered = killed_at.elapsed();
    wait_succeeded(&store, ids.len() as u64).await;
    let tasks = all_succeeded(&store, &ids).await;
    for id in &ids {
        let runs = &tasks[id].history;
        let attempts = tasks[id].attempt;
        if running.contains(id) {
            assert_eq!(attempts, 2, "{id} ran again once: {runs:?}");
            assert_eq!(
                runs[0].outcome,
                AttemptOutcome::LeaseExpired,
                "{id}: {runs:?}"
            );
            assert!(
                !runs[1].worker.starts_with(&host),
                "{id} ran elsewhere: {runs:?}"
            );
        } else {
            assert!(attempts <= 2, "{id}: {runs:?}");
        }
        let successes = runs
            .iter()
            .filter(|r| r.outcome == AttemptOutcome::Succeeded)
            .count();
        assert_eq!(successes, 1, "{id} succeeded once: {runs:?}");
    }
    eprintln!(
        "{} tasks of the killed worker finished elsewhere {:.1} s after the kill",
        running.len(),
        recovered.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_redis_loses_its_tasks_to_others_and_rejoins_cleanly() {
    let stack = Compose::up("netcut", 2, &[("FLEET_WORKER_CONCURRENCY", "8")]).await;
    let store = stack.store().await;
    let (ids, tasks) = sleep_tasks("cut", 0..60, 2500);
    let workers = worker_hosts(&stack);
    stack.submit(&tasks).await;

    let (victim, host, running) = busy_worker(&workers, &store, &ids).await;
    let redis_net = stack.network("redis");
    docker(&["network", "disconnect", &redis_net, &victim]);

    // Its leases expire; the reaper requeues the tasks and the other worker runs them.
    eventually(
        Duration::from_secs(30),
        "the cut-off worker's tasks ran elsewhere",
        || all_succeeded_now(&store, &running),
    )
    .await;
    // Its handlers finished meanwhile: their completions wait for Redis and are then fenced.
    tokio::time::sleep(Duration::from_secs(3)).await;
    docker(&["network", "connect", &redis_net, &victim]);
    wait_succeeded(&store, ids.len() as u64).await;

    // It rejoins: healthy again, and it runs new work.
    stack.wait_healthy(WAIT).await;
    let (later, tasks) = sleep_tasks("after", 0..80, 100);
    stack.submit(&tasks).await;
    wait_succeeded(&store, (ids.len() + later.len()) as u64).await;

    let all: Vec<String> = ids.iter().chain(&later).cloned().collect();
    let tasks = all_succeeded(&store, &all).await;
    for id in &all {
        let runs = &tasks[id].history;
        let successes: Vec<_> = runs
            .iter()
            .filter(|r| r.outcome == AttemptOutcome::Succeeded)
            .collect();
        assert_eq!(successes.len(), 1, "{id} succeeded once: {runs:?}");
        if running.contains(id) {
            // The late completion of attempt 1 was fenced: attempt 2 elsewhere is the result.
            assert_eq!(
                runs[0].outcome,
                AttemptOutcome::LeaseExpired,
                "{id}: {runs:?}"
            );
            assert!(successes[0].attempt >= 2, "{id}: {runs:?}");
            assert!(!successes[0].worker.starts_with(&host), "{id}: {runs:?}");
        }
    }
    let rejoined = later
        .iter()
        .flat_map(|id| &tasks[id].history)
        .any(|e| e.worker.starts_with(&host));
    assert!(rejoined, "the reconnected worker runs tasks again");
    let logs = compose::container_logs(&victim);
    assert!(
        logs.contains("No heartbeat for a whole lease"),
        "the worker noticed its lost leases"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_nothing_fails_nothing_and_reruns_nothing() {
    let stack = Compose::up("rolling", 3, &[("FLEET_WORKER_CONCURRENCY", "8")]).await;
    let store = stack.store().await;
    // Tasks of 200 ms, far shorter than the 5 s drain: a restart lets each finish.
    let (ids, tasks) = sleep_tasks("roll", 0..1500, 200);
    let submitter = async {
        for chunk in tasks.chunks(100) {
            stack.submit(chunk).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let restarts = async {
        wait_succeeded(&store, 50).await;
        for worker in stack.containers("worker") {
            // SIGTERM, the drain, then the same container again; one at a time.
            docker(&["restart", "--time", "15", &worker]);
            stack.wait_healthy(WAIT).await;
        }
    };
    tokio::join!(submitter, restarts);
    wait_succeeded(&store, ids.len() as u64).await;

    let tasks = all_succeeded(&store, &ids).await;
    for id in &ids {
        let runs = &tasks[id].history;
        assert_eq!(runs.len(), 1, "{id} ran once: {runs:?}");
        assert_eq!(tasks[id].attempt, 1, "{id}: {runs:?}");
    }
    assert_eq!(count(&store, State::Failed).await, 0);
    let drained = compose::container_logs(&stack.containers("worker")[0]);
    assert!(drained.contains("rain"), "the worker logged its drain");
}

/// What docs/operations.md promises after every replica of a service restarted at once: the stall
/// bound (twice the test stacks' 3 s session timeout, plus 5 s) and 20 s for the repair and a
/// new group's first assignment.
const GROUP_RECOVERY: Duration = Duration::from_secs(2 * 3 + 5 + 20);

/// Waits until every task of `ids` succeeded, at most `deadline`; returns how long it took.
async fn wait_all_succeeded(store: &Store, ids: &[String], deadline: Duration) -> Duration {
    let start = Instant::now();
    eventually(deadline, "the round's tasks succeed", || async {
        let tasks = compose::tasks(store, ids).await;
        tasks.len() == ids.len() && tasks.values().all(|t| t.state == State::Succeeded)
    })
    .await;
    start.elapsed()
}

/// `docker-compose stop worker && docker-compose start worker`, twenty times: every worker
/// leaves at once and comes back at once. Each round's tasks, submitted while the workers are
/// down, run within the documented bound, and every task runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_stopped_and_started_at_once_twenty_times_runs_every_task_once() {
    let stack = Compose::up("all-workers", 3, &[]).await;
    let store = stack.store().await;
    let mut ids = Vec::new();
    let mut slowest = Duration::ZERO;
    for round in 0..20 {
        stack.ok(&["stop", "worker"]);
        let (batch, tasks) = sleep_tasks(&format!("round{round}"), 0..10, 10);
        stack.submit(&tasks).await;
        stack.ok(&["start", "worker"]);
        slowest = slowest.max(wait_all_succeeded(&store, &batch, GROUP_RECOVERY).await);
        ids.extend(batch);
    }
    println!("slowest round: {slowest:?}");
    let tasks = all_succeeded(&store, &ids).await;
    for id in &ids {
        assert_eq!(tasks[id].history.len(), 1, "{id} ran once");
    }
}

/// Both schedulers recreated at once (`up -d --force-recreate scheduler`, as a changed
/// setting does), twenty times: each round's submissions on the submit topic are accepted and
/// run within the documented bound, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_schedulers_recreated_at_once_twenty_times_accept_every_submission() {
    let stack = Compose::up("all-schedulers", 1, &[]).await;
    let store = stack.store().await;
    let mut ids = Vec::new();
    for round in 0..20 {
        stack.ok(&["up", "-d", "--no-deps", "--force-recreate", "scheduler"]);
        let (batch, tasks) = sleep_tasks(&format!("round{round}"), 0..10, 10);
        stack.submit_on_topic(&tasks);
        wait_all_succeeded(&store, &batch, GROUP_RECOVERY).await;
        ids.extend(batch);
    }
    let tasks = all_succeeded(&store, &ids).await;
    for id in &ids {
        assert_eq!(tasks[id].history.len(), 1, "{id} ran once");
    }
}

/// The compose file refuses to start without an API token, and says which variable to set.
#[test]
fn compose_needs_an_api_token_and_says_so() {
    let out = std::process::Command::new("docker-compose")
        .arg("-f")
        .arg(fleet_testkit::workspace_root().join("deploy/docker-compose.yml"))
        .arg("config")
        .env_remove("FLEET_API_TOKEN")
        .output()
        .expect("docker-compose runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("set FLEET_API_TOKEN"), "{err}");
    let out = std::process::Command::new("docker-compose")
        .arg("-f")
        .arg(fleet_testkit::workspace_root().join("deploy/docker-compose.yml"))
        .args(["config", "--services"])
        .env("FLEET_API_TOKEN", compose::TOKEN)
        .output()
        .expect("docker-compose runs");
    let services = String::from_utf8_lossy(&out.stdout);
    for service in ["broker", "redis", "topics", "scheduler", "reaper", "worker"] {
        assert!(
            services.lines().any(|l| l == service),
            "{service}: {services}"
        );
    }
}
