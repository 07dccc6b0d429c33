//! Read-side queries for operators: paged task lists with filters, fleet statistics per queue
//! and priority, and live workers. Nothing here changes state.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::Store;
use super::StoreError;
use super::control::Selector;
use super::model::{StoredTask, TaskTimes, WorkerInfo};
use crate::priority::Priority;
use crate::task::State;

/// Which tasks [`Store::list`] returns; every set field must match.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub state: Option<State>,
    pub queue: Option<String>,
    pub kind: Option<String>,
    pub priority: Option<Priority>,
}

/// One task in a list.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TaskSummary {
    pub id: String,
    pub state: String,
    pub kind: String,
    pub queue: String,
    pub priority: String,
    pub attempt: u64,
    pub worker: String,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub last_error: String,
    pub progress: Option<u64>,
}

/// A page of tasks, newest first, and the cursor of the next page if there is one.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub tasks: Vec<TaskSummary>,
    pub next: Option<String>,
}

/// Where a [`Store::list`] page starts: `"<index>:<offset>"`, as a previous page's `next`
/// gives it. Anything else is refused, so a mistyped cursor is not silently the first page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Which index of the list's walk (one per state when no state or queue is given).
    index: usize,
    /// How many entries of that index were read already.
    offset: usize,
}

/// A cursor that no page gave out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a list cursor: pass the `next` value of the previous page (e.g. `1:50`)")]
pub struct BadCursor(String);

impl std::str::FromStr for Cursor {
    type Err = BadCursor;

    fn from_str(text: &str) -> Result<Self, BadCursor> {
        let bad = || BadCursor(text.chars().take(64).collect());
        let (index, offset) = text.split_once(':').ok_or_else(bad)?;
        let number = |s: &str| {
            (!s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        match (number(index), number(offset)) {
            // Fewer than one index per state is all a walk ever has.
            (Some(index), Some(offset)) if index < LIST_ORDER.len() => Ok(Self { index, offset }),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.index, self.offset)
    }
}

/// A live worker, from its heartbeats.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    pub id: String,
    /// What the worker reports: host, pid, version, concurrency, kinds, partitions…
    pub info: WorkerInfo,
    pub running: u64,
    pub last_seen_ms: u64,
    /// What placed tasks hold on it now, by resource (`info.capacity` has the whole).
    pub in_use: BTreeMap<String, f64>,
}

/// Task counts for one queue or priority: by state (terminal states are totals since the
/// fleet's data was created; the others are current).
pub(super) type Counts = BTreeMap<String, u64>;

/// Fleet statistics.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Current members of each state index.
    pub states: BTreeMap<String, u64>,
    pub by_queue: BTreeMap<String, Counts>,
    pub by_priority: BTreeMap<String, Counts>,
    /// Tasks that succeeded in the last minute, per second.
    pub succeeded_per_s: f64,
    pub paused: Vec<String>,
    pub held: u64,
    /// Placed tasks waiting for a worker, per queue (also counted in `pending`).
    pub placing: BTreeMap<String, u64>,
    /// Placed tasks no live worker could take even when idle, out of their queues until the
    /// live workers change (also counted in `pending`).
    pub placing_parked: u64,
    pub counters: BTreeMap<String, u64>,
    /// True when a waiting or running state held more than `STATS_SCAN_LIMIT` tasks: the
    /// per-queue and per-priority counts of that state then cover only the newest ones.
    pub partial: bool,
}

/// Most tasks per non-terminal state that [`Store::stats`] reads to split counts by queue and
/// priority, so a huge backlog cannot make a dashboard refresh read all of it.
pub(super) const STATS_SCAN_LIMIT: usize = 50_000;

/// Tasks of the non-terminal states per queue and per priority, as [`Store::live_counts`]
/// counts them.
#[derive(Debug, Default)]
pub(super) struct Live {
    pub by_queue: BTreeMap<String, Counts>,
    pub by_priority: BTreeMap<String, Counts>,
    /// Some state held more than [`STATS_SCAN_LIMIT`] tasks: the counts cover its newest.
    pub partial: bool,
}

/// Fields a list reads per task.
const SUMMARY_FIELDS: [&str; 12] = [
    "state",
    "kind",
    "queue",
    "priority",
    "attempt",
    "worker",
    "created_ms",
    "updated_ms",
    "last_error",
    "progress",
    "started_ms",
    "finished_ms",
];

/// Most index entries one list call reads while filtering, so a rare filter cannot make a
/// request scan millions of tasks; the cursor continues where it stopped.
const SCAN_BUDGET: usize = 20_000;

/// The order "all states" are listed in: what needs attention first.
const LIST_ORDER: [State; 6] = [
    State::Running,
    State::Pending,
    State::Scheduled,
    State::Failed,
    State::Cancelled,
    State::Succeeded,
];

