//! Command-line arguments every Fleet service accepts.

use std::path::PathBuf;

use serde::de::DeserializeOwned;

use crate::settings::{self, SettingsError, Validate};

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
    pub fn load<T: DeserializeOwned + Validate>(&self) -> Result<T, SettingsError> {
        settings::load(self.config.as_deref())
    }
}
