//! Placement: what a task asks for (`resources`, `require`, `prefer`), what a worker offers
//! (capacity, labels, weight), and the choice of a worker for a task.
//!
//! Amounts are kept in thousandths (integers) wherever they are added up, in Rust and in
//! Redis (`lua/prelude.lua` parses the same [`Amounts::encode`] text), so that reserving and
//! releasing a fractional CPU a million times leaves no rounding drift. A task's needs are
//! rounded up, a worker's capacity down: rounding never makes room that is not there.
//!
//! Every placed task also needs one [`SLOTS`] unit, and a worker offers `worker.concurrency`
//! of them, so placement never reserves more tasks on a worker than it runs at once.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The resource every placed task needs one of; a worker has `worker.concurrency`.
pub const SLOTS: &str = "slots";
/// Largest amount of one resource a task may ask for or a worker may offer.
pub const MAX_AMOUNT: f64 = 1e9;
/// Most entries in `resources`, `require`, `prefer`, `worker.capacity` or `worker.labels`,
/// and most values in one label's list.
pub const MAX_ENTRIES: usize = 32;
/// Longest resource or label name, and label value.
pub const MAX_NAME_LEN: usize = 64;

/// Amounts of resources by name, as users write them (`{"cpu": 0.5, "memory_mb": 512}`).
pub type Resources = BTreeMap<String, f64>;
/// Label rules by label name (`{"zone": "eu-1", "gpu_model": ["a100", "h100"]}`).
pub type LabelRules = BTreeMap<String, LabelMatch>;
/// A worker's labels.
pub type Labels = BTreeMap<String, String>;

/// What one label must be: a value, or one of a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LabelMatch {
    One(String),
    AnyOf(Vec<String>),
}

impl LabelMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            LabelMatch::One(v) => v == value,
            LabelMatch::AnyOf(values) => values.iter().any(|v| v == value),
        }
    }

    fn values(&self) -> &[String] {
        match self {
            LabelMatch::One(v) => std::slice::from_ref(v),
            LabelMatch::AnyOf(values) => values,
        }
    }
}

/// Whether `labels` satisfy every rule.
pub fn labels_match(rules: &LabelRules, labels: &Labels) -> bool {
    rules
        .iter()
        .all(|(name, rule)| labels.get(name).is_some_and(|v| rule.matches(v)))
}

/// How many of the (soft) rules `labels` satisfy.
pub fn preferred(rules: &LabelRules, labels: &Labels) -> usize {
    rules
        .iter()
        .filter(|(name, rule)| labels.get(*name).is_some_and(|v| rule.matches(v)))
        .count()
}

/// The rules as text: `zone=eu-1, gpu_model in [a100, h100]`.
pub fn describe_rules(rules: &LabelRules) -> String {
    let mut out = String::new();
    for (i, (name, rule)) in rules.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        match rule {
            LabelMatch::One(v) => {
                let _ = write!(out, "{name}={v}");
            }
            LabelMatch::AnyOf(values) => {
                let _ = write!(out, "{name} in [{}]", values.join(", "));
            }
        }
    }
    out
}

/// A name of a resource or label: 1–64 characters of `[A-Za-z0-9_.-]`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return Err(format!(
            "name `{}` must be 1 to {MAX_NAME_LEN} letters, digits, '_', '.' or '-'",
            name.chars().take(MAX_NAME_LEN).collect::<String>()
        ));
    }
    Ok(())
}

/// Checks amounts: known-form names, each a finite number from 0 to [`MAX_AMOUNT`].
pub fn check_resources(resources: &Resources) -> Result<(), String> {
    if resources.len() > MAX_ENTRIES {
        return Err(format!("has more than {MAX_ENTRIES} entries"));
    }
    for (name, amount) in resources {
        check_name(name)?;
        if !amount.is_finite() || *amount < 0.0 || *amount > MAX_AMOUNT {
            return Err(format!(
                "`{name}` must be a number from 0 to {MAX_AMOUNT:e}, not {amount}"
            ));
        }
    }
    Ok(())
}

/// Checks label rules: names and values of the label form, at most [`MAX_ENTRIES`] each.
pub fn check_rules(rules: &LabelRules) -> Result<(), String> {
    if rules.len() > MAX_ENTRIES {
        return Err(format!("has more than {MAX_ENTRIES} entries"));
    }
    for (name, rule) in rules {
        check_name(name)?;
        let values = rule.values();
        if values.is_empty() || values.len() > MAX_ENTRIES {
            return Err(format!("`{name}` must list 1 to {MAX_ENTRIES} values"));
        }
        for value in values {
            check_value(name, value)?;
        }
    }
    Ok(())
}

