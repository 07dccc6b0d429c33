//! Every service serves Prometheus metrics, and every metric the Grafana dashboard in
//! `deploy/grafana/` queries is one a service really exports.

use fleet_common::task::State;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use fleet_testkit::fleet::log_events;
use fleet_testkit::http::request;
use fleet_testkit::{TestEnv, eventually, free_ports, workspace_root};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// Metric names (without `_bucket`/`_sum`/`_count`) in a Prometheus text page.
fn names(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| {
            n.trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count")
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_exports_the_metrics_the_grafana_dashboard_uses() {
    let env = TestEnv::start("metrics");
    env.create_topics().await;
    let ports = free_ports::<3>();
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
        .collect();
    let listen: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let _scheduler = env.spawn(
        "fleet-scheduler",
        "scheduler",
        &[("FLEET__HTTP__LISTEN", &listen[0])],
    );
    let _reaper = env.spawn(
        "fleet-reaper",
        "reaper",
        &[("FLEET__HTTP__LISTEN", &listen[1])],
    );
    let _worker = env.spawn(
        "fleet-worker",
        "w1",
        &[
            ("FLEET__HTTP__LISTEN", &listen[2]),
            ("FLEET__WORKER__CANCEL_GRACE_MS", "500"),
        ],
    );
    for addr in &addrs {
        eventually(WAIT, "every service ready", || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
                && request(*addr, "GET", "/readyz", None, None).await.status == 200
        })
        .await;
        assert_eq!(
            request(*addr, "GET", "/healthz", None, None).await.status,
            200
        );
    }

    // Work that moves every counter: success, retry, failure, cancel, a rejected submission.
    env.submit(&[
        json!({"id": "ok", "kind": "noop"}).to_string(),
        json!({"id": "flaky", "kind": "flaky", "payload": {"failures": 1}}).to_string(),
        json!({"id": "bad", "kind": "fail"}).to_string(),
        json!({"id": "nap", "kind": "sleep", "payload": {"ms": 60000}}).to_string(),
        "not json".to_string(),
    ])
    .await;
    eventually(WAIT, "nap runs", || async {
        env.tasks(&["nap".into()])
            .await
            .get("nap")
            .is_some_and(|t| t.state == State::Running)
    })
    .await;
    env.store().await.cancel(&["nap".into()]).await.unwrap();
    env.wait_terminal(
        &["ok".into(), "flaky".into(), "bad".into(), "nap".into()],
        WAIT,
    )
    .await;

    let dashboard =
        std::fs::read_to_string(workspace_root().join("deploy/grafana/fleet-dashboard.json"))
            .expect("the Grafana dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("fleet_") {
                    used.insert(word.trim_end_matches("_bucket").to_string());
                }
            }
        }
    }
    assert!(used.len() >= 10, "{used:?}");
    // Consumer lag comes from librdkafka statistics every 5 s; wait for every name.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut exported = BTreeSet::new();
        for addr in &addrs {
            let page = request(*addr, "GET", "/metrics", None, None).await;
            assert_eq!(page.status, 200);
            exported.extend(names(&page.body));
        }
        let missing: Vec<&String> = used.difference(&exported).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dashboard queries metrics no service exports: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Every metric a service exports says what it counts (`# HELP`, from the one catalogue).
    for addr in &addrs {
        let page = request(*addr, "GET", "/metrics", None, None).await.body;
        let typed: Vec<&str> = page
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
            .filter(|name| name.starts_with("fleet_"))
            .collect();
        assert!(!typed.is_empty(), "{addr}: no fleet_ metric typed");
        for name in typed {
            assert!(
                page.lines()
                    .any(|l| l.starts_with(&format!("# HELP {name} ")) && l.len() > name.len() + 12),
                "{addr}: {name} has no help text"
            );
        }
    }

    // The worker's per-task series carry the task's kind and priority, one count per attempt
    // (counted just after the outcome is in Redis, so they may trail it briefly).
    let expected = [
        r#"fleet_tasks_started_total{kind="noop",priority="normal"} 1"#,
        r#"fleet_tasks_started_total{kind="flaky",priority="normal"} 2"#,
        r#"fleet_tasks_succeeded_total{kind="noop",priority="normal"} 1"#,
        r#"fleet_tasks_retried_total{kind="flaky",priority="normal"} 1"#,
        r#"fleet_tasks_failed_total{kind="fail",priority="normal"} 1"#,
        r#"fleet_tasks_cancelled_total{kind="sleep",priority="normal"} 1"#,
        r#"fleet_handler_duration_seconds_count{kind="noop"} 1"#,
    ];
    eventually(WAIT, "the worker's series by kind and priority", || async {
        let page = request(addrs[2], "GET", "/metrics", None, None).await.body;
        expected
            .iter()
            .all(|series| page.lines().any(|line| line == *series))
    })
    .await;
}

/// The value of the series `series` (name and labels, as printed) in a Prometheus text page.
fn value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_handler_that_outlives_its_abort_is_counted_once() {
    let env = TestEnv::start("abort-count");
    env.create_topics().await;
    let [port] = free_ports::<1>();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _worker = env.spawn(
        "fleet-worker",
        "w1",
        &[
            ("FLEET__HTTP__LISTEN", &addr.to_string()),
            ("FLEET__WORKER__CANCEL_GRACE_MS", "300"),
        ],
    );
    // `block` never yields: the abort after the grace period cannot stop it, so it ends by
    // itself 4 s after it started and reports its own outcome.
    env.submit(&[json!({"id": "hog", "kind": "block", "payload": {"ms": 4000}}).to_string()])
        .await;
    let hog = ["hog".to_string()];
    eventually(WAIT, "hog runs", || async {
        env.tasks(&hog)
            .await
            .get("hog")
            .is_some_and(|t| t.state == State::Running)
    })
    .await;
    env.store().await.cancel(&hog).await.unwrap();
    let ended = env.wait_terminal(&hog, WAIT).await;
    assert_eq!(ended["hog"].state, State::Cancelled);

    // Its one end is counted once, with the handler's whole run as its duration.
    let page = || async { request(addr, "GET", "/metrics", None, None).await.body };
    eventually(WAIT, "the hog's handler time counted", || async {
        value(
            &page().await,
            r#"fleet_handler_duration_seconds_sum{kind="block"}"#,
        )
        .is_some_and(|s| s >= 2.5)
    })
    .await;
    let aborted = log_events(&env, &["w1"]).iter().any(|e| {
        e["message"] == "Cancelled handler did not stop within the grace period; aborted."
            && e["task_id"] == "hog"
    });
    assert!(aborted, "the abort came while the handler still ran");
    let page = page().await;
    let series = |name: &str| {
        value(
            &page,
            &format!(r#"{name}{{kind="block",priority="normal"}}"#),
        )
    };
    assert_eq!(series("fleet_tasks_cancelled_total"), Some(1.0));
    assert_eq!(series("fleet_completions_fenced_total"), None, "{page}");
    assert_eq!(
        value(
            &page,
            r#"fleet_handler_duration_seconds_count{kind="block"}"#
        ),
        Some(1.0)
    );
}
