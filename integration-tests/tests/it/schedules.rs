//! Schedules with the real binaries: a per-second schedule fired by three schedulers, one
//! killed -9 and restarted and one paused (SIGSTOP) across fire times, creates exactly one
//! task per occurrence with no gap; each misfire policy after an outage of every scheduler;
//! the API and `fleetctl` surface, with malformed input refused.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_common::store::Store;
use fleet_testkit::fleet::log_events;
use fleet_testkit::http::request;
use fleet_testkit::{TestEnv, eventually};
use serde_json::json;

const TOKEN: &str = "test-token-0123456789";

/// The occurrence times (ms) of schedule `name`'s tasks in queue `queue`, sorted.
async fn fired(env: &TestEnv, store: &Store, queue: &str, name: &str) -> Vec<u64> {
    let mut conn = env.redis_conn().await;
    let ids: Vec<String> = redis::cmd("ZRANGE")
        .arg(store.keys().queue_index(queue))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut times: Vec<u64> = ids
        .iter()
        .filter_map(|id| id.strip_prefix(&format!("{name}:")))
        .filter_map(|t| t.parse().ok())
        .collect();
    times.sort_unstable();
    times
}

fn fleetctl_ok(env: &TestEnv, args: &[&str]) -> String {
    let (code, out, err) = env.fleetctl(args);
    assert_eq!(code, 0, "fleetctl {args:?}: {out}{err}");
    out
}

