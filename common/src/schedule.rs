//! Schedules: a task submitted by the schedulers at each occurrence of a cron expression (with
//! seconds, in a time zone) or of a fixed interval.
//!
//! Any number of scheduler replicas fire a schedule; each occurrence's task id is derived from
//! the schedule's name and the occurrence's time ([`Schedule::task_id`]), so a replica that
//! fires an occurrence another already fired creates nothing new (acceptance is idempotent by
//! id). Cron expressions are evaluated by `croner`, time zones by `chrono-tz`: wall-clock
//! times, each firing once. An occurrence in an hour that a change to summer time skips fires
//! once, at the first second after the gap; one in an hour repeated by the change back fires
//! once, in its first pass (as Vixie cron does). `every_ms` counts real time instead.
//!
//! Occurrences a down fleet missed (older than `misfire_grace_ms` when a scheduler finds them)
//! follow the schedule's misfire policy: `skip`, `run_once` (the latest), or `catch_up` (the
//! latest `catch_up_max`).

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::task::TaskSpec;

/// Longest schedule name: its task ids add the occurrence's time (`<name>:<unix ms>`).
pub const MAX_NAME_LEN: usize = 100;
/// Shortest and longest `every_ms`.
pub const MIN_EVERY_MS: u64 = 1000;
pub const MAX_EVERY_MS: u64 = 365 * 24 * 3600 * 1000;
/// Most occurrences `catch_up` fires after an outage.
pub const MAX_CATCH_UP: u32 = 1000;
/// Default `misfire_grace_ms`: an occurrence found later than this is a misfire.
pub const DEFAULT_GRACE_MS: u64 = 5000;

/// What to do with occurrences missed while no scheduler ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Misfire {
    /// Fire none of them; go on with the next occurrence.
    Skip,
    /// Fire one task, for the latest missed occurrence.
    #[default]
    RunOnce,
    /// Fire every missed occurrence, the latest `catch_up_max`.
    CatchUp,
}

/// A schedule as stored (`{prefix}:schedules`, JSON) and given to the API and `fleetctl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Set from the path or command line, not the body.
    #[serde(default)]
    pub name: String,
    /// A cron expression: 5 fields, or 6 with seconds first (`*/10 * * * * *`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Or a fixed interval, counted from the schedule's creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// IANA time zone of the cron expression (default `UTC`).
    #[serde(default = "utc")]
    pub tz: String,
    /// The task submitted at each occurrence (a submission without `id`).
    pub task: Box<RawValue>,
    #[serde(default)]
    pub misfire: Misfire,
    #[serde(default = "default_catch_up")]
    pub catch_up_max: u32,
    #[serde(default = "default_grace")]
    pub misfire_grace_ms: u64,
    /// Each firing's task waits a random 0..jitter_ms (its `delay_ms`).
    #[serde(default)]
    pub jitter_ms: u64,
    #[serde(default)]
    pub paused: bool,
    /// When it was created (Redis ms): the anchor of `every_ms`.
    #[serde(default)]
    pub created_ms: u64,
}

fn utc() -> String {
    "UTC".into()
}

fn default_catch_up() -> u32 {
    10
}

fn default_grace() -> u64 {
    DEFAULT_GRACE_MS
}

/// Why a schedule was refused; safe to show to whoever sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSchedule(pub String);

fn invalid(text: impl Into<String>) -> InvalidSchedule {
    InvalidSchedule(text.into())
}

/// A schedule's timing, parsed.
#[derive(Debug, Clone)]
enum Timing {
    Cron(Box<Cron>, Tz),
    Every { anchor: u64, every: u64 },
}

impl Schedule {
    /// Parses a body (JSON) for schedule `name` and checks it.
    pub fn parse(name: &str, body: &[u8], max_task_bytes: usize) -> Result<Self, InvalidSchedule> {
        let mut schedule: Schedule =
            serde_json::from_slice(body).map_err(|e| invalid(format!("not a schedule: {e}")))?;
        schedule.name = name.to_string();
        schedule.validate(max_task_bytes)?;
        Ok(schedule)
    }

