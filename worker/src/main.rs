//! `fleet-worker`: consumes the priority topics and runs task handlers.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use fleet_common::cli::ServiceArgs;
use fleet_common::shutdown::{self, Outcome, Supervisor};
use fleet_common::{store, telemetry};
use fleet_worker::settings::WorkerSettings;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Debug, Parser)]
#[command(name = "fleet-worker", version, about)]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings: WorkerSettings = match cli.service.load() {
        Ok(s) => s,
        Err(err) => {
            eprintln!("fleet-worker: {err}");
            return ExitCode::from(2);
        }
    };
    if cli.service.check_config {
        println!("{settings:#?}");
        return ExitCode::SUCCESS;
    }
    if let Err(err) = telemetry::init(&settings.log) {
        eprintln!("fleet-worker: invalid log settings: {err}");
        return ExitCode::from(2);
    }
    match run(settings).await {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::Unclean) => ExitCode::FAILURE,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "Worker failed to start.");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: WorkerSettings) -> anyhow::Result<Outcome> {
    let mut conn = store::connect(&settings.redis)
        .await
        .context("connecting to Redis")?;
    let keys = store::Keys::new(&settings.redis.key_prefix);
    store::check_schema(&mut conn, &keys, "fleet-worker")
        .await
        .context("checking the Redis schema")?;

    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone()).context("installing signal handlers")?;
    let supervisor = Supervisor::new(token);
    info!(brokers = %settings.kafka.brokers, "Worker started.");
    let outcome = supervisor.run(settings.worker.shutdown_grace()).await;
    info!(?outcome, "Worker stopped.");
    Ok(outcome)
}
