//! The rolling time series behind the dashboard's charts: one Redis hash per 10-second slot,
//! kept for an hour, so a chart needs no Prometheus and a restarted dashboard has its history.
//!
//! Two writers fill a slot, each with what it knows exactly:
//! - a scheduler or reaper samples the fleet once per slot ([`Store::sample_series`]; the
//!   first to set `sampler_ms` samples, the others skip): the terminal totals so far (rates are
//!   their differences between samples) and the tasks waiting and running now;
//! - every worker adds how long the tasks it started in that slot waited, from their dispatch's
//!   publication to their start, as counts per latency bucket ([`WaitSample`]), with each
//!   heartbeat.
//!
//! Fields, per queue (`<dim>` `queue`) and per priority (`priority`); names come last, as a
//! queue name may hold `:`:
//! - `t:<state>:<dim>:<name>`: tasks ended in `<state>` (succeeded, failed, cancelled) so far;
//! - `g:<state>:<dim>:<name>`: tasks `pending`, `scheduled` or `running` at the sample;
//! - `w:<bucket>:<dim>:<name>`: starts whose wait fell in bucket `<bucket>` of [`WAIT_BOUNDS_MS`];
//! - `sampler_ms` (when a process took the slot's sample on), `sampled_ms` (Redis time of the
//!   sample, written with its values) and `partial` (a state held more tasks than the
//!   sample reads: the newest 50,000, as for `GET /v1/stats`).
//!
//! A slot's key expires [`KEEP_MS`] plus two slots after the slot starts: at most 362 keys,
//! each with a few dozen fields per queue and priority.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::query::Live;
use super::{Store, StoreError};
use crate::Priority;
use crate::task::State;

/// Width of one slot.
pub const SLOT_MS: u64 = 10_000;

/// How far back the series reaches.
pub const KEEP_MS: u64 = 3_600_000;

/// Upper bounds of the wait buckets, in ms; a last, unbounded bucket follows. Roughly three per
/// decade, so a quantile read from them is within about 40 % of the true value.
pub const WAIT_BOUNDS_MS: [u64; 30] = [
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500, 700, 1_000, 1_500, 2_000,
    3_000, 5_000, 7_000, 10_000, 15_000, 20_000, 30_000, 60_000, 300_000, 900_000,
];

/// Number of wait buckets, the unbounded one included.
pub const WAIT_BUCKETS: usize = WAIT_BOUNDS_MS.len() + 1;

/// The terminal states counted in a slot, in the order of [`Point`]'s rates.
const ENDED: [State; 3] = [State::Succeeded, State::Failed, State::Cancelled];

/// The states a slot's gauges count.
const LIVE: [State; 3] = [State::Pending, State::Scheduled, State::Running];

/// The bucket a wait of `ms` falls in.
pub fn wait_bucket(ms: u64) -> usize {
    WAIT_BOUNDS_MS.partition_point(|&bound| bound < ms)
}

/// The start of the slot holding `ms`.
pub fn slot_of(ms: u64) -> u64 {
    ms - ms % SLOT_MS
}

/// Waits a worker measured since its last flush, per start slot, queue and priority.
#[derive(Debug, Default)]
pub struct WaitSample {
    /// Queue → (slot, priority) → counts per bucket. Keyed by the queue's name first so that
    /// recording a start looks it up without building a string.
    by_queue: HashMap<String, HashMap<(u64, Priority), [u64; WAIT_BUCKETS]>>,
}

impl WaitSample {
    /// Records one start at `now_ms` of a task of `queue` and `priority` that waited `wait_ms`.
    pub fn record(&mut self, now_ms: u64, queue: &str, priority: Priority, wait_ms: u64) {
        let slots = match self.by_queue.get_mut(queue) {
            Some(slots) => slots,
            None => self.by_queue.entry(queue.to_owned()).or_default(),
        };
        let counts = slots
            .entry((slot_of(now_ms), priority))
            .or_insert([0; WAIT_BUCKETS]);
        counts[wait_bucket(wait_ms)] += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.by_queue.is_empty()
    }

    /// Drops the counts of slots that started before `ms`: past the series' hour, nothing
    /// reads them, so a sample kept through a long Redis outage stays bounded.
    pub fn forget_before(&mut self, ms: u64) {
        let oldest = slot_of(ms);
        self.by_queue.retain(|_, slots| {
            slots.retain(|(slot, _), _| *slot >= oldest);
            !slots.is_empty()
        });
    }

