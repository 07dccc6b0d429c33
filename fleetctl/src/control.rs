//! `fleetctl cancel`, `redrive`, `pause`, `resume` and `set-priority`: steer tasks and queues.

use std::process::ExitCode;

use fleet_common::Priority;
use fleet_common::placement::QueueSettings;
use fleet_common::store::{Cancel, Reprioritize, Selector, Store};

use crate::{EXIT_BAD_INPUT, EXIT_ENDED, EXIT_NOT_FOUND};

/// Cancels each task and prints what happened to it.
pub(crate) async fn cancel(store: &Store, ids: &[String]) -> anyhow::Result<ExitCode> {
    let mut code = ExitCode::SUCCESS;
    for (id, answer) in ids.iter().zip(store.cancel(ids).await?) {
        match answer {
            Cancel::Cancelled => println!("{id}\tcancelled"),
            Cancel::Cancelling => println!("{id}\tcancelling (its worker stops it)"),
            Cancel::Ended(state) => {
                println!("{id}\talready {state}");
                code = ExitCode::from(EXIT_ENDED);
            }
            Cancel::Unknown => {
                eprintln!("fleetctl: no task `{id}`");
                code = ExitCode::from(EXIT_NOT_FOUND);
            }
        }
    }
    Ok(code)
}

/// Redrives failed tasks: the ids given, or every failed one of a kind and/or queue.
pub(crate) async fn redrive(
    store: &Store,
    ids: &[String],
    kind: Option<String>,
    queue: Option<String>,
    all_failed: bool,
) -> anyhow::Result<ExitCode> {
    if !ids.is_empty() {
        // One at a time, so that each task left alone is named with why: it does not exist,
        // or it is not failed.
        let (mut n, mut code) = (0, ExitCode::SUCCESS);
        for id in ids {
            if store.redrive(std::slice::from_ref(id)).await? == 1 {
                n += 1;
                continue;
            }
            match store.task(id).await?.map(|t| t.state) {
                None => {
                    eprintln!("fleetctl: no task `{id}`");
                    code = ExitCode::from(EXIT_NOT_FOUND);
                }
                Some(state) => {
                    eprintln!("fleetctl: task `{id}` is {state}; only failed tasks are redriven");
                    if code == ExitCode::SUCCESS {
                        code = ExitCode::from(EXIT_ENDED);
                    }
                }
            }
        }
        println!("redriven {n} of {}", ids.len());
        return Ok(code);
    }
    if kind.is_none() && queue.is_none() && !all_failed {
        eprintln!("fleetctl: give task ids, --kind, --queue or --all-failed");
        return Ok(ExitCode::from(EXIT_BAD_INPUT));
    }
    let n = store
        .redrive_failed(kind.as_deref(), queue.as_deref())
        .await?;
    println!("redriven {n}");
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn pause(store: &Store, selector: Selector) -> anyhow::Result<()> {
    let newly = store.pause(&selector).await?;
    let note = if newly { "" } else { " (already paused)" };
    println!("paused {}{note}", selector.member());
    Ok(())
}

pub(crate) async fn resume(store: &Store, selector: Selector) -> anyhow::Result<()> {
    let released = store.resume(&selector).await?;
    println!(
        "resumed {}; {released} held tasks published again",
        selector.member()
    );
    Ok(())
}

pub(crate) async fn set_priority(
    store: &Store,
    id: &str,
    priority: Priority,
) -> anyhow::Result<ExitCode> {
    Ok(match store.set_priority(id, priority).await? {
        Reprioritize::Moved => {
            println!("{id}\tmoved to {priority}");
            ExitCode::SUCCESS
        }
        Reprioritize::Unchanged => {
            println!("{id}\talready {priority}");
            ExitCode::SUCCESS
        }
        Reprioritize::Started(state) => {
            eprintln!("fleetctl: task `{id}` is {state}; only pending or scheduled tasks move");
            ExitCode::from(EXIT_ENDED)
        }
        Reprioritize::Unknown => {
            eprintln!("fleetctl: no task `{id}`");
            ExitCode::from(EXIT_NOT_FOUND)
        }
    })
}

/// Prints the queues with run-time settings or placed tasks waiting (or just `name`).
pub(crate) async fn show_queues(
    store: &Store,
    name: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let settings = store.queue_settings().await?;
    let mut names: std::collections::BTreeSet<String> = settings.keys().cloned().collect();
    names.extend(store.waiting_queues().await?);
    if let Some(name) = name {
        names = [name.to_string()].into();
    }
    let mut rows = Vec::new();
    for queue in names {
        let waiting = store.waiting_count(&queue).await?;
        rows.push((queue.clone(), settings.get(&queue).copied(), waiting));
    }
    if json {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|(queue, settings, waiting)| {
                serde_json::json!({"queue": queue, "runtime_settings": settings, "waiting_for_placement": waiting})
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<24} {:<9} {:<9} {:>20} {:>8}",
        "queue", "strategy", "placement", "placement_timeout", "waiting"
    );
    for (queue, settings, waiting) in rows {
        match settings {
            Some(s) => println!(
                "{:<24} {:<9} {:<9} {:>20} {:>8}",
                queue,
                s.strategy.as_str(),
                s.placement.as_str(),
                s.placement_timeout_ms
                    .map_or("none".to_string(), |ms| format!("{ms} ms")),
                waiting
            ),
            None => println!(
                "{queue:<24} {:<41} {waiting:>8}",
                "(the schedulers' settings file)"
            ),
        }
    }
    Ok(())
}

/// Stores a queue's run-time settings, or drops them (`None`).
pub(crate) async fn set_queue(
    store: &Store,
    name: &str,
    settings: Option<QueueSettings>,
) -> anyhow::Result<()> {
    store.set_queue_settings(name, settings.as_ref()).await?;
    match settings {
        Some(s) => println!(
            "queue {name}: strategy {}, placement {}{} (applied within about a second)",
            s.strategy.as_str(),
            s.placement.as_str(),
            s.placement_timeout_ms
                .map_or(String::new(), |ms| format!(", placement timeout {ms} ms"))
        ),
        None => println!(
            "queue {name}: run-time settings dropped; the schedulers' settings file applies"
        ),
    }
    Ok(())
}
