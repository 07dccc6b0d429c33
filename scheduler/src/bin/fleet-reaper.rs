//! `fleet-reaper`: requeues tasks whose lease expired, fails those out of attempts, relays due
//! tasks and dead letters, and trims expired index entries. Any number of replicas may run.

use std::process::ExitCode;

use clap::Parser;
use fleet_common::cli::{ServiceArgs, run_service};
use fleet_scheduler::service::{Role, serve};

#[derive(Debug, Parser)]
#[command(name = "fleet-reaper", version, about)]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_service(Role::Reaper.name(), &cli.service, |settings, token| {
        serve(settings, Role::Reaper, token)
    })
}
