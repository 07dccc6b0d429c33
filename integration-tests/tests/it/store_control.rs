//! The task-control scripts against a real redis-server: cancel (and its races with completion,
//! lease expiry and hand-back), pause and resume, priority changes, hard deadlines and the
//! attempt history.

use fleet_common::Priority;
use fleet_common::store::{
    AttemptOutcome, Cancel, Claim, Completion, Outcome, Reprioritize, Requeue, Selector, Store,
    StoredTask, keys,
};
use fleet_common::task::State;
use fleet_testkit::TestEnv;

async fn task(store: &Store, id: &str) -> StoredTask {
    store.task(id).await.unwrap().unwrap()
}

fn ids(names: &[&str]) -> Vec<String> {
    names.iter().map(ToString::to_string).collect()
}

#[tokio::test]
async fn cancel_ends_waiting_tasks_at_once_and_running_ones_whatever_they_report() {
    let env = TestEnv::redis_only("cancel-store");
    let store = env
        .store_with(&[
            r#"{"id":"p","kind":"noop"}"#,
            r#"{"id":"s","kind":"noop","delay_ms":60000}"#,
            r#"{"id":"r","kind":"noop"}"#,
            r#"{"id":"done","kind":"noop"}"#,
        ])
        .await;
    store
        .claim("w", 3_000, &[("r", 1), ("done", 1)])
        .await
        .unwrap();
    let ok = Outcome::Ok("1".into());
    store.complete("w", &[(("done", 1), &ok)]).await.unwrap();

    let got = store
        .cancel(&ids(&["p", "s", "r", "done", "nope"]))
        .await
        .unwrap();
    assert_eq!(
        got,
        [
            Cancel::Cancelled,
            Cancel::Cancelled,
            Cancel::Cancelling,
            Cancel::Ended(State::Succeeded),
            Cancel::Unknown
        ]
    );
    // Nothing waits to be published for the cancelled ones, and a late delivery is refused.
    let mut entries: Vec<String> = Vec::new();
    for set in [store.keys().due(), store.keys().outbox()] {
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(set)
            .arg(0)
            .arg(-1)
            .query_async(&mut env.redis_conn().await)
            .await
            .unwrap();
        entries.extend(members);
    }
    let waiting: Vec<&str> = entries.iter().map(|m| keys::entry_task_id(m)).collect();
    assert!(
        !waiting.contains(&"p") && !waiting.contains(&"s"),
        "{entries:?}"
    );
    assert_eq!(
        store.claim("w", 3_000, &[("p", 1)]).await.unwrap(),
        [Claim::Done]
    );

    // The running task's worker hears of it at its next heartbeat, and its success report
    // after the cancel still ends it cancelled — exactly once.
    let beat = store
        .extend("w", 3_000, "{}", "", &[("r", 1, None)])
        .await
        .unwrap();
    assert_eq!((beat.lost, beat.cancel), (vec![], vec![0]));
    assert_eq!(
        store.complete("w", &[(("r", 1), &ok)]).await.unwrap(),
        [Completion::Cancelled]
    );
    assert_eq!(
        store.complete("w", &[(("r", 1), &ok)]).await.unwrap(),
        [Completion::Already]
    );
    assert_eq!(task(&store, "r").await.state, State::Cancelled);
    assert_eq!(
        store.cancel(&ids(&["r"])).await.unwrap(),
        [Cancel::Ended(State::Cancelled)]
    );
    let counts = store.counts().await.unwrap();
    assert_eq!(
        counts,
        [
            (State::Waiting, 0),
            (State::Pending, 0),
            (State::Scheduled, 0),
            (State::Running, 0),
            (State::Succeeded, 1),
            (State::Failed, 0),
            (State::Cancelled, 3),
            (State::Skipped, 0)
        ]
    );
    let h = task(&store, "r").await.history;
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].outcome, AttemptOutcome::Cancelled);
}