    /// Checks every field; a valid schedule has a next occurrence.
    pub fn validate(&self, max_task_bytes: usize) -> Result<(), InvalidSchedule> {
        check_name(&self.name)?;
        self.timing()?;
        let spec = TaskSpec::parse(self.task.get().as_bytes(), max_task_bytes)
            .map_err(|e| invalid(format!("`task`: {e}")))?;
        for (field, given) in [
            ("id", spec.id.is_some()),
            ("idempotency_key", spec.idempotency_key.is_some()),
            ("depends_on", spec.depends_on.is_some()),
            ("run_at", spec.run_at.is_some()),
        ] {
            if given {
                return Err(invalid(format!(
                    "`task` may not set `{field}`: each firing gets its own id and runs at its time"
                )));
            }
        }
        if !(1..=MAX_CATCH_UP).contains(&self.catch_up_max) {
            return Err(invalid(format!(
                "`catch_up_max` must be 1 to {MAX_CATCH_UP}"
            )));
        }
        if !(100..=MAX_EVERY_MS).contains(&self.misfire_grace_ms) {
            return Err(invalid(format!(
                "`misfire_grace_ms` must be 100 to {MAX_EVERY_MS}"
            )));
        }
        if self.jitter_ms > MAX_EVERY_MS {
            return Err(invalid(format!(
                "`jitter_ms` must be at most {MAX_EVERY_MS}"
            )));
        }
        Ok(())
    }

    fn timing(&self) -> Result<Timing, InvalidSchedule> {
        match (&self.cron, self.every_ms) {
            (Some(expr), None) => {
                if expr.len() > 200 {
                    return Err(invalid("`cron` is longer than 200 characters"));
                }
                let cron = CronParser::builder()
                    .seconds(Seconds::Optional)
                    .build()
                    .parse(expr)
                    .map_err(|e| invalid(format!("`cron` `{}`: {e}", shown(expr))))?;
                let tz = Tz::from_str(&self.tz).map_err(|_| {
                    invalid(format!(
                        "`tz` `{}` is not an IANA time zone (e.g. Europe/Berlin, UTC)",
                        shown(&self.tz)
                    ))
                })?;
                // A pattern that never matches (e.g. 30 February) is refused now.
                cron.find_next_occurrence(&Utc::now().with_timezone(&tz), false)
                    .map_err(|e| invalid(format!("`cron` `{}` never fires: {e}", shown(expr))))?;
                Ok(Timing::Cron(Box::new(cron), tz))
            }
            (None, Some(every)) => {
                if !(MIN_EVERY_MS..=MAX_EVERY_MS).contains(&every) {
                    return Err(invalid(format!(
                        "`every_ms` must be {MIN_EVERY_MS} to {MAX_EVERY_MS}"
                    )));
                }
                if self.tz != "UTC" {
                    return Err(invalid("`tz` applies to `cron`, not to `every_ms`"));
                }
                Ok(Timing::Every {
                    anchor: self.created_ms,
                    every,
                })
            }
            _ => Err(invalid("give one of `cron` and `every_ms`")),
        }
    }

