//! `fleetctl schedule …`: cron and interval schedules, stored in Redis and fired by the
//! schedulers (see [`fleet_common::schedule`]).

use std::process::ExitCode;

use anyhow::Context;
use fleet_common::schedule::{self, Misfire, Schedule};
use fleet_common::settings::CommonSettings;
use fleet_common::store::Store;
use serde_json::json;

use crate::{EXIT_BAD_INPUT, EXIT_NOT_FOUND};

/// What `schedule add` was given.
#[derive(Debug, clap::Args)]
pub(crate) struct AddArgs {
    pub name: String,
    /// A cron expression: 5 fields, or 6 with seconds first.
    #[arg(
        long,
        conflicts_with = "every_ms",
        required_unless_present = "every_ms"
    )]
    pub cron: Option<String>,
    /// Or a fixed interval in ms (at least 1000), counted from the schedule's creation.
    #[arg(long)]
    pub every_ms: Option<u64>,
    /// IANA time zone of the cron expression.
    #[arg(long, default_value = "UTC")]
    pub tz: String,
    /// The task submitted at each occurrence (JSON, without `id`).
    #[arg(long)]
    pub task: String,
    /// skip, run_once or catch_up: what to fire for occurrences missed while no scheduler ran.
    #[arg(long, default_value = "run_once", value_parser = parse_misfire)]
    pub misfire: Misfire,
    #[arg(long, default_value_t = 10)]
    pub catch_up_max: u32,
    #[arg(long, default_value_t = schedule::DEFAULT_GRACE_MS)]
    pub misfire_grace_ms: u64,
    /// Each firing's task waits a random 0..jitter_ms.
    #[arg(long, default_value_t = 0)]
    pub jitter_ms: u64,
    /// Store it paused.
    #[arg(long)]
    pub paused: bool,
}

fn parse_misfire(text: &str) -> Result<Misfire, String> {
    serde_json::from_value(json!(text))
        .map_err(|_| format!("`{text}` is not skip, run_once or catch_up"))
}

/// `schedule add`: creates or replaces a schedule; prints it with its next occurrences.
pub(crate) async fn add(
    store: &Store,
    settings: &CommonSettings,
    args: AddArgs,
) -> anyhow::Result<ExitCode> {
    let task: serde_json::Value = match serde_json::from_str(&args.task) {
        Ok(task) => task,
        Err(err) => {
            eprintln!("fleetctl: --task is not JSON: {err}");
            return Ok(ExitCode::from(EXIT_BAD_INPUT));
        }
    };
    let body = json!({
        "cron": args.cron, "every_ms": args.every_ms, "tz": args.tz, "task": task,
        "misfire": args.misfire, "catch_up_max": args.catch_up_max,
        "misfire_grace_ms": args.misfire_grace_ms, "jitter_ms": args.jitter_ms,
        "paused": args.paused,
    });
    let mut body = body;
    for field in ["cron", "every_ms"] {
        if body[field].is_null() {
            body.as_object_mut().map(|o| o.remove(field));
        }
    }
    let parsed = schedule::check_name(&args.name).and_then(|()| {
        Schedule::parse(
            &args.name,
            body.to_string().as_bytes(),
            settings.tasks.max_task_bytes,
        )
    });
    let schedule = match parsed {
        Ok(schedule) => schedule,
        Err(err) => {
            eprintln!("fleetctl: invalid schedule: {err}");
            return Ok(ExitCode::from(EXIT_BAD_INPUT));
        }
    };
    let existed = store.put_schedule(schedule).await?;
    println!(
        "{} {}",
        if existed { "replaced" } else { "added" },
        args.name
    );
    show(store, &args.name, false).await
}

