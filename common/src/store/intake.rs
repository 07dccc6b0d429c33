//! A task's way in: recording submissions as `pending` (idempotent by id and key), confirming
//! that their first dispatch reached Kafka, and counting what was refused or repeated.

use super::attempts::{Attempt, Completion};
use super::keys::{self};
use super::{Store, StoreError, scripts};
use crate::settings::TaskSettings;
use crate::task::{State, TaskRecord, TaskSpec, parse_run_at};
use crate::trace::TraceParent;

/// A validated task ready to be recorded.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub record: TaskRecord,
    /// `record` serialized once, stored in Redis and embedded in every envelope.
    pub record_json: String,
    pub idempotency_key: Option<String>,
    /// Unix ms before which the task must not run; 0 for now.
    pub run_at_ms: u64,
    /// Or: ms after acceptance (by Redis time) before it may run; 0 for none.
    pub delay_ms: u64,
    /// The task's trace context, sent with every dispatch.
    pub trace: TraceParent,
    /// The quotas it is accepted within (`max_waiting` of its queue and tenant), in the accept
    /// script's text form ([`crate::flow::quotas_text`]); empty for none.
    pub quotas: String,
    /// Its submission's dependencies, when it has any (see [`crate::workflow::prepare`]).
    pub membership: Option<Membership>,
}

impl NewTask {
    /// A validated submission with its defaults (global or of its kind) filled in; `new_id`
    /// names it if it has no id.
    pub fn from_spec(
        spec: TaskSpec,
        settings: &TaskSettings,
        new_id: impl FnOnce() -> String,
    ) -> Self {
        let defaults = settings.defaults_for(&spec.kind);
        let idempotency_key = spec.idempotency_key.clone();
        // `run_at` was checked by `TaskSpec::validate`.
        let run_at_ms = spec
            .run_at
            .as_deref()
            .and_then(|t| parse_run_at(t).ok())
            .unwrap_or(0);
        let delay_ms = spec.delay_ms.unwrap_or(0);
        let record = TaskRecord::from_spec(spec, defaults, new_id);
        Self {
            record_json: record.to_json(),
            record,
            idempotency_key,
            run_at_ms,
            delay_ms,
            trace: TraceParent::new_root(),
            quotas: String::new(),
            membership: None,
        }
    }
}

impl NewTask {
    /// Makes the task placed (its queue's strategy or policy asks for it).
    pub fn make_placed(&mut self) {
        if !self.record.placed {
            self.record.placed = true;
            self.record_json = self.record.to_json();
        }
    }
}

/// Where a task stands in its submission's dependencies, for the accept script.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// The submission (unique within the process): accepted whole or refused whole.
    pub group: u64,
    /// Its place in a topological order of the submission: parents come first.
    pub rank: usize,
    /// The workflow of a task that names none and whose first parent has none: the first
    /// task's workflow, or its id. Empty for a batch record without dependencies: accepted
    /// whole, in no workflow.
    pub default_workflow: String,
}

/// What [`Store::accept`] did with one submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// New and pending: publish it now.
    Pending(String),
    /// New and waiting for its run time: the relay publishes it then.
    Scheduled(String),
    /// New and pending, waiting for the dispatcher to choose its worker (a placed task).
    Placing(String),
    /// Already known (same id or idempotency key): the existing task's id.
    Duplicate(String),
    /// Refused: accepting it would make more tasks wait than a quota allows (the reason).
    OverQuota(String),
    /// New and waiting for its parents (`depends_on`) to end.
    Waiting(String),
    /// New and already ended, without running: a parent had ended without success (its state:
    /// failed, cancelled or skipped).
    Ended(String, State),
    /// Refused with the rest of its submission: a dependency is wrong (the reason, e.g. an
    /// unknown parent). Nothing of the submission is stored.
    Refused(String),
}

