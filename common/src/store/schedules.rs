//! Schedules in Redis: their definitions (`{prefix}:schedules`) and next occurrences
//! (`{prefix}:schedule-next`). Firing is the scheduler's (see `scheduler/src/schedules.rs`);
//! the rules are [`crate::schedule`]'s.

use std::collections::BTreeMap;

use super::{Store, StoreError, scripts};
use crate::schedule::Schedule;

/// A stored schedule and its next occurrence (`None` while paused, or when it has no more).
#[derive(Debug, Clone)]
pub struct StoredSchedule {
    pub schedule: Schedule,
    pub next_ms: Option<u64>,
}

impl Store {
    /// Creates or replaces schedule `schedule.name` (checked by the caller). A new one is
    /// anchored at Redis time now; a replaced one keeps its anchor. Its next occurrence is the
    /// first after now (none while paused). Returns whether it existed.
    pub async fn put_schedule(&self, mut schedule: Schedule) -> Result<bool, StoreError> {
        let now = self.redis_time_ms().await?;
        let existing = self.schedule(&schedule.name).await?;
        schedule.created_ms = existing
            .as_ref()
            .map_or(now, |s| s.schedule.created_ms.max(1));
        let json = serde_json::to_string(&schedule).expect("a schedule serializes");
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(self.keys.schedules())
            .arg(&schedule.name)
            .arg(json)
            .ignore();
        match schedule.next_after(now).filter(|_| !schedule.paused) {
            Some(next) => pipe
                .cmd("ZADD")
                .arg(self.keys.schedule_next())
                .arg(next)
                .arg(&schedule.name)
                .ignore(),
            None => pipe
                .cmd("ZREM")
                .arg(self.keys.schedule_next())
                .arg(&schedule.name)
                .ignore(),
        };
        let () = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(existing.is_some())
    }

    /// Schedule `name`, if it exists and reads.
    pub async fn schedule(&self, name: &str) -> Result<Option<StoredSchedule>, StoreError> {
        let (json, next): (Option<String>, Option<f64>) = redis::pipe()
            .cmd("HGET")
            .arg(self.keys.schedules())
            .arg(name)
            .cmd("ZSCORE")
            .arg(self.keys.schedule_next())
            .arg(name)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(json
            .and_then(|j| serde_json::from_str::<Schedule>(&j).ok())
            .map(|schedule| StoredSchedule {
                schedule,
                next_ms: next.map(|n| n as u64),
            }))
    }

    /// Every schedule, by name.
    pub async fn schedules(&self) -> Result<Vec<StoredSchedule>, StoreError> {
        let (all, next): (BTreeMap<String, String>, Vec<(String, f64)>) = redis::pipe()
            .cmd("HGETALL")
            .arg(self.keys.schedules())
            .cmd("ZRANGE")
            .arg(self.keys.schedule_next())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut self.conn.clone())
            .await?;
        let next: BTreeMap<String, f64> = next.into_iter().collect();
        Ok(all
            .into_iter()
            .filter_map(|(name, json)| {
                let schedule = serde_json::from_str::<Schedule>(&json).ok()?;
                Some(StoredSchedule {
                    next_ms: next.get(&name).map(|n| *n as u64),
                    schedule,
                })
            })
            .collect())
    }

    /// Deletes schedule `name`; returns whether it existed. Tasks it fired stay.
    pub async fn delete_schedule(&self, name: &str) -> Result<bool, StoreError> {
        let (deleted, _): (u64, u64) = redis::pipe()
            .atomic()
            .cmd("HDEL")
            .arg(self.keys.schedules())
            .arg(name)
            .cmd("ZREM")
            .arg(self.keys.schedule_next())
            .arg(name)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(deleted > 0)
    }

    /// Pauses or resumes schedule `name`: paused, it fires nothing; resumed, it goes on from
    /// its first occurrence after now (what it would have fired meanwhile is not made up).
    /// Returns false if there is no such schedule.
    pub async fn pause_schedule(&self, name: &str, paused: bool) -> Result<bool, StoreError> {
        let Some(mut stored) = self.schedule(name).await? else {
            return Ok(false);
        };
        stored.schedule.paused = paused;
        self.put_schedule(stored.schedule).await?;
        Ok(true)
    }

    /// Schedules whose next occurrence is at or before `now_ms`, with it (at most `limit`).
    pub async fn due_schedules(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let due: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(self.keys.schedule_next())
            .arg("-inf")
            .arg(now_ms)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .arg("WITHSCORES")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(due.into_iter().map(|(n, s)| (n, s as u64)).collect())
    }

    /// Moves schedule `name` from the occurrence `from_ms` it fired to `next_ms`, unless
    /// another scheduler already did; see `lua/advance_schedule.lua`.
    pub async fn advance_schedule(
        &self,
        name: &str,
        from_ms: u64,
        next_ms: Option<u64>,
    ) -> Result<bool, StoreError> {
        let moved: i64 = scripts::ADVANCE_SCHEDULE
            .key(self.keys.schedule_next())
            .arg(name)
            .arg(from_ms)
            .arg(next_ms.map(|n| n.to_string()).unwrap_or_default())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(moved == 1)
    }
}
