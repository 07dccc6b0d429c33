//! The process shape shared by `fleet-scheduler` and `fleet-reaper`: start-up (Redis, schema
//! check, topics, the producer), the loops each role runs, and the drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fleet_common::ops::{self, Readiness};
use fleet_common::shutdown::{Drain, Supervisor, TaskResult};
use fleet_common::store::{self, Store, StoreError};
use fleet_common::{Priority, Topics, kafka, task};
use rdkafka::producer::Producer;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::publish::Publisher;
use crate::queues::Queues;
use crate::routing::Router;
use crate::settings::SchedulerSettings;
use crate::{api, dispatch, ingest, reaper, relay, schedules};

/// Connects to Redis (checking the schema version) and Kafka (creating missing topics).
pub async fn connect(
    settings: &SchedulerSettings,
    service: &str,
) -> anyhow::Result<(Store, Publisher)> {
    let mut conn = store::connect(&settings.redis)
        .await
        .context("connecting to Redis")?;
    let keys = store::Keys::new(&settings.redis.key_prefix);
    store::check_schema(&mut conn, &keys, service)
        .await
        .context("checking the Redis schema")?;
    let store = Store::new(conn, keys, &settings.tasks);

    let topics = Topics::from_settings(&settings.topics);
    let record_limit = task::record_limit(settings.tasks.max_task_bytes);
    let client_id = format!("{service}-{}", std::process::id());
    let mut config = kafka::producer_config(&settings.kafka, &client_id);
    kafka::fit_producer(&mut config, &settings.kafka, record_limit)?;
    let statuses = kafka::ensure_topics(
        &settings.kafka,
        &topics.all(),
        settings.topics.partitions,
        settings.topics.replication_factor,
        record_limit,
        Duration::from_secs(15),
    )
    .await
    .context("creating topics")?;
    kafka::check_topics(
        &settings.kafka,
        &topics.all(),
        record_limit,
        Duration::from_secs(15),
    )
    .await?;
    let producer = config.create().context("creating the producer")?;
    // Keyless tasks are routed over the partitions the topics really have.
    let partitions = Priority::ALL.map(|priority| {
        let name = topics.tasks(priority);
        statuses
            .iter()
            .find(|status| status.name == name && status.partitions > 0)
            .map_or(settings.topics.partitions as usize, |status| {
                status.partitions
            })
    });
    let router = Router::new(
        settings.scheduler.partitioner,
        settings.scheduler.sticky_run,
        partitions,
    )
    .with_random_start();
    let publisher = Publisher::new(producer, topics, router);
    Ok((store, publisher))
}

/// What a process of this crate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `fleet-scheduler`: ingest and relay.
    Scheduler,
    /// `fleet-reaper`: reaper, relay and index trimming.
    Reaper,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Scheduler => "fleet-scheduler",
            Role::Reaper => "fleet-reaper",
        }
    }
}

/// How often terminal-state index entries past retention are trimmed.
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// How often a scheduler or reaper checks whether the current slot of the dashboard's time
/// series has its sample yet; a tenth of a slot, so a sample lands early in its slot.
const SERIES_CHECK: Duration = Duration::from_secs(1);

