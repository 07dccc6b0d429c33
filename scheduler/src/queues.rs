//! Each queue's scheduling settings as this scheduler applies them: the settings file's
//! `[scheduler.queues.<name>]`, overridden by what the API or `fleetctl queue set` stored in
//! Redis, read again every second, so a change takes effect within about a second on every
//! scheduler.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use fleet_common::placement::QueueSettings;
use fleet_common::store::{NewTask, Store, StoreError};

/// Shared by the ingest, the API and the dispatcher of one scheduler.
#[derive(Debug, Clone, Default)]
pub struct Queues {
    file: Arc<BTreeMap<String, QueueSettings>>,
    now: Arc<RwLock<BTreeMap<String, QueueSettings>>>,
}

impl Queues {
    pub fn new(file: BTreeMap<String, QueueSettings>) -> Self {
        Self {
            now: Arc::new(RwLock::new(file.clone())),
            file: Arc::new(file),
        }
    }

    /// Reads the run-time overrides from Redis.
    pub async fn refresh(&self, store: &Store) -> Result<(), StoreError> {
        let overrides = store.queue_settings().await?;
        let mut merged = (*self.file).clone();
        merged.extend(overrides);
        *self.now.write().unwrap_or_else(PoisonError::into_inner) = merged;
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

    /// Makes the tasks of queues whose strategy or policy is not the default placed.
    pub fn mark(&self, tasks: &mut [NewTask]) {
        let now = self.now.read().unwrap_or_else(PoisonError::into_inner);
        if now.is_empty() {
            return;
        }
        for task in tasks {
            if now.get(&task.record.queue).is_some_and(|q| q.places_all()) {
                task.make_placed();
            }
        }
    }
}