/// Checks a worker's labels as task rules are checked.
pub fn check_labels(labels: &Labels) -> Result<(), String> {
    if labels.len() > MAX_ENTRIES {
        return Err(format!("has more than {MAX_ENTRIES} entries"));
    }
    for (name, value) in labels {
        check_name(name)?;
        check_value(name, value)?;
    }
    Ok(())
}

fn check_value(name: &str, value: &str) -> Result<(), String> {
    if value.is_empty()
        || value.len() > MAX_NAME_LEN
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:/-".contains(&b))
    {
        return Err(format!(
            "`{name}`: values must be 1 to {MAX_NAME_LEN} letters, digits, '_', '.', ':', '/' or '-'"
        ));
    }
    Ok(())
}

/// Amounts in thousandths by resource name; what Redis adds up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Amounts(pub BTreeMap<String, u64>);

impl Amounts {
    /// A task's needs: its resources rounded up to thousandths, plus one slot.
    pub fn needs(resources: &Resources) -> Self {
        let mut out: BTreeMap<String, u64> = resources
            .iter()
            .map(|(name, amount)| (name.clone(), (amount * 1000.0).ceil() as u64))
            .filter(|(_, milli)| *milli > 0)
            .collect();
        *out.entry(SLOTS.to_string()).or_default() += 1000;
        Self(out)
    }

    /// A worker's capacity, rounded down to thousandths.
    pub fn capacity(resources: &Resources) -> Self {
        Self(
            resources
                .iter()
                .map(|(name, amount)| (name.clone(), (amount * 1000.0).floor() as u64))
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    /// `cpu=1500;slots=1000`: names in order, zero amounts left out. `lua/prelude.lua`'s
    /// `amounts` and `amounts_text` read and write the same.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for (name, milli) in self.0.iter().filter(|(_, m)| **m > 0) {
            if !out.is_empty() {
                out.push(';');
            }
            let _ = write!(out, "{name}={milli}");
        }
        out
    }

    /// Reads [`Amounts::encode`]'s text; what does not parse is left out.
    pub fn decode(text: &str) -> Self {
        Self(
            text.split(';')
                .filter_map(|part| {
                    let (name, milli) = part.split_once('=')?;
                    Some((name.to_string(), milli.parse().ok()?))
                })
                .collect(),
        )
    }

    /// The first resource in which `self` more than `free` (capacity less use) holds.
    pub fn shortfall(&self, used: &Amounts, capacity: &Amounts) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, need)| used.get(name) + **need > capacity.get(name))
            .map(|(name, _)| name.as_str())
    }

    fn add(&mut self, other: &Amounts) {
        for (name, milli) in &other.0 {
            *self.0.entry(name.clone()).or_default() += milli;
        }
    }

    /// Takes `other` away again (never below zero).
    pub fn remove(&mut self, other: &Amounts) {
        for (name, milli) in &other.0 {
            if let Some(v) = self.0.get_mut(name) {
                *v = v.saturating_sub(*milli);
            }
        }
    }

    /// The largest share of any resource's capacity in use after adding `needs`, in
    /// thousandths: a worker's load as spread and pack see it.
    fn load_after(&self, needs: &Amounts, capacity: &Amounts) -> u64 {
        capacity
            .0
            .iter()
            .filter(|(_, cap)| **cap > 0)
            .map(|(name, cap)| (self.get(name) + needs.get(name)) * 1000 / cap)
            .max()
            .unwrap_or(0)
    }
}

/// An amount in thousandths as users write it: `1.5`, `2`.
pub fn show_milli(milli: u64) -> String {
    if milli.is_multiple_of(1000) {
        (milli / 1000).to_string()
    } else {
        let text = format!("{}.{:03}", milli / 1000, milli % 1000);
        text.trim_end_matches('0').to_string()
    }
}

/// How a queue chooses among the workers a task fits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// The least-loaded fitting worker: load balancing.
    #[default]
    Spread,
    /// The fitting worker with the least room left: resource-minimising packing.
    Pack,
    /// A fitting worker at random, in proportion to `worker.weight`.
    Weighted,
    /// A fitting worker at random.
    Random,
}

