//! Placement with the real binaries: tasks declare needs and label rules, workers capacity and
//! labels, two schedulers' dispatchers place at once. Every task is counted, and from each
//! attempt's start and end (Redis time, from its history) the test computes the peak sum of
//! every resource per worker: it never exceeds that worker's capacity.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use fleet_common::placement::{Amounts, SLOTS, labels_match};
use fleet_common::store::StoredTask;
use fleet_common::task::{State, TaskRecord};
use fleet_testkit::{ManagedProcess, TestEnv, eventually};
use serde_json::json;

/// A worker of the test fleet: its name, capacity (besides slots), labels and concurrency.
struct Shape {
    name: &'static str,
    capacity: &'static [(&'static str, &'static str)],
    labels: &'static [(&'static str, &'static str)],
    concurrency: usize,
}

const SMALL: Shape = Shape {
    name: "small",
    capacity: &[("CPU", "2"), ("MEMORY_MB", "1024")],
    labels: &[("ZONE", "eu-1")],
    concurrency: 8,
};
const LARGE: Shape = Shape {
    name: "large",
    capacity: &[("CPU", "4"), ("MEMORY_MB", "4096"), ("GPU", "1")],
    labels: &[("ZONE", "eu-2"), ("GPU_MODEL", "a100")],
    concurrency: 8,
};
const HUGE: Shape = Shape {
    name: "huge",
    capacity: &[("CPU", "8"), ("MEMORY_MB", "8192"), ("GPU", "2")],
    labels: &[("ZONE", "eu-2"), ("GPU_MODEL", "h100")],
    concurrency: 8,
};

fn spawn(env: &TestEnv, shape: &Shape) -> ManagedProcess {
    let mut vars: Vec<(String, String)> = vec![(
        "FLEET__WORKER__CONCURRENCY".into(),
        shape.concurrency.to_string(),
    )];
    for (name, amount) in shape.capacity {
        vars.push((
            format!("FLEET__WORKER__CAPACITY__{name}"),
            amount.to_string(),
        ));
    }
    for (name, value) in shape.labels {
        vars.push((format!("FLEET__WORKER__LABELS__{name}"), value.to_string()));
    }
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.spawn("fleet-worker", shape.name, &vars)
}

/// The capacity each worker reported, in thousandths.
async fn capacities(env: &TestEnv, names: &[&str]) -> HashMap<String, Amounts> {
    let store = env.store().await;
    let lease = env.settings().lease.lease_ms;
    let reported = || async {
        let workers = store.workers(lease).await.unwrap_or_default();
        workers
            .iter()
            .filter(|w| w.info.partitions.values().any(|p| !p.is_empty()))
            .map(|w| (w.id.clone(), Amounts::capacity(&w.info.capacity)))
            .collect::<HashMap<String, Amounts>>()
    };
    eventually(
        Duration::from_secs(60),
        "every worker reports its partitions",
        || async {
            let out = reported().await;
            names.iter().all(|n| out.contains_key(*n))
        },
    )
    .await;
    reported().await
}

fn record(task: &StoredTask) -> TaskRecord {
    serde_json::from_str(task.record.as_deref().expect("record")).expect("record parses")
}

/// Every attempt's `(worker, start, end)`, from the task's history.
fn attempts(task: &StoredTask) -> Vec<(String, u64, u64)> {
    task.history
        .iter()
        .map(|h| (h.worker.clone(), h.started_ms, h.ended_ms))
        .collect()
}

/// The peak sum of each resource over the attempts that ran on each worker at once: ends
/// before starts at the same millisecond (an ending releases its room in the script before the
/// next claim takes it). Returns, per worker and resource, the peak in thousandths.
fn peaks(tasks: &[StoredTask]) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut events: BTreeMap<String, Vec<(u64, bool, Amounts)>> = BTreeMap::new();
    for task in tasks {
        let needs = Amounts::needs(&record(task).resources);
        for (worker, start, end) in attempts(task) {
            let list = events.entry(worker).or_default();
            list.push((start, true, needs.clone()));
            list.push((end, false, needs.clone()));
        }
    }
    let mut out = BTreeMap::new();
    for (worker, mut list) in events {
        list.sort_by_key(|(at, starts, _)| (*at, *starts));
        let mut now: BTreeMap<String, i64> = BTreeMap::new();
        let mut peak: BTreeMap<String, u64> = BTreeMap::new();
        for (_, starts, needs) in list {
            for (name, milli) in needs.0 {
                let v = now.entry(name.clone()).or_default();
                *v += if starts {
                    milli as i64
                } else {
                    -(milli as i64)
                };
                let p = peak.entry(name).or_default();
                *p = (*p).max((*v).max(0) as u64);
            }
        }
        out.insert(worker, peak);
    }
    out
}

