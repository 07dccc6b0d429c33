//! [`Store`]: every task transition as one batched script call.

use std::collections::HashMap;

use redis::Value;
use redis::aio::ConnectionManager;

use super::StoreError;
use super::keys::{self, Keys};
use super::model::{StoredTask, WorkerInfo};
use super::scripts;
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
        }
    }
}

/// What [`Store::accept`] did with one submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// New and pending: publish it now.
    Pending(String),
    /// New and waiting for its run time: the relay publishes it then.
    Scheduled(String),
    /// Already known (same id or idempotency key): the existing task's id.
    Duplicate(String),
}

/// Entries waiting for the relay, see [`Store::backlog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Scheduled tasks' timers (`due`): delays and retry backoff.
    pub timers: u64,
    /// Dispatches Kafka has not acknowledged yet (`outbox`).
    pub outbox: u64,
    /// Failed tasks whose dead-letter record is not written yet (`dead-outbox`).
    pub dead: u64,
}

/// One task's claim result, see `lua/claim.lua`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Claimed,
    /// The same attempt is already running on another worker (a duplicate delivery).
    Busy,
    /// The same attempt was claimed by this very call ([`Store::claim_call`]): an earlier try
    /// of it ran but its reply was lost (a timeout, a reset connection), or the delivery came
    /// twice in it. The worker runs it unless it already does; skipping it would leave the task
    /// running with no handler until its lease ran out.
    Owned,
    /// An older attempt's delivery.
    Stale,
    /// The task already ended.
    Done,
    /// An attempt beyond the next: the message did not come from Fleet's own dispatch.
    Future,
    /// No such task in Redis.
    Unknown,
    /// The task is not pending (scheduled for later, or still running an older attempt).
    NotReady,
    /// Its queue or priority is paused: the task stays pending, held until the resume.
    Held,
}

impl Claim {
    fn from_code(code: i64) -> Self {
        match code {
            1 => Claim::Claimed,
            2 => Claim::Busy,
            3 => Claim::Stale,
            4 => Claim::Done,
            5 => Claim::Future,
            6 => Claim::Unknown,
            8 => Claim::Held,
            9 => Claim::Owned,
            _ => Claim::NotReady,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Claim::Claimed => "claimed",
            Claim::Busy => "busy",
            Claim::Owned => "owned",
            Claim::Stale => "stale",
            Claim::Done => "done",
            Claim::Future => "future",
            Claim::Unknown => "unknown",
            Claim::NotReady => "not_ready",
            Claim::Held => "held",
        }
    }
}

/// How an attempt ended, as the worker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Succeeded with this result (JSON text).
    Ok(String),
    /// Failed, may be retried after `delay_ms` if attempts are left.
    Retry { error: String, delay_ms: u64 },
    /// Failed for good.
    Fail(String),
    /// Stopped because its cancellation was requested (the handler was aborted).
    Cancelled,
}

/// The answer to one reported outcome, see `lua/complete.lua`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    Succeeded,
    /// Retry scheduled.
    Scheduled,
    Failed,
    /// Its cancellation had been requested: the task ended `cancelled`.
    Cancelled,
    /// This attempt had already ended the task or scheduled its retry (a repeated report,
    /// such as the retry of a call whose reply was lost).
    Already,
    /// Not the current attempt of this worker: nothing changed.
    Fenced,
}

/// A task to publish: its next attempt and stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    pub id: String,
    pub attempt: u32,
    pub record_json: String,
    /// The task's `traceparent` (empty for tasks stored without one).
    pub trace: String,
}

/// What the reaper did with one expired lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeue {
    Requeued(Dispatch),
    Failed(String),
    /// Its cancellation had been requested: it ended `cancelled`.
    Cancelled(String),
    Skipped(String),
}

/// What a heartbeat learned: positions (0-based, in the order sent) of the tasks whose lease
/// is lost, and of those whose cancellation was requested.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heartbeat {
    pub lost: Vec<usize>,
    pub cancel: Vec<usize>,
}

/// The Redis state store of one fleet. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    keys: Keys,
    retention_ms: u64,
    redeliver_ms: u64,
    idempotency_window_ms: u64,
    timeout_grace_ms: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// One running task in a heartbeat: `(task id, attempt, progress (percent, message) if any)`.
pub type Beat<'a> = (&'a str, u32, Option<(u8, &'a str)>);

/// `(task id, attempt)` pairs, the unit of fencing.
pub type Attempt<'a> = (&'a str, u32);

