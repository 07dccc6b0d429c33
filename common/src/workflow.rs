//! Dependencies between tasks and the workflows they form.
//!
//! A task may name, in `depends_on`, tasks accepted earlier or in the same submission (an array
//! over HTTP, or an array in one record of the submit topic). Until its parents have ended it is
//! `waiting`: stored in Redis, not on Kafka, holding no worker. The script that ends its last
//! parent releases it, in the same call (`lua/prelude.lua`, `dag_finished`), so there is no
//! polling and no moment at which a crash could leave it stuck or release it twice.
//!
//! A submission with dependencies is accepted whole or not at all: [`prepare`] refuses cycles,
//! ids given twice and the like here, and the accept script refuses unknown parents before it
//! writes anything of the submission.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::{Membership, NewTask};
use crate::task::InvalidTask;
pub use crate::task::{MAX_PARENTS, OnParentFailure};

/// Helpers that build a submission (a JSON array of tasks, for `POST /v1/tasks` or one batch
/// record on the submit topic) from task objects: a task without an `id` gets one.
pub mod build {
    use serde_json::{Value, json};

    fn id_of(task: &mut Value) -> String {
        if let Some(id) = task.get("id").and_then(Value::as_str) {
            return id.to_string();
        }
        let id = crate::task::new_task_id();
        task["id"] = json!(id);
        id
    }

    fn depend(task: &mut Value, parents: &[String]) {
        let mut all: Vec<Value> = task
            .get("depends_on")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        all.extend(parents.iter().map(|p| json!(p)));
        task["depends_on"] = Value::Array(all);
    }

    /// Each task after the one before it: `a → b → c`.
    pub fn chain(mut tasks: Vec<Value>) -> Vec<Value> {
        let mut previous: Option<String> = None;
        for task in &mut tasks {
            let id = id_of(task);
            if let Some(parent) = previous.replace(id) {
                depend(task, &[parent]);
            }
        }
        tasks
    }

    /// A group and a task after all of it (Celery's chord): fan-out, then fan-in.
    pub fn chord(mut group: Vec<Value>, mut callback: Value) -> Vec<Value> {
        let parents: Vec<String> = group.iter_mut().map(id_of).collect();
        id_of(&mut callback);
        depend(&mut callback, &parents);
        group.push(callback);
        group
    }
}

static GROUPS: AtomicU64 = AtomicU64::new(1);

/// Checks a submission's dependencies as a whole and marks its tasks as one group, when any
/// task has `depends_on`; a submission without leaves its tasks untouched. Refused: an id
/// given twice, a cycle. Parents outside the submission are checked by the accept script.
pub fn prepare(tasks: &mut [NewTask]) -> Result<(), InvalidTask> {
    if tasks.iter().all(|t| t.record.depends_on.is_empty()) {
        return Ok(());
    }
    prepare_whole(tasks)
}

/// Marks a batch record's tasks (an array on the submit topic) as one group, accepted whole or
/// refused whole, and checks its dependencies as [`prepare`] does. Without dependencies its
/// tasks form no workflow.
pub fn prepare_batch(tasks: &mut [NewTask]) -> Result<(), InvalidTask> {
    if tasks.iter().any(|t| !t.record.depends_on.is_empty()) {
        return prepare_whole(tasks);
    }
    let group = GROUPS.fetch_add(1, Ordering::Relaxed);
    for (rank, task) in tasks.iter_mut().enumerate() {
        task.membership = Some(Membership {
            group,
            rank,
            default_workflow: String::new(),
        });
    }
    Ok(())
}

/// Most follow-up tasks one success may return.
pub const MAX_FOLLOW_UPS: usize = 1000;

