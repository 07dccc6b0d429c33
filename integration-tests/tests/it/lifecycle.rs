//! The task lifecycle end to end on the real stack: scheduler, reaper and workers as processes,
//! tansu and redis-server underneath. Every test records every task and checks the invariants
//! of docs/architecture.md (Guarantees) by counting.

use fleet_common::task::State;
use std::time::Duration;

use fleet_testkit::TestEnv;
use fleet_testkit::fleet::{executions, task_json};

const WAIT: Duration = Duration::from_secs(120);

/// `http.listen` empty turns a service's HTTP listener off (the scheduler's API with it): the
/// services still run, accept and run every task, and drain cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_without_an_http_listener_run_every_task_and_drain_cleanly() {
    let env = TestEnv::start("no-http");
    env.create_topics().await;
    let off = [("FLEET__HTTP__LISTEN", "")];
    let mut services = vec![
        env.spawn("fleet-scheduler", "scheduler", &off),
        env.spawn("fleet-reaper", "reaper", &off),
        env.spawn("fleet-worker", "worker", &off),
    ];
    let ids: Vec<String> = (0..50).map(|i| format!("n{i}")).collect();
    let bodies: Vec<String> = ids
        .iter()
        .map(|id| task_json(id, "noop", "normal", serde_json::json!({})))
        .collect();
    env.submit(&bodies).await;
    let tasks = env.wait_terminal(&ids, WAIT).await;
    assert!(
        tasks
            .values()
            .all(|t| t.state == State::Succeeded && t.attempt == 1)
    );
    for process in &mut services {
        assert!(process.is_running(), "{} still runs", process.name());
        process.signal("TERM");
        let code = process.wait_exit(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{} exits 0 after SIGTERM", process.name());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tasks_over_four_priorities_and_three_workers_each_run_once() {
    let env = TestEnv::start("thousand");
    env.create_topics().await;
    let scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let workers: Vec<_> = (0..3)
        .map(|i| env.spawn("fleet-worker", &format!("worker{i}"), &[]))
        .collect();

    let priorities = ["critical", "high", "normal", "low"];
    let ids: Vec<String> = (0..1000).map(|i| format!("t{i}")).collect();
    let submissions: Vec<String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            task_json(
                id,
                if i % 3 == 0 { "echo" } else { "noop" },
                priorities[i % 4],
                serde_json::json!({ "n": i }),
            )
        })
        .collect();
    env.submit(&submissions).await;

    let tasks = env.wait_terminal(&ids, WAIT).await;
    let names: Vec<String> = (0..3).map(|i| format!("worker{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let runs = executions(&env, &names);
    for id in &ids {
        let t = &tasks[id];
        assert_eq!(t.state, State::Succeeded, "{id}: {t:?}");
        assert_eq!(t.attempt, 1, "{id} claimed once: {t:?}");
        assert_eq!(
            runs.get(id).map(Vec::len),
            Some(1),
            "{id} executed exactly once: {:?}",
            runs.get(id)
        );
    }
    let echo = &tasks["t3"];
    assert_eq!(
        echo.result.as_deref(),
        Some(r#"{"n":3}"#),
        "echo returns its payload"
    );
    let used: std::collections::BTreeSet<&str> =
        runs.values().flatten().map(|(_, w)| w.as_str()).collect();
    assert!(
        used.len() >= 2,
        "the work is spread over the workers: {used:?}"
    );

    // Every service drains on SIGTERM and exits 0.
    for mut process in workers.into_iter().chain([scheduler, reaper]) {
        process.signal("TERM");
        let code = process.wait_exit(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{} exits 0 after SIGTERM", process.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_submissions_go_to_the_rejected_topic_and_the_line_keeps_moving() {
    let env = TestEnv::start("rejected");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _w = env.spawn("fleet-worker", "w", &[]);
    let huge = format!(r#"{{"kind":"noop","payload":"{}"}}"#, "x".repeat(2 << 20));
    let deep = format!(
        r#"{{"kind":"noop","payload":{}{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let bad: Vec<Vec<u8>> = [
        "not json",
        r#"{"kind":"noop","tenant_id":"other"}"#,
        r#"{"kind":42}"#,
        r#"{"kind":"noop","priority":"urgent"}"#,
        r#"{"kind":"noop","max_attempts":0}"#,
        r#"{"kind":"noop","timeout_ms":-5}"#,
        r#"{"kind":"noop","max_attempts":1e300}"#,
        r#"{"kind":"noop","delay_ms":18446744073709551615}"#,
        r#"{"kind":"noop","run_at":"9999-12-31T00:00:00Z"}"#,
        &huge,
        &deep,
        "",
    ]
    .into_iter()
    .map(|s| s.as_bytes().to_vec())
    .chain([b"{\"kind\":\"no\xff\xfeop\"}".to_vec()])
    .collect();
    let mut submissions = Vec::new();
    let mut ids = Vec::new();
    for (i, bad) in bad.iter().enumerate() {
        ids.push(format!("good{i}"));
        submissions
            .push(task_json(&ids[i], "noop", "normal", serde_json::json!(null)).into_bytes());
        submissions.push(bad.clone());
    }
    // The oversized record needs a producer that accepts it; the broker itself has no limit.
    let producer: rdkafka::producer::FutureProducer = {
        let mut config = fleet_common::kafka::producer_config(&env.settings().kafka, "it-big");
        config.set("message.max.bytes", "10000000");
        config.create().unwrap()
    };
    let topic = fleet_common::Topics::from_settings(&env.settings().topics);
    for body in &submissions {
        producer
            .send(
                rdkafka::producer::FutureRecord::<(), _>::to(&topic.submit())
                    .payload(body.as_slice()),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let tasks = env.wait_terminal(&ids, WAIT).await;
    assert!(
        ids.iter().all(|id| tasks[id].state == State::Succeeded),
        "valid tasks around bad ones all run"
    );

    let reasons: Vec<(String, String, usize)> = env
        .read_topic(&topic.rejected(), bad.len(), WAIT)
        .await
        .into_iter()
        .map(|r| {
            assert!(!r.header("fleet-source-offset").is_empty());
            let code = r.header("fleet-reject-code").to_string();
            (
                code,
                r.header("fleet-reject-reason").to_string(),
                r.payload.len(),
            )
        })
        .collect();
    for (code, hint) in [
        ("too_large", ""),
        ("not_utf8", ""),
        ("invalid_json", "nests deeper"),
        ("invalid_field", "run_at"),
        ("invalid_json", "timeout_ms"),
        ("invalid_field", "delay_ms"),
        ("invalid_json", "max_attempts"),
    ] {
        assert!(
            reasons
                .iter()
                .any(|(c, r, _)| c == code && r.contains(hint)),
            "{code} naming {hint:?}: {reasons:?}"
        );
    }
    assert!(
        reasons
            .iter()
            .any(|(c, r, _)| c == "invalid_json" && r.contains("tenant")),
        "unknown field named: {reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(c, r, _)| c == "invalid_field" && r.contains("max_attempts")),
        "{reasons:?}"
    );
    let store = env.store().await;
    assert_eq!(
        store.counters().await.unwrap().get("rejected"),
        Some(&(bad.len() as u64))
    );
    let counts = store.counts().await.unwrap();
    assert_eq!(
        counts.iter().map(|(_, n)| n).sum::<u64>(),
        ids.len() as u64,
        "no task from a bad submission"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_tasks_run_on_time_once_across_a_scheduler_crash() {
    let env = TestEnv::start("delayed");
    env.create_topics().await;
    let s1 = env.spawn("fleet-scheduler", "s1", &[]);
    let _s2 = env.spawn("fleet-scheduler", "s2", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let _w = env.spawn("fleet-worker", "w", &[]);
    // The timer's accuracy is measured on a running fleet: a task submitted for now has run
    // (the worker joined its group and fetches) before the delayed ones are submitted.
    env.submit(&[r#"{"id":"now","kind":"noop"}"#.to_string()])
        .await;
    env.wait_terminal(&["now".to_string()], WAIT).await;
    let in_3s = (time::OffsetDateTime::now_utc() + Duration::from_secs(3))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let bodies = vec![
        r#"{"id":"delay","kind":"noop","delay_ms":2000}"#.to_string(),
        format!(r#"{{"id":"at","kind":"noop","run_at":"{in_3s}"}}"#),
    ];
    env.submit(&bodies).await;
    let ids: Vec<String> = ["now", "delay", "at"].map(String::from).to_vec();
    fleet_testkit::eventually(WAIT, "all three accepted", || async {
        env.task_total().await == 3
    })
    .await;
    s1.signal("KILL"); // the timer lives in Redis: the other scheduler and the reaper relay it

    let tasks = env.wait_terminal(&ids, WAIT).await;
    for id in &ids {
        assert_eq!(tasks[id].state, State::Succeeded, "{id}");
        assert_eq!(tasks[id].attempt, 1, "{id} dispatched and run once");
    }
    let started = |id: &str| tasks[id].first_started_ms.unwrap();
    let delay_start = started("delay") - tasks["delay"].created_ms;
    assert!(
        (2_000..3_000).contains(&delay_start),
        "delay_ms 2000 started after {delay_start} ms"
    );
    let at_start = started("at") as i64 - tasks["at"].run_at_ms as i64;
    assert!(
        (0..1_000).contains(&at_start),
        "run_at started {at_start} ms after its time"
    );
    assert!(started("now") < started("delay"));
    let runs = fleet_testkit::fleet::executions(&env, &["w"]);
    assert!(
        ids.iter().all(|id| runs[id].len() == 1),
        "one execution each: {runs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reported_by_a_handler_is_stored_with_the_task() {
    let env = TestEnv::start("progress");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _w = env.spawn("fleet-worker", "w", &[]);
    env.submit(&[task_json(
        "p",
        "sleep",
        "normal",
        serde_json::json!({ "ms": 4000 }),
    )])
    .await;
    let ids = vec!["p".to_string()];
    fleet_testkit::eventually(WAIT, "progress shows while the task runs", || async {
        let tasks = env.tasks(&ids).await;
        let Some(t) = tasks.get("p") else {
            return false;
        };
        let percent: u8 = t.progress.unwrap_or(0) as u8;
        let message = t.progress_message.as_deref().unwrap_or_default();
        t.state == State::Running && (10..100).contains(&percent) && message.contains("slept")
    })
    .await;
    let tasks = env.wait_terminal(&ids, WAIT).await;
    assert_eq!(tasks["p"].state, State::Succeeded);
}

/// Static membership (`worker.group_instance_id`, as the Kubernetes StatefulSet sets it from the
/// pod name): a worker killed and started again under the same instance id takes its partitions
/// back and runs the tasks submitted while it was gone, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_restarted_under_its_instance_id_runs_what_came_meanwhile() {
    let env = TestEnv::start("static-member");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let member = [("FLEET__WORKER__GROUP_INSTANCE_ID", "fleet-worker-0")];
    let mut worker = env.spawn("fleet-worker", "worker-a", &member);

    let first: Vec<String> = (0..50).map(|i| format!("s{i}")).collect();
    let json: Vec<String> = first
        .iter()
        .map(|id| task_json(id, "noop", "normal", serde_json::json!({})))
        .collect();
    env.submit(&json).await;
    env.wait_terminal(&first, WAIT).await;

    worker.signal("KILL");
    worker.wait_exit(Duration::from_secs(10));
    let second: Vec<String> = (0..50).map(|i| format!("r{i}")).collect();
    let json: Vec<String> = second
        .iter()
        .map(|id| task_json(id, "noop", "normal", serde_json::json!({})))
        .collect();
    env.submit(&json).await;
    let _again = env.spawn("fleet-worker", "worker-b", &member);
    let tasks = env.wait_terminal(&second, WAIT).await;
    let runs = executions(&env, &["worker-a", "worker-b"]);
    for id in first.iter().chain(&second) {
        assert_eq!(
            runs.get(id).map(Vec::len),
            Some(1),
            "{id} executed exactly once: {:?}",
            runs.get(id)
        );
    }
    for id in &second {
        assert_eq!(tasks[id].state, State::Succeeded, "{id}: {:?}", tasks[id]);
        assert_eq!(tasks[id].attempt, 1, "{id}: {:?}", tasks[id]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_publishes_what_it_accepted_itself_and_in_the_order_accepted() {
    use fleet_common::task::State;
    use fleet_common::{Priority, Topics};
    use fleet_testkit::eventually;

    let env = TestEnv::start("ingest-order");
    env.create_topics().await;
    // With redelivery this far away the relay publishes nothing during the test: every record
    // on the task topic comes from ingest's publisher stage.
    let mut scheduler = env.spawn(
        "fleet-scheduler",
        "scheduler",
        &[("FLEET__TASKS__REDELIVER_MS", "600000")],
    );
    let store = env.store().await;
    let mut ids = Vec::new();
    for wave in 0..3 {
        let wave_ids: Vec<String> = (0..100).map(|i| format!("w{wave}-{i}")).collect();
        let bodies: Vec<String> = wave_ids
            .iter()
            .map(|id| format!(r#"{{"id":"{id}","kind":"noop","key":"one-key"}}"#))
            .collect();
        env.submit(&bodies).await;
        ids.extend(wave_ids);
        let expected = ids.len() as u64;
        eventually(WAIT, "the wave is accepted", || async {
            let counts = store.counts().await.unwrap();
            counts
                .iter()
                .any(|(s, n)| *s == State::Pending && *n == expected)
        })
        .await;
    }

    let topic = Topics::from_settings(&env.settings().topics).tasks(Priority::Normal);
    let records = env.read_topic(&topic, ids.len(), WAIT).await;
    let published: Vec<String> = records
        .iter()
        .map(|r| r.header("fleet-task-id").to_string())
        .collect();
    let mut sorted = published.clone();
    sorted.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(
        sorted, expected,
        "each accepted task published exactly once"
    );
    // One key, one partition: a later wave never overtakes an earlier one.
    let waves: Vec<&str> = published.iter().map(|id| &id[..2]).collect();
    let mut ordered = waves.clone();
    ordered.sort();
    assert_eq!(waves, ordered, "waves keep their order on the partition");
    eventually(
        WAIT,
        "every dispatch is confirmed (outbox empty)",
        || async { store.backlog().await.unwrap().outbox == 0 },
    )
    .await;

    scheduler.signal("TERM");
    assert_eq!(scheduler.wait_exit(Duration::from_secs(30)), Some(0));
}