#[tokio::test]
async fn a_cancel_after_the_completion_loses_and_a_cancel_before_a_hand_back_or_expiry_wins() {
    let env = TestEnv::redis_only("cancel-race");
    let store = env
        .store_with(&[
            r#"{"id":"a","kind":"noop"}"#,
            r#"{"id":"b","kind":"noop"}"#,
            r#"{"id":"c","kind":"noop"}"#,
        ])
        .await;
    store
        .claim("w", 3_000, &[("a", 1), ("b", 1), ("c", 1)])
        .await
        .unwrap();
    // a: completion first, then cancel: it stays succeeded.
    let ok = Outcome::Ok("1".into());
    store.complete("w", &[(("a", 1), &ok)]).await.unwrap();
    assert_eq!(
        store.cancel(&ids(&["a"])).await.unwrap(),
        [Cancel::Ended(State::Succeeded)]
    );
    // b: cancel, then the worker drains and hands it back: cancelled, not requeued.
    // c: cancel, then the worker dies and the lease expires: cancelled, not requeued.
    assert_eq!(
        store.cancel(&ids(&["b", "c"])).await.unwrap(),
        [Cancel::Cancelling, Cancel::Cancelling]
    );
    assert_eq!(store.release("w", &[("b", 1)]).await.unwrap(), 0);
    env.expire_lease(&store, "c").await;
    assert_eq!(
        store.requeue(&ids(&["c"])).await.unwrap(),
        [Requeue::Cancelled("c".into())]
    );
    for id in ["b", "c"] {
        assert_eq!(task(&store, id).await.state, State::Cancelled, "{id}");
    }
    assert!(
        store.take_due(10).await.unwrap().is_empty(),
        "nothing requeued"
    );
}

#[tokio::test]
async fn paused_tasks_are_held_at_claim_and_published_again_on_resume() {
    let env = TestEnv::redis_only("pause-store");
    let store = env
        .store_with(&[
            r#"{"id":"q1","kind":"noop","queue":"reports"}"#,
            r#"{"id":"q2","kind":"noop","queue":"reports","priority":"high"}"#,
            r#"{"id":"o","kind":"noop"}"#,
            r#"{"id":"lo","kind":"noop","priority":"low"}"#,
        ])
        .await;
    assert!(
        store
            .pause(&Selector::Queue("reports".into()))
            .await
            .unwrap()
    );
    assert!(
        !store
            .pause(&Selector::Queue("reports".into()))
            .await
            .unwrap()
    );
    assert!(
        store
            .pause(&Selector::Priority(Priority::High))
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .claim("w", 3_000, &[("q1", 1), ("q2", 1), ("o", 1)])
            .await
            .unwrap(),
        [Claim::Held, Claim::Held, Claim::Claimed]
    );
    assert_eq!(store.held_count().await.unwrap(), 2);
    assert_eq!(task(&store, "q1").await.state, State::Pending);

    // q2 stays held while its priority is paused, although its queue resumed.
    assert_eq!(
        store
            .resume(&Selector::Queue("reports".into()))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.paused().await.unwrap(),
        [Selector::Priority(Priority::High)]
    );
    // The resume publishes q1 as a new attempt, not charged against its budget: a late
    // acknowledgement of the held message cannot remove its outbox entry, and the held
    // message itself is fenced.
    store.dispatched(&[("q1", 1)]).await.unwrap();
    let due: Vec<(String, u32)> = store
        .take_due(10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.id, d.attempt))
        .collect();
    assert_eq!(due, [("q1".to_string(), 2)]);
    assert_eq!(task(&store, "q1").await.released, Some(1));
    assert_eq!(
        store.claim("w", 3_000, &[("q1", 1)]).await.unwrap(),
        [Claim::Stale]
    );
    assert_eq!(
        store.claim("w", 3_000, &[("q1", 2)]).await.unwrap(),
        [Claim::Claimed]
    );

    // A waiting task moves to another priority: the message on the old topic is fenced and
    // the task is published on the new one.
    assert_eq!(
        store.set_priority("q2", Priority::Critical).await.unwrap(),
        Reprioritize::Moved
    );
    let record: serde_json::Value =
        serde_json::from_str(task(&store, "q2").await.record.as_deref().unwrap()).unwrap();
    assert_eq!(record["priority"], "critical");
    assert_eq!(
        store.claim("w", 3_000, &[("q2", 1)]).await.unwrap(),
        [Claim::Stale],
        "the old message"
    );
    let due = store.take_due(10).await.unwrap();
    let again = due.iter().find(|d| d.id == "q2").expect("republished");
    assert_eq!(again.attempt, 2);
    assert_eq!(
        store.claim("w", 3_000, &[("q2", 2)]).await.unwrap(),
        [Claim::Claimed]
    );
    assert_eq!(
        store.set_priority("q2", Priority::Low).await.unwrap(),
        Reprioritize::Started(State::Running)
    );
    assert_eq!(
        store.set_priority("lo", Priority::Low).await.unwrap(),
        Reprioritize::Unchanged
    );
    assert_eq!(
        store.set_priority("nope", Priority::Low).await.unwrap(),
        Reprioritize::Unknown
    );
    // The bump did not use up an attempt.
    let fail = Outcome::Retry {
        error: "x".into(),
        delay_ms: 0,
    };
    let one = env.new_task(r#"{"id":"one","kind":"noop","max_attempts":1}"#);
    store.accept(&[one]).await.unwrap();
    store.set_priority("one", Priority::High).await.unwrap();
    store
        .resume(&Selector::Priority(Priority::High))
        .await
        .unwrap();
    store.claim("w", 3_000, &[("one", 2)]).await.unwrap();
    assert_eq!(
        store.complete("w", &[(("one", 2), &fail)]).await.unwrap(),
        [Completion::Failed],
        "one attempt allowed and used"
    );
}

