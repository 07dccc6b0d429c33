//! `fleet-worker`: a worker replica running the built-in handlers (`noop`, `echo`, `sleep`,
//! `fail`, `crash`). Your own worker is the same few lines with your handlers registered.

use std::process::ExitCode;

use clap::Parser;
use fleet_common::cli::{ServiceArgs, run_service};
use fleet_common::shutdown::Drain;
use fleet_worker::settings::WorkerSettings;
use fleet_worker::{Worker, builtin};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "fleet-worker", version, about)]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_service("fleet-worker", &cli.service, run)
}

async fn run(settings: WorkerSettings, token: CancellationToken) -> anyhow::Result<Drain> {
    Ok(Worker::new(settings, builtin::registry())
        .run(token)
        .await?)
}
