//! Task control on the real stack: cancellation (waiting, running, stubborn, and racing
//! completions), pause and resume of a queue and a priority, and priority changes. Every test
//! counts its tasks at the end: one terminal state each, executions bounded.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use fleet_common::Priority;
use fleet_common::store::StoredTask;
use fleet_common::store::{Cancel, Reprioritize, Selector};
use fleet_common::task::State;
use fleet_testkit::fleet::{executions, log_events, task_json};
use fleet_testkit::{TestEnv, eventually};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

type Tasks = HashMap<String, StoredTask>;

/// Each task is in exactly one state index, and it is the state its hash holds.
async fn assert_one_state_each(env: &TestEnv, tasks: &Tasks) {
    let store = env.store().await;
    let mut conn = env.redis_conn().await;
    for (id, task) in tasks {
        let mut member_of = Vec::new();
        for state in State::ALL {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg(store.keys().state_index(state))
                .arg(id)
                .query_async(&mut conn)
                .await
                .unwrap();
            if score.is_some() {
                member_of.push(state.as_str());
            }
        }
        assert_eq!(member_of, [task.state.as_str()], "{id}");
    }
}

fn runs_of(runs: &BTreeMap<String, Vec<(u64, String)>>, id: &str) -> usize {
    runs.get(id).map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_scheduled_running_and_stubborn_tasks_each_once() {
    let env = TestEnv::start("cancel");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let mut worker = env.spawn(
        "fleet-worker",
        "w1",
        &[("FLEET__WORKER__CANCEL_GRACE_MS", "1000")],
    );
    let ids: Vec<String> = ["later", "polite", "stubborn"].map(String::from).to_vec();
    env.submit(&[
        json!({"id": "later", "kind": "noop", "delay_ms": 60_000}).to_string(),
        task_json("polite", "sleep", "normal", json!({"ms": 60_000})),
        task_json(
            "stubborn",
            "sleep",
            "normal",
            json!({"ms": 60_000, "ignore_cancel": true}),
        ),
    ])
    .await;
    eventually(WAIT, "both sleepers running", || async {
        let t = env.tasks(&ids).await;
        t.len() == 3 && t["polite"].state == State::Running && t["stubborn"].state == State::Running
    })
    .await;

    let store = env.store().await;
    let asked = Instant::now();
    let answers = store.cancel(&ids).await.unwrap();
    assert_eq!(
        answers,
        [Cancel::Cancelled, Cancel::Cancelling, Cancel::Cancelling]
    );
    assert_eq!(env.tasks(&ids).await["later"].state, State::Cancelled);
    // polite stops at its signal (next heartbeat, 1 s); stubborn is aborted after the 1 s
    // grace, checked at the heartbeat after that.
    let tasks = env.wait_terminal(&ids, Duration::from_secs(8)).await;
    let took = asked.elapsed();
    assert!(
        tasks.values().all(|t| t.state == State::Cancelled),
        "{tasks:?}"
    );
    assert!(took < Duration::from_secs(5), "cancel took {took:?}");
    assert_one_state_each(&env, &tasks).await;

    let events = log_events(&env, &["w1"]);
    let said = |message: &str, id: &str| {
        events
            .iter()
            .filter(|e| e["message"] == message && e["task_id"] == id)
            .count()
    };
    assert_eq!(
        said(
            "Cancelled handler did not stop within the grace period; aborted.",
            "stubborn"
        ),
        1
    );
    assert_eq!(
        said(
            "Cancelled handler did not stop within the grace period; aborted.",
            "polite"
        ),
        0,
        "polite stopped by itself"
    );
    let runs = executions(&env, &["w1"]);
    assert_eq!(
        ids.iter().map(|id| runs_of(&runs, id)).collect::<Vec<_>>(),
        [0, 1, 1]
    );

    // The slots are free again: the worker still takes work and has nothing running.
    env.submit(&[task_json("after", "noop", "normal", json!(null))])
        .await;
    let after = env.wait_terminal(&["after".into()], WAIT).await;
    assert_eq!(after["after"].state, State::Succeeded);
    assert!(worker.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_racing_completions_end_each_task_once_as_the_answer_said() {
    let env = TestEnv::start("cancel-race");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let _w1 = env.spawn("fleet-worker", "w1", &[]);
    let _w2 = env.spawn("fleet-worker", "w2", &[]);
    let n = 300;
    let ids: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
    let bodies: Vec<String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| task_json(id, "sleep", "normal", json!({ "ms": (i * 7) % 400 })))
        .collect();
    env.submit(&bodies).await;
    eventually(WAIT, "the first tasks finish", || async {
        let counts = env.store().await.counts().await.unwrap();
        counts.iter().any(|&(s, n)| s == State::Succeeded && n > 0)
    })
    .await;

    // Cancel every task, in small batches, while completions keep arriving.
    let store = env.store().await;
    let mut answers: HashMap<String, Cancel> = HashMap::new();
    for chunk in ids.chunks(10) {
        for (id, answer) in chunk.iter().zip(store.cancel(chunk).await.unwrap()) {
            answers.insert(id.clone(), answer);
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let tasks = env.wait_terminal(&ids, WAIT).await;
    let mut tally: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &ids {
        let state = tasks[id].state.as_str();
        match answers[id] {
            Cancel::Cancelled | Cancel::Cancelling => {
                assert_eq!(state, "cancelled", "{id}: answered {:?}", answers[id]);
            }
            Cancel::Ended(ended) => assert_eq!(state, ended.as_str(), "{id}"),
            Cancel::Unknown => assert_eq!(state, "succeeded", "{id}: not yet accepted"),
        }
        *tally.entry(state).or_default() += 1;
    }
    assert_eq!(tally.values().sum::<usize>(), n);
    assert!(
        tally.contains_key("cancelled") && tally.contains_key("succeeded"),
        "both sides of the race happened: {tally:?}"
    );
    assert!(
        answers.values().any(|a| *a == Cancel::Cancelling),
        "some cancels met running tasks"
    );
    assert_one_state_each(&env, &tasks).await;
    let runs = executions(&env, &["w1", "w2"]);
    for id in &ids {
        assert!(runs_of(&runs, id) <= 1, "{id} ran {:?}", runs.get(id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_queue_and_priority_hold_their_tasks_until_resumed_and_moved_tasks_run() {
    let env = TestEnv::start("pause");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let _w1 = env.spawn("fleet-worker", "w1", &[]);
    let store = env.store().await;

    // A reports task already running when its queue is paused finishes normally.
    env.submit(&[json!({"id": "long", "kind": "sleep", "queue": "reports",
        "payload": {"ms": 1500}})
    .to_string()])
        .await;
    eventually(WAIT, "the long report running", || async {
        env.tasks(&["long".into()])
            .await
            .get("long")
            .is_some_and(|t| t.state == State::Running)
    })
    .await;
    store
        .pause(&Selector::Queue("reports".into()))
        .await
        .unwrap();
    store
        .pause(&Selector::Priority(Priority::Low))
        .await
        .unwrap();

    let report_ids: Vec<String> = (0..20).map(|i| format!("rep{i}")).collect();
    let other_ids: Vec<String> = (0..20).map(|i| format!("oth{i}")).collect();
    let low_ids: Vec<String> = (0..10).map(|i| format!("low{i}")).collect();
    let mut bodies = Vec::new();
    for id in &report_ids {
        bodies.push(json!({"id": id, "kind": "noop", "queue": "reports"}).to_string());
    }
    for id in &other_ids {
        bodies.push(task_json(id, "noop", "normal", json!(null)));
    }
    for id in &low_ids {
        bodies.push(task_json(id, "noop", "low", json!(null)));
    }
    env.submit(&bodies).await;
    let others = env.wait_terminal(&other_ids, WAIT).await;
    assert!(others.values().all(|t| t.state == State::Succeeded));
    let long = env.wait_terminal(&["long".into()], WAIT).await;
    assert_eq!(
        long["long"].state,
        State::Succeeded,
        "running work finishes"
    );
    eventually(WAIT, "every paused task held", || async {
        store.held_count().await.unwrap() == 30
    })
    .await;
    let waiting: Vec<String> = report_ids.iter().chain(&low_ids).cloned().collect();
    let held = env.tasks(&waiting).await;
    assert!(held.values().all(|t| t.state == State::Pending), "{held:?}");

    // Five low tasks move to high and run while low stays paused.
    for id in &low_ids[..5] {
        assert_eq!(
            store.set_priority(id, Priority::High).await.unwrap(),
            Reprioritize::Moved
        );
    }
    let moved = env.wait_terminal(&low_ids[..5], WAIT).await;
    assert!(moved.values().all(|t| t.state == State::Succeeded));
    let still = env.tasks(&low_ids[5..]).await;
    assert!(
        still.values().all(|t| t.state == State::Pending),
        "{still:?}"
    );

    assert_eq!(
        store
            .resume(&Selector::Queue("reports".into()))
            .await
            .unwrap(),
        20
    );
    assert_eq!(
        store
            .resume(&Selector::Priority(Priority::Low))
            .await
            .unwrap(),
        5
    );
    let all: Vec<String> = waiting
        .iter()
        .chain(&other_ids)
        .cloned()
        .chain(["long".to_string()])
        .collect();
    let tasks = env.wait_terminal(&all, WAIT).await;
    assert!(tasks.values().all(|t| t.state == State::Succeeded));
    assert_eq!(store.held_count().await.unwrap(), 0);
    assert_one_state_each(&env, &tasks).await;
    let runs = executions(&env, &["w1"]);
    for id in &all {
        assert_eq!(runs_of(&runs, id), 1, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_left_held_by_a_resume_cut_short_are_sent_on_by_the_relay() {
    let env = TestEnv::start("resume-cut");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let _w1 = env.spawn("fleet-worker", "w1", &[]);
    let store = env.store().await;
    let reports = Selector::Queue("reports".into());
    let audit = Selector::Queue("audit".into());
    store.pause(&reports).await.unwrap();
    store.pause(&audit).await.unwrap();

    // More held tasks than the sweep looks at per round, in two paused queues.
    let report_ids: Vec<String> = (0..150).map(|i| format!("rep{i:03}")).collect();
    let audit_ids: Vec<String> = (0..150).map(|i| format!("aud{i:03}")).collect();
    let bodies: Vec<String> = (report_ids.iter().map(|id| (id, "reports")))
        .chain(audit_ids.iter().map(|id| (id, "audit")))
        .map(|(id, queue)| json!({"id": id, "kind": "noop", "queue": queue}).to_string())
        .collect();
    env.submit(&bodies).await;
    eventually(WAIT, "every task held", || async {
        store.held_count().await.unwrap() == 300
    })
    .await;

    // The first half of a resume of `reports`: its pause is lifted, and its process dies
    // before it sends the held tasks on. No resume runs again.
    env.lift_pause_only(&store, &reports).await;

    let done = env.wait_terminal(&report_ids, WAIT).await;
    assert!(
        done.values().all(|t| t.state == State::Succeeded),
        "{done:?}"
    );
    assert_one_state_each(&env, &done).await;
    let runs = executions(&env, &["w1"]);
    assert!(report_ids.iter().all(|id| runs_of(&runs, id) == 1));
    // The queue still paused keeps its tasks held and unstarted.
    assert_eq!(store.held_count().await.unwrap(), 150);
    let held = env.tasks(&audit_ids).await;
    assert!(held.values().all(|t| t.state == State::Pending), "{held:?}");
    assert!(audit_ids.iter().all(|id| runs_of(&runs, id) == 0));
}