#[tokio::test]
async fn leases_stop_at_the_hard_deadline_and_the_reaper_ends_the_attempt_as_a_timeout() {
    let env = TestEnv::redis_only("deadline-store");
    let store = env
        .store_with(&[
            r#"{"id":"t","kind":"block","timeout_ms":200,"max_attempts":2}"#,
            r#"{"id":"free","kind":"noop"}"#,
        ])
        .await;
    store
        .claim("w", 60_000, &[("t", 1), ("free", 1)])
        .await
        .unwrap();
    let conn = env.redis_conn().await;
    let score = |id: &'static str| {
        let key = store.keys().leases();
        let mut conn = conn.clone();
        async move {
            let s: f64 = redis::cmd("ZSCORE")
                .arg(key)
                .arg(id)
                .query_async(&mut conn)
                .await
                .unwrap();
            s as u64
        }
    };
    let deadline = task(&store, "t").await.deadline_ms.unwrap();
    let started = task(&store, "t").await.started_ms.unwrap();
    // timeout 200 ms + grace 1000 ms (test settings)
    assert_eq!(deadline - started, 1_200);
    assert_eq!(score("t").await, deadline, "lease capped at the deadline");
    assert!(
        score("free").await >= started + 59_000,
        "no timeout, no cap"
    );

    tokio::time::sleep(std::time::Duration::from_millis(1_300)).await;
    // Heartbeats keep coming, but cannot push the lease past the deadline.
    store
        .extend("w", 60_000, "{}", "", &[("t", 1, None), ("free", 1, None)])
        .await
        .unwrap();
    assert_eq!(score("t").await, deadline);
    let expired = store.expired_leases(10).await.unwrap();
    assert_eq!(expired, ["t"]);
    let requeued = store.requeue(&expired).await.unwrap();
    assert!(matches!(&requeued[0], Requeue::Requeued(d) if d.attempt == 2));
    assert!(
        task(&store, "t")
            .await
            .last_error
            .is_some_and(|e| e.contains("hard deadline"))
    );
    let h = task(&store, "t").await.history;
    assert_eq!(
        (h[0].attempt, &h[0].outcome),
        (1, &AttemptOutcome::Deadline)
    );
    // The hung attempt's late result is fenced.
    let ok = Outcome::Ok("1".into());
    assert_eq!(
        store.complete("w", &[(("t", 1), &ok)]).await.unwrap(),
        [Completion::Fenced]
    );

    // Attempt 2 keeps the first start, gets a deadline of its own, and its success removes the
    // deadline and extends the history.
    let first_started = task(&store, "t").await.first_started_ms;
    assert_eq!(
        store.claim("w2", 60_000, &[("t", 2)]).await.unwrap(),
        [Claim::Claimed]
    );
    assert_eq!(task(&store, "t").await.first_started_ms, first_started);
    let deadline2 = task(&store, "t").await.deadline_ms.unwrap();
    assert!(deadline2 > deadline);
    assert_eq!(
        store.complete("w2", &[(("t", 2), &ok)]).await.unwrap(),
        [Completion::Succeeded]
    );
    let t = task(&store, "t").await;
    assert_eq!(t.deadline_ms, None, "{t:?}");
    // A later start keeps the first; the last change is the ending, in the task and the list.
    assert_eq!(t.first_started_ms, first_started, "{t:?}");
    assert!(t.started_ms >= t.first_started_ms, "{t:?}");
    assert_eq!(Some(t.updated_ms), t.finished_ms, "{t:?}");
    let page = store.list(&Default::default(), None, 10).await.unwrap();
    let listed = page.tasks.iter().find(|t| t.id == "t").unwrap();
    assert_eq!(Some(listed.updated_ms), t.finished_ms);
    let ends: Vec<_> = t.history.iter().map(|e| (e.attempt, &e.outcome)).collect();
    assert_eq!(
        ends,
        [
            (1, &AttemptOutcome::Deadline),
            (2, &AttemptOutcome::Succeeded)
        ]
    );
}