impl Policy {
    pub const ALL: [Policy; 4] = [
        Policy::Spread,
        Policy::Pack,
        Policy::Weighted,
        Policy::Random,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Spread => "spread",
            Policy::Pack => "pack",
            Policy::Weighted => "weighted",
            Policy::Random => "random",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| "expected spread, pack, weighted or random".to_string())
    }
}

/// In which order a queue's placed tasks are considered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// First come, first served.
    #[default]
    Fifo,
    /// Shortest job first, by `estimated_ms` (or its kind's median run time), with aging: a
    /// task's rank is its estimate plus its arrival time, so no later task passes it once it
    /// has waited as long as its own estimate.
    Sjf,
    /// Round robin over task `key`s (start-time fair queuing), so one key's backlog does not
    /// hold up the others.
    Fair,
}

impl Strategy {
    pub const ALL: [Strategy; 3] = [Strategy::Fifo, Strategy::Sjf, Strategy::Fair];

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Fifo => "fifo",
            Strategy::Sjf => "sjf",
            Strategy::Fair => "fair",
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| "expected fifo, sjf or fair".to_string())
    }
}

/// How one queue's placed tasks are scheduled: from the scheduler's settings file
/// (`[scheduler.queues.<name>]`), overridden at run time through the API or `fleetctl queue`
/// (stored in Redis).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    pub strategy: Strategy,
    pub placement: Policy,
    /// How long the queue's placed tasks may wait for a worker that fits before they fail (a
    /// task's own `placement_timeout_ms` wins); none: they wait.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement_timeout_ms: Option<u64>,
}

impl QueueSettings {
    /// Whether every task of the queue is placed, needs or not: any strategy or policy but the
    /// defaults.
    pub fn places_all(&self) -> bool {
        self.strategy != Strategy::Fifo || self.placement != Policy::Spread
    }
}

/// A live worker as the dispatcher sees it.
#[derive(Debug, Clone)]
pub struct Offer {
    pub id: String,
    pub labels: Labels,
    pub weight: u32,
    pub capacity: Amounts,
    /// Reserved now (placed or running placed tasks).
    pub used: Amounts,
    /// The task kinds it has handlers for.
    pub kinds: Vec<String>,
    /// Its partitions of each priority's topic, by priority index.
    pub partitions: [Vec<i32>; 4],
}

/// What one task asks of a worker.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub needs: &'a Amounts,
    pub require: &'a LabelRules,
    pub prefer: &'a LabelRules,
    pub kind: &'a str,
    pub priority: usize,
}

/// Why no worker took a task: a short code for metrics and the words its status shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    /// `no_worker`, `kind`, `labels`, `capacity` (no worker has enough even when idle) or
    /// `room` (fitting workers are busy).
    pub code: &'static str,
    pub reason: String,
}

