//! The task lifecycle end to end on the real stack: scheduler, reaper and workers as processes,
//! tansu and redis-server underneath. Every test records every task and checks the invariants
//! of shared/DESIGN.md by counting.

use std::collections::HashMap;
use std::time::Duration;

use fleet_integration_tests::fleet::{executions, task_json};
use fleet_integration_tests::{TestEnv, eventually};

const WAIT: Duration = Duration::from_secs(120);

/// Task states by id, read from Redis.
async fn states(env: &TestEnv, ids: &[String]) -> HashMap<String, String> {
    env.tasks(ids)
        .await
        .into_iter()
        .map(|(id, f)| (id, f.get("state").cloned().unwrap_or_default()))
        .collect()
}

async fn wait_all_terminal(
    env: &TestEnv,
    ids: &[String],
) -> HashMap<String, HashMap<String, String>> {
    eventually(WAIT, "every task reaches a terminal state", || async {
        let s = states(env, ids).await;
        s.len() == ids.len()
            && s.values()
                .all(|st| matches!(st.as_str(), "succeeded" | "failed" | "cancelled"))
    })
    .await;
    env.tasks(ids).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tasks_over_four_priorities_and_three_workers_each_run_once() {
    let env = TestEnv::start("thousand");
    env.create_topics().await;
    let _scheduler = env.spawn("fleet-scheduler", "scheduler", &[]);
    let _reaper = env.spawn("fleet-reaper", "reaper", &[]);
    let workers: Vec<_> = (0..3)
        .map(|i| env.spawn("fleet-worker", &format!("worker{i}"), &[]))
        .collect();

    let priorities = ["critical", "high", "normal", "low"];
    let ids: Vec<String> = (0..1000).map(|i| format!("t{i}")).collect();
    let submissions: Vec<String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            task_json(
                id,
                if i % 3 == 0 { "echo" } else { "noop" },
                priorities[i % 4],
                serde_json::json!({ "n": i }),
            )
        })
        .collect();
    env.submit(&submissions).await;

    let tasks = wait_all_terminal(&env, &ids).await;
    let names: Vec<String> = (0..3).map(|i| format!("worker{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let runs = executions(&env, &names);
    for id in &ids {
        let t = &tasks[id];
        assert_eq!(t["state"], "succeeded", "{id}: {t:?}");
        assert_eq!(t["attempt"], "1", "{id} claimed once: {t:?}");
        assert_eq!(
            runs.get(id).map(Vec::len),
            Some(1),
            "{id} executed exactly once: {:?}",
            runs.get(id)
        );
    }
    let echo = &tasks["t3"];
    assert_eq!(echo["result"], r#"{"n":3}"#, "echo returns its payload");
    let used: std::collections::BTreeSet<&str> =
        runs.values().flatten().map(|(_, w)| w.as_str()).collect();
    assert!(
        used.len() >= 2,
        "the work is spread over the workers: {used:?}"
    );
    drop(workers);
}