impl Store {
    /// The journey times of each of `ids`, in order (`None` for a task not in Redis): one
    /// pipelined `HMGET` and `HSTRLEN` per task, in rounds of 5,000.
    pub async fn task_times(&self, ids: &[String]) -> Result<Vec<Option<TaskTimes>>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        let mut fields = TaskTimes::FIELDS.to_vec();
        fields.push(TaskTimes::FINISHED);
        for chunk in ids.chunks(5_000) {
            let mut pipe = redis::pipe();
            for id in chunk {
                let key = self.keys().task(id);
                pipe.cmd("HMGET").arg(&key).arg(&fields);
                pipe.cmd("HSTRLEN").arg(&key).arg(TaskTimes::RECORD);
            }
            let replies: Vec<(Vec<Option<String>>, usize)> =
                pipe.query_async(&mut self.conn()).await?;
            out.extend(
                replies
                    .into_iter()
                    .map(|(values, record)| TaskTimes::from_values(&values, record)),
            );
        }
        Ok(out)
    }

    /// Tasks matching `filter`, newest first, `limit` at most, from `cursor` (from a previous
    /// page's `next`).
    pub async fn list(
        &self,
        filter: &TaskFilter,
        cursor: Option<Cursor>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        // The index to walk: the state's, else the queue's, else every state's in turn.
        let indexes: Vec<String> = match (&filter.state, &filter.queue) {
            (Some(state), _) => vec![self.keys().state_index(*state)],
            (None, Some(queue)) => vec![self.keys().queue_index(queue)],
            (None, None) => LIST_ORDER
                .iter()
                .map(|s| self.keys().state_index(*s))
                .collect(),
        };
        let Cursor {
            mut index,
            mut offset,
        } = cursor.unwrap_or_default();
        let limit = limit.clamp(1, 1000);
        let mut tasks = Vec::new();
        let mut scanned = 0;
        while index < indexes.len() && tasks.len() < limit && scanned < SCAN_BUDGET {
            let chunk = (limit * 2).clamp(50, 1000);
            let ids: Vec<String> = redis::cmd("ZREVRANGE")
                .arg(&indexes[index])
                .arg(offset)
                .arg(offset + chunk - 1)
                .query_async(&mut self.conn())
                .await?;
            if ids.is_empty() {
                index += 1;
                offset = 0;
                continue;
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HMGET")
                    .arg(self.keys().task(id))
                    .arg(&SUMMARY_FIELDS[..]);
            }
            let rows: Vec<Vec<Option<String>>> = pipe.query_async(&mut self.conn()).await?;
            for (id, row) in ids.iter().zip(rows) {
                offset += 1;
                scanned += 1;
                if let Some(task) = summary(id, row).filter(|t| matches(t, filter)) {
                    tasks.push(task);
                    if tasks.len() == limit {
                        break;
                    }
                }
            }
        }
        let more = index < indexes.len();
        Ok(Page {
            tasks,
            next: more.then(|| Cursor { index, offset }.to_string()),
        })
    }

    /// Statistics of the whole fleet.
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let states: BTreeMap<String, u64> = self
            .counts()
            .await?
            .into_iter()
            .map(|(s, n)| (s.as_str().to_string(), n))
            .collect();
        let Live {
            mut by_queue,
            mut by_priority,
            partial,
        } = self.live_counts().await?;
        let totals: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(self.keys().totals())
            .query_async(&mut self.conn())
            .await?;
        for (field, n) in totals {
            let mut parts = field.splitn(3, ':');
            let (Some(state), Some(dimension), Some(name)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let target = match dimension {
                "queue" => &mut by_queue,
                "priority" => &mut by_priority,
                _ => continue,
            };
            *target
                .entry(name.into())
                .or_default()
                .entry(state.into())
                .or_default() += n;
        }
        let mut conn = self.conn();
        let time: (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let now = time.0 * 1000 + time.1 / 1000;
        let last_minute: u64 = redis::cmd("ZCOUNT")
            .arg(self.keys().state_index(State::Succeeded))
            .arg(now.saturating_sub(60_000))
            .arg("+inf")
            .query_async(&mut conn)
            .await?;
        Ok(Stats {
            states,
            by_queue,
            by_priority,
            succeeded_per_s: last_minute as f64 / 60.0,
            paused: self.paused().await?.iter().map(Selector::member).collect(),
            held: self.held_count().await?,
            placing: self.placing_counts().await?,
            placing_parked: self.parked_count().await?,
            counters: self.counters().await?.into_iter().collect(),
            partial,
        })
    }

    /// Waiting and running tasks per queue and per priority, from the newest
    /// [`STATS_SCAN_LIMIT`] of each non-terminal state.
    pub(super) async fn live_counts(&self) -> Result<Live, StoreError> {
        let mut live = Live::default();
        for state in [State::Pending, State::Scheduled, State::Running] {
            let ids: Vec<String> = redis::cmd("ZREVRANGE")
                .arg(self.keys().state_index(state))
                .arg(0)
                .arg(STATS_SCAN_LIMIT - 1)
                .query_async(&mut self.conn())
                .await?;
            live.partial |= ids.len() == STATS_SCAN_LIMIT;
            for chunk in ids.chunks(1000) {
                let mut pipe = redis::pipe();
                for id in chunk {
                    pipe.cmd("HMGET")
                        .arg(self.keys().task(id))
                        .arg("queue")
                        .arg("priority");
                }
                let rows: Vec<(Option<String>, Option<String>)> =
                    pipe.query_async(&mut self.conn()).await?;
                for (queue, priority) in rows {
                    if let (Some(q), Some(p)) = (queue, priority) {
                        *live
                            .by_queue
                            .entry(q)
                            .or_default()
                            .entry(state.as_str().into())
                            .or_default() += 1;
                        *live
                            .by_priority
                            .entry(p)
                            .or_default()
                            .entry(state.as_str().into())
                            .or_default() += 1;
                    }
                }
            }
        }
        Ok(live)
    }

    /// Workers heard from within `max_age_ms`, with what they report.
    pub async fn workers(&self, max_age_ms: u64) -> Result<Vec<WorkerView>, StoreError> {
        let live = self.live_workers(max_age_ms).await?;
        let mut pipe = redis::pipe();
        for (id, _) in &live {
            pipe.cmd("HMGET")
                .arg(self.keys().worker(id))
                .arg("running")
                .arg("last_seen_ms");
        }
        let rows: Vec<(Option<u64>, Option<u64>)> = if live.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut self.conn()).await?
        };
        let mut used = self.placement_use().await?;
        Ok(live
            .into_iter()
            .zip(rows)
            .map(|((id, info), (running, seen))| {
                let in_use = used
                    .remove(&id)
                    .unwrap_or_default()
                    .0
                    .into_iter()
                    .map(|(name, milli)| (name, milli as f64 / 1000.0))
                    .collect();
                WorkerView {
                    id,
                    info,
                    running: running.unwrap_or(0),
                    last_seen_ms: seen.unwrap_or(0),
                    in_use,
                }
            })
            .collect())
    }
}

