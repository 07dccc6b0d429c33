//! `fleetctl`: operate a Fleet from the command line.

mod demo;
mod inspect;
mod submit;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_common::settings::{self, CommonSettings};
use fleet_common::store::{self, Store};
use fleet_common::{Priority, Topics, kafka};

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
        /// JSON lines, one task per line; `-` reads stdin.
        #[arg(long, value_name = "PATH")]
        file: Option<String>,
    },
    /// Show one task.
    Status {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Count tasks by state.
    Stats {
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

#[derive(Debug, Subcommand)]
enum TopicsCommand {
    /// Create every Fleet topic that does not exist yet (submit, tasks.<priority>, rejected,
    /// dead). Existing topics are left alone.
    Create {
        /// Partitions per topic (default: `topics.partitions`).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1024))]
        partitions: Option<i32>,
    },
}

/// Exit codes scripts can rely on: 0 done, 1 not found, 2 bad settings or input, 3 a
/// dependency did not answer.
const EXIT_NOT_FOUND: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;
const EXIT_UNAVAILABLE: u8 = 3;

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
    let conn = store::connect(&settings.redis).await.with_context(|| {
        format!(
            "Redis at {}",
            settings::redact_url(settings.redis.url.expose())
        )
    })?;
    Ok(Store::new(
        conn,
        store::Keys::new(&settings.redis.key_prefix),
        &settings.tasks,
    ))
}

async fn run(command: Command, settings: &CommonSettings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Topics(TopicsCommand::Create { partitions }) => {
            create_topics(settings, partitions.unwrap_or(settings.topics.partitions)).await?;
        }
        Command::Ping { wait } => ping(settings, Duration::from_secs(wait)).await?,
        Command::Submit {
            kind,
            payload,
            priority,
            id,
            queue,
            key,
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
                    for (name, value) in [("id", id), ("queue", queue), ("key", key)] {
                        if let Some(value) = value {
                            body[name] = serde_json::Value::String(value);
                        }
                    }
                    vec![submit::prepare(&body.to_string(), max)]
                }
                (None, Some(path)) => match submit::read_lines(&path, max) {
                    Ok(lines) => lines.into_iter().map(Ok).collect(),
                    Err(err) => vec![Err(err)],
                },
                (None, None) => unreachable!("clap requires --kind or --file"),
            };
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
            submit::publish(settings, &ready).await?;
            for (id, _) in &ready {
                println!("{id}");
            }
        }
        Command::Status { id, json } => {
            if !inspect::status(&connect(settings).await?, &id, json).await? {
                eprintln!("fleetctl: no task `{id}`");
                return Ok(ExitCode::from(EXIT_NOT_FOUND));
            }
        }
        Command::Stats { json } => inspect::stats(&connect(settings).await?, json).await?,
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

async fn create_topics(settings: &CommonSettings, partitions: i32) -> anyhow::Result<()> {
    let names = Topics::from_settings(&settings.topics).all();
    let statuses = kafka::ensure_topics(
        &settings.kafka,
        &names,
        partitions,
        settings.topics.replication_factor,
        fleet_common::message_size::record_limit(settings.tasks.max_task_bytes),
        Duration::from_secs(15),
    )
    .await
    .with_context(|| format!("creating topics on {}", settings.kafka.brokers))?;
    for status in statuses {
        let what = if status.created { "created" } else { "exists " };
        let note = if !status.created && status.partitions != partitions as usize {
            format!(" (wanted {partitions}; partitions of an existing topic are not changed)")
        } else {
            String::new()
        };
        println!(
            "{what} {:<40} {} partitions{note}",
            status.name, status.partitions
        );
    }
    Ok(())
}

async fn ping(settings: &CommonSettings, wait: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        match ping_once(settings).await {
            Ok(report) => {
                println!("{report}");
                return Ok(());
            }
            Err(err) if start.elapsed() >= wait => return Err(err),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

async fn ping_once(settings: &CommonSettings) -> anyhow::Result<String> {
    let store = connect(settings).await?;
    let mut conn = store.conn();
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    let schema: Option<String> = redis::cmd("HGET")
        .arg(store.keys().schema())
        .arg("version")
        .query_async(&mut conn)
        .await?;

    let brokers = settings.kafka.brokers.clone();
    let config = kafka::producer_config(&settings.kafka, "fleetctl");
    let wanted = Topics::from_settings(&settings.topics).all();
    let topics = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(String, usize)>> {
        use rdkafka::producer::{BaseProducer, Producer};
        let producer: BaseProducer = config.create()?;
        let metadata = producer
            .client()
            .fetch_metadata(None, Duration::from_secs(5))?;
        Ok(wanted
            .into_iter()
            .map(|name| {
                let partitions = metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == name)
                    .map_or(0, |t| t.partitions().len());
                (name, partitions)
            })
            .collect())
    })
    .await?
    .with_context(|| format!("Kafka at {brokers}"))?;

    let mut report = format!(
        "redis   {} (version {version}, schema {})\nkafka   {brokers}\n",
        settings::redact_url(settings.redis.url.expose()),
        schema.as_deref().unwrap_or("not yet recorded"),
    );
    for (name, partitions) in topics {
        let state = if partitions == 0 {
            "missing".to_string()
        } else {
            format!("{partitions} partitions")
        };
        report.push_str(&format!("  topic {name:<40} {state}\n"));
    }
    Ok(report.trim_end().to_string())
}
