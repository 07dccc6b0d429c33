//! The task hash as a type: what [`Store::task`](super::Store::task) returns, so that readers
//! (the API, `fleetctl`, the relay's dead letters, tests) use fields, not field-name strings.
//! The field names live here and in the Lua scripts only.
//!
//! A stored task is read as it is, then completed with what the hash leaves out because it
//! repeats other fields (see `accept.lua`, `claim.lua` and `complete.lua`): its `id`, the
//! `run_at_ms` of a task due when created, the `first_started_ms` of a task started once, the
//! `updated_ms` that starts and endings no longer write, and the one-entry history of a task
//! whose only attempt succeeded.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::Priority;
use crate::task::State;

/// How one attempt ended, as its history entry says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    Succeeded,
    /// Failed and retried after a backoff.
    Retry,
    Failed,
    Cancelled,
    /// The worker's lease expired; the reaper requeued or failed it.
    LeaseExpired,
    /// The attempt ran past its hard deadline.
    Deadline,
    /// Handed back by a draining worker, or fenced by a resume, redrive or priority change.
    Released,
    /// An outcome this build does not know (written by a newer one).
    #[serde(untagged)]
    Other(String),
}

/// One ended attempt in a task's `history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptEnding {
    pub attempt: u32,
    pub worker: String,
    pub started_ms: u64,
    pub ended_ms: u64,
    pub outcome: AttemptOutcome,
    /// The attempt's error, at most 1 KiB; empty when it succeeded.
    pub error: String,
}

/// One task as Redis holds it. Optional fields are those a task has only at some point of
/// its life (`worker` while running, `result` once succeeded, …).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredTask {
    pub id: String,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// The current attempt: the fencing token.
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Attempts not charged against `max_attempts` (hand-backs, attempts before a redrive, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub released: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redriven: Option<u32>,
    /// The stored task JSON ([`crate::task::TaskRecord`]), as stored.
    #[serde(serialize_with = "embedded_json")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    /// The owner while running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// The claim call that started the current attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim_call: Option<String>,
    pub created_ms: u64,
    /// The latest change: the latest of the stored `updated_ms`, `started_ms` and `finished_ms`.
    pub updated_ms: u64,
    pub run_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_started_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// The handler's result JSON, as stored.
    #[serde(serialize_with = "embedded_json")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// 0–100, of the current attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress_message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Hard deadline of the running attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_requested_ms: Option<u64>,
    /// The W3C `traceparent` of the submission.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// Every ended attempt, oldest first (at most 100).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<AttemptEnding>,
    /// A placed task: what it reserves on its worker (`cpu=1500;slots=1000`, thousandths).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needs: Option<String>,
    /// A placed task: the worker holding its reservation (chosen, or running it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_on: Option<String>,
    /// A placed task: when the dispatcher last chose its worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placed_ms: Option<u64>,
    /// A placed task waiting for a worker: why none took it yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_reason: Option<String>,
    /// The workflow it belongs to (see [`crate::workflow`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Its parents (`depends_on`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<String>,
    /// While `waiting`: how many of its parents have not ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<u64>,
    /// Fields this build does not model (an older or newer service's), kept so that readers
    /// still show them.
    #[serde(flatten, serialize_with = "extra_fields")]
    pub other: BTreeMap<String, String>,
}

