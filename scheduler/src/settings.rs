//! The scheduler's settings: the shared sections plus `[scheduler]`.

use std::time::Duration;

use fleet_common::service_settings;
use fleet_common::settings::{SettingsError, Validate};
use serde::Deserialize;

/// `[scheduler]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSection {
    /// Consumer group of the scheduler replicas on the submit topic.
    pub group_id: String,
    /// How long a stopping scheduler may take to finish in-flight submissions.
    pub shutdown_grace_ms: u64,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        Self {
            group_id: "fleet-scheduler".into(),
            shutdown_grace_ms: 10_000,
        }
    }
}

impl SchedulerSection {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

impl Validate for SchedulerSection {
    fn validate(&self) -> Result<(), SettingsError> {
        if self.group_id.trim().is_empty() {
            return Err(SettingsError::invalid(
                "scheduler.group_id",
                "must not be empty",
            ));
        }
        Ok(())
    }
}

service_settings! {
    /// Everything `fleet-scheduler` reads.
    SchedulerSettings { scheduler: SchedulerSection }
}
