//! Consumer-group membership, watched: nothing waits for partitions silently.
//!
//! Fleet's group consumers (the workers' and the schedulers' submit consumer) are made by
//! [`consumer`] with a [`MemberContext`]. It logs every assignment change, exports the number
//! of partitions held (`fleet_consumer_assigned_partitions{group}`) and the lag per partition
//! (`fleet_consumer_lag{topic,partition}`), and remembers since when the member has held none.
//!
//! [`watch`] turns a long empty assignment into a loud problem and a repair:
//! - a member that has held no partition for [`stall_bound`] (twice the session timeout plus
//!   5 s), while its group has no more members than its topics have partitions, is *stalled*:
//!   it logs an error, sets `fleet_consumer_group_stalled{group}` to 1 and answers `/readyz`
//!   with 503 and the reason;
//! - one stalled member (a Redis hold decides which) repairs the group: it reads the group's
//!   committed offsets, deletes the group and commits the offsets back under the same name, so
//!   every member rejoins a fresh group at the same positions
//!   (`fleet_consumer_group_repairs_total{group,outcome}`).
//!
//! The stall this answers is a coordinator bug of the local broker (tansu): when the group's
//! leader leaves while the group rebalances (every member stopped at once, followers first),
//! the group keeps naming the departed leader, and new members wait for its assignment forever.
//! Kafka has no such bug, and it refuses to delete a group that has members (this member is
//! one), so there the repair changes nothing and says so.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::kafka;
use crate::ops::Readiness;
use crate::settings::KafkaSettings;
use crate::store::Store;

/// A group consumer whose membership is logged, measured and watched.
pub type GroupConsumer = StreamConsumer<MemberContext>;

/// The `/readyz` problem a stalled member reports.
const NOT_READY: &str = "kafka consumer group";

/// How long a member may hold no partition before it counts as stalled: twice the session
/// timeout plus 5 s. A healthy group assigns within about one session timeout: the broker waits
/// out the session of members that died, and tansu delays a new group's first assignment by
/// half a session.
pub fn stall_bound(kafka: &KafkaSettings) -> Duration {
    Duration::from_millis(2 * kafka.session_timeout_ms) + Duration::from_secs(5)
}

/// Creates a group consumer from `config` (e.g. [`kafka::consumer_config`]) in group `group`.
pub fn consumer(mut config: ClientConfig, group: &str) -> Result<GroupConsumer, KafkaError> {
    if config.get("statistics.interval.ms").is_none() {
        config.set("statistics.interval.ms", "5000");
    }
    let state = Arc::new(MemberState {
        group: group.to_string(),
        held: Mutex::new(Held {
            partitions: BTreeSet::new(),
            empty_since: Instant::now(),
            restore: HashMap::new(),
        }),
    });
    // The recorder must exist before the first gauge, which comes before the HTTP listener.
    crate::ops::metrics();
    crate::telemetry::metrics::consumer_assigned_partitions(group.to_string()).set(0.0);
    crate::telemetry::metrics::consumer_group_stalled(group.to_string()).set(0.0);
    config.create_with_context(MemberContext { state })
}

/// What a member holds, shared by its consumer's callbacks and its [`watch`].
#[derive(Debug)]
pub struct MemberState {
    group: String,
    held: Mutex<Held>,
}

#[derive(Debug)]
struct Held {
    partitions: BTreeSet<(String, i32)>,
    /// When the member last came to hold nothing (or was created, or was repaired).
    empty_since: Instant,
    /// Offsets to start from when a partition is assigned: a repair's snapshot of the deleted
    /// group's committed offsets, loaded while the member holds nothing.
    restore: HashMap<(String, i32), i64>,
}

impl MemberState {
    fn held(&self) -> MutexGuard<'_, Held> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The partitions held now, by topic.
    pub fn partitions(&self) -> Vec<(String, i32)> {
        self.held().partitions.iter().cloned().collect()
    }

    /// How long the member has held no partition; zero while it holds some.
    pub fn unassigned_for(&self) -> Duration {
        let held = self.held();
        if held.partitions.is_empty() {
            held.empty_since.elapsed()
        } else {
            Duration::ZERO
        }
    }

    /// Starts the empty-assignment clock afresh (after a repair: the group re-forms first).
    fn restart_clock(&self) {
        self.held().empty_since = Instant::now();
    }

