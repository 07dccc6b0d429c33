//! The task model: what producers submit ([`TaskSpec`]), what Redis stores and the task topics
//! carry ([`TaskRecord`], inside the versioned [`crate::wire::Envelope`]), and the lifecycle
//! [`State`]s.
//!
//! A submission is parsed once, into typed structs that reject unknown fields. The payload is
//! kept as raw JSON text from then on: the scheduler never re-parses it, and a worker parses it
//! only when its handler asks for it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::placement::{self, LabelRules, Resources};
use crate::priority::Priority;

/// Bytes a record may take beyond `tasks.max_task_bytes`: the envelope and filled-in record
/// fields, headers, and a dead letter's error and attempt history (see `lua/prelude.lua`).
pub const RECORD_ROOM: usize = 256 * 1024;

/// The largest record Fleet may produce for tasks of at most `max_task_bytes`: every link on
/// a task's way (the producers' `message.max.bytes`, each topic's `max.message.bytes`) must
/// carry one, or a task Redis accepted could sit in the outbox forever.
pub fn record_limit(max_task_bytes: usize) -> usize {
    max_task_bytes + RECORD_ROOM
}

/// Longest `id`, `kind`, `queue`, `key` or `idempotency_key`.
pub const MAX_NAME_LEN: usize = 128;
/// Upper bound of `max_attempts`.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;
/// Upper bound of `timeout_ms` (one week).
pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
/// The queue of tasks that name none.
pub const DEFAULT_QUEUE: &str = "default";

/// A task as producers submit it (JSON on the submit topic or the HTTP API).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Client-chosen id; resubmitting the same id returns the existing task.
    #[serde(default)]
    pub id: Option<String>,
    /// Which handler runs the task.
    pub kind: String,
    /// Handler input, any JSON (default `null`).
    #[serde(default)]
    pub payload: Option<Box<RawValue>>,
    #[serde(default)]
    pub priority: Priority,
    /// Logical queue for listing, pausing and per-queue limits (default `default`).
    #[serde(default)]
    pub queue: Option<String>,
    /// Partition key: tasks with the same key land on the same partition, in order.
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Maps to one task id within the idempotency window.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Do not run before this time (RFC 3339, e.g. `2030-01-01T09:00:00Z`).
    #[serde(default)]
    pub run_at: Option<String>,
    /// Do not run until this many ms after acceptance (by Redis time).
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// What the task needs of the worker that runs it (`cpu`, `memory_mb`, `gpu`, any name):
    /// a task with needs or label rules is placed (see [`crate::placement`]).
    #[serde(default)]
    pub resources: Option<Resources>,
    /// Worker labels that must match.
    #[serde(default)]
    pub require: Option<LabelRules>,
    /// Worker labels that should match: they rank the workers that fit.
    #[serde(default)]
    pub prefer: Option<LabelRules>,
    /// Expected run time, for shortest-job-first queues.
    #[serde(default)]
    pub estimated_ms: Option<u64>,
    /// How long a placed task may wait for a worker that fits before it fails.
    #[serde(default)]
    pub placement_timeout_ms: Option<u64>,
    /// At most so many tasks of this key run at once, fleet-wide (see [`crate::flow`]).
    #[serde(default)]
    pub concurrency_key: Option<String>,
    /// Starts of tasks with this key are rate-limited by its token bucket.
    #[serde(default)]
    pub rate_key: Option<String>,
    /// Whose task it is: tenant quotas and fair-share weights apply.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Ids of tasks that must end before this one runs (see [`crate::workflow`]).
    #[serde(default)]
    pub depends_on: Option<Vec<String>>,
    /// What happens to it when a parent does not succeed (default `fail`).
    #[serde(default)]
    pub on_parent_failure: Option<OnParentFailure>,
    /// The workflow it belongs to: given, or inherited (see [`crate::workflow`]).
    #[serde(default)]
    pub workflow: Option<String>,
}

/// Most parents one task may name. A chord of more parents is built in two levels.
pub const MAX_PARENTS: usize = 1000;