/// The task hash's fields, by name.
mod field {
    pub(super) const STATE: &str = "state";
    pub(super) const KIND: &str = "kind";
    pub(super) const QUEUE: &str = "queue";
    pub(super) const PRIORITY: &str = "priority";
    pub(super) const ATTEMPT: &str = "attempt";
    pub(super) const MAX_ATTEMPTS: &str = "max_attempts";
    pub(super) const RELEASED: &str = "released";
    pub(super) const REDRIVEN: &str = "redriven";
    pub(super) const RECORD: &str = "record";
    pub(super) const WORKER: &str = "worker";
    pub(super) const CLAIM_CALL: &str = "claim_call";
    pub(super) const CREATED_MS: &str = "created_ms";
    pub(super) const UPDATED_MS: &str = "updated_ms";
    pub(super) const RUN_AT_MS: &str = "run_at_ms";
    pub(super) const FIRST_STARTED_MS: &str = "first_started_ms";
    pub(super) const STARTED_MS: &str = "started_ms";
    pub(super) const FINISHED_MS: &str = "finished_ms";
    pub(super) const RESULT: &str = "result";
    pub(super) const ERROR: &str = "error";
    pub(super) const LAST_ERROR: &str = "last_error";
    pub(super) const PROGRESS: &str = "progress";
    pub(super) const PROGRESS_MESSAGE: &str = "progress_message";
    pub(super) const PROGRESS_MS: &str = "progress_ms";
    pub(super) const TIMEOUT_MS: &str = "timeout_ms";
    pub(super) const DEADLINE_MS: &str = "deadline_ms";
    pub(super) const CANCEL_REQUESTED_MS: &str = "cancel_requested_ms";
    pub(super) const TRACE: &str = "trace";
    pub(super) const HISTORY: &str = "history";
    pub(super) const NEEDS: &str = "needs";
    pub(super) const RESERVED_ON: &str = "reserved_on";
    pub(super) const PLACED_MS: &str = "placed_ms";
    pub(super) const WAIT_REASON: &str = "wait_reason";
    pub(super) const WORKFLOW: &str = "workflow";
    pub(super) const PARENTS: &str = "parents";
    pub(super) const DEPS_LEFT: &str = "deps_left";
    /// Not stored since schema 4 (the key holds it); read from older hashes.
    pub(super) const ID: &str = "id";
}

/// A task hash that is not a task: no `state`, or one this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task `{id}` has no valid state in Redis ({state:?})")]
pub struct NotATask {
    pub id: String,
    pub state: Option<String>,
}

impl StoredTask {
    /// The task `id` from its hash's fields, completed with what the hash leaves out.
    pub fn from_hash(id: &str, mut fields: HashMap<String, String>) -> Result<Self, NotATask> {
        let state = fields.remove(field::STATE);
        let Some(parsed_state) = state.as_deref().and_then(|s| s.parse::<State>().ok()) else {
            return Err(NotATask {
                id: id.to_string(),
                state,
            });
        };
        let mut text = |name: &str| fields.remove(name);
        let kind = text(field::KIND);
        let queue = text(field::QUEUE);
        let priority = text(field::PRIORITY).and_then(|p| p.parse().ok());
        let record = text(field::RECORD);
        let worker = text(field::WORKER);
        let claim_call = text(field::CLAIM_CALL);
        let result = text(field::RESULT);
        let error = text(field::ERROR);
        let last_error = text(field::LAST_ERROR);
        let progress_message = text(field::PROGRESS_MESSAGE);
        let trace = text(field::TRACE);
        let history = text(field::HISTORY);
        let stored_id = text(field::ID);
        let needs = text(field::NEEDS);
        let reserved_on = text(field::RESERVED_ON);
        let wait_reason = text(field::WAIT_REASON);
        let workflow = text(field::WORKFLOW);
        let parents = text(field::PARENTS);
        let mut number = |name: &str| fields.remove(name).and_then(|v| v.parse::<u64>().ok());
        let small = |n: Option<u64>| n.and_then(|n| u32::try_from(n).ok());
        let attempt = small(number(field::ATTEMPT)).unwrap_or(0);
        let max_attempts = small(number(field::MAX_ATTEMPTS));
        let released = small(number(field::RELEASED));
        let redriven = small(number(field::REDRIVEN));
        let created_ms = number(field::CREATED_MS).unwrap_or(0);
        let stored_updated = number(field::UPDATED_MS);
        let run_at_ms = number(field::RUN_AT_MS).unwrap_or(created_ms);
        let started_ms = number(field::STARTED_MS);
        let first_started_ms = number(field::FIRST_STARTED_MS).or(started_ms);
        let finished_ms = number(field::FINISHED_MS);
        let progress = number(field::PROGRESS);
        let progress_ms = number(field::PROGRESS_MS);
        let timeout_ms = number(field::TIMEOUT_MS);
        let deadline_ms = number(field::DEADLINE_MS);
        let cancel_requested_ms = number(field::CANCEL_REQUESTED_MS);
        let placed_ms = number(field::PLACED_MS);
        let waiting_for = number(field::DEPS_LEFT).filter(|_| parsed_state == State::Waiting);
        let updated_ms = last_update(stored_updated, started_ms, finished_ms);
        let mut task = Self {
            id: stored_id.unwrap_or_else(|| id.to_string()),
            state: parsed_state,
            kind,
            queue,
            priority,
            attempt,
            max_attempts,
            released,
            redriven,
            record,
            worker,
            claim_call,
            created_ms,
            updated_ms,
            run_at_ms,
            first_started_ms,
            started_ms,
            finished_ms,
            result,
            error,
            last_error,
            progress,
            progress_message,
            progress_ms,
            timeout_ms,
            deadline_ms,
            cancel_requested_ms,
            trace,
            history: history.as_deref().map(parse_history).unwrap_or_default(),
            needs,
            reserved_on,
            placed_ms,
            wait_reason,
            workflow,
            parents: parents
                .map(|p| p.lines().map(str::to_string).collect())
                .unwrap_or_default(),
            waiting_for,
            other: fields.into_iter().collect(),
        };
        if history.is_none() && task.state == State::Succeeded {
            task.history = vec![task.implied_ending()];
        }
        Ok(task)
    }

