//! `fleetctl limits`: the flow limits in force with their use, set and deleted at run time
//! (stored in Redis; every scheduler applies a change within about a second).

use fleet_common::flow::{Limit, Scope};
use fleet_common::store::Store;

/// Prints every limit with its use now.
pub(crate) async fn list(store: &Store, json: bool) -> anyhow::Result<()> {
    let limits = store.limits().await?;
    let views = store.limit_views(&limits).await?;
    if json {
        println!("{}", serde_json::json!({ "limits": views }));
        return Ok(());
    }
    if views.is_empty() {
        println!("no limits (set one with `fleetctl limits set SCOPE NAME ...`)");
        return Ok(());
    }
    println!(
        "{:<7} {:<28} {:<44} {:>8} {:>8} {:>8} {:>7}",
        "SCOPE", "NAME", "LIMIT", "RUNNING", "WAITING", "BLOCKED", "TOKENS"
    );
    for v in views {
        println!(
            "{:<7} {:<28} {:<44} {:>8} {:>8} {:>8} {:>7}",
            v.scope.as_str(),
            v.name,
            v.inherited_max_running.map_or_else(
                || v.limit.describe(),
                |max| format!("max_running {max} (its queue's key_max_running)")
            ),
            v.running,
            v.waiting,
            v.blocked,
            v.tokens.map_or("-".to_string(), |t| format!("{t:.1}")),
        );
    }
    Ok(())
}

/// Sets (replaces) a limit, checked first.
pub(crate) async fn set(
    store: &Store,
    scope: Scope,
    name: &str,
    limit: Limit,
) -> anyhow::Result<()> {
    limit
        .validate(scope, name)
        .map_err(|err| anyhow::anyhow!("{} limit {name}: {err}", scope.as_str()))?;
    store.set_limit(scope, name, Some(&limit)).await?;
    println!(
        "{} limit {name}: {} (applied within about a second)",
        scope.as_str(),
        limit.describe()
    );
    Ok(())
}

/// Deletes a limit; an unknown one is an error.
pub(crate) async fn delete(store: &Store, scope: Scope, name: &str) -> anyhow::Result<()> {
    if !store.set_limit(scope, name, None).await? {
        anyhow::bail!("no {} limit {name}", scope.as_str());
    }
    println!(
        "{} limit {name} deleted; tasks waiting for it go on within about a second",
        scope.as_str()
    );
    Ok(())
}