/// What happens to a task when a parent ends without succeeding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnParentFailure {
    /// It fails with the reason `dependency X failed` (or ends `cancelled` when X was
    /// cancelled), without running.
    #[default]
    Fail,
    /// It ends `skipped`, without running.
    Skip,
    /// It runs once every parent has ended, whatever their outcome (`ctx.parents()` tells).
    Run,
}

impl OnParentFailure {
    pub const fn as_str(self) -> &'static str {
        match self {
            OnParentFailure::Fail => "fail",
            OnParentFailure::Skip => "skip",
            OnParentFailure::Run => "run",
        }
    }

    pub fn is_default(&self) -> bool {
        *self == OnParentFailure::Fail
    }
}

/// Longest accepted `delay_ms`, and farthest `run_at` from now: one year.
pub const MAX_DELAY_MS: u64 = 365 * 24 * 3600 * 1000;

/// Why a submission was refused. The text is safe to return to the submitter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidTask {
    #[error("task is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("task is not valid UTF-8")]
    NotUtf8,
    #[error("task is not valid JSON: {0}")]
    Json(String),
    #[error("`{field}` {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
}

impl InvalidTask {
    /// A short machine-readable code for headers, metrics and HTTP bodies.
    pub fn code(&self) -> &'static str {
        match self {
            InvalidTask::TooLarge { .. } => "too_large",
            InvalidTask::NotUtf8 => "not_utf8",
            InvalidTask::Json(_) => "invalid_json",
            InvalidTask::Field { .. } => "invalid_field",
        }
    }

    fn field(field: &'static str, problem: impl Into<String>) -> Self {
        Self::Field {
            field,
            problem: problem.into(),
        }
    }
}

/// Deepest nesting of arrays and objects accepted in a task's `payload` (it is kept as raw
/// text, which serde does not depth-check, and handlers would choke on it later).
pub const MAX_DEPTH: usize = 64;

/// The deepest nesting of `[`/`{` in JSON text, ignoring brackets inside strings.
fn nesting_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Parses an RFC 3339 time to unix ms; refuses times before 1970 or more than a year ahead of
/// this machine's clock (Redis time decides when it is due; this only bounds absurd input).
pub fn parse_run_at(text: &str) -> Result<u64, InvalidTask> {
    let shown: String = text.chars().take(64).collect();
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            InvalidTask::field(
                "run_at",
                format!("`{shown}` is not an RFC 3339 time (e.g. 2030-01-01T09:00:00Z)"),
            )
        })?;
    let ms = at.unix_timestamp_nanos() / 1_000_000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis()) as i128;
    if ms < 0 || ms > now + i128::from(MAX_DELAY_MS) {
        return Err(InvalidTask::field(
            "run_at",
            format!("`{shown}` is before 1970 or more than a year ahead"),
        ));
    }
    Ok(ms as u64)
}

/// Validates a name-like field: 1–128 characters of `[A-Za-z0-9_.:/-]`.
fn check_name(field: &'static str, value: &str) -> Result<(), InvalidTask> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(InvalidTask::field(
            field,
            format!("must be 1 to {MAX_NAME_LEN} characters"),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.:/-".contains(&b))
    {
        return Err(InvalidTask::field(
            field,
            "may only contain letters, digits and _ . : / -",
        ));
    }
    Ok(())
}

/// Checks a queue name as a task's `queue` is checked, so that a pause or a filter names a
/// queue some task can have.
pub fn check_queue(name: &str) -> Result<(), InvalidTask> {
    check_name("queue", name)
}

