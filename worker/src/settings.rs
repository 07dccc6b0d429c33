//! The worker's settings: the shared sections plus `[worker]`.

use std::time::Duration;

use fleet_common::placement::{self, Labels, Resources, SLOTS};
use fleet_common::service_settings;
use fleet_common::settings::{SettingsError, Validate};
use serde::Deserialize;

/// `[worker]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSection {
    /// This worker's name in Redis and logs; empty: `<hostname>-<pid>`. On Kubernetes use the
    /// pod name.
    pub id: String,
    /// Consumer group shared by every worker replica.
    pub group_id: String,
    /// Tasks one worker runs at once.
    pub concurrency: usize,
    /// How long a stopping worker lets running tasks finish before handing them back.
    pub shutdown_grace_ms: u64,
    /// How long a cancelled handler may take to stop after its cancellation signal before it
    /// is aborted.
    pub cancel_grace_ms: u64,
    /// Share of free slots given to critical, high, normal and low when all have work waiting.
    pub priority_weights: [u32; 4],
    /// Always start the most urgent waiting task first (lower levels can starve).
    pub strict_priority: bool,
    /// Most deliveries claimed in one Redis call.
    pub claim_batch: usize,
    /// The consumer's `group.instance.id` (static membership, KIP-345); empty: dynamic. A
    /// stable name per replica (a StatefulSet pod's name) lets a restarted worker take its
    /// partitions back without a group rebalance. Never give two workers the same one.
    pub group_instance_id: String,
    /// A worker waits a random 0 to this many milliseconds before it joins the group, so that
    /// replicas started together do not join within the same few milliseconds. On the local
    /// broker (tansu) a member whose group sync arrives before the leader's waits for the
    /// broker's next one-second poll of the group, so one of two workers started at once got
    /// its partitions a second after the other in half the starts. A Kafka broker answers
    /// such a sync as soon as the leader's arrives; there this only delays the start a little.
    pub join_jitter_ms: u64,
    /// What this worker offers placed tasks, by resource (`cpu`, `memory_mb`, `gpu`, any
    /// name). `cpu` and `memory_mb` default to the container's cgroup limits or the machine's;
    /// `slots` is always `concurrency`.
    pub capacity: Resources,
    /// Labels placed tasks' `require` and `prefer` match (`zone = "eu-1"`).
    pub labels: Labels,
    /// This worker's share under `weighted` placement, 1 to 1000.
    pub weight: u32,
}

impl Default for WorkerSection {
    fn default() -> Self {
        Self {
            id: String::new(),
            group_id: "fleet-workers".into(),
            concurrency: 32,
            shutdown_grace_ms: 20_000,
            cancel_grace_ms: 5_000,
            priority_weights: [8, 4, 2, 1],
            strict_priority: false,
            claim_batch: 256,
            group_instance_id: String::new(),
            join_jitter_ms: 150,
            capacity: Resources::new(),
            labels: Labels::new(),
            weight: 1,
        }
    }
}

impl WorkerSection {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// A random wait of 0 to `join_jitter_ms` before joining the group.
    pub fn join_jitter(&self) -> Duration {
        Duration::from_millis(rand::random_range(0..=self.join_jitter_ms))
    }

    pub fn cancel_grace(&self) -> Duration {
        Duration::from_millis(self.cancel_grace_ms)
    }

    /// The configured id, or `<hostname>-<pid>`.
    pub fn worker_id(&self) -> String {
        if !self.id.is_empty() {
            return self.id.clone();
        }
        let host = host_name().unwrap_or_else(|| "worker".into());
        format!("{host}-{}", std::process::id())
    }
}

/// This machine's (or container's) host name: `HOSTNAME` if exported, else the kernel's.
///
/// Shells set `HOSTNAME` without exporting it, and systemd does not set it, so the variable
/// alone leaves the name blank for most services run outside a container.
pub fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .into_iter()
        .chain(
            ["/proc/sys/kernel/hostname", "/etc/hostname"]
                .into_iter()
                .filter_map(|path| std::fs::read_to_string(path).ok()),
        )
        .map(|h| h.trim().to_string())
        .find(|h| !h.is_empty())
}

