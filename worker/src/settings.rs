//! The worker's settings: the shared sections plus `[worker]`.

use std::time::Duration;

use fleet_common::service_settings;
use fleet_common::settings::{SettingsError, Validate};
use serde::Deserialize;

/// `[worker]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSection {
    /// Consumer group shared by every worker replica.
    pub group_id: String,
    /// Tasks one worker runs at once.
    pub concurrency: usize,
    /// How long a stopping worker lets running tasks finish before handing them back.
    pub shutdown_grace_ms: u64,
}

impl Default for WorkerSection {
    fn default() -> Self {
        Self {
            group_id: "fleet-workers".into(),
            concurrency: 32,
            shutdown_grace_ms: 20_000,
        }
    }
}

impl WorkerSection {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

impl Validate for WorkerSection {
    fn validate(&self) -> Result<(), SettingsError> {
        if self.group_id.trim().is_empty() {
            return Err(SettingsError::invalid(
                "worker.group_id",
                "must not be empty",
            ));
        }
        if !(1..=10_000).contains(&self.concurrency) {
            return Err(SettingsError::invalid(
                "worker.concurrency",
                "expected 1 to 10000",
            ));
        }
        Ok(())
    }
}

service_settings! {
    /// Everything `fleet-worker` reads.
    WorkerSettings { worker: WorkerSection }
}