impl Store {
    /// Records new submissions, in one call.
    pub async fn accept(&self, tasks: &[NewTask]) -> Result<Vec<Accepted>, StoreError> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.accept_call(tasks);
        inv.arg(0); // no completion
        let rows: Vec<String> = inv.invoke_async(&mut self.conn.clone()).await?;
        answers(rows, tasks)
    }

    /// Records a successful attempt and the follow-up tasks its handler returned, in one
    /// script call (see `lua/accept.lua`): both are stored, or neither. The follow-ups are one
    /// submission (see [`crate::workflow::prepare_follow_ups`]). Returns how the completion
    /// went and, when it succeeded, what became of each follow-up.
    pub async fn complete_spawning(
        &self,
        worker: &str,
        (id, attempt): Attempt<'_>,
        result: &str,
        placed: bool,
        follow_ups: &[NewTask],
    ) -> Result<(Completion, Vec<Accepted>), StoreError> {
        let mut inv = self.accept_call(follow_ups);
        inv.arg(1)
            .arg(id)
            .arg(attempt)
            .arg(worker)
            .arg(result)
            .arg(u8::from(placed));
        inv.key(self.keys.task(id));
        let mut rows: Vec<String> = inv.invoke_async(&mut self.conn.clone()).await?;
        if let Some(code) = rows.first().and_then(|r| r.strip_prefix('!')) {
            return Ok((Completion::from_answer(code), Vec::new()));
        }
        let Some(code) = rows.pop().filter(|_| rows.len() == follow_ups.len()) else {
            return Err(StoreError::Protocol(
                "accept answered for a different number of tasks",
            ));
        };
        Ok((Completion::from_answer(&code), answers(rows, follow_ups)?))
    }

    /// The accept script's call for `tasks`, up to its completion section.
    fn accept_call(&self, tasks: &[NewTask]) -> scripts::ScriptCall<'static> {
        let mut inv = self.invocation(&scripts::ACCEPT);
        inv.arg(tasks.len())
            .arg(self.redeliver_ms)
            .arg(self.idempotency_window_ms);
        for task in tasks {
            let key = self.keys.task(&task.record.id);
            let idem = task
                .idempotency_key
                .as_deref()
                .map_or_else(|| key.clone(), |k| self.keys.idempotency(k));
            inv.key(key)
                .key(idem)
                .key(self.keys.queue_index(&task.record.queue));
            inv.arg(&task.record.id)
                .arg(&task.record.queue)
                .arg(task.record.priority.as_str())
                .arg(task.record.max_attempts)
                .arg(&task.record_json)
                .arg(u8::from(task.idempotency_key.is_some()))
                .arg(task.run_at_ms)
                .arg(task.delay_ms)
                .arg(task.record.timeout_ms)
                .arg(&task.record.kind)
                .arg(task.trace.as_str());
        }
        // Streamed tasks add nothing here: their path stays as it was.
        let placed: Vec<(usize, &NewTask)> = tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.record.is_placed())
            .collect();
        inv.arg(placed.len());
        for (i, task) in &placed {
            inv.arg(*i)
                .arg(task.record.needs_text())
                .arg(crate::flow::dims_text(&task.record))
                .arg(&task.quotas);
        }
        // Tasks of submissions with dependencies, parents first: the script accepts them in
        // this order, and each submission whole or not at all.
        let mut members: Vec<(usize, &NewTask, &Membership)> = tasks
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.membership.as_ref().map(|m| (i, t, m)))
            .collect();
        members.sort_by_key(|(_, _, m)| (m.group, m.rank));
        inv.arg(members.len()).arg(self.retention_ms());
        for (i, task, m) in members {
            inv.arg(i)
                .arg(m.group)
                .arg(task.record.depends_on.join("\n"))
                .arg(task.record.on_parent_failure.as_str())
                .arg(task.record.workflow.as_deref().unwrap_or(""))
                .arg(&m.default_workflow);
        }
        inv
    }
}

/// The accept script's answers, one per task.
fn answers(rows: Vec<String>, tasks: &[NewTask]) -> Result<Vec<Accepted>, StoreError> {
    if rows.len() != tasks.len() {
        return Err(StoreError::Protocol(
            "accept answered for a different number of tasks",
        ));
    }
    rows.into_iter()
        .zip(tasks)
        .map(|(row, task)| match row.split_at_checked(1) {
            Some(("p", "")) => Ok(Accepted::Pending(task.record.id.clone())),
            Some(("s", "")) => Ok(Accepted::Scheduled(task.record.id.clone())),
            Some(("w", "")) => Ok(Accepted::Placing(task.record.id.clone())),
            Some(("d", existing)) if !existing.is_empty() => {
                Ok(Accepted::Duplicate(existing.to_string()))
            }
            Some(("q", why)) => Ok(Accepted::OverQuota(why.to_string())),
            Some(("W", "")) => Ok(Accepted::Waiting(task.record.id.clone())),
            Some(("e", state)) => state
                .parse()
                .map(|s| Accepted::Ended(task.record.id.clone(), s))
                .map_err(|_| StoreError::Protocol("accept answered an unknown end")),
            Some(("x", why)) => Ok(Accepted::Refused(why.to_string())),
            _ => Err(StoreError::Protocol("accept answered an unknown state")),
        })
        .collect()
}

impl Store {
    /// Confirms that Kafka acknowledged these `(id, published attempt)` messages: their outbox
    /// entries go, in one `ZREM`. An entry is keyed by attempt, so a later attempt's entry (a
    /// retry, a requeue) is never removed by an earlier attempt's late acknowledgement.
    pub async fn dispatched(&self, sent: &[Attempt<'_>]) -> Result<(), StoreError> {
        if sent.is_empty() {
            return Ok(());
        }
        let members: Vec<String> = sent
            .iter()
            .map(|(id, attempt)| keys::outbox_member(id, *attempt))
            .collect();
        let _: i64 = redis::cmd("ZREM")
            .arg(self.keys.outbox())
            .arg(members)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Adds `n` to the fleet-wide counter `name`.
    pub async fn count(&self, name: &str, n: u64) -> Result<(), StoreError> {
        let () = redis::cmd("HINCRBY")
            .arg(self.keys.counters())
            .arg(name)
            .arg(n)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}
