//! A task's metrics through handles registered once per task kind and priority.
//!
//! `metrics::counter!` with labels builds the series' key and looks it up in the recorder's
//! registry on every call. A task makes three such calls (its start, its end and its
//! handler's duration), plus one for its queue wait. Here each kind and priority looks its
//! handles up once, and its tasks share them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use ::metrics::{Counter, Histogram};
use fleet_common::Priority;
use fleet_common::ops;
use fleet_common::store::Completion;
use fleet_common::telemetry::metrics::{self, AttemptEnd};

/// The metric handles of one task kind and priority. Series other than `started` are
/// registered when first used, so that none is exported before it has counted something.
pub(super) struct TaskMetrics {
    pub(super) kind: Arc<str>,
    priority: &'static str,
    started: Counter,
    /// By [`outcome`].
    outcomes: [OnceLock<Counter>; 5],
    duration: OnceLock<Histogram>,
}

impl std::fmt::Debug for TaskMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskMetrics")
            .field("kind", &self.kind)
            .field("priority", &self.priority)
            .finish_non_exhaustive()
    }
}

/// The counter an attempt's recorded end goes to, and its place in `TaskMetrics::outcomes`.
fn outcome(answer: Completion) -> (usize, AttemptEnd) {
    match answer {
        Completion::Succeeded => (0, AttemptEnd::Succeeded),
        Completion::Scheduled => (1, AttemptEnd::Retried),
        Completion::Failed => (2, AttemptEnd::Failed),
        Completion::Cancelled => (3, AttemptEnd::Cancelled),
        Completion::Already | Completion::Fenced => (4, AttemptEnd::Fenced),
    }
}

impl TaskMetrics {
    pub(super) fn started(&self) {
        self.started.increment(1);
    }

    /// Counts an attempt's end, as Redis recorded it, and its handler's duration.
    pub(super) fn ended(&self, answer: Completion, handler: Duration) {
        let (i, end) = outcome(answer);
        let (kind, priority) = (&self.kind, self.priority);
        self.outcomes[i]
            .get_or_init(|| metrics::attempts_ended(end, Arc::clone(kind), priority))
            .increment(1);
        self.duration
            .get_or_init(|| metrics::handler_duration(Arc::clone(kind)))
            .record(handler.as_secs_f64());
    }
}

/// One kind's handles, by priority index.
type ByPriority = [Option<Arc<TaskMetrics>>; 4];

/// The handles of every kind and priority this worker has started, and the queue-wait
/// histogram of each priority.
#[derive(Debug)]
pub(super) struct MetricsCache {
    by_kind: Mutex<HashMap<Arc<str>, ByPriority>>,
    queue_wait: [OnceLock<Histogram>; 4],
}

impl MetricsCache {
    /// Installs the process's metrics recorder first: a handle taken before it would stay a
    /// no-op for good.
    pub(super) fn new() -> Self {
        ops::metrics();
        Self {
            by_kind: Mutex::default(),
            queue_wait: Default::default(),
        }
    }

    /// The handles of tasks of `kind` at `priority`.
    pub(super) fn task(&self, kind: &str, priority: Priority) -> Arc<TaskMetrics> {
        let mut by_kind = self.by_kind.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(Some(known)) = by_kind.get(kind).map(|p| &p[priority.index()]) {
            return Arc::clone(known);
        }
        let kind: Arc<str> = kind.into();
        let priority_name = priority.as_str();
        let made = Arc::new(TaskMetrics {
            started: metrics::tasks_started(Arc::clone(&kind), priority_name),
            kind: Arc::clone(&kind),
            priority: priority_name,
            outcomes: Default::default(),
            duration: OnceLock::new(),
        });
        by_kind.entry(kind).or_default()[priority.index()] = Some(Arc::clone(&made));
        made
    }

    /// How long tasks of `priority` waited from their publication to their start.
    pub(super) fn queue_wait(&self, priority: Priority) -> &Histogram {
        self.queue_wait[priority.index()].get_or_init(|| metrics::queue_wait(priority.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_shared_per_kind_and_priority() {
        let cache = MetricsCache::new();
        let a = cache.task("email", Priority::High);
        assert!(Arc::ptr_eq(&a, &cache.task("email", Priority::High)));
        assert!(!Arc::ptr_eq(&a, &cache.task("email", Priority::Low)));
        assert!(!Arc::ptr_eq(&a, &cache.task("sms", Priority::High)));
        assert_eq!(&*a.kind, "email");
        assert_eq!(a.priority, "high");
    }

    #[test]
    fn every_completion_has_its_counter() {
        let names: Vec<_> = [
            Completion::Succeeded,
            Completion::Scheduled,
            Completion::Failed,
            Completion::Cancelled,
            Completion::Already,
            Completion::Fenced,
        ]
        .map(outcome)
        .to_vec();
        for (i, _) in &names {
            assert!(*i < 5);
        }
        assert_eq!(names[4], names[5], "a repeated report counts as fenced");
    }
}