impl Validate for WorkerSection {
    fn validate(&self) -> Result<(), SettingsError> {
        if self.id.len() > 128
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
        {
            return Err(SettingsError::invalid(
                "worker.id",
                "up to 128 letters, digits, '_', '.', ':' or '-'",
            ));
        }
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
        if self.priority_weights.contains(&0) || self.priority_weights.iter().any(|w| *w > 1000) {
            return Err(SettingsError::invalid(
                "worker.priority_weights",
                "four weights from 1 to 1000 (critical, high, normal, low)",
            ));
        }
        if self.cancel_grace_ms > 3_600_000 {
            return Err(SettingsError::invalid(
                "worker.cancel_grace_ms",
                "at most one hour",
            ));
        }
        if self.join_jitter_ms > 60_000 {
            return Err(SettingsError::invalid(
                "worker.join_jitter_ms",
                "at most 60000 (a minute)",
            ));
        }
        if !(1..=10_000).contains(&self.claim_batch) {
            return Err(SettingsError::invalid(
                "worker.claim_batch",
                "expected 1 to 10000",
            ));
        }
        placement::check_resources(&self.capacity)
            .map_err(|problem| SettingsError::invalid("worker.capacity", problem))?;
        if self.capacity.contains_key(SLOTS) {
            return Err(SettingsError::invalid(
                "worker.capacity",
                "`slots` is worker.concurrency; set that instead",
            ));
        }
        placement::check_labels(&self.labels)
            .map_err(|problem| SettingsError::invalid("worker.labels", problem))?;
        if !(1..=1000).contains(&self.weight) {
            return Err(SettingsError::invalid(
                "worker.weight",
                "expected 1 to 1000",
            ));
        }
        // Kafka allows 249 characters of [a-zA-Z0-9._-] in such names.
        let id = &self.group_instance_id;
        if id.len() > 249
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(SettingsError::invalid(
                "worker.group_instance_id",
                "at most 249 characters of letters, digits, '.', '_' and '-'",
            ));
        }
        Ok(())
    }
}

service_settings! {
    /// Everything `fleet-worker` reads.
    WorkerSettings { worker: WorkerSection }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_join_jitter_stays_within_its_setting() {
        let mut section = WorkerSection::default();
        assert!(section.validate().is_ok());
        for _ in 0..200 {
            assert!(section.join_jitter() <= Duration::from_millis(section.join_jitter_ms));
        }
        section.join_jitter_ms = 0;
        assert_eq!(section.join_jitter(), Duration::ZERO);
    }

    #[test]
    fn bad_capacity_labels_and_weight_are_refused_by_name() {
        let cases: Vec<(WorkerSection, &str)> = vec![
            (
                WorkerSection {
                    capacity: [("gpu".to_string(), -1.0)].into(),
                    ..WorkerSection::default()
                },
                "worker.capacity",
            ),
            (
                WorkerSection {
                    capacity: [("cpu".to_string(), f64::NAN)].into(),
                    ..WorkerSection::default()
                },
                "worker.capacity",
            ),
            (
                WorkerSection {
                    capacity: [("slots".to_string(), 4.0)].into(),
                    ..WorkerSection::default()
                },
                "worker.concurrency",
            ),
            (
                WorkerSection {
                    labels: [("zone".to_string(), "eu 1".to_string())].into(),
                    ..WorkerSection::default()
                },
                "worker.labels",
            ),
            (
                WorkerSection {
                    weight: 0,
                    ..WorkerSection::default()
                },
                "worker.weight",
            ),
        ];
        for (section, named) in cases {
            let error = section.validate().unwrap_err().to_string();
            assert!(error.contains(named), "{error} names {named}");
        }
    }

    #[test]
    fn a_join_jitter_over_a_minute_is_refused_by_name() {
        let section = WorkerSection {
            join_jitter_ms: 60_001,
            ..WorkerSection::default()
        };
        let error = section.validate().unwrap_err().to_string();
        assert!(error.contains("worker.join_jitter_ms"), "{error}");
    }
}
