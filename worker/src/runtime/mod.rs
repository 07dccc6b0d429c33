//! The worker runtime.
//!
//! ```text
//!  Kafka ──poll──► buffers (FIFO per priority) ──pick──► claim (one Redis call per batch)
//!   ▲  pause/resume        weighted pick          │  store offsets of the batch, in order
//!   │                                             ▼
//!   └──────── offsets ◄──────────────── handlers (bounded by `concurrency`)
//!                                                 │ outcomes
//!  lease keeper (own thread) ── extend all ──►  completer ── complete (one call per batch)
//! ```
//!
//! - The poll loop never runs a handler and never blocks: a priority whose buffer is full has
//!   its partitions paused until the buffer drains.
//! - A delivery's offset is stored only after the claim script answered for it (claimed, or a
//!   duplicate/stale message), so a crash never skips an unclaimed task.
//! - The lease keeper runs on its own thread and runtime with its own Redis connection, so busy
//!   handlers cannot starve heartbeats; a lease reported lost cancels its handler.
//! - SIGTERM drains: stop fetching and starting, let running handlers finish within the grace
//!   period, hand the rest back at once (not a failure), commit offsets, leave the group.

mod buffers;
mod claim;
mod drain;
mod execute;
mod lease;
mod poll;
mod task_metrics;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use fleet_common::ops::{self, Readiness};
use fleet_common::shutdown::Drain;
use fleet_common::store::series::WaitSample;
use fleet_common::store::{self, Store, StoreError};
use fleet_common::{Priority, Topics, kafka, membership};
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::handler::Registry;
use crate::settings::WorkerSettings;