/// Runs a scheduler or reaper until `token` is cancelled, then drains within
/// `scheduler.shutdown_grace_ms`: every loop, the HTTP server and the API's group commit
/// (with the publications it started) are joined.
pub async fn serve(
    settings: SchedulerSettings,
    role: Role,
    token: CancellationToken,
) -> anyhow::Result<Drain> {
    let (store, publisher) = connect(&settings, role.name()).await?;
    let parts = Parts {
        queues: Queues::new(
            settings.scheduler.queues.clone(),
            settings.scheduler.limits.clone(),
        ),
        settings: Arc::new(settings),
        store,
        publisher,
        token: token.clone(),
    };
    if let Err(err) = parts.queues.refresh(&parts.store).await {
        warn!(error = %err, "Cannot read the queues' run-time settings yet; the dispatcher retries.");
    }
    let mut supervisor = Supervisor::new(token);
    let readiness = Readiness::default();
    // With `http.listen` empty there is no listener, and so no API: its group commit would
    // end at once with no server holding its handles, and take the service down with it.
    if !parts.settings.http.listen.is_empty() {
        let app = match role {
            Role::Scheduler => parts.api(&mut supervisor, &readiness)?,
            Role::Reaper => ops::router(readiness.clone()),
        };
        parts.serve_http(&mut supervisor, app).await?;
    }
    parts.spawn_relay(&mut supervisor);
    parts.spawn_series(&mut supervisor);
    match role {
        Role::Scheduler => {
            supervisor.spawn(
                "ingest",
                ingest::run(
                    parts.settings.clone(),
                    parts.store.clone(),
                    parts.publisher.clone(),
                    parts.queues.clone(),
                    readiness.clone(),
                    parts.token.child_token(),
                ),
            );
            parts.spawn_dispatcher(&mut supervisor);
            parts.spawn_schedules(&mut supervisor);
        }
        Role::Reaper => parts.spawn_reaper(&mut supervisor),
    }
    readiness.set(true);
    // Counters that may stay at zero for long still show up, so dashboards see them.
    fleet_common::telemetry::metrics::tasks_requeued().absolute(0);
    fleet_common::telemetry::metrics::tasks_duplicate().absolute(0);
    let settings = &parts.settings;
    info!(role = role.name(), brokers = %settings.kafka.brokers, "Started.");
    let outcome = supervisor.run(settings.scheduler.shutdown_grace()).await;
    let _ = parts
        .publisher
        .producer()
        .flush(settings.scheduler.shutdown_grace());
    info!(?outcome, "Stopped.");
    Ok(outcome)
}

/// What a scheduler's or reaper's loops share.
struct Parts {
    settings: Arc<SchedulerSettings>,
    /// Each queue's settings (see [`Queues`]).
    queues: Queues,
    store: Store,
    publisher: Publisher,
    token: CancellationToken,
}

impl Parts {
    /// The HTTP API, with its group commit supervised: it ends once the HTTP server has
    /// drained (the server holds the last handles), after the publications of the groups it
    /// accepted.
    fn api(
        &self,
        supervisor: &mut Supervisor,
        readiness: &Readiness,
    ) -> anyhow::Result<axum::Router> {
        let settings = &self.settings;
        let tokens = settings.http.load_tokens().context("loading API tokens")?;
        if tokens.is_empty() && !settings.http.insecure_no_auth {
            warn!(
                "No API token is configured (http.tokens, http.token_files): the API refuses every request."
            );
        }
        let (submissions, group_commit) =
            api::group::SubmitGroup::new(self.store.clone(), self.publisher.clone());
        supervisor.spawn("http group commit", async move {
            group_commit.await;
            Ok(())
        });
        Ok(api::router(
            api::ApiState {
                settings: settings.clone(),
                store: self.store.clone(),
                publisher: self.publisher.clone(),
                tokens: Arc::new(tokens),
                submissions,
                queues: self.queues.clone(),
            },
            readiness.clone(),
        ))
    }

    /// Serves `app` on `http.listen` until shutdown, supervised.
    async fn serve_http(
        &self,
        supervisor: &mut Supervisor,
        app: axum::Router,
    ) -> anyhow::Result<()> {
        let listen = &self.settings.http.listen;
        if let Some((_, server)) = ops::serve(listen, app, self.token.child_token())
            .await
            .with_context(|| format!("listening on {listen}"))?
        {
            supervisor.spawn("http", async move {
                match server.await {
                    Ok(result) => result.map_err(Into::into),
                    Err(err) => Err(err.into()),
                }
            });
        }
        Ok(())
    }

    /// The relay: due timers, the outbox and the held-task sweep, every relay interval, and at
    /// once when a script released a task waiting for its parents (which also wakes the
    /// dispatcher for a placed one).
    fn spawn_relay(&self, supervisor: &mut Supervisor) {
        let (store, publisher) = (self.store.clone(), self.publisher.clone());
        let live_age = self.settings.lease.lease_ms;
        let sweep = Arc::new(relay::HeldSweep::default());
        let wake = Arc::new(tokio::sync::Notify::new());
        let wakeups = tokio::spawn(fleet_common::store::wakeups(
            self.settings.redis.clone(),
            self.store.keys().clone(),
            wake.clone(),
            self.publisher.placing(),
        ));
        let token = self.token.clone();
        tokio::spawn(async move {
            token.cancelled().await;
            wakeups.abort();
        });
        supervisor.spawn(
            "relay",
            every_or_woken(
                "relay",
                self.settings.scheduler.relay_interval(),
                Some(wake),
                self.token.child_token(),
                move || {
                    let (store, publisher, sweep) =
                        (store.clone(), publisher.clone(), sweep.clone());
                    async move {
                        Ok(relay::round(&store, &publisher, live_age, &sweep).await?
                            >= relay::BATCH)
                    }
                },
            ),
        );
    }

