//! Index upkeep, run by the reaper: entries of tasks that are gone or ended long ago, and the
//! index an older schema left behind.

use super::{Store, StoreError};
use crate::task::State;

impl Store {
    /// Removes index entries of terminal tasks older than the retention period (their hashes
    /// expire on their own), and queue-index entries of expired tasks. Returns how many
    /// entries were removed.
    pub async fn trim_terminal_indexes(&self) -> Result<u64, StoreError> {
        let time: (u64, u64) = redis::cmd("TIME").query_async(&mut self.conn()).await?;
        let cutoff = (time.0 * 1000 + time.1 / 1000).saturating_sub(self.retention_ms());
        let mut pipe = redis::pipe();
        for state in State::ALL.into_iter().filter(|s| s.is_terminal()) {
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(self.keys().state_index(state))
                .arg("-inf")
                .arg(cutoff);
        }
        let removed: Vec<u64> = pipe.query_async(&mut self.conn()).await?;
        let mut total: u64 = removed.into_iter().sum();
        total += self.prune_retired_running_index().await?;

        // Queue indexes keep every task of a queue; drop entries older than the retention
        // period whose task hash has expired (a long-delayed task stays).
        let queues: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys().queues())
            .query_async(&mut self.conn())
            .await?;
        for queue in queues {
            let index = self.keys().queue_index(&queue);
            let old: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(&index)
                .arg("-inf")
                .arg(cutoff)
                .arg("LIMIT")
                .arg(0)
                .arg(10_000)
                .query_async(&mut self.conn())
                .await?;
            if old.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for id in &old {
                pipe.exists(self.keys().task(id));
            }
            let exists: Vec<bool> = pipe.query_async(&mut self.conn()).await?;
            let gone: Vec<&String> = old
                .iter()
                .zip(exists)
                .filter_map(|(id, e)| (!e).then_some(id))
                .collect();
            if !gone.is_empty() {
                let n: u64 = redis::cmd("ZREM")
                    .arg(&index)
                    .arg(&gone)
                    .query_async(&mut self.conn())
                    .await?;
                total += n;
            }
        }
        Ok(total)
    }

    /// Removes entries of schema 3's `running` index
    /// ([`Keys::retired_running_index`](super::Keys::retired_running_index)) whose task no
    /// longer runs, oldest first, at most 1,000 per call. Services of version 3 add
    /// and remove their own entries while a rolling upgrade goes on; what they leave behind
    /// is a task they claimed that a version-4 process ended (the reaper, after their worker
    /// died). Nothing of version 4 reads the key, so a race with a version-3 claim costs
    /// nothing but that service's count; the key is gone once its last entry is.
    async fn prune_retired_running_index(&self) -> Result<u64, StoreError> {
        let index = self.keys().retired_running_index();
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(&index)
            .arg(0)
            .arg(999)
            .query_async(&mut self.conn())
            .await?;
        if ids.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hget(self.keys().task(id), "state");
        }
        let states: Vec<Option<String>> = pipe.query_async(&mut self.conn()).await?;
        let ended: Vec<&String> = ids
            .iter()
            .zip(states)
            .filter_map(|(id, state)| (state.as_deref() != Some("running")).then_some(id))
            .collect();
        if ended.is_empty() {
            return Ok(0);
        }
        Ok(redis::cmd("ZREM")
            .arg(&index)
            .arg(&ended)
            .query_async(&mut self.conn())
            .await?)
    }
}
