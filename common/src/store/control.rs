//! Task control: cancel, pause and resume a queue or priority, and move a task that has not
//! started to another priority. Each decision is one Lua script, like every other transition.

use super::Store;
use super::StoreError;
use super::scripts;
use crate::priority::Priority;
use crate::task::{State, TaskRecord};

/// What [`Store::cancel`] did with one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// It had not started; it is `cancelled` now.
    Cancelled,
    /// It is running: its worker stops the handler and the task ends `cancelled`.
    Cancelling,
    /// It had already ended in this state; nothing changed.
    Ended(State),
    Unknown,
}

/// What to pause: every task of a queue, or of a priority level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Queue(String),
    Priority(Priority),
}

impl Selector {
    /// The member of the paused set: `queue:<name>` or `priority:<level>`.
    pub fn member(&self) -> String {
        match self {
            Selector::Queue(name) => format!("queue:{name}"),
            Selector::Priority(p) => format!("priority:{}", p.as_str()),
        }
    }

    /// Parses a member of the paused set.
    pub fn from_member(member: &str) -> Option<Self> {
        if let Some(name) = member.strip_prefix("queue:") {
            return Some(Selector::Queue(name.to_string()));
        }
        let level = member.strip_prefix("priority:")?;
        level.parse().ok().map(Selector::Priority)
    }
}

/// What [`Store::set_priority`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reprioritize {
    /// Moved; a pending task is published again on the new priority's topic.
    Moved,
    /// It already had that priority.
    Unchanged,
    /// It has started or ended (this state), so its priority no longer matters.
    Started(State),
    Unknown,
}

/// How often a priority change retries when the record changed under it.
const REPRIORITIZE_TRIES: usize = 5;

impl Store {
    /// Saves consumer group `group`'s offsets (topic, partition, offset) for `ttl_ms`,
    /// replacing any saved before (none: drops them).
    pub async fn save_group_offsets(
        &self,
        group: &str,
        offsets: &[(String, i32, i64)],
        ttl_ms: u64,
    ) -> Result<(), StoreError> {
        let key = self.keys().group_offsets(group);
        let mut pipe = redis::pipe();
        pipe.atomic().del(&key).ignore();
        if !offsets.is_empty() {
            let fields: Vec<(String, i64)> = offsets
                .iter()
                .map(|(topic, partition, offset)| (format!("{partition}:{topic}"), *offset))
                .collect();
            pipe.hset_multiple(&key, &fields).ignore();
            pipe.pexpire(&key, ttl_ms.max(1) as i64).ignore();
        }
        let () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// The offsets [`Store::save_group_offsets`] saved for `group` (none once expired).
    pub async fn group_offsets(&self, group: &str) -> Result<Vec<(String, i32, i64)>, StoreError> {
        let fields: Vec<(String, i64)> = redis::cmd("HGETALL")
            .arg(self.keys().group_offsets(group))
            .query_async(&mut self.conn())
            .await?;
        Ok(fields
            .into_iter()
            .filter_map(|(field, offset)| {
                let (partition, topic) = field.split_once(':')?;
                Some((topic.to_string(), partition.parse().ok()?, offset))
            })
            .collect())
    }

    /// Takes the repair of consumer group `group` for `owner` for `ttl_ms`, unless another
    /// member holds it; whether `owner` may repair. The hold is left to expire, so peers that
    /// noticed the same stall a moment later leave the repaired group alone meanwhile.
    pub async fn take_group_repair(
        &self,
        group: &str,
        owner: &str,
        ttl_ms: u64,
    ) -> Result<bool, StoreError> {
        let set: Option<String> = redis::cmd("SET")
            .arg(self.keys().group_repair(group))
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query_async(&mut self.conn())
            .await?;
        Ok(set.is_some())
    }

    /// Cancels tasks, in one call; see `lua/cancel.lua`.
    pub async fn cancel(&self, ids: &[String]) -> Result<Vec<Cancel>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.invocation(&scripts::CANCEL);
        inv.arg(ids.len()).arg(self.retention_ms());
        for id in ids {
            inv.key(self.keys().task(id)).arg(id);
        }
        let answers: Vec<String> = inv.invoke_async(&mut self.conn()).await?;
        answers
            .into_iter()
            .map(|a| match a.as_str() {
                "cancelled" => Ok(Cancel::Cancelled),
                "cancelling" => Ok(Cancel::Cancelling),
                "unknown" => Ok(Cancel::Unknown),
                other => other
                    .strip_prefix("ended:")
                    .and_then(|s| s.parse::<State>().ok())
                    .map(Cancel::Ended)
                    .ok_or(StoreError::Protocol("unexpected answer from cancel.lua")),
            })
            .collect()
    }

    /// Pauses a queue or priority: workers hold its tasks instead of starting them (running
    /// ones finish). Returns false if it was already paused.
    pub async fn pause(&self, selector: &Selector) -> Result<bool, StoreError> {
        let added: u32 = redis::cmd("SADD")
            .arg(self.keys().paused())
            .arg(selector.member())
            .query_async(&mut self.conn())
            .await?;
        Ok(added == 1)
    }

