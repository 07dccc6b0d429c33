//! Fault tests on the real stack. Each records every task it submits and, at the end, checks
//! the invariants of shared/DESIGN.md by counting: every task reaches exactly one terminal
//! state, executions never exceed attempts, stale attempts are fenced.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use fleet_integration_tests::fleet::{executions, log_events, task_json};
use fleet_integration_tests::{TestEnv, eventually};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

type Tasks = HashMap<String, HashMap<String, String>>;

fn field<'a>(tasks: &'a Tasks, id: &str, name: &str) -> &'a str {
    tasks
        .get(id)
        .and_then(|t| t.get(name))
        .map_or("", String::as_str)
}

/// Ids of tasks in `state` whose owner is `worker`.
async fn owned_by(env: &TestEnv, ids: &[String], worker: &str, state: &str) -> Vec<String> {
    env.tasks(ids)
        .await
        .into_iter()
        .filter(|(_, t)| t.get("worker").map(String::as_str) == Some(worker) && t["state"] == state)
        .map(|(id, _)| id)
        .collect()
}

/// Every execution is of a claimed attempt: executions ≤ attempts, attempts contiguous.
fn assert_executions_bounded(tasks: &Tasks, runs: &BTreeMap<String, Vec<(u64, String)>>) {
    for (id, task) in tasks {
        let attempts: u64 = task["attempt"].parse().unwrap();
        let ran = runs.get(id).cloned().unwrap_or_default();
        assert!(
            ran.len() as u64 <= attempts,
            "{id}: {} executions > {attempts} attempts: {ran:?}",
            ran.len()
        );
        let mut seen: Vec<u64> = ran.iter().map(|r| r.0).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(
            seen.len(),
            ran.len(),
            "{id}: an attempt executed twice: {ran:?}"
        );
    }
}