impl Unplaced {
    pub const CODES: [&'static str; 5] = ["no_worker", "kind", "labels", "capacity", "room"];

    fn new(code: &'static str, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// Chooses a worker for `ask` among `offers` by `policy`, and counts its needs as used there;
/// or says why none fits.
pub fn choose(ask: Ask<'_>, offers: &mut [Offer], policy: Policy) -> Result<usize, Unplaced> {
    if offers.is_empty() {
        return Err(Unplaced::new("no_worker", "no live worker"));
    }
    let takes =
        |o: &Offer| !o.partitions[ask.priority].is_empty() && o.kinds.iter().any(|k| k == ask.kind);
    let labelled: Vec<usize> = (0..offers.len())
        .filter(|&i| takes(&offers[i]) && labels_match(ask.require, &offers[i].labels))
        .collect();
    if labelled.is_empty() {
        return Err(if !offers.iter().any(takes) {
            let reason = format!("no live worker runs kind {} at this priority", ask.kind);
            Unplaced::new("kind", reason)
        } else {
            let reason = format!("no live worker has labels {}", describe_rules(ask.require));
            Unplaced::new("labels", reason)
        });
    }
    // A resource no labelled worker has enough of in all, even when idle.
    if let Some((name, need)) = ask.needs.0.iter().find(|(name, need)| {
        labelled
            .iter()
            .all(|&i| offers[i].capacity.get(name) < **need)
    }) {
        let reason = format!("no live worker has {name} ≥ {}", show_milli(*need));
        return Err(Unplaced::new("capacity", reason));
    }
    let fitting: Vec<usize> = labelled
        .iter()
        .copied()
        .filter(|&i| {
            ask.needs
                .shortfall(&offers[i].used, &offers[i].capacity)
                .is_none()
        })
        .collect();
    let Some(&first) = fitting.first() else {
        let busy: Vec<&str> = labelled
            .iter()
            .filter_map(|&i| ask.needs.shortfall(&offers[i].used, &offers[i].capacity))
            .collect();
        let mut names = busy.clone();
        names.sort_unstable();
        names.dedup();
        let reason = format!(
            "waiting for room: every fitting worker is short of {}",
            names.join(", ")
        );
        return Err(Unplaced::new("room", reason));
    };
    // Soft rules first: only the workers that satisfy the most of them.
    let best = fitting
        .iter()
        .map(|&i| preferred(ask.prefer, &offers[i].labels))
        .max()
        .unwrap_or(0);
    let fitting: Vec<usize> = fitting
        .into_iter()
        .filter(|&i| preferred(ask.prefer, &offers[i].labels) == best)
        .collect();
    let load = |i: usize| offers[i].used.load_after(ask.needs, &offers[i].capacity);
    let chosen = match policy {
        Policy::Spread => fitting.iter().copied().min_by_key(|&i| load(i)),
        Policy::Pack => fitting.iter().copied().max_by_key(|&i| load(i)),
        Policy::Random => Some(fitting[rand::random_range(0..fitting.len())]),
        Policy::Weighted => {
            let total: u64 = fitting.iter().map(|&i| u64::from(offers[i].weight)).sum();
            let mut ticket = rand::random_range(0..total.max(1));
            fitting.iter().copied().find(|&i| {
                let w = u64::from(offers[i].weight);
                if ticket < w {
                    true
                } else {
                    ticket -= w;
                    false
                }
            })
        }
    }
    .unwrap_or(first);
    offers[chosen].used.add(ask.needs);
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(id: &str, capacity: &[(&str, f64)], labels: &[(&str, &str)]) -> Offer {
        Offer {
            id: id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            weight: 1,
            capacity: Amounts::capacity(
                &capacity.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ),
            used: Amounts::default(),
            kinds: vec!["work".into()],
            partitions: [vec![0], vec![0], vec![0], vec![0]],
        }
    }

    fn needs(resources: &[(&str, f64)]) -> Amounts {
        Amounts::needs(&resources.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    fn ask<'a>(needs: &'a Amounts, require: &'a LabelRules, prefer: &'a LabelRules) -> Ask<'a> {
        Ask {
            needs,
            require,
            prefer,
            kind: "work",
            priority: 2,
        }
    }

    #[test]
    fn amounts_round_needs_up_and_capacity_down_and_survive_their_text() {
        let n = needs(&[("cpu", 0.0005), ("memory_mb", 512.0), ("gpu", 0.0)]);
        assert_eq!(n.encode(), "cpu=1;memory_mb=512000;slots=1000");
        assert_eq!(Amounts::decode(&n.encode()), n);
        let c = Amounts::capacity(&[("cpu".to_string(), 1.9999)].into());
        assert_eq!(c.get("cpu"), 1999);
        assert_eq!(show_milli(1500), "1.5");
        assert_eq!(show_milli(2000), "2");
        assert_eq!(show_milli(1), "0.001");
    }

    #[test]
    fn bad_amounts_and_labels_are_refused_with_the_name() {
        for bad in [f64::NAN, f64::INFINITY, -1.0, 1e10] {
            let err = check_resources(&[("cpu".to_string(), bad)].into()).unwrap_err();
            assert!(err.contains("`cpu`"), "{err}");
        }
        assert!(check_resources(&[("a b".to_string(), 1.0)].into()).is_err());
        let rules: LabelRules = [("zone".to_string(), LabelMatch::AnyOf(vec![]))].into();
        assert!(check_rules(&rules).unwrap_err().contains("`zone`"));
        let rules: LabelRules = [("zone".to_string(), LabelMatch::One("a b".into()))].into();
        assert!(check_rules(&rules).is_err());
    }

    #[test]
    fn a_task_goes_only_where_its_labels_and_needs_fit() {
        let mut offers = vec![
            offer("small", &[("cpu", 2.0), ("slots", 8.0)], &[("zone", "a")]),
            offer(
                "gpu",
                &[("cpu", 4.0), ("gpu", 1.0), ("slots", 8.0)],
                &[("zone", "b")],
            ),
        ];
        let none = LabelRules::new();
        let gpu = needs(&[("gpu", 1.0)]);
        assert_eq!(
            choose(ask(&gpu, &none, &none), &mut offers, Policy::Spread),
            Ok(1)
        );
        // The only GPU is reserved now.
        let err = choose(ask(&gpu, &none, &none), &mut offers, Policy::Spread).unwrap_err();
        assert!(err.reason.contains("short of gpu"), "{err:?}");
        assert_eq!(err.code, "room");
        let two = needs(&[("gpu", 2.0)]);
        let err = choose(ask(&two, &none, &none), &mut offers, Policy::Spread).unwrap_err();
        assert_eq!(err.reason, "no live worker has gpu ≥ 2");
        assert_eq!(err.code, "capacity");
        let zone_c: LabelRules = [("zone".to_string(), LabelMatch::One("c".into()))].into();
        let cpu = needs(&[("cpu", 1.0)]);
        let err = choose(ask(&cpu, &zone_c, &none), &mut offers, Policy::Spread).unwrap_err();
        assert_eq!(err.reason, "no live worker has labels zone=c");
        let zone_a: LabelRules = [(
            "zone".to_string(),
            LabelMatch::AnyOf(vec!["a".into(), "x".into()]),
        )]
        .into();
        assert_eq!(
            choose(ask(&cpu, &zone_a, &none), &mut offers, Policy::Pack),
            Ok(0)
        );
        // Preferred labels win over load.
        let prefer_b: LabelRules = [("zone".to_string(), LabelMatch::One("b".into()))].into();
        assert_eq!(
            choose(ask(&cpu, &none, &prefer_b), &mut offers, Policy::Spread),
            Ok(1)
        );
    }

    #[test]
    fn spread_takes_the_least_loaded_and_pack_the_fullest() {
        let mut offers = vec![
            offer("a", &[("cpu", 4.0), ("slots", 100.0)], &[]),
            offer("b", &[("cpu", 4.0), ("slots", 100.0)], &[]),
        ];
        let none = LabelRules::new();
        let cpu = needs(&[("cpu", 1.0)]);
        let picks: Vec<usize> = (0..4)
            .map(|_| choose(ask(&cpu, &none, &none), &mut offers, Policy::Spread).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 2);
        let mut offers = vec![
            offer("a", &[("cpu", 4.0), ("slots", 100.0)], &[]),
            offer("b", &[("cpu", 4.0), ("slots", 100.0)], &[]),
        ];
        let first = choose(ask(&cpu, &none, &none), &mut offers, Policy::Pack).unwrap();
        for _ in 0..3 {
            assert_eq!(
                choose(ask(&cpu, &none, &none), &mut offers, Policy::Pack),
                Ok(first)
            );
        }
        assert_eq!(
            choose(ask(&cpu, &none, &none), &mut offers, Policy::Pack),
            Ok(1 - first),
            "full: the next goes to the other"
        );
    }

    #[test]
    fn weighted_follows_the_weights() {
        let mut offers = vec![
            offer("a", &[("slots", 1e6)], &[]),
            offer("b", &[("slots", 1e6)], &[]),
        ];
        offers[1].weight = 3;
        let none = LabelRules::new();
        let slot = needs(&[]);
        let to_b = (0..4000)
            .filter(|_| choose(ask(&slot, &none, &none), &mut offers, Policy::Weighted) == Ok(1))
            .count();
        assert!(
            (2800..3200).contains(&to_b),
            "{to_b} of 4000 to weight 3 of 4"
        );
    }

    #[test]
    fn workers_without_the_kind_or_the_priority_do_not_count() {
        let mut offers = vec![offer("a", &[("slots", 8.0)], &[])];
        offers[0].kinds = vec!["other".into()];
        let none = LabelRules::new();
        let slot = needs(&[]);
        let err = choose(ask(&slot, &none, &none), &mut offers, Policy::Spread).unwrap_err();
        assert!(err.reason.contains("runs kind work"), "{err:?}");
        assert_eq!(err.code, "kind");
        let err = choose(ask(&slot, &none, &none), &mut [], Policy::Spread).unwrap_err();
        assert_eq!(
            (err.code, err.reason.as_str()),
            ("no_worker", "no live worker")
        );
    }
}
