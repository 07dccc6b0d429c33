//! `fleet-scheduler`: validates submitted tasks and routes them onto the priority topics.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fleet_common::cli::ServiceArgs;
use fleet_common::shutdown::{self, Outcome, Supervisor};
use fleet_common::{Topics, kafka, store, telemetry};
use fleet_scheduler::settings::SchedulerSettings;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Debug, Parser)]
#[command(name = "fleet-scheduler", version, about)]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings: SchedulerSettings = match cli.service.load() {
        Ok(s) => s,
        Err(err) => {
            eprintln!("fleet-scheduler: {err}");
            return ExitCode::from(2);
        }
    };
    if cli.service.check_config {
        println!("{settings:#?}");
        return ExitCode::SUCCESS;
    }
    if let Err(err) = telemetry::init(&settings.log) {
        eprintln!("fleet-scheduler: invalid log settings: {err}");
        return ExitCode::from(2);
    }
    match run(settings).await {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::Unclean) => ExitCode::FAILURE,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "Scheduler failed to start.");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: SchedulerSettings) -> anyhow::Result<Outcome> {
    let mut conn = store::connect(&settings.redis)
        .await
        .context("connecting to Redis")?;
    let keys = store::Keys::new(&settings.redis.key_prefix);
    store::check_schema(&mut conn, &keys, "fleet-scheduler")
        .await
        .context("checking the Redis schema")?;
    let topics = Topics::from_settings(&settings.topics);
    kafka::ensure_topics(
        &settings.kafka,
        &topics.all(),
        settings.topics.partitions,
        settings.topics.replication_factor,
        Duration::from_secs(15),
    )
    .await
    .context("creating topics")?;

    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone()).context("installing signal handlers")?;
    let supervisor = Supervisor::new(token);
    info!(brokers = %settings.kafka.brokers, "Scheduler started.");
    let outcome = supervisor.run(settings.scheduler.shutdown_grace()).await;
    info!(?outcome, "Scheduler stopped.");
    Ok(outcome)
}
