//! `fleet-scheduler`: validates submitted tasks, records them in Redis, routes them onto the
//! priority topics, and relays due tasks (delays, retries, unconfirmed dispatches).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use fleet_common::cli::{ServiceArgs, run_service};
use fleet_common::shutdown::{self, Outcome, Supervisor};
use fleet_scheduler::settings::SchedulerSettings;
use fleet_scheduler::{ingest, relay, service};
use rdkafka::producer::Producer;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Debug, Parser)]
#[command(name = "fleet-scheduler", version, about)]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_service("fleet-scheduler", &cli.service, run)
}

async fn run(settings: SchedulerSettings) -> anyhow::Result<Outcome> {
    let (store, publisher) = service::connect(&settings, "fleet-scheduler").await?;
    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone()).context("installing signal handlers")?;
    let settings = Arc::new(settings);
    let mut supervisor = Supervisor::new(token.clone());
    supervisor.spawn(
        "ingest",
        ingest::run(
            settings.clone(),
            store.clone(),
            publisher.clone(),
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
    info!(brokers = %settings.kafka.brokers, group = %settings.scheduler.group_id, "Scheduler started.");
    let outcome = supervisor.run(settings.scheduler.shutdown_grace()).await;
    let _ = publisher
        .producer()
        .flush(std::time::Duration::from_secs(5));
    info!(?outcome, "Scheduler stopped.");
    Ok(outcome)
}