    /// Replaces the offsets to restore (see [`Held::restore`]).
    fn set_restore(&self, offsets: Vec<(String, i32, i64)>) {
        self.held().restore = offsets.into_iter().map(|(t, p, o)| ((t, p), o)).collect();
    }

    /// Sets the start offset of each partition of `list` that has one to restore; returns
    /// those partitions with their offsets. The snapshot serves only the first assignment after
    /// it was read (the one that follows the repair): later ones start at committed offsets.
    fn take_restore(&self, list: &mut TopicPartitionList) -> TopicPartitionList {
        let mut restored = TopicPartitionList::new();
        let mut held = self.held();
        if held.restore.is_empty() {
            return restored;
        }
        for mut e in list.elements() {
            if let Some(offset) = held.restore.get(&(e.topic().to_string(), e.partition()))
                && e.set_offset(Offset::Offset(*offset)).is_ok()
            {
                let _ = restored.add_partition_offset(
                    e.topic(),
                    e.partition(),
                    Offset::Offset(*offset),
                );
            }
        }
        held.restore.clear();
        restored
    }
}

/// Consumer context: assignment changes are logged and counted, lag is exported.
#[derive(Debug, Clone)]
pub struct MemberContext {
    state: Arc<MemberState>,
}

impl MemberContext {
    pub fn state(&self) -> &Arc<MemberState> {
        &self.state
    }
}

impl rdkafka::ClientContext for MemberContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                // -1: unknown (not assigned, or no committed offset yet).
                if *partition >= 0 && p.consumer_lag >= 0 {
                    crate::telemetry::metrics::consumer_lag(topic.clone(), *partition)
                        .set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for MemberContext {
    /// rdkafka's own rebalance, plus: partitions with an offset to restore (after a repair)
    /// start there, and every change is logged and counted.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        list: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            let restored = self.state.take_restore(list);
            let assigned = if cooperative {
                consumer.incremental_assign(list)
            } else {
                consumer.assign(list)
            };
            if let Err(err) = assigned {
                warn!(group = %self.state.group, error = %err, "Cannot take the assigned partitions.");
            }
            if restored.count() > 0 {
                info!(
                    group = %self.state.group, partitions = restored.count(),
                    "Partitions start at the offsets the repaired group had committed."
                );
                // Committed under the new group at once, so a later rebalance starts there too.
                if let Err(err) = consumer.commit(&restored, CommitMode::Async) {
                    warn!(group = %self.state.group, error = %err, "Cannot commit the restored offsets.");
                }
            }
            self.note("assigned", list);
            return;
        }
        let revoked = if cooperative {
            consumer.incremental_unassign(list)
        } else {
            consumer.unassign()
        };
        if let Err(err) = revoked {
            warn!(group = %self.state.group, error = %err, "Cannot give up the revoked partitions.");
        }
        if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
            self.note("revoked", list);
        } else {
            let code: RDKafkaErrorCode = err.into();
            warn!(group = %self.state.group, error = %code, "Group rebalance failed; the consumer rejoins.");
            self.note("revoked", list);
        }
    }
}

impl MemberContext {
    /// Records and logs an assignment change.
    fn note(&self, change: &str, list: &TopicPartitionList) {
        let group = &self.state.group;
        let changed: Vec<(String, i32)> = list
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let mut held = self.state.held();
        let was_empty = held.partitions.is_empty();
        for partition in &changed {
            if change == "assigned" {
                held.partitions.insert(partition.clone());
            } else {
                held.partitions.remove(partition);
            }
        }
        if held.partitions.is_empty() && !was_empty {
            held.empty_since = Instant::now();
        }
        let holding = held.partitions.len();
        crate::telemetry::metrics::consumer_assigned_partitions(group.clone()).set(holding as f64);
        info!(
            group,
            partitions = %describe(&changed),
            holding = %describe(&held.partitions.iter().cloned().collect::<Vec<_>>()),
            "Partitions {change}."
        );
    }
}

