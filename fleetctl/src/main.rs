//! `fleetctl`: operate a Fleet from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_common::settings::{self, CommonSettings};
use fleet_common::{Topics, kafka, store};

#[derive(Debug, Parser)]
#[command(
    name = "fleetctl",
    version,
    about = "Operate a Fleet: topics, health, tasks."
)]
struct Cli {
    /// TOML settings file; `FLEET__SECTION__KEY` variables override it.
    #[arg(long, global = true, value_name = "PATH")]
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

/// Exit codes scripts can rely on.
const EXIT_UNAVAILABLE: u8 = 3;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings: CommonSettings = match settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("fleetctl: {err}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Topics(TopicsCommand::Create { partitions }) => {
            create_topics(&settings, partitions.unwrap_or(settings.topics.partitions)).await
        }
        Command::Ping { wait } => ping(&settings, Duration::from_secs(wait)).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fleetctl: {err:#}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

async fn create_topics(settings: &CommonSettings, partitions: i32) -> anyhow::Result<()> {
    let names = Topics::from_settings(&settings.topics).all();
    let statuses = kafka::ensure_topics(
        &settings.kafka,
        &names,
        partitions,
        settings.topics.replication_factor,
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
    let mut conn = store::connect(&settings.redis).await.with_context(|| {
        format!(
            "Redis at {}",
            settings::redact_url(settings.redis.url.expose())
        )
    })?;
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
    let keys = store::Keys::new(&settings.redis.key_prefix);
    let schema: Option<String> = redis::cmd("HGET")
        .arg(keys.schema())
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
