//! Placement in Redis: the inbox of placed tasks waiting for a worker, the dispatcher's
//! decisions (reserve on a worker, record why none fits, or fail past the placement timeout),
//! what each worker holds, and taking back what gone workers held.

use std::collections::{BTreeMap, HashSet};

use redis::Value;

use super::relay::Dispatch;
use super::{Store, StoreError, number, scripts, text};
use crate::placement::{Amounts, QueueSettings, Strategy};
use crate::task::TaskRecord;

/// A placed task waiting for a worker, as the dispatcher reads it.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub id: String,
    /// `None` when it no longer waits, or its record is one this build cannot read.
    pub record: Option<TaskRecord>,
    /// Whether it still waits (its state is `pending`).
    pub pending: bool,
    pub needs: Amounts,
    /// The reason its status shows now, if any.
    pub wait_reason: Option<String>,
    /// Redis time (ms) since when it waits in its queue.
    pub since_ms: u64,
}

/// What the dispatcher decided for one waiting task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Reserve its needs on this worker and publish it there.
    Place { id: String, worker: String },
    /// No worker fits now; the status says why.
    Wait { id: String, reason: String },
    /// No live worker could take it even when idle: out of its queue until the live workers
    /// change, or until `deadline_ms` (its placement timeout), when it fails.
    Park {
        id: String,
        reason: String,
        deadline_ms: Option<u64>,
    },
    /// It waited past its placement timeout: it fails with this reason.
    Fail { id: String, reason: String },
    /// It is over the flow limit of dimension `dim`: into that limit's wait list (for a
    /// concurrency limit, only if the place script, checking again, finds it so: a slot that
    /// came free meanwhile would wake nobody; a rate's wait list gives tasks back as its tokens
    /// come, so it goes there whatever a token that came meanwhile says).
    Block {
        id: String,
        dim: String,
        reason: String,
    },
}

impl Decision {
    pub fn id(&self) -> &str {
        match self {
            Decision::Place { id, .. }
            | Decision::Wait { id, .. }
            | Decision::Park { id, .. }
            | Decision::Fail { id, .. }
            | Decision::Block { id, .. } => id,
        }
    }
}

/// What [`Store::place`] did with one decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// Reserved: publish this attempt to a partition of the chosen worker.
    Placed(Dispatch),
    /// It no longer waits (started elsewhere, cancelled, gone).
    Gone,
    /// The worker is gone or the task no longer fits there; it stays in the inbox.
    Full,
    Waiting,
    Parked,
    Failed,
    /// Over a flow limit: it waits in the limit's wait list.
    Limited,
}

/// What [`Store::unpark`] does with parked tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpark {
    /// Every parked task goes back to the inbox (the live workers changed).
    Back,
    /// Those whose placement timeout ended fail.
    Expire,
}

