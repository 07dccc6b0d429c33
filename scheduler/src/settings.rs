//! The settings of `fleet-scheduler` and `fleet-reaper`: the shared sections plus `[scheduler]`.

use std::time::Duration;

use std::collections::BTreeMap;

use fleet_common::flow::LimitTable;
use fleet_common::placement::QueueSettings;
use fleet_common::service_settings;
use fleet_common::settings::{SettingsError, Validate};
use fleet_common::task::{MAX_DELAY_MS, check_queue};
use serde::Deserialize;

/// How tasks without a `key` are spread over a priority topic's partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Partitioner {
    /// Runs of `sticky_run` consecutive tasks share a partition, then the next partition takes
    /// over; a batch larger than that per partition is split evenly over every partition (see
    /// [`crate::routing`]).
    #[default]
    Sticky,
    /// Each task goes to the next partition in turn.
    RoundRobin,
    /// The producer picks a partition at random for each task.
    Random,
}

/// `[scheduler]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSection {
    /// Consumer group of the scheduler replicas on the submit topic.
    pub group_id: String,
    /// How long a stopping scheduler or reaper may take to finish its current batch.
    pub shutdown_grace_ms: u64,
    /// Spreading of keyless tasks; a task with a `key` is first published by the key's hash.
    pub partitioner: Partitioner,
    /// Consecutive keyless tasks of a priority sent to one partition under `sticky`.
    pub sticky_run: usize,
    /// Most submissions handled in one Redis call.
    pub batch_size: usize,
    /// How often the relay looks for due tasks (delays, retries, unconfirmed dispatches).
    pub relay_interval_ms: u64,
    /// How each queue's placed tasks are scheduled (`[scheduler.queues.<name>]`: `strategy`,
    /// `placement`, `placement_timeout_ms`); the API and `fleetctl queue set` override these at
    /// run time.
    pub queues: BTreeMap<String, QueueSettings>,
    /// Flow limits (`[scheduler.limits.<scope>.<name>]`, scope `queue`, `key`, `kind`, `rate`
    /// or `tenant`; see [`fleet_common::flow`]): written to Redis at start, where the API and
    /// `fleetctl limits` change them at run time.
    pub limits: LimitTable,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        Self {
            group_id: "fleet-scheduler".into(),
            shutdown_grace_ms: 10_000,
            partitioner: Partitioner::Sticky,
            sticky_run: 16,
            batch_size: 500,
            relay_interval_ms: 250,
            queues: BTreeMap::new(),
            limits: LimitTable::new(),
        }
    }
}

impl SchedulerSection {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub fn relay_interval(&self) -> Duration {
        Duration::from_millis(self.relay_interval_ms)
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
        if !(1..=10_000).contains(&self.sticky_run) {
            return Err(SettingsError::invalid(
                "scheduler.sticky_run",
                "expected 1 to 10000",
            ));
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return Err(SettingsError::invalid(
                "scheduler.batch_size",
                "expected 1 to 10000",
            ));
        }
        for (name, queue) in &self.queues {
            check_queue(name).map_err(|err| {
                SettingsError::invalid("scheduler.queues", format!("queue name: {err}"))
            })?;
            if queue
                .placement_timeout_ms
                .is_some_and(|ms| ms == 0 || ms > MAX_DELAY_MS)
            {
                return Err(SettingsError::invalid(
                    "scheduler.queues.placement_timeout_ms",
                    format!("queue {name}: expected 1 to {MAX_DELAY_MS} (one year)"),
                ));
            }
        }
        for (scope, entries) in &self.limits {
            for (name, limit) in entries {
                limit.validate(*scope, name).map_err(|err| {
                    SettingsError::invalid(
                        "scheduler.limits",
                        format!("{} limit {name}: {err}", scope.as_str()),
                    )
                })?;
            }
        }
        if !(10..=60_000).contains(&self.relay_interval_ms) {
            return Err(SettingsError::invalid(
                "scheduler.relay_interval_ms",
                "expected 10 to 60000",
            ));
        }
        Ok(())
    }
}

service_settings! {
    /// Everything `fleet-scheduler` and `fleet-reaper` read.
    SchedulerSettings { scheduler: SchedulerSection }
}
