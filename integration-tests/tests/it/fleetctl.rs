//! `fleetctl` as an operator uses it against the real stack: submit from a file, watch, list
//! with paging, cancel, pause and resume, set-priority, redrive, stats and workers; exit codes
//! scripts can rely on.

use std::collections::BTreeSet;
use std::time::Duration;

use fleet_common::task::State;
use fleet_testkit::{TestEnv, eventually};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

fn ok(env: &TestEnv, args: &[&str]) -> String {
    let (code, out, err) = env.fleetctl(args);
    assert_eq!(code, 0, "fleetctl {args:?}: {out}{err}");
    out
}

fn json_of(env: &TestEnv, args: &[&str]) -> Value {
    serde_json::from_str(&ok(env, args)).unwrap_or_else(|e| panic!("fleetctl {args:?}: {e}"))
}

async fn state(env: &TestEnv, id: &str) -> Option<State> {
    env.tasks(&[id.to_string()]).await.get(id).map(|t| t.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleetctl_submits_follows_lists_and_steers_tasks() {
    let env = TestEnv::start("fleetctl-ops");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let _w1 = env.spawn(
        "fleet-worker",
        "w1",
        &[("FLEET__WORKER__CANCEL_GRACE_MS", "1000")],
    );

    let file = env.dir.join("tasks.jsonl");
    let mut lines: Vec<String> = (0..30)
        .map(|i| json!({"id": format!("n{i}"), "kind": "noop", "queue": "q1"}).to_string())
        .collect();
    lines.push(json!({"id": "nap", "kind": "sleep", "payload": {"ms": 60000}}).to_string());
    lines.push(json!({"id": "bad", "kind": "fail", "payload": {"message": "boom"}}).to_string());
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = ok(&env, &["submit", "--file", file.to_str().unwrap()]);
    assert_eq!(out.lines().count(), 32, "one id per task: {out}");
    // A pretty-printed task, and a JSON array of tasks.
    let one = env.dir.join("one.json");
    std::fs::write(&one, "{\n  \"id\": \"pretty\",\n  \"kind\": \"noop\"\n}\n").unwrap();
    assert_eq!(
        ok(&env, &["submit", "--file", one.to_str().unwrap()]).trim(),
        "pretty"
    );
    let many = env.dir.join("many.json");
    std::fs::write(
        &many,
        r#"[{"id":"arr-1","kind":"noop"}, {"id":"arr-2","kind":"noop"}]"#,
    )
    .unwrap();
    assert_eq!(
        ok(&env, &["submit", "--file", many.to_str().unwrap()]).trim(),
        "arr-1\narr-2"
    );
    let bad = env.dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"[{"kind":"noop"}, {"kind":"noop","max_attempts":0}]"#,
    )
    .unwrap();
    let (code, _, err) = env.fleetctl(&["submit", "--file", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("task 1") && err.contains("max_attempts"),
        "{err}"
    );
    ok(&env, &["watch", "arr-2", "--interval-ms", "100"]);
    let (code, out, err) = env.fleetctl_with_stdin(
        &["submit", "--file", "-"],
        "{\"id\":\"piped-1\",\"kind\":\"noop\"}\n{\"id\":\"piped-2\",\"kind\":\"noop\"}\n",
    );
    assert_eq!((code, out.trim()), (0, "piped-1\npiped-2"), "{err}");
    for empty in ["", "\n  \n"] {
        let (code, out, err) = env.fleetctl_with_stdin(&["submit", "--file", "-"], empty);
        assert_eq!(
            (code, out.as_str()),
            (2, ""),
            "empty input is an error: {err}"
        );
        assert!(err.contains("no task to submit"), "{err}");
    }

    // watch: 0 when it succeeds, 4 when it fails (with the error).
    let watched = ok(&env, &["watch", "n0", "--interval-ms", "100"]);
    assert!(
        watched.trim_end().ends_with("succeeded attempt 1 w1"),
        "{watched}"
    );
    let (code, out, _) = env.fleetctl(&["watch", "bad", "--interval-ms", "100"]);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("error: boom"), "{out}");

    // list pages through a queue, each task once.
    eventually(WAIT, "the q1 tasks succeed", || async {
        json_of(&env, &["stats", "--json"])["by_queue"]["q1"]["succeeded"] == 30
    })
    .await;
    let mut seen = BTreeSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut args = vec!["list", "--queue", "q1", "--limit", "7", "--json"];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let page = json_of(&env, &args);
        for t in page["tasks"].as_array().unwrap() {
            assert!(seen.insert(t["id"].as_str().unwrap().to_string()));
        }
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 30);
    let (code, out, err) = env.fleetctl(&["list", "--cursor", "not-a-cursor"]);
    assert_eq!(code, 2, "a bad cursor is a usage error: {out}");
    assert!(
        err.contains("not-a-cursor") && err.contains("cursor"),
        "{err}"
    );
    let table = ok(&env, &["list", "--state", "failed"]);
    assert!(table.contains("bad") && table.contains("boom"), "{table}");

    // cancel: running → cancelling; again → 4; unknown → 1.
    eventually(WAIT, "nap runs", || async {
        state(&env, "nap").await == Some(State::Running)
    })
    .await;
    assert!(ok(&env, &["cancel", "nap"]).contains("cancelling"));
    let (code, _, _) = env.fleetctl(&["watch", "nap", "--interval-ms", "100"]);
    assert_eq!(code, 4, "cancelled");
    let (code, out, _) = env.fleetctl(&["cancel", "nap"]);
    assert_eq!((code, out.trim()), (4, "nap\talready cancelled"));
    let (code, _, err) = env.fleetctl(&["cancel", "ghost"]);
    assert_eq!(code, 1, "{err}");

    // pause a queue, move the held task to high, resume: it runs.
    assert!(ok(&env, &["pause", "--queue", "q2"]).contains("paused queue:q2"));
    ok(
        &env,
        &["submit", "--kind", "noop", "--id", "later", "--queue", "q2"],
    );
    eventually(WAIT, "the q2 task is held", || async {
        json_of(&env, &["stats", "--json"])["held"] == 1
    })
    .await;
    assert!(ok(&env, &["set-priority", "later", "high"]).contains("moved to high"));
    assert!(ok(&env, &["resume", "--queue", "q2"]).contains("resumed queue:q2"));
    ok(&env, &["watch", "later", "--interval-ms", "100"]);
    let (code, _, _) = env.fleetctl(&["set-priority", "later", "low"]);
    assert_eq!(code, 4, "started tasks keep their priority");

    // redrive: by id, by kind; bad usage is exit 2.
    assert!(ok(&env, &["redrive", "bad"]).contains("redriven 1 of 1"));
    let (code, out, _) = env.fleetctl(&["watch", "bad", "--interval-ms", "100"]);
    assert_eq!(code, 4, "fails again: {out}");
    assert!(ok(&env, &["retry", "--kind", "fail"]).contains("redriven 1"));
    let (code, out, err) = env.fleetctl(&["redrive", "n0"]);
    assert_eq!(code, 4, "a task that exists but is not failed: {out}");
    assert!(
        err.contains("task `n0` is succeeded; only failed tasks are redriven"),
        "{err}"
    );
    let (code, _, err) = env.fleetctl(&["redrive", "ghost"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no task `ghost`"), "{err}");
    for args in [
        &["redrive"][..],
        &["pause", "--queue", "no such queue!"],
        &["pause", "--queue", ""],
        &["resume", "--queue", &"q".repeat(129)],
        &["pause"],
        &["pause", "--queue", "a", "--priority", "low"],
        &["list", "--state", "bogus"],
        &["list", "--limit", "0"],
    ] {
        let (code, _, err) = env.fleetctl(args);
        assert_eq!(code, 2, "fleetctl {args:?}: {err}");
    }

    // workers and stats.
    let workers = json_of(&env, &["workers", "--json"]);
    assert_eq!(workers[0]["id"], "w1");
    assert!(ok(&env, &["workers"]).contains("w1"));
    let stats = json_of(&env, &["stats", "--json"]);
    assert_eq!(stats["states"]["cancelled"], 1);
    assert!(stats["consumer_lag"].is_object(), "{stats}");
    let human = ok(&env, &["stats"]);
    assert!(
        human.contains("q:q1") && human.contains("throughput"),
        "{human}"
    );
}

/// `fleetctl probe`, the containers' HEALTHCHECK: 0 for a service whose `/readyz` answers 200,
/// 1 for a port nobody listens on or a path that is not 200, and a clear refusal of URLs it
/// cannot probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleetctl_probe_reports_a_services_health_by_exit_code() {
    let env = TestEnv::start("fleetctl-probe");
    env.create_topics().await;
    let [port, closed] = fleet_testkit::free_ports::<2>();
    let listen = format!("127.0.0.1:{port}");
    let _reaper = env.spawn(
        "fleet-reaper",
        "reaper",
        &[("FLEET__HTTP__LISTEN", &listen)],
    );
    let ready = format!("http://{listen}/readyz");
    eventually(WAIT, "the reaper's /readyz answers 200", || async {
        env.fleetctl(&["probe", "--url", &ready]).0 == 0
    })
    .await;
    // Without --url: /readyz on the port of http.listen (here through the environment).
    let (code, out, err) = run_probe(&env, &[("FLEET__HTTP__LISTEN", &listen)], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("200"), "{out}");

    let (code, _, err) = env.fleetctl(&["probe", "--url", &format!("http://{listen}/nowhere")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("404"), "{err}");
    let (code, _, err) = env.fleetctl(&[
        "probe",
        "--url",
        &format!("http://127.0.0.1:{closed}/readyz"),
        "--timeout-ms",
        "500",
    ]);
    assert_eq!(code, 1, "{err}");
    for bad in ["https://127.0.0.1/readyz", "http:// /x", "ftp://x"] {
        let (code, _, err) = env.fleetctl(&["probe", "--url", bad]);
        assert_eq!(
            code, 2,
            "bad input, not an unanswered dependency: {bad}: {err}"
        );
        assert!(err.contains(bad.trim_end_matches("/x")), "{bad}: {err}");
    }
    let (code, _, err) = env.fleetctl(&["probe", "--timeout-ms", "0"]);
    assert_eq!(code, 2, "{err}");
}

fn run_probe(env: &TestEnv, vars: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut command = std::process::Command::new(fleet_testkit::fleet_binary("fleetctl"));
    command.arg("probe").args(args);
    for (k, v) in env.env_vars() {
        command.env(k, v);
    }
    for (k, v) in vars {
        command.env(k, v);
    }
    let out = command.output().expect("fleetctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