    /// The first occurrence strictly after `after_ms` (unix ms); `None` if there is none (a
    /// cron pattern whose last match has passed).
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        match self.timing().ok()? {
            Timing::Cron(cron, tz) => {
                // Whole seconds: croner keeps the start's fraction in what it finds. In the
                // second pass of a repeated hour croner answers the first pass's time, which is
                // behind: such a time is passed over (it fired in the first pass), a second at a
                // time, at most two hours' worth.
                let first = after_ms / 1000;
                for from in first..first + 7200 {
                    let start = tz.timestamp_opt(from as i64, 0).single()?;
                    let found = cron.find_next_occurrence(&start, false).ok()?;
                    let found = found.timestamp_millis() as u64;
                    if found > after_ms {
                        return Some(found);
                    }
                }
                None
            }
            Timing::Every { anchor, every } => {
                if after_ms < anchor {
                    return Some(anchor);
                }
                Some(anchor + ((after_ms - anchor) / every + 1) * every)
            }
        }
    }

    /// The next `n` occurrences after `after_ms`.
    pub fn upcoming(&self, after_ms: u64, n: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(n);
        let mut at = after_ms;
        while out.len() < n {
            match self.next_after(at) {
                Some(next) => {
                    out.push(next);
                    at = next;
                }
                None => break,
            }
        }
        out
    }

    /// What a scheduler fires at `now_ms` for occurrences from `next_ms` on (the stored next
    /// occurrence): the occurrences to submit, by the misfire policy, and the next one to wait
    /// for. Occurrences within `misfire_grace_ms` of now are always fired.
    pub fn due(&self, next_ms: u64, now_ms: u64) -> Firing {
        let cutoff = now_ms.saturating_sub(self.misfire_grace_ms);
        // Missed: the latest ones only, found backwards from the cutoff, so an outage of any
        // length costs at most `catch_up_max` steps.
        let wanted = match self.misfire {
            Misfire::Skip => 0,
            Misfire::RunOnce => 1,
            Misfire::CatchUp => self.catch_up_max as usize,
        };
        let mut fire = Vec::new();
        // Missed: older than the cutoff (later than `misfire_grace_ms` now). Found forward from
        // the stored next, as they would have fired (a daylight-saving gap's occurrence is the
        // first second after it, as forward search finds it); past 10,000 of them, backward
        // from the cutoff instead, so an outage of any length costs a bounded amount of work.
        if next_ms < cutoff && wanted > 0 {
            let mut kept = std::collections::VecDeque::with_capacity(wanted);
            let mut at = Some(next_ms);
            let mut steps = 0;
            while let Some(t) = at.filter(|&t| t < cutoff && steps < 10_000) {
                if kept.len() == wanted {
                    kept.pop_front();
                }
                kept.push_back(t);
                at = self.next_after(t);
                steps += 1;
            }
            if steps < 10_000 {
                fire.extend(kept);
            } else {
                let mut at = self.at_or_before(cutoff - 1);
                while let Some(t) = at.filter(|&t| t >= next_ms && fire.len() < wanted) {
                    fire.push(t);
                    at = t.checked_sub(1).and_then(|b| self.at_or_before(b));
                }
                fire.reverse();
            }
        }
        // On time: every occurrence from the later of the stored next and the cutoff to now.
        let mut at = if next_ms >= cutoff {
            Some(next_ms)
        } else {
            self.next_after(cutoff - 1)
        };
        while let Some(t) = at.filter(|&t| t <= now_ms) {
            fire.push(t);
            at = self.next_after(t);
        }
        Firing { fire, next: at }
    }

    /// The last occurrence at or before `at_ms`.
    fn at_or_before(&self, at_ms: u64) -> Option<u64> {
        match self.timing().ok()? {
            Timing::Cron(cron, tz) => {
                let at = tz.timestamp_opt((at_ms / 1000) as i64, 0).single()?;
                cron.find_previous_occurrence(&at, true)
                    .ok()
                    .map(|t: DateTime<Tz>| t.timestamp_millis() as u64)
            }
            Timing::Every { anchor, every } => {
                (at_ms >= anchor).then(|| anchor + (at_ms - anchor) / every * every)
            }
        }
    }

    /// The task id of the occurrence at `at_ms`: the same for every scheduler that fires it.
    pub fn task_id(&self, at_ms: u64) -> String {
        format!("{}:{at_ms}", self.name)
    }
}

/// `at_ms` as RFC 3339 in the schedule's time zone (UTC for intervals).
pub fn local_time(schedule: &Schedule, at_ms: u64) -> String {
    let tz: Tz = schedule.tz.parse().unwrap_or(Tz::UTC);
    tz.timestamp_millis_opt(at_ms as i64)
        .single()
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
}

/// A schedule as the API and `fleetctl` show it: its definition, whether it is paused, and its
/// next `n` occurrences from its stored next one (or from now), in unix ms and local time.
pub fn view(schedule: &Schedule, next_ms: Option<u64>, now_ms: u64, n: usize) -> serde_json::Value {
    let mut value = serde_json::to_value(schedule).unwrap_or_default();
    let upcoming: Vec<u64> = match next_ms {
        Some(next) if !schedule.paused => {
            let mut all = vec![next];
            all.extend(schedule.upcoming(next, n.saturating_sub(1)));
            all
        }
        _ => schedule.upcoming(now_ms, n),
    };
    value["next"] = upcoming
        .iter()
        .map(|&ms| serde_json::json!({"ms": ms, "at": local_time(schedule, ms)}))
        .collect();
    value
}

/// What [`Schedule::due`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firing {
    /// Occurrences to submit now (unix ms), oldest first.
    pub fire: Vec<u64>,
    /// The next occurrence to wait for; `None` if the schedule has no more.
    pub next: Option<u64>,
}

/// A schedule name: 1–100 characters of `[A-Za-z0-9_.-]` (no `:`, which separates it from the
/// occurrence's time in task ids).
pub fn check_name(name: &str) -> Result<(), InvalidSchedule> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "a schedule name is 1 to {MAX_NAME_LEN} characters"
        )));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return Err(invalid(
            "a schedule name may only contain letters, digits and _ . -",
        ));
    }
    Ok(())
}

