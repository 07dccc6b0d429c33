//! `fleetctl`: operate a Fleet from the command line.

mod control;
mod demo;
mod health;
mod inspect;
mod limits;
mod schedule;
mod submit;
mod workflow;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_common::Priority;
use fleet_common::flow::{Limit, Scope};
use fleet_common::placement::{Policy, QueueSettings, Strategy};
use fleet_common::settings::{self, CommonSettings};
use fleet_common::store::{self, Store};
use fleet_common::task::State;

#[derive(Debug, Parser)]
#[command(
    name = "fleetctl",
    version,
    about = "Operate a Fleet: submit and inspect tasks, topics, health."
)]
struct Cli {
    /// TOML settings file; `FLEET__SECTION__KEY` variables override it.
    #[arg(long, global = true, value_name = "PATH", env = "FLEET_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage Fleet's Kafka topics.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Check that the broker and Redis answer, and show what they hold.
    Ping {
        /// Keep trying for this many seconds before giving up.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3600))]
        wait: u64,
    },
    /// Ask a Fleet service's health endpoint (a container HEALTHCHECK): exit 0 when it answers
    /// 200, 1 otherwise. Defaults to `/readyz` on the port of `http.listen`.
    Probe {
        /// The URL to ask (plain http).
        #[arg(long)]
        url: Option<String>,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        timeout_ms: u64,
    },
    /// Submit one task from flags, or many from a file of JSON lines (`-` for stdin). Prints
    /// the id of each task.
    Submit {
        /// Task kind (with flags).
        #[arg(long, conflicts_with = "file", required_unless_present = "file")]
        kind: Option<String>,
        /// Payload JSON (with --kind).
        #[arg(long, requires = "kind")]
        payload: Option<String>,
        #[arg(long, requires = "kind", default_value = "normal")]
        priority: Priority,
        #[arg(long, requires = "kind")]
        id: Option<String>,
        #[arg(long, requires = "kind")]
        queue: Option<String>,
        #[arg(long, requires = "kind")]
        key: Option<String>,
        /// Run after this task ended (repeatable): `depends_on`.
        #[arg(long, requires = "kind", value_name = "ID")]
        after: Vec<String>,
        /// The workflow it belongs to.
        #[arg(long, requires = "kind")]
        workflow: Option<String>,
        /// JSON lines, one task per line; `-` reads stdin. Tasks with `depends_on` are sent
        /// together as one batch record, accepted whole or refused whole.
        #[arg(long, value_name = "PATH")]
        file: Option<String>,
    },
    /// Show a workflow: every task, its state and parents (`--cancel`: cancel every task of it
    /// not yet ended).
    Workflow {
        id: String,
        #[arg(long)]
        json: bool,
        #[arg(long, conflicts_with = "json")]
        cancel: bool,
    },
    /// Cron and interval schedules: add, list, show, pause, resume, delete, run-now.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// List the workflows with tasks not yet ended.
    Workflows {
        #[arg(long)]
        json: bool,
    },
    /// Show one task.
    Status {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Follow one task until it ends (exit 0 succeeded, 4 failed or cancelled).
    Watch {
        id: String,
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
        interval_ms: u64,
    },
    /// List tasks, newest first; filters combine. Prints the cursor of the next page.
    List {
        #[arg(long)]
        state: Option<State>,
        #[arg(long)]
        queue: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        priority: Option<Priority>,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1000))]
        limit: u64,
        /// `next` cursor printed by the previous page.
        #[arg(long)]
        cursor: Option<store::Cursor>,
        #[arg(long)]
        json: bool,
    },
    /// Cancel tasks: waiting ones at once, running ones are stopped (exit 4 if one had ended,
    /// 1 if one is unknown).
    Cancel {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Run failed tasks again with a fresh attempt budget: the given ids, or every failed task
    /// of `--kind` and/or `--queue`, or `--all-failed`.
    #[command(alias = "retry")]
    Redrive {
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        kind: Option<String>,
        #[arg(long, conflicts_with = "ids")]
        queue: Option<String>,
        #[arg(long, conflicts_with_all = ["ids", "kind", "queue"])]
        all_failed: bool,
    },
    /// Pause a queue or a priority: workers hold its tasks; running ones finish.
    Pause(SelectorArgs),
    /// Resume a queue or a priority and publish the tasks held meanwhile.
    Resume(SelectorArgs),
    /// Move a task that has not started to another priority.
    SetPriority { id: String, priority: Priority },
    /// Tasks per state, per queue and per priority; throughput; pauses; consumer lag.
    Stats {
        /// Consumer group whose lag is shown.
        #[arg(long, default_value = "fleet-workers")]
        group: String,
        #[arg(long)]
        json: bool,
    },
    /// Show or change queues' scheduling settings at run time (strategy, placement policy,
    /// placement timeout).
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Show, set or delete flow limits (concurrency per key, queue, kind or tenant; rate per
    /// key; tenant quotas and weights) at run time.
    #[command(subcommand)]
    Limits(LimitsCommand),
    /// Live workers, from their heartbeats.
    Workers {
        #[arg(long)]
        json: bool,
    },
    /// Submit a mixed demo workload, show live progress and a summary.
    Demo {
        #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        tasks: u64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
}

/// What `pause` and `resume` act on: one queue or one priority.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct SelectorArgs {
    #[arg(long, value_parser = queue_name)]
    queue: Option<String>,
    #[arg(long)]
    priority: Option<Priority>,
}

impl SelectorArgs {
    fn selector(self) -> store::Selector {
        match (self.queue, self.priority) {
            (Some(queue), _) => store::Selector::Queue(queue),
            (None, Some(priority)) => store::Selector::Priority(priority),
            (None, None) => unreachable!("clap requires one"),
        }
    }
}

/// A queue name as tasks may carry it (clap's value parser: a bad one is a usage error).
fn queue_name(text: &str) -> Result<String, String> {
    fleet_common::task::check_queue(text)
        .map(|()| text.to_string())
        .map_err(|err| err.to_string())
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// Each queue's run-time settings and how many placed tasks wait in it.
    Show {
        #[arg(value_parser = queue_name)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Set a queue's settings (options left out take their defaults); every scheduler applies
    /// them within about a second.
    Set {
        #[arg(value_parser = queue_name)]
        name: String,
        /// fifo, sjf or fair.
        #[arg(long, default_value = "fifo")]
        strategy: Strategy,
        /// spread, pack, weighted or random.
        #[arg(long, default_value = "spread")]
        placement: Policy,
        /// Fail the queue's placed tasks that wait longer for a worker that fits.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=31_536_000_000))]
        placement_timeout_ms: Option<u64>,
    },
    /// Drop a queue's run-time settings: the schedulers' settings file applies again.
    Reset {
        #[arg(value_parser = queue_name)]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum LimitsCommand {
    /// Every limit with its use: running, waiting, blocked in its wait list, tokens.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Set (replace) a limit. Scope queue: --max-running, --max-waiting, --key-max-running;
    /// key and kind: --max-running; rate: --limit, --period-ms, --burst; tenant (name `*` for
    /// every tenant without one): --max-running, --max-waiting, --weight.
    Set {
        /// queue, key, kind, rate or tenant.
        scope: Scope,
        name: String,
        #[arg(long)]
        max_running: Option<u64>,
        #[arg(long)]
        max_waiting: Option<u64>,
        #[arg(long)]
        key_max_running: Option<u64>,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        period_ms: Option<u64>,
        #[arg(long)]
        burst: Option<u32>,
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Delete a limit.
    Delete { scope: Scope, name: String },
}

#[derive(Debug, Subcommand)]
enum ScheduleCommand {
    /// Create or replace a schedule, e.g. `add nightly --cron "0 2 * * *" --tz Europe/Berlin
    /// --task '{"kind":"report"}'`; prints its next occurrences.
    Add(schedule::AddArgs),
    /// Every schedule and its next occurrence.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One schedule and its next 5 occurrences.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop firing until resumed.
    Pause { name: String },
    /// Fire again, from the next occurrence after now.
    Resume { name: String },
    /// Delete it (the tasks it fired stay).
    Delete { name: String },
    /// Submit its task now, once more.
    RunNow { name: String },
}

#[derive(Debug, Subcommand)]
enum TopicsCommand {
    /// Create every Fleet topic that does not exist yet (submit, `tasks.<priority>`, rejected,
    /// dead). Existing topics are left alone.
    Create {
        /// Partitions per topic (default: `topics.partitions`).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1024))]
        partitions: Option<i32>,
    },
}

/// Exit codes scripts can rely on: 0 done, 1 not found, 2 bad settings or input, 3 a
/// dependency did not answer, 4 the task ended otherwise than asked (failed, cancelled, or
/// already ended).
pub(crate) const EXIT_NOT_FOUND: u8 = 1;
pub(crate) const EXIT_BAD_INPUT: u8 = 2;
const EXIT_UNAVAILABLE: u8 = 3;
const EXIT_ENDED: u8 = 4;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings: CommonSettings = match settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("fleetctl: {err}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    match run(cli.command, &settings).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("fleetctl: {err:#}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

async fn connect(settings: &CommonSettings) -> anyhow::Result<Store> {
    let mut conn = store::connect(&settings.redis).await.with_context(|| {
        format!(
            "Redis at {}",
            settings::redact_url(settings.redis.url.expose())
        )
    })?;
    let keys = store::Keys::new(&settings.redis.key_prefix);
    store::check_schema_current(&mut conn, &keys, "fleetctl").await?;
    Ok(Store::new(conn, keys, &settings.tasks))
}

async fn run(command: Command, settings: &CommonSettings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Topics(TopicsCommand::Create { partitions }) => {
            health::create_topics(settings, partitions.unwrap_or(settings.topics.partitions))
                .await?;
        }
        Command::Ping { wait } => health::ping(settings, Duration::from_secs(wait)).await?,
        Command::Probe { url, timeout_ms } => {
            let url =
                match url.map_or_else(|| health::local_url(&settings.http.listen, "/readyz"), Ok) {
                    Ok(url) => url,
                    Err(err) => {
                        eprintln!("fleetctl probe: {err:#}");
                        return Ok(ExitCode::from(EXIT_BAD_INPUT));
                    }
                };
            return health::probe(&url, Duration::from_millis(timeout_ms)).await;
        }
        Command::Submit {
            kind,
            payload,
            priority,
            id,
            queue,
            key,
            after,
            workflow,
            file,
        } => {
            let max = settings.tasks.max_task_bytes;
            let submissions = match (kind, file) {
                (Some(kind), _) => {
                    let payload: serde_json::Value = match payload {
                        Some(text) => match serde_json::from_str(&text) {
                            Ok(v) => v,
                            Err(err) => {
                                eprintln!("fleetctl: --payload is not valid JSON: {err}");
                                return Ok(ExitCode::from(EXIT_BAD_INPUT));
                            }
                        },
                        None => serde_json::Value::Null,
                    };
                    let mut body = serde_json::json!({ "kind": kind, "priority": priority, "payload": payload });
                    for (name, value) in [
                        ("id", id),
                        ("queue", queue),
                        ("key", key),
                        ("workflow", workflow),
                    ] {
                        if let Some(value) = value {
                            body[name] = serde_json::Value::String(value);
                        }
                    }
                    if !after.is_empty() {
                        body["depends_on"] = serde_json::json!(after);
                    }
                    vec![submit::prepare(&body.to_string(), max)]
                }
                (None, Some(path)) => match submit::read_lines(&path, max) {
                    Ok(lines) => lines.into_iter().map(Ok).collect(),
                    Err(err) => vec![Err(err)],
                },
                (None, None) => unreachable!("clap requires --kind or --file"),
            };
            if submissions.is_empty() {
                eprintln!("fleetctl: no task to submit: the input has no JSON lines");
                return Ok(ExitCode::from(EXIT_BAD_INPUT));
            }
            let mut ready = Vec::with_capacity(submissions.len());
            for submission in submissions {
                match submission {
                    Ok(s) => ready.push(s),
                    Err(err) => {
                        eprintln!("fleetctl: invalid task: {err:#}");
                        return Ok(ExitCode::from(EXIT_BAD_INPUT));
                    }
                }
            }
            let as_batch = match submit::check_dependencies(&ready, settings) {
                Ok(as_batch) => as_batch,
                Err(err) => {
                    eprintln!("fleetctl: invalid task: {err:#}");
                    return Ok(ExitCode::from(EXIT_BAD_INPUT));
                }
            };
            submit::publish(settings, &ready, as_batch).await?;
            for (id, _) in &ready {
                println!("{id}");
            }
        }
        Command::Workflow { id, json, cancel } => {
            let store = connect(settings).await?;
            if cancel {
                return workflow::cancel(&store, &id).await;
            }
            if !workflow::show(&store, &id, json).await? {
                eprintln!("fleetctl: no workflow `{id}`");
                return Ok(ExitCode::from(EXIT_NOT_FOUND));
            }
        }
        Command::Schedule(command) => {
            let store = connect(settings).await?;
            return match command {
                ScheduleCommand::Add(args) => schedule::add(&store, settings, args).await,
                ScheduleCommand::List { json } => {
                    schedule::list(&store, json).await?;
                    Ok(ExitCode::SUCCESS)
                }
                ScheduleCommand::Show { name, json } => schedule::show(&store, &name, json).await,
                ScheduleCommand::Pause { name } => schedule::pause(&store, &name, true).await,
                ScheduleCommand::Resume { name } => schedule::pause(&store, &name, false).await,
                ScheduleCommand::Delete { name } => schedule::delete(&store, &name).await,
                ScheduleCommand::RunNow { name } => {
                    schedule::run_now(&store, settings, &name).await
                }
            };
        }
        Command::Workflows { json } => workflow::list(&connect(settings).await?, json).await?,
        Command::Status { id, json } => {
            if !inspect::status(&connect(settings).await?, &id, json).await? {
                eprintln!("fleetctl: no task `{id}`");
                return Ok(ExitCode::from(EXIT_NOT_FOUND));
            }
        }
        Command::Stats { group, json } => {
            inspect::stats(settings, &connect(settings).await?, &group, json).await?;
        }
        Command::Watch { id, interval_ms } => {
            let store = connect(settings).await?;
            return inspect::watch(&store, &id, Duration::from_millis(interval_ms)).await;
        }
        Command::List {
            state,
            queue,
            kind,
            priority,
            limit,
            cursor,
            json,
        } => {
            let filter = store::TaskFilter {
                state,
                queue,
                kind,
                priority,
            };
            let store = connect(settings).await?;
            inspect::list(&store, &filter, cursor, limit as usize, json).await?;
        }
        Command::Queue(QueueCommand::Show { name, json }) => {
            control::show_queues(&connect(settings).await?, name.as_deref(), json).await?;
        }
        Command::Queue(QueueCommand::Set {
            name,
            strategy,
            placement,
            placement_timeout_ms,
        }) => {
            let queue = QueueSettings {
                strategy,
                placement,
                placement_timeout_ms,
            };
            control::set_queue(&connect(settings).await?, &name, Some(queue)).await?;
        }
        Command::Queue(QueueCommand::Reset { name }) => {
            control::set_queue(&connect(settings).await?, &name, None).await?;
        }
        Command::Limits(LimitsCommand::List { json }) => {
            limits::list(&connect(settings).await?, json).await?;
        }
        Command::Limits(LimitsCommand::Set {
            scope,
            name,
            max_running,
            max_waiting,
            key_max_running,
            limit,
            period_ms,
            burst,
            weight,
        }) => {
            let limit = Limit {
                max_running,
                max_waiting,
                key_max_running,
                limit,
                period_ms,
                burst,
                weight,
            };
            limits::set(&connect(settings).await?, scope, &name, limit).await?;
        }
        Command::Limits(LimitsCommand::Delete { scope, name }) => {
            limits::delete(&connect(settings).await?, scope, &name).await?;
        }
        Command::Workers { json } => {
            inspect::workers(&connect(settings).await?, settings.lease.lease_ms, json).await?;
        }
        Command::Cancel { ids } => return control::cancel(&connect(settings).await?, &ids).await,
        Command::Redrive {
            ids,
            kind,
            queue,
            all_failed,
        } => {
            let store = connect(settings).await?;
            return control::redrive(&store, &ids, kind, queue, all_failed).await;
        }
        Command::Pause(args) => control::pause(&connect(settings).await?, args.selector()).await?,
        Command::Resume(args) => {
            control::resume(&connect(settings).await?, args.selector()).await?;
        }
        Command::SetPriority { id, priority } => {
            return control::set_priority(&connect(settings).await?, &id, priority).await;
        }
        Command::Demo { tasks, timeout } => {
            demo::run(
                settings,
                &connect(settings).await?,
                tasks as usize,
                Duration::from_secs(timeout),
            )
            .await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