/// `topic[0,3,6] topic2[1]`: partitions grouped by topic, for log lines.
fn describe(partitions: &[(String, i32)]) -> String {
    let mut out = String::new();
    let mut last: Option<&str> = None;
    for (topic, partition) in partitions {
        if last == Some(topic.as_str()) {
            out.push_str(&format!(",{partition}"));
        } else {
            if last.is_some() {
                out.push_str("] ");
            }
            out.push_str(&format!("{topic}[{partition}"));
            last = Some(topic);
        }
    }
    if last.is_some() {
        out.push(']');
    } else {
        out.push_str("none");
    }
    out
}

/// What [`watch`] needs besides the consumer.
#[derive(Debug, Clone)]
pub struct Watch {
    pub kafka: KafkaSettings,
    pub group: String,
    /// The topics the consumer subscribed to.
    pub topics: Vec<String>,
    /// This member's name, for the repair hold and log lines.
    pub member: String,
    pub store: Store,
    pub readiness: Readiness,
}

/// Watches the member until `token` is cancelled: reports and repairs a stall (module docs).
pub async fn watch(consumer: Arc<GroupConsumer>, w: Watch, token: CancellationToken) {
    let bound = stall_bound(&w.kafka);
    let state = consumer.context().state().clone();
    let stalled_gauge = crate::telemetry::metrics::consumer_group_stalled(w.group.clone());
    let (mut stalled, mut idle_noted) = (false, false);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            _ = tick.tick() => {}
        }
        let empty_for = state.unassigned_for();
        if !empty_for.is_zero() {
            // Holding nothing: a repair may be under way; start where it left the group.
            match w.store.group_offsets(&w.group).await {
                Ok(offsets) => state.set_restore(offsets),
                Err(err) => {
                    warn!(group = %w.group, error = %err, "Cannot read the group's saved offsets.")
                }
            }
        }
        if empty_for < bound {
            if stalled {
                info!(group = %w.group, "The member holds partitions again; the stall is over.");
                stalled_gauge.set(0.0);
                w.readiness.problem(NOT_READY, None);
            }
            (stalled, idle_noted) = (false, false);
            continue;
        }
        // No partition for long: is there one for this member at all?
        match census(&consumer, &w).await {
            Ok((members, partitions)) if members > partitions => {
                if !idle_noted {
                    info!(
                        group = %w.group, members, partitions,
                        "This member holds no partition: its group has more members than partitions."
                    );
                    idle_noted = true;
                }
                continue;
            }
            Ok(_) => {}
            Err(err) => warn!(group = %w.group, error = %err, "Cannot describe the group."),
        }
        if !stalled {
            let reason = format!(
                "no partition assigned for {} s (bound {} s); the group looks stuck and is being repaired",
                empty_for.as_secs(),
                bound.as_secs()
            );
            error!(group = %w.group, member = %w.member, "Consumer group stalled: {reason}.");
            stalled_gauge.set(1.0);
            w.readiness.problem(NOT_READY, Some(reason));
            stalled = true;
        }
        match w
            .store
            .take_group_repair(&w.group, &w.member, bound.as_millis() as u64)
            .await
        {
            Ok(true) => {
                let outcome = match repair(&consumer, &w).await {
                    Ok(outcome) => outcome,
                    Err(err) => {
                        warn!(group = %w.group, error = %err, "Repairing the group failed; trying again later.");
                        "error"
                    }
                };
                crate::telemetry::metrics::consumer_group_repairs(w.group.clone(), outcome)
                    .increment(1);
                state.restart_clock();
            }
            Ok(false) => {} // another member repairs it
            Err(err) => {
                warn!(group = %w.group, error = %err, "Cannot take the group's repair hold.")
            }
        }
    }
}

/// The group's member count (as the broker describes it) and its topics' partition count.
async fn census(consumer: &Arc<GroupConsumer>, w: &Watch) -> Result<(usize, usize), KafkaError> {
    let (consumer, group, topics) = (consumer.clone(), w.group.clone(), w.topics.clone());
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(5);
        let groups = consumer.fetch_group_list(Some(&group), timeout)?;
        let members = groups
            .groups()
            .iter()
            .find(|g| g.name() == group)
            .map_or(0, |g| g.members().len());
        Ok((
            members,
            all_partitions(&*consumer, &topics, timeout)?.count(),
        ))
    })
    .await
    .expect("the census does not panic")
}

