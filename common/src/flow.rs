//! Flow control: limits on how many tasks run at once (per `concurrency_key`, queue, kind or
//! tenant), how fast they start (a token bucket per `rate_key`), how many may wait (per queue
//! or tenant, refused at submit), and the weights tenants share a `fair` queue by.
//!
//! Every task a limit can apply to is *placed* (see [`crate::placement`]): the dispatcher
//! checks its limits before it chooses a worker, and the place script checks them again
//! atomically, so a task over a limit waits in Redis (in its limit's wait list, holding up no
//! task behind it), never on a Kafka partition. Each placed task is counted under its
//! *dimensions* (`queue:<q>`, `kind:<k>`, `key:<concurrency_key>`, `tenant:<t>`,
//! `rate:<rate_key>`): as queued from acceptance to its end, and as running while it holds a
//! reservation (from placement to the end of the attempt), so a limit set at run time finds
//! the counts already right.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::task::{MAX_NAME_LEN, TaskRecord};

/// What a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// A queue: `max_running`, `max_waiting`, `key_max_running` (the default for each
    /// `concurrency_key` of its tasks).
    Queue,
    /// One `concurrency_key`, fleet-wide: `max_running`.
    Key,
    /// A task kind: `max_running`.
    Kind,
    /// One `rate_key`: `limit` starts per `period_ms`, with `burst`.
    Rate,
    /// A tenant (`*`: every tenant without one of its own): `max_running`, `max_waiting`,
    /// `weight`.
    Tenant,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::Queue,
        Scope::Key,
        Scope::Kind,
        Scope::Rate,
        Scope::Tenant,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Queue => "queue",
            Scope::Key => "key",
            Scope::Kind => "kind",
            Scope::Rate => "rate",
            Scope::Tenant => "tenant",
        }
    }

    /// The fields a limit of this scope may set.
    fn fields(self) -> &'static [&'static str] {
        match self {
            Scope::Queue => &["max_running", "max_waiting", "key_max_running"],
            Scope::Key | Scope::Kind => &["max_running"],
            Scope::Rate => &["limit", "period_ms", "burst"],
            Scope::Tenant => &["max_running", "max_waiting", "weight"],
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| {
                format!("unknown scope `{s}`: expected queue, key, kind, rate or tenant")
            })
    }
}

/// The code of a submission refused for a quota (`fleet.rejected`, HTTP 429 bodies, metrics).
pub const OVER_QUOTA: &str = "over_quota";

/// Most tasks one limit may allow to run at once, or to wait.
pub const MAX_LIMIT: u64 = 1_000_000_000;
/// Bounds of a rate limit's period: 10 ms to one day.
pub const PERIOD_MS: std::ops::RangeInclusive<u64> = 10..=86_400_000;
/// Most starts a rate limit allows per period, and its largest burst.
pub const MAX_RATE: u32 = 1_000_000;
/// Largest tenant weight.
pub const MAX_WEIGHT: u32 = 1_000;
/// The tenant entry that applies to every tenant without one of its own.
pub const ANY_TENANT: &str = "*";

/// One limit definition. Which fields a scope takes is fixed ([`Scope`]); numbers are at
/// least 1 (a limit of 0 would hold its tasks forever: pause the queue instead).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limit {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_running: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_waiting: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_max_running: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

impl Limit {
    /// The fields set, by name.
    fn set_fields(&self) -> Vec<(&'static str, u64)> {
        [
            ("max_running", self.max_running),
            ("max_waiting", self.max_waiting),
            ("key_max_running", self.key_max_running),
            ("limit", self.limit.map(u64::from)),
            ("period_ms", self.period_ms),
            ("burst", self.burst.map(u64::from)),
            ("weight", self.weight.map(u64::from)),
        ]
        .into_iter()
        .filter_map(|(name, v)| Some((name, v?)))
        .collect()
    }

    /// Checks a definition for `scope` `name`; the error names the field.
    pub fn validate(&self, scope: Scope, name: &str) -> Result<(), String> {
        check_name(scope, name)?;
        let fields = self.set_fields();
        if fields.is_empty() {
            return Err(format!(
                "a {} limit sets at least one of {}",
                scope.as_str(),
                scope.fields().join(", ")
            ));
        }
        for (field, value) in fields {
            if !scope.fields().contains(&field) {
                return Err(format!(
                    "`{field}` does not apply to a {} limit (it takes {})",
                    scope.as_str(),
                    scope.fields().join(", ")
                ));
            }
            let max = match field {
                "period_ms" => *PERIOD_MS.end(),
                "limit" | "burst" => u64::from(MAX_RATE),
                "weight" => u64::from(MAX_WEIGHT),
                _ => MAX_LIMIT,
            };
            let min = if field == "period_ms" {
                *PERIOD_MS.start()
            } else {
                1
            };
            if !(min..=max).contains(&value) {
                return Err(format!("`{field}` must be {min} to {max}, got {value}"));
            }
        }
        if scope == Scope::Rate && (self.limit.is_none() || self.period_ms.is_none()) {
            return Err("a rate limit needs `limit` and `period_ms`".into());
        }
        Ok(())
    }

