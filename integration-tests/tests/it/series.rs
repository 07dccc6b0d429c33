//! The dashboard's rolling time series on the real stack (`GET /v1/series`): every start is
//! counted once in its slot, rates and gauges follow the work, the keys stay bounded and
//! expire, and bad queries get a JSON 400.

use std::net::SocketAddr;
use std::time::Duration;

use fleet_common::store::series::{KEEP_MS, SLOT_MS};
use fleet_testkit::http::{Response, request};
use fleet_testkit::{TestEnv, eventually};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "series-token-0123456789";

async fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, Some(TOKEN), None).await
}

async fn submit(addr: SocketAddr, tasks: Vec<Value>) {
    let body = Value::Array(tasks).to_string();
    let answer = request(
        addr,
        "POST",
        "/v1/tasks",
        Some(TOKEN),
        Some(body.as_bytes()),
    )
    .await;
    assert_eq!(answer.status, 201, "{}", answer.body);
}

/// The points of series `of` over the last 10 minutes.
async fn points(addr: SocketAddr, of: &str) -> Vec<Value> {
    let answer = get(addr, &format!("/v1/series?of={of}&minutes=10")).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["of"], of);
    assert_eq!(body["slot_ms"], SLOT_MS);
    let points = body["points"].as_array().cloned().unwrap();
    assert_eq!(points.len() as u64, 10 * 60_000 / SLOT_MS);
    points
}

fn sum(points: &[Value], field: &str) -> u64 {
    points.iter().map(|p| p[field].as_u64().unwrap_or(0)).sum()
}

