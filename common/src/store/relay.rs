//! What the relay and the reaper take from Redis: expired leases to requeue, timers and
//! unacknowledged dispatches due for publication, and dead letters to write.

use redis::Value;

use super::keys::{self};
use super::{Store, StoreError, number, scripts, text};

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

impl Store {
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
}