fn summary(id: &str, row: Vec<Option<String>>) -> Option<TaskSummary> {
    let mut row = row.into_iter();
    let mut text = || row.next().flatten().unwrap_or_default();
    let state = text();
    if state.is_empty() {
        return None; // expired meanwhile
    }
    let (kind, queue, priority) = (text(), text(), text());
    let attempt = text().parse().unwrap_or(0);
    let worker = text();
    let created_ms = text().parse().unwrap_or(0);
    let updated = text();
    let last_error = text();
    let progress = text().parse().ok();
    let (started, finished) = (text(), text());
    let updated_ms = super::model::last_update(
        updated.parse().ok(),
        started.parse().ok(),
        finished.parse().ok(),
    );
    Some(TaskSummary {
        id: id.to_string(),
        state,
        kind,
        queue,
        priority,
        attempt,
        worker,
        created_ms,
        updated_ms,
        last_error,
        progress,
    })
}

fn matches(task: &TaskSummary, filter: &TaskFilter) -> bool {
    filter.state.is_none_or(|s| s.as_str() == task.state)
        && filter.queue.as_deref().is_none_or(|q| q == task.queue)
        && filter.kind.as_deref().is_none_or(|k| k == task.kind)
        && filter.priority.is_none_or(|p| p.as_str() == task.priority)
}

impl Store {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_anything_else_is_refused() {
        let cursor: Cursor = "2:40".parse().unwrap();
        assert_eq!(
            cursor,
            Cursor {
                index: 2,
                offset: 40
            }
        );
        assert_eq!(cursor.to_string(), "2:40");
        let long = "9".repeat(10_000);
        for bad in [
            "",
            "x",
            "not-a-cursor",
            "1:-3",
            "-1:3",
            ":",
            "1:",
            ":5",
            "1:2:3",
            " 1:2",
            "1:2 ",
            "+1:2",
            "6:0",
            "1:99999999999999999999",
            &long,
        ] {
            let err = bad.parse::<Cursor>().unwrap_err();
            assert!(
                err.to_string().contains("is not a list cursor"),
                "{bad}: {err}"
            );
            assert!(
                err.to_string().len() < 200,
                "the error quotes at most 64 characters"
            );
        }
    }
}