/// Prepares the follow-up tasks a handler returned with its success (`ctx.spawn`): one
/// submission, accepted with the success or not at all, in the workflow of the task that
/// spawned them (`spawner`'s, named by its id if it had none). They are placed, so the
/// dispatcher applies their queue's strategy, placement and limits as for any task; quotas
/// (`max_waiting`) do not refuse them: they are work already accepted.
pub fn prepare_follow_ups(tasks: &mut [NewTask], spawner: &str) -> Result<(), InvalidTask> {
    if tasks.len() > MAX_FOLLOW_UPS {
        return Err(problem(format!(
            "a success may spawn at most {MAX_FOLLOW_UPS} tasks, not {}",
            tasks.len()
        )));
    }
    for task in tasks.iter_mut() {
        task.make_placed();
        task.quotas.clear();
    }
    prepare_whole(tasks)?;
    for task in tasks.iter_mut() {
        if let Some(m) = task.membership.as_mut() {
            m.default_workflow = spawner.to_string();
        }
    }
    Ok(())
}

fn prepare_whole(tasks: &mut [NewTask]) -> Result<(), InvalidTask> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(tasks.len());
    for (i, task) in tasks.iter().enumerate() {
        if index.insert(task.record.id.as_str(), i).is_some() {
            return Err(problem(format!(
                "needs the ids of its submission unique: `{}` is given twice",
                task.record.id
            )));
        }
    }
    // Kahn's algorithm over the edges inside the submission.
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); tasks.len()];
    let mut unmet = vec![0usize; tasks.len()];
    for (i, task) in tasks.iter().enumerate() {
        for parent in &task.record.depends_on {
            if let Some(&p) = index.get(parent.as_str()) {
                children[p].push(i);
                unmet[i] += 1;
            }
        }
    }
    let mut order: Vec<usize> = (0..tasks.len()).filter(|&i| unmet[i] == 0).collect();
    let mut next = 0;
    while next < order.len() {
        let at = order[next];
        next += 1;
        for &child in &children[at] {
            unmet[child] -= 1;
            if unmet[child] == 0 {
                order.push(child);
            }
        }
    }
    if order.len() < tasks.len() {
        let mut cycle: Vec<&str> = (0..tasks.len())
            .filter(|&i| unmet[i] > 0)
            .map(|i| tasks[i].record.id.as_str())
            .take(5)
            .collect();
        if unmet.iter().filter(|&&n| n > 0).count() > cycle.len() {
            cycle.push("…");
        }
        return Err(problem(format!(
            "forms a cycle in its submission (through {})",
            cycle.join(", ")
        )));
    }
    let group = GROUPS.fetch_add(1, Ordering::Relaxed);
    let default_workflow = tasks[0]
        .record
        .workflow
        .clone()
        .unwrap_or_else(|| tasks[0].record.id.clone());
    for (rank, &i) in order.iter().enumerate() {
        tasks[i].membership = Some(Membership {
            group,
            rank,
            default_workflow: default_workflow.clone(),
        });
    }
    Ok(())
}

