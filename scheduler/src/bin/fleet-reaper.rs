//! `fleet-reaper`: requeues tasks whose lease expired, fails those out of attempts, and relays
//! due tasks and dead letters. Any number of replicas may run.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use fleet_common::cli::{ServiceArgs, run_service};
use fleet_common::shutdown::{self, Outcome, Supervisor};
use fleet_scheduler::settings::SchedulerSettings;
use fleet_scheduler::{reaper, relay, service};
use rdkafka::producer::Producer;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Debug, Parser)]
#[command(name = "fleet-reaper", version, about)]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_service("fleet-reaper", &cli.service, run)
}

async fn run(settings: SchedulerSettings) -> anyhow::Result<Outcome> {
    let (store, publisher) = service::connect(&settings, "fleet-reaper").await?;
    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone()).context("installing signal handlers")?;
    let mut supervisor = Supervisor::new(token.clone());
    supervisor.spawn(
        "reaper",
        reaper::run(
            store.clone(),
            publisher.clone(),
            settings.lease.reaper_interval(),
            settings.lease.lease_ms,
            token.child_token(),
        ),
    );
    supervisor.spawn(
        "relay",
        relay::run(
            store,
            publisher.clone(),
            settings.scheduler.relay_interval(),
            settings.lease.lease_ms,
            token.child_token(),
        ),
    );
    info!(
        interval_ms = settings.lease.reaper_interval_ms,
        "Reaper started."
    );
    let outcome = supervisor.run(settings.scheduler.shutdown_grace()).await;
    let _ = publisher
        .producer()
        .flush(std::time::Duration::from_secs(5));
    info!(?outcome, "Reaper stopped.");
    Ok(outcome)
}
