//! Logging set up in one place for every Fleet binary.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::settings::{LogFormat, LogSettings};

/// Installs the global `tracing` subscriber: human-readable on a terminal, JSON otherwise or when
/// `log.format = "json"`. `RUST_LOG`, when set, takes precedence over `log.level`.
///
/// Logs go to stderr so that stdout stays clean for command output.
pub fn init(settings: &LogSettings) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directive) if !directive.is_empty() => EnvFilter::try_new(directive)?,
        _ => EnvFilter::try_new(&settings.level)?,
    };
    let json = match settings.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::NONE);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()?;
        log_panics();
        Ok(())
    } else {
        builder.with_target(false).try_init()
    }
}

/// Panics become one log event each. The default hook writes a panic's message and backtrace
/// in many small writes that other threads' log lines can land between, cutting JSON lines in
/// two (a handler panic is caught and recorded as the attempt's error, but its report still
/// went to stderr this way).
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::capture();
        tracing::error!(panic = %info, backtrace = %backtrace, "A thread panicked.");
    }));
}
