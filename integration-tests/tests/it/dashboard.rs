//! The web dashboard end to end in headless Chromium against a running stack: the overview
//! with its charts, the task list and a task page load with live data; clicking Cancel on a
//! running task cancels it in Redis. Screenshots go to `target/fleet-it/<test>/screenshots/`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::browser::Browser;
use fleet_testkit::http::request;
use fleet_testkit::{TestEnv, eventually, free_ports};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "dashboard-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_and_its_cancel_button_cancels_a_running_task() {
    let env = TestEnv::start("dashboard");
    env.create_topics().await;
    let [port] = free_ports::<1>();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let listen = addr.to_string();
    let _scheduler = env.spawn(
        "fleet-scheduler",
        "scheduler",
        &[
            ("FLEET__HTTP__LISTEN", &listen),
            ("FLEET__HTTP__TOKENS", TOKEN),
        ],
    );
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let _w1 = env.spawn(
        "fleet-worker",
        "w1",
        &[
            ("FLEET__WORKER__CANCEL_GRACE_MS", "1000"),
            ("FLEET__WORKER__CAPACITY__GPU", "1"),
            ("FLEET__WORKER__LABELS__ZONE", "eu-1"),
        ],
    );
    eventually(WAIT, "the API is ready", || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
            && request(addr, "GET", "/readyz", None, None).await.status == 200
    })
    .await;
    let mut tasks: Vec<serde_json::Value> = (0..12)
        .map(|i| json!({"id": format!("quick-{i}"), "kind": "noop", "queue": "emails"}))
        .collect();
    tasks.push(
        json!({"id": "long-report", "kind": "sleep", "queue": "reports", "payload": {"ms": 60000}}),
    );
    let body = serde_json::Value::Array(tasks).to_string();
    let submitted = request(
        addr,
        "POST",
        "/v1/tasks",
        Some(TOKEN),
        Some(body.as_bytes()),
    )
    .await;
    assert_eq!(submitted.status, 201, "{}", submitted.body);

    let shots = env.dir.join("screenshots");
    let mut browser = Browser::launch(&env).await;
    let base = format!("http://{addr}/");

    // Without a token the page says what is missing and points at the token field.
    browser.navigate(&base).await;
    browser
        .wait_for(
            "the missing-token message",
            "document.getElementById('message').textContent.includes('Authorization') && \
             document.getElementById('need-token')?.textContent.includes('API token') && \
             document.getElementById('token').classList.contains('wanted') && \
             !document.getElementById('view').textContent.includes('Loading')",
        )
        .await;
    browser.screenshot(&shots.join("no-token.png")).await;

    // A wrong token, then the right one typed into the field: the error goes with its cause.
    let type_token = |token: &str| {
        format!(
            "{{ const t = document.getElementById('token'); t.value = '{token}'; \
             t.dispatchEvent(new Event('change')); }}"
        )
    };
    browser.eval(&type_token("not-the-token-at-all")).await;
    browser
        .wait_for(
            "the wrong-token message",
            "document.getElementById('message').textContent.includes('not valid') && \
             document.getElementById('need-token')?.textContent.includes('not accepted')",
        )
        .await;
    browser.eval(&type_token(TOKEN)).await;
    browser
        .wait_for(
            "12 succeeded tasks and the worker on the overview, and no stale error",
            "(document.getElementById('count-succeeded')?.textContent === '12') && \
             document.getElementById('workers')?.textContent.includes('w1') && \
             document.body.textContent.includes('emails') && \
             document.getElementById('message').textContent === '' && \
             !document.getElementById('token').classList.contains('wanted')",
        )
        .await;

    // The token was kept, so a reload shows the data at once.
    browser.reload().await;
    browser
        .wait_for(
            "the overview after a reload",
            "document.getElementById('count-succeeded')?.textContent === '12'",
        )
        .await;
    browser.screenshot(&shots.join("overview.png")).await;

    // Capacity: the worker's GPU bar full while a placed task holds its only GPU, a second
    // GPU task waiting for it, and on that task's page why.
    let gpu_tasks = json!([
        {"id": "render-1", "kind": "sleep", "payload": {"ms": 60000}, "resources": {"gpu": 1}},
        {"id": "render-2", "kind": "sleep", "payload": {"ms": 10}, "resources": {"gpu": 1}},
    ])
    .to_string();
    let submitted = request(
        addr,
        "POST",
        "/v1/tasks",
        Some(TOKEN),
        Some(gpu_tasks.as_bytes()),
    )
    .await;
    assert_eq!(submitted.status, 201, "{}", submitted.body);
    browser
        .wait_for(
            "the GPU in use, its bar full, and a task waiting for it",
            "document.getElementById('cap-w1-gpu')?.textContent === '1 / 1' && \
             document.querySelector('#capacity .bar i.full') !== null && \
             document.getElementById('capacity').textContent.includes('zone=eu-1') && \
             document.getElementById('placing')?.textContent.includes('default')",
        )
        .await;
    browser
        .eval("document.getElementById('capacity').scrollIntoView()")
        .await;
    browser.screenshot(&shots.join("capacity.png")).await;
    browser.navigate(&format!("{base}#/task/render-2")).await;
    browser
        .wait_for(
            "the waiting task's reason",
            "document.getElementById('view').textContent.includes('short of gpu')",
        )
        .await;
    let store = env.store().await;
    store
        .cancel(&["render-1".to_string(), "render-2".to_string()])
        .await
        .unwrap();
    browser.navigate(&base).await;

    // Limits: one brand's tasks one at a time; the table shows the slot held and the task
    // over the limit.
    let limit = request(
        addr,
        "PUT",
        "/v1/limits/key/brand-7",
        Some(TOKEN),
        Some(br#"{"max_running": 1}"#),
    )
    .await;
    assert_eq!(limit.status, 200, "{}", limit.body);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let limited = json!([
        {"id": "brand-1", "kind": "sleep", "payload": {"ms": 60000}, "concurrency_key": "brand-7"},
        {"id": "brand-2", "kind": "sleep", "payload": {"ms": 10}, "concurrency_key": "brand-7"},
    ])
    .to_string();
    let submitted = request(
        addr,
        "POST",
        "/v1/tasks",
        Some(TOKEN),
        Some(limited.as_bytes()),
    )
    .await;
    assert_eq!(submitted.status, 201, "{}", submitted.body);
    browser
        .wait_for(
            "the brand's slot held and one task over its limit",
            "(() => { const row = document.getElementById('limit-key-brand-7');                return row && row.cells[3].textContent === '1 / 1' &&                  row.cells[6].textContent === '1' && row.querySelector('.bar i.full') !== null; })()",
        )
        .await;
    browser
        .eval("document.getElementById('limits').scrollIntoView()")
        .await;
    browser.screenshot(&shots.join("limits.png")).await;
    store
        .cancel(&["brand-1".to_string(), "brand-2".to_string()])
        .await
        .unwrap();

    // The task list, filtered by queue.
    browser
        .navigate(&format!("{base}#/tasks?queue=emails"))
        .await;
    browser
        .wait_for(
            "twelve rows of the emails queue",
            "document.querySelectorAll('#tasks tr').length === 13",
        )
        .await;
    browser.screenshot(&shots.join("tasks.png")).await;

    // The running task's page; its Cancel button cancels it.
    browser.navigate(&format!("{base}#/task/long-report")).await;
    browser
        .wait_for(
            "the long report running",
            "document.getElementById('task-state')?.textContent === 'running'",
        )
        .await;
    browser.screenshot(&shots.join("task-running.png")).await;
    browser
        .eval("document.getElementById('cancel').click()")
        .await;
    eventually(WAIT, "the task cancelled in Redis", || async {
        store
            .task("long-report")
            .await
            .unwrap()
            .is_some_and(|t| t.state.as_str() == "cancelled")
    })
    .await;
    browser
        .wait_for(
            "the page shows it cancelled",
            "document.getElementById('task-state')?.textContent === 'cancelled' && \
             document.getElementById('history').textContent.includes('cancelled')",
        )
        .await;
    browser.screenshot(&shots.join("task-cancelled.png")).await;
    // The overview's charts of the last hour, from the series Fleet keeps: waits as soon as
    // the worker reported its starts, tasks from the first sample, rates from the second; a
    // queue's series on choosing it; counters as a labelled table.
    browser.navigate(&base).await;
    browser
        .wait_for(
            "three charts drawn, and the counters table",
            "Number(document.getElementById('chart-wait')?.dataset.drawn) > 0 && \
             Number(document.getElementById('chart-tasks')?.dataset.drawn) > 0 && \
             Number(document.getElementById('chart-throughput')?.dataset.drawn) > 0 && \
             document.querySelectorAll('#chart-throughput polyline').length > 0 && \
             document.getElementById('counters')?.textContent.includes('submissions the scheduler refused')",
        )
        .await;
    browser
        .eval(
            "{ const s = document.getElementById('series-of'); s.value = 'queue:emails'; \
             s.dispatchEvent(new Event('change')); }",
        )
        .await;
    browser
        .wait_for(
            "the emails queue's charts",
            "document.getElementById('series-of')?.value === 'queue:emails' && \
             Number(document.getElementById('chart-wait')?.dataset.drawn) > 0 && \
             document.getElementById('chart-wait').textContent.includes('p99')",
        )
        .await;
    browser
        .eval(
            "{ const s = document.getElementById('series-minutes'); s.value = '15'; \
             s.dispatchEvent(new Event('change')); }",
        )
        .await;
    browser
        .wait_for(
            "the last 15 minutes, one point per 10 s",
            "series.points.length === 90 && series.of === 'queue:emails' && \
             Number(document.getElementById('chart-wait')?.dataset.drawn) > 0",
        )
        .await;
    browser.screenshot(&shots.join("overview-charts.png")).await;
    // A passing Redis outage shows while it lasts, and goes when Redis is back (last: it
    // costs the workers their leases).
    env.redis.signal("STOP");
    browser
        .wait_for(
            "the outage shows",
            "document.getElementById('message').textContent.includes('Redis')",
        )
        .await;
    env.redis.signal("CONT");
    browser
        .wait_for(
            "the outage message goes",
            "document.getElementById('message').textContent === '' && \
             document.getElementById('count-succeeded')?.textContent === '12'",
        )
        .await;
    // A workflow's page draws its graph: a box per task colored by state, an edge per
    // dependency; its cancel button cancels what has not ended.
    let workflow = json!([
        {"id": "wf-a", "kind": "noop", "workflow": "etl"},
        {"id": "wf-b", "kind": "sleep", "payload": {"ms": 60000}, "depends_on": ["wf-a"]},
        {"id": "wf-c", "kind": "fail", "payload": {"message": "no data"}, "depends_on": ["wf-a"]},
        {"id": "wf-d", "kind": "gather", "depends_on": ["wf-b", "wf-c"], "on_parent_failure": "run"},
        {"id": "wf-e", "kind": "noop", "depends_on": ["wf-c"]},
        {"id": "wf-f", "kind": "noop", "depends_on": ["wf-e"], "on_parent_failure": "skip"},
    ])
    .to_string();
    let submitted = request(
        addr,
        "POST",
        "/v1/tasks",
        Some(TOKEN),
        Some(workflow.as_bytes()),
    )
    .await;
    assert_eq!(submitted.status, 201, "{}", submitted.body);
    browser.navigate(&format!("{base}#/workflow/etl")).await;
    browser
        .wait_for(
            "the workflow's graph: six tasks, six edges, each in its state",
            "(() => { const s = id => document.querySelector(`#workflow-graph .node[data-id='${id}']`)?.dataset.state;                return document.querySelectorAll('#workflow-graph .node').length === 6 &&                  document.querySelectorAll('#workflow-graph path.edge').length === 6 &&                  s('wf-a') === 'succeeded' && s('wf-b') === 'running' && s('wf-c') === 'failed' &&                  s('wf-d') === 'waiting' && s('wf-e') === 'failed' && s('wf-f') === 'skipped'; })()",
        )
        .await;
    browser.screenshot(&shots.join("workflow.png")).await;
    browser
        .eval("document.getElementById('cancel-workflow').click()")
        .await;
    browser
        .wait_for(
            "the workflow cancelled: nothing open, b and d cancelled",
            "document.getElementById('workflow-summary')?.textContent.includes('0 open') &&              document.querySelector(\"#workflow-graph .node[data-id='wf-b']\")?.dataset.state === 'cancelled' &&              document.querySelector(\"#workflow-graph .node[data-id='wf-d']\")?.dataset.state === 'cancelled'",
        )
        .await;
    let d = store.task("wf-d").await.unwrap().unwrap();
    assert_eq!(d.attempt, 0, "the cancelled join never ran");
    for name in [
        "workflow.png",
        "no-token.png",
        "overview.png",
        "overview-charts.png",
        "capacity.png",
        "limits.png",
        "tasks.png",
        "task-running.png",
        "task-cancelled.png",
    ] {
        let size = std::fs::metadata(shots.join(name)).map_or(0, |m| m.len());
        assert!(size > 5_000, "{name} is {size} bytes");
    }
    println!("screenshots in {}", shots.display());
}