    /// A short description, e.g. `max_running 5, max_waiting 100`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (field, value) in self.set_fields() {
            if !out.is_empty() {
                out.push_str(", ");
            }
            let _ = write!(out, "{field} {value}");
        }
        out
    }
}

/// Checks the name a limit is defined for: as a task's name-like fields are checked, or `*`
/// for the tenant default.
pub fn check_name(scope: Scope, name: &str) -> Result<(), String> {
    if scope == Scope::Tenant && name == ANY_TENANT {
        return Ok(());
    }
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("the name must be 1 to {MAX_NAME_LEN} characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.:/-".contains(&b))
    {
        return Err("the name may only contain letters, digits and _ . : / -".into());
    }
    Ok(())
}

/// The limits of the settings file (`[scheduler.limits.<scope>.<name>]`).
pub type LimitTable = BTreeMap<Scope, BTreeMap<String, Limit>>;

/// A limit's field in Redis (`<scope>:<name>`), and back.
pub fn limit_field(scope: Scope, name: &str) -> String {
    format!("{}:{name}", scope.as_str())
}

pub fn parse_limit_field(field: &str) -> Option<(Scope, &str)> {
    let (scope, name) = field.split_once(':')?;
    Some((scope.parse().ok()?, name))
}

/// What one placed task is checked against before it is placed, in the place script's text
/// form (one per line): `c\t<dim>\t<max>` (at most `max` running) or
/// `r\t<dim>\t<limit>\t<period ms>\t<burst>` (a token bucket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Running { dim: String, max: u64 },
    Rate { dim: String, rate: RateLimit },
}

/// A token bucket: `limit` tokens per `period_ms`, holding at most `burst`; each start takes
/// one, so any window of one period sees at most `limit + burst` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: u32,
    pub period_ms: u64,
    pub burst: u32,
}

impl RateLimit {
    /// Tokens in a bucket last at `tokens` at `last_ms`, by `now_ms`.
    pub fn refill(&self, tokens: f64, last_ms: u64, now_ms: u64) -> f64 {
        let gained =
            now_ms.saturating_sub(last_ms) as f64 * f64::from(self.limit) / self.period_ms as f64;
        (tokens + gained).min(f64::from(self.burst))
    }

    /// Ms until a bucket with `tokens` holds a whole one.
    pub fn wait_ms(&self, tokens: f64) -> u64 {
        if tokens >= 1.0 {
            return 0;
        }
        ((1.0 - tokens) * self.period_ms as f64 / f64::from(self.limit)).ceil() as u64
    }
}

impl Check {
    pub fn dim(&self) -> &str {
        match self {
            Check::Running { dim, .. } | Check::Rate { dim, .. } => dim,
        }
    }
}

/// Encodes checks for the place script.
pub fn checks_text(checks: &[Check]) -> String {
    let mut out = String::new();
    for check in checks {
        match check {
            Check::Running { dim, max } => {
                let _ = writeln!(out, "c\t{dim}\t{max}");
            }
            Check::Rate { dim, rate } => {
                let _ = writeln!(
                    out,
                    "r\t{dim}\t{}\t{}\t{}",
                    rate.limit, rate.period_ms, rate.burst
                );
            }
        }
    }
    out
}

/// The key a task shares a `fair` queue by: its tenant (marked, so no `key` can equal it) when
/// it has one, else its `key`.
pub fn fair_key(record: &TaskRecord) -> String {
    match (&record.tenant, &record.key) {
        (Some(tenant), _) => format!("@{tenant}"),
        (None, Some(key)) => key.clone(),
        (None, None) => String::new(),
    }
}

/// The dimensions a placed task is counted under, one per line (the task's `flow` field).
pub fn dims_text(record: &TaskRecord) -> String {
    dims(record).join("\n")
}

