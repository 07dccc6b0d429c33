//! Hostile and broken input on the real stack: records on task topics that Fleet never
//! published, tasks of a kind no worker handles, handlers that hang while heartbeating, and
//! tasks at the size limit. None may crash a service, block a partition or lose another task.

use fleet_common::store::AttemptOutcome;
use fleet_common::task::State;
use std::time::Duration;

use fleet_common::wire::Envelope;
use fleet_common::{Priority, Topics, kafka, task};
use fleet_testkit::fleet::{executions, log_events, task_json};
use fleet_testkit::{TestEnv, eventually};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

fn noop_ids(prefix: &str, n: usize) -> (Vec<String>, Vec<String>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let bodies = ids
        .iter()
        .map(|id| task_json(id, "noop", "normal", json!(null)))
        .collect();
    (ids, bodies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_on_task_topics_fleet_did_not_publish_are_refused_and_the_rest_runs() {
    let env = TestEnv::start("poison-records");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let mut worker = env.spawn("fleet-worker", "w1", &[]);
    let store = env.store().await;

    // A real task waiting for its time: a forged "attempt 7" of it must not run it.
    env.submit(&[json!({"id": "target", "kind": "noop", "delay_ms": 600_000}).to_string()])
        .await;
    eventually(WAIT, "the target task accepted", || async {
        store.task("target").await.unwrap().is_some()
    })
    .await;
    let target_record = store
        .task("target")
        .await
        .unwrap()
        .unwrap()
        .record
        .expect("a record");
    let ghost = r#"{"id":"ghost","kind":"noop","payload":null,"priority":"normal","queue":"default","max_attempts":5,"timeout_ms":0}"#;
    let poison: Vec<(Vec<u8>, &str)> = vec![
        (b"\xff\xfe not an envelope".to_vec(), "invalid_envelope"),
        (b"{}".to_vec(), "invalid_envelope"),
        (Vec::new(), "invalid_envelope"),
        (
            format!(r#"{{"v":9,"attempt":1,"task":{ghost}}}"#).into_bytes(),
            "invalid_envelope",
        ),
        (Envelope::encode(ghost, 0).into_bytes(), "invalid_envelope"),
        (Envelope::encode(ghost, 1).into_bytes(), "unknown_task"),
        (
            Envelope::encode(&target_record, 7).into_bytes(),
            "future_attempt",
        ),
    ];

    let (before, bodies) = noop_ids("before", 40);
    env.submit(&bodies).await;
    let producer: FutureProducer = kafka::producer_config(&env.settings().kafka, "it-poison")
        .create()
        .unwrap();
    let topic = Topics::from_settings(&env.settings().topics).tasks(Priority::Normal);
    for (i, (bytes, _)) in poison.iter().enumerate() {
        let mut record = FutureRecord::<(), [u8]>::to(&topic).partition((i % 4) as i32);
        if !bytes.is_empty() {
            record = record.payload(bytes.as_slice());
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("poison produced");
    }
    let (after, bodies) = noop_ids("after", 40);
    env.submit(&bodies).await;
    env.submit(&[json!({"id": "nokind", "kind": "no_such_kind", "max_attempts": 5}).to_string()])
        .await;

    let normal: Vec<String> = before.iter().chain(&after).cloned().collect();
    let tasks = env.wait_terminal(&normal, WAIT).await;
    assert!(tasks.values().all(|t| t.state == State::Succeeded));
    let runs = executions(&env, &["w1"]);
    for id in &normal {
        assert_eq!(runs.get(id).map_or(0, Vec::len), 1, "{id}");
    }

    // An unknown kind is caught by the worker: failed at once, no retries, a dead letter.
    let nokind = env.wait_terminal(&["nokind".into()], WAIT).await;
    let nokind = &nokind["nokind"];
    assert_eq!((nokind.state.as_str(), nokind.attempt), ("failed", 1));
    assert!(
        nokind
            .error
            .as_deref()
            .unwrap()
            .contains("no handler is registered for kind `no_such_kind`"),
        "{nokind:?}"
    );
    let dead = Topics::from_settings(&env.settings().topics).dead();
    let letter = env.read_topic(&dead, 1, WAIT).await[0].json();
    assert_eq!(letter["id"], "nokind");
    assert_eq!(letter["history"][0]["outcome"], "failed");

    // Every refused record is on the rejected topic, with its reason, byte for byte.
    let rejected = Topics::from_settings(&env.settings().topics).rejected();
    let records = env.read_topic(&rejected, poison.len(), WAIT).await;
    let mut codes: Vec<&str> = records
        .iter()
        .map(|r| r.header("fleet-reject-code"))
        .collect();
    let mut expected: Vec<&str> = poison.iter().map(|(_, code)| *code).collect();
    codes.sort_unstable();
    expected.sort_unstable();
    assert_eq!(codes, expected);
    assert!(
        records
            .iter()
            .all(|r| r.header("fleet-source-topic") == topic)
    );
    assert!(
        records.iter().any(|r| r.payload == poison[0].0),
        "kept as sent"
    );
    let future = records
        .iter()
        .find(|r| r.header("fleet-reject-code") == "future_attempt")
        .unwrap();
    assert!(future.header("fleet-reject-reason").contains("target"));
    assert_eq!(
        store.counters().await.unwrap().get("refused"),
        Some(&(poison.len() as u64))
    );
    let target = store.task("target").await.unwrap().unwrap();
    assert_eq!(
        (target.state.as_str(), target.attempt),
        ("scheduled", 0),
        "the forged attempt changed nothing"
    );
    assert!(worker.is_running(), "the worker survived every record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_handler_that_still_heartbeats_is_stopped_at_its_hard_deadline() {
    let env = TestEnv::start("hung");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let _w1 = env.spawn("fleet-worker", "w1", &[]);
    // Blocks its thread for 4 s, deaf to the worker's 300 ms timeout; one attempt only.
    env.submit(&[
        json!({"id": "hung", "kind": "block", "payload": {"ms": 4000},
        "timeout_ms": 300, "max_attempts": 1})
        .to_string(),
    ])
    .await;
    let hung = env.wait_terminal(&["hung".into()], WAIT).await;
    let hung = &hung["hung"];
    assert_eq!(hung.state, State::Failed);
    assert!(
        hung.error.as_deref().unwrap().contains("hard deadline"),
        "{hung:?}"
    );
    let started: u64 = hung.first_started_ms.unwrap();
    let finished: u64 = hung.finished_ms.unwrap();
    // Deadline = start + timeout 300 + grace 1000; the reaper scans every 500 ms.
    let took = finished - started;
    assert!((1_300..3_000).contains(&took), "stopped after {took} ms");
    assert_eq!(hung.history[0].outcome, AttemptOutcome::Deadline);

    // The worker keeps serving other tasks with one thread blocked.
    let (ids, bodies) = noop_ids("other", 20);
    env.submit(&bodies).await;
    let others = env.wait_terminal(&ids, WAIT).await;
    assert!(others.values().all(|t| t.state == State::Succeeded));

    // When the handler finally returns, its late result is fenced and changes nothing.
    eventually(WAIT, "the late completion fenced", || async {
        log_events(&env, &["w1"]).iter().any(|e| {
            e["message"] == "Completion fenced: this attempt no longer owns the task."
                && e["task_id"] == "hung"
        })
    })
    .await;
    let hung = env.tasks(&["hung".into()]).await;
    assert_eq!(hung["hung"].state, State::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_at_the_size_limit_runs_and_topics_too_small_for_it_refuse_the_start() {
    let env = TestEnv::start("size-limit");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _w1 = env.spawn("fleet-worker", "w1", &[]);
    let settings = env.settings();
    let limit = settings.tasks.max_task_bytes;
    let head = r#"{"id":"big","kind":"noop","payload":""#;
    let body = format!("{head}{}\"}}", "x".repeat(limit - head.len() - 2));
    assert_eq!(body.len(), limit);
    let mut config = kafka::producer_config(&settings.kafka, "it-big");
    kafka::fit_producer(&mut config, &settings.kafka, task::record_limit(limit)).unwrap();
    let producer: FutureProducer = config.create().unwrap();
    let submit = Topics::from_settings(&settings.topics).submit();
    producer
        .send(
            FutureRecord::<(), _>::to(&submit).payload(body.as_bytes()),
            Duration::from_secs(10),
        )
        .await
        .expect("the largest task is accepted by the broker");
    let big = env.wait_terminal(&["big".into()], WAIT).await;
    assert_eq!(big["big"].state, State::Succeeded);
    assert!(big["big"].record.as_deref().unwrap().len() >= limit - 100);

    // Topics made for smaller records: the scheduler refuses to start and says why.
    let small = TestEnv::start("size-small");
    let s = small.settings();
    kafka::ensure_topics(
        &s.kafka,
        &Topics::from_settings(&s.topics).all(),
        s.topics.partitions,
        1,
        100_000,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let mut scheduler = small.spawn("fleet-scheduler", "scheduler", &[]);
    assert_eq!(scheduler.wait_exit(Duration::from_secs(30)), Some(1));
    let log = std::fs::read_to_string(small.log_of("scheduler")).unwrap();
    assert!(
        log.contains("max.message.bytes") && log.contains("100000"),
        "{log}"
    );
}
