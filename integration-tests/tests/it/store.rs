//! The transition scripts against a real redis-server: every precondition and every fencing
//! answer, checked directly.

use std::time::Duration;

use fleet_common::store::{
    Accepted, AttemptEnding, AttemptOutcome, Claim, Completion, NewTask, Outcome, Requeue, Store,
};
use fleet_common::task::State;
use fleet_testkit::TestEnv;

async fn state(store: &Store, id: &str) -> String {
    store.task(id).await.unwrap().unwrap().state.to_string()
}

#[tokio::test]
async fn task_times_read_each_tasks_journey_in_order() {
    let env = TestEnv::redis_only("times");
    let store = env.store().await;
    let done = env.new_task(r#"{"id":"done","kind":"noop"}"#);
    let waiting = env.new_task(r#"{"id":"waiting","kind":"noop"}"#);
    store.accept(&[done.clone(), waiting]).await.unwrap();
    assert_eq!(
        store.claim("w1", 30_000, &[("done", 1)]).await.unwrap(),
        [Claim::Claimed]
    );
    let ok = Outcome::Ok("null".into());
    assert_eq!(
        store.complete("w1", &[(("done", 1), &ok)]).await.unwrap(),
        [Completion::Succeeded]
    );
    let ids = ["done", "missing", "waiting"].map(String::from);
    let times = store.task_times(&ids).await.unwrap();
    assert_eq!(times.len(), 3);
    let finished = times[0].as_ref().expect("done is there");
    assert_eq!(finished.state, Some(State::Succeeded));
    assert_eq!(finished.attempt, 1);
    assert_eq!(finished.worker.as_deref(), Some("w1"));
    let started = finished.started_ms.expect("a start");
    assert_eq!(finished.first_started_ms, Some(started), "the only start");
    assert!(finished.finished_ms.expect("an end") >= started);
    assert!(finished.created_ms.expect("created") <= started);
    assert_eq!(finished.record_bytes, done.record_json.len());
    assert_eq!(times[1], None, "not in Redis");
    let pending = times[2].as_ref().expect("waiting is there");
    assert_eq!(pending.state, Some(State::Pending));
    assert_eq!((pending.attempt, pending.started_ms), (0, None));

    // The whole hash, typed: the same journey, and its one implied history entry.
    let task = store.task("done").await.unwrap().unwrap();
    assert_eq!(task.state, State::Succeeded);
    assert_eq!(task.started_ms, Some(started));
    assert_eq!(task.history.len(), 1);
    assert_eq!(task.history[0].worker, "w1");
    assert_eq!(task.updated_ms, task.finished_ms.unwrap());
}

#[tokio::test]
async fn accept_is_idempotent_by_id_and_by_idempotency_key() {
    let env = TestEnv::redis_only("accept");
    let store = env.store().await;
    let a = env.new_task(r#"{"id":"a","kind":"noop"}"#);
    let k1 = env.new_task(r#"{"kind":"noop","idempotency_key":"order-7"}"#);
    let k2 = env.new_task(r#"{"kind":"echo","idempotency_key":"order-7"}"#);
    let got = store
        .accept(&[a.clone(), k1.clone(), a.clone(), k2])
        .await
        .unwrap();
    assert_eq!(got[0], Accepted::Pending("a".into()));
    assert_eq!(got[1], Accepted::Pending(k1.record.id.clone()));
    assert_eq!(
        got[2],
        Accepted::Duplicate("a".into()),
        "same id in the same batch"
    );
    assert_eq!(
        got[3],
        Accepted::Duplicate(k1.record.id.clone()),
        "same idempotency key → existing task"
    );
    let counts: Vec<(State, u64)> = store.counts().await.unwrap();
    assert!(counts.contains(&(State::Pending, 2)), "{counts:?}");

    // A later batch mixing stored ids and idempotency keys with new tasks: the batch-wide reads
    // find the stored ones, and only those are answered as duplicates.
    let fresh = env.new_task(r#"{"kind":"noop"}"#);
    let k3 = env.new_task(r#"{"kind":"noop","idempotency_key":"order-7"}"#);
    let k4 = env.new_task(r#"{"kind":"noop","idempotency_key":"order-8"}"#);
    let got = store
        .accept(&[fresh.clone(), a.clone(), k3, k4.clone()])
        .await
        .unwrap();
    assert_eq!(
        got,
        [
            Accepted::Pending(fresh.record.id.clone()),
            Accepted::Duplicate("a".into()),
            Accepted::Duplicate(k1.record.id.clone()),
            Accepted::Pending(k4.record.id.clone()),
        ]
    );
    assert!(store.counts().await.unwrap().contains(&(State::Pending, 4)));

    let later = env.new_task(r#"{"kind":"noop","delay_ms":60000}"#);
    assert!(matches!(
        store.accept(&[later]).await.unwrap()[0],
        Accepted::Scheduled(_)
    ));
    assert!(
        store
            .take_due(10)
            .await
            .unwrap()
            .iter()
            .all(|d| d.id == "a" || d.id == k1.record.id),
        "a delayed task is not due yet"
    );

    // After the idempotency window the key maps to nothing, and a resubmission is a new task.
    let mut tasks = env.settings().tasks;
    tasks.idempotency_window_ms = 1_000;
    let short = Store::new(store.conn(), store.keys().clone(), &tasks);
    let first = env.new_task(r#"{"kind":"noop","idempotency_key":"brief"}"#);
    let again = env.new_task(r#"{"kind":"noop","idempotency_key":"brief"}"#);
    short.accept(std::slice::from_ref(&first)).await.unwrap();
    assert_eq!(
        short.accept(std::slice::from_ref(&again)).await.unwrap()[0],
        Accepted::Duplicate(first.record.id.clone())
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(
        short.accept(std::slice::from_ref(&again)).await.unwrap()[0],
        Accepted::Pending(again.record.id.clone()),
        "the window has passed"
    );
}

#[tokio::test]
async fn a_task_hash_leaves_out_what_it_repeats_and_reads_whole() {
    // Every stored field costs a scan of the hash in each later write, so the id (the key's)
    // and the run-at time of a task due now (its creation time) are not stored, yet a read
    // shows them. A delayed task stores its run-at time.
    let env = TestEnv::redis_only("lean-hash");
    let store = env
        .store_with(&[
            r#"{"id":"now","kind":"noop"}"#,
            r#"{"id":"later","kind":"noop","delay_ms":60000}"#,
        ])
        .await;
    let mut conn = env.redis_conn().await;
    let stored = |id: &str| redis::cmd("HGETALL").arg(store.keys().task(id)).to_owned();
    let now: std::collections::HashMap<String, String> =
        stored("now").query_async(&mut conn).await.unwrap();
    assert!(
        !now.contains_key("id") && !now.contains_key("run_at_ms"),
        "{now:?}"
    );
    let read = store.task("now").await.unwrap().unwrap();
    assert_eq!(read.id, "now");
    assert_eq!(read.run_at_ms.to_string(), now["created_ms"]);

    let later: std::collections::HashMap<String, String> =
        stored("later").query_async(&mut conn).await.unwrap();
    let created: u64 = later["created_ms"].parse().unwrap();
    let run_at: u64 = later["run_at_ms"].parse().unwrap();
    assert!(run_at.abs_diff(created + 60_000) < 1_000, "{later:?}");
    let read = store.task("later").await.unwrap().unwrap();
    assert_eq!((read.id.as_str(), read.run_at_ms), ("later", run_at));
    assert_eq!(store.task("missing").await.unwrap(), None);
}

#[tokio::test]
async fn claims_answer_for_every_kind_of_delivery() {
    let env = TestEnv::redis_only("claim");
    let store = env.store().await;
    let t = env.new_task(r#"{"id":"t","kind":"noop"}"#);
    store.accept(&[t]).await.unwrap();
    let lease = 3_000;
    assert_eq!(
        store.claim("w1", lease, &[("t", 2)]).await.unwrap(),
        [Claim::Future]
    );
    assert_eq!(
        store.claim("w1", lease, &[("nope", 1)]).await.unwrap(),
        [Claim::Unknown]
    );
    assert_eq!(
        store
            .claim_call("w1", lease, "c1", &[("t", 1), ("t", 1)], &[])
            .await
            .unwrap(),
        [Claim::Claimed, Claim::Owned],
        "a duplicate in the same call is that call's own"
    );
    assert_eq!(
        store.claim("w2", lease, &[("t", 1)]).await.unwrap(),
        [Claim::Busy],
        "another worker's attempt is busy"
    );
    // A retry of the call, as after a lost reply: the attempt is its own, unchanged.
    assert_eq!(
        store
            .claim_call("w1", lease, "c1", &[("t", 1)], &[])
            .await
            .unwrap(),
        [Claim::Owned]
    );
    // Another call under the same worker id (a worker restarted under it) does not own it.
    assert_eq!(
        store.claim("w1", lease, &[("t", 1)]).await.unwrap(),
        [Claim::Busy]
    );
    let t = store.task("t").await.unwrap().unwrap();
    assert_eq!(
        (t.state, t.attempt, t.worker.as_deref()),
        (State::Running, 1, Some("w1"))
    );

    // The lease deadline is Redis time + lease.
    let mut conn = env.redis_conn().await;
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let deadline: f64 = redis::cmd("ZSCORE")
        .arg(store.keys().leases())
        .arg("t")
        .query_async(&mut conn)
        .await
        .unwrap();
    let now = secs * 1000 + micros / 1000;
    assert!(
        (deadline as u64).abs_diff(now + lease) < 1_000,
        "deadline {deadline} vs now {now}"
    );

    let done = Outcome::Ok("null".into());
    assert_eq!(
        store.complete("w1", &[(("t", 1), &done)]).await.unwrap(),
        [Completion::Succeeded]
    );
    assert_eq!(
        store.claim("w1", lease, &[("t", 1)]).await.unwrap(),
        [Claim::Done]
    );
}

#[tokio::test]
async fn heartbeats_and_completions_of_stale_attempts_are_fenced() {
    let env = TestEnv::redis_only("fence");
    let store = env
        .store_with(&[r#"{"id":"t","kind":"noop","max_attempts":3}"#])
        .await;
    store.claim("w1", 3_000, &[("t", 1)]).await.unwrap();
    assert_eq!(
        store
            .extend("w1", 3_000, "{}", "", &[("t", 1, None)])
            .await
            .unwrap()
            .lost,
        Vec::<usize>::new()
    );
    assert_eq!(
        store
            .extend("w2", 3_000, "{}", "", &[("t", 1, None)])
            .await
            .unwrap()
            .lost,
        [0],
        "another worker's heartbeat"
    );
    assert_eq!(
        store
            .extend("w1", 3_000, "{}", "", &[("t", 2, None)])
            .await
            .unwrap()
            .lost,
        [0],
        "a wrong attempt"
    );

    // The lease expires and the task runs again as attempt 2 elsewhere.
    env.expire_lease(&store, "t").await;
    let requeued = store.requeue(&["t".to_string()]).await.unwrap();
    assert!(matches!(&requeued[0], Requeue::Requeued(d) if d.attempt == 2));
    assert_eq!(
        store.claim("w2", 3_000, &[("t", 1)]).await.unwrap(),
        [Claim::Stale]
    );
    assert_eq!(
        store.claim("w2", 3_000, &[("t", 2)]).await.unwrap(),
        [Claim::Claimed]
    );

    // The zombie (attempt 1) is fenced on every call, and changes nothing.
    let ok = Outcome::Ok("\"zombie\"".into());
    assert_eq!(
        store
            .extend("w1", 3_000, "{}", "", &[("t", 1, None)])
            .await
            .unwrap()
            .lost,
        [0]
    );
    assert_eq!(
        store.complete("w1", &[(("t", 1), &ok)]).await.unwrap(),
        [Completion::Fenced]
    );
    assert_eq!(state(&store, "t").await, "running");

    let real = Outcome::Ok("\"real\"".into());
    assert_eq!(
        store.complete("w2", &[(("t", 2), &real)]).await.unwrap(),
        [Completion::Succeeded]
    );
    assert_eq!(
        store.complete("w2", &[(("t", 2), &real)]).await.unwrap(),
        [Completion::Already],
        "a repeated report"
    );
    let late_fail = Outcome::Fail("late".into());
    assert_eq!(
        store
            .complete("w2", &[(("t", 2), &late_fail)])
            .await
            .unwrap(),
        [Completion::Already]
    );
    let t = store.task("t").await.unwrap().unwrap();
    assert_eq!(
        (t.state, t.result.as_deref()),
        (State::Succeeded, Some("\"real\"")),
        "terminal is final"
    );
    assert!(
        store.expired_leases(10).await.unwrap().is_empty(),
        "no lease left behind"
    );
}

#[tokio::test]
async fn retries_are_scheduled_until_attempts_run_out_then_the_task_fails_with_a_dead_letter() {
    let env = TestEnv::redis_only("retry");
    let store = env
        .store_with(&[r#"{"id":"t","kind":"fail","max_attempts":2}"#])
        .await;
    let retry = Outcome::Retry {
        error: "boom".into(),
        delay_ms: 0,
    };
    store.claim("w", 3_000, &[("t", 1)]).await.unwrap();
    assert_eq!(
        store.complete("w", &[(("t", 1), &retry)]).await.unwrap(),
        [Completion::Scheduled]
    );
    assert_eq!(state(&store, "t").await, "scheduled");
    let due = store.take_due(10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].id.as_str(), due[0].attempt), ("t", 2));
    assert!(
        store.take_due(10).await.unwrap().is_empty(),
        "a second relay does not take it too"
    );
    assert_eq!(state(&store, "t").await, "pending");
    store.claim("w", 3_000, &[("t", 2)]).await.unwrap();
    assert_eq!(
        store.complete("w", &[(("t", 2), &retry)]).await.unwrap(),
        [Completion::Failed]
    );
    let t = store.task("t").await.unwrap().unwrap();
    assert_eq!((t.state, t.error.as_deref()), (State::Failed, Some("boom")));
    assert_eq!(store.take_dead_letters(10).await.unwrap(), ["t"]);
    let mut conn = env.redis_conn().await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg(store.keys().task("t"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0, "terminal tasks expire after the retention period");
}

#[tokio::test]
async fn a_repeated_retry_report_is_already_recorded_and_a_lost_attempts_late_one_is_fenced() {
    let env = TestEnv::redis_only("retry-again");
    let store = env
        .store_with(&[
            r#"{"id":"later","kind":"fail","max_attempts":3}"#,
            r#"{"id":"now","kind":"fail","max_attempts":3}"#,
            r#"{"id":"lost","kind":"fail","max_attempts":3}"#,
        ])
        .await;
    let retry = |delay_ms| Outcome::Retry {
        error: "boom".into(),
        delay_ms,
    };
    let (in_a_minute, at_once) = (retry(60_000), retry(0));

    // Its retry scheduled, the same report again (a call retried after its reply was lost).
    store.claim("w", 3_000, &[("later", 1)]).await.unwrap();
    let report = [(("later", 1), &in_a_minute)];
    assert_eq!(
        store.complete("w", &report).await.unwrap(),
        [Completion::Scheduled]
    );
    assert_eq!(
        store.complete("w", &report).await.unwrap(),
        [Completion::Already],
        "the retry this report scheduled"
    );
    assert_eq!(
        store
            .complete("w2", &[(("later", 1), &in_a_minute)])
            .await
            .unwrap(),
        [Completion::Fenced],
        "another worker's report"
    );
    let t = store.task("later").await.unwrap().unwrap();
    assert_eq!(t.state, State::Scheduled);
    assert_eq!(t.history.len(), 1, "recorded once");

    // The same once its retry is due (pending, attempt 2 published), and fenced once attempt 2
    // is claimed.
    store.claim("w", 3_000, &[("now", 1)]).await.unwrap();
    let report = [(("now", 1), &at_once)];
    assert_eq!(
        store.complete("w", &report).await.unwrap(),
        [Completion::Scheduled]
    );
    let due = store.take_due(10).await.unwrap();
    assert_eq!((due[0].id.as_str(), due[0].attempt), ("now", 2));
    assert_eq!(state(&store, "now").await, "pending");
    assert_eq!(
        store.complete("w", &report).await.unwrap(),
        [Completion::Already]
    );
    store.claim("w", 3_000, &[("now", 2)]).await.unwrap();
    assert_eq!(
        store.complete("w", &report).await.unwrap(),
        [Completion::Fenced],
        "attempt 2 owns the task now"
    );
    assert_eq!(state(&store, "now").await, "running");

    // An attempt whose lease expired was requeued, not retried (the task is pending at the same
    // attempt number, as after a retry): its late report is fenced.
    store.claim("w", 3_000, &[("lost", 1)]).await.unwrap();
    env.expire_lease(&store, "lost").await;
    let requeued = store.requeue(&["lost".to_string()]).await.unwrap();
    assert!(matches!(&requeued[0], Requeue::Requeued(d) if d.attempt == 2));
    assert_eq!(
        store
            .complete("w", &[(("lost", 1), &at_once)])
            .await
            .unwrap(),
        [Completion::Fenced]
    );
    let t = store.task("lost").await.unwrap().unwrap();
    assert_eq!(t.state, State::Pending);
    assert_eq!(t.history.len(), 1, "only the expired lease");
}

#[tokio::test]
async fn concurrent_reapers_requeue_each_expired_lease_exactly_once() {
    let env = TestEnv::redis_only("reap");
    let store = env.store().await;
    let tasks: Vec<NewTask> = (0..200)
        .map(|i| env.new_task(&format!(r#"{{"id":"t{i}","kind":"noop"}}"#)))
        .collect();
    store.accept(&tasks).await.unwrap();
    let claims: Vec<(String, u32)> = (0..200).map(|i| (format!("t{i}"), 1)).collect();
    let refs: Vec<(&str, u32)> = claims.iter().map(|(id, a)| (id.as_str(), *a)).collect();
    store.claim("dead", 1, &refs).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;

    // Several reapers see the same expired leases and race to requeue them.
    let reapers = (0..4).map(|_| {
        let env_store = store.clone();
        async move {
            let ids = env_store.expired_leases(500).await.unwrap();
            env_store.requeue(&ids).await.unwrap()
        }
    });
    let results = futures::future::join_all(reapers).await;
    let requeued: Vec<String> = results
        .iter()
        .flatten()
        .filter_map(|r| match r {
            Requeue::Requeued(d) => Some(d.id.clone()),
            _ => None,
        })
        .collect();
    let mut unique = requeued.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        requeued.len(),
        200,
        "each expired lease requeued once, not more"
    );
    assert_eq!(unique.len(), 200);
    for (id, _) in &claims {
        let t = store.task(id).await.unwrap().unwrap();
        assert_eq!((t.state, t.attempt), (State::Pending, 1));
    }
}

#[tokio::test]
async fn released_tasks_do_not_use_up_attempts_and_expired_ones_do() {
    let env = TestEnv::redis_only("release");
    let store = env
        .store_with(&[r#"{"id":"t","kind":"noop","max_attempts":1}"#])
        .await;
    store.claim("w", 3_000, &[("t", 1)]).await.unwrap();
    assert_eq!(store.release("w", &[("t", 1)]).await.unwrap(), 1);
    assert_eq!(
        store.release("w", &[("t", 1)]).await.unwrap(),
        0,
        "only a running attempt is released"
    );
    let t = store.task("t").await.unwrap().unwrap();
    assert_eq!((t.state, t.released), (State::Pending, Some(1)));
    assert_eq!(
        store.take_due(10).await.unwrap()[0].attempt,
        2,
        "republished at once as attempt 2"
    );

    // Attempt 2 is its one real attempt: when its lease expires the task fails.
    store.claim("w2", 3_000, &[("t", 2)]).await.unwrap();
    env.expire_lease(&store, "t").await;
    assert_eq!(
        store.requeue(&["t".to_string()]).await.unwrap(),
        [Requeue::Failed("t".into())]
    );
    assert_eq!(state(&store, "t").await, "failed");
}

#[tokio::test]
async fn redrive_gives_failed_tasks_a_fresh_budget_and_leaves_others_alone() {
    let env = TestEnv::redis_only("redrive");
    let store = env.store().await;
    let tasks = [
        env.new_task(r#"{"id":"mail1","kind":"mail","max_attempts":1}"#),
        env.new_task(r#"{"id":"mail2","kind":"mail","max_attempts":1,"queue":"bulk"}"#),
        env.new_task(r#"{"id":"sms","kind":"sms","max_attempts":1}"#),
        env.new_task(r#"{"id":"fine","kind":"mail"}"#),
    ];
    store.accept(&tasks).await.unwrap();
    let all = [("mail1", 1), ("mail2", 1), ("sms", 1), ("fine", 1)];
    store.claim("w", 3_000, &all).await.unwrap();
    let fail = Outcome::Fail("smtp down".into());
    let ok = Outcome::Ok("null".into());
    let outcomes = [
        (all[0], &fail),
        (all[1], &fail),
        (all[2], &fail),
        (all[3], &ok),
    ];
    store.complete("w", &outcomes).await.unwrap();

    assert_eq!(
        store
            .redrive(&["fine".into(), "nope".into()])
            .await
            .unwrap(),
        0,
        "only failed tasks"
    );
    assert_eq!(
        store
            .redrive_failed(Some("mail"), Some("bulk"))
            .await
            .unwrap(),
        1
    );
    assert_eq!(state(&store, "mail2").await, "pending");
    assert_eq!(state(&store, "mail1").await, "failed");
    assert_eq!(store.redrive_failed(Some("mail"), None).await.unwrap(), 1);
    assert_eq!(
        state(&store, "sms").await,
        "failed",
        "another kind is left alone"
    );

    // The redriven task runs as attempt 2 with a fresh budget, and can succeed.
    let due = due_now(&store).await;
    assert!(
        due.contains(&("mail1".into(), 2)) && due.contains(&("mail2".into(), 2)),
        "{due:?}"
    );
    assert_eq!(
        store.claim("w", 3_000, &[("mail1", 1)]).await.unwrap(),
        [Claim::Stale],
        "the old attempt stays fenced"
    );
    assert_eq!(
        store.claim("w", 3_000, &[("mail1", 2)]).await.unwrap(),
        [Claim::Claimed]
    );
    assert_eq!(
        store.complete("w", &[(("mail1", 2), &ok)]).await.unwrap(),
        [Completion::Succeeded]
    );
    let t = store.task("mail1").await.unwrap().unwrap();
    assert_eq!((t.redriven, t.released), (Some(1), Some(1)));
    // The totals count tasks, not endings: mail1 failed, was redriven and succeeded, so it is
    // one success and no failure; sms is the one failure; mail2 is waiting again.
    let stats = store.stats().await.unwrap();
    let counted = |counts: Option<&std::collections::BTreeMap<String, u64>>, state: &str| {
        counts.and_then(|c| c.get(state)).copied().unwrap_or(0)
    };
    let normal = stats.by_priority.get("normal");
    assert_eq!(counted(normal, "failed"), 1, "{stats:?}");
    assert_eq!(counted(normal, "succeeded"), 2, "{stats:?}");
    let default = stats.by_queue.get("default");
    assert_eq!(counted(default, "failed"), 1, "{stats:?}");
    assert_eq!(
        counted(stats.by_queue.get("bulk"), "failed"),
        0,
        "{stats:?}"
    );
}

#[tokio::test]
async fn progress_is_stored_only_for_the_owner_of_the_current_attempt() {
    let env = TestEnv::redis_only("progress-store");
    let store = env.store_with(&[r#"{"id":"t","kind":"noop"}"#]).await;
    store.claim("w1", 3_000, &[("t", 1)]).await.unwrap();
    store
        .extend("w2", 3_000, "{}", "", &[("t", 1, Some((50, "not mine")))])
        .await
        .unwrap();
    assert!(
        store.task("t").await.unwrap().unwrap().progress.is_none(),
        "a stranger's progress is ignored"
    );
    store
        .extend(
            "w1",
            3_000,
            "{}",
            "",
            &[("t", 1, Some((40, "halfway-ish")))],
        )
        .await
        .unwrap();
    store
        .extend("w1", 3_000, "{}", "", &[("t", 1, None)])
        .await
        .unwrap();
    let t = store.task("t").await.unwrap().unwrap();
    assert_eq!(
        (t.progress, t.progress_message.as_deref()),
        (Some(40), Some("halfway-ish"))
    );
    // The next attempt starts without the last one's progress, and ends without it.
    assert_eq!(store.release("w1", &[("t", 1)]).await.unwrap(), 1);
    assert_eq!(
        store.claim("w1", 3_000, &[("t", 2)]).await.unwrap(),
        [Claim::Claimed]
    );
    let t = store.task("t").await.unwrap().unwrap();
    assert_eq!(
        (t.progress, &t.progress_message, t.progress_ms),
        (None, &None, None),
        "attempt 1's progress left: {t:?}"
    );
    store
        .complete("w1", &[(("t", 2), &Outcome::Ok("{}".into()))])
        .await
        .unwrap();
    let t = store.task("t").await.unwrap().unwrap();
    assert_eq!(t.state, State::Succeeded);
    assert_eq!(t.progress, None, "{t:?}");
}

#[tokio::test]
async fn attempt_history_is_valid_json_capped_at_the_newest_hundred_entries() {
    let env = TestEnv::redis_only("history");
    let store = env
        .store_with(&[r#"{"id":"h","kind":"noop","max_attempts":1}"#])
        .await;
    // A worker id that needs JSON escaping; released attempts do not use up the budget.
    let worker = "w\"\\é";
    for attempt in 1..=105 {
        assert_eq!(
            store.claim(worker, 3_000, &[("h", attempt)]).await.unwrap(),
            [Claim::Claimed]
        );
        assert_eq!(store.release(worker, &[("h", attempt)]).await.unwrap(), 1);
    }
    store.claim(worker, 3_000, &[("h", 106)]).await.unwrap();
    let done = store
        .complete(worker, &[(("h", 106), &Outcome::Ok("{}".into()))])
        .await
        .unwrap();
    assert_eq!(done, [Completion::Succeeded]);

    let history = store.task("h").await.unwrap().unwrap().history;
    assert_eq!(history.len(), 100, "the oldest entries are dropped");
    let attempts: Vec<u32> = history.iter().map(|e| e.attempt).collect();
    assert_eq!(attempts, (7..=106).collect::<Vec<u32>>());
    for entry in &history {
        assert_eq!(entry.worker, worker);
        assert!(entry.started_ms > 0, "{entry:?}");
        assert!(entry.ended_ms >= entry.started_ms, "{entry:?}");
    }
    let last = history.last().unwrap();
    assert_eq!(
        (&last.outcome, last.error.as_str()),
        (&AttemptOutcome::Succeeded, "")
    );
    assert_eq!(history[0].outcome, AttemptOutcome::Released);
}

#[tokio::test]
async fn a_first_attempt_success_stores_no_history_yet_reads_as_one_entry() {
    let env = TestEnv::redis_only("implied-history");
    let store = env
        .store_with(&[
            r#"{"id":"once","kind":"noop"}"#,
            r#"{"id":"twice","kind":"noop"}"#,
        ])
        .await;
    store
        .claim("w1", 3_000, &[("once", 1), ("twice", 1)])
        .await
        .unwrap();
    // "twice" is handed back once, so its success is its second attempt ending.
    assert_eq!(store.release("w1", &[("twice", 1)]).await.unwrap(), 1);
    store.claim("w2", 3_000, &[("twice", 2)]).await.unwrap();
    let ok = Outcome::Ok("7".into());
    store.complete("w1", &[(("once", 1), &ok)]).await.unwrap();
    store.complete("w2", &[(("twice", 2), &ok)]).await.unwrap();

    let mut conn = env.redis_conn().await;
    let stored: bool = redis::cmd("HEXISTS")
        .arg(store.keys().task("once"))
        .arg("history")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!stored, "no history is written for a first-attempt success");

    let once = store.task("once").await.unwrap().unwrap();
    assert_eq!(
        once.history,
        [AttemptEnding {
            attempt: 1,
            worker: "w1".into(),
            started_ms: once.started_ms.unwrap(),
            ended_ms: once.finished_ms.unwrap(),
            outcome: AttemptOutcome::Succeeded,
            error: String::new(),
        }]
    );

    let twice = store.task("twice").await.unwrap().unwrap();
    let outcomes: Vec<&AttemptOutcome> = twice.history.iter().map(|e| &e.outcome).collect();
    assert_eq!(
        outcomes,
        [&AttemptOutcome::Released, &AttemptOutcome::Succeeded],
        "a stored history is kept and appended to"
    );
}

/// `(id, attempt)` of what the relay would publish now.
async fn due_now(store: &Store) -> Vec<(String, u32)> {
    let mut due: Vec<(String, u32)> = store
        .take_due(100)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.id, d.attempt))
        .collect();
    due.sort();
    due
}

/// A store whose unacknowledged dispatches are due again at once, so `take_due` shows the
/// outbox.
async fn eager_store(env: &TestEnv) -> Store {
    let mut tasks = env.settings().tasks;
    tasks.redeliver_ms = 0;
    let store = env.store().await;
    Store::new(store.conn(), store.keys().clone(), &tasks)
}

fn pairs(list: &[(&str, u32)]) -> Vec<(String, u32)> {
    list.iter().map(|(id, a)| (id.to_string(), *a)).collect()
}

#[tokio::test]
async fn an_acknowledgement_removes_only_its_own_attempts_outbox_entry() {
    let env = TestEnv::redis_only("outbox");
    let store = eager_store(&env).await;
    store
        .accept(&[
            env.new_task(r#"{"id":"t","kind":"noop","max_attempts":5}"#),
            env.new_task(r#"{"id":"u","kind":"noop"}"#),
        ])
        .await
        .unwrap();
    store.dispatched(&[("t", 1)]).await.unwrap();
    assert_eq!(
        due_now(&store).await,
        pairs(&[("u", 1)]),
        "t was acknowledged"
    );
    assert_eq!(
        store.claim("w", 3_000, &[("u", 1)]).await.unwrap(),
        [Claim::Claimed]
    );
    assert_eq!(
        due_now(&store).await,
        [],
        "a claim removes its attempt's entry"
    );

    // Attempt 1 of t dies; the requeue's entry for attempt 2 outlives a late acknowledgement
    // of attempt 1 and goes with attempt 2's own.
    store.claim("w", 3_000, &[("t", 1)]).await.unwrap();
    env.expire_lease(&store, "t").await;
    store.requeue(&["t".to_string()]).await.unwrap();
    store.dispatched(&[("t", 1)]).await.unwrap();
    assert_eq!(due_now(&store).await, pairs(&[("t", 2)]));
    store.dispatched(&[("t", 2)]).await.unwrap();
    assert_eq!(due_now(&store).await, []);

    // A retry's timer outlives a late acknowledgement of the attempt that scheduled it; when it
    // fires it becomes attempt 3's outbox entry, kept until attempt 3 is acknowledged.
    store.claim("w", 3_000, &[("t", 2)]).await.unwrap();
    let retry = Outcome::Retry {
        error: "again".into(),
        delay_ms: 0,
    };
    store.complete("w", &[(("t", 2), &retry)]).await.unwrap();
    store.dispatched(&[("t", 2)]).await.unwrap();
    assert_eq!(due_now(&store).await, pairs(&[("t", 3)]));
    assert_eq!(state(&store, "t").await, "pending");
    assert_eq!(
        due_now(&store).await,
        pairs(&[("t", 3)]),
        "unacknowledged: published again"
    );
    store.dispatched(&[("t", 3)]).await.unwrap();
    assert_eq!(due_now(&store).await, []);
    let backlog = store.backlog().await.unwrap();
    assert_eq!((backlog.timers, backlog.outbox), (0, 0));
}

#[tokio::test]
async fn a_pending_tasks_timer_from_an_older_fleet_is_published_and_acknowledged() {
    // Before the outbox was keyed by attempt, an unacknowledged dispatch was the bare id in
    // `due`. Such an entry is published as the task's next attempt and then kept in the outbox.
    let env = TestEnv::redis_only("legacy-due");
    let store = env.store_with(&[r#"{"id":"old","kind":"noop"}"#]).await;
    let mut conn = env.redis_conn().await;
    let () = redis::pipe()
        .cmd("DEL")
        .arg(store.keys().outbox())
        .ignore()
        .cmd("ZADD")
        .arg(store.keys().due())
        .arg(0)
        .arg("old")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(due_now(&store).await, pairs(&[("old", 1)]));
    let outbox: Vec<String> = redis::cmd("ZRANGE")
        .arg(store.keys().outbox())
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(outbox, ["old#1"]);
    store.dispatched(&[("old", 1)]).await.unwrap();
    let backlog = store.backlog().await.unwrap();
    assert_eq!((backlog.timers, backlog.outbox), (0, 0));
}

#[tokio::test]
async fn running_tasks_are_indexed_by_their_leases_and_the_old_running_index_is_pruned() {
    // Schema 4: the lease set is the `running` index. A claim and a completion write no other,
    // and what version-3 services leave in the retired `{fleet}:state:running` is pruned by the
    // index trim once its tasks no longer run.
    let env = TestEnv::redis_only("running-index");
    let store = env.store().await;
    let tasks: Vec<NewTask> = ["a", "b", "c"]
        .iter()
        .map(|id| env.new_task(&format!(r#"{{"id":"{id}","kind":"noop"}}"#)))
        .collect();
    store.accept(&tasks).await.unwrap();
    assert_eq!(
        store
            .claim("w", 60_000, &[("a", 1), ("b", 1)])
            .await
            .unwrap(),
        [Claim::Claimed, Claim::Claimed]
    );
    let mut conn = env.redis_conn().await;
    let retired = store.keys().retired_running_index();
    let exists: bool = redis::cmd("EXISTS")
        .arg(&retired)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists, "a claim writes no running index besides the lease");
    let counts: std::collections::HashMap<State, u64> =
        store.counts().await.unwrap().into_iter().collect();
    assert_eq!((counts[&State::Running], counts[&State::Pending]), (2, 1));
    let filter = fleet_common::store::TaskFilter {
        state: Some(State::Running),
        ..Default::default()
    };
    let mut running: Vec<String> = store
        .list(&filter, None, 10)
        .await
        .unwrap()
        .tasks
        .into_iter()
        .map(|t| t.id)
        .collect();
    running.sort();
    assert_eq!(running, ["a", "b"]);

    // Left by version 3: `a` still running, `c` pending again (its worker died, a version-4
    // reaper requeued it), and a task whose hash has expired.
    let () = redis::cmd("ZADD")
        .arg(&retired)
        .arg(&[(1, "a"), (2, "c"), (3, "gone")])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(store.trim_terminal_indexes().await.unwrap(), 2);
    let left: Vec<String> = redis::cmd("ZRANGE")
        .arg(&retired)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, ["a"], "a task still running keeps its entry");
    let done = Outcome::Ok("null".into());
    assert_eq!(
        store.complete("w", &[(("a", 1), &done)]).await.unwrap(),
        [Completion::Succeeded]
    );
    assert_eq!(store.trim_terminal_indexes().await.unwrap(), 1);
    let exists: bool = redis::cmd("EXISTS")
        .arg(&retired)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists, "the retired index is gone with its last entry");
    let counts: std::collections::HashMap<State, u64> =
        store.counts().await.unwrap().into_iter().collect();
    assert_eq!((counts[&State::Running], counts[&State::Succeeded]), (1, 1));
    assert_eq!(store.trim_terminal_indexes().await.unwrap(), 0);
}

#[tokio::test]
async fn a_backlog_of_timers_does_not_starve_the_outbox() {
    let env = TestEnv::redis_only("due-fair");
    let store = eager_store(&env).await;
    let mut conn = env.redis_conn().await;
    for i in 0..3 {
        let pending = env.new_task(&format!(r#"{{"id":"p{i}","kind":"noop"}}"#));
        let later = env.new_task(&format!(
            r#"{{"id":"s{i}","kind":"noop","delay_ms":60000}}"#
        ));
        store.accept(&[pending, later]).await.unwrap();
        // The delay has passed.
        let () = redis::cmd("ZADD")
            .arg(store.keys().due())
            .arg(0)
            .arg(format!("s{i}"))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let taken: Vec<String> = store
        .take_due(2)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    let timers = taken.iter().filter(|id| id.starts_with('s')).count();
    let outbox = taken.iter().filter(|id| id.starts_with('p')).count();
    assert_eq!((timers, outbox), (2, 2), "{taken:?}");
}

/// With Redis at `maxmemory` (`noeviction`), a completion is refused as a whole: Redis refuses
/// a script's first write, and the batched writes queued before it (the lease's removal, the
/// totals) are not sent either. The task stays running under its lease, as it was, and the
/// same completion once memory is back counts once.
#[tokio::test]
async fn a_completion_refused_for_memory_changes_nothing_and_counts_once_later() {
    let env = TestEnv::redis_only("oom");
    let store = env.store_with(&[r#"{"id":"t","kind":"noop"}"#]).await;
    assert_eq!(
        store.claim("w1", 60_000, &[("t", 1)]).await.unwrap(),
        [Claim::Claimed]
    );
    let mut conn = env.redis_conn().await;
    let lease = || async {
        let mut conn = env.redis_conn().await;
        redis::cmd("ZSCORE")
            .arg(store.keys().leases())
            .arg("t")
            .query_async::<Option<f64>>(&mut conn)
            .await
            .unwrap()
    };
    let totals = || async {
        let mut conn = env.redis_conn().await;
        redis::cmd("HGETALL")
            .arg(store.keys().totals())
            .query_async::<std::collections::HashMap<String, u64>>(&mut conn)
            .await
            .unwrap()
    };
    let before = totals().await;
    let () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "1"][..])
        .query_async(&mut conn)
        .await
        .unwrap();
    let done = Outcome::Ok("null".into());
    let err = store
        .complete("w1", &[(("t", 1), &done)])
        .await
        .expect_err("refused for memory");
    assert!(err.to_string().contains("OOM"), "{err}");
    assert_eq!(state(&store, "t").await, "running");
    assert!(lease().await.is_some(), "the lease is kept");
    assert_eq!(totals().await, before, "nothing counted");

    let () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "0"][..])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        store.complete("w1", &[(("t", 1), &done)]).await.unwrap(),
        [Completion::Succeeded]
    );
    assert_eq!(state(&store, "t").await, "succeeded");
    assert!(lease().await.is_none());
    let after = totals().await;
    assert_eq!(after.get("succeeded:queue:default"), Some(&1), "{after:?}");
}