/// Every partition of `topics`, from the broker's metadata.
fn all_partitions<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    topics: &[String],
    timeout: Duration,
) -> Result<TopicPartitionList, KafkaError> {
    let metadata = consumer.fetch_metadata(None, timeout)?;
    let mut list = TopicPartitionList::new();
    for topic in metadata.topics() {
        if topics.iter().any(|t| t == topic.name()) {
            for partition in topic.partitions() {
                list.add_partition(topic.name(), partition.id());
            }
        }
    }
    Ok(list)
}

/// Deletes the group and commits its offsets back under the same name; returns the outcome
/// for the repairs counter.
async fn repair(consumer: &Arc<GroupConsumer>, w: &Watch) -> Result<&'static str, RepairError> {
    let timeout = Duration::from_secs(10);
    let (reader, topics) = (consumer.clone(), w.topics.clone());
    let saved = tokio::task::spawn_blocking(move || {
        let all = all_partitions(&*reader, &topics, timeout)?;
        reader.committed_offsets(all, timeout)
    })
    .await
    .expect("reading offsets does not panic")?;
    let mut offsets = TopicPartitionList::new();
    for e in saved.elements() {
        if let Offset::Offset(n) = e.offset() {
            offsets.add_partition_offset(e.topic(), e.partition(), Offset::Offset(n))?;
        }
    }

    // Every member that holds nothing reads this snapshot each second and starts its next
    // partitions there: members rejoin a deleted group within milliseconds, before anyone
    // could commit the offsets back for them.
    let snapshot: Vec<(String, i32, i64)> = offsets
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(n) => Some((e.topic().to_string(), e.partition(), n)),
            _ => None,
        })
        .collect();
    // Kept for twice the stall bound: the group re-forms within seconds of the repair.
    let ttl = (2 * stall_bound(&w.kafka)).as_millis() as u64;
    w.store.save_group_offsets(&w.group, &snapshot, ttl).await?;
    tokio::time::sleep(SNAPSHOT_SPREAD).await;
    if consumer.context().state().unassigned_for().is_zero() {
        // The broker re-formed the group meanwhile (tansu sometimes does, after a while).
        info!(group = %w.group, "The stalled group re-formed by itself; no repair needed.");
        return Ok("recovered");
    }

    let admin: AdminClient<DefaultClientContext> = kafka::admin_config(&w.kafka).create()?;
    let options = AdminOptions::new().request_timeout(Some(timeout));
    let results = admin.delete_groups(&[&w.group], &options).await?;
    if let Some(Err((_, code))) = results.first() {
        warn!(
            group = %w.group, %code,
            "The broker refused to delete the stalled group (Kafka does while it has members); \
             waiting for it to assign partitions."
        );
        return Ok("refused");
    }
    // Also committed back directly, for members that start later; refused once a member has
    // rejoined, which the snapshot covers.
    let restorer_config =
        kafka::consumer_config(&w.kafka, &w.group, &format!("{}-repair", w.member));
    let committed = tokio::task::spawn_blocking(move || {
        let restorer: BaseConsumer = restorer_config.create()?;
        if offsets.count() > 0 {
            restorer.commit(&offsets, CommitMode::Sync)?;
        }
        Ok::<_, KafkaError>(())
    })
    .await
    .expect("restoring offsets does not panic");
    info!(
        group = %w.group, partitions = snapshot.len(),
        committed_back = committed.is_ok(),
        "Repaired the stalled group: deleted it; its members rejoin now and start at its committed offsets."
    );
    Ok("repaired")
}

/// Why a repair did not happen.
#[derive(Debug, thiserror::Error)]
enum RepairError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("saving the group's offsets: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// How long a repair waits after saving its snapshot, so that every member holding nothing
/// (each reads it once a second) has it before the group is deleted.
const SNAPSHOT_SPREAD: Duration = Duration::from_millis(2_500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_listed_by_topic() {
        let p = |t: &str, n| (t.to_string(), n);
        assert_eq!(describe(&[]), "none");
        assert_eq!(describe(&[p("a", 0), p("a", 3), p("b", 1)]), "a[0,3] b[1]");
    }

    #[test]
    fn the_stall_bound_follows_the_session_timeout() {
        let kafka = KafkaSettings {
            session_timeout_ms: 6_000,
            ..KafkaSettings::default()
        };
        assert_eq!(stall_bound(&kafka), Duration::from_secs(17));
    }
}
