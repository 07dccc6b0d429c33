//! Each queue's scheduling settings and the flow limits as this scheduler applies them: the
//! settings file's `[scheduler.queues.<name>]`, overridden by what the API or `fleetctl queue
//! set` stored in Redis, and the limits in Redis (the settings file's `[scheduler.limits]`,
//! written there at start, changed at run time by the API or `fleetctl limits`), read again
//! every second, so a change takes effect within about a second on every scheduler.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use fleet_common::flow::{self, LimitTable, Limits};
use fleet_common::placement::QueueSettings;
use fleet_common::store::{NewTask, Store, StoreError};

/// Shared by the ingest, the API and the dispatcher of one scheduler.
#[derive(Debug, Clone, Default)]
pub struct Queues {
    file: Arc<BTreeMap<String, QueueSettings>>,
    now: Arc<RwLock<BTreeMap<String, QueueSettings>>>,
    limits: Arc<RwLock<Limits>>,
    /// The settings file's limits, and whether they were written to Redis yet.
    file_limits: Arc<LimitTable>,
    written: Arc<AtomicBool>,
}

impl Queues {
    pub fn new(file: BTreeMap<String, QueueSettings>, file_limits: LimitTable) -> Self {
        Self {
            now: Arc::new(RwLock::new(file.clone())),
            file: Arc::new(file),
            limits: Arc::new(RwLock::new(Limits::from_table(&file_limits))),
            file_limits: Arc::new(file_limits),
            written: Arc::default(),
        }
    }

    /// Reads the run-time overrides and the limits from Redis; the first time it can, writes
    /// the settings file's limits there first (the dispatcher calls this every second).
    pub async fn refresh(&self, store: &Store) -> Result<(), StoreError> {
        if !self.written.load(Ordering::Relaxed) {
            store.write_limits(&self.file_limits).await?;
            self.written.store(true, Ordering::Relaxed);
        }
        self.reload(store).await
    }

    /// Reads the run-time overrides and the limits from Redis (after a change through the
    /// API: never writes the settings file's limits over it).
    pub async fn reload(&self, store: &Store) -> Result<(), StoreError> {
        let overrides = store.queue_settings().await?;
        let limits = store.limits().await?;
        let mut merged = (*self.file).clone();
        merged.extend(overrides);
        *self.now.write().unwrap_or_else(PoisonError::into_inner) = merged;
        let mut now = self.limits.write().unwrap_or_else(PoisonError::into_inner);
        *now = limits.keeping_unreadable(&now);
        Ok(())
    }

    /// The settings of `queue` now (the defaults when it has none).
    pub fn get(&self, queue: &str) -> QueueSettings {
        self.now
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(queue)
            .copied()
            .unwrap_or_default()
    }

    /// Every queue with settings of its own.
    pub fn all(&self) -> BTreeMap<String, QueueSettings> {
        self.now
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The limits in force, as last read.
    pub fn limits(&self) -> Limits {
        self.limits
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes placed the tasks of queues whose strategy or policy is not the default, and those
    /// a limit can apply to; gives each placed task the quotas it is accepted within.
    pub fn mark(&self, tasks: &mut [NewTask]) {
        let now = self.now.read().unwrap_or_else(PoisonError::into_inner);
        let limits = self.limits.read().unwrap_or_else(PoisonError::into_inner);
        for task in tasks {
            if now.get(&task.record.queue).is_some_and(|q| q.places_all())
                || limits.applies(&task.record)
            {
                task.make_placed();
            }
            if task.record.is_placed() && !limits.is_empty() {
                task.quotas = flow::quotas_text(&limits.quotas(&task.record));
            }
        }
    }
}
