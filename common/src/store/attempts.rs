//! A task's attempts: claim (attempt + 1, the fencing token), the heartbeat that extends the
//! leases, the completion, and the hand-back of a draining worker.

use super::{Store, StoreError, scripts};

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
    /// A placed task that does not fit this worker (labels or room): it went back to wait for
    /// placement, with no attempt used.
    Unfit,
}

/// How a delivery stands to placement, as the claim script takes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fit {
    /// A streamed task: no placement.
    #[default]
    Streamed,
    /// A placed task whose `require` this worker's labels satisfy: it starts if its needs fit.
    Placed,
    /// A placed task whose `require` this worker's labels do not satisfy.
    LabelsDiffer,
}

impl Fit {
    /// The claim script's character for it (see `lua/claim.lua`).
    fn as_char(self) -> char {
        match self {
            Fit::Streamed => '-',
            Fit::Placed => 'p',
            Fit::LabelsDiffer => 'x',
        }
    }
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
            10 => Claim::Unfit,
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
            Claim::Unfit => "unfit",
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

impl Completion {
    /// The script's answer (`lua/prelude.lua`'s `complete_one`).
    pub(super) fn from_answer(answer: &str) -> Self {
        match answer {
            "succeeded" => Completion::Succeeded,
            "scheduled" => Completion::Scheduled,
            "failed" => Completion::Failed,
            "cancelled" => Completion::Cancelled,
            "already" => Completion::Already,
            _ => Completion::Fenced,
        }
    }
}

/// What a heartbeat learned: positions (0-based, in the order sent) of the tasks whose lease
/// is lost, and of those whose cancellation was requested.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heartbeat {
    pub lost: Vec<usize>,
    pub cancel: Vec<usize>,
}

/// One running task in a heartbeat: `(task id, attempt, progress (percent, message) if any)`.
pub type Beat<'a> = (&'a str, u32, Option<(u8, &'a str)>);

/// `(task id, attempt)` pairs, the unit of fencing.
pub type Attempt<'a> = (&'a str, u32);

/// A fresh id for a claim call ([`Store::claim_call`]): 64 random bits in hex, stored with the
/// attempts it claims.
pub fn new_call_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Store {
    /// Claims deliveries for `worker`, in one call of its own.
    pub async fn claim(
        &self,
        worker: &str,
        lease_ms: u64,
        deliveries: &[Attempt<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        self.claim_call(worker, lease_ms, &new_call_id(), deliveries, &[])
            .await
    }

    /// Claims deliveries for `worker` in the call `call`. A call that failed may still have
    /// claimed (its reply lost); its retry passes the same `call` and gets [`Claim::Owned`]
    /// for what it claimed, where another call gets [`Claim::Busy`]. `fits` says how each
    /// delivery stands to placement (missing entries: streamed).
    pub async fn claim_call(
        &self,
        worker: &str,
        lease_ms: u64,
        call: &str,
        deliveries: &[Attempt<'_>],
        fits: &[Fit],
    ) -> Result<Vec<Claim>, StoreError> {
        if deliveries.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.invocation(&scripts::CLAIM);
        // Nothing per delivery unless one is placed: the streaming path stays as it was.
        let placements: String = if fits.iter().any(|f| *f != Fit::Streamed) {
            (0..deliveries.len())
                .map(|i| fits.get(i).copied().unwrap_or_default().as_char())
                .collect()
        } else {
            String::new()
        };
        inv.arg(deliveries.len())
            .arg(worker)
            .arg(lease_ms)
            .arg(self.timeout_grace_ms)
            .arg(call)
            .arg(placements);
        for (id, attempt) in deliveries {
            inv.key(self.keys.task(id)).arg(*id).arg(*attempt);
        }
        let codes: Vec<i64> = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(codes.into_iter().map(Claim::from_code).collect())
    }

    /// Extends the leases of `running` and records the worker as alive, with its `capacity`
    /// for placed tasks ([`crate::placement::Amounts::encode`] text; empty: none); stores each
    /// task's progress `(percent, message)` where one is given. Leases never run past a task's hard
    /// deadline.
    pub async fn extend(
        &self,
        worker: &str,
        lease_ms: u64,
        info: &str,
        capacity: &str,
        running: &[Beat<'_>],
    ) -> Result<Heartbeat, StoreError> {
        let mut inv = self.invocation(&scripts::EXTEND);
        inv.key(self.keys.worker(worker));
        inv.arg(running.len())
            .arg(worker)
            .arg(lease_ms)
            .arg(info)
            .arg(capacity);
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
        self.complete_placed(worker, outcomes, &[]).await
    }

    /// [`Store::complete`], where `placed[i]` says that outcome `i` is of a placed task, whose
    /// reservation the ending attempt releases (missing entries: streamed).
    pub async fn complete_placed(
        &self,
        worker: &str,
        outcomes: &[(Attempt<'_>, &Outcome)],
        placed: &[bool],
    ) -> Result<Vec<Completion>, StoreError> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.invocation(&scripts::COMPLETE);
        // As for claims: nothing per outcome unless one is of a placed task.
        let placed: String = if placed.contains(&true) {
            (0..outcomes.len())
                .map(|i| {
                    if placed.get(i) == Some(&true) {
                        '1'
                    } else {
                        '0'
                    }
                })
                .collect()
        } else {
            String::new()
        };
        inv.arg(outcomes.len())
            .arg(worker)
            .arg(self.retention_ms)
            .arg(placed);
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
        Ok(answers.iter().map(|a| Completion::from_answer(a)).collect())
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
}