    /// Adds `other`'s counts (a sample that could not be written) to this one.
    pub fn merge(&mut self, other: Self) {
        for (queue, slots) in other.by_queue {
            let mine = self.by_queue.entry(queue).or_default();
            for (key, counts) in slots {
                let sum = mine.entry(key).or_insert([0; WAIT_BUCKETS]);
                for (total, n) in sum.iter_mut().zip(counts) {
                    *total += n;
                }
            }
        }
    }

    /// The increments to write: slot → field → count, per queue and summed per priority.
    fn increments(&self) -> BTreeMap<u64, HashMap<String, u64>> {
        let mut out: BTreeMap<u64, HashMap<String, u64>> = BTreeMap::new();
        for (queue, slots) in &self.by_queue {
            for (&(slot, priority), counts) in slots {
                let fields = out.entry(slot).or_default();
                for (bucket, &n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
                    *fields
                        .entry(wait_field(bucket, "queue", queue))
                        .or_default() += n;
                    *fields
                        .entry(wait_field(bucket, "priority", priority.as_str()))
                        .or_default() += n;
                }
            }
        }
        out
    }
}

fn wait_field(bucket: usize, dimension: &str, name: &str) -> String {
    format!("w:{bucket}:{dimension}:{name}")
}

fn total_field(state: State, dimension: &str, name: &str) -> String {
    format!("t:{}:{dimension}:{name}", state.as_str())
}

fn gauge_field(state: State, dimension: &str, name: &str) -> String {
    format!("g:{}:{dimension}:{name}", state.as_str())
}

/// Which tasks a series counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeriesOf {
    /// Every task (the sum over the priorities: each task has exactly one).
    All,
    Queue(String),
    Priority(Priority),
}

/// A malformed series name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("series must be `all`, `queue:<name>` or `priority:<level>`, not {0:?}")]
pub struct BadSeries(String);

impl std::str::FromStr for SeriesOf {
    type Err = BadSeries;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadSeries(s.chars().take(100).collect());
        match s.split_once(':') {
            None if s == "all" => Ok(Self::All),
            Some(("queue", name)) => crate::task::check_queue(name)
                .map(|()| Self::Queue(name.to_owned()))
                .map_err(|_| bad()),
            Some(("priority", level)) => level.parse().map(Self::Priority).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for SeriesOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::Queue(name) => write!(f, "queue:{name}"),
            Self::Priority(level) => write!(f, "priority:{}", level.as_str()),
        }
    }
}

impl SeriesOf {
    /// The `(dimension, name)` pairs whose fields add up to this series.
    fn parts(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::All => Priority::ALL
                .iter()
                .map(|p| ("priority", p.as_str().to_owned()))
                .collect(),
            Self::Queue(name) => vec![("queue", name.clone())],
            Self::Priority(level) => vec![("priority", level.as_str().to_owned())],
        }
    }
}

/// One slot of a series. Values are `None` where the slot has no sample (no scheduler or
/// reaper ran then) or, for rates, no earlier sample to compare with.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Point {
    /// Start of the slot (ms since the epoch).
    pub t: u64,
    /// When the slot's sample was taken (Redis time); rates are per second since the previous
    /// sample.
    pub sampled_ms: Option<u64>,
    pub succeeded_per_s: Option<f64>,
    pub failed_per_s: Option<f64>,
    pub cancelled_per_s: Option<f64>,
    pub pending: Option<u64>,
    pub scheduled: Option<u64>,
    pub running: Option<u64>,
    /// Tasks started in the slot, as workers reported them so far.
    pub started: u64,
    /// Median and 99th percentile of those starts' waits (publication → start), estimated
    /// from the buckets; `None` without starts.
    pub wait_p50_ms: Option<f64>,
    pub wait_p99_ms: Option<f64>,
}

/// A series over the last minutes, oldest slot first.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub of: String,
    pub slot_ms: u64,
    /// Every series there is to ask for: `all`, each priority, each queue.
    pub available: Vec<String>,
    /// Some sample in the range counted only the newest tasks of a huge state.
    pub partial: bool,
    pub points: Vec<Point>,
}

/// What one slot's hash holds for one series.
#[derive(Debug, Default, Clone)]
struct Slot {
    sampled_ms: Option<u64>,
    partial: bool,
    totals: [u64; ENDED.len()],
    live: [u64; LIVE.len()],
    waits: [u64; WAIT_BUCKETS],
}

