//! The scheduler's HTTP API on the real stack: authentication, submit (one and batch), read,
//! list with paging, cancel, pause/resume, priority, redrive, stats, workers, health and
//! metrics; bad and hostile requests get JSON 4xx answers and change nothing; the OpenAPI
//! document and the routes stay in step.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use fleet_testkit::http::{Response, SpanSink, request, send_raw};
use fleet_testkit::{TestEnv, eventually};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "test-token-0123456789";

async fn call(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Response {
    let body = body.map(|b| b.to_string());
    request(
        addr,
        method,
        path,
        Some(TOKEN),
        body.as_deref().map(str::as_bytes),
    )
    .await
}

async fn state_of(addr: SocketAddr, id: &str) -> String {
    call(addr, "GET", &format!("/v1/tasks/{id}"), None)
        .await
        .json()["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_submits_reads_lists_and_controls_tasks_behind_a_token() {
    let env = TestEnv::start("api");
    env.create_topics().await;
    let (_scheduler, addr) = env
        .spawn_api(
            "scheduler",
            &[
                ("FLEET__HTTP__TOKENS", TOKEN),
                ("FLEET__HTTP__MAX_BODY_BYTES", "65536"),
            ],
        )
        .await;
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let _w1 = env.spawn(
        "fleet-worker",
        "w1",
        &[("FLEET__WORKER__CANCEL_GRACE_MS", "1000")],
    );

    // Health and metrics need no token; the API does.
    assert_eq!(
        request(addr, "GET", "/healthz", None, None).await.status,
        200
    );
    let anonymous = request(addr, "GET", "/v1/stats", None, None).await;
    assert_eq!(
        (anonymous.status, anonymous.error_code().as_str()),
        (401, "no_token")
    );
    let wrong = request(addr, "GET", "/v1/stats", Some("not-the-token-at-all"), None).await;
    assert_eq!(
        (wrong.status, wrong.error_code().as_str()),
        (401, "bad_token")
    );

    // One task, then a batch of 20.
    let one = call(
        addr,
        "POST",
        "/v1/tasks",
        Some(json!({"kind": "echo", "payload": {"n": 1}})),
    )
    .await;
    assert_eq!(one.status, 201, "{}", one.body);
    let id = one.json()["tasks"][0]["id"].as_str().unwrap().to_string();
    let batch: Vec<Value> = (0..20)
        .map(|i| json!({"id": format!("b{i}"), "kind": "noop", "queue": "batch"}))
        .collect();
    let answer = call(addr, "POST", "/v1/tasks", Some(Value::Array(batch))).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    assert_eq!(answer.json()["tasks"].as_array().unwrap().len(), 20);
    let again = call(
        addr,
        "POST",
        "/v1/tasks",
        Some(json!({"id": "b0", "kind": "noop"})),
    )
    .await;
    assert_eq!(again.status, 200, "only a duplicate");
    assert_eq!(again.json()["tasks"][0]["duplicate"], true);
    eventually(WAIT, "the echo task succeeds", || async {
        state_of(addr, &id).await == "succeeded"
    })
    .await;
    let task = call(addr, "GET", &format!("/v1/tasks/{id}"), None)
        .await
        .json();
    assert_eq!(task["result"], json!({"n": 1}));
    assert_eq!(task["history"][0]["outcome"], "succeeded");
    assert_eq!(task["attempt"], 1);

    // Paging through a queue's tasks sees each once.
    eventually(WAIT, "the batch succeeds", || async {
        let page = call(addr, "GET", "/v1/tasks?state=succeeded&limit=1000", None)
            .await
            .json();
        page["tasks"].as_array().unwrap().len() == 21
    })
    .await;
    let mut seen = BTreeSet::new();
    let mut cursor = String::new();
    loop {
        let page = call(
            addr,
            "GET",
            &format!("/v1/tasks?queue=batch&limit=6{cursor}"),
            None,
        )
        .await
        .json();
        for t in page["tasks"].as_array().unwrap() {
            assert!(seen.insert(t["id"].as_str().unwrap().to_string()), "{t}");
            assert_eq!(t["queue"], "batch");
        }
        match page["next"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 20);
    // A cursor no page gave out is refused, not read as the first page.
    for bad in ["not-a-cursor", "1:-3", "9:0", "1%3A2%3A3"] {
        let answer = call(addr, "GET", &format!("/v1/tasks?cursor={bad}"), None).await;
        assert_eq!(answer.status, 400, "{bad}");
        let body = answer.json();
        assert_eq!(body["error"]["code"], "bad_cursor", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("cursor"),
            "{body}"
        );
    }

    // Cancel a running task; a second cancel is a conflict.
    let sleeper = call(
        addr,
        "POST",
        "/v1/tasks",
        Some(json!({"id": "nap", "kind": "sleep", "payload": {"ms": 60000}})),
    )
    .await;
    assert_eq!(sleeper.status, 201);
    eventually(WAIT, "the sleeper runs", || async {
        state_of(addr, "nap").await == "running"
    })
    .await;
    let cancel = call(addr, "POST", "/v1/tasks/nap/cancel", None).await;
    assert_eq!(cancel.json()["result"], "cancelling");
    eventually(WAIT, "the sleeper is cancelled", || async {
        state_of(addr, "nap").await == "cancelled"
    })
    .await;
    let twice = call(addr, "POST", "/v1/tasks/nap/cancel", None).await;
    assert_eq!(
        (twice.status, twice.error_code().as_str()),
        (409, "already_ended")
    );

    // Pause a queue: its task waits; move another's priority; resume.
    let paused = call(addr, "POST", "/v1/pause", Some(json!({"queue": "slow"}))).await;
    assert_eq!(paused.json()["paused"], "queue:slow");
    call(
        addr,
        "POST",
        "/v1/tasks",
        Some(json!({"id": "held", "kind": "noop", "queue": "slow", "priority": "low"})),
    )
    .await;
    eventually(WAIT, "the task is held", || async {
        call(addr, "GET", "/v1/stats", None).await.json()["held"] == 1
    })
    .await;
    let moved = call(
        addr,
        "POST",
        "/v1/tasks/held/priority",
        Some(json!({"priority": "high"})),
    )
    .await;
    assert_eq!(moved.json()["result"], "moved");
    assert_eq!(state_of(addr, "held").await, "pending");
    let resumed = call(addr, "POST", "/v1/resume", Some(json!({"queue": "slow"}))).await;
    assert_eq!(resumed.status, 200, "{}", resumed.body);
    eventually(WAIT, "the held task runs", || async {
        state_of(addr, "held").await == "succeeded"
    })
    .await;
    let record = call(addr, "GET", "/v1/tasks/held", None).await.json()["record"].clone();
    assert_eq!(record["priority"], "high");
    let late = call(
        addr,
        "POST",
        "/v1/tasks/held/priority",
        Some(json!({"priority": "low"})),
    )
    .await;
    assert_eq!((late.status, late.error_code().as_str()), (409, "started"));

    // A failed task is redriven and fails again (a permanent error), now with two rounds.
    call(
        addr,
        "POST",
        "/v1/tasks",
        Some(json!({"id": "bad", "kind": "fail", "payload": {"message": "nope"}})),
    )
    .await;
    eventually(WAIT, "the failing task fails", || async {
        state_of(addr, "bad").await == "failed"
    })
    .await;
    let redrive = call(addr, "POST", "/v1/tasks/bad/redrive", None).await;
    assert_eq!(redrive.json()["result"], "redriven");
    eventually(WAIT, "the redriven task fails again", || async {
        let t = call(addr, "GET", "/v1/tasks/bad", None).await.json();
        t["state"] == "failed" && t["attempt"] == 2
    })
    .await;
    let by_kind = call(
        addr,
        "POST",
        "/v1/redrive",
        Some(json!({"kind": "no-such-kind"})),
    )
    .await;
    assert_eq!(by_kind.json()["redriven"], 0);

    // Stats, workers and metrics reflect it.
    let stats = call(addr, "GET", "/v1/stats", None).await.json();
    assert_eq!(stats["by_queue"]["batch"]["succeeded"], 20);
    assert_eq!(stats["states"]["cancelled"], 1);
    let workers = call(addr, "GET", "/v1/workers", None).await.json();
    assert_eq!(workers["workers"][0]["id"], "w1");
    // Started without `HOSTNAME` (as under systemd), the worker still names its host.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(
        workers["workers"][0]["info"]["host"],
        host.trim(),
        "{workers}"
    );
    let metrics = request(addr, "GET", "/metrics", None, None).await;
    assert!(
        metrics.body.contains("fleet_tasks_accepted_total"),
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.contains("fleet_tasks{state=\"succeeded\"}"),
        "{}",
        metrics.body
    );

    // Bad and hostile requests: JSON errors, nothing created.
    let before = call(addr, "GET", "/v1/stats", None).await.json()["states"].clone();
    for (body, code) in [
        (&b"{not json"[..], "invalid_json"),
        (br#"{"kind":"noop","tenant_id":"x"}"#, "invalid_json"),
        (br#"{"kind":"noop","tenant":"a b"}"#, "invalid_field"),
        (br#"{"kind":"noop","concurrency_key":""}"#, "invalid_field"),
        (br#"{"kind":"noop","rate_key":7}"#, "invalid_json"),
        (br#"{"kind":"noop","max_attempts":0}"#, "invalid_field"),
        (br#"[{"kind":"noop"},{"kind":7}]"#, "invalid_json"),
        (br#"[]"#, "bad_batch"),
        (b"{\"kind\":\"n\xffop\"}", "not_utf8"),
    ] {
        let r = request(addr, "POST", "/v1/tasks", Some(TOKEN), Some(body)).await;
        assert_eq!(
            (r.status, r.error_code()),
            (400, code.to_string()),
            "{}",
            r.body
        );
    }
    let batch_error = request(
        addr,
        "POST",
        "/v1/tasks",
        Some(TOKEN),
        Some(br#"[{"kind":"noop"},{"kind":7}]"#),
    )
    .await;
    assert!(
        batch_error.json()["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("task 1:")
    );
    let huge = format!(r#"{{"kind":"noop","payload":"{}"}}"#, "x".repeat(100_000));
    let too_big = request(
        addr,
        "POST",
        "/v1/tasks",
        Some(TOKEN),
        Some(huge.as_bytes()),
    )
    .await;
    assert_eq!(
        (too_big.status, too_big.error_code().as_str()),
        (413, "too_large")
    );
    for (path, status, code) in [
        ("/v1/tasks?state=bogus", 400, "bad_query"),
        ("/v1/tasks?limit=0", 400, "bad_query"),
        ("/v1/tasks?colour=red", 400, "bad_query"),
        ("/v1/tasks/no-such-task", 404, "not_found"),
        ("/v1/nothing-here", 404, "not_found"),
    ] {
        let r = call(addr, "GET", path, None).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (status, code),
            "{path}: {}",
            r.body
        );
    }
    for (path, body, code) in [
        ("/v1/pause", json!({}), "bad_selector"),
        (
            "/v1/pause",
            json!({"queue": "a", "priority": "low"}),
            "bad_selector",
        ),
        ("/v1/pause", json!({"priority": "urgent"}), "invalid_json"),
        (
            "/v1/pause",
            json!({"queue": "no such queue!"}),
            "bad_selector",
        ),
        ("/v1/resume", json!({"queue": ""}), "bad_selector"),
        (
            "/v1/tasks",
            json!({"kind": "noop", "max_attempts": "five"}),
            "invalid_json",
        ),
        (
            "/v1/tasks/b1/priority",
            json!({"priority": 3}),
            "invalid_json",
        ),
    ] {
        let r = call(addr, "POST", path, Some(body)).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, code),
            "{path}: {}",
            r.body
        );
    }
    let typed = call(
        addr,
        "POST",
        "/v1/tasks",
        Some(json!({"kind": "noop", "max_attempts": "five"})),
    );
    let typed = typed.await.json();
    assert!(
        typed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`max_attempts`: invalid type"),
        "a wrong type names its field: {typed}"
    );
    // A wrong method gets the JSON error format and the methods the route takes.
    for (method, path, allow) in [
        ("DELETE", "/v1/tasks", "GET,HEAD,POST"),
        ("GET", "/v1/pause", "POST"),
        ("POST", "/readyz", "GET,HEAD"),
        ("PUT", "/", "GET,HEAD"),
    ] {
        let r = call(addr, method, path, None).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (405, "method_not_allowed"),
            "{method} {path}: {}",
            r.body
        );
        let mut allowed: Vec<&str> = r
            .headers
            .iter()
            .find(|(name, _)| name == "allow")
            .map(|(_, v)| v.split(',').map(str::trim).collect())
            .unwrap_or_default();
        allowed.sort_unstable();
        assert_eq!(allowed.join(","), allow, "{method} {path}");
    }
    let garbage = send_raw(addr, b"\x16\x03\x01garbage that is not HTTP\r\n\r\n").await;
    assert!(garbage.status == 400 || garbage.status == 0, "{garbage:?}");
    assert_eq!(
        call(addr, "GET", "/v1/stats", None).await.json()["states"],
        before
    );
    assert_eq!(
        request(addr, "GET", "/readyz", None, None).await.status,
        200,
        "still serving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_and_the_routes_stay_in_step() {
    let env = TestEnv::start("openapi");
    env.create_topics().await;
    let (_scheduler, addr) = env.spawn_api("scheduler", &[]).await;
    let served = request(addr, "GET", "/v1/openapi.json", None, None).await;
    assert_eq!(served.status, 200);
    assert_eq!(
        served.body,
        fleet_scheduler::api::OPENAPI,
        "serves the checked-in document"
    );
    let doc = served.json();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let routed: BTreeSet<(String, String)> = fleet_scheduler::api::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, routed, "openapi.json and api::ROUTES differ");

    // Every route exists on the server (401 without a token: none is configured, so even the
    // right token could not pass) and anything else is 404.
    for (method, path) in &routed {
        let concrete = path
            .replace("{id}", "some-task")
            .replace("{name}", "some-queue")
            .replace("{scope}", "key");
        let r = request(addr, method, &concrete, None, Some(b"{}")).await;
        let open = ["/v1/openapi.json", "/healthz", "/readyz", "/metrics", "/"];
        let expected = if open.contains(&path.as_str()) {
            200
        } else {
            401
        };
        assert_eq!(r.status, expected, "{method} {path}: {}", r.body);
        if expected == 401 {
            assert_eq!(r.error_code(), "no_tokens", "{method} {path}");
        }
    }
    assert_eq!(
        request(addr, "GET", "/v1/tasks/x/unknown", None, None)
            .await
            .status,
        404
    );
    let dashboard = request(addr, "GET", "/", None, None).await;
    assert!(dashboard.status == 200 && dashboard.body.contains("<title>Fleet</title>"));
}

/// What the OpenAPI document says of an outage: every `/v1` operation it gives a 503 answers
/// 503 with the JSON error format while Redis is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_503_is_what_the_api_answers_while_redis_is_down() {
    let mut env = TestEnv::start("api-redis-down");
    env.create_topics().await;
    let (_scheduler, addr) = env
        .spawn_api("scheduler", &[("FLEET__HTTP__TOKENS", TOKEN)])
        .await;
    let doc: Value = serde_json::from_str(fleet_scheduler::api::OPENAPI).unwrap();
    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if path.starts_with("/v1/") && op["responses"]["503"].is_object() {
                documented.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    let v1 = fleet_scheduler::api::ROUTES
        .iter()
        .filter(|(_, p)| p.starts_with("/v1/") && *p != "/v1/openapi.json")
        .count();
    assert_eq!(
        documented.len(),
        v1,
        "every /v1 operation documents its 503"
    );

    env.redis.signal("KILL");
    env.redis.wait_exit(Duration::from_secs(10));
    let bodies = [
        ("/v1/tasks", json!({"kind": "noop"})),
        ("/v1/pause", json!({"queue": "q"})),
        ("/v1/resume", json!({"queue": "q"})),
        ("/v1/tasks/{id}/priority", json!({"priority": "high"})),
        ("/v1/limits/{scope}/{name}", json!({"max_running": 1})),
        (
            "/v1/schedules/{name}",
            json!({"cron": "* * * * *", "task": {"kind": "noop"}}),
        ),
    ];
    for (method, path) in &documented {
        let body = bodies
            .iter()
            .find(|(p, _)| p == path)
            .map_or_else(|| json!({}), |(_, b)| b.clone());
        let body = (method == "POST" || method == "PUT").then_some(body);
        let concrete = path
            .replace("{id}", "some-task")
            .replace("{name}", "some-queue")
            .replace("{scope}", "key");
        let r = call(addr, method, &concrete, body).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (503, "unavailable"),
            "{method} {path}: {}",
            r.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_travels_from_the_submission_to_the_handler() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;

    let env = TestEnv::start("trace");
    env.create_topics().await;
    let collector = SpanSink::start().await;
    let otlp = format!("http://{}", collector.addr);
    let (_scheduler, addr) = env
        .spawn_api(
            "scheduler",
            &[
                ("FLEET__HTTP__INSECURE_NO_AUTH", "true"),
                ("FLEET__LOG__OTLP_ENDPOINT", &otlp),
            ],
        )
        .await;
    // The standard OpenTelemetry variable adds headers to the export (a collector's API key).
    let _w1 = env.spawn(
        "fleet-worker",
        "w1",
        &[
            ("FLEET__LOG__OTLP_ENDPOINT", &otlp),
            (
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                "x-collector-key=sekrit",
            ),
        ],
    );
    let http_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let kafka_trace = "0af7651916cd43dd8448eb211c80319c";

    // Over HTTP with a traceparent header, and without one.
    let body = r#"{"id":"via-http","kind":"noop"}"#;
    let raw = format!(
        "POST /v1/tasks HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
         traceparent: 00-{http_trace}-00f067aa0ba902b7-01\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(send_raw(addr, raw.as_bytes()).await.status, 201);
    let plain = request(
        addr,
        "POST",
        "/v1/tasks",
        None,
        Some(br#"{"id":"untraced","kind":"noop"}"#),
    )
    .await;
    assert_eq!(plain.status, 201, "{}", plain.body);
    // On the submit topic with a traceparent header.
    let topic = fleet_common::Topics::from_settings(&env.settings().topics).submit();
    let header = format!("00-{kafka_trace}-b7ad6b7169203331-01");
    env.producer()
        .send(
            FutureRecord::<(), _>::to(&topic)
                .payload(r#"{"id":"via-kafka","kind":"noop"}"#)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "traceparent",
                    value: Some(&header),
                })),
            Duration::from_secs(10),
        )
        .await
        .expect("submitted");
    let ids: Vec<String> = ["via-http", "via-kafka", "untraced"]
        .map(String::from)
        .to_vec();
    let tasks = env.wait_terminal(&ids, WAIT).await;

    let started = |id: &str| -> String {
        fleet_testkit::fleet::log_events(&env, &["w1"])
            .into_iter()
            .find(|e| e["message"] == "Handler started." && e["task_id"] == id)
            .map(|e| e["trace_id"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_eq!(started("via-http"), http_trace);
    assert_eq!(started("via-kafka"), kafka_trace);
    let generated = started("untraced");
    assert_eq!(
        generated.len(),
        32,
        "a new trace for an untraced submission"
    );
    assert!(
        tasks["untraced"]
            .trace
            .as_deref()
            .unwrap()
            .contains(&generated)
    );
    assert!(
        tasks["via-http"]
            .trace
            .as_deref()
            .unwrap()
            .contains(http_trace)
    );

    // Exported spans form one trace per task across services: the client's span → accept
    // (scheduler) → publish (scheduler) → task (worker).
    let span_of = |spans: &[(String, Value)], name: &str, task: &str| -> Option<(String, Value)> {
        spans
            .iter()
            .find(|(_, s)| {
                s["name"] == name
                    && s["attributes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|a| a["key"] == "task_id" && a["value"]["stringValue"] == task)
            })
            .cloned()
    };
    let chain_of = || -> Vec<(String, Value)> {
        let spans = collector.spans();
        ["accept", "publish", "task"]
            .iter()
            .filter_map(|name| span_of(&spans, name, "via-http"))
            .collect()
    };
    eventually(WAIT, "accept, publish and task spans exported", || {
        let n = chain_of().len();
        async move { n == 3 }
    })
    .await;
    let chain = chain_of();
    let [
        (accept_service, accept),
        (publish_service, publish),
        (task_service, task),
    ] = <[(String, Value); 3]>::try_from(chain).unwrap();
    assert_eq!(
        (
            accept_service.as_str(),
            publish_service.as_str(),
            task_service.as_str()
        ),
        ("fleet-scheduler", "fleet-scheduler", "fleet-worker")
    );
    for span in [&accept, &publish, &task] {
        assert_eq!(span["traceId"], http_trace, "{span}");
    }
    assert_eq!(
        accept["parentSpanId"], "00f067aa0ba902b7",
        "the client's span"
    );
    assert_eq!(publish["parentSpanId"], accept["spanId"]);
    assert_eq!(task["parentSpanId"], publish["spanId"]);
    assert!(
        collector
            .header("x-collector-key")
            .contains(&"sekrit".to_string()),
        "the worker's export carries the configured header"
    );
}

/// Concurrent requests are accepted in groups (one Redis call for many requests): every request
/// still gets the answers for exactly its own tasks, duplicates across requests resolve as if
/// they had come one by one, and each task is stored and published once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_are_grouped_yet_each_request_gets_its_own_answers() {
    let env = TestEnv::start("api-group");
    env.create_topics().await;
    let (_scheduler, addr) = env
        .spawn_api("scheduler", &[("FLEET__HTTP__TOKENS", TOKEN)])
        .await;

    // 240 requests: singles and batches of three, 360 tasks in all, over 200 distinct ids.
    let requests: Vec<Vec<String>> = (0..240)
        .map(|i| {
            let size = if i % 4 == 0 { 3 } else { 1 };
            (0..size)
                .map(|j| format!("group-{}", (i * 3 + j) % 200))
                .collect()
        })
        .collect();
    let sends = requests.iter().map(|ids| async move {
        let tasks: Vec<Value> = ids
            .iter()
            .map(|id| json!({"id": id, "kind": "noop", "payload": {"for": id}}))
            .collect();
        let body = if tasks.len() == 1 {
            tasks[0].clone()
        } else {
            Value::Array(tasks)
        };
        (ids, call(addr, "POST", "/v1/tasks", Some(body)).await)
    });
    let answers = futures::future::join_all(sends).await;

    let mut created = std::collections::BTreeMap::<String, usize>::new();
    let mut total = 0;
    for (ids, response) in &answers {
        assert!(
            response.status == 201 || response.status == 200,
            "{} {}",
            response.status,
            response.body
        );
        let tasks = response.json()["tasks"].as_array().cloned().unwrap();
        let answered: Vec<String> = tasks
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(&answered, *ids, "a request got another request's answers");
        for task in &tasks {
            total += 1;
            if task["duplicate"] == json!(false) {
                *created
                    .entry(task["id"].as_str().unwrap().to_string())
                    .or_default() += 1;
            }
        }
    }
    let sent: usize = requests.iter().map(Vec::len).sum();
    assert_eq!(total, sent, "one answer per task sent");
    assert_eq!(created.len(), 200, "every distinct id was created");
    assert!(
        created.values().all(|n| *n == 1),
        "an id was created twice: {created:?}"
    );
    assert_eq!(env.task_total().await, 200);
    let topic = fleet_common::Topics::from_settings(&env.settings().topics)
        .tasks(fleet_common::Priority::Normal);
    let records = env.read_topic(&topic, 200, WAIT).await;
    let published: BTreeSet<String> = records
        .iter()
        .map(|r| {
            fleet_common::wire::Envelope::decode(Some(&r.payload))
                .expect("an envelope")
                .task
                .id
                .clone()
        })
        .collect();
    assert_eq!(published.len(), 200, "each task published once");
}