    /// The one history entry of a task that succeeded on its only attempt, which is not
    /// stored: that attempt is the task's `attempt`, `worker`, `started_ms` and `finished_ms`.
    fn implied_ending(&self) -> AttemptEnding {
        AttemptEnding {
            attempt: self.attempt,
            worker: self.worker.clone().unwrap_or_default(),
            started_ms: self.started_ms.unwrap_or(0),
            ended_ms: self.finished_ms.unwrap_or(0),
            outcome: AttemptOutcome::Succeeded,
            error: String::new(),
        }
    }

    /// Every field as text, by name: what `fleetctl status` prints.
    pub fn fields(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let value = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(map) = value {
            for (name, value) in map {
                let text = match (name.as_str(), value) {
                    (field::RECORD, _) => self.record.clone().unwrap_or_default(),
                    (field::RESULT, _) => self.result.clone().unwrap_or_default(),
                    (_, Value::String(s)) => s,
                    (_, other) => other.to_string(),
                };
                out.insert(name, text);
            }
        }
        out
    }
}

/// The fields that time a task's journey, for reading thousands of tasks at once (the demo's
/// summary, the benchmark) without their whole hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskTimes {
    pub state: Option<State>,
    pub attempt: u32,
    pub worker: Option<String>,
    pub created_ms: Option<u64>,
    /// The first start (the only start's `started_ms` until a second one).
    pub first_started_ms: Option<u64>,
    /// The latest start.
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// Length of the stored task JSON.
    pub record_bytes: usize,
}

impl TaskTimes {
    /// What [`TaskTimes::from_values`] reads, in order (and then `HSTRLEN` of the record).
    pub(super) const FIELDS: [&'static str; 6] = [
        field::STATE,
        field::ATTEMPT,
        field::WORKER,
        field::CREATED_MS,
        field::FIRST_STARTED_MS,
        field::STARTED_MS,
    ];
    pub(super) const FINISHED: &'static str = field::FINISHED_MS;
    pub(super) const RECORD: &'static str = field::RECORD;

    /// From `HMGET` of [`Self::FIELDS`] then `finished_ms`, and the record's length; `None`
    /// for a task that is not there.
    pub(super) fn from_values(values: &[Option<String>], record_bytes: usize) -> Option<Self> {
        let text = |i: usize| values.get(i).cloned().flatten();
        let number = |i: usize| text(i).and_then(|v| v.parse::<u64>().ok());
        let state = text(0)?;
        let started_ms = number(5);
        Some(Self {
            state: state.parse().ok(),
            attempt: number(1).and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
            worker: text(2),
            created_ms: number(3),
            first_started_ms: number(4).or(started_ms),
            started_ms,
            finished_ms: number(6),
            record_bytes,
        })
    }
}

