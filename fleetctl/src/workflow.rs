//! `fleetctl workflow` and `fleetctl workflows`: the workflows tasks form through `depends_on`.

use std::process::ExitCode;

use fleet_common::store::{Store, WorkflowView};
use fleet_common::task::State;

/// Prints workflow `id`: a line per member with its state and parents, then the counts.
/// Returns false if there is no such workflow.
pub(crate) async fn show(store: &Store, id: &str, json: bool) -> anyhow::Result<bool> {
    let Some(view) = store.workflow(id).await? else {
        return Ok(false);
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", render(&view));
    }
    Ok(true)
}

/// The text form: members in acceptance order (parents before children), each with its state,
/// kind, what it waits for or why it ended, and its parents.
fn render(view: &WorkflowView) -> String {
    let mut out = format!(
        "workflow {}: {} tasks, {} open\n",
        view.id,
        view.tasks.len() as u64 + view.more,
        view.open
    );
    let width = view
        .tasks
        .iter()
        .map(|t| t.id.len())
        .max()
        .unwrap_or(2)
        .min(40);
    for task in &view.tasks {
        let mut line = format!(
            "  {:<width$}  {:<9}  {}",
            task.id,
            task.state.as_str(),
            task.kind
        );
        if let Some(left) = task.waiting_for {
            line.push_str(&format!(
                "  (waits for {left} of {} parents)",
                task.parents.len()
            ));
        }
        if !task.parents.is_empty() {
            line.push_str(&format!("  <- {}", task.parents.join(", ")));
        }
        if task.on_parent_failure != "fail" {
            line.push_str(&format!("  [on_parent_failure {}]", task.on_parent_failure));
        }
        if let Some(error) = &task.error
            && task.state != State::Succeeded
        {
            line.push_str(&format!("  ({error})"));
        }
        out.push_str(&line);
        out.push('\n');
    }
    if view.more > 0 {
        out.push_str(&format!("  … {} more not listed\n", view.more));
    }
    let counts: Vec<String> = view
        .counts
        .iter()
        .map(|(s, n)| format!("{s} {n}"))
        .collect();
    out.push_str(&format!("  {}\n", counts.join(", ")));
    out
}

/// Cancels every member of workflow `id` not yet ended; exit 1 if there is no such workflow.
pub(crate) async fn cancel(store: &Store, id: &str) -> anyhow::Result<ExitCode> {
    let Some(done) = store.cancel_workflow(id).await? else {
        eprintln!("fleetctl: no workflow `{id}`");
        return Ok(ExitCode::from(crate::EXIT_NOT_FOUND));
    };
    println!(
        "workflow {id}: {} cancelled, {} cancelling (running; they end cancelled), {} had already ended",
        done.cancelled, done.cancelling, done.already_ended
    );
    Ok(ExitCode::SUCCESS)
}

/// Lists the open workflows (members not yet ended).
pub(crate) async fn list(store: &Store, json: bool) -> anyhow::Result<()> {
    let open = store.open_workflows().await?;
    if json {
        let rows: Vec<serde_json::Value> = open
            .iter()
            .map(|(id, n)| serde_json::json!({"id": id, "open": n}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if open.is_empty() {
        println!("no open workflows");
    }
    for (id, n) in open {
        println!("{id}  {n} open");
    }
    Ok(())
}