/// A resume cut short after lifting its pause (its process killed before publishing the held
/// tasks) leaves them held; running it again publishes them, and a third run finds nothing.
#[tokio::test]
async fn a_resume_cut_short_is_finished_by_running_it_again() {
    let env = TestEnv::redis_only("resume-again");
    let store = env
        .store_with(&[r#"{"id":"h","kind":"noop","queue":"reports"}"#])
        .await;
    let reports = Selector::Queue("reports".into());
    assert!(store.pause(&reports).await.unwrap());
    assert_eq!(
        store.claim("w", 3_000, &[("h", 1)]).await.unwrap(),
        [Claim::Held]
    );
    // The first half of a resume: the pause is gone, the task is still held.
    env.lift_pause_only(&store, &reports).await;
    assert!(store.paused().await.unwrap().is_empty());
    assert_eq!(store.held_count().await.unwrap(), 1);

    assert_eq!(store.resume(&reports).await.unwrap(), 1, "published again");
    assert_eq!(store.held_count().await.unwrap(), 0);
    assert_eq!(store.resume(&reports).await.unwrap(), 0, "nothing left");
    assert_eq!(task(&store, "h").await.state, State::Pending);
}

#[tokio::test]
async fn the_held_sweep_walks_the_held_set_and_sends_on_only_what_nothing_pauses() {
    let env = TestEnv::redis_only("held-sweep");
    let store = env.store().await;
    let ids = ["a1", "a2", "r1", "r2", "r3"];
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| {
            let queue = if id.starts_with('a') {
                "audit"
            } else {
                "reports"
            };
            env.new_task(&format!(
                r#"{{"id":"{id}","kind":"noop","queue":"{queue}"}}"#
            ))
        })
        .collect();
    store.accept(&tasks).await.unwrap();
    let (reports, audit) = (
        Selector::Queue("reports".into()),
        Selector::Queue("audit".into()),
    );
    store.pause(&reports).await.unwrap();
    store.pause(&audit).await.unwrap();
    let deliveries: Vec<(&str, u32)> = ids.iter().map(|id| (*id, 1)).collect();
    assert_eq!(
        store.claim("w", 3_000, &deliveries).await.unwrap(),
        [Claim::Held; 5]
    );
    // A resume of `reports` cut short after lifting its pause.
    env.lift_pause_only(&store, &reports).await;

    // Held in one call, the five rank by id: a1, a2, r1, r2, r3. Two at a time, the sweep
    // leaves the paused ones and sends the rest on; what it sends leaves the set.
    assert_eq!(store.sweep_held(0, 2).await.unwrap(), (2, 0));
    assert_eq!(store.sweep_held(2, 2).await.unwrap(), (2, 2));
    assert_eq!(store.sweep_held(2, 2).await.unwrap(), (1, 1));
    assert_eq!(store.sweep_held(2, 2).await.unwrap(), (0, 0));
    assert_eq!(store.sweep_held(0, 0).await.unwrap(), (0, 0));
    assert_eq!(store.held_count().await.unwrap(), 2);
    for id in ["r1", "r2", "r3"] {
        assert_eq!(task(&store, id).await.state, State::Pending);
        // The held message is consumed; the next attempt (2) is in the outbox.
        assert_eq!(task(&store, id).await.attempt, 1);
    }
    assert_eq!(task(&store, "a1").await.attempt, 0);
    assert_eq!(
        store.resume(&reports).await.unwrap(),
        0,
        "nothing left to resume"
    );
    // A resume that listed r1 before the sweep sent it on: r1 is no longer held, so it is
    // not sent on (nor its attempt bumped) a second time.
    assert_eq!(store.unhold(&["r1".to_string()]).await.unwrap(), 0);
    assert_eq!(task(&store, "r1").await.attempt, 1, "sent on once");
    assert_eq!(store.resume(&audit).await.unwrap(), 2);
    assert_eq!(store.held_count().await.unwrap(), 0);
}