    /// Schedules: fires every due occurrence (see [`schedules`]).
    fn spawn_schedules(&self, supervisor: &mut Supervisor) {
        let (store, publisher) = (self.store.clone(), self.publisher.clone());
        let (settings, queues) = (self.settings.clone(), self.queues.clone());
        supervisor.spawn(
            "schedules",
            every(
                "schedules",
                schedules::CHECK_EVERY,
                self.token.child_token(),
                move || {
                    let (store, publisher) = (store.clone(), publisher.clone());
                    let (settings, queues) = (settings.clone(), queues.clone());
                    async move { schedules::round(&settings, &store, &publisher, &queues).await }
                },
            ),
        );
    }

    /// The placement dispatcher (see [`dispatch`]).
    fn spawn_dispatcher(&self, supervisor: &mut Supervisor) {
        let dispatcher = dispatch::Dispatcher {
            store: self.store.clone(),
            publisher: self.publisher.clone(),
            wake: self.publisher.placing(),
            live_ms: self.settings.lease.lease_ms,
            queues: self.queues.clone(),
        };
        supervisor.spawn("placement", dispatcher.run(self.token.child_token()));
    }

    /// The dashboard's series: every scheduler and reaper offers to sample; the first in each
    /// slot does.
    fn spawn_series(&self, supervisor: &mut Supervisor) {
        let store = self.store.clone();
        supervisor.spawn(
            "series",
            every(
                "series",
                SERIES_CHECK,
                self.token.child_token(),
                move || {
                    let store = store.clone();
                    async move {
                        store.sample_series().await?;
                        Ok(false)
                    }
                },
            ),
        );
    }

    /// The reaper's loops: expired leases every reaper interval, and the state indexes'
    /// trim every minute.
    fn spawn_reaper(&self, supervisor: &mut Supervisor) {
        let (s, p) = (self.store.clone(), self.publisher.clone());
        let live_age = self.settings.lease.lease_ms;
        supervisor.spawn(
            "reaper",
            every(
                "reaper",
                self.settings.lease.reaper_interval(),
                self.token.child_token(),
                move || {
                    let (store, publisher) = (s.clone(), p.clone());
                    async move {
                        Ok(reaper::scan(&store, &publisher, live_age).await? >= reaper::BATCH)
                    }
                },
            ),
        );
        let store = self.store.clone();
        supervisor.spawn(
            "index trim",
            every(
                "index trim",
                TRIM_EVERY,
                self.token.child_token(),
                move || {
                    let store = store.clone();
                    async move {
                        let removed = store.trim_terminal_indexes().await?;
                        if removed > 0 {
                            info!(removed, "Trimmed expired entries from the state indexes.");
                        }
                        Ok(false)
                    }
                },
            ),
        );
    }
}

/// Runs `step` every `interval` until `token` is cancelled. A step that returns `true` (it
/// filled a whole batch, so more is waiting) runs again at once; a failed step is logged and
/// retried next period.
async fn every<F, Fut>(
    what: &'static str,
    interval: Duration,
    token: CancellationToken,
    step: F,
) -> TaskResult
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, StoreError>>,
{
    every_or_woken(what, interval, None, token, step).await
}

/// [`every`], and also as soon as `wake` is notified.
async fn every_or_woken<F, Fut>(
    what: &'static str,
    interval: Duration,
    wake: Option<Arc<tokio::sync::Notify>>,
    token: CancellationToken,
    mut step: F,
) -> TaskResult
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, StoreError>>,
{
    let wake = wake.unwrap_or_default();
    info!(
        interval_ms = interval.as_millis() as u64,
        "Loop `{what}` started."
    );
    while !token.is_cancelled() {
        let more = step().await.unwrap_or_else(|err| {
            warn!(error = %err, "Loop `{what}` failed; retrying next period.");
            false
        });
        if !more {
            tokio::select! {
                () = token.cancelled() => {}
                () = tokio::time::sleep(interval) => {}
                () = wake.notified() => {}
            }
        }
    }
    info!("Loop `{what}` stopped.");
    Ok(())
}