/// What a worker reports with each heartbeat (`{fleet}:worker:<id>` field `info`): written by
/// the worker's lease keeper, read by the relay (which partitions are live), `fleetctl
/// workers`, the API and the dashboard.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerInfo {
    pub host: String,
    pub pid: u32,
    pub version: String,
    /// Tasks it runs at once (`worker.concurrency`).
    pub concurrency: usize,
    /// Its consumer group.
    pub group: String,
    /// The task kinds it has handlers for, comma-separated.
    pub kinds: String,
    /// The queues it serves: `*`, since queues share the priority topics.
    pub queues: Vec<String>,
    pub started_ms: u64,
    /// The partitions it consumes, by priority name.
    pub partitions: BTreeMap<String, Vec<i32>>,
    /// What it offers placed tasks, by resource (`slots` = `concurrency`).
    pub capacity: BTreeMap<String, f64>,
    /// Its labels, for placed tasks' `require` and `prefer`.
    pub labels: BTreeMap<String, String>,
    /// Its share under `weighted` placement (0 in heartbeats of workers before placement: 1).
    pub weight: u32,
}

impl WorkerInfo {
    /// The partitions of `priority`'s topic it consumes; `None` if it reported none for it.
    pub fn partitions_of(&self, priority: Priority) -> Option<&[i32]> {
        self.partitions.get(priority.as_str()).map(Vec::as_slice)
    }

    /// Reads a heartbeat's info; what does not parse reads as empty (no partitions).
    pub fn parse(text: &str) -> Self {
        serde_json::from_str(text).unwrap_or_default()
    }
}

/// A stored history, entry by entry: an entry this build cannot read (a newer one's, or a
/// damaged one) is left out and the others are kept.
fn parse_history(text: &str) -> Vec<AttemptEnding> {
    serde_json::from_str::<Vec<Value>>(text)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|entry| serde_json::from_value(entry).ok())
        .collect()
}

/// The time of a task's last change: the latest of `updated_ms` (written by the transitions
/// other than a start and an ending), `started_ms` and `finished_ms`.
pub(super) fn last_update(
    updated_ms: Option<u64>,
    started_ms: Option<u64>,
    finished_ms: Option<u64>,
) -> u64 {
    [updated_ms, started_ms, finished_ms]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0)
}

/// JSON stored as text is shown as JSON (as text when it does not parse).
fn embedded_json<S: Serializer>(text: &Option<String>, out: S) -> Result<S::Ok, S::Error> {
    match text.as_deref().map(serde_json::from_str::<Value>) {
        Some(Ok(value)) => value.serialize(out),
        _ => text.serialize(out),
    }
}

