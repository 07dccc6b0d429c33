//! Fault tests on the real stack. Each records every task it submits and, at the end, checks
//! the invariants of docs/architecture.md (Guarantees) by counting: every task reaches exactly one terminal
//! state, executions never exceed attempts, stale attempts are fenced.

use fleet_common::store::{AttemptOutcome, StoredTask};
use fleet_common::task::State;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use fleet_testkit::fleet::{executions, log_events, task_json};
use fleet_testkit::{TestEnv, eventually};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

type Tasks = HashMap<String, StoredTask>;

/// Ids of tasks in `state` whose owner is `worker`.
async fn owned_by(env: &TestEnv, ids: &[String], worker: &str, state: State) -> Vec<String> {
    env.tasks(ids)
        .await
        .into_iter()
        .filter(|(_, t)| t.worker.as_deref() == Some(worker) && t.state == state)
        .map(|(id, _)| id)
        .collect()
}

/// Waits until every one of `ids` runs on `worker`.
async fn wait_all_running_on(env: &TestEnv, ids: &[String], worker: &str) {
    eventually(
        WAIT,
        &format!("{} tasks running on {worker}", ids.len()),
        || async { owned_by(env, ids, worker, State::Running).await.len() == ids.len() },
    )
    .await;
}

/// Waits until `worker` heartbeats with partitions of the normal topic.
async fn wait_owns_partitions(store: &fleet_common::store::Store, worker: &str) {
    eventually(WAIT, &format!("{worker} owns partitions"), || async {
        let live = store.live_workers(2_000).await.unwrap();
        live.iter().any(|(id, info)| {
            id == worker
                && info
                    .partitions_of(fleet_common::Priority::Normal)
                    .is_some_and(|p| !p.is_empty())
        })
    })
    .await;
}

