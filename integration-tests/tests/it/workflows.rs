//! Dependencies and workflows with the real binaries: diamonds through kill -9 of a worker and
//! a scheduler, each `on_parent_failure` policy, cancel of a workflow mid-run, parents kept
//! for their children, and submissions refused whole. Every task is counted.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use fleet_common::Topics;
use fleet_common::store::{AttemptOutcome, StoredTask};
use fleet_common::task::State;
use fleet_testkit::fleet::executions;
use fleet_testkit::http::request;
use fleet_testkit::{TestEnv, eventually};
use serde_json::{Value, json};

const TOKEN: &str = "test-token-0123456789";

fn result(task: &StoredTask) -> Value {
    serde_json::from_str(task.result.as_deref().unwrap_or("null")).unwrap()
}

/// When the task's first attempt started (Redis ms).
fn first_start(task: &StoredTask) -> u64 {
    task.history
        .first()
        .map(|h| h.started_ms)
        .or(task.first_started_ms)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn diamonds_join_once_after_both_parents_through_kills_of_a_worker_and_a_scheduler() {
    let env = TestEnv::start("wf-diamonds");
    env.create_topics().await;
    let mut schedulers = [
        env.spawn("fleet-scheduler", "scheduler-1", &[]),
        env.spawn("fleet-scheduler", "scheduler-2", &[]),
    ];
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let mut workers: Vec<_> = ["w1", "w2", "w3"]
        .iter()
        .map(|name| env.spawn("fleet-worker", name, &[]))
        .collect();

    // 200 diamonds A → B, C → D, each one batch record; random sleeps up to 1 s.
    let mut ids: Vec<String> = Vec::new();
    let mut records = Vec::new();
    let mut sleep = 17u64;
    let mut next_ms = || {
        sleep = (sleep * 7919 + 13) % 1001;
        sleep
    };
    for i in 0..200 {
        let [a, b, c, d] = ["a", "b", "c", "d"].map(|s| format!("dia{i}-{s}"));
        let batch = json!([
            {"id": a, "kind": "sleep", "payload": {"ms": next_ms()}},
            {"id": b, "kind": "sleep", "payload": {"ms": next_ms()}, "depends_on": [a]},
            {"id": c, "kind": "sleep", "payload": {"ms": next_ms()}, "depends_on": [a]},
            {"id": d, "kind": "gather", "payload": {"ms": next_ms() / 3}, "depends_on": [b, c]},
        ]);
        records.push(batch.to_string());
        ids.extend([a, b, c, d]);
    }
    env.submit(&records[..100]).await;
    // Kill -9 a worker and a scheduler while diamonds are on their way (some done, many
    // running or waiting), and restart both.
    let store = env.store().await;
    eventually(Duration::from_secs(60), "100 tasks succeeded", || async {
        store
            .counts()
            .await
            .unwrap()
            .into_iter()
            .any(|(s, n)| s == State::Succeeded && n >= 100)
    })
    .await;
    workers[0].signal("KILL");
    schedulers[0].signal("KILL");
    env.submit(&records[100..]).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    workers[0] = env.spawn("fleet-worker", "w1-again", &[]);
    schedulers[0] = env.spawn("fleet-scheduler", "scheduler-1-again", &[]);

    let tasks = env.wait_terminal(&ids, Duration::from_secs(120)).await;
    assert_eq!(tasks.len(), 800, "every task of every diamond exists");
    let requeued = tasks
        .values()
        .filter(|t| {
            t.history
                .iter()
                .any(|h| h.outcome == AttemptOutcome::LeaseExpired)
        })
        .count();
    println!("tasks requeued after the kill: {requeued}");
    assert!(requeued > 0, "the killed worker held running tasks");
    let runs = executions(&env, &["w1", "w2", "w3", "w1-again"]);
    for i in 0..200 {
        let [a, b, c, d] = ["a", "b", "c", "d"].map(|s| &tasks[&format!("dia{i}-{s}")]);
        for t in [a, b, c, d] {
            assert_eq!(
                t.state,
                State::Succeeded,
                "{} ended {:?}: {:?}",
                t.id,
                t.state,
                t.error
            );
            assert_eq!(
                t.workflow.as_deref(),
                Some(a.id.as_str()),
                "{}'s workflow",
                t.id
            );
        }
        // Released only once both parents had succeeded: no attempt of D started before.
        let parents_done = b.finished_ms.unwrap().max(c.finished_ms.unwrap());
        assert!(
            first_start(d) >= parents_done,
            "{} started at {} before its parents ended at {parents_done}",
            d.id,
            first_start(d)
        );
        for (child, parent) in [(b, a), (c, a)] {
            assert!(
                first_start(child) >= parent.finished_ms.unwrap(),
                "{} ran before {}",
                child.id,
                parent.id
            );
        }
        // D read both results, as they are stored.
        let read = result(d);
        let read = read["parents"].as_array().expect("parents");
        assert_eq!(read.len(), 2, "{}: {read:?}", d.id);
        for (got, parent) in read.iter().zip([b, c]) {
            assert_eq!(got["id"], json!(parent.id));
            assert_eq!(got["state"], json!("succeeded"));
            assert_eq!(got["result"], result(parent), "{} read {}", d.id, parent.id);
        }
        // One handler run per attempt, and no more attempts than a kill explains.
        let d_runs = runs.get(&d.id).map_or(0, Vec::len);
        assert!((1..=2).contains(&d_runs), "{} ran {d_runs} times", d.id);
        assert!(
            d.attempt as usize >= d_runs,
            "{}: attempt {} for {d_runs} runs",
            d.id,
            d.attempt
        );
    }
    // Nothing left waiting, no open workflow, no children set.
    assert!(store.open_workflows().await.unwrap().is_empty());
    let counts: HashMap<State, u64> = store.counts().await.unwrap().into_iter().collect();
    assert_eq!(counts[&State::Waiting], 0);
    assert_eq!(counts[&State::Succeeded], 800);
    let mut conn = env.redis_conn().await;
    let children: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", store.keys().children("")))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(children.is_empty(), "children sets left: {children:?}");
}

/// Submits `body` (a task or an array) over HTTP; returns the status and body.
async fn post(addr: std::net::SocketAddr, body: &Value) -> (u16, Value) {
    let r = request(
        addr,
        "POST",
        "/v1/tasks",
        Some(TOKEN),
        Some(body.to_string().as_bytes()),
    )
    .await;
    (r.status, r.json())
}

#[tokio::test(flavor = "multi_thread")]
async fn each_parent_failure_policy_a_workflow_cancel_and_kept_parents() {
    let env = TestEnv::start("wf-policies");
    env.create_topics().await;
    // A short retention, so that a parent kept for its child is visible as such; a small
    // result limit, so that a result over it is refused.
    let short = [
        ("FLEET__HTTP__TOKENS", TOKEN),
        ("FLEET__TASKS__RETENTION_MS", "3000"),
        ("FLEET__TASKS__MAX_RESULT_BYTES", "2048"),
    ];
    let (_scheduler, addr) = env.spawn_api("scheduler", &short).await;
    let _reaper = env.spawn("fleet-reaper", "reaper", &short[1..]);
    let _workers: Vec<_> = ["w1", "w2"]
        .iter()
        .map(|name| env.spawn("fleet-worker", name, &short[1..]))
        .collect();
    let fail = json!({"message": "boom"});

    // fail (default): a chain after a failed task fails link by link.
    // skip: skipped, and a child of a skipped task is skipped too.
    // run: runs after every parent ended and reads how each ended.
    let (status, body) = post(addr, &json!([
        {"id": "f-a", "kind": "fail", "payload": fail},
        {"id": "f-b", "kind": "noop", "depends_on": ["f-a"]},
        {"id": "f-c", "kind": "noop", "depends_on": ["f-b"]},
        {"id": "s-a", "kind": "fail", "payload": fail},
        {"id": "s-b", "kind": "noop", "depends_on": ["s-a"], "on_parent_failure": "skip"},
        {"id": "s-c", "kind": "noop", "depends_on": ["s-b"]},
        {"id": "r-a", "kind": "fail", "payload": fail},
        {"id": "r-a2", "kind": "echo", "payload": {"n": 42}},
        {"id": "r-b", "kind": "gather", "depends_on": ["r-a", "r-a2"], "on_parent_failure": "run"},
    ]))
    .await;
    assert_eq!(status, 201, "{body}");
    let states: Vec<&str> = body["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert!(
        states.iter().all(|s| ["pending", "waiting"].contains(s)),
        "{states:?}"
    );
    let ids: Vec<String> = [
        "f-a", "f-b", "f-c", "s-a", "s-b", "s-c", "r-a", "r-a2", "r-b",
    ]
    .map(String::from)
    .to_vec();
    let tasks = env.wait_terminal(&ids, Duration::from_secs(30)).await;
    let st = |id: &str| (tasks[id].state, tasks[id].error.clone().unwrap_or_default());
    assert_eq!(st("f-b"), (State::Failed, "dependency f-a failed".into()));
    assert_eq!(st("f-c"), (State::Failed, "dependency f-b failed".into()));
    assert_eq!(st("s-b"), (State::Skipped, "dependency s-a failed".into()));
    assert_eq!(
        st("s-c"),
        (State::Skipped, "dependency s-b was skipped".into())
    );
    assert_eq!(tasks["r-b"].state, State::Succeeded);
    let read = result(&tasks["r-b"]);
    assert_eq!(read["parents"][0]["state"], json!("failed"));
    assert_eq!(read["parents"][0]["error"], json!("boom"));
    assert_eq!(read["parents"][1]["result"], json!({"n": 42}));
    // Nothing that did not run has an attempt.
    for id in ["f-b", "f-c", "s-b", "s-c"] {
        assert_eq!(tasks[id].attempt, 0, "{id} never ran");
    }
    let runs = executions(&env, &["w1", "w2"]);
    for id in ["f-b", "f-c", "s-b", "s-c"] {
        assert!(!runs.contains_key(id), "{id} ran");
    }

    // A parent is kept (no expiry) while a child of it waits, and expires after the child.
    let (status, _) = post(
        addr,
        &json!([
            {"id": "k-fast", "kind": "echo", "payload": "fast result"},
            {"id": "k-slow", "kind": "sleep", "payload": {"ms": 5000}},
            {"id": "k-child", "kind": "gather", "depends_on": ["k-fast", "k-slow"]},
        ]),
    )
    .await;
    assert_eq!(status, 201);
    let store = env.store().await;
    let mut conn = env.redis_conn().await;
    eventually(Duration::from_secs(10), "k-fast succeeds", || async {
        store
            .task("k-fast")
            .await
            .unwrap()
            .is_some_and(|t| t.state == State::Succeeded)
    })
    .await;
    // Past its retention (3 s), it is still there: its child has not run.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg(store.keys().task("k-fast"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ttl, -1, "a parent with a waiting child does not expire");
    let child = env
        .wait_terminal(&["k-child".to_string()], Duration::from_secs(15))
        .await;
    assert_eq!(
        result(&child["k-child"])["parents"][0]["result"],
        json!("fast result")
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(store.keys().task("k-fast"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (1..=3000).contains(&ttl),
        "after its child, the parent expires: {ttl}"
    );

    // Cancel of a parent: its child ends cancelled. Cancel of a workflow mid-run: every member
    // not ended is cancelled once; a second cancel changes nothing.
    let (status, body) = post(addr, &json!([
        {"id": "w-a", "kind": "sleep", "payload": {"ms": 20000}, "workflow": "nightly"},
        {"id": "w-b", "kind": "noop", "depends_on": ["w-a"]},
        {"id": "w-c", "kind": "noop", "depends_on": ["w-a"], "on_parent_failure": "run"},
        {"id": "w-d", "kind": "gather", "depends_on": ["w-b", "w-c"], "on_parent_failure": "run"},
        {"id": "w-done", "kind": "noop"},
    ]))
    .await;
    assert_eq!(status, 201, "{body}");
    eventually(
        Duration::from_secs(10),
        "w-a runs and w-done succeeded",
        || async {
            store
                .task("w-a")
                .await
                .unwrap()
                .is_some_and(|t| t.state == State::Running)
                && store
                    .task("w-done")
                    .await
                    .unwrap()
                    .is_some_and(|t| t.state == State::Succeeded)
        },
    )
    .await;
    let r = request(addr, "GET", "/v1/workflows/nightly", Some(TOKEN), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let view = r.json();
    assert_eq!(view["open"], json!(4));
    let edges: BTreeMap<String, Value> = view["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_str().unwrap().to_string(), t["parents"].clone()))
        .collect();
    assert_eq!(edges["w-d"], json!(["w-b", "w-c"]));
    assert_eq!(edges["w-a"], json!([]));
    let waiting = view["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["state"] == "waiting")
        .count();
    assert_eq!(waiting, 3);
    let (code, out, err) = env.fleetctl(&["workflow", "nightly"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("workflow nightly: 5 tasks, 4 open"), "{out}");
    assert!(
        out.contains("w-d") && out.contains("<- w-b, w-c") && out.contains("waits for 2 of 2"),
        "{out}"
    );
    let (_, out, _) = env.fleetctl(&["workflows"]);
    assert!(out.contains("nightly  4 open"), "{out}");

    let r = request(
        addr,
        "POST",
        "/v1/workflows/nightly/cancel",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["cancelling"], json!(1), "{}", r.body);
    assert_eq!(
        r.json()["already_ended"],
        json!(1),
        "w-done had ended: {}",
        r.body
    );
    let members: Vec<String> = ["w-a", "w-b", "w-c", "w-d"].map(String::from).to_vec();
    let ended = env.wait_terminal(&members, Duration::from_secs(15)).await;
    for id in &members {
        assert_eq!(
            ended[id].state,
            State::Cancelled,
            "{id}: {:?}",
            ended[id].error
        );
    }
    assert!(
        !executions(&env, &["w1", "w2"]).contains_key("w-d"),
        "w-d never ran"
    );
    let (code, out, _) = env.fleetctl(&["workflow", "nightly", "--cancel"]);
    assert_eq!(code, 0);
    assert!(out.contains("0 cancelled, 0 cancelling"), "{out}");
    assert!(store.open_workflows().await.unwrap().is_empty());
    let (code, _, err) = env.fleetctl(&["workflow", "no-such-workflow"]);
    assert_eq!(code, 1, "{err}");

    // A result over the limit fails its attempt with the reason, not cut; its child, by its
    // policy, does not run.
    let (status, _) = post(
        addr,
        &json!([
            {"id": "big", "kind": "echo", "payload": "x".repeat(3000)},
            {"id": "big-child", "kind": "gather", "depends_on": ["big"]},
        ]),
    )
    .await;
    assert_eq!(status, 201);
    let big = env
        .wait_terminal(&["big".into(), "big-child".into()], Duration::from_secs(15))
        .await;
    assert_eq!(big["big"].state, State::Failed);
    let error = big["big"].error.clone().unwrap_or_default();
    assert!(
        error.contains("result is 3002 bytes, over the 2048-byte limit (tasks.max_result_bytes)"),
        "{error}"
    );
    assert!(big["big"].result.is_none());
    assert_eq!(
        big["big-child"].error.as_deref(),
        Some("dependency big failed")
    );

    // fleetctl submits a DAG from a file as one batch record (accepted whole), and a task
    // after others from flags.
    let dag = env.dir.join("dag.json");
    std::fs::write(
        &dag,
        json!([
            {"id": "cli-a", "kind": "echo", "payload": 1},
            {"id": "cli-b", "kind": "gather", "depends_on": ["cli-a"]},
        ])
        .to_string(),
    )
    .unwrap();
    let (code, out, err) = env.fleetctl(&["submit", "--file", dag.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["cli-a", "cli-b"]);
    let (code, out, err) = env.fleetctl(&[
        "submit", "--kind", "gather", "--id", "cli-c", "--after", "cli-b", "--after", "cli-a",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "cli-c");
    let cli = env
        .wait_terminal(&["cli-c".into()], Duration::from_secs(20))
        .await;
    let read = result(&cli["cli-c"]);
    assert_eq!(read["parents"][1]["result"], json!(1), "{read}");
    assert_eq!(read["parents"][0]["id"], json!("cli-b"));
    std::fs::write(
        &dag,
        json!([
            {"id": "cyc-a", "kind": "noop", "depends_on": ["cyc-b"]},
            {"id": "cyc-b", "kind": "noop", "depends_on": ["cyc-a"]},
        ])
        .to_string(),
    )
    .unwrap();
    let (code, _, err) = env.fleetctl(&["submit", "--file", dag.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cycle"), "{err}");

    // A child submitted after its parent ended (within the parent's retention): after a
    // success it runs at once; after a failure it ends at acceptance by its policy.
    let (status, _) = post(
        addr,
        &json!([
            {"id": "late-p-ok", "kind": "echo", "payload": {"n": 42}},
            {"id": "late-p-fail", "kind": "fail", "payload": fail},
        ]),
    )
    .await;
    assert_eq!(status, 201);
    env.wait_terminal(
        &["late-p-ok".into(), "late-p-fail".into()],
        Duration::from_secs(10),
    )
    .await;
    let (_, body) = post(
        addr,
        &json!({"id": "late-ok", "kind": "gather", "depends_on": ["late-p-ok"]}),
    )
    .await;
    assert_eq!(body["tasks"][0]["state"], json!("pending"), "{body}");
    let (_, body) = post(
        addr,
        &json!({"id": "late-fail", "kind": "noop", "depends_on": ["late-p-fail"]}),
    )
    .await;
    assert_eq!(body["tasks"][0]["state"], json!("failed"), "{body}");
    let late = env
        .wait_terminal(&["late-ok".to_string()], Duration::from_secs(10))
        .await;
    assert_eq!(
        result(&late["late-ok"])["parents"][0]["result"],
        json!({"n": 42})
    );
    // Unknown once expired: a parent with no waiting child goes after its retention.
    let (status, body) = post(
        addr,
        &json!({"id": "too-late", "kind": "noop", "depends_on": ["r-a2"]}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_dependency")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_dependencies_are_refused_whole_with_the_reason() {
    let env = TestEnv::start("wf-hostile");
    env.create_topics().await;
    let (_scheduler, addr) = env
        .spawn_api("scheduler", &[("FLEET__HTTP__TOKENS", TOKEN)])
        .await;
    let store = env.store().await;
    let many: Vec<String> = (0..1001).map(|i| format!("p{i}")).collect();
    let huge: Vec<String> = (0..100_000).map(|i| format!("p{i}")).collect();
    for (body, code, says) in [
        (
            json!([{"id": "x1", "kind": "noop", "depends_on": ["x2"]}, {"id": "x2", "kind": "noop", "depends_on": ["x1"]}]),
            "invalid_field",
            "cycle",
        ),
        (
            json!({"id": "self", "kind": "noop", "depends_on": ["self"]}),
            "invalid_field",
            "itself",
        ),
        (
            json!([{"id": "u1", "kind": "noop"}, {"id": "u2", "kind": "noop", "depends_on": ["u1", "nobody"]}]),
            "invalid_dependency",
            "unknown parent `nobody`",
        ),
        (
            json!({"id": "m", "kind": "noop", "depends_on": many}),
            "invalid_field",
            "over the limit of 1000",
        ),
        (
            json!({"id": "h", "kind": "noop", "depends_on": huge}),
            "invalid_field",
            "lists 100000 tasks",
        ),
        (
            json!([{"id": "t", "kind": "noop"}, {"id": "t", "kind": "noop", "depends_on": ["q"]}]),
            "invalid_field",
            "given twice",
        ),
        (
            json!({"id": "d", "kind": "noop", "depends_on": ["a", "a"]}),
            "invalid_field",
            "twice",
        ),
        (
            json!({"id": "o", "kind": "noop", "on_parent_failure": "run"}),
            "invalid_field",
            "applies only",
        ),
        (
            json!({"id": "p", "kind": "noop", "depends_on": ["x"], "on_parent_failure": "sometimes"}),
            "invalid_json",
            "on_parent_failure",
        ),
    ] {
        let r = request(
            addr,
            "POST",
            "/v1/tasks",
            Some(TOKEN),
            Some(body.to_string().as_bytes()),
        )
        .await;
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.error_code(), code, "{}", r.body);
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains(says),
            "{}",
            r.body
        );
    }
    // Nothing of a refused submission was stored.
    for id in ["x1", "x2", "self", "u1", "u2", "m", "h", "t", "d", "o", "p"] {
        assert!(store.task(id).await.unwrap().is_none(), "{id} was stored");
    }
    // On the topic: a batch record with an unknown parent is refused whole onto the rejected
    // topic, with its code; a good one is accepted whole.
    env.submit(&[
        json!([{"id": "tu1", "kind": "noop"}, {"id": "tu2", "kind": "noop", "depends_on": ["ghost"]}]).to_string(),
        json!([{"id": "tc1", "kind": "noop", "depends_on": ["tc2"]}, {"id": "tc2", "kind": "noop", "depends_on": ["tc1"]}]).to_string(),
        json!([{"id": "tg1", "kind": "noop"}, {"id": "tg2", "kind": "noop", "depends_on": ["tg1"]}]).to_string(),
        "[]".to_string(),
    ])
    .await;
    let rejected = Topics::from_settings(&env.settings().topics).rejected();
    let records = env.read_topic(&rejected, 3, Duration::from_secs(30)).await;
    let mut reasons: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r.header("fleet-reject-code"),
                r.header("fleet-reject-reason"),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons[0].0, "invalid_dependency");
    assert!(
        reasons[0]
            .1
            .contains("unknown parent `ghost` of task `tu2`"),
        "{reasons:?}"
    );
    assert_eq!(reasons[1].0, "invalid_field");
    assert!(
        reasons[1]
            .1
            .contains("`batch` must hold 1 to 1000 tasks, not 0"),
        "{reasons:?}"
    );
    assert_eq!(reasons[2].0, "invalid_field");
    assert!(
        reasons[2]
            .1
            .contains("cycle in its submission (through tc1, tc2)"),
        "{reasons:?}"
    );
    eventually(
        Duration::from_secs(10),
        "the good batch is accepted",
        || async { store.task("tg2").await.unwrap().is_some() },
    )
    .await;
    assert_eq!(
        store.task("tg2").await.unwrap().unwrap().state,
        State::Waiting
    );
    for id in ["tu1", "tu2", "tc1", "tc2"] {
        assert!(store.task(id).await.unwrap().is_none(), "{id} was stored");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn follow_ups_are_created_exactly_once_through_worker_kills() {
    let env = TestEnv::start("wf-follow-ups");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let mut workers: Vec<_> = (0..3)
        .map(|i| env.spawn("fleet-worker", &format!("w{i}"), &[]))
        .collect();
    // 300 spawners, each returning 3 follow-ups with ids fresh at every attempt (as a naive
    // handler would make them): a follow-up created twice would be an extra task.
    let spawners: Vec<String> = (0..300).map(|i| format!("sp{i}")).collect();
    let records: Vec<String> = spawners
        .iter()
        .enumerate()
        .map(|(i, id)| {
            json!({"id": id, "kind": "spawn", "payload": {"count": 3, "ms": 200 + (i % 40) * 20, "random_ids": true}})
                .to_string()
        })
        .collect();
    env.submit(&records).await;
    // Once spawners run, kill -9 a worker every 400 ms, round robin, and start a new one in
    // its place.
    let store = env.store().await;
    eventually(Duration::from_secs(60), "20 spawners succeeded", || async {
        store
            .counts()
            .await
            .unwrap()
            .into_iter()
            .any(|(s, n)| s == State::Succeeded && n >= 20)
    })
    .await;
    let mut names = vec!["w0".to_string(), "w1".to_string(), "w2".to_string()];
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let slot = round % 3;
        workers[slot].signal("KILL");
        let name = format!("w{slot}-{round}");
        workers[slot] = env.spawn("fleet-worker", &name, &[]);
        names.push(name);
    }
    let tasks = env.wait_terminal(&spawners, Duration::from_secs(120)).await;
    let mut lost_attempts = 0;
    for id in &spawners {
        let spawner = &tasks[id];
        assert_eq!(spawner.state, State::Succeeded, "{id}: {:?}", spawner.error);
        lost_attempts += spawner
            .history
            .iter()
            .filter(|h| h.outcome == AttemptOutcome::LeaseExpired)
            .count();
    }
    eventually(
        Duration::from_secs(60),
        "every follow-up succeeded",
        || async { store.open_workflows().await.unwrap().is_empty() },
    )
    .await;
    for id in &spawners {
        let view = store
            .workflow(id)
            .await
            .unwrap()
            .expect("the spawner's workflow");
        let follow_ups: Vec<_> = view.tasks.iter().filter(|t| &t.id != id).collect();
        assert_eq!(
            follow_ups.len(),
            3,
            "{id} has {} follow-ups: {:?}",
            follow_ups.len(),
            view.tasks
        );
        assert!(
            follow_ups
                .iter()
                .all(|t| t.state == State::Succeeded && t.kind == "noop")
        );
    }
    // Nothing else was created: 300 spawners and 900 follow-ups.
    let total: u64 = store.counts().await.unwrap().iter().map(|(_, n)| n).sum();
    assert_eq!(total, 1200);
    println!("attempts lost to kills: {lost_attempts}");
    assert!(lost_attempts > 0, "the kills hit running spawners");
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let runs = executions(&env, &names);
    assert!(runs.values().map(Vec::len).sum::<usize>() >= 1200);

    // Follow-ups that cannot be accepted fail the attempt, with the reason, and none is made.
    env.submit(&[
        json!({"id": "bad-spawner", "kind": "spawn", "payload": {"count": 2, "after": ["ghost"]}})
            .to_string(),
    ])
    .await;
    let bad = env
        .wait_terminal(&["bad-spawner".to_string()], Duration::from_secs(30))
        .await;
    assert_eq!(bad["bad-spawner"].state, State::Failed);
    let error = bad["bad-spawner"].error.clone().unwrap_or_default();
    assert!(
        error.contains("follow-up tasks refused: unknown parent `ghost`"),
        "{error}"
    );
    assert!(store.task("bad-spawner.0").await.unwrap().is_none());
    // Follow-ups may wait for a stored task: they join its ordering.
    env.submit(&[
        json!({"id": "gate", "kind": "sleep", "payload": {"ms": 1500}}).to_string(),
        json!({"id": "fan", "kind": "spawn", "payload": {"count": 2, "kind": "gather", "after": ["gate"]}}).to_string(),
    ])
    .await;
    let ended = env
        .wait_terminal(
            &["fan.0".to_string(), "fan.1".to_string(), "gate".to_string()],
            Duration::from_secs(30),
        )
        .await;
    for id in ["fan.0", "fan.1"] {
        assert_eq!(ended[id].state, State::Succeeded);
        assert!(
            first_start(&ended[id]) >= ended["gate"].finished_ms.unwrap(),
            "{id} waited for gate"
        );
        assert_eq!(result(&ended[id])["parents"][0]["id"], json!("gate"));
    }
}

/// The success and its follow-ups recorded in Redis, and the worker killed with -9 before it
/// heard so (a proxy loses the script's reply): each of three tries leaves the spawner
/// succeeded on its only attempt and its follow-ups there exactly once, none made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ups_recorded_before_a_kill_exist_once_and_are_not_made_again() {
    let env = TestEnv::start("wf-follow-kill");
    env.create_topics().await;
    let store = env.store().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let proxy = env.reply_cut_proxy().await;
    let url = proxy.url();
    // The accept script is what records a success with follow-ups.
    let accept = fleet_common::store::scripts::ACCEPT
        .get_hash()
        .as_bytes()
        .to_vec();
    let mut names = Vec::new();
    for round in 0..3 {
        let name = format!("proxied-{round}");
        let mut worker = env.spawn("fleet-worker", &name, &[("FLEET__REDIS__URL", &url)]);
        names.push(name.clone());
        eventually(
            Duration::from_secs(60),
            "the worker owns partitions",
            || async {
                store
                    .live_workers(2_000)
                    .await
                    .unwrap()
                    .iter()
                    .any(|(id, info)| {
                        id == &name
                            && info
                                .partitions_of(fleet_common::Priority::Normal)
                                .is_some_and(|p| !p.is_empty())
                    })
            },
        )
        .await;
        let cuts = proxy.cuts();
        proxy.cut_reply_of(&accept);
        let id = format!("spawner-{round}");
        env.submit(&[
            json!({"id": id, "kind": "spawn", "payload": {"count": 3, "random_ids": true}})
                .to_string(),
        ])
        .await;
        eventually(
            Duration::from_secs(30),
            "the success's reply was lost",
            || async { proxy.cuts() > cuts },
        )
        .await;
        worker.signal("KILL");
        worker.wait_exit(Duration::from_secs(10));
        let spawner = store.task(&id).await.unwrap().expect("the spawner");
        assert_eq!(spawner.state, State::Succeeded, "recorded before the kill");
        assert_eq!(spawner.attempt, 1);
    }
    // A worker with a direct connection runs the follow-ups.
    let _runner = env.spawn("fleet-worker", "runner", &[]);
    for round in 0..3 {
        let id = format!("spawner-{round}");
        eventually(
            Duration::from_secs(60),
            "the follow-ups succeeded",
            || async {
                store
                    .workflow(&id)
                    .await
                    .unwrap()
                    .is_some_and(|w| w.open == 0 && w.tasks.len() == 4)
            },
        )
        .await;
        let view = store.workflow(&id).await.unwrap().unwrap();
        let follow_ups = view.tasks.iter().filter(|t| t.id != id).count();
        assert_eq!(follow_ups, 3, "{:?}", view.tasks);
        assert_eq!(
            store.task(&id).await.unwrap().unwrap().attempt,
            1,
            "never ran again"
        );
    }
    let runs = executions(&env, &names.iter().map(String::as_str).collect::<Vec<_>>());
    for round in 0..3 {
        assert_eq!(runs[&format!("spawner-{round}")].len(), 1, "{runs:?}");
    }
    let total: u64 = store.counts().await.unwrap().iter().map(|(_, n)| n).sum();
    assert_eq!(total, 12, "3 spawners and 9 follow-ups, nothing more");
}

/// The scripts directly: a parent named twice through an idempotency key is waited for once;
/// a redriven child holds its ended parent again, so the parent outlives its retention until
/// the child's second end.
#[tokio::test]
async fn parents_named_twice_or_held_again_after_a_redrive_keep_their_counts() {
    use fleet_common::store::{Accepted, Claim, Completion, Outcome};
    let env = TestEnv::redis_only("wf-scripts");
    let store = env.store().await;
    let ok = Outcome::Ok("1".into());
    let mut tasks = vec![
        env.new_task(r#"{"id":"a","kind":"noop","idempotency_key":"k1"}"#),
        env.new_task(r#"{"id":"b","kind":"noop","idempotency_key":"k1"}"#),
        env.new_task(r#"{"id":"c","kind":"noop","depends_on":["a","b"]}"#),
    ];
    fleet_common::workflow::prepare(&mut tasks).unwrap();
    let got = store.accept(&tasks).await.unwrap();
    assert_eq!(got[1], Accepted::Duplicate("a".into()));
    assert_eq!(got[2], Accepted::Waiting("c".into()));
    let c = store.task("c").await.unwrap().unwrap();
    assert_eq!(
        (c.parents.clone(), c.waiting_for),
        (vec!["a".to_string()], Some(1))
    );
    assert_eq!(
        store.claim("w", 30_000, &[("a", 1)]).await.unwrap(),
        [Claim::Claimed]
    );
    assert_eq!(
        store.complete("w", &[(("a", 1), &ok)]).await.unwrap(),
        [Completion::Succeeded]
    );
    assert_eq!(
        store.task("c").await.unwrap().unwrap().state,
        State::Pending,
        "released once a ended"
    );

    // p succeeds with two children; q fails, so the child of both fails; a redrive of it holds
    // p again: p is kept (no expiry) until the redriven child ends, then expires.
    let mut tasks = vec![
        env.new_task(r#"{"id":"p","kind":"noop"}"#),
        env.new_task(r#"{"id":"q","kind":"noop"}"#),
        env.new_task(r#"{"id":"c1","kind":"noop","depends_on":["p","q"]}"#),
        env.new_task(r#"{"id":"c2","kind":"noop","depends_on":["p"]}"#),
    ];
    fleet_common::workflow::prepare(&mut tasks).unwrap();
    store.accept(&tasks).await.unwrap();
    store
        .claim("w", 30_000, &[("p", 1), ("q", 1)])
        .await
        .unwrap();
    let failed = Outcome::Fail("boom".into());
    store
        .complete("w", &[(("p", 1), &ok), (("q", 1), &failed)])
        .await
        .unwrap();
    assert_eq!(
        store.task("c1").await.unwrap().unwrap().state,
        State::Failed
    );
    let mut conn = env.redis_conn().await;
    let pttl = |conn: &mut redis::aio::MultiplexedConnection| {
        let key = store.keys().task("p");
        let mut conn = conn.clone();
        async move {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            ttl
        }
    };
    assert_eq!(pttl(&mut conn).await, -1, "c2 has not ended: p is held");
    assert_eq!(store.redrive(&["c1".to_string()]).await.unwrap(), 1);
    store.claim("w", 30_000, &[("c2", 1)]).await.unwrap();
    store.complete("w", &[(("c2", 1), &ok)]).await.unwrap();
    assert_eq!(pttl(&mut conn).await, -1, "the redriven c1 holds p");
    let attempt = store.task("c1").await.unwrap().unwrap().attempt + 1;
    store.claim("w", 30_000, &[("c1", attempt)]).await.unwrap();
    store
        .complete("w", &[(("c1", attempt), &ok)])
        .await
        .unwrap();
    assert!(pttl(&mut conn).await > 0, "after its last child, p expires");
}

/// At the limit: a join of 1,000 parents is released once, after the last, and reads all 1,000
/// results; nothing is left held.
#[tokio::test(flavor = "multi_thread")]
async fn a_join_of_a_thousand_parents_runs_once_after_all_of_them() {
    let env = TestEnv::start("wf-wide");
    env.create_topics().await;
    let (_scheduler, addr) = env
        .spawn_api("scheduler", &[("FLEET__HTTP__TOKENS", TOKEN)])
        .await;
    let _workers: Vec<_> = ["w1", "w2"]
        .iter()
        .map(|name| env.spawn("fleet-worker", name, &[]))
        .collect();
    let parents: Vec<String> = (0..1000).map(|i| format!("wide-{i}")).collect();
    let body: Vec<Value> = parents
        .iter()
        .enumerate()
        .map(|(i, id)| json!({"id": id, "kind": "echo", "payload": i}))
        .collect();
    let (status, answer) = post(
        addr,
        &json!({"id": "join", "kind": "gather", "depends_on": parents}),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_dependency")),
        "parents first"
    );
    let (status, _) = post(addr, &Value::Array(body)).await;
    assert_eq!(status, 201);
    let (status, answer) = post(
        addr,
        &json!({"id": "join", "kind": "gather", "depends_on": parents}),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let mut all = parents.clone();
    all.push("join".into());
    let tasks = env.wait_terminal(&all, Duration::from_secs(120)).await;
    let join = &tasks["join"];
    assert_eq!(join.state, State::Succeeded);
    let last_parent = parents
        .iter()
        .map(|p| tasks[p].finished_ms.unwrap())
        .max()
        .unwrap();
    assert!(
        first_start(join) >= last_parent,
        "the join ran after its last parent"
    );
    let read = result(join);
    let read = read["parents"].as_array().unwrap();
    assert_eq!(read.len(), 1000);
    for (i, parent) in read.iter().enumerate() {
        assert_eq!(parent["result"], json!(i), "{parent}");
    }
    assert_eq!(executions(&env, &["w1", "w2"])["join"].len(), 1);
    let store = env.store().await;
    let mut conn = env.redis_conn().await;
    for p in ["wide-0", "wide-999"] {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(store.keys().task(p))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0, "{p} expires once the join ended: {ttl}");
    }
}