/// Unmodelled fields as the API always showed them: numbers for `*_ms` fields that parse.
fn extra_fields<S: Serializer>(
    fields: &BTreeMap<String, String>,
    out: S,
) -> Result<S::Ok, S::Error> {
    let shown: BTreeMap<&str, Value> = fields
        .iter()
        .map(|(name, value)| {
            let shown = match value.parse::<u64>() {
                Ok(n) if name.ends_with("_ms") => Value::from(n),
                _ => Value::String(value.clone()),
            };
            (name.as_str(), shown)
        })
        .collect();
    shown.serialize(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(fields: &[(&str, &str)]) -> HashMap<String, String> {
        fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_task_that_succeeded_once_has_its_implied_history_and_times() {
        let task = StoredTask::from_hash(
            "t1",
            hash(&[
                ("state", "succeeded"),
                ("attempt", "1"),
                ("worker", "w1"),
                ("created_ms", "100"),
                ("started_ms", "150"),
                ("finished_ms", "170"),
                ("result", r#"{"ok":true}"#),
                ("record", r#"{"id":"t1","kind":"noop"}"#),
            ]),
        )
        .unwrap();
        assert_eq!(task.id, "t1");
        assert_eq!(task.run_at_ms, 100, "due when created");
        assert_eq!(task.first_started_ms, Some(150));
        assert_eq!(task.updated_ms, 170);
        assert_eq!(task.history.len(), 1);
        assert_eq!(task.history[0].outcome, AttemptOutcome::Succeeded);
        assert_eq!(task.history[0].ended_ms, 170);
        let json = serde_json::to_value(&task).unwrap();
        assert_eq!(json["result"]["ok"], true, "embedded JSON shown as JSON");
        assert_eq!(json["attempt"], 1);
        assert_eq!(json["history"][0]["worker"], "w1");
        assert!(json.get("progress").is_none(), "absent fields stay absent");
        assert_eq!(task.fields()["attempt"], "1");
        assert_eq!(task.fields()["result"], r#"{"ok":true}"#);
    }

    #[test]
    fn a_stored_history_and_unknown_fields_are_kept() {
        let history = r#"[{"attempt":1,"worker":"w","started_ms":1,"ended_ms":2,"outcome":"lease_expired","error":"lost"},{"attempt":2,"worker":"w","started_ms":3,"ended_ms":4,"outcome":"from_the_future","error":""}]"#;
        let task = StoredTask::from_hash(
            "t2",
            hash(&[
                ("state", "failed"),
                ("attempt", "2"),
                ("history", history),
                ("upgraded_ms", "9"),
                ("note", "kept"),
                ("updated_ms", "50"),
                ("started_ms", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(task.history[0].outcome, AttemptOutcome::LeaseExpired);
        assert_eq!(
            task.history[1].outcome,
            AttemptOutcome::Other("from_the_future".into())
        );
        assert_eq!(task.updated_ms, 50);
        let json = serde_json::to_value(&task).unwrap();
        assert_eq!(json["upgraded_ms"], 9);
        assert_eq!(json["note"], "kept");
        assert_eq!(json["history"][1]["outcome"], "from_the_future");
    }

    #[test]
    fn a_worker_info_round_trips_and_a_bad_one_owns_nothing() {
        let info = WorkerInfo {
            host: "h".into(),
            concurrency: 8,
            partitions: [("normal".to_string(), vec![0, 2])].into(),
            ..WorkerInfo::default()
        };
        let text = serde_json::to_string(&info).unwrap();
        let read = WorkerInfo::parse(&text);
        assert_eq!(read, info);
        assert_eq!(read.partitions_of(Priority::Normal), Some(&[0, 2][..]));
        assert_eq!(read.partitions_of(Priority::High), None);
        assert_eq!(WorkerInfo::parse("not json"), WorkerInfo::default());
        // A partial info (an older worker's) reads with defaults for the rest.
        let partial = WorkerInfo::parse(r#"{"partitions":{"low":[1]},"extra":true}"#);
        assert_eq!(partial.partitions_of(Priority::Low), Some(&[1][..]));
    }

    #[test]
    fn an_unreadable_history_entry_is_left_out_and_nothing_is_made_up() {
        let history = r#"[{"attempt":"one"},{"attempt":2,"worker":"w","started_ms":3,"ended_ms":4,"outcome":"succeeded","error":""}]"#;
        let task = StoredTask::from_hash(
            "t3",
            hash(&[
                ("state", "succeeded"),
                ("attempt", "2"),
                ("history", history),
            ]),
        )
        .unwrap();
        assert_eq!(task.history.len(), 1);
        assert_eq!(task.history[0].attempt, 2);
        let garbled =
            StoredTask::from_hash("t4", hash(&[("state", "succeeded"), ("history", "[{")]))
                .unwrap();
        assert!(
            garbled.history.is_empty(),
            "a stored history is not implied"
        );
    }

    #[test]
    fn a_hash_without_a_known_state_is_not_a_task() {
        let err = StoredTask::from_hash("x", hash(&[("attempt", "1")])).unwrap_err();
        assert_eq!(err.state, None);
        let err = StoredTask::from_hash("x", hash(&[("state", "zombie")])).unwrap_err();
        assert_eq!(err.state.as_deref(), Some("zombie"));
    }
}