/// Guarantee 2: no worker ever held more than its capacity of any resource.
fn assert_within_capacity(tasks: &[StoredTask], capacity: &HashMap<String, Amounts>) {
    for (worker, peak) in peaks(tasks) {
        let cap = &capacity[&worker];
        for (name, milli) in &peak {
            assert!(
                *milli <= cap.get(name),
                "worker {worker} ran {milli} thousandths of {name} at once, capacity {}",
                cap.get(name)
            );
        }
        println!("peak use on {worker}: {peak:?} (capacity {:?})", cap.0);
    }
}

/// A few hundred tasks with assorted needs and label rules: `(id, json)`.
fn assorted(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let id = format!("placed-{i}");
            let cpu = [0.5, 1.0, 1.5, 2.0][i % 4];
            let memory = [128, 256, 512][i % 3];
            let mut task = json!({
                "id": id, "kind": "sleep", "payload": {"ms": 40 + (i % 5) * 30},
                "resources": {"cpu": cpu, "memory_mb": memory},
            });
            match i % 6 {
                0 => task["resources"]["gpu"] = json!(1),
                1 => task["require"] = json!({"zone": "eu-1"}),
                2 => task["require"] = json!({"zone": ["eu-2", "eu-3"]}),
                3 => task["prefer"] = json!({"zone": "eu-2"}),
                _ => {}
            }
            (id, task.to_string())
        })
        .collect()
}

