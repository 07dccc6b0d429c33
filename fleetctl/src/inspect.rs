//! `fleetctl status` and `fleetctl stats`: read task state straight from Redis.

use std::collections::BTreeMap;

use fleet_common::store::Store;

/// Prints one task, human-readable or as JSON. Returns false if there is no such task.
pub async fn status(store: &Store, id: &str, json: bool) -> anyhow::Result<bool> {
    let Some(fields) = store.task(id).await? else {
        return Ok(false);
    };
    let fields: BTreeMap<String, String> = fields.into_iter().collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&fields)?);
        return Ok(true);
    }
    for (name, value) in &fields {
        let shown = if value.len() > 200 {
            format!(
                "{}… ({} bytes)",
                &value[..value.floor_char_boundary(200)],
                value.len()
            )
        } else {
            value.clone()
        };
        println!("{name:<16} {shown}");
    }
    Ok(true)
}

/// Prints how many tasks are in each state, what is paused (and how many tasks that holds), and
/// the fleet-wide counters.
pub async fn stats(store: &Store, json: bool) -> anyhow::Result<()> {
    let counts = store.counts().await?;
    let counters: BTreeMap<String, u64> = store.counters().await?.into_iter().collect();
    let paused: Vec<String> = store.paused().await?.iter().map(|p| p.member()).collect();
    let held = store.held_count().await?;
    if json {
        let states: BTreeMap<&str, u64> = counts.iter().map(|(s, n)| (s.as_str(), *n)).collect();
        println!(
            "{}",
            serde_json::json!({ "states": states, "counters": counters, "paused": paused, "held": held })
        );
    } else {
        for (state, n) in counts {
            println!("{:<10} {n}", state.as_str());
        }
        if !paused.is_empty() || held > 0 {
            println!("paused     {} ({held} tasks held)", paused.join(", "));
        }
        for (name, n) in counters {
            println!("{name:<10} {n}  (total)");
        }
    }
    Ok(())
}