/// The fields read per slot: `sampled_ms`, `partial`, then per part its totals, gauges and
/// wait buckets, in [`Slot`]'s order.
fn slot_fields(parts: &[(&'static str, String)]) -> Vec<String> {
    let mut fields = vec!["sampled_ms".to_owned(), "partial".to_owned()];
    for (dimension, name) in parts {
        fields.extend(ENDED.iter().map(|s| total_field(*s, dimension, name)));
        fields.extend(LIVE.iter().map(|s| gauge_field(*s, dimension, name)));
        fields.extend((0..WAIT_BUCKETS).map(|b| wait_field(b, dimension, name)));
    }
    fields
}

/// Sums a slot's values over the series' parts (the reply to [`slot_fields`]).
fn parse_slot(values: &[Option<u64>], parts: usize) -> Slot {
    let mut slot = Slot {
        sampled_ms: values.first().copied().flatten(),
        partial: values.get(1).copied().flatten().unwrap_or(0) > 0,
        ..Slot::default()
    };
    let per_part = ENDED.len() + LIVE.len() + WAIT_BUCKETS;
    for part in 0..parts {
        let at = |i: usize| values.get(2 + part * per_part + i).copied().flatten();
        for i in 0..ENDED.len() {
            slot.totals[i] += at(i).unwrap_or(0);
        }
        for i in 0..LIVE.len() {
            slot.live[i] += at(ENDED.len() + i).unwrap_or(0);
        }
        for b in 0..WAIT_BUCKETS {
            slot.waits[b] += at(ENDED.len() + LIVE.len() + b).unwrap_or(0);
        }
    }
    slot
}

/// The `q` quantile (0 < q < 1) of bucketed waits, interpolated linearly within its bucket; the
/// unbounded bucket reads as its lower bound.
pub fn quantile(waits: &[u64; WAIT_BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = waits.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (bucket, &n) in waits.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let low = if bucket == 0 {
                0.0
            } else {
                WAIT_BOUNDS_MS[bucket - 1] as f64
            };
            let Some(&high) = WAIT_BOUNDS_MS.get(bucket) else {
                return Some(low);
            };
            let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
            return Some(low + (high as f64 - low) * within);
        }
        below += n;
    }
    None
}

/// Points from slots, oldest first: rates come from the totals' change since the previous
/// sampled slot (a total that went down, as a redrive takes a task out of `failed`, reads 0).
fn points(slots: &[(u64, Slot)]) -> Vec<Point> {
    let mut previous: Option<&Slot> = None;
    let mut out = Vec::with_capacity(slots.len());
    for (t, slot) in slots {
        let mut point = Point {
            t: *t,
            started: slot.waits.iter().sum(),
            wait_p50_ms: quantile(&slot.waits, 0.5),
            wait_p99_ms: quantile(&slot.waits, 0.99),
            ..Point::default()
        };
        point.sampled_ms = slot.sampled_ms;
        if let Some(at) = slot.sampled_ms {
            [point.pending, point.scheduled, point.running] = slot.live.map(Some);
            if let Some(before) = previous
                && let Some(before_at) = before.sampled_ms
                && at > before_at
            {
                let seconds = (at - before_at) as f64 / 1000.0;
                let rate = |i: usize| {
                    Some(slot.totals[i].saturating_sub(before.totals[i]) as f64 / seconds)
                };
                point.succeeded_per_s = rate(0);
                point.failed_per_s = rate(1);
                point.cancelled_per_s = rate(2);
            }
            previous = Some(slot);
        }
        out.push(point);
    }
    out
}

impl Store {
    /// Adds a worker's measured waits to their slots.
    pub async fn add_waits(&self, sample: &WaitSample) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for (slot, fields) in sample.increments() {
            let key = self.keys().series(slot);
            for (field, n) in fields {
                pipe.cmd("HINCRBY").arg(&key).arg(field).arg(n).ignore();
            }
            pipe.cmd("PEXPIREAT")
                .arg(&key)
                .arg(slot + KEEP_MS + 2 * SLOT_MS)
                .ignore();
        }
        let () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Samples the fleet into the current slot unless another process did already; returns
    /// whether this call sampled.
    pub async fn sample_series(&self) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let now = redis_now_ms(&mut conn).await?;
        let slot = slot_of(now);
        let key = self.keys().series(slot);
        // The claim is its own field: `sampled_ms` comes with the sample's values, so a reader
        // never takes a slot being sampled for one whose tasks were all zero.
        let first: bool = redis::cmd("HSETNX")
            .arg(&key)
            .arg("sampler_ms")
            .arg(now)
            .query_async(&mut conn)
            .await?;
        if !first {
            return Ok(false);
        }
        let totals: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(self.keys().totals())
            .query_async(&mut conn)
            .await?;
        let Live {
            by_queue,
            by_priority,
            partial,
        } = self.live_counts().await?;
        let mut fields: Vec<(String, u64)> = totals
            .into_iter()
            .map(|(field, n)| (format!("t:{field}"), n))
            .collect();
        for (dimension, counts) in [("queue", by_queue), ("priority", by_priority)] {
            for (name, states) in counts {
                for state in LIVE {
                    let n = states.get(state.as_str()).copied().unwrap_or(0);
                    fields.push((gauge_field(state, dimension, &name), n));
                }
            }
        }
        fields.push(("partial".to_owned(), u64::from(partial)));
        fields.push(("sampled_ms".to_owned(), now));
        let mut pipe = redis::pipe();
        pipe.cmd("HSET").arg(&key).arg(&fields).ignore();
        pipe.cmd("PEXPIREAT")
            .arg(&key)
            .arg(slot + KEEP_MS + 2 * SLOT_MS)
            .ignore();
        let () = pipe.query_async(&mut conn).await?;
        Ok(true)
    }

    /// Series `of` over the last `minutes` (at most an hour), one point per slot.
    pub async fn series(&self, of: &SeriesOf, minutes: u64) -> Result<Series, StoreError> {
        let mut conn = self.conn();
        let now = redis_now_ms(&mut conn).await?;
        let last = slot_of(now);
        let count = (minutes.min(KEEP_MS / 60_000) * 60_000 / SLOT_MS).max(1);
        let first = last - (count - 1) * SLOT_MS;
        let parts = of.parts();
        let fields = slot_fields(&parts);
        let mut pipe = redis::pipe();
        // One slot more than shown: the first point's rates need the sample before it.
        let slots: Vec<u64> = (0..=count).map(|i| first - SLOT_MS + i * SLOT_MS).collect();
        for slot in &slots {
            pipe.cmd("HMGET")
                .arg(self.keys().series(*slot))
                .arg(&fields);
        }
        let rows: Vec<Vec<Option<u64>>> = pipe.query_async(&mut conn).await?;
        let slots: Vec<(u64, Slot)> = slots
            .into_iter()
            .zip(rows)
            .map(|(t, values)| (t, parse_slot(&values, parts.len())))
            .collect();
        let partial = slots.iter().skip(1).any(|(_, s)| s.partial);
        let mut points = points(&slots);
        points.remove(0);
        let queues: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys().queues())
            .query_async(&mut conn)
            .await?;
        let mut queues: Vec<String> = queues.into_iter().map(|q| format!("queue:{q}")).collect();
        queues.sort();
        let available = std::iter::once("all".to_owned())
            .chain(
                Priority::ALL
                    .iter()
                    .map(|p| format!("priority:{}", p.as_str())),
            )
            .chain(queues)
            .collect();
        Ok(Series {
            of: of.to_string(),
            slot_ms: SLOT_MS,
            available,
            partial,
            points,
        })
    }
}