/// `schedule show`: the definition and the next 5 occurrences.
pub(crate) async fn show(store: &Store, name: &str, json_out: bool) -> anyhow::Result<ExitCode> {
    let Some(stored) = store.schedule(name).await? else {
        eprintln!("fleetctl: no schedule `{name}`");
        return Ok(ExitCode::from(EXIT_NOT_FOUND));
    };
    let now = store.redis_time_ms().await?;
    let view = schedule::view(&stored.schedule, stored.next_ms, now, 5);
    if json_out {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(ExitCode::SUCCESS);
    }
    let s = &stored.schedule;
    let timing = match (&s.cron, s.every_ms) {
        (Some(cron), _) => format!("cron `{cron}` in {}", s.tz),
        (_, Some(every)) => format!("every {every} ms"),
        _ => String::new(),
    };
    println!(
        "schedule {name}: {timing}{}",
        if s.paused { " (paused)" } else { "" }
    );
    println!("  task: {}", s.task.get());
    println!(
        "  misfire: {} (grace {} ms, catch up at most {}), jitter {} ms",
        serde_json::to_value(s.misfire)?
            .as_str()
            .unwrap_or_default(),
        s.misfire_grace_ms,
        s.catch_up_max,
        s.jitter_ms
    );
    for next in view["next"].as_array().into_iter().flatten() {
        println!("  next: {}", next["at"].as_str().unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}

/// `schedule list`: a line per schedule with its next occurrence.
pub(crate) async fn list(store: &Store, json_out: bool) -> anyhow::Result<()> {
    let now = store.redis_time_ms().await?;
    let all = store.schedules().await?;
    if json_out {
        let views: Vec<_> = all
            .iter()
            .map(|s| schedule::view(&s.schedule, s.next_ms, now, 1))
            .collect();
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no schedules");
    }
    for stored in &all {
        let s = &stored.schedule;
        let timing = s
            .cron
            .clone()
            .map(|c| format!("{c} ({})", s.tz))
            .or(s.every_ms.map(|e| format!("every {e} ms")))
            .unwrap_or_default();
        let next = match stored.next_ms {
            _ if s.paused => "paused".to_string(),
            Some(ms) => format!("next {}", schedule::local_time(s, ms)),
            None => "no next occurrence".to_string(),
        };
        println!("{}  {timing}  {next}", s.name);
    }
    Ok(())
}

/// `schedule pause|resume`.
pub(crate) async fn pause(store: &Store, name: &str, paused: bool) -> anyhow::Result<ExitCode> {
    if !store.pause_schedule(name, paused).await? {
        eprintln!("fleetctl: no schedule `{name}`");
        return Ok(ExitCode::from(EXIT_NOT_FOUND));
    }
    println!("{} {name}", if paused { "paused" } else { "resumed" });
    Ok(ExitCode::SUCCESS)
}

/// `schedule delete`.
pub(crate) async fn delete(store: &Store, name: &str) -> anyhow::Result<ExitCode> {
    if !store.delete_schedule(name).await? {
        eprintln!("fleetctl: no schedule `{name}`");
        return Ok(ExitCode::from(EXIT_NOT_FOUND));
    }
    println!("deleted {name}");
    Ok(ExitCode::SUCCESS)
}

/// `schedule run-now`: submits the schedule's task once more, now, through the submit topic
/// (id `<name>:run-<ms>`); prints its id.
pub(crate) async fn run_now(
    store: &Store,
    settings: &CommonSettings,
    name: &str,
) -> anyhow::Result<ExitCode> {
    let Some(stored) = store.schedule(name).await? else {
        eprintln!("fleetctl: no schedule `{name}`");
        return Ok(ExitCode::from(EXIT_NOT_FOUND));
    };
    let now = store.redis_time_ms().await?;
    let id = format!("{name}:run-{now}");
    let mut task: serde_json::Value =
        serde_json::from_str(stored.schedule.task.get()).context("the stored task")?;
    task["id"] = json!(id);
    crate::submit::publish(settings, &[(id.clone(), task.to_string())], false).await?;
    println!("{id}");
    Ok(ExitCode::SUCCESS)
}