fn any_above(points: &[Value], field: &str, floor: f64) -> bool {
    points
        .iter()
        .any(|p| p[field].as_f64().is_some_and(|v| v > floor))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_series_counts_every_start_once_and_follows_the_work() {
    let env = TestEnv::start("series");
    env.create_topics().await;
    let (_scheduler, addr) = env
        .spawn_api("scheduler", &[("FLEET__HTTP__TOKENS", TOKEN)])
        .await;
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let _worker = env.spawn("fleet-worker", "w1", &[]);

    // Before any task: a sample shows nothing waiting or running.
    eventually(WAIT, "a first sample", || async {
        points(addr, "all")
            .await
            .iter()
            .any(|p| p["pending"] == json!(0) && p["running"] == json!(0))
    })
    .await;

    // Two waves in two slots, so that a rate has two samples to come from: 150 quick tasks
    // of `emails` at high priority, 3 that fail, and 4 long ones of `reports` that keep running.
    let wave = |from: usize| -> Vec<Value> {
        (from..from + 75)
            .map(|i| json!({"id": format!("mail-{i}"), "kind": "noop", "queue": "emails", "priority": "high"}))
            .collect()
    };
    submit(addr, wave(0)).await;
    let mut second = wave(75);
    second.extend(
        (0..3).map(|i| json!({"id": format!("bad-{i}"), "kind": "fail", "max_attempts": 1})),
    );
    second.extend((0..4).map(|i| {
        json!({"id": format!("report-{i}"), "kind": "sleep", "queue": "reports", "payload": {"ms": 120_000}})
    }));
    // The next slot: its sample then sees the first wave's successes as a rise of the totals.
    let slot = SLOT_MS;
    tokio::time::sleep(Duration::from_millis(slot)).await;
    submit(addr, second).await;
    let ids: Vec<String> = (0..150)
        .map(|i| format!("mail-{i}"))
        .chain((0..3).map(|i| format!("bad-{i}")))
        .collect();
    env.wait_terminal(&ids, WAIT).await;

    // Every start of the emails queue counted exactly once (each ran one attempt), in both
    // the queue's series and its priority's; waits are those of a quiet stack.
    eventually(WAIT, "150 starts of emails, with their waits", || async {
        let emails = points(addr, "queue:emails").await;
        let high = points(addr, "priority:high").await;
        sum(&emails, "started") == 150 && sum(&high, "started") == 150
    })
    .await;
    let emails = points(addr, "queue:emails").await;
    for point in emails.iter().filter(|p| p["started"].as_u64() > Some(0)) {
        let (p50, p99) = (point["wait_p50_ms"].as_f64(), point["wait_p99_ms"].as_f64());
        assert!(
            p50.is_some_and(|v| (0.0..30_000.0).contains(&v)) && p99 >= p50,
            "{point}"
        );
    }
    assert!(
        points(addr, "queue:reports")
            .await
            .iter()
            .all(|p| p["succeeded_per_s"].as_f64().is_none_or(|v| v == 0.0))
    );

    // Rates and gauges: successes and failures per second rise, and the four long tasks show
    // as running in their queue's series.
    eventually(
        WAIT,
        "succeeded and failed rates, and 4 running reports",
        || async {
            let all = points(addr, "all").await;
            let reports = points(addr, "queue:reports").await;
            any_above(&all, "succeeded_per_s", 0.0)
                && any_above(&all, "failed_per_s", 0.0)
                && reports
                    .iter()
                    .rev()
                    .find(|p| !p["running"].is_null())
                    .map(|p| &p["running"])
                    == Some(&json!(4))
        },
    )
    .await;
    // The rates, each times the time since the sample before, add up to exactly the tasks that
    // succeeded and failed (the first sample came before any task).
    eventually(
        WAIT,
        "rates that add up to 150 successes and 3 failures",
        || async {
            let mut previous: Option<u64> = None;
            let (mut succeeded, mut failed) = (0.0, 0.0);
            for point in points(addr, "all").await {
                let Some(at) = point["sampled_ms"].as_u64() else {
                    continue;
                };
                if let Some(before) = previous {
                    let seconds = (at - before) as f64 / 1000.0;
                    succeeded += point["succeeded_per_s"].as_f64().unwrap() * seconds;
                    failed += point["failed_per_s"].as_f64().unwrap() * seconds;
                }
                previous = Some(at);
            }
            assert!(
                succeeded < 150.01 && failed < 3.01,
                "{succeeded} and {failed}: too many"
            );
            (succeeded - 150.0).abs() < 0.01 && (failed - 3.0).abs() < 0.01
        },
    )
    .await;
    let body = get(addr, "/v1/series").await.json();
    let available: Vec<&str> = body["available"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for name in [
        "all",
        "priority:high",
        "queue:emails",
        "queue:reports",
        "queue:default",
    ] {
        assert!(
            available.contains(&name),
            "{name} missing from {available:?}"
        );
    }
    assert_eq!(
        body["points"].as_array().unwrap().len() as u64,
        KEEP_MS / SLOT_MS
    );

    // Bounded: one key per slot, each expiring within the hour and two slots.
    let store = env.store().await;
    let pattern = format!("{}*", store.keys().series(0).trim_end_matches('0'));
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut store.conn())
        .await
        .unwrap();
    assert!((2..=30).contains(&keys.len()), "{keys:?}");
    for key in &keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut store.conn())
            .await
            .unwrap();
        assert!(
            ttl > 0 && ttl as u64 <= KEEP_MS + 2 * SLOT_MS,
            "{key}: {ttl}"
        );
    }

    // Bad queries: a JSON 400 naming the problem.
    let long = "x".repeat(10_000);
    for (query, code) in [
        ("of=kind:noop", "bad_series"),
        ("of=queue:a%20b", "bad_series"),
        ("of=priority:urgent", "bad_series"),
        (&*format!("of=queue:{long}"), "bad_series"),
        ("minutes=0", "bad_query"),
        ("minutes=61", "bad_query"),
        ("minutes=-1", "bad_query"),
        ("minutes=ten", "bad_query"),
        ("window=5", "bad_query"),
    ] {
        let answer = get(addr, &format!("/v1/series?{query}")).await;
        assert_eq!(
            (answer.status, answer.error_code()),
            (400, code.to_string()),
            "{}: {}",
            &query[..query.len().min(40)],
            answer.body
        );
        assert!(answer.body.len() < 1_000, "the error echoes at most a clip");
    }
    let anonymous = request(addr, "GET", "/v1/series", None, None).await;
    assert_eq!(anonymous.status, 401);
}