/// The dimensions of a task.
pub fn dims(record: &TaskRecord) -> Vec<String> {
    let mut out = vec![
        format!("queue:{}", record.queue),
        format!("kind:{}", record.kind),
    ];
    if let Some(key) = &record.concurrency_key {
        out.push(format!("key:{key}"));
    }
    if let Some(tenant) = &record.tenant {
        out.push(format!("tenant:{tenant}"));
    }
    if let Some(rate) = &record.rate_key {
        out.push(format!("rate:{rate}"));
    }
    out
}

/// The limits in force: the settings file's, as each scheduler wrote them to Redis at its
/// start, changed at run time through the API or `fleetctl limits`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub map: BTreeMap<(Scope, String), Limit>,
    /// Stored limits that did not read (e.g. written by a newer release): a reader that knew
    /// them keeps what it last read rather than dropping the limit.
    pub unreadable: Vec<(Scope, String)>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// From the settings file's table.
    pub fn from_table(table: &LimitTable) -> Self {
        let mut map = BTreeMap::new();
        for (scope, entries) in table {
            for (name, limit) in entries {
                map.insert((*scope, name.clone()), *limit);
            }
        }
        Self {
            map,
            unreadable: Vec::new(),
        }
    }

    /// These limits, keeping `previous`'s value of each limit that did not read now.
    pub fn keeping_unreadable(mut self, previous: &Limits) -> Self {
        for at in &self.unreadable {
            if let Some(limit) = previous.map.get(at) {
                self.map.insert(at.clone(), *limit);
            }
        }
        self
    }

    pub fn get(&self, scope: Scope, name: &str) -> Option<&Limit> {
        self.map.get(&(scope, name.to_string()))
    }

    fn tenant(&self, tenant: &str) -> impl Fn(fn(&Limit) -> Option<u64>) -> Option<u64> + '_ {
        let own = self.get(Scope::Tenant, tenant);
        let any = self.get(Scope::Tenant, ANY_TENANT);
        move |field| own.and_then(field).or_else(|| any.and_then(field))
    }

    /// Whether a task must be placed for its limits: it names a key, rate or tenant, or its
    /// queue or kind has a limit.
    pub fn applies(&self, record: &TaskRecord) -> bool {
        record.concurrency_key.is_some()
            || record.rate_key.is_some()
            || record.tenant.is_some()
            || self.get(Scope::Queue, &record.queue).is_some()
            || self
                .get(Scope::Kind, &record.kind)
                .is_some_and(|l| l.max_running.is_some())
    }

    /// What `record` is checked against before it is placed.
    pub fn checks(&self, record: &TaskRecord) -> Vec<Check> {
        let mut out = Vec::new();
        let queue = self.get(Scope::Queue, &record.queue);
        if let Some(max) = queue.and_then(|l| l.max_running) {
            out.push(Check::Running {
                dim: format!("queue:{}", record.queue),
                max,
            });
        }
        if let Some(max) = self
            .get(Scope::Kind, &record.kind)
            .and_then(|l| l.max_running)
        {
            out.push(Check::Running {
                dim: format!("kind:{}", record.kind),
                max,
            });
        }
        if let Some(key) = &record.concurrency_key {
            let max = self
                .get(Scope::Key, key)
                .and_then(|l| l.max_running)
                .or_else(|| queue.and_then(|l| l.key_max_running));
            if let Some(max) = max {
                let dim = format!("key:{key}");
                out.push(Check::Running { dim, max });
            }
        }
        if let Some(tenant) = &record.tenant
            && let Some(max) = self.tenant(tenant)(|l| l.max_running)
        {
            let dim = format!("tenant:{tenant}");
            out.push(Check::Running { dim, max });
        }
        if let Some(rate) = &record.rate_key
            && let Some(rate) = self.rate(rate)
        {
            let dim = format!("rate:{}", record.rate_key.as_deref().unwrap_or_default());
            out.push(Check::Rate { dim, rate });
        }
        out
    }

    /// The rate limit of `rate_key`, if any.
    pub fn rate(&self, rate_key: &str) -> Option<RateLimit> {
        let l = self.get(Scope::Rate, rate_key)?;
        Some(RateLimit {
            limit: l.limit?,
            period_ms: l.period_ms?,
            // A tenth of the limit by default: room for a dispatcher round's delay at high
            // rates (a bucket that is full when nobody takes from it loses what it gains).
            burst: l.burst.unwrap_or((l.limit? / 10).max(1)),
        })
    }

    /// The most tasks that may wait under each of `record`'s dimensions that has a quota
    /// (`max_waiting` of its queue and its tenant), as `(dim, max)`.
    pub fn quotas(&self, record: &TaskRecord) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        if let Some(max) = self
            .get(Scope::Queue, &record.queue)
            .and_then(|l| l.max_waiting)
        {
            out.push((format!("queue:{}", record.queue), max));
        }
        if let Some(tenant) = &record.tenant
            && let Some(max) = self.tenant(tenant)(|l| l.max_waiting)
        {
            out.push((format!("tenant:{tenant}"), max));
        }
        out
    }

    /// The most tasks of concurrency dimension `dim` that may hold a slot, or a rate
    /// dimension's bucket; `None` when no limit applies to it (any more). A key without a limit
    /// of its own takes the largest default of any queue (a task woken beyond its own queue's
    /// default is found over it again).
    pub fn of_dim(&self, dim: &str) -> Option<DimLimit> {
        let (scope, name) = dim.split_once(':')?;
        let running = |scope, name: &str| self.get(scope, name).and_then(|l| l.max_running);
        let max = match scope {
            "queue" => running(Scope::Queue, name),
            "kind" => running(Scope::Kind, name),
            "tenant" => self.tenant(name)(|l| l.max_running),
            "key" => running(Scope::Key, name).or_else(|| {
                self.map
                    .iter()
                    .filter(|((scope, _), _)| *scope == Scope::Queue)
                    .filter_map(|(_, l)| l.key_max_running)
                    .max()
            }),
            "rate" => return self.rate(name).map(DimLimit::Rate),
            _ => None,
        };
        max.map(DimLimit::Running)
    }

    /// A tenant's share weight (1 when none is set).
    pub fn weight(&self, tenant: &str) -> u32 {
        self.tenant(tenant)(|l| l.weight.map(u64::from))
            .map_or(1, |w| u32::try_from(w).unwrap_or(1))
    }
}

