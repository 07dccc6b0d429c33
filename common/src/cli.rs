//! Command-line arguments and the `main` shape every Fleet service shares.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::settings::{self, ServiceSettings, SettingsError};
use crate::shutdown::Drain;
use crate::telemetry;
use tokio_util::sync::CancellationToken;

/// `--config PATH` and `--check-config`, shared by the services' command lines.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// TOML settings file; `FLEET__SECTION__KEY` environment variables override it.
    #[arg(long, value_name = "PATH", env = "FLEET_CONFIG")]
    pub config: Option<PathBuf>,
    /// Load and validate the settings, print them (secrets redacted), and exit.
    #[arg(long)]
    pub check_config: bool,
}

impl ServiceArgs {
    /// Loads the service's settings from defaults, `--config` and the environment.
    pub fn load<T: ServiceSettings>(&self) -> Result<T, SettingsError> {
        settings::load(self.config.as_deref())
    }
}

/// Exit code for settings that cannot be loaded or are unsafe.
pub const EXIT_BAD_CONFIG: u8 = 2;

/// Runs a service: loads settings (exit 2 with a message naming the key if they are bad),
/// honours `--check-config`, sets up logging, then runs `service` on a multi-threaded runtime
/// with a token that the first SIGINT or SIGTERM cancels. This is the one place signals are
/// handled: a service is `run(settings, token)`, so a test stops it by cancelling the token.
/// Exit 0 after a clean drain, 1 if the service failed or had to be aborted.
pub fn run_service<T, F, Fut, E>(name: &str, args: &ServiceArgs, service: F) -> ExitCode
where
    T: ServiceSettings,
    F: FnOnce(T, CancellationToken) -> Fut,
    Fut: Future<Output = Result<Drain, E>>,
    E: std::fmt::Debug,
{
    let settings: T = match args.load() {
        Ok(s) => s,
        Err(err) => {
            eprintln!("{name}: {err}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if args.check_config {
        println!("{settings:#?}");
        return ExitCode::SUCCESS;
    }
    if let Err(err) = telemetry::init(settings.log()) {
        eprintln!("{name}: invalid log settings: {err}");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("{name}: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Span export runs on the OpenTelemetry SDK's own thread, not on the runtime: it starts
    // before the service and is shut down (what waits is sent, for at most 5 s) after it.
    crate::otlp::init(&settings.log().otlp_endpoint, name);
    let result = runtime.block_on(async {
        let token = CancellationToken::new();
        if let Err(err) = crate::shutdown::cancel_on_signal(token.clone()) {
            eprintln!("{name}: cannot install signal handlers: {err}");
            return None;
        }
        Some(service(settings, token).await)
    });
    crate::otlp::shutdown();
    match result {
        None => ExitCode::FAILURE,
        Some(Ok(Drain::Clean)) => ExitCode::SUCCESS,
        Some(Ok(Drain::Unclean)) => ExitCode::FAILURE,
        Some(Err(err)) => {
            tracing::error!(error = ?err, "{name} failed.");
            ExitCode::FAILURE
        }
    }
}