async fn redis_now_ms(conn: &mut redis::aio::ConnectionManager) -> Result<u64, StoreError> {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(s * 1000 + us / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_their_upper_bound() {
        assert_eq!(wait_bucket(0), 0);
        assert_eq!(wait_bucket(1), 0);
        assert_eq!(wait_bucket(2), 1);
        assert_eq!(wait_bucket(6), 4);
        assert_eq!(wait_bucket(900_000), WAIT_BOUNDS_MS.len() - 1);
        assert_eq!(wait_bucket(900_001), WAIT_BOUNDS_MS.len());
        assert_eq!(slot_of(123_456), 120_000);
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket() {
        let mut waits = [0; WAIT_BUCKETS];
        assert_eq!(quantile(&waits, 0.5), None);
        // 100 starts between 10 and 15 ms: the median is halfway.
        waits[wait_bucket(12)] = 100;
        assert_eq!(quantile(&waits, 0.5), Some(12.5));
        // One slow start in a thousand does not move the p99; ten do.
        waits[wait_bucket(12)] = 999;
        waits[wait_bucket(2_500)] = 1;
        assert!(quantile(&waits, 0.99).unwrap() <= 15.0);
        waits[wait_bucket(12)] = 980;
        waits[wait_bucket(2_500)] = 20;
        let p99 = quantile(&waits, 0.99).unwrap();
        assert!((2_000.0..=3_000.0).contains(&p99), "{p99}");
        let mut slow = [0; WAIT_BUCKETS];
        slow[WAIT_BUCKETS - 1] = 3;
        assert_eq!(quantile(&slow, 0.5), Some(900_000.0));
    }

    #[test]
    fn waits_add_up_per_queue_and_per_priority() {
        let mut sample = WaitSample::default();
        sample.record(10_001, "emails", Priority::High, 4);
        sample.record(19_999, "emails", Priority::High, 4);
        sample.record(20_000, "emails", Priority::Low, 4);
        sample.record(20_000, "a:b", Priority::Low, 4);
        let increments = sample.increments();
        let b = wait_bucket(4);
        assert_eq!(increments[&10_000][&format!("w:{b}:queue:emails")], 2);
        assert_eq!(increments[&10_000][&format!("w:{b}:priority:high")], 2);
        assert_eq!(increments[&20_000][&format!("w:{b}:priority:low")], 2);
        assert_eq!(increments[&20_000][&format!("w:{b}:queue:a:b")], 1);
    }

    #[test]
    fn a_kept_sample_forgets_what_the_series_no_longer_shows() {
        let mut sample = WaitSample::default();
        sample.record(5_000, "old", Priority::Low, 4);
        sample.record(KEEP_MS + 15_000, "emails", Priority::High, 4);
        sample.forget_before(15_000);
        let increments = sample.increments();
        assert_eq!(
            increments.keys().copied().collect::<Vec<_>>(),
            [KEEP_MS + 10_000]
        );
        sample.forget_before(KEEP_MS + 20_000);
        assert!(sample.is_empty());
    }

    #[test]
    fn series_names_parse_and_print() {
        for name in ["all", "queue:emails", "queue:a:b", "priority:critical"] {
            assert_eq!(name.parse::<SeriesOf>().unwrap().to_string(), name);
        }
        for bad in [
            "",
            "queue:",
            "queue:a b",
            "priority:urgent",
            "kind:x",
            "<script>",
        ] {
            assert!(bad.parse::<SeriesOf>().is_err(), "{bad}");
        }
    }

    #[test]
    fn rates_come_from_consecutive_samples() {
        let slot = |sampled: Option<u64>, succeeded: u64, failed: u64| Slot {
            sampled_ms: sampled,
            totals: [succeeded, failed, 0],
            live: [5, 0, 2],
            ..Slot::default()
        };
        let points = points(&[
            (0, slot(Some(1_000), 100, 10)),
            (10_000, slot(None, 0, 0)),
            (20_000, slot(Some(21_000), 300, 5)),
        ]);
        assert_eq!(
            points[0].succeeded_per_s, None,
            "no sample before the first"
        );
        assert_eq!(points[0].pending, Some(5));
        assert_eq!(
            points[1],
            Point {
                t: 10_000,
                ..Point::default()
            }
        );
        assert_eq!(points[2].succeeded_per_s, Some(10.0), "200 in 20 s");
        assert_eq!(points[2].failed_per_s, Some(0.0), "a total that went down");
        assert_eq!(points[2].running, Some(2));
    }

    #[test]
    fn a_slot_sums_its_parts() {
        let parts = SeriesOf::All.parts();
        let fields = slot_fields(&parts);
        assert_eq!(fields.len(), 2 + 4 * (3 + 3 + WAIT_BUCKETS));
        let values: Vec<Option<u64>> = fields
            .iter()
            .map(|f| match f.as_str() {
                "sampled_ms" => Some(7),
                f if f.starts_with("t:succeeded:") => Some(1),
                f if f.starts_with("g:running:") => Some(2),
                f if f.starts_with("w:3:") => Some(3),
                _ => None,
            })
            .collect();
        let slot = parse_slot(&values, parts.len());
        assert_eq!(slot.sampled_ms, Some(7));
        assert_eq!(slot.totals, [4, 0, 0]);
        assert_eq!(slot.live, [0, 0, 8]);
        assert_eq!(slot.waits[3], 12);
    }
}