impl Store {
    pub fn new(conn: ConnectionManager, keys: Keys, tasks: &crate::settings::TaskSettings) -> Self {
        Self {
            conn,
            keys,
            retention_ms: tasks.retention_ms,
            redeliver_ms: tasks.redeliver_ms,
            idempotency_window_ms: tasks.idempotency_window_ms,
            timeout_grace_ms: tasks.timeout_grace_ms,
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A connection for plain commands (reads, pipelines).
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub(super) fn retention_ms(&self) -> u64 {
        self.retention_ms
    }

    pub(super) fn invocation<'a>(&self, script: &'a redis::Script) -> scripts::ScriptCall<'a> {
        let mut inv = scripts::ScriptCall::new(script);
        for key in self.keys.globals() {
            inv.key(key);
        }
        inv
    }

    /// Records new submissions, in one call.
    pub async fn accept(&self, tasks: &[NewTask]) -> Result<Vec<Accepted>, StoreError> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
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
        let rows: Vec<String> = inv.invoke_async(&mut self.conn.clone()).await?;
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
                Some(("d", existing)) if !existing.is_empty() => {
                    Ok(Accepted::Duplicate(existing.to_string()))
                }
                _ => Err(StoreError::Protocol("accept answered an unknown state")),
            })
            .collect()
    }

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

    /// Claims deliveries for `worker`, in one call of its own.
    pub async fn claim(
        &self,
        worker: &str,
        lease_ms: u64,
        deliveries: &[Attempt<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        self.claim_call(worker, lease_ms, &new_call_id(), deliveries)
            .await
    }

    /// Claims deliveries for `worker` in the call `call`. A call that failed may still have
    /// claimed (its reply lost); its retry passes the same `call` and gets [`Claim::Owned`]
    /// for what it claimed, where another call gets [`Claim::Busy`].
    pub async fn claim_call(
        &self,
        worker: &str,
        lease_ms: u64,
        call: &str,
        deliveries: &[Attempt<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        if deliveries.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.invocation(&scripts::CLAIM);
        inv.arg(deliveries.len())
            .arg(worker)
            .arg(lease_ms)
            .arg(self.timeout_grace_ms)
            .arg(call);
        for (id, attempt) in deliveries {
            inv.key(self.keys.task(id)).arg(*id).arg(*attempt);
        }
        let codes: Vec<i64> = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(codes.into_iter().map(Claim::from_code).collect())
    }

    /// Extends the leases of `running` and records the worker as alive; stores each task's
    /// progress `(percent, message)` where one is given. Leases never run past a task's hard
    /// deadline.
    pub async fn extend(
        &self,
        worker: &str,
        lease_ms: u64,
        info: &str,
        running: &[Beat<'_>],
    ) -> Result<Heartbeat, StoreError> {
        let mut inv = self.invocation(&scripts::EXTEND);
        inv.key(self.keys.worker(worker));
        inv.arg(running.len()).arg(worker).arg(lease_ms).arg(info);
        for (id, attempt, progress) in running {
            inv.key(self.keys.task(id)).arg(*id).arg(*attempt);
            match progress {
                Some((percent, message)) => inv.arg(*percent).arg(*message),
                None => inv.arg("").arg(""),
            };
        }
        let (lost, cancel): (Vec<usize>, Vec<usize>) =
            inv.invoke_async(&mut self.conn.clone()).await?;
        let zero_based = |v: Vec<usize>| v.into_iter().map(|p| p - 1).collect();
        Ok(Heartbeat {
            lost: zero_based(lost),
            cancel: zero_based(cancel),
        })
    }

    /// Records the outcomes of attempts run by `worker`, in one call.
    pub async fn complete(
        &self,
        worker: &str,
        outcomes: &[(Attempt<'_>, &Outcome)],
    ) -> Result<Vec<Completion>, StoreError> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.invocation(&scripts::COMPLETE);
        inv.arg(outcomes.len()).arg(worker).arg(self.retention_ms);
        for ((id, attempt), outcome) in outcomes {
            inv.key(self.keys.task(id)).arg(*id).arg(*attempt);
            match outcome {
                Outcome::Ok(result) => inv.arg("ok").arg(result).arg(0),
                Outcome::Retry { error, delay_ms } => inv.arg("retry").arg(error).arg(*delay_ms),
                Outcome::Fail(error) => inv.arg("fail").arg(error).arg(0),
                Outcome::Cancelled => inv.arg("cancel").arg("").arg(0),
            };
        }
        let answers: Vec<String> = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(answers
            .into_iter()
            .map(|a| match a.as_str() {
                "succeeded" => Completion::Succeeded,
                "scheduled" => Completion::Scheduled,
                "failed" => Completion::Failed,
                "cancelled" => Completion::Cancelled,
                "already" => Completion::Already,
                _ => Completion::Fenced,
            })
            .collect())
    }

    /// Hands `worker`'s running tasks back for immediate redelivery and removes the worker
    /// from the live set (it is leaving); returns how many tasks it still owned.
    pub async fn release(
        &self,
        worker: &str,
        running: &[Attempt<'_>],
    ) -> Result<usize, StoreError> {
        let mut inv = self.invocation(&scripts::RELEASE);
        inv.key(self.keys.worker(worker));
        inv.arg(running.len()).arg(worker).arg(self.retention_ms);
        for (id, attempt) in running {
            inv.key(self.keys.task(id)).arg(*id).arg(*attempt);
        }
        Ok(inv.invoke_async(&mut self.conn.clone()).await?)
    }

    /// Sends failed tasks back with a fresh budget of attempts; returns how many were failed
    /// and are now pending again (the relay publishes them at once).
    pub async fn redrive(&self, ids: &[String]) -> Result<usize, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut inv = self.invocation(&scripts::REDRIVE);
        inv.arg(ids.len());
        for id in ids {
            inv.key(self.keys.task(id)).arg(id);
        }
        Ok(inv.invoke_async(&mut self.conn.clone()).await?)
    }

    /// Redrives every failed task of `kind` and/or `queue` (all failed tasks when both are
    /// `None`); returns how many were redriven.
    pub async fn redrive_failed(
        &self,
        kind: Option<&str>,
        queue: Option<&str>,
    ) -> Result<usize, StoreError> {
        #[derive(serde::Deserialize)]
        struct Route {
            kind: String,
            queue: String,
        }
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.keys.state_index(State::Failed))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn.clone())
            .await?;
        let mut total = 0;
        for chunk in ids.chunks(500) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.hget(self.keys.task(id), "record");
            }
            let records: Vec<Option<String>> = pipe.query_async(&mut self.conn.clone()).await?;
            let selected: Vec<String> = chunk
                .iter()
                .zip(records)
                .filter_map(|(id, record)| {
                    let route: Route = serde_json::from_str(&record?).ok()?;
                    let wanted = kind.is_none_or(|k| k == route.kind)
                        && queue.is_none_or(|q| q == route.queue);
                    wanted.then(|| id.clone())
                })
                .collect();
            total += self.redrive(&selected).await?;
        }
        Ok(total)
    }

    /// Ids of tasks whose lease has expired (by Redis time), at most `limit`.
    pub async fn expired_leases(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        Ok(scripts::EXPIRED
            .key(self.keys.leases())
            .arg(limit)
            .invoke_async(&mut self.conn.clone())
            .await?)
    }

    /// Requeues (or fails) tasks whose lease expired; see `lua/requeue.lua`.
    pub async fn requeue(&self, ids: &[String]) -> Result<Vec<Requeue>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.invocation(&scripts::REQUEUE);
        inv.arg(ids.len())
            .arg(self.retention_ms)
            .arg(self.redeliver_ms);
        for id in ids {
            inv.key(self.keys.task(id)).arg(id);
        }
        let rows: Vec<Vec<Value>> = inv.invoke_async(&mut self.conn.clone()).await?;
        rows.into_iter()
            .map(|row| {
                let id = text(row.first())?;
                Ok(match text(row.get(1))?.as_str() {
                    "requeued" => Requeue::Requeued(Dispatch {
                        attempt: number(row.get(2))? as u32,
                        record_json: text(row.get(3))?,
                        trace: text(row.get(4)).unwrap_or_default(),
                        id,
                    }),
                    "failed" => Requeue::Failed(id),
                    "cancelled" => Requeue::Cancelled(id),
                    _ => Requeue::Skipped(id),
                })
            })
            .collect()
    }

    /// Takes up to `limit` due timers and as many due unacknowledged dispatches, and prepares
    /// their tasks for publication.
    pub async fn take_due(&self, limit: usize) -> Result<Vec<Dispatch>, StoreError> {
        let members: Vec<String> = scripts::TAKE_DUE
            .key(self.keys.due())
            .key(self.keys.outbox())
            .arg(limit)
            .arg(self.redeliver_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.invocation(&scripts::PREPARE_DISPATCH);
        inv.arg(members.len());
        for member in &members {
            let id = keys::entry_task_id(member);
            inv.key(self.keys.task(id)).arg(member).arg(id);
        }
        let rows: Vec<Vec<Value>> = inv.invoke_async(&mut self.conn.clone()).await?;
        let mut out = Vec::new();
        for row in rows {
            if row.len() >= 3 {
                out.push(Dispatch {
                    id: text(row.first())?,
                    attempt: number(row.get(1))? as u32,
                    record_json: text(row.get(2))?,
                    trace: text(row.get(3)).unwrap_or_default(),
                });
            }
        }
        Ok(out)
    }

    /// Takes up to `limit` failed tasks whose dead-letter record is not yet on Kafka. Call
    /// [`Store::dead_letter_sent`] once it is.
    pub async fn take_dead_letters(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        Ok(scripts::TAKE_DUE
            .key(self.keys.dead_outbox())
            .arg(limit)
            .arg(self.redeliver_ms)
            .invoke_async(&mut self.conn.clone())
            .await?)
    }

    pub async fn dead_letter_sent(&self, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let () = redis::cmd("ZREM")
            .arg(self.keys.dead_outbox())
            .arg(ids)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// `(worker id, info)` of every worker that sent a heartbeat within `max_age_ms` (by Redis
    /// time).
    pub async fn live_workers(
        &self,
        max_age_ms: u64,
    ) -> Result<Vec<(String, WorkerInfo)>, StoreError> {
        let mut conn = self.conn.clone();
        let time: (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let since = (time.0 * 1000 + time.1 / 1000).saturating_sub(max_age_ms);
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.workers())
            .arg(since)
            .arg("+inf")
            .query_async(&mut conn)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hget(self.keys.worker(id), "info");
        }
        let infos: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
        Ok(ids
            .into_iter()
            .zip(infos)
            .filter_map(|(id, info)| info.map(|i| (id, WorkerInfo::parse(&i))))
            .collect())
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

    /// Every fleet-wide counter.
    pub async fn counters(&self) -> Result<HashMap<String, u64>, StoreError> {
        Ok(redis::cmd("HGETALL")
            .arg(self.keys.counters())
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// One task as Redis holds it ([`StoredTask`]); `None` if there is no such task.
    pub async fn task(&self, id: &str) -> Result<Option<StoredTask>, StoreError> {
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.task(id))
            .query_async(&mut self.conn.clone())
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        Ok(Some(StoredTask::from_hash(id, fields)?))
    }

    /// The relay's backlog: timers, unacknowledged dispatches and unwritten dead letters.
    pub async fn backlog(&self) -> Result<Backlog, StoreError> {
        let mut pipe = redis::pipe();
        pipe.zcard(self.keys.due())
            .zcard(self.keys.outbox())
            .zcard(self.keys.dead_outbox());
        let (timers, outbox, dead) = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(Backlog {
            timers,
            outbox,
            dead,
        })
    }

    /// How many tasks are in each state.
    pub async fn counts(&self) -> Result<Vec<(State, u64)>, StoreError> {
        let mut pipe = redis::pipe();
        for state in State::ALL {
            pipe.zcard(self.keys.state_index(state));
        }
        let counts: Vec<u64> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(State::ALL.into_iter().zip(counts).collect())
    }
}

pub(super) fn text(value: Option<&Value>) -> Result<String, StoreError> {
    match value {
        Some(v) => redis::from_redis_value_ref(v)
            .map_err(|_| StoreError::Protocol("expected text in script reply")),
        None => Err(StoreError::Protocol(
            "script reply is shorter than expected",
        )),
    }
}

pub(super) fn number(value: Option<&Value>) -> Result<i64, StoreError> {
    match value {
        Some(v) => redis::from_redis_value_ref(v)
            .map_err(|_| StoreError::Protocol("expected a number in script reply")),
        None => Err(StoreError::Protocol(
            "script reply is shorter than expected",
        )),
    }
}

/// A fresh id for a claim call ([`Store::claim_call`]): 64 random bits in hex, stored with the
/// attempts it claims.
pub fn new_call_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