fn problem(text: String) -> InvalidTask {
    InvalidTask::Field {
        field: "depends_on",
        problem: text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::TaskSettings;
    use crate::task::TaskSpec;

    fn task(json: &str) -> NewTask {
        let spec = TaskSpec::parse(json.as_bytes(), 1 << 20).expect("valid");
        NewTask::from_spec(spec, &TaskSettings::default(), || "generated".into())
    }

    #[test]
    fn a_diamond_is_ordered_parents_first() {
        let mut tasks = vec![
            task(r#"{"id":"d","kind":"k","depends_on":["b","c"]}"#),
            task(r#"{"id":"b","kind":"k","depends_on":["a"]}"#),
            task(r#"{"id":"a","kind":"k"}"#),
            task(r#"{"id":"c","kind":"k","depends_on":["a","outside"]}"#),
        ];
        prepare(&mut tasks).expect("a diamond is fine");
        let rank = |i: usize| tasks[i].membership.as_ref().expect("member").rank;
        assert!(rank(2) < rank(1) && rank(2) < rank(3));
        assert!(rank(1) < rank(0) && rank(3) < rank(0));
        let m = tasks[0].membership.as_ref().expect("member");
        assert_eq!(
            m.default_workflow, "d",
            "the first task's id names the workflow"
        );
        assert!(
            tasks
                .iter()
                .all(|t| t.membership.as_ref().unwrap().group == m.group)
        );
    }

    #[test]
    fn cycles_and_repeated_ids_are_refused() {
        let mut cycle = vec![
            task(r#"{"id":"a","kind":"k","depends_on":["c"]}"#),
            task(r#"{"id":"b","kind":"k","depends_on":["a"]}"#),
            task(r#"{"id":"c","kind":"k","depends_on":["b"]}"#),
            task(r#"{"id":"free","kind":"k"}"#),
        ];
        let err = prepare(&mut cycle).unwrap_err().to_string();
        assert!(err.contains("cycle") && err.contains("a, b, c"), "{err}");
        assert!(cycle.iter().all(|t| t.membership.is_none()));

        let mut twice = vec![
            task(r#"{"id":"a","kind":"k"}"#),
            task(r#"{"id":"a","kind":"k","depends_on":["x"]}"#),
        ];
        assert!(
            prepare(&mut twice)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
    }

    #[test]
    fn chain_and_chord_build_submissions_prepare_accepts() {
        use serde_json::json;
        let chained = build::chain(vec![
            json!({"id": "a", "kind": "k"}),
            json!({"kind": "k"}),
            json!({"id": "c", "kind": "k"}),
        ]);
        let b = chained[1]["id"].as_str().unwrap().to_string();
        assert_eq!(chained[1]["depends_on"], json!(["a"]));
        assert_eq!(chained[2]["depends_on"], json!([b]));
        let chord = build::chord(
            vec![
                json!({"id": "p1", "kind": "k"}),
                json!({"id": "p2", "kind": "k"}),
            ],
            json!({"id": "join", "kind": "k"}),
        );
        assert_eq!(chord[2]["depends_on"], json!(["p1", "p2"]));
        let mut tasks: Vec<NewTask> = chained
            .iter()
            .chain(&chord)
            .map(|v| task(&v.to_string()))
            .collect();
        prepare(&mut tasks).expect("a chain and a chord are one valid submission");
    }

    #[test]
    fn a_submission_without_dependencies_is_untouched() {
        let mut tasks = vec![task(r#"{"id":"a","kind":"k"}"#), task(r#"{"kind":"k"}"#)];
        prepare(&mut tasks).expect("fine");
        assert!(tasks.iter().all(|t| t.membership.is_none()));
    }

    #[test]
    fn a_given_workflow_names_the_submission() {
        let mut tasks = vec![
            task(r#"{"id":"a","kind":"k","workflow":"nightly-2026-12-07"}"#),
            task(r#"{"id":"b","kind":"k","depends_on":["a"]}"#),
        ];
        prepare(&mut tasks).expect("fine");
        assert_eq!(
            tasks[1].membership.as_ref().unwrap().default_workflow,
            "nightly-2026-12-07"
        );
    }

    #[test]
    fn single_task_checks_name_the_problem() {
        for (json, needle) in [
            (
                r#"{"id":"a","kind":"k","depends_on":["a"]}"#,
                "cannot depend on itself",
            ),
            (r#"{"kind":"k","depends_on":["x","x"]}"#, "twice"),
            (r#"{"kind":"k","depends_on":["a b"]}"#, "depends_on"),
            (r#"{"kind":"k","on_parent_failure":"skip"}"#, "applies only"),
            (
                r#"{"kind":"k","depends_on":["x"],"on_parent_failure":"maybe"}"#,
                "on_parent_failure",
            ),
            (r#"{"kind":"k","workflow":""}"#, "workflow"),
        ] {
            let err = TaskSpec::parse(json.as_bytes(), 1 << 20)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
        let many: Vec<String> = (0..=MAX_PARENTS).map(|i| format!("\"p{i}\"")).collect();
        let json = format!(r#"{{"kind":"k","depends_on":[{}]}}"#, many.join(","));
        let err = TaskSpec::parse(json.as_bytes(), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("over the limit of 1000"), "{err}");
    }
}
