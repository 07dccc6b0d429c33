//! `fleet-scheduler`: validates submitted tasks, records them in Redis, routes them onto the
//! priority topics, and relays due tasks (delays, retries, unconfirmed dispatches).

use std::process::ExitCode;

use clap::Parser;
use fleet_common::cli::{ServiceArgs, run_service};
use fleet_scheduler::service::{Role, serve};

#[derive(Debug, Parser)]
#[command(name = "fleet-scheduler", version, about)]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_service(Role::Scheduler.name(), &cli.service, |settings, token| {
        serve(settings, Role::Scheduler, token)
    })
}