impl TaskSpec {
    /// Parses and validates a submission of at most `max_bytes`.
    pub fn parse(bytes: &[u8], max_bytes: usize) -> Result<Self, InvalidTask> {
        if bytes.len() > max_bytes {
            return Err(InvalidTask::TooLarge {
                size: bytes.len(),
                limit: max_bytes,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|_| InvalidTask::NotUtf8)?;
        // The task object around the payload is one level more than the payload's own.
        if nesting_depth(bytes) > MAX_DEPTH + 1 {
            return Err(InvalidTask::Json(format!(
                "`payload` nests deeper than {MAX_DEPTH} levels"
            )));
        }
        let mut json = serde_json::Deserializer::from_str(text);
        let spec: TaskSpec = serde_path_to_error::deserialize(&mut json).map_err(|e| {
            // Name the field: serde's own text says only where in the text it went wrong.
            let path = e.path().to_string();
            let mut message = if path == "." {
                e.inner().to_string()
            } else {
                format!("`{path}`: {}", e.inner())
            };
            if message.len() > 200 {
                message.truncate(message.floor_char_boundary(200));
            }
            InvalidTask::Json(message)
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every field's form and range.
    pub fn validate(&self) -> Result<(), InvalidTask> {
        check_name("kind", &self.kind)?;
        if let Some(id) = &self.id {
            check_name("id", id)?;
        }
        if let Some(queue) = &self.queue {
            check_name("queue", queue)?;
        }
        for (field, value) in [
            ("concurrency_key", &self.concurrency_key),
            ("rate_key", &self.rate_key),
            ("tenant", &self.tenant),
        ] {
            if let Some(value) = value {
                check_name(field, value)?;
            }
        }
        if let Some(key) = &self.key
            && (key.is_empty() || key.len() > MAX_NAME_LEN)
        {
            return Err(InvalidTask::field(
                "key",
                format!("must be 1 to {MAX_NAME_LEN} bytes"),
            ));
        }
        if let Some(key) = &self.idempotency_key
            && (key.is_empty() || key.len() > MAX_NAME_LEN)
        {
            return Err(InvalidTask::field(
                "idempotency_key",
                format!("must be 1 to {MAX_NAME_LEN} bytes"),
            ));
        }
        if let Some(n) = self.max_attempts
            && !(1..=MAX_ATTEMPTS_LIMIT).contains(&n)
        {
            return Err(InvalidTask::field(
                "max_attempts",
                format!("must be 1 to {MAX_ATTEMPTS_LIMIT}"),
            ));
        }
        // 0 opts out of a timeout, also of a per-kind default.
        if let Some(ms) = self.timeout_ms
            && ms > MAX_TIMEOUT_MS
        {
            return Err(InvalidTask::field(
                "timeout_ms",
                format!("must be 0 (no timeout) to {MAX_TIMEOUT_MS}"),
            ));
        }
        if self.run_at.is_some() && self.delay_ms.is_some() {
            return Err(InvalidTask::field(
                "run_at",
                "give run_at or delay_ms, not both",
            ));
        }
        if let Some(ms) = self.delay_ms
            && ms > MAX_DELAY_MS
        {
            return Err(InvalidTask::field(
                "delay_ms",
                format!("must be at most {MAX_DELAY_MS} (one year)"),
            ));
        }
        if let Some(text) = &self.run_at {
            parse_run_at(text)?;
        }
        if let Some(workflow) = &self.workflow {
            check_name("workflow", workflow)?;
        }
        self.validate_dependencies()?;
        self.validate_placement()
    }

    /// Checks `depends_on` and `on_parent_failure` on their own; a submission's dependencies
    /// as a whole are checked by [`crate::workflow::prepare`].
    fn validate_dependencies(&self) -> Result<(), InvalidTask> {
        let parents = self.depends_on.as_deref().unwrap_or_default();
        if parents.len() > MAX_PARENTS {
            return Err(InvalidTask::field(
                "depends_on",
                format!(
                    "lists {} tasks, over the limit of {}",
                    parents.len(),
                    MAX_PARENTS
                ),
            ));
        }
        let mut seen = std::collections::HashSet::with_capacity(parents.len());
        for parent in parents {
            check_name("depends_on", parent)?;
            if !seen.insert(parent.as_str()) {
                return Err(InvalidTask::field(
                    "depends_on",
                    format!("lists `{parent}` twice"),
                ));
            }
            if self.id.as_deref() == Some(parent.as_str()) {
                return Err(InvalidTask::field(
                    "depends_on",
                    format!("task `{parent}` cannot depend on itself"),
                ));
            }
        }
        if self.on_parent_failure.is_some() && parents.is_empty() {
            return Err(InvalidTask::field(
                "on_parent_failure",
                "applies only to a task with `depends_on`",
            ));
        }
        Ok(())
    }

    /// Checks the placement fields: amounts, label rules, and the two durations.
    fn validate_placement(&self) -> Result<(), InvalidTask> {
        if let Some(resources) = &self.resources {
            placement::check_resources(resources)
                .map_err(|problem| InvalidTask::field("resources", problem))?;
        }
        if let Some(rules) = &self.require {
            placement::check_rules(rules)
                .map_err(|problem| InvalidTask::field("require", problem))?;
        }
        if let Some(rules) = &self.prefer {
            placement::check_rules(rules)
                .map_err(|problem| InvalidTask::field("prefer", problem))?;
        }
        if self.estimated_ms.is_some_and(|ms| ms > MAX_DELAY_MS) {
            return Err(InvalidTask::field(
                "estimated_ms",
                format!("must be at most {MAX_DELAY_MS} (one year)"),
            ));
        }
        if self
            .placement_timeout_ms
            .is_some_and(|ms| ms == 0 || ms > MAX_DELAY_MS)
        {
            return Err(InvalidTask::field(
                "placement_timeout_ms",
                format!("must be 1 to {MAX_DELAY_MS} (one year)"),
            ));
        }
        Ok(())
    }
}

/// A task as stored in Redis (`spec` field) and carried in every [`crate::wire::Envelope`]:
/// the validated submission with its defaults filled in. The attempt lives outside it, in the
/// envelope.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRecord {
    pub id: String,
    pub kind: String,
    pub payload: Box<RawValue>,
    pub priority: Priority,
    pub queue: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub max_attempts: u32,
    /// 0 when the task has no timeout of its own.
    pub timeout_ms: u64,
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "LabelRules::is_empty")]
    pub require: LabelRules,
    #[serde(default, skip_serializing_if = "LabelRules::is_empty")]
    pub prefer: LabelRules,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    #[serde(default, skip_serializing_if = "OnParentFailure::is_default")]
    pub on_parent_failure: OnParentFailure,
    /// Set for every task of a submission with dependencies (see [`crate::workflow::prepare`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Placed (a worker is chosen for it by the dispatcher) rather than streamed: it has needs
    /// or label rules, names a `concurrency_key`, `rate_key` or `tenant`, or its queue's
    /// strategy, placement policy or limits ask for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub placed: bool,
}

/// Defaults applied to submissions that leave a field out.
#[derive(Debug, Clone, Copy)]
pub struct TaskDefaults {
    pub max_attempts: u32,
    pub timeout_ms: u64,
}

impl TaskRecord {
    /// Fills in defaults; `new_id` supplies an id when the submission has none.
    pub fn from_spec(
        spec: TaskSpec,
        defaults: TaskDefaults,
        new_id: impl FnOnce() -> String,
    ) -> Self {
        let null = || RawValue::from_string("null".into()).expect("null is JSON");
        let placed = spec.resources.as_ref().is_some_and(|r| !r.is_empty())
            || spec.require.as_ref().is_some_and(|r| !r.is_empty())
            || spec.prefer.as_ref().is_some_and(|r| !r.is_empty())
            || spec.concurrency_key.is_some()
            || spec.rate_key.is_some()
            || spec.tenant.is_some();
        Self {
            id: spec.id.unwrap_or_else(new_id),
            kind: spec.kind,
            payload: spec.payload.unwrap_or_else(null),
            priority: spec.priority,
            queue: spec.queue.unwrap_or_else(|| DEFAULT_QUEUE.to_string()),
            key: spec.key,
            max_attempts: spec.max_attempts.unwrap_or(defaults.max_attempts),
            timeout_ms: spec.timeout_ms.unwrap_or(defaults.timeout_ms),
            resources: spec.resources.unwrap_or_default(),
            require: spec.require.unwrap_or_default(),
            prefer: spec.prefer.unwrap_or_default(),
            estimated_ms: spec.estimated_ms,
            placement_timeout_ms: spec.placement_timeout_ms,
            concurrency_key: spec.concurrency_key,
            rate_key: spec.rate_key,
            tenant: spec.tenant,
            depends_on: spec.depends_on.unwrap_or_default(),
            on_parent_failure: spec.on_parent_failure.unwrap_or_default(),
            workflow: spec.workflow,
            placed,
        }
    }

    /// Whether the task is placed rather than streamed (see [`TaskRecord::placed`]).
    pub fn is_placed(&self) -> bool {
        self.placed
    }

    /// What the task reserves on the worker it is placed on, in Redis's text form
    /// ([`placement::Amounts::encode`]); empty for a streamed task.
    pub fn needs_text(&self) -> String {
        if self.is_placed() {
            placement::Amounts::needs(&self.resources).encode()
        } else {
            String::new()
        }
    }

    /// The record as stored in Redis and embedded in envelopes.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a task record always serializes")
    }
}

/// A fresh task id: a UUIDv7, so ids sort by creation time.
pub fn new_task_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Where a task is in its life. Redis holds the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Accepted; waits for its parents (`depends_on`) to end. Nothing of it is on Kafka.
    Waiting,
    /// Accepted; its message is on, or on its way to, a task topic.
    Pending,
    /// Waiting for its run time or a retry backoff.
    Scheduled,
    /// Claimed by one worker, lease held.
    Running,
    Succeeded,
    /// Attempts exhausted or a permanent error; a dead-letter record is written.
    Failed,
    Cancelled,
    /// Not run: a parent did not succeed and its `on_parent_failure` said `skip` (or a parent
    /// was skipped).
    Skipped,
}