pub use buffers::{Buffers, Delivery};

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    #[error("Redis: {0}")]
    Store(#[from] StoreError),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("HTTP listener: {0}")]
    Http(#[from] std::io::Error),
    #[error(transparent)]
    Capacity(#[from] crate::capacity::CapacityError),
}

/// Workers use round-robin assignment: it spreads the partitions of every priority topic over
/// the workers, so each worker sees every priority and can put urgent work first.
/// Cooperative-sticky balances only the total partition count and can leave a worker with,
/// say, nothing but low-priority partitions. (`kafka.client` may override it.)
const ASSIGNMENT_STRATEGY: &str = "partition.assignment.strategy";

/// A handler that is running, keyed by task id in [`Shared::running`].
#[derive(Debug)]
struct Running {
    attempt: u32,
    cancel: CancellationToken,
    /// The handler's task: aborting it stops the handler at its next await point, and awaiting
    /// it tells whether the handler ended by itself (and so reported its own outcome).
    handler: Option<JoinHandle<()>>,
    /// When the handler started, for the duration of an aborted one.
    started: Instant,
    /// Set by the lease keeper when Redis says the lease is gone; the next heartbeat aborts a
    /// handler that has not stopped by then.
    lost: bool,
    /// When the handler was told its task is cancelled; it is aborted once the cancel grace
    /// period has passed since.
    cancelled_at: Option<Instant>,
    /// Progress the handler reported since the last heartbeat.
    progress: crate::handler::ProgressSlot,
    metrics: Arc<task_metrics::TaskMetrics>,
    /// A placed task: its end releases what it reserved on this worker.
    placed: bool,
    _slot: OwnedSemaphorePermit,
}

/// An attempt's end, sent from its handler task to the completer.
#[derive(Debug)]
struct Finished {
    id: Arc<str>,
    attempt: u32,
    outcome: store::Outcome,
    /// Follow-up tasks to create with its success (see `TaskContext::spawn`).
    follow_ups: Vec<store::NewTask>,
    started: Instant,
    metrics: Arc<task_metrics::TaskMetrics>,
    placed: bool,
}

/// State shared by the worker's loops.
#[derive(Debug)]
struct Shared {
    worker_id: Arc<str>,
    settings: Arc<WorkerSettings>,
    /// Task topic names by priority index, so deliveries need not carry strings.
    topic_names: [String; 4],
    running: Mutex<HashMap<Arc<str>, Running>>,
    /// Attempts of a claim call that failed as shutdown came: it may have claimed them with its
    /// reply lost, so the hand-back releases them too (release is fenced: attempts this worker
    /// does not hold are left alone).
    unanswered: Mutex<Vec<(Arc<str>, u32)>>,
    /// This worker's partitions of each priority topic, reported with every heartbeat so that
    /// requeued tasks are routed to partitions a live worker consumes.
    assignment: Mutex<[Vec<i32>; 4]>,
    buffers: Mutex<Buffers>,
    work_ready: Notify,
    slots: Arc<Semaphore>,
    metrics: task_metrics::MetricsCache,
    /// Queue waits of the tasks started since the last heartbeat, for the dashboard's series.
    waits: Mutex<WaitSample>,
    /// What this worker offers placed tasks (see [`crate::capacity`]).
    capacity: fleet_common::placement::Resources,
    /// For handlers that read their parents' outcomes (`ctx.parents()`).
    store: Store,
}

impl Shared {
    fn running(&self) -> MutexGuard<'_, HashMap<Arc<str>, Running>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn waits(&self) -> MutexGuard<'_, WaitSample> {
        self.waits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn unanswered(&self) -> MutexGuard<'_, Vec<(Arc<str>, u32)>> {
        self.unanswered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn assignment(&self) -> MutexGuard<'_, [Vec<i32>; 4]> {
        self.assignment
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn buffers(&self) -> MutexGuard<'_, Buffers> {
        self.buffers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A worker: one member of the workers' consumer group.
#[derive(Debug)]
pub struct Worker {
    settings: Arc<WorkerSettings>,
    registry: Arc<Registry>,
}

impl Worker {
    pub fn new(settings: WorkerSettings, registry: Registry) -> Self {
        Self {
            settings: Arc::new(settings),
            registry: Arc::new(registry),
        }
    }

    /// Runs until `token` is cancelled, then drains. Returns how the drain went.
    pub async fn run(self, token: CancellationToken) -> Result<Drain, WorkerError> {
        let settings = self.settings;
        let worker_id: Arc<str> = settings.worker.worker_id().into();
        let capacity =
            crate::capacity::capacity(&settings.worker.capacity, settings.worker.concurrency)?;
        let store = connect_store(&settings).await?;
        let consumer = Arc::new(join_group(&settings, &worker_id, &token).await?);
        let topics = Topics::from_settings(&settings.topics);
        let shared = Arc::new(Shared::new(
            worker_id.clone(),
            settings.clone(),
            &topics,
            capacity,
            store.clone(),
        ));
        let readiness = Readiness::default();
        let watcher = tokio::spawn(membership::watch(
            consumer.clone(),
            membership::Watch {
                kafka: settings.kafka.clone(),
                group: settings.worker.group_id.clone(),
                topics: shared.topic_names.to_vec(),
                member: worker_id.to_string(),
                store: store.clone(),
                readiness: readiness.clone(),
            },
            token.child_token(),
        ));
        info!(
            worker_id = %worker_id, group = %settings.worker.group_id,
            concurrency = settings.worker.concurrency,
            capacity = ?shared.capacity, labels = ?settings.worker.labels,
            kinds = ?self.registry.kinds(), "Worker started."
        );
        let refuser = claim::Refuser {
            producer: kafka::producer_config(&settings.kafka, &worker_id).create()?,
            topic: topics.rejected(),
        };
        let loops = Loops::start(&shared, &consumer, &store, &self.registry, refuser, &token);

        // Health, readiness and metrics; the listener stops when the worker is told to stop,
        // and is joined at the end of the drain.
        let http = ops::serve(
            &settings.http.listen,
            ops::router(readiness.clone()),
            token.child_token(),
        )
        .await?;
        readiness.set(true);
        // Counters that may stay at zero for long still show up, so dashboards see them.
        fleet_common::telemetry::metrics::leases_lost().absolute(0);
        fleet_common::telemetry::metrics::completions_fenced().absolute(0);

        let mut outcome = Drain::Clean;
        tokio::select! {
            () = token.cancelled() => {}
            _ = loops.lease_keeper.finished() => {
                warn!("The lease keeper stopped; shutting the worker down.");
                outcome = Drain::Unclean;
            }
        }
        readiness.set(false);
        watcher.abort();
        let drained = drain::drain(loops, consumer, &shared, &store).await;
        let http_stopped = drain::stop_http(http, settings.lease.lease()).await;
        let outcome = outcome.and(drained).and(http_stopped);
        info!(?outcome, "Worker stopped.");
        Ok(outcome)
    }
}

impl Shared {
    fn new(
        worker_id: Arc<str>,
        settings: Arc<WorkerSettings>,
        topics: &Topics,
        capacity: fleet_common::placement::Resources,
        store: Store,
    ) -> Self {
        Self {
            store,
            worker_id,
            topic_names: Priority::ALL.map(|p| topics.tasks(p)),
            running: Mutex::new(HashMap::new()),
            unanswered: Mutex::new(Vec::new()),
            assignment: Mutex::new(Default::default()),
            buffers: Mutex::new(Buffers::new(
                settings.worker.priority_weights,
                settings.worker.strict_priority,
            )),
            work_ready: Notify::new(),
            slots: Arc::new(Semaphore::new(settings.worker.concurrency)),
            metrics: task_metrics::MetricsCache::new(),
            waits: Mutex::default(),
            capacity,
            settings,
        }
    }
}

/// A store client on the worker's Redis, once its schema is one this build understands.
async fn connect_store(settings: &WorkerSettings) -> Result<Store, WorkerError> {
    let mut conn = store::connect(&settings.redis).await?;
    let keys = store::Keys::new(&settings.redis.key_prefix);
    store::check_schema(&mut conn, &keys, "fleet-worker").await?;
    Ok(Store::new(conn, keys, &settings.tasks))
}

/// The worker's group consumer, subscribed to every priority topic after a random wait of up
/// to `worker.join_jitter_ms` (so that replicas started together do not join at the same
/// instant, which the local broker answers with a one-second stall).
async fn join_group(
    settings: &WorkerSettings,
    worker_id: &str,
    token: &CancellationToken,
) -> Result<membership::GroupConsumer, WorkerError> {
    let mut config = kafka::consumer_config(&settings.kafka, &settings.worker.group_id, worker_id);
    if !settings.kafka.client.contains_key(ASSIGNMENT_STRATEGY) {
        config.set(ASSIGNMENT_STRATEGY, "roundrobin");
    }
    if !settings.worker.group_instance_id.is_empty() {
        config.set("group.instance.id", &settings.worker.group_instance_id);
    }
    let consumer = membership::consumer(config, &settings.worker.group_id)?;
    let topics = Topics::from_settings(&settings.topics);
    let names = Priority::ALL.map(|p| topics.tasks(p));
    let subscription: Vec<&str> = names.iter().map(String::as_str).collect();
    let jitter = settings.worker.join_jitter();
    tracing::debug!(
        jitter_ms = jitter.as_millis() as u64,
        "waiting before joining the group"
    );
    tokio::select! {
        () = tokio::time::sleep(jitter) => {}
        () = token.cancelled() => {}
    }
    consumer.subscribe(&subscription)?;
    Ok(consumer)
}

/// The worker's loops, started together and stopped by the drain.
struct Loops {
    /// Stops fetching and starting new attempts: the first step of a drain.
    fetch: CancellationToken,
    poller: JoinHandle<()>,
    claimer: JoinHandle<()>,
    /// Stops the lease keeper, once the running handlers are done or handed back.
    lease_token: CancellationToken,
    lease_keeper: lease::LeaseKeeper,
    completer: JoinHandle<()>,
}

impl Loops {
    fn start(
        shared: &Arc<Shared>,
        consumer: &Arc<membership::GroupConsumer>,
        store: &Store,
        registry: &Arc<Registry>,
        refuser: claim::Refuser,
        token: &CancellationToken,
    ) -> Self {
        let fetch = token.child_token();
        let lease_token = CancellationToken::new();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let lease_keeper = lease::spawn(
            shared.clone(),
            registry.kinds().join(","),
            done_tx.clone(),
            lease_token.clone(),
        );
        let completer = tokio::spawn(execute::complete_loop(
            shared.clone(),
            store.clone(),
            done_rx,
        ));
        let poller = tokio::spawn(poll::poll_loop(
            shared.clone(),
            consumer.clone(),
            fetch.clone(),
        ));
        let claimer = claim::Claimer {
            shared: shared.clone(),
            consumer: consumer.clone(),
            store: store.clone(),
            registry: registry.clone(),
            done: done_tx,
            refuser,
        };
        let claimer = tokio::spawn(claimer.run(fetch.clone()));
        Self {
            fetch,
            poller,
            claimer,
            lease_token,
            lease_keeper,
            completer,
        }
    }
}