/// The limit on one dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DimLimit {
    Running(u64),
    Rate(RateLimit),
}

/// Quota text for the accept script: `<dim>\t<max>` per line.
pub fn quotas_text(quotas: &[(String, u64)]) -> String {
    let mut out = String::new();
    for (dim, max) in quotas {
        let _ = writeln!(out, "{dim}\t{max}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(json: &str) -> Limit {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn definitions_are_checked_by_field() {
        let ok = limit(r#"{"max_running": 5, "max_waiting": 100, "key_max_running": 2}"#);
        assert_eq!(ok.validate(Scope::Queue, "default"), Ok(()));
        let err = |json: &str, scope| limit(json).validate(scope, "x").unwrap_err();
        assert!(err(r#"{"max_running": 0}"#, Scope::Key).contains("`max_running` must be 1"));
        assert!(err(r#"{"weight": 2}"#, Scope::Key).contains("does not apply"));
        assert!(err(r#"{}"#, Scope::Kind).contains("at least one"));
        assert!(err(r#"{"limit": 5}"#, Scope::Rate).contains("needs `limit` and `period_ms`"));
        assert!(
            err(r#"{"limit": 5, "period_ms": 5}"#, Scope::Rate).contains("`period_ms` must be 10")
        );
        assert!(
            err(r#"{"limit": 5, "period_ms": 100000000}"#, Scope::Rate).contains("`period_ms`")
        );
        assert!(err(r#"{"weight": 1001}"#, Scope::Tenant).contains("`weight` must be 1 to 1000"));
        assert!(serde_json::from_str::<Limit>(r#"{"max_runing": 5}"#).is_err());
        assert!(serde_json::from_str::<Limit>(r#"{"max_running": -1}"#).is_err());
        assert!(serde_json::from_str::<Limit>(r#"{"max_running": "5"}"#).is_err());
        assert!(
            limit(r#"{"max_running": 1}"#)
                .validate(Scope::Key, "a b")
                .is_err()
        );
        assert_eq!(
            limit(r#"{"weight": 3}"#).validate(Scope::Tenant, ANY_TENANT),
            Ok(())
        );
        assert!(
            limit(r#"{"max_running": 1}"#)
                .validate(Scope::Key, ANY_TENANT)
                .is_err()
        );
    }

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let rate = RateLimit {
            limit: 10,
            period_ms: 1000,
            burst: 2,
        };
        assert_eq!(rate.refill(0.0, 0, 100), 1.0);
        assert_eq!(rate.refill(0.0, 0, 10_000), 2.0);
        assert_eq!(rate.wait_ms(0.5), 50);
        assert_eq!(rate.wait_ms(1.0), 0);
    }
}