/// Every execution is of a claimed attempt: executions ≤ attempts, attempts contiguous.
fn assert_executions_bounded(tasks: &Tasks, runs: &BTreeMap<String, Vec<(u64, String)>>) {
    for (id, task) in tasks {
        let attempts = u64::from(task.attempt);
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
            .filter(|(_, i)| {
                i.partitions_of(fleet_common::Priority::Normal)
                    .is_some_and(|p| !p.is_empty())
            })
            .count()
            == 2
    })
    .await;

    let (ids, bodies) = sleep_tasks("k", 24, 2_000, "normal");
    env.submit(&bodies).await;
    eventually(WAIT, "w0 runs some tasks", || async {
        !owned_by(&env, &ids, "w0", State::Running).await.is_empty()
    })
    .await;
    let victims = owned_by(&env, &ids, "w0", State::Running).await;
    w0.signal("KILL");
    let killed_at = Instant::now();

    // lease 3 s + reaper period 0.5 s + 2 s
    let bound = Duration::from_millis(3_000 + 500 + 2_000);
    eventually(
        bound + Duration::from_secs(1),
        "the killed worker's tasks run again on w1",
        || async {
            let tasks = env.tasks(&victims).await;
            tasks
                .values()
                .all(|t| t.worker.as_deref() == Some("w1") || t.state == State::Succeeded)
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
        assert_eq!(tasks[id].state, State::Succeeded, "{id}: {:?}", tasks[id]);
    }
    for id in &victims {
        assert_eq!(tasks[id].attempt, 2, "{id} was requeued exactly once");
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
    wait_all_running_on(&env, &ids, "w0").await;
    w0.signal("STOP");
    let _w1 = env.spawn("fleet-worker", "w1", &[]);
    eventually(
        WAIT,
        "the task is requeued and runs on w1 as attempt 2",
        || async {
            let t = env.tasks(&ids).await;
            t["z0"].worker.as_deref() == Some("w1") && t["z0"].attempt == 2
        },
    )
    .await;
    w0.signal("CONT");

    let tasks = env.wait_terminal(&ids, WAIT).await;
    assert_eq!(tasks["z0"].state, State::Succeeded);
    assert_eq!(tasks["z0"].attempt, 2);
    assert_eq!(
        tasks["z0"].worker.as_deref(),
        Some("w1"),
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
        after["z0"].finished_ms, tasks["z0"].finished_ms,
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
        let n = serde_json::from_str::<serde_json::Value>(task.result.as_deref().unwrap()).unwrap()
            ["n"]
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
    wait_all_running_on(&env, &ids, "doomed").await;
    doomed.signal("KILL");
    let _w = env.spawn(
        "fleet-worker",
        "survivor",
        &[("FLEET__WORKER__CONCURRENCY", "300")],
    );
    // Kill one reaper about when the leases expire, most likely mid-scan.
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    r1.signal("KILL");
    wait_all_running_on(&env, &ids, "survivor").await;

    let tasks = env.tasks(&ids).await;
    for id in &ids {
        assert_eq!(
            tasks[id].attempt, 2,
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
    use fleet_common::store::Requeue;

    let env = TestEnv::start("dupes");
    env.create_topics().await;
    let store = env.store().await;
    // Record two tasks straight in Redis (no scheduler, no relay: only this test publishes).
    let new = |id: &str| {
        env.new_task(&format!(
            r#"{{"id":"{id}","kind":"sleep","payload":{{"ms":300}}}}"#
        ))
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
    let deliveries = [
        (&b, 1),
        (&b, 1), // the same message twice
        (&c, 1), // a stale attempt
        (&c, 2),
        (&c, 2), // the current attempt, twice
        (&b, 1), // again, possibly after b finished
    ];
    for (task, attempt) in deliveries {
        env.publish_attempt(task, attempt).await;
    }
    let ids = vec!["b".to_string(), "c".to_string()];
    let tasks = env.wait_terminal(&ids, WAIT).await;
    assert_eq!(tasks["b"].state, State::Succeeded);
    assert_eq!(tasks["c"].state, State::Succeeded);
    assert_eq!(tasks["c"].attempt, 2);
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

/// The lost-reply tests' start: task `l` accepted, and a reply-cut proxy in front of Redis for
/// the worker. The claim script is loaded first, or a cut request would be an EVALSHA answered
/// NOSCRIPT, which claims nothing.
async fn lost_reply_stack(
    name: &str,
) -> (
    TestEnv,
    fleet_common::store::Store,
    fleet_common::store::NewTask,
    fleet_testkit::reply_cut::ReplyCut,
) {
    let env = TestEnv::start(name);
    env.create_topics().await;
    let store = env.store().await;
    let task = env.new_task(r#"{"id":"l","kind":"noop"}"#);
    store.accept(std::slice::from_ref(&task)).await.unwrap();
    store
        .claim("nobody", 1_000, &[("unknown", 1)])
        .await
        .unwrap();
    let proxy = env.reply_cut_proxy().await;
    (env, store, task, proxy)
}

/// A claim call can run in Redis while its reply never reaches the worker (a timeout, a reset
/// connection): here a proxy between the worker and Redis cuts the connection of the claim
/// after passing it on. The worker's retry of that call is answered `owned` for the task the
/// lost try claimed, and runs it at once, once, instead of leaving it running with no handler
/// until its lease runs out (no reaper runs here to rescue it).
#[tokio::test]
async fn an_attempt_claimed_by_a_call_whose_reply_was_lost_runs_on_its_worker() {
    let (env, store, task, proxy) = lost_reply_stack("lostreply").await;
    let url = proxy.url();
    let _w = env.spawn("fleet-worker", "w", &[("FLEET__REDIS__URL", &url)]);
    wait_owns_partitions(&store, "w").await;

    // The claim names the task's key; its reply is lost.
    proxy.cut_reply_of(format!("{}\r\n", store.keys().task("l")).as_bytes());
    env.publish_attempt(&task, 1).await;

    let ids = vec!["l".to_string()];
    let tasks = env.wait_terminal(&ids, Duration::from_secs(30)).await;
    assert!(proxy.has_cut(), "the claim's reply was lost");
    assert_eq!(tasks["l"].state, State::Succeeded);
    assert_eq!(tasks["l"].attempt, 1);
    assert_eq!(tasks["l"].worker.as_deref(), Some("w"));
    let runs = executions(&env, &["w"]);
    assert_eq!(runs["l"], [(1, "w".to_string())], "ran once, on w");
    assert!(
        log_events(&env, &["w"]).iter().any(|e| {
            e.get("message").and_then(|m| m.as_str()) == Some("Failed claiming tasks; retrying.")
        }),
        "w retried its claim"
    );
}

/// A worker told to stop while it retries a claim whose replies are lost: the claim ran in
/// Redis, so the task is `running` on it with no handler. The hand-back releases it with the
/// running ones, and another worker runs it at once; no reaper runs here, so nothing else
/// could free it before its lease expires.
// Multi-threaded: the proxy must keep serving while the test blocks waiting for w to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_while_its_claims_replies_are_lost_hands_the_claimed_task_back() {
    let (env, store, task, proxy) = lost_reply_stack("lostreply-stop").await;
    let url = proxy.url();
    let mut w = env.spawn(
        "fleet-worker",
        "w",
        &[
            ("FLEET__REDIS__URL", &url),
            // Leases far longer than the test: only the hand-back can free the task.
            ("FLEET__LEASE__LEASE_MS", "600000"),
        ],
    );
    wait_owns_partitions(&store, "w").await;

    // Every claim call's reply is lost.
    proxy.cut_replies_of(fleet_common::store::scripts::CLAIM.get_hash().as_bytes());
    env.publish_attempt(&task, 1).await;
    let ids = vec!["l".to_string()];
    eventually(WAIT, "l claimed in Redis while w retries", || async {
        proxy.cuts() >= 2 && env.tasks(&ids).await["l"].state == State::Running
    })
    .await;

    w.signal("TERM");
    assert_eq!(w.wait_exit(WAIT), Some(0), "w drained");
    let tasks = env.tasks(&ids).await;
    assert_eq!(tasks["l"].state, State::Pending, "handed back");
    assert_eq!(tasks["l"].released, Some(1), "not charged");
    assert!(
        tasks["l"]
            .history
            .iter()
            .any(|e| e.outcome == AttemptOutcome::Released),
        "{tasks:?}"
    );

    // Another worker and the relay take it from there: attempt 2 runs once, on w2.
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _w2 = env.spawn("fleet-worker", "w2", &[]);
    let tasks = env.wait_terminal(&ids, WAIT).await;
    assert_eq!(tasks["l"].state, State::Succeeded);
    assert_eq!(tasks["l"].attempt, 2);
    let runs = executions(&env, &["w", "w2"]);
    assert_eq!(runs["l"], [(2, "w2".to_string())], "ran once, on w2");
}

/// A task's lease can lapse while its worker still runs it (Redis out of reach for a lease),
/// and its next attempt can reach the same worker before a heartbeat tells it the old one is
/// lost. The worker then stops the old attempt's handler: it never runs beside the new one,
/// and never finishes to have its outcome fenced.
#[tokio::test]
async fn a_newer_attempt_claimed_on_the_same_worker_stops_the_older_one() {
    use fleet_common::store::{Claim, Requeue};

    let env = TestEnv::start("newer");
    env.create_topics().await;
    let store = env.store().await;
    // Deaf to cancellation: only an abort stops it before its 6 s are up.
    let task = env.new_task(
        r#"{"id":"n","kind":"sleep","max_attempts":3,"payload":{"ms":6000,"ignore_cancel":true}}"#,
    );
    store.accept(std::slice::from_ref(&task)).await.unwrap();
    // Heartbeats far apart, so none tells the worker that attempt 1 was lost.
    let _w = env.spawn(
        "fleet-worker",
        "w",
        &[
            ("FLEET__LEASE__LEASE_MS", "180000"),
            ("FLEET__LEASE__HEARTBEAT_MS", "60000"),
        ],
    );
    env.publish_attempt(&task, 1).await;
    eventually(WAIT, "attempt 1 running on w", || async {
        let t = env.tasks(&["n".to_string()]).await;
        t["n"].state == State::Running
    })
    .await;
    // Its lease lapses; a reaper requeues it, and attempt 2 goes to the same worker.
    env.expire_lease(&store, "n").await;
    let expired = store.expired_leases(10).await.unwrap();
    assert!(matches!(
        store.requeue(&expired).await.unwrap()[..],
        [Requeue::Requeued(_)]
    ));
    env.publish_attempt(&task, 2).await;

    let ids = vec!["n".to_string()];
    let tasks = env.wait_terminal(&ids, WAIT).await;
    assert_eq!(tasks["n"].state, State::Succeeded);
    assert_eq!(tasks["n"].attempt, 2);
    assert_eq!(
        store.claim("w", 1_000, &[("n", 2)]).await.unwrap(),
        [Claim::Done]
    );
    let runs = executions(&env, &["w"]);
    assert_eq!(
        runs["n"],
        [(1, "w".to_string()), (2, "w".to_string())],
        "one execution per attempt"
    );
    let events = log_events(&env, &["w"]);
    let said = |message: &str| {
        events.iter().any(|e| {
            e.get("message").and_then(|m| m.as_str()) == Some(message)
                && e.get("attempt").and_then(serde_json::Value::as_u64) == Some(1)
        })
    };
    assert!(said(
        "A newer attempt was claimed; stopping this one's handler."
    ));
    // Attempt 1 started first; had it slept its 6 s, its outcome would have been fenced
    // before attempt 2 ended.
    assert!(
        !said("Completion fenced: this attempt no longer owns the task."),
        "attempt 1's handler ran to its end beside attempt 2"
    );
}

/// A draining worker leaves the consumer group as its drain starts: a worker that joins
/// meanwhile (the next replica of a rolling deploy) gets partitions and runs new tasks while
/// the first still finishes its long ones, instead of waiting for that drain to end. Every
/// task runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_joining_while_another_drains_gets_partitions_at_once() {
    let env = TestEnv::start("joindrain");
    env.create_topics().await;
    let store = env.store().await;
    let _s = env.spawn("fleet-scheduler", "s", &[]);
    let mut a = env.spawn(
        "fleet-worker",
        "a",
        &[("FLEET__WORKER__SHUTDOWN_GRACE_MS", "30000")],
    );
    let (long, long_bodies) = sleep_tasks("long", 4, 12_000, "normal");
    env.submit(&long_bodies).await;
    wait_all_running_on(&env, &long, "a").await;

    a.signal("TERM");
    // b starts once a is out of the group: the local broker (tansu 0.6) loses track of a
    // group whose member leaves while another's join is under way (docs/operations.md: notes
    // on the local broker).
    eventually(
        Duration::from_secs(10),
        "a left the consumer group",
        || async {
            log_events(&env, &["a"]).iter().any(|e| {
                e.get("message").and_then(|m| m.as_str())
                    == Some("Left the consumer group; draining the running tasks.")
            })
        },
    )
    .await;
    let _b = env.spawn("fleet-worker", "b", &[]);
    wait_owns_partitions(&store, "b").await;
    let (short, short_bodies) = sleep_tasks("short", 8, 10, "normal");
    env.submit(&short_bodies).await;
    let tasks = env.wait_terminal(&short, WAIT).await;
    assert!(
        a.is_running(),
        "b took partitions and ran new tasks while a still drained"
    );
    for id in &short {
        assert_eq!(tasks[id].state, State::Succeeded);
        assert_eq!(tasks[id].worker.as_deref(), Some("b"));
    }

    assert_eq!(a.wait_exit(Duration::from_secs(40)), Some(0), "a drained");
    let tasks = env.wait_terminal(&long, WAIT).await;
    for id in &long {
        assert_eq!(tasks[id].state, State::Succeeded);
        assert_eq!(tasks[id].attempt, 1, "{id} finished on a");
        assert_eq!(tasks[id].worker.as_deref(), Some("a"));
    }
    let runs = executions(&env, &["a", "b"]);
    for id in long.iter().chain(&short) {
        assert_eq!(runs[id].len(), 1, "{id} ran once: {:?}", runs[id]);
    }
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
        || async { owned_by(&env, &low, "w", State::Running).await.len() == 2 },
    )
    .await;
    let (critical, critical_bodies) = sleep_tasks("crit", 10, 150, "critical");
    env.submit(&critical_bodies).await;

    let mut all = low.clone();
    all.extend(critical.iter().cloned());
    let tasks = env.wait_terminal(&all, WAIT).await;
    let start = |id: &String| tasks[id].first_started_ms.unwrap();
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
            tasks[id].state,
            State::Succeeded,
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
    wait_all_running_on(&env, &all, "w0").await;
    let _w1 = env.spawn("fleet-worker", "w1", &grace);
    // Let the group settle with both members before w0 leaves it.
    wait_owns_partitions(&env.store().await, "w1").await;

    w0.signal("TERM");
    assert_eq!(
        w0.wait_exit(Duration::from_secs(20)),
        Some(0),
        "a drained worker exits 0"
    );

    let tasks = env.wait_terminal(&all, WAIT).await;
    for id in &short {
        assert_eq!(tasks[id].state, State::Succeeded);
        assert_eq!(
            tasks[id].attempt, 1,
            "{id} finished within the grace period"
        );
        assert_eq!(tasks[id].worker.as_deref(), Some("w0"));
    }
    for id in &long {
        assert_eq!(tasks[id].state, State::Succeeded, "{id}: {:?}", tasks[id]);
        assert_eq!(
            tasks[id].released,
            Some(1),
            "{id} was handed back, not failed"
        );
        assert_eq!(tasks[id].attempt, 2);
        assert_eq!(
            tasks[id].last_error.as_deref().unwrap_or_default(),
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
                .all(|t| matches!(t.state.as_str(), "succeeded" | "failed"));
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
    assert_eq!(tasks["poison"].state, State::Failed);
    assert_eq!(
        tasks["poison"].attempt, 3,
        "attempts are counted at claim, so crashes count"
    );
    assert!(
        tasks["poison"]
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("no attempts left"),
        "{:?}",
        tasks["poison"]
    );
    assert_eq!(
        restarts, 3,
        "the poison task killed a worker once per attempt"
    );
    for id in ids.iter().filter(|id| *id != "poison") {
        assert_eq!(tasks[id].state, State::Succeeded, "{id}");
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