fn sleep_tasks(prefix: &str, n: usize, ms: u64, priority: &str) -> (Vec<String>, Vec<String>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let bodies = ids
        .iter()
        .map(|id| task_json(id, "sleep", priority, json!({ "ms": ms })))
        .collect();
    (ids, bodies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_tasks_run_again_elsewhere_within_lease_plus_reaper_period() {
    let env = TestEnv::start("killworker");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let conc = [("FLEET__WORKER__CONCURRENCY", "8")];
    let w0 = env.spawn("fleet-worker", "w0", &conc);
    let _w1 = env.spawn("fleet-worker", "w1", &conc);
    // Wait until both workers own partitions, so that a kill leaves a live one.
    eventually(WAIT, "both workers are live", || async {
        env.store()
            .await
            .live_workers(2_000)
            .await
            .unwrap()
            .iter()
            .filter(|(_, i)| !i.contains("\"normal\":[]"))
            .count()
            == 2
    })
    .await;

    let (ids, bodies) = sleep_tasks("k", 24, 2_000, "normal");
    env.submit(&bodies).await;
    eventually(WAIT, "w0 runs some tasks", || async {
        !owned_by(&env, &ids, "w0", "running").await.is_empty()
    })
    .await;
    let victims = owned_by(&env, &ids, "w0", "running").await;
    w0.signal("KILL");
    let killed_at = Instant::now();

    // lease 3 s + reaper period 0.5 s + 2 s
    let bound = Duration::from_millis(3_000 + 500 + 2_000);
    eventually(
        bound + Duration::from_secs(1),
        "the killed worker's tasks run again on w1",
        || async {
            let tasks = env.tasks(&victims).await;
            tasks.values().all(|t| {
                t.get("worker").map(String::as_str) == Some("w1") || t["state"] == "succeeded"
            })
        },
    )
    .await;
    let recovered = killed_at.elapsed();
    assert!(
        recovered <= bound,
        "recovery took {recovered:?}, bound {bound:?}"
    );

    let tasks = env.wait_terminal(&ids, WAIT).await;
    let runs = executions(&env, &["w0", "w1"]);
    for id in &ids {
        assert_eq!(
            field(&tasks, id, "state"),
            "succeeded",
            "{id}: {:?}",
            tasks[id]
        );
    }
    for id in &victims {
        assert_eq!(
            field(&tasks, id, "attempt"),
            "2",
            "{id} was requeued exactly once"
        );
    }
    assert_executions_bounded(&tasks, &runs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_worker_is_fenced_and_its_task_ends_once() {
    let env = TestEnv::start("zombie");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let w0 = env.spawn("fleet-worker", "w0", &[]);
    eventually(WAIT, "w0 is live", || async {
        env.store().await.live_workers(2_000).await.unwrap().len() == 1
    })
    .await;

    let (ids, bodies) = sleep_tasks("z", 1, 5_000, "high");
    env.submit(&bodies).await;
    eventually(WAIT, "w0 runs the task", || async {
        owned_by(&env, &ids, "w0", "running").await.len() == 1
    })
    .await;
    w0.signal("STOP");
    let _w1 = env.spawn("fleet-worker", "w1", &[]);
    eventually(
        WAIT,
        "the task is requeued and runs on w1 as attempt 2",
        || async {
            let t = env.tasks(&ids).await;
            field(&t, "z0", "worker") == "w1" && field(&t, "z0", "attempt") == "2"
        },
    )
    .await;
    w0.signal("CONT");

    let tasks = env.wait_terminal(&ids, WAIT).await;
    assert_eq!(field(&tasks, "z0", "state"), "succeeded");
    assert_eq!(field(&tasks, "z0", "attempt"), "2");
    assert_eq!(
        field(&tasks, "z0", "worker"),
        "w1",
        "the result is attempt 2's"
    );
    let runs = executions(&env, &["w0", "w1"]);
    assert_eq!(runs["z0"].len(), 2, "{:?}", runs["z0"]);
    assert_executions_bounded(&tasks, &runs);

    // The zombie learnt it lost the lease (heartbeat fenced) and stopped its handler, or its
    // late completion was fenced; it never recorded a result.
    eventually(
        Duration::from_secs(15),
        "the zombie reports its attempt fenced",
        || async {
            log_events(&env, &["w0"]).iter().any(|e| {
                e.get("task_id").and_then(|v| v.as_str()) == Some("z0")
                    && matches!(
                        e.get("message").and_then(|v| v.as_str()),
                        Some(
                            "Lease lost; stopping the handler."
                                | "Completion fenced: this attempt no longer owns the task."
                        )
                    )
            })
        },
    )
    .await;
    let zombie_success = log_events(&env, &["w0"])
        .iter()
        .any(|e| e.get("message").and_then(|v| v.as_str()) == Some("Task succeeded."));
    assert!(!zombie_success, "the zombie's completion must not count");
    let after = env.tasks(&ids).await;
    assert_eq!(
        after["z0"]["finished_ms"], tasks["z0"]["finished_ms"],
        "terminal state never changes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_schedulers_lose_no_submission_and_create_none_twice() {
    let env = TestEnv::start("killsched");
    env.create_topics().await;
    let s1 = env.spawn("fleet-scheduler", "s1", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let _w0 = env.spawn("fleet-worker", "w0", &[]);
    let _w1 = env.spawn("fleet-worker", "w1", &[]);

    // Submissions without ids: the scheduler derives them, so a replay must not duplicate.
    let total = 3_000;
    let bodies: Vec<String> = (0..total)
        .map(|n| json!({ "kind": "echo", "payload": { "n": n } }).to_string())
        .collect();
    env.submit(&bodies[..1_000]).await;
    let store = env.store().await;
    eventually(WAIT, "the first scheduler is accepting", || async {
        env.task_total().await > 0
    })
    .await;
    s1.signal("KILL");
    env.submit(&bodies[1_000..2_000]).await;
    let mut s2 = env.spawn("fleet-scheduler", "s2", &[]);
    eventually(
        WAIT,
        "the second scheduler accepted the first 2,000",
        || async { env.task_total().await >= 2_000 },
    )
    .await;
    // A graceful hand-over too: the next scheduler starts exactly at the committed offsets.
    s2.signal("TERM");
    assert_eq!(s2.wait_exit(Duration::from_secs(30)), Some(0));
    env.submit(&bodies[2_000..]).await;
    let _s3 = env.spawn("fleet-scheduler", "s3", &[]);

    eventually(WAIT, "every submission succeeded", || async {
        let counts: HashMap<String, u64> = store
            .counts()
            .await
            .unwrap()
            .into_iter()
            .map(|(s, n)| (s.to_string(), n))
            .collect();
        counts["succeeded"] >= total as u64
    })
    .await;
    let counts = store.counts().await.unwrap();
    let all: u64 = counts.iter().map(|(_, n)| n).sum();
    assert_eq!(
        all, total as u64,
        "exactly one task per submission: {counts:?}"
    );

    // Each payload n appears in exactly one task.
    let mut conn = env.redis_conn().await;
    let ids: Vec<String> = redis::cmd("ZRANGE")
        .arg(
            store
                .keys()
                .state_index(fleet_common::task::State::Succeeded),
        )
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let tasks = env.tasks(&ids).await;
    let mut seen = vec![0u32; total];
    for task in tasks.values() {
        let n = serde_json::from_str::<serde_json::Value>(&task["result"]).unwrap()["n"]
            .as_u64()
            .unwrap();
        seen[n as usize] += 1;
    }
    assert!(
        seen.iter().all(|&c| c == 1),
        "payloads seen other than once: {:?}",
        seen.iter()
            .enumerate()
            .filter(|(_, c)| **c != 1)
            .take(5)
            .collect::<Vec<_>>()
    );
    let runs = executions(&env, &["w0", "w1"]);
    assert_executions_bounded(&tasks, &runs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_reapers_and_a_killed_one_requeue_each_expired_lease_once() {
    let env = TestEnv::start("reapers");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let r1 = env.spawn("fleet-reaper", "r1", &[]);
    let _r2 = env.spawn("fleet-reaper", "r2", &[]);
    let doomed = env.spawn(
        "fleet-worker",
        "doomed",
        &[("FLEET__WORKER__CONCURRENCY", "300")],
    );
    let (ids, bodies) = sleep_tasks("r", 300, 60_000, "low");
    env.submit(&bodies).await;
    eventually(WAIT, "all 300 run on the doomed worker", || async {
        owned_by(&env, &ids, "doomed", "running").await.len() == 300
    })
    .await;
    doomed.signal("KILL");
    let _w = env.spawn(
        "fleet-worker",
        "survivor",
        &[("FLEET__WORKER__CONCURRENCY", "300")],
    );
    // Kill one reaper about when the leases expire, most likely mid-scan.
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    r1.signal("KILL");
    eventually(WAIT, "every task runs again on the survivor", || async {
        owned_by(&env, &ids, "survivor", "running").await.len() == 300
    })
    .await;

    let tasks = env.tasks(&ids).await;
    for id in &ids {
        assert_eq!(
            field(&tasks, id, "attempt"),
            "2",
            "{id} requeued exactly once: {:?}",
            tasks[id]
        );
    }
    let requeues = log_events(&env, &["r1", "r2"])
        .into_iter()
        .filter(|e| {
            e.get("message").and_then(|v| v.as_str()) == Some("Lease expired; task requeued.")
        })
        .fold(BTreeMap::<String, u32>::new(), |mut m, e| {
            *m.entry(e["task_id"].as_str().unwrap().to_string())
                .or_default() += 1;
            m
        });
    for id in &ids {
        assert!(
            requeues.get(id).copied().unwrap_or(0) <= 1,
            "{id} requeued {:?} times",
            requeues.get(id)
        );
    }
    let runs = executions(&env, &["doomed", "survivor"]);
    assert_executions_bounded(&tasks, &runs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_stale_deliveries_execute_once() {
    use fleet_common::store::{NewTask, Requeue};
    use fleet_common::task::{Envelope, TaskRecord, TaskSpec};
    use rdkafka::producer::FutureRecord;

    let env = TestEnv::start("dupes");
    env.create_topics().await;
    let settings = env.settings();
    let store = env.store().await;
    // Record two tasks straight in Redis (no scheduler, no relay: only this test publishes).
    let new = |id: &str| {
        let spec = TaskSpec::parse(
            format!(r#"{{"id":"{id}","kind":"sleep","payload":{{"ms":300}}}}"#).as_bytes(),
            1 << 20,
        )
        .unwrap();
        let record = TaskRecord::from_spec(
            spec,
            settings.tasks.defaults_for("sleep"),
            || unreachable!(),
        );
        NewTask {
            record_json: record.to_json(),
            record,
            idempotency_key: None,
            run_at_ms: 0,
            delay_ms: 0,
            trace: fleet_common::trace::TraceParent::new_root(),
        }
    };
    let (b, c) = (new("b"), new("c"));
    store.accept(&[b.clone(), c.clone()]).await.unwrap();
    // c: attempt 1 claimed by a worker that vanished, lease expired, requeued → next is 2.
    store.claim("ghost", 1, &[("c", 1)]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let expired = store.expired_leases(10).await.unwrap();
    assert!(matches!(
        store.requeue(&expired).await.unwrap()[..],
        [Requeue::Requeued(_)]
    ));

    let _w = env.spawn("fleet-worker", "w", &[]);
    let producer = env.producer();
    let topic =
        fleet_common::Topics::from_settings(&settings.topics).tasks(fleet_common::Priority::Normal);
    let deliveries = [
        (&b, 1),
        (&b, 1), // the same message twice
        (&c, 1), // a stale attempt
        (&c, 2),
        (&c, 2), // the current attempt, twice
        (&b, 1), // again, possibly after b finished
    ];
    for (task, attempt) in deliveries {
        let body = Envelope::encode(&task.record_json, attempt);
        producer
            .send(
                FutureRecord::<(), _>::to(&topic)
                    .payload(&body)
                    .partition(0),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let ids = vec!["b".to_string(), "c".to_string()];
    let tasks = env.wait_terminal(&ids, WAIT).await;
    assert_eq!(field(&tasks, "b", "state"), "succeeded");
    assert_eq!(field(&tasks, "c", "state"), "succeeded");
    assert_eq!(field(&tasks, "c", "attempt"), "2");
    // Let every delivery be consumed, then count executions.
    tokio::time::sleep(Duration::from_millis(500)).await;
    eventually(WAIT, "all deliveries consumed", || async {
        log_events(&env, &["w"])
            .iter()
            .filter(|e| {
                matches!(
                    e.get("message").and_then(|v| v.as_str()),
                    Some("Handler started.")
                )
            })
            .count()
            >= 2
    })
    .await;
    let runs = executions(&env, &["w"]);
    assert_eq!(
        runs["b"].iter().map(|r| r.0).collect::<Vec<_>>(),
        [1],
        "b ran once"
    );
    assert_eq!(
        runs["c"].iter().map(|r| r.0).collect::<Vec<_>>(),
        [2],
        "c ran once, as attempt 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_tasks_overtake_a_low_backlog_which_still_finishes() {
    let env = TestEnv::start("priority");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let _w = env.spawn("fleet-worker", "w", &[("FLEET__WORKER__CONCURRENCY", "2")]);
    let (low, low_bodies) = sleep_tasks("low", 60, 150, "low");
    env.submit(&low_bodies).await;
    eventually(
        WAIT,
        "the worker is saturated by the low backlog",
        || async { owned_by(&env, &low, "w", "running").await.len() == 2 },
    )
    .await;
    let (critical, critical_bodies) = sleep_tasks("crit", 10, 150, "critical");
    env.submit(&critical_bodies).await;

    let mut all = low.clone();
    all.extend(critical.iter().cloned());
    let tasks = env.wait_terminal(&all, WAIT).await;
    let start = |id: &String| {
        field(&tasks, id, "first_started_ms")
            .parse::<u64>()
            .unwrap()
    };
    let last_critical = critical.iter().map(start).max().unwrap();
    let mut low_starts: Vec<u64> = low.iter().map(start).collect();
    low_starts.sort_unstable();
    let low_after = low_starts.iter().filter(|s| **s > last_critical).count();
    assert!(
        low_after >= 30,
        "all critical tasks started before the low backlog drained: only {low_after} of 60 low tasks started later"
    );
    for id in &all {
        assert_eq!(
            field(&tasks, id, "state"),
            "succeeded",
            "{id} finished (no starvation)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_short_tasks_and_hands_long_ones_back_at_once() {
    let env = TestEnv::start("drain");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let grace = [("FLEET__WORKER__SHUTDOWN_GRACE_MS", "1500")];
    let mut w0 = env.spawn("fleet-worker", "w0", &grace);
    eventually(WAIT, "w0 is live", || async {
        env.store().await.live_workers(2_000).await.unwrap().len() == 1
    })
    .await;
    let (short, short_bodies) = sleep_tasks("short", 3, 500, "normal");
    let (long, long_bodies) = sleep_tasks("long", 3, 20_000, "normal");
    env.submit(&short_bodies).await;
    env.submit(&long_bodies).await;
    let mut all = short.clone();
    all.extend(long.iter().cloned());
    eventually(WAIT, "w0 runs all six", || async {
        owned_by(&env, &all, "w0", "running").await.len() == 6
    })
    .await;
    let _w1 = env.spawn("fleet-worker", "w1", &grace);
    // Let the group settle with both members before w0 leaves it.
    eventually(WAIT, "w1 owns partitions", || async {
        let live = env.store().await.live_workers(2_000).await.unwrap();
        live.iter()
            .any(|(id, info)| id == "w1" && !info.contains("\"normal\":[]"))
    })
    .await;

    w0.signal("TERM");
    assert_eq!(
        w0.wait_exit(Duration::from_secs(20)),
        Some(0),
        "a drained worker exits 0"
    );

    let tasks = env.wait_terminal(&all, WAIT).await;
    for id in &short {
        assert_eq!(field(&tasks, id, "state"), "succeeded");
        assert_eq!(
            field(&tasks, id, "attempt"),
            "1",
            "{id} finished within the grace period"
        );
        assert_eq!(field(&tasks, id, "worker"), "w0");
    }
    for id in &long {
        assert_eq!(
            field(&tasks, id, "state"),
            "succeeded",
            "{id}: {:?}",
            tasks[id]
        );
        assert_eq!(
            field(&tasks, id, "released"),
            "1",
            "{id} was handed back, not failed"
        );
        assert_eq!(field(&tasks, id, "attempt"), "2");
        assert_eq!(
            field(&tasks, id, "last_error"),
            "",
            "a hand-back is not a failure"
        );
    }
    // Handed back, not reaped: the reaper never saw an expired lease for them.
    let reaped: Vec<_> = log_events(&env, &["reaper"])
        .into_iter()
        .filter(|e| {
            e.get("message").and_then(|v| v.as_str()) == Some("Lease expired; task requeued.")
        })
        .collect();
    assert!(reaped.is_empty(), "no lease wait: {reaped:?}");
    let runs = executions(&env, &["w0", "w1"]);
    assert_executions_bounded(&tasks, &runs);
    for id in &short {
        assert_eq!(runs[id].len(), 1, "{id} ran once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_crashes_its_worker_every_time_fails_after_max_attempts_and_the_rest_runs() {
    let env = TestEnv::start("poison");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let mut workers = vec![
        env.spawn("fleet-worker", "w0", &[]),
        env.spawn("fleet-worker", "w1", &[]),
    ];
    let (mut ids, mut bodies) = sleep_tasks("ok", 40, 100, "normal");
    ids.push("poison".into());
    bodies.push(r#"{"id":"poison","kind":"crash","max_attempts":3}"#.into());
    env.submit(&bodies).await;

    // Like a replica set: a worker that dies is started again (with a new name).
    let mut restarts = 0;
    let deadline = Instant::now() + WAIT;
    loop {
        let tasks = env.tasks(&ids).await;
        let done = tasks.len() == ids.len()
            && tasks
                .values()
                .all(|t| matches!(t["state"].as_str(), "succeeded" | "failed"));
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not finished: {:?}",
            tasks.get("poison")
        );
        for slot in &mut workers {
            if !slot.is_running() {
                restarts += 1;
                *slot = env.spawn("fleet-worker", &format!("w-restart{restarts}"), &[]);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tasks = env.tasks(&ids).await;
    assert_eq!(field(&tasks, "poison", "state"), "failed");
    assert_eq!(
        field(&tasks, "poison", "attempt"),
        "3",
        "attempts are counted at claim, so crashes count"
    );
    assert!(
        field(&tasks, "poison", "error").contains("no attempts left"),
        "{:?}",
        tasks["poison"]
    );
    assert_eq!(
        restarts, 3,
        "the poison task killed a worker once per attempt"
    );
    for id in ids.iter().filter(|id| *id != "poison") {
        assert_eq!(field(&tasks, id, "state"), "succeeded", "{id}");
    }

    // Its dead-letter record is on the dead topic.
    let dead = fleet_common::Topics::from_settings(&env.settings().topics).dead();
    let record = env.read_topic(&dead, 1, WAIT).await[0].json();
    assert_eq!(record["id"], "poison");
    assert_eq!(record["attempts"], 3);
    assert_eq!(record["envelope"]["task"]["kind"], "crash");
    assert_eq!(record["envelope"]["attempt"], 3);
    assert!(record["error"].as_str().unwrap().contains("lease expired"));
    let history = record["history"].as_array().expect("attempt history");
    assert_eq!(history.len(), 3, "one entry per attempt: {history:?}");
    for (n, entry) in history.iter().enumerate() {
        assert_eq!(entry["attempt"], n as u64 + 1);
        assert_eq!(entry["outcome"], "lease_expired");
        assert!(entry["worker"].as_str().is_some_and(|w| !w.is_empty()));
    }
}