/// Occurrences one second apart, none missing.
fn assert_every_second(times: &[u64]) {
    for pair in times.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            1000,
            "a gap or an extra occurrence: {times:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_schedulers_one_killed_one_paused_fire_each_second_once() {
    let env = TestEnv::start("sched-ha");
    env.create_topics().await;
    let store = env.store().await;
    let mut s1 = env.spawn("fleet-scheduler", "s1", &[]);
    let s2 = env.spawn("fleet-scheduler", "s2", &[]);
    let _s3 = env.spawn("fleet-scheduler", "s3", &[]);
    fleetctl_ok(
        &env,
        &[
            "schedule",
            "add",
            "tick",
            "--cron",
            "* * * * * *",
            "--task",
            r#"{"kind":"noop","queue":"ticks"}"#,
        ],
    );
    eventually(Duration::from_secs(30), "the schedule fires", || async {
        fired(&env, &store, "ticks", "tick").await.len() >= 3
    })
    .await;
    // Across fire times: s1 killed -9 (restarted 3 s later), s2 paused for 4 s.
    s1.signal("KILL");
    s2.signal("STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    s1 = env.spawn("fleet-scheduler", "s1-again", &[]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    s2.signal("CONT");
    tokio::time::sleep(Duration::from_secs(4)).await;
    fleetctl_ok(&env, &["schedule", "delete", "tick"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let times = fired(&env, &store, "ticks", "tick").await;
    println!("{} occurrences fired", times.len());
    assert!(times.len() >= 10, "{times:?}");
    assert_every_second(&times);
    // Each occurrence was created by one scheduler: the others' tries were duplicates.
    let mut created: BTreeMap<String, usize> = BTreeMap::new();
    for event in log_events(&env, &["s1", "s2", "s3", "s1-again"]) {
        if event.get("message").and_then(|m| m.as_str()) == Some("Schedule fired.") {
            *created
                .entry(event["task_id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert_eq!(created.len(), times.len(), "{created:?}");
    assert!(created.values().all(|&n| n == 1), "{created:?}");
    drop(s1);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_misfire_policy_after_an_outage_and_the_api_and_cli() {
    let env = TestEnv::start("sched-misfire");
    env.create_topics().await;
    let store = env.store().await;
    // No scheduler runs: three schedules miss their occurrences for 5 s.
    for (name, policy) in [
        ("m-skip", "skip"),
        ("m-once", "run_once"),
        ("m-catch", "catch_up"),
    ] {
        fleetctl_ok(
            &env,
            &[
                "schedule",
                "add",
                name,
                "--cron",
                "* * * * * *",
                "--task",
                r#"{"kind":"noop","queue":"misfire"}"#,
                "--misfire",
                policy,
                "--catch-up-max",
                "3",
                "--misfire-grace-ms",
                "1000",
            ],
        );
    }
    let added = store.redis_time_ms().await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_scheduler, addr) = env
        .spawn_api("scheduler", &[("FLEET__HTTP__TOKENS", TOKEN)])
        .await;
    eventually(Duration::from_secs(20), "every schedule fired", || async {
        for name in ["m-skip", "m-once", "m-catch"] {
            if fired(&env, &store, "misfire", name).await.len() < 4 {
                return false;
            }
        }
        true
    })
    .await;
    for name in ["m-skip", "m-once", "m-catch"] {
        fleetctl_ok(&env, &["schedule", "pause", name]);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let skip = fired(&env, &store, "misfire", "m-skip").await;
    let once = fired(&env, &store, "misfire", "m-once").await;
    let catch = fired(&env, &store, "misfire", "m-catch").await;
    for times in [&skip, &once, &catch] {
        assert_every_second(times);
    }
    // The first round handled all three at the same moment: skip starts at the first
    // occurrence within the grace, run_once one missed occurrence earlier, catch_up three.
    // The outage's occurrences (from the first second after `added`) were missed.
    assert!(
        skip[0] > added + 3000,
        "skip fired the outage's occurrences: {skip:?} (added {added})"
    );
    assert_eq!(
        skip[0] - once[0],
        1000,
        "run_once fires the latest missed one: {once:?} {skip:?}"
    );
    assert_eq!(
        skip[0] - catch[0],
        3000,
        "catch_up fires the latest 3: {catch:?} {skip:?}"
    );
    assert!(
        catch[0] > added + 1000,
        "more than 3 were missed, and only 3 fired: {catch:?}"
    );

    // Paused: nothing fires; show says so; resume goes on from now, without making up.
    let before = fired(&env, &store, "misfire", "m-skip").await.len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(fired(&env, &store, "misfire", "m-skip").await.len(), before);
    let out = fleetctl_ok(&env, &["schedule", "show", "m-skip"]);
    assert!(out.contains("(paused)"), "{out}");
    fleetctl_ok(&env, &["schedule", "resume", "m-skip"]);
    eventually(Duration::from_secs(10), "it fires again", || async {
        fired(&env, &store, "misfire", "m-skip").await.len() > before
    })
    .await;
    fleetctl_ok(&env, &["schedule", "delete", "m-skip"]);
    let after = fired(&env, &store, "misfire", "m-skip").await;
    assert!(
        after[before] - after[before - 1] > 2000,
        "resume made up nothing: {after:?}"
    );

    // The API: create with a time zone, see the next occurrences in it, run now, delete.
    let nightly = json!({"cron": "0 2 * * *", "tz": "Europe/Berlin", "task": {"kind": "noop", "queue": "nightly"}});
    let r = request(
        addr,
        "PUT",
        "/v1/schedules/nightly",
        Some(TOKEN),
        Some(nightly.to_string().as_bytes()),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let next = r.json()["next"].as_array().unwrap().clone();
    assert_eq!(next.len(), 5);
    for n in &next {
        let at = n["at"].as_str().unwrap();
        assert!(at.contains("T02:00:00+0"), "02:00 Berlin time: {at}");
    }
    let r = request(addr, "POST", "/v1/schedules/nightly/run", Some(TOKEN), None).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("nightly:run-"));
    eventually(Duration::from_secs(10), "run-now made its task", || async {
        store.task(&id).await.unwrap().is_some()
    })
    .await;
    let out = fleetctl_ok(&env, &["schedule", "run-now", "nightly"]);
    let cli_id = out.trim().to_string();
    assert!(cli_id.starts_with("nightly:run-"), "{out}");
    eventually(
        Duration::from_secs(20),
        "fleetctl's run-now made its task",
        || async { store.task(&cli_id).await.unwrap().is_some() },
    )
    .await;
    let r = request(addr, "GET", "/v1/schedules", Some(TOKEN), None).await;
    let names: Vec<&str> = r.json()["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string().leak() as &str)
        .collect();
    assert!(
        names.contains(&"nightly") && names.contains(&"m-once"),
        "{names:?}"
    );
    let out = fleetctl_ok(&env, &["schedule", "list"]);
    assert!(
        out.contains("nightly  0 2 * * * (Europe/Berlin)  next 20"),
        "{out}"
    );
    let r = request(addr, "DELETE", "/v1/schedules/nightly", Some(TOKEN), None).await;
    assert_eq!(r.status, 200);
    let r = request(addr, "GET", "/v1/schedules/nightly", Some(TOKEN), None).await;
    assert_eq!(r.status, 404);

    // An interval with jitter: a task a second, each due up to 3 s after its occurrence.
    fleetctl_ok(
        &env,
        &[
            "schedule",
            "add",
            "jit",
            "--every-ms",
            "1000",
            "--jitter-ms",
            "3000",
            "--task",
            r#"{"kind":"noop","queue":"jitter"}"#,
        ],
    );
    eventually(
        Duration::from_secs(20),
        "the interval fired 4 times",
        || async { fired(&env, &store, "jitter", "jit").await.len() >= 4 },
    )
    .await;
    fleetctl_ok(&env, &["schedule", "delete", "jit"]);
    let times = fired(&env, &store, "jitter", "jit").await;
    assert_every_second(&times);
    let mut delays = Vec::new();
    for at in &times {
        let task = store.task(&format!("jit:{at}")).await.unwrap().unwrap();
        delays.push(task.run_at_ms.saturating_sub(task.created_ms));
    }
    assert!(delays.iter().all(|&d| d <= 3000), "{delays:?}");
    assert!(delays.iter().any(|&d| d > 0), "jittered: {delays:?}");

    // Malformed cron expressions, time zones and tasks are refused with the reason.
    for (body, says) in [
        (
            json!({"cron": "61 * * * *", "task": {"kind": "k"}}),
            "`cron`",
        ),
        (
            json!({"cron": "0 2 * * *", "tz": "Europe/Atlantis", "task": {"kind": "k"}}),
            "IANA",
        ),
        (
            json!({"cron": "0 0 31 2 *", "task": {"kind": "k"}}),
            "never fires",
        ),
        (json!({"every_ms": 5, "task": {"kind": "k"}}), "every_ms"),
        (
            json!({"cron": "* * * * *", "task": {"kind": "k", "id": "fixed"}}),
            "may not set `id`",
        ),
        (json!({"cron": "* * * * *"}), "task"),
    ] {
        let r = request(
            addr,
            "PUT",
            "/v1/schedules/bad",
            Some(TOKEN),
            Some(body.to_string().as_bytes()),
        )
        .await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.error_code(), "bad_schedule");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains(says),
            "{}",
            r.body
        );
    }
    let r = request(addr, "PUT", "/v1/schedules/a:b", Some(TOKEN), Some(b"{}")).await;
    assert_eq!(r.status, 400);
    for (args, says) in [
        (
            &[
                "schedule",
                "add",
                "x",
                "--cron",
                "not a cron",
                "--task",
                r#"{"kind":"k"}"#,
            ][..],
            "`cron`",
        ),
        (
            &[
                "schedule",
                "add",
                "x",
                "--cron",
                "* * * * *",
                "--tz",
                "Nowhere/Land",
                "--task",
                r#"{"kind":"k"}"#,
            ][..],
            "IANA",
        ),
        (
            &["schedule", "add", "x", "--cron", "* * * * *", "--task", "{"][..],
            "not JSON",
        ),
        (
            &[
                "schedule",
                "add",
                "x",
                "--cron",
                "* * * * *",
                "--task",
                r#"{"kind":"k"}"#,
                "--misfire",
                "later",
            ][..],
            "skip, run_once or catch_up",
        ),
        (&["schedule", "show", "nobody"][..], "no schedule"),
    ] {
        let (code, out, err) = env.fleetctl(args);
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert!(store.schedule("x").await.unwrap().is_none());
}
