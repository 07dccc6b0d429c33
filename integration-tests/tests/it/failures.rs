//! Handler failures on the real stack: retries with backoff until success, permanent errors,
//! retries running out, panics, and the worker's own timeout. Each failed task ends `failed`
//! once with a dead letter carrying its attempt history.

use fleet_common::store::{AttemptOutcome, StoredTask};
use fleet_common::task::State;
use std::collections::HashMap;
use std::time::Duration;

use fleet_common::Topics;
use fleet_testkit::fleet::executions;
use fleet_testkit::{TestEnv, eventually};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

fn outcomes(task: &StoredTask) -> Vec<AttemptOutcome> {
    task.history.iter().map(|h| h.outcome.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_retry_with_backoff_and_end_failed_once_with_their_history() {
    let env = TestEnv::start("failures");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let mut worker = env.spawn("fleet-worker", "w1", &[]);
    let submissions = [
        json!({"id": "flaky", "kind": "flaky", "payload": {"failures": 2}, "max_attempts": 5}),
        json!({"id": "permanent", "kind": "fail", "payload": {"message": "bad card"}, "max_attempts": 5}),
        json!({"id": "exhausted", "kind": "fail",
            "payload": {"message": "busy", "retryable": true}, "max_attempts": 3}),
        json!({"id": "panics", "kind": "panic", "payload": {"message": "index out of range"},
            "max_attempts": 2}),
        json!({"id": "slow", "kind": "sleep", "payload": {"ms": 10_000}, "timeout_ms": 300,
            "max_attempts": 1}),
    ];
    let ids: Vec<String> = submissions
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    env.submit(&submissions.iter().map(Value::to_string).collect::<Vec<_>>())
        .await;
    // Two submissions under one idempotency key (with different ids) make one task: whichever
    // the scheduler reads first.
    let orders: Vec<String> = vec!["order-1".into(), "order-2".into()];
    let bodies: Vec<String> = orders
        .iter()
        .map(|id| json!({"id": id, "kind": "noop", "idempotency_key": "order-7"}).to_string())
        .collect();
    env.submit(&bodies).await;
    let tasks = env.wait_terminal(&ids, WAIT).await;
    let state = |id: &str| (tasks[id].state.as_str(), tasks[id].attempt);

    // Retryable failures are retried after a backoff of at most retry_cap_ms (1 s in tests).
    assert_eq!(state("flaky"), ("succeeded", 3));
    assert_eq!(
        outcomes(&tasks["flaky"]),
        [
            AttemptOutcome::Retry,
            AttemptOutcome::Retry,
            AttemptOutcome::Succeeded
        ]
    );
    let h = &tasks["flaky"].history;
    for pair in h.windows(2) {
        let gap = pair[1].started_ms - pair[0].ended_ms;
        assert!(gap <= 1_000 + 1_000, "retry waited {gap} ms");
    }
    // A permanent error is not retried.
    assert_eq!(state("permanent"), ("failed", 1));
    assert_eq!(tasks["permanent"].error.as_deref().unwrap(), "bad card");
    // Retries run out at max_attempts.
    assert_eq!(state("exhausted"), ("failed", 3));
    assert_eq!(
        outcomes(&tasks["exhausted"]),
        [
            AttemptOutcome::Retry,
            AttemptOutcome::Retry,
            AttemptOutcome::Failed
        ]
    );
    // A panic is caught and counted as a failed attempt; the worker lives on.
    assert_eq!(state("panics"), ("failed", 2));
    assert!(
        tasks["panics"]
            .error
            .as_deref()
            .unwrap()
            .contains("handler panicked: index out of range"),
        "{:?}",
        tasks["panics"]
    );
    // The worker's own timeout ends the attempt well before the hard deadline.
    assert_eq!(state("slow"), ("failed", 1));
    assert!(
        tasks["slow"]
            .error
            .as_deref()
            .unwrap()
            .contains("timeout after 300 ms"),
        "{:?}",
        tasks["slow"]
    );
    let took: u64 = tasks["slow"].finished_ms.unwrap() - tasks["slow"].first_started_ms.unwrap();
    assert!(took < 1_300, "timeout took {took} ms");

    eventually(WAIT, "the resubmission consumed", || async {
        env.store().await.counters().await.unwrap().get("duplicate") == Some(&1)
    })
    .await;
    let made = env.tasks(&orders).await;
    assert_eq!(made.len(), 1, "one task for one idempotency key: {made:?}");
    let order: Vec<String> = made.into_keys().collect();
    let order = env.wait_terminal(&order, WAIT).await;
    assert!(order.values().all(|t| t.state == State::Succeeded));

    // Every execution is an attempt; each failed task has one dead letter with its history.
    let runs = executions(&env, &["w1"]);
    for id in &ids {
        let attempts = tasks[id].attempt as usize;
        assert_eq!(runs.get(id).map_or(0, Vec::len), attempts, "{id}");
    }
    let dead = Topics::from_settings(&env.settings().topics).dead();
    let letters = env.read_topic(&dead, 4, WAIT).await;
    let mut by_id: HashMap<String, Value> = HashMap::new();
    for letter in letters {
        let letter = letter.json();
        assert!(
            by_id
                .insert(letter["id"].as_str().unwrap().to_string(), letter)
                .is_none(),
            "one dead letter per task"
        );
    }
    let mut failed: Vec<&String> = by_id.keys().collect();
    failed.sort();
    assert_eq!(failed, ["exhausted", "panics", "permanent", "slow"]);
    assert_eq!(by_id["exhausted"]["history"].as_array().unwrap().len(), 3);
    assert_eq!(
        by_id["exhausted"]["envelope"]["task"]["payload"]["message"],
        "busy"
    );
    assert!(worker.is_running());
}

/// A task redriven before the relay wrote its dead-letter record gets none: it is no longer
/// dead, and its hash now describes its next round. One that stays failed gets its record.
#[tokio::test]
async fn a_task_redriven_before_its_dead_letter_is_written_gets_none() {
    use fleet_common::store::{Claim, Completion, Outcome};

    let env = TestEnv::start("redriven-letter");
    env.create_topics().await;
    let store = env.store().await;
    // Both fail for good while no scheduler (and so no relay) runs; "a" fails first.
    for id in ["a", "b"] {
        let task = env.new_task(&format!(
            r#"{{"id":"{id}","kind":"noop","max_attempts":1}}"#
        ));
        store.accept(&[task]).await.unwrap();
        assert_eq!(
            store.claim("w", 60_000, &[(id, 1)]).await.unwrap(),
            [Claim::Claimed]
        );
        let failed = Outcome::Fail("boom".into());
        assert_eq!(
            store.complete("w", &[((id, 1), &failed)]).await.unwrap(),
            [Completion::Failed]
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(store.redrive(&["a".to_string()]).await.unwrap(), 1);

    let _s = env.spawn("fleet-scheduler", "s", &[]);
    eventually(WAIT, "the relay handled both dead letters", || async {
        store.backlog().await.unwrap().dead == 0
    })
    .await;
    // The relay takes dead letters oldest first, so a record for "a" would come first.
    let dead = Topics::from_settings(&env.settings().topics).dead();
    let letters = env.read_topic(&dead, 1, WAIT).await;
    assert_eq!(letters[0].json()["id"], "b", "{:?}", letters[0].json());
    assert_eq!(
        env.tasks(&["a".to_string()]).await["a"].state,
        State::Pending,
        "a is out for another round"
    );
}