impl Store {
    /// Sorts up to `limit` tasks of the placement inbox into their queues' waiting sets (see
    /// `lua/sort_in.lua`), each with the estimate `estimate` gives it for `sjf`, and the step
    /// `weight` gives its fair key (1 / its tenant's weight). Returns how many were sorted in.
    /// A task whose record this build cannot read is sorted in by its hash's `queue`, with no
    /// key and the estimate `estimate` gives `None`.
    pub async fn sort_in(
        &self,
        limit: usize,
        estimate: impl Fn(Option<&TaskRecord>) -> u64,
        weight: impl Fn(&TaskRecord) -> u32,
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.keys.place_inbox())
            .arg(0)
            .arg(limit.saturating_sub(1))
            .query_async(&mut conn)
            .await?;
        if ids.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET")
                .arg(self.keys.task(id))
                .arg(&["record", "queue"]);
        }
        let rows: Vec<(Option<String>, Option<String>)> = pipe.query_async(&mut conn).await?;
        let mut gone = Vec::new();
        // (id, queue, fair key, estimate, step)
        let mut sorting: Vec<(&str, String, String, u64, f64)> = Vec::with_capacity(ids.len());
        for (id, (record, queue)) in ids.iter().zip(rows) {
            let Some(queue) = queue else {
                gone.push(id.as_str());
                continue;
            };
            match record.and_then(|r| serde_json::from_str::<TaskRecord>(&r).ok()) {
                Some(r) => {
                    let key = crate::flow::fair_key(&r);
                    let step = 1.0 / f64::from(weight(&r).max(1));
                    sorting.push((id, r.queue.clone(), key, estimate(Some(&r)), step));
                }
                None => sorting.push((id, queue, String::new(), estimate(None), 1.0)),
            }
        }
        // A task gone meanwhile (expired, deleted) leaves the inbox.
        if !gone.is_empty() {
            let _: i64 = redis::cmd("ZREM")
                .arg(self.keys.place_inbox())
                .arg(&gone)
                .query_async(&mut conn)
                .await?;
        }
        if sorting.is_empty() {
            return Ok(0);
        }
        let mut inv = self.invocation(&scripts::SORT_IN);
        inv.key(self.keys.wait_queues()).arg(sorting.len());
        for (id, queue, fair_key, estimate, step) in &sorting {
            self.queue_keys(&mut inv, id, queue);
            inv.arg(*id)
                .arg(queue)
                .arg(fair_key)
                .arg(*estimate)
                .arg(format!("{step:.9}"));
        }
        let sorted: i64 = inv.invoke_async(&mut conn).await?;
        Ok(usize::try_from(sorted).unwrap_or(0))
    }

    /// The task's hash, then its queue's fifo, sjf and fair sets and fair state.
    fn queue_keys(&self, inv: &mut scripts::ScriptCall<'_>, id: &str, queue: &str) {
        inv.key(self.keys.task(id))
            .key(self.keys.wait(queue))
            .key(self.keys.wait_sjf(queue))
            .key(self.keys.wait_fair(queue))
            .key(self.keys.wait_fair_state(queue));
    }

    /// How many placed tasks wait in the inbox, not yet sorted into their queues.
    pub async fn inbox_len(&self) -> Result<u64, StoreError> {
        Ok(redis::cmd("ZCARD")
            .arg(self.keys.place_inbox())
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// The queues with placed tasks waiting.
    pub async fn waiting_queues(&self) -> Result<Vec<String>, StoreError> {
        Ok(redis::cmd("SMEMBERS")
            .arg(self.keys.wait_queues())
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// How many placed tasks wait in `queue` (stale entries included until a dispatcher
    /// passes them).
    pub async fn waiting_count(&self, queue: &str) -> Result<u64, StoreError> {
        Ok(redis::cmd("ZCARD")
            .arg(self.keys.wait(queue))
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// Parked tasks (see [`Decision::Park`]) back to the inbox, or failed past their placement
    /// timeout, at most `limit`; returns how many went back or failed.
    pub async fn unpark(&self, mode: Unpark, limit: usize) -> Result<usize, StoreError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = match mode {
            Unpark::Back => {
                redis::cmd("ZRANGE")
                    .arg(self.keys.place_parked())
                    .arg(0)
                    .arg(limit.saturating_sub(1))
                    .query_async(&mut conn)
                    .await?
            }
            Unpark::Expire => {
                let now = self.redis_time_ms().await?;
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.keys.place_parked())
                    .arg("-inf")
                    .arg(now)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .query_async(&mut conn)
                    .await?
            }
        };
        if ids.is_empty() {
            return Ok(0);
        }
        let mut inv = self.invocation(&scripts::UNPARK);
        inv.arg(ids.len())
            .arg(if mode == Unpark::Back {
                "back"
            } else {
                "expire"
            })
            .arg(self.retention_ms);
        for id in &ids {
            inv.key(self.keys.task(id)).arg(id);
        }
        let moved: i64 = inv.invoke_async(&mut conn).await?;
        Ok(usize::try_from(moved).unwrap_or(0))
    }

    /// How many placed tasks are parked: no live worker could take them even when idle.
    pub async fn parked_count(&self) -> Result<u64, StoreError> {
        Ok(redis::cmd("ZCARD")
            .arg(self.keys.place_parked())
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// Placed tasks waiting for a worker, per queue: those sorted into a queue, plus the
    /// inbox's not yet sorted in (under `""`).
    pub async fn placing_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut counts = BTreeMap::new();
        for queue in self.waiting_queues().await? {
            let n = self.waiting_count(&queue).await?;
            counts.insert(queue, n);
        }
        let inbox: u64 = redis::cmd("ZCARD")
            .arg(self.keys.place_inbox())
            .query_async(&mut self.conn.clone())
            .await?;
        if inbox > 0 {
            counts.insert(String::new(), inbox);
        }
        Ok(counts)
    }

    /// Up to `limit` placed tasks waiting in `queue`, first in `strategy`'s order.
    pub async fn waiting_in(
        &self,
        queue: &str,
        strategy: Strategy,
        limit: usize,
    ) -> Result<Vec<Waiting>, StoreError> {
        let mut conn = self.conn.clone();
        let set = match strategy {
            Strategy::Fifo => self.keys.wait(queue),
            Strategy::Sjf => self.keys.wait_sjf(queue),
            Strategy::Fair => self.keys.wait_fair(queue),
        };
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(set)
            .arg(0)
            .arg(limit.saturating_sub(1))
            .query_async(&mut conn)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET").arg(self.keys.task(id)).arg(&[
                "record",
                "needs",
                "wait_reason",
                "state",
            ]);
        }
        pipe.cmd("ZMSCORE").arg(self.keys.wait(queue)).arg(&ids);
        let mut replies: Vec<Value> = pipe.query_async(&mut conn).await?;
        let since: Vec<Option<f64>> = redis::from_redis_value(
            replies
                .pop()
                .ok_or(StoreError::Protocol("pipeline answered short"))?,
        )
        .map_err(|_| StoreError::Protocol("ZMSCORE answered other than scores"))?;
        let mut waiting = Vec::with_capacity(ids.len());
        for ((id, reply), since) in ids.into_iter().zip(replies).zip(since) {
            let (record, needs, wait_reason, state): (
                Option<String>,
                Option<String>,
                Option<String>,
                Option<String>,
            ) = redis::from_redis_value(reply)
                .map_err(|_| StoreError::Protocol("HMGET answered other than fields"))?;
            // A task that no longer waits (cancelled, started from another copy of its
            // message, expired) has no record here: its decision makes the place script drop
            // it from the queue's sets.
            let pending = state.as_deref() == Some("pending");
            let record = record
                .filter(|_| pending)
                .and_then(|r| serde_json::from_str::<TaskRecord>(&r).ok());
            waiting.push(Waiting {
                id,
                record,
                pending,
                needs: Amounts::decode(needs.as_deref().unwrap_or("")),
                wait_reason,
                since_ms: since.unwrap_or(0.0) as u64,
            });
        }
        Ok(waiting)
    }

    /// Records `decisions` for tasks of `queue` (see `lua/place.lua`); a worker last heard
    /// from before `live_since_ms` (Redis time) takes nothing.
    pub async fn place(
        &self,
        queue: &str,
        decisions: &[(Decision, String, String, String)],
        live_since_ms: u64,
    ) -> Result<Vec<Placed>, StoreError> {
        if decisions.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.invocation(&scripts::PLACE);
        inv.key(self.keys.wait_queues());
        inv.arg(decisions.len())
            .arg(self.redeliver_ms)
            .arg(live_since_ms)
            .arg(self.retention_ms);
        for (decision, fair_key, checks, flow) in decisions {
            self.queue_keys(&mut inv, decision.id(), queue);
            inv.arg(decision.id());
            match decision {
                Decision::Place { worker, .. } => inv.arg("p").arg(worker).arg(""),
                Decision::Wait { reason, .. } => inv.arg("w").arg("").arg(reason),
                Decision::Park {
                    reason,
                    deadline_ms,
                    ..
                } => {
                    let deadline = deadline_ms.map_or(String::new(), |ms| ms.to_string());
                    inv.arg("k").arg(deadline).arg(reason)
                }
                Decision::Fail { reason, .. } => inv.arg("f").arg("").arg(reason),
                Decision::Block { dim, reason, .. } => inv.arg("b").arg(dim).arg(reason),
            };
            inv.arg(queue).arg(fair_key).arg(checks).arg(flow);
        }
        let rows: Vec<Value> = inv.invoke_async(&mut self.conn.clone()).await?;
        if rows.len() != decisions.len() {
            return Err(StoreError::Protocol(
                "place answered for a different number of tasks",
            ));
        }
        rows.into_iter()
            .zip(decisions)
            .map(|(row, (decision, ..))| match row {
                Value::Array(items) => Ok(Placed::Placed(Dispatch {
                    id: decision.id().to_string(),
                    attempt: u32::try_from(number(items.first())?)
                        .map_err(|_| StoreError::Protocol("attempt out of range"))?,
                    record_json: text(items.get(1))?,
                    trace: text(items.get(2))?,
                })),
                other => match text(Some(&other))?.as_str() {
                    "gone" => Ok(Placed::Gone),
                    "full" => Ok(Placed::Full),
                    "waiting" => Ok(Placed::Waiting),
                    "parked" => Ok(Placed::Parked),
                    "failed" => Ok(Placed::Failed),
                    "limited" => Ok(Placed::Limited),
                    _ => Err(StoreError::Protocol("place answered an unknown outcome")),
                },
            })
            .collect()
    }

    /// Every queue that has ever had a task.
    pub async fn queue_names(&self) -> Result<Vec<String>, StoreError> {
        Ok(redis::cmd("SMEMBERS")
            .arg(self.keys.queues())
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// Recent run times (ms) of placed tasks' successful attempts, by kind, oldest first.
    pub async fn run_times(&self) -> Result<BTreeMap<String, Vec<u64>>, StoreError> {
        let kept: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.run_times())
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(kept
            .into_iter()
            .map(|(kind, list)| {
                (
                    kind,
                    list.split(',').filter_map(|v| v.parse().ok()).collect(),
                )
            })
            .collect())
    }

    /// The run-time queue settings (set through the API or `fleetctl queue set`); entries
    /// that do not parse are left out.
    pub async fn queue_settings(&self) -> Result<BTreeMap<String, QueueSettings>, StoreError> {
        let stored: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.queue_settings())
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(stored
            .into_iter()
            .filter_map(|(queue, json)| Some((queue, serde_json::from_str(&json).ok()?)))
            .collect())
    }

    /// Stores `queue`'s settings, or removes its run-time settings (`None`), so the settings
    /// file's apply again.
    pub async fn set_queue_settings(
        &self,
        queue: &str,
        settings: Option<&QueueSettings>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        match settings {
            Some(s) => {
                let json = serde_json::to_string(s).expect("queue settings serialize");
                let () = redis::cmd("HSET")
                    .arg(self.keys.queue_settings())
                    .arg(queue)
                    .arg(json)
                    .query_async(&mut conn)
                    .await?;
            }
            None => {
                let _: i64 = redis::cmd("HDEL")
                    .arg(self.keys.queue_settings())
                    .arg(queue)
                    .query_async(&mut conn)
                    .await?;
            }
        }
        Ok(())
    }

    /// Redis's clock, in ms.
    pub async fn redis_time_ms(&self) -> Result<u64, StoreError> {
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// What placed tasks hold on each worker now, in thousandths.
    pub async fn placement_use(&self) -> Result<BTreeMap<String, Amounts>, StoreError> {
        let used: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.place_used())
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(used
            .into_iter()
            .map(|(worker, text)| (worker, Amounts::decode(&text)))
            .collect())
    }

    /// Takes back what placed tasks hold on workers not heard from since `live_since_ms`
    /// (Redis time): see `lua/revoke.lua`. Returns how many tasks went back to wait.
    pub async fn revoke_gone(&self, live_since_ms: u64) -> Result<usize, StoreError> {
        let mut conn = self.conn.clone();
        let (used, capacity, live): (Vec<String>, Vec<String>, Vec<String>) = redis::pipe()
            .cmd("HKEYS")
            .arg(self.keys.place_used())
            .cmd("HKEYS")
            .arg(self.keys.place_capacity())
            .cmd("ZRANGEBYSCORE")
            .arg(self.keys.workers())
            .arg(live_since_ms)
            .arg("+inf")
            .query_async(&mut conn)
            .await?;
        let live: HashSet<String> = live.into_iter().collect();
        let gone: HashSet<String> = used
            .into_iter()
            .chain(capacity)
            .filter(|w| !live.contains(w))
            .collect();
        let mut back = 0;
        for worker in gone {
            // `|` is followed by `}`: the range is every reservation on this worker.
            let members: Vec<String> = redis::cmd("ZRANGEBYLEX")
                .arg(self.keys.place_reserved())
                .arg(format!("[{worker}|"))
                .arg(format!("({worker}}}"))
                .arg("LIMIT")
                .arg(0)
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            let mut inv = self.invocation(&scripts::REVOKE);
            inv.arg(members.len()).arg(&worker).arg(live_since_ms);
            for member in &members {
                let id = member.split_once('|').map_or("", |(_, id)| id);
                inv.key(self.keys.task(id)).arg(id);
            }
            let moved: i64 = inv.invoke_async(&mut conn).await?;
            back += usize::try_from(moved).unwrap_or(0);
        }
        Ok(back)
    }
}