/// Guarantee 1: each attempt ran on a worker whose labels satisfy the task's `require`.
fn assert_labels_respected(tasks: &[StoredTask], shapes: &[&Shape]) {
    let labels: HashMap<&str, BTreeMap<String, String>> = shapes
        .iter()
        .map(|s| {
            let labels = s
                .labels
                .iter()
                .map(|(k, v)| (k.to_lowercase(), v.to_string()))
                .collect();
            (s.name, labels)
        })
        .collect();
    for task in tasks {
        let record = record(task);
        for (worker, _, _) in attempts(task) {
            assert!(
                labels_match(&record.require, &labels[worker.as_str()]),
                "{} ran on {worker}, whose labels do not satisfy {:?}",
                task.id,
                record.require
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn placed_tasks_run_only_where_they_fit_and_an_unplaceable_one_starts_when_a_worker_fits() {
    let env = TestEnv::start("placement-mixed");
    env.create_topics().await;
    let _schedulers = [
        env.spawn("fleet-scheduler", "scheduler-1", &[]),
        env.spawn("fleet-scheduler", "scheduler-2", &[]),
    ];
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let _workers = [spawn(&env, &SMALL), spawn(&env, &LARGE)];
    let mut capacity = capacities(&env, &["small", "large"]).await;
    assert_eq!(capacity["large"].get("gpu"), 1000);
    assert_eq!(capacity["small"].get(SLOTS), 8000);

    // One task no live worker can hold, and one that only a zone nobody has would take.
    let unplaceable = json!({"id": "needs-two-gpus", "kind": "sleep", "payload": {"ms": 10},
        "resources": {"gpu": 2}})
    .to_string();
    let assorted = assorted(300);
    let mut bodies: Vec<String> = assorted.iter().map(|(_, b)| b.clone()).collect();
    bodies.push(unplaceable);
    env.submit(&bodies).await;
    let ids: Vec<String> = assorted.iter().map(|(id, _)| id.clone()).collect();
    let done = env.wait_terminal(&ids, Duration::from_secs(120)).await;
    let tasks: Vec<StoredTask> = done.into_values().collect();
    let succeeded = tasks.iter().filter(|t| t.state == State::Succeeded).count();
    assert_eq!(succeeded, ids.len(), "every placed task ran and succeeded");
    assert_labels_respected(&tasks, &[&SMALL, &LARGE]);
    assert_within_capacity(&tasks, &capacity);
    for task in &tasks {
        let record = record(task);
        if record.resources.contains_key("gpu") {
            assert!(
                attempts(task).iter().all(|(w, _, _)| w == "large"),
                "{} needs the GPU",
                task.id
            );
        }
        assert_eq!(task.attempt, 1, "{}: placement costs no attempts", task.id);
    }

    // Guarantee 3: the task that fits nowhere waits, and says why.
    let store = env.store().await;
    let waiting = "needs-two-gpus".to_string();
    eventually(
        Duration::from_secs(10),
        "the unplaceable task shows why it waits",
        || async {
            store.task(&waiting).await.ok().flatten().is_some_and(|t| {
                t.state == State::Pending
                    && t.wait_reason.as_deref() == Some("no live worker has gpu ≥ 2")
            })
        },
    )
    .await;
    let (code, out, _) = env.fleetctl(&["status", "needs-two-gpus"]);
    assert_eq!(code, 0);
    assert!(out.contains("no live worker has gpu ≥ 2"), "{out}");
    let (code, out, _) = env.fleetctl(&["stats"]);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("placing") && l.contains("(parked)") && l.contains(" 1 ")),
        "{out}"
    );
    // Nothing is reserved once everything ended but the waiting task.
    eventually(
        Duration::from_secs(10),
        "no reservation is left",
        || async { store.placement_use().await.is_ok_and(|u| u.is_empty()) },
    )
    .await;

    // A worker that fits joins: the task starts without a resubmission.
    let _huge = spawn(&env, &HUGE);
    capacity.extend(capacities(&env, &["huge"]).await);
    let done = env
        .wait_terminal(std::slice::from_ref(&waiting), Duration::from_secs(60))
        .await;
    let task = &done[&waiting];
    assert_eq!(task.state, State::Succeeded);
    assert_eq!(task.worker.as_deref(), Some("huge"));
    assert_eq!(task.wait_reason, None, "the reason goes once it is placed");
    let (code, out, _) = env.fleetctl(&["workers"]);
    assert_eq!(code, 0);
    assert!(out.contains("gpu 0/2"), "{out}");
    assert!(out.contains("zone=eu-2"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_frees_hundreds_of_reservations_and_its_tasks_finish_elsewhere() {
    let env = TestEnv::start("placement-kill");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    // Room for 400 tasks of 0.01 CPU on each worker.
    let cpu = [("FLEET__WORKER__CAPACITY__CPU", "4")];
    let small = slots_worker(&env, "small", "500", &cpu);
    let _large = slots_worker(&env, "large", "500", &cpu);
    let capacity = capacities(&env, &["small", "large"]).await;
    // A thousand, long enough to be running when the kill comes.
    let tasks: Vec<(String, String)> = (0..1000)
        .map(|i| {
            let id = format!("long-{i}");
            let body = json!({"id": id, "kind": "sleep", "payload": {"ms": 3000},
                "resources": {"cpu": 0.01, "memory_mb": 1}});
            (id, body.to_string())
        })
        .collect();
    env.submit(&tasks.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>())
        .await;
    let ids: Vec<String> = tasks.iter().map(|(id, _)| id.clone()).collect();
    let store = env.store().await;
    eventually(
        Duration::from_secs(30),
        "the small worker runs placed tasks",
        || async {
            let lease = env.settings().lease.lease_ms;
            let workers = store.workers(lease).await.unwrap_or_default();
            workers.iter().any(|w| w.id == "small" && w.running >= 300)
        },
    )
    .await;
    small.signal("KILL");
    let done = env.wait_terminal(&ids, Duration::from_secs(120)).await;
    let tasks: Vec<StoredTask> = done.into_values().collect();
    assert!(
        tasks.iter().all(|t| t.state == State::Succeeded),
        "every task finished"
    );
    let moved = tasks
        .iter()
        .filter(|t| attempts(t).iter().any(|(w, _, _)| w == "small"))
        .count();
    println!("{moved} tasks had started on the killed worker");
    assert!(moved >= 300, "the killed worker held hundreds: {moved}");
    for task in &tasks {
        assert_eq!(
            task.worker.as_deref(),
            Some("large"),
            "{} finished elsewhere",
            task.id
        );
    }
    assert_within_capacity(&tasks, &capacity);
    eventually(
        Duration::from_secs(15),
        "nothing stays reserved",
        || async { store.placement_use().await.is_ok_and(|u| u.is_empty()) },
    )
    .await;
}

/// Heartbeats `worker` with `capacity` (placement text), so it is live and offers it.
async fn beat(store: &fleet_common::store::Store, worker: &str, capacity: &str) {
    store
        .extend(worker, 60_000, "{}", capacity, &[])
        .await
        .expect("heartbeat");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_scripts_never_promise_a_worker_more_than_it_has_and_move_reservations_with_the_task() {
    use fleet_common::placement::Strategy;
    use fleet_common::store::{Accepted, Claim, Decision, Fit, Outcome, Placed};
    let env = TestEnv::redis_only("placement-scripts");
    let cpu = |id: &str| json!({"id": id, "kind": "sleep", "resources": {"cpu": 1}}).to_string();
    let store = env.store().await;
    let new: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|id| env.new_task(&cpu(id)))
        .collect();
    let accepted = store.accept(&new).await.unwrap();
    assert!(
        accepted.iter().all(|a| matches!(a, Accepted::Placing(_))),
        "{accepted:?}"
    );
    beat(&store, "w", "cpu=2000;slots=8000").await;
    beat(&store, "big", "cpu=4000;slots=8000").await;
    assert_eq!(store.sort_in(10, |_| 1000, |_| 1).await.unwrap(), 4);
    let waiting = store
        .waiting_in("default", Strategy::Fifo, 10)
        .await
        .unwrap();
    assert_eq!(waiting.len(), 4);
    let now = store.redis_time_ms().await.unwrap();
    let live_since = now - 10_000;
    let place = |id: &str, worker: &str| {
        let decision = Decision::Place {
            id: id.into(),
            worker: worker.into(),
        };
        (decision, String::new(), String::new(), String::new())
    };

    // Two dispatchers with the same view each put two tasks on `w`, which has room for two:
    // the script takes the first two and refuses the rest.
    let first = store
        .place("default", &[place("a", "w"), place("b", "w")], live_since)
        .await
        .unwrap();
    assert!(
        first
            .iter()
            .all(|p| matches!(p, Placed::Placed(d) if d.attempt == 1)),
        "{first:?}"
    );
    let second = store
        .place("default", &[place("c", "w"), place("a", "big")], live_since)
        .await
        .unwrap();
    assert_eq!(
        second,
        vec![Placed::Full, Placed::Gone],
        "no over-commit, no double placement"
    );
    let used = store.placement_use().await.unwrap();
    assert_eq!(used["w"].encode(), "cpu=2000;slots=2000");
    // A worker not heard from since `live_since` takes nothing.
    let stale = store
        .place("default", &[place("c", "big")], now + 60_000)
        .await
        .unwrap();
    assert_eq!(stale, vec![Placed::Full]);

    // `a` starts where it was placed; `b`'s message reaches `big` (its partition moved): the
    // reservation moves with it.
    let claim = |worker: &'static str, id: &'static str, fit: Fit| {
        let store = store.clone();
        async move {
            store
                .claim_call(worker, 60_000, "call", &[(id, 1)], &[fit])
                .await
                .unwrap()[0]
        }
    };
    assert_eq!(claim("w", "a", Fit::Placed).await, Claim::Claimed);
    assert_eq!(claim("big", "b", Fit::Placed).await, Claim::Claimed);
    let used = store.placement_use().await.unwrap();
    assert_eq!(used["w"].encode(), "cpu=1000;slots=1000");
    assert_eq!(used["big"].encode(), "cpu=1000;slots=1000");
    let b = store.task("b").await.unwrap().unwrap();
    assert_eq!(b.reserved_on.as_deref(), Some("big"));

    // `c` (still waiting) delivered to a worker without room or with other labels: back to
    // wait, no attempt used, the reason shown.
    beat(&store, "tiny", "cpu=500;slots=8000").await;
    assert_eq!(claim("tiny", "c", Fit::Placed).await, Claim::Unfit);
    assert_eq!(claim("big", "c", Fit::LabelsDiffer).await, Claim::Unfit);
    let c = store.task("c").await.unwrap().unwrap();
    assert_eq!(
        (c.state, c.attempt, c.reserved_on.clone()),
        (State::Pending, 0, None)
    );
    assert!(
        c.wait_reason
            .as_deref()
            .unwrap()
            .contains("labels of worker big"),
        "{c:?}"
    );
    // `c` went back to the inbox while still in its queue: sorted in again, it keeps its place.
    assert_eq!(store.sort_in(10, |_| 1000, |_| 1).await.unwrap(), 1);
    let waiting = store
        .waiting_in("default", Strategy::Fifo, 10)
        .await
        .unwrap();
    let ids: Vec<&str> = waiting.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, ["c", "d"]);

    // Endings release: a completion of a placed task, and a cancel of a waiting one.
    let ok = Outcome::Ok("{}".into());
    store
        .complete_placed("w", &[(("a", 1), &ok)], &[true])
        .await
        .unwrap();
    store.cancel(&["d".to_string()]).await.unwrap();
    let used = store.placement_use().await.unwrap();
    assert!(!used.contains_key("w"), "{used:?}");
    // The cancelled task is dropped from its queue when the dispatcher next meets it.
    let waiting = store
        .waiting_in("default", Strategy::Fifo, 10)
        .await
        .unwrap();
    let decisions: Vec<_> = waiting.iter().map(|w| place(&w.id, "big")).collect();
    let outcomes = store
        .place("default", &decisions, live_since)
        .await
        .unwrap();
    assert_eq!(
        outcomes[waiting.iter().position(|w| w.id == "d").unwrap()],
        Placed::Gone
    );
    assert_eq!(store.waiting_count("default").await.unwrap(), 0);

    // A gone worker: `c`, placed on it and not started, waits again; `b` runs there and keeps
    // its room until its lease expires (the reaper's requeue releases it).
    let c = store.task("c").await.unwrap().unwrap();
    assert_eq!(
        c.reserved_on.as_deref(),
        Some("big"),
        "placed on big just above"
    );
    assert_eq!(store.revoke_gone(now + 3_600_000).await.unwrap(), 1);
    let c = store.task("c").await.unwrap().unwrap();
    assert_eq!(c.reserved_on, None);
    assert!(
        c.wait_reason.as_deref().unwrap().contains("which is gone"),
        "{c:?}"
    );
    let used = store.placement_use().await.unwrap();
    assert_eq!(
        used["big"].encode(),
        "cpu=1000;slots=1000",
        "b still runs there"
    );
}

/// The start of each task's (only) attempt, in start order: `(id, started_ms)`.
fn start_order(tasks: &HashMap<String, StoredTask>) -> Vec<(String, u64)> {
    let mut starts: Vec<(String, u64)> = tasks
        .values()
        .map(|t| (t.id.clone(), t.first_started_ms.expect("started")))
        .collect();
    starts.sort_by_key(|(id, at)| (*at, id.clone()));
    starts
}

/// A worker `name` with `concurrency` slots and no other capacity to speak of.
fn slots_worker(
    env: &TestEnv,
    name: &str,
    concurrency: &str,
    extra: &[(&str, &str)],
) -> ManagedProcess {
    let mut vars = vec![("FLEET__WORKER__CONCURRENCY", concurrency)];
    vars.extend_from_slice(extra);
    env.spawn("fleet-worker", name, &vars)
}

#[tokio::test(flavor = "multi_thread")]
async fn sjf_starts_the_shortest_first_and_fair_lets_a_second_key_through_a_backlog() {
    let env = TestEnv::start("placement-order");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _worker = slots_worker(&env, "one", "1", &[]);
    capacities(&env, &["one"]).await;
    // Set at run time, as an operator would.
    let (code, out, err) = env.fleetctl(&["queue", "set", "reports", "--strategy", "sjf"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = env.fleetctl(&["queue", "show", "reports"]);
    assert_eq!(code, 0);
    assert!(out.contains("sjf"), "{out}");
    tokio::time::sleep(Duration::from_millis(1500)).await; // applied within about a second

    // One slot, held by a blocker while twenty tasks with shuffled estimates arrive.
    let blocker = json!({"id": "blocker", "kind": "sleep", "queue": "reports",
        "payload": {"ms": 2000}})
    .to_string();
    env.submit(&[blocker]).await;
    let store = env.store().await;
    eventually(Duration::from_secs(30), "the blocker runs", || async {
        store
            .task("blocker")
            .await
            .ok()
            .flatten()
            .is_some_and(|t| t.state == State::Running)
    })
    .await;
    let estimates: Vec<u64> = (0..20u64).map(|i| (i * 7919) % 20 * 100 + 100).collect();
    let bodies: Vec<String> = estimates
        .iter()
        .map(|ms| {
            json!({"id": format!("est-{ms}"), "kind": "sleep", "queue": "reports",
                "payload": {"ms": 5}, "estimated_ms": ms})
            .to_string()
        })
        .collect();
    env.submit(&bodies).await;
    let ids: Vec<String> = estimates.iter().map(|ms| format!("est-{ms}")).collect();
    let done = env.wait_terminal(&ids, Duration::from_secs(60)).await;
    let order: Vec<u64> = start_order(&done)
        .iter()
        .map(|(id, _)| id["est-".len()..].parse().unwrap())
        .collect();
    println!("sjf start order (estimated ms): {order:?}");
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(order, sorted, "shortest estimate first");

    // Without an estimate, a task counts its kind's median run time, learned from the placed
    // tasks that succeeded (here a few ms); a kind never seen counts 60 s.
    let learned = store.run_times().await.unwrap();
    assert!(
        learned.get("sleep").is_some_and(|t| t.len() >= 20),
        "{learned:?}"
    );
    let blocker = json!({"id": "blocker-2", "kind": "sleep", "queue": "reports",
        "payload": {"ms": 1500}})
    .to_string();
    env.submit(&[blocker]).await;
    eventually(
        Duration::from_secs(30),
        "the second blocker runs",
        || async {
            store
                .task("blocker-2")
                .await
                .ok()
                .flatten()
                .is_some_and(|t| t.state == State::Running)
        },
    )
    .await;
    let bodies = [
        json!({"id": "unseen-kind", "kind": "echo", "queue": "reports"}),
        json!({"id": "explicit-1000", "kind": "sleep", "queue": "reports",
            "payload": {"ms": 5}, "estimated_ms": 1000}),
        json!({"id": "median-of-kind", "kind": "sleep", "queue": "reports", "payload": {"ms": 5}}),
    ]
    .map(|b| b.to_string());
    env.submit(&bodies).await;
    let ids = ["unseen-kind", "explicit-1000", "median-of-kind"].map(String::from);
    let done = env.wait_terminal(&ids, Duration::from_secs(60)).await;
    let order: Vec<String> = start_order(&done).into_iter().map(|(id, _)| id).collect();
    println!("sjf start order without estimates: {order:?}");
    assert_eq!(order, ["median-of-kind", "explicit-1000", "unseen-kind"]);

    // Fair: key A's backlog of 1,000, then key B submits 10.
    let (code, _, _) = env.fleetctl(&["queue", "set", "mail", "--strategy", "fair"]);
    assert_eq!(code, 0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let task = |id: String, key: &str| {
        json!({"id": id, "kind": "sleep", "queue": "mail", "key": key, "payload": {"ms": 1}})
            .to_string()
    };
    let a_ids: Vec<String> = (0..1000).map(|i| format!("a-{i}")).collect();
    env.submit(
        &a_ids
            .iter()
            .map(|id| task(id.clone(), "A"))
            .collect::<Vec<_>>(),
    )
    .await;
    eventually(
        Duration::from_secs(60),
        "A's backlog is running",
        || async {
            env.tasks(&a_ids[..20])
                .await
                .values()
                .filter(|t| t.state == State::Succeeded)
                .count()
                >= 10
        },
    )
    .await;
    let b_ids: Vec<String> = (0..10).map(|i| format!("b-{i}")).collect();
    env.submit(
        &b_ids
            .iter()
            .map(|id| task(id.clone(), "B"))
            .collect::<Vec<_>>(),
    )
    .await;
    let b_done = env.wait_terminal(&b_ids, Duration::from_secs(60)).await;
    let b_first = b_done
        .values()
        .map(|t| t.first_started_ms.unwrap())
        .min()
        .unwrap();
    let b_last = b_done
        .values()
        .map(|t| t.first_started_ms.unwrap())
        .max()
        .unwrap();
    let a_between = env
        .tasks(&a_ids)
        .await
        .values()
        .filter(|t| {
            t.first_started_ms
                .is_some_and(|at| at >= b_first && at <= b_last)
        })
        .count();
    println!("fair: B's 10 tasks started while {a_between} of A's backlog did");
    assert!(
        a_between <= 12,
        "B's ten start within about twenty starts, not behind A's backlog"
    );
    let (cancelled, _) = (store.cancel(&a_ids).await.unwrap(), ());
    assert_eq!(cancelled.len(), 1000);
}

#[tokio::test(flavor = "multi_thread")]
async fn pack_fills_one_worker_spread_balances_and_weighted_follows_the_weights() {
    let env = TestEnv::start("placement-policies");
    env.create_topics().await;
    // From the settings file's section (here its variables), not at run time.
    let _scheduler = env.spawn(
        "fleet-scheduler",
        "scheduler",
        &[
            ("FLEET__SCHEDULER__QUEUES__PACKED__PLACEMENT", "pack"),
            ("FLEET__SCHEDULER__QUEUES__SPREAD__PLACEMENT", "spread"),
            ("FLEET__SCHEDULER__QUEUES__WEIGHTED__PLACEMENT", "weighted"),
        ],
    );
    let _light = slots_worker(
        &env,
        "light",
        "1000",
        &[("FLEET__WORKER__CAPACITY__CPU", "4")],
    );
    let _heavy = slots_worker(
        &env,
        "heavy",
        "1000",
        &[
            ("FLEET__WORKER__CAPACITY__CPU", "4"),
            ("FLEET__WORKER__WEIGHT", "3"),
        ],
    );
    capacities(&env, &["light", "heavy"]).await;
    let run = |queue: &'static str, n: usize, ms: u64, resources: serde_json::Value| {
        let env = &env;
        async move {
            let ids: Vec<String> = (0..n).map(|i| format!("{queue}-{i}")).collect();
            let bodies: Vec<String> = ids
                .iter()
                .map(|id| {
                    json!({"id": id, "kind": "sleep", "queue": queue, "payload": {"ms": ms},
                        "resources": resources})
                    .to_string()
                })
                .collect();
            env.submit(&bodies).await;
            let done = env.wait_terminal(&ids, Duration::from_secs(60)).await;
            let mut by_worker: BTreeMap<String, usize> = BTreeMap::new();
            for t in done.values() {
                assert_eq!(t.state, State::Succeeded);
                *by_worker.entry(t.worker.clone().unwrap()).or_default() += 1;
            }
            println!("{queue}: {by_worker:?}");
            by_worker
        }
    };
    // Four one-CPU tasks submitted together, each running long enough to overlap.
    let packed = run("packed", 4, 1500, json!({"cpu": 1})).await;
    assert_eq!(
        packed.len(),
        1,
        "pack puts all four on one worker: {packed:?}"
    );
    let spread = run("spread", 4, 1500, json!({"cpu": 1})).await;
    assert_eq!(
        spread.values().copied().collect::<Vec<_>>(),
        [2, 2],
        "{spread:?}"
    );
    // Tasks with no needs but a slot (placed because of their queue's policy), and room for
    // all of them on either worker: the split follows the weights 1:3.
    let weighted = run("weighted", 400, 1, json!({})).await;
    let heavy = weighted.get("heavy").copied().unwrap_or(0);
    assert!(
        (240..=360).contains(&heavy),
        "weight 3 of 4 → about 300 of 400: {weighted:?}"
    );

    // 600 tasks no worker could ever take, ahead of 20 that fit, in one queue: the 600 are
    // parked out of the way (more than a round reads), and the 20 run.
    let blocked: Vec<String> = (0..600)
        .map(|i| {
            json!({"id": format!("nowhere-{i}"), "kind": "sleep", "queue": "mixed",
                "payload": {"ms": 1}, "require": {"zone": "nowhere"}})
            .to_string()
        })
        .collect();
    env.submit(&blocked).await;
    let store = env.store().await;
    eventually(Duration::from_secs(30), "the 600 are parked", || async {
        store.parked_count().await.is_ok_and(|n| n == 600)
    })
    .await;
    let fitting = run("mixed", 20, 1, json!({"cpu": 1})).await;
    assert_eq!(fitting.values().sum::<usize>(), 20);
    let nowhere: Vec<String> = (0..600).map(|i| format!("nowhere-{i}")).collect();
    let one = store.task(&nowhere[0]).await.unwrap().unwrap();
    assert_eq!(
        one.wait_reason.as_deref(),
        Some("no live worker has labels zone=nowhere")
    );
    store.cancel(&nowhere).await.unwrap();
    assert_eq!(
        store.parked_count().await.unwrap(),
        0,
        "cancelled tasks leave the parked set"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_changes_queue_settings_at_run_time_and_refuses_bad_ones_and_shows_placement() {
    use fleet_testkit::http::request;
    const TOKEN: &str = "test-token-0123456789";
    let env = TestEnv::start("placement-api");
    env.create_topics().await;
    let (_scheduler, addr) = env
        .spawn_api("scheduler", &[("FLEET__HTTP__TOKENS", TOKEN)])
        .await;
    let call = |method: &'static str, path: String, body: Option<String>| async move {
        request(
            addr,
            method,
            &path,
            Some(TOKEN),
            body.as_deref().map(str::as_bytes),
        )
        .await
    };
    let put = call(
        "PUT",
        "/v1/queues/gpu-jobs".into(),
        Some(
            json!({"strategy": "sjf", "placement": "pack", "placement_timeout_ms": 60000})
                .to_string(),
        ),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.json()["settings"]["strategy"], "sjf");
    assert_eq!(put.json()["places_all"], true);
    let listed = call("GET", "/v1/queues".into(), None).await.json();
    assert!(
        listed["queues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["queue"] == "gpu-jobs"),
        "{listed}"
    );
    // Bad input: a clear 400 naming the problem, and nothing changed.
    for (path, body, says) in [
        (
            "/v1/queues/gpu-jobs",
            json!({"strategy": "lifo"}).to_string(),
            "strategy",
        ),
        (
            "/v1/queues/gpu-jobs",
            json!({"placement": 7}).to_string(),
            "placement",
        ),
        (
            "/v1/queues/gpu-jobs",
            json!({"colour": "red"}).to_string(),
            "colour",
        ),
        (
            "/v1/queues/gpu-jobs",
            json!({"placement_timeout_ms": 0}).to_string(),
            "placement_timeout_ms",
        ),
        ("/v1/queues/gpu-jobs", "{".to_string(), "body"),
        ("/v1/queues/bad%20name", json!({}).to_string(), "queue"),
    ] {
        let answer = call("PUT", path.into(), Some(body.clone())).await;
        assert_eq!(answer.status, 400, "{path} {body}: {}", answer.body);
        assert!(answer.body.contains(says), "{path} {body}: {}", answer.body);
    }
    let now = call("GET", "/v1/queues/gpu-jobs".into(), None).await.json();
    assert_eq!(now["settings"]["placement"], "pack", "unchanged: {now}");

    // A placed task over HTTP: accepted as placing; with no worker, its status says why.
    let submitted = call(
        "POST",
        "/v1/tasks".into(),
        Some(
            json!({"id": "needs-gpu", "kind": "sleep", "payload": {"ms": 1},
            "resources": {"gpu": 1}})
            .to_string(),
        ),
    )
    .await;
    assert_eq!(submitted.status, 201, "{}", submitted.body);
    assert_eq!(submitted.json()["tasks"][0]["placing"], true);
    eventually(
        Duration::from_secs(10),
        "its status says why it waits",
        || async {
            let task = call("GET", "/v1/tasks/needs-gpu".into(), None).await.json();
            task["wait_reason"] == "no live worker"
        },
    )
    .await;
    // Counted in the stats and the dispatcher's gauge.
    // No live worker could take it: parked, out of its queue, until the workers change.
    let stats = call("GET", "/v1/stats".into(), None).await.json();
    assert_eq!(stats["placing_parked"], 1, "{stats}");
    eventually(Duration::from_secs(10), "the gauge counts it", || async {
        request(addr, "GET", "/metrics", None, None)
            .await
            .body
            .lines()
            .any(|l| l == "fleet_placement_waiting 1")
    })
    .await;
    let refused = call(
        "POST",
        "/v1/tasks".into(),
        Some(json!({"kind": "sleep", "resources": {"gpu": -1}}).to_string()),
    )
    .await;
    assert_eq!(refused.status, 400);
    assert!(refused.body.contains("resources"), "{}", refused.body);

    // Placement timeouts, the task's own and its queue's: it fails with the reason.
    let put = call(
        "PUT",
        "/v1/queues/impatient".into(),
        Some(json!({"placement_timeout_ms": 1000}).to_string()),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let timed = json!([
        {"id": "own-timeout", "kind": "sleep", "resources": {"gpu": 1}, "placement_timeout_ms": 1000},
        {"id": "queue-timeout", "kind": "sleep", "queue": "impatient", "resources": {"gpu": 1}},
    ])
    .to_string();
    assert_eq!(
        call("POST", "/v1/tasks".into(), Some(timed)).await.status,
        201
    );
    let ids = ["own-timeout".to_string(), "queue-timeout".to_string()];
    let ended = env.wait_terminal(&ids, Duration::from_secs(30)).await;
    for id in &ids {
        let task = &ended[id];
        assert_eq!(task.state, fleet_common::task::State::Failed, "{id}");
        assert_eq!(task.attempt, 0, "{id}: it never ran");
        assert_eq!(
            task.error.as_deref(),
            Some("placement timeout: no live worker"),
            "{id}"
        );
    }

    // Cancelled while it waits: it leaves its queue, and the counts.
    let cancelled = call("POST", "/v1/tasks/needs-gpu/cancel".into(), None).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    eventually(
        Duration::from_secs(10),
        "the cancelled task no longer counts",
        || async {
            let stats = call("GET", "/v1/stats".into(), None).await.json();
            stats["placing_parked"] == 0 && stats["placing"].get("default").is_none()
        },
    )
    .await;

    let deleted = call("DELETE", "/v1/queues/gpu-jobs".into(), None).await;
    assert_eq!(deleted.status, 200);
    assert_eq!(deleted.json()["settings"]["strategy"], "fifo");
}