fn shown(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn schedule(cron: &str, tz: &str) -> Schedule {
        let body = serde_json::json!({"cron": cron, "tz": tz, "task": {"kind": "noop"}});
        Schedule::parse("s", body.to_string().as_bytes(), 1 << 20).expect("valid")
    }

    fn ms(tz: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> u64 {
        tz.with_ymd_and_hms(y, mo, d, h, mi, s)
            .earliest()
            .expect("a local time")
            .timestamp_millis() as u64
    }

    fn utc_ms(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> u64 {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
            .unwrap()
            .timestamp_millis() as u64
    }

    #[test]
    fn a_daily_job_in_a_skipped_hour_fires_once_right_after_the_gap_in_two_zones() {
        // Berlin: 2026-03-29 02:00 CET → 03:00 CEST; New York: 2026-03-08 02:00 EST → 03:00 EDT.
        for (zone, day) in [("Europe/Berlin", 29), ("America/New_York", 8)] {
            let tz: Tz = zone.parse().unwrap();
            let s = schedule("0 30 2 * * *", zone);
            let before = ms(tz, 2026, 3, day - 1, 12, 0, 0);
            let got = s.upcoming(before, 3);
            assert_eq!(
                got[0],
                ms(tz, 2026, 3, day, 3, 0, 0),
                "{zone}: the gap day fires once, at 03:00"
            );
            assert_eq!(got[1], ms(tz, 2026, 3, day + 1, 2, 30, 0), "{zone}");
            assert_eq!(
                got[1] - got[0],
                23 * 3_600_000 + 30 * 60_000,
                "{zone}: one firing on the gap day"
            );
        }
    }

    #[test]
    fn a_daily_job_in_a_repeated_hour_fires_once_in_two_zones() {
        // Berlin: 2026-10-25 03:00 CEST → 02:00 CET; New York: 2026-11-01 02:00 EDT → 01:00 EST.
        for (zone, day, hour) in [("Europe/Berlin", 25, 2), ("America/New_York", 1, 1)] {
            let tz: Tz = zone.parse().unwrap();
            let month = if zone.starts_with("Europe") { 10 } else { 11 };
            let s = schedule(&format!("0 30 {hour} * * *"), zone);
            let before = ms(tz, 2026, month, day, 0, 0, 0);
            let got = s.upcoming(before, 2);
            // The first pass of the repeated hour, then the next day: never the second pass.
            assert_eq!(got[0], ms(tz, 2026, month, day, hour, 30, 0), "{zone}");
            assert_eq!(
                got[1] - got[0],
                25 * 3_600_000,
                "{zone}: the next firing is the next day"
            );
        }
    }

    #[test]
    fn an_every_second_job_fires_each_wall_clock_second_once_across_the_change_back() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let s = schedule("* * * * * *", "Europe/Berlin");
        // From 02:59:58 CEST (first pass) on: 02:59:59 CEST, then 03:00:00 CET, an hour later.
        let start = utc_ms(2026, 10, 25, 0, 59, 58);
        let got = s.upcoming(start, 2);
        assert_eq!(got[0], start + 1000);
        assert_eq!(got[1], ms(tz, 2026, 10, 25, 3, 0, 0));
    }

    #[test]
    fn after_an_outage_a_gap_days_occurrence_is_the_one_that_would_have_fired() {
        // Berlin, 2026-03-29: 02:30 does not exist; the occurrence is 03:00 CEST.
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let mut s = schedule("0 30 2 * * *", "Europe/Berlin");
        s.misfire = Misfire::RunOnce;
        let next = ms(tz, 2026, 3, 29, 3, 0, 0);
        assert_eq!(s.next_after(ms(tz, 2026, 3, 28, 12, 0, 0)), Some(next));
        let firing = s.due(next, ms(tz, 2026, 3, 29, 6, 0, 0));
        assert_eq!(
            firing.fire,
            vec![next],
            "the missed gap-day occurrence, by its own time"
        );
        assert_eq!(firing.next, Some(ms(tz, 2026, 3, 30, 2, 30, 0)));
    }

    #[test]
    fn in_the_second_pass_of_a_repeated_hour_the_next_occurrence_is_ahead() {
        let mut s = schedule("0 * * * * *", "Europe/Berlin");
        // 01:30 UTC on 2026-10-25 is 02:30 CET, the repeated hour's second pass.
        let second_pass = utc_ms(2026, 10, 25, 1, 30, 0);
        let next = s.next_after(second_pass).unwrap();
        assert_eq!(
            next,
            utc_ms(2026, 10, 25, 2, 0, 0),
            "the first minute after the repeated hour"
        );
        // A scheduler back in the second pass fires no burst of the first pass's minutes.
        s.misfire = Misfire::Skip;
        let firing = s.due(second_pass, second_pass + 500);
        assert_eq!(firing.fire, vec![second_pass]);
        assert_eq!(firing.next, Some(next));
    }

    #[test]
    fn misfire_policies_decide_what_an_outage_fires() {
        let mut s = schedule("* * * * * *", "UTC");
        s.misfire_grace_ms = 2000;
        s.catch_up_max = 3;
        let next = utc_ms(2026, 1, 1, 0, 0, 0);
        let now = next + 10_000; // occurrences 0..=10 s; 9 and 10 are within the grace
        s.misfire = Misfire::Skip;
        assert_eq!(
            s.due(next, now).fire,
            vec![next + 8000, next + 9000, next + 10_000]
        );
        s.misfire = Misfire::RunOnce;
        assert_eq!(
            s.due(next, now).fire,
            vec![next + 7000, next + 8000, next + 9000, next + 10_000]
        );
        s.misfire = Misfire::CatchUp;
        let firing = s.due(next, now);
        assert_eq!(
            firing.fire,
            vec![
                next + 5000,
                next + 6000,
                next + 7000,
                next + 8000,
                next + 9000,
                next + 10_000
            ]
        );
        assert_eq!(firing.next, Some(next + 11_000));
        // On time: just the one due.
        assert_eq!(s.due(next, next + 100).fire, vec![next]);
        assert_eq!(s.due(next, next - 1).fire, Vec::<u64>::new());
    }

    #[test]
    fn intervals_count_from_creation() {
        let body =
            serde_json::json!({"every_ms": 60_000, "task": {"kind": "noop"}, "created_ms": 1_000});
        let s = Schedule::parse("i", body.to_string().as_bytes(), 1 << 20).unwrap();
        assert_eq!(s.next_after(0), Some(1_000));
        assert_eq!(s.next_after(1_000), Some(61_000));
        assert_eq!(s.upcoming(61_000, 2), vec![121_000, 181_000]);
        assert_eq!(s.task_id(61_000), "i:61000");
    }

    #[test]
    fn malformed_schedules_are_refused_with_the_reason() {
        for (body, says) in [
            (r#"{"cron": "61 * * * *", "task": {"kind": "k"}}"#, "`cron`"),
            (r#"{"cron": "* * *", "task": {"kind": "k"}}"#, "`cron`"),
            (
                r#"{"cron": "0 0 30 2 *", "task": {"kind": "k"}}"#,
                "never fires",
            ),
            (
                r#"{"cron": "0 2 * * *", "tz": "Mars/Olympus", "task": {"kind": "k"}}"#,
                "IANA",
            ),
            (
                r#"{"cron": "0 2 * * *", "tz": "", "task": {"kind": "k"}}"#,
                "IANA",
            ),
            (r#"{"every_ms": 10, "task": {"kind": "k"}}"#, "`every_ms`"),
            (
                r#"{"cron": "* * * * *", "every_ms": 1000, "task": {"kind": "k"}}"#,
                "one of",
            ),
            (r#"{"task": {"kind": "k"}}"#, "one of"),
            (
                r#"{"cron": "* * * * *", "task": {"kind": "k", "id": "x"}}"#,
                "may not set `id`",
            ),
            (
                r#"{"cron": "* * * * *", "task": {"kind": "k", "idempotency_key": "x"}}"#,
                "idempotency_key",
            ),
            (r#"{"cron": "* * * * *", "task": {"kind": ""}}"#, "`task`"),
            (
                r#"{"cron": "* * * * *", "task": {"kind": "k"}, "misfire": "sometimes"}"#,
                "not a schedule",
            ),
            (
                r#"{"cron": "* * * * *", "task": {"kind": "k"}, "catch_up_max": 0}"#,
                "catch_up_max",
            ),
            (
                r#"{"cron": "* * * * *", "task": {"kind": "k"}, "color": "red"}"#,
                "unknown field",
            ),
            (r#"[1, 2]"#, "not a schedule"),
        ] {
            let err = Schedule::parse("s", body.as_bytes(), 1 << 20)
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{body}: {err}");
        }
        let long = "x".repeat(300);
        let body = format!(r#"{{"cron": "{long}", "task": {{"kind": "k"}}}}"#);
        assert!(Schedule::parse("s", body.as_bytes(), 1 << 20).is_err());
        for name in ["", "a:b", "a b", &"n".repeat(101)] {
            assert!(check_name(name).is_err(), "{name}");
        }
    }
}