impl State {
    pub const ALL: [State; 8] = [
        State::Waiting,
        State::Pending,
        State::Scheduled,
        State::Running,
        State::Succeeded,
        State::Failed,
        State::Cancelled,
        State::Skipped,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Pending => "pending",
            State::Scheduled => "scheduled",
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
            State::Skipped => "skipped",
        }
    }

    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            State::Succeeded | State::Failed | State::Cancelled | State::Skipped
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown state `{}`", s.chars().take(32).collect::<String>()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 20;
    const DEFAULTS: TaskDefaults = TaskDefaults {
        max_attempts: 5,
        timeout_ms: 0,
    };

    #[test]
    fn minimal_submission_gets_defaults() {
        let spec = TaskSpec::parse(br#"{"kind":"noop"}"#, LIMIT).unwrap();
        let record = TaskRecord::from_spec(spec, DEFAULTS, || "id-1".into());
        assert_eq!(record.id, "id-1");
        assert_eq!(record.priority, Priority::Normal);
        assert_eq!(record.queue, "default");
        assert_eq!(record.max_attempts, 5);
        assert_eq!(record.payload.get(), "null");
    }

    #[test]
    fn bad_submissions_are_refused_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "invalid_json"),
            (b"\xff\xfe{}", "not_utf8"),
            (br#"{"kind":"noop","tenant_id":"b"}"#, "invalid_json"),
            (br#"{"kind":"noop","tenant":"a b"}"#, "invalid_field"),
            (br#"{"kind":"noop","rate_key":""}"#, "invalid_field"),
            (
                br#"{"kind":"noop","concurrency_key":["x"]}"#,
                "invalid_json",
            ),
            (br#"{"kind":7}"#, "invalid_json"),
            (br#"{"payload":1}"#, "invalid_json"),
            (br#"{"kind":""}"#, "invalid_field"),
            (br#"{"kind":"a b"}"#, "invalid_field"),
            (br#"{"kind":"noop","priority":"urgent"}"#, "invalid_json"),
            (br#"{"kind":"noop","max_attempts":0}"#, "invalid_field"),
            (br#"{"kind":"noop","max_attempts":-1}"#, "invalid_json"),
            (br#"{"kind":"noop","max_attempts":1e99}"#, "invalid_json"),
            (
                br#"{"kind":"noop","timeout_ms":604800001}"#,
                "invalid_field",
            ),
            (br#"{"kind":"noop","kind":"echo"}"#, "invalid_json"),
            (b"", "invalid_json"),
            (b"[]", "invalid_json"),
        ];
        for (input, code) in cases {
            let err = TaskSpec::parse(input, LIMIT).unwrap_err();
            assert_eq!(
                err.code(),
                *code,
                "{} → {err}",
                String::from_utf8_lossy(input)
            );
        }
        let long_id = format!(r#"{{"kind":"noop","id":"{}"}}"#, "x".repeat(200));
        assert_eq!(
            TaskSpec::parse(long_id.as_bytes(), LIMIT)
                .unwrap_err()
                .code(),
            "invalid_field"
        );
    }

    #[test]
    fn oversized_and_deeply_nested_input_is_refused_without_crashing() {
        let big = format!(r#"{{"kind":"noop","payload":"{}"}}"#, "x".repeat(LIMIT));
        assert_eq!(
            TaskSpec::parse(big.as_bytes(), LIMIT).unwrap_err().code(),
            "too_large"
        );
        let deep = format!(
            r#"{{"kind":"noop","payload":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let err = TaskSpec::parse(deep.as_bytes(), LIMIT)
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains("nests deeper"), "{err}");
        // The limit is the payload's own depth: 64 levels pass, 65 do not.
        let nested = |levels: usize| {
            format!(
                r#"{{"kind":"noop","payload":{}{}}}"#,
                "[".repeat(levels),
                "]".repeat(levels)
            )
        };
        assert!(TaskSpec::parse(nested(MAX_DEPTH).as_bytes(), LIMIT).is_ok());
        let objects = format!(
            r#"{{"kind":"noop","payload":{}1{}}}"#,
            r#"{"a":"#.repeat(MAX_DEPTH),
            "}".repeat(MAX_DEPTH)
        );
        assert!(TaskSpec::parse(objects.as_bytes(), LIMIT).is_ok());
        let err = TaskSpec::parse(nested(MAX_DEPTH + 1).as_bytes(), LIMIT).unwrap_err();
        assert_eq!(err.code(), "invalid_json");
        assert!(
            err.to_string().contains("`payload` nests deeper than 64"),
            "{err}"
        );
        let in_string = format!(
            r#"{{"kind":"noop","payload":"{}\"{}"}}"#,
            "[".repeat(1000),
            "{".repeat(1000)
        );
        assert!(
            TaskSpec::parse(in_string.as_bytes(), LIMIT).is_ok(),
            "brackets inside strings do not count"
        );
    }

    #[test]
    fn a_wrong_type_names_its_field_and_a_zero_timeout_opts_out_of_the_default() {
        let err = TaskSpec::parse(br#"{"kind":"noop","max_attempts":"five"}"#, LIMIT).unwrap_err();
        assert_eq!(err.code(), "invalid_json");
        assert!(
            err.to_string()
                .contains("JSON: `max_attempts`: invalid type"),
            "{err}"
        );
        let err = TaskSpec::parse(br#"{"kind":"noop","priority":7}"#, LIMIT).unwrap_err();
        assert!(err.to_string().contains("JSON: `priority`: "), "{err}");
        let err = TaskSpec::parse(br#"{"kind":"noop","colour":"red"}"#, LIMIT).unwrap_err();
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");

        let spec = TaskSpec::parse(br#"{"kind":"noop","timeout_ms":0}"#, LIMIT).unwrap();
        let defaults = TaskDefaults {
            max_attempts: 5,
            timeout_ms: 30_000,
        };
        let record = TaskRecord::from_spec(spec, defaults, || "t".into());
        assert_eq!(record.timeout_ms, 0, "0 = no timeout, whatever the default");
    }

    #[test]
    fn placement_fields_are_checked_and_make_the_task_placed() {
        let spec = TaskSpec::parse(
            br#"{"kind":"noop","resources":{"cpu":0.5,"gpu":1},"require":{"zone":["a","b"]},"prefer":{"disk":"ssd"},"estimated_ms":900}"#,
            LIMIT,
        )
        .unwrap();
        let record = TaskRecord::from_spec(spec, DEFAULTS, || "p".into());
        assert!(record.is_placed());
        assert_eq!(record.needs_text(), "cpu=500;gpu=1000;slots=1000");
        let back: TaskRecord = serde_json::from_str(&record.to_json()).unwrap();
        assert_eq!(back.require, record.require);
        // A streamed task's record is what it was before placement existed.
        let plain = TaskRecord::from_spec(
            TaskSpec::parse(br#"{"kind":"noop"}"#, LIMIT).unwrap(),
            DEFAULTS,
            || "s".into(),
        );
        assert!(!plain.is_placed());
        assert_eq!(plain.needs_text(), "");
        assert!(!plain.to_json().contains("placed"), "{}", plain.to_json());

        let many: String = (0..33).map(|i| format!(r#""r{i}":1,"#)).collect();
        let too_many = format!(
            r#"{{"kind":"noop","resources":{{{}}}}}"#,
            many.trim_end_matches(',')
        );
        let refused_field = [
            r#"{"kind":"noop","resources":{"cpu":-1}}"#,
            r#"{"kind":"noop","resources":{"cpu":1e10}}"#,
            r#"{"kind":"noop","resources":{"a b":1}}"#,
            too_many.as_str(),
            r#"{"kind":"noop","require":{"zone":[]}}"#,
            r#"{"kind":"noop","prefer":{"zone":"a b"}}"#,
            r#"{"kind":"noop","placement_timeout_ms":0}"#,
        ];
        let refused_json = [
            r#"{"kind":"noop","resources":{"cpu":1e999}}"#,
            r#"{"kind":"noop","resources":{"cpu":"2"}}"#,
            r#"{"kind":"noop","resources":[1]}"#,
            r#"{"kind":"noop","require":{"zone":7}}"#,
            r#"{"kind":"noop","estimated_ms":-5}"#,
        ];
        for (inputs, code) in [
            (&refused_field[..], "invalid_field"),
            (&refused_json[..], "invalid_json"),
        ] {
            for input in inputs {
                // The field after `kind`, which the reason must name.
                let field = input.split('"').nth(5).expect("a field");
                let err = TaskSpec::parse(input.as_bytes(), LIMIT)
                    .map(|_| ())
                    .unwrap_err();
                assert_eq!(err.code(), code, "{input}: {err}");
                assert!(err.to_string().contains(field), "{err} names {field}");
            }
        }
    }

    #[test]
    fn delays_and_run_times_are_checked() {
        let in_an_hour = (time::OffsetDateTime::now_utc() + std::time::Duration::from_secs(3600))
            .to_offset(time::macros::offset!(+2))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let ok = TaskSpec::parse(
            format!(r#"{{"kind":"noop","run_at":"{in_an_hour}"}}"#).as_bytes(),
            LIMIT,
        );
        assert!(ok.is_ok(), "{ok:?}");
        assert_eq!(
            parse_run_at("2020-01-01T02:00:00+02:00").unwrap(),
            1_577_836_800_000,
            "offsets honoured"
        );
        let cases: &[&[u8]] = &[
            br#"{"kind":"noop","run_at":"tomorrow"}"#,
            br#"{"kind":"noop","run_at":"1969-12-31T23:59:59Z"}"#,
            br#"{"kind":"noop","run_at":"9999-01-01T00:00:00Z"}"#,
            br#"{"kind":"noop","delay_ms":99999999999999}"#,
            br#"{"kind":"noop","delay_ms":5,"run_at":"2030-01-01T00:00:00Z"}"#,
        ];
        for input in cases {
            let err = TaskSpec::parse(input, LIMIT).map(|_| ()).unwrap_err();
            assert_eq!(
                err.code(),
                "invalid_field",
                "{}: {err}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            TaskSpec::parse(br#"{"kind":"noop","delay_ms":-1}"#, LIMIT)
                .map(|_| ())
                .unwrap_err()
                .code(),
            "invalid_json"
        );
    }
}