    /// Resumes a queue or priority and publishes the tasks held meanwhile (those not still
    /// paused by another selector). Returns how many were sent on.
    pub async fn resume(&self, selector: &Selector) -> Result<usize, StoreError> {
        // Unpause first, then list: a claim that holds a task concurrently either saw the
        // selector gone (and started the task) or held it before this listing.
        let () = redis::cmd("SREM")
            .arg(self.keys().paused())
            .arg(selector.member())
            .query_async(&mut self.conn())
            .await?;
        let held = self.held_ids(0, -1).await?;
        self.unhold(&held).await
    }

    /// Sends on held tasks that nothing pauses any more, `limit` of them from rank `from` of
    /// the held set, and returns how many it looked at and how many it sent on. The relay
    /// calls it once a second, moving `from` through the set: a resume whose process died
    /// after lifting its pause but before sending its tasks on leaves them held with no
    /// pause, and this sweep finds them. Tasks still paused stay held.
    pub async fn sweep_held(
        &self,
        from: usize,
        limit: usize,
    ) -> Result<(usize, usize), StoreError> {
        let Some(last) = (from + limit).checked_sub(1) else {
            return Ok((0, 0));
        };
        let held = self.held_ids(from as i64, last as i64).await?;
        let sent = self.unhold(&held).await?;
        Ok((held.len(), sent))
    }

    /// Ids in the held set from rank `first` to `last` (inclusive; -1 is the end).
    async fn held_ids(&self, first: i64, last: i64) -> Result<Vec<String>, StoreError> {
        Ok(redis::cmd("ZRANGE")
            .arg(self.keys().held())
            .arg(first)
            .arg(last)
            .query_async(&mut self.conn())
            .await?)
    }

    /// Sends on those of `ids` that are still held and that nothing pauses any more (see
    /// `lua/unhold.lua`), 500 per call; returns how many were sent on. Safe to repeat: a task
    /// no longer held is left alone.
    pub async fn unhold(&self, ids: &[String]) -> Result<usize, StoreError> {
        let mut sent = 0;
        for chunk in ids.chunks(500) {
            let mut inv = self.invocation(&scripts::UNHOLD);
            inv.arg(chunk.len());
            for id in chunk {
                inv.key(self.keys().task(id)).arg(id);
            }
            let n: usize = inv.invoke_async(&mut self.conn()).await?;
            sent += n;
        }
        Ok(sent)
    }

    /// Every paused selector.
    pub async fn paused(&self) -> Result<Vec<Selector>, StoreError> {
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys().paused())
            .query_async(&mut self.conn())
            .await?;
        let mut selectors: Vec<Selector> = members
            .iter()
            .filter_map(|m| Selector::from_member(m))
            .collect();
        selectors.sort_by_key(Selector::member);
        Ok(selectors)
    }

    /// How many tasks are held by a pause.
    pub async fn held_count(&self) -> Result<u64, StoreError> {
        Ok(redis::cmd("ZCARD")
            .arg(self.keys().held())
            .query_async(&mut self.conn())
            .await?)
    }

    /// Moves a task that has not started (pending or scheduled) to `priority`; see
    /// `lua/reprioritize.lua`. The stored record is rewritten here, its payload untouched.
    pub async fn set_priority(
        &self,
        id: &str,
        priority: Priority,
    ) -> Result<Reprioritize, StoreError> {
        for _ in 0..REPRIORITIZE_TRIES {
            let fields: (Option<String>, Option<String>) = redis::cmd("HMGET")
                .arg(self.keys().task(id))
                .arg("state")
                .arg("record")
                .query_async(&mut self.conn())
                .await?;
            let (Some(state), Some(old)) = fields else {
                return Ok(Reprioritize::Unknown);
            };
            let state: State = state
                .parse()
                .map_err(|_| StoreError::Protocol("unknown task state"))?;
            if !matches!(state, State::Pending | State::Scheduled) {
                return Ok(Reprioritize::Started(state));
            }
            let mut record: TaskRecord = serde_json::from_str(&old)
                .map_err(|_| StoreError::Protocol("stored task record is not valid"))?;
            if record.priority == priority {
                return Ok(Reprioritize::Unchanged);
            }
            record.priority = priority;
            let mut inv = self.invocation(&scripts::REPRIORITIZE);
            inv.key(self.keys().task(id))
                .arg(id)
                .arg(&old)
                .arg(record.to_json())
                .arg(priority.as_str());
            let answer: String = inv.invoke_async(&mut self.conn()).await?;
            match answer.as_str() {
                "moved" => return Ok(Reprioritize::Moved),
                "conflict" => continue,
                "unknown" => return Ok(Reprioritize::Unknown),
                other => {
                    let state: State = other.parse().map_err(|_| {
                        StoreError::Protocol("unexpected answer from reprioritize.lua")
                    })?;
                    return Ok(Reprioritize::Started(state));
                }
            }
        }
        Err(StoreError::Protocol(
            "task record kept changing while its priority was being changed",
        ))
    }
}

impl Store {
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
}
