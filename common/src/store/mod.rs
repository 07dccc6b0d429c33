//! The Redis state store: connection, key schema ([`keys`]) and transition scripts
//! ([`scripts`]). Redis is the source of truth for task state; Kafka only carries messages.

mod attempts;
mod control;
mod flow;
mod intake;
pub mod keys;
pub mod model;
mod placement;
mod query;
mod relay;
mod schedules;
pub mod scripts;
pub mod series;
mod trim;
mod workflow;

use std::time::Duration;

use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

pub use attempts::{Attempt, Beat, Claim, Completion, Fit, Heartbeat, Outcome, new_call_id};
pub use control::{Cancel, Reprioritize, Selector};
pub use flow::{DimUse, LimitView, Unblock};
pub use intake::{Accepted, Membership, NewTask};
pub use keys::Keys;
pub use model::{AttemptEnding, AttemptOutcome, NotATask, StoredTask, TaskTimes, WorkerInfo};
pub use placement::{Decision, Placed, Unpark, Waiting};
pub use query::{BadCursor, Cursor, Page, Stats, TaskFilter, TaskSummary, WorkerView};
pub use relay::{Backlog, Dispatch, Requeue};
pub use schedules::StoredSchedule;
pub use workflow::{ParentOutcome, WorkflowCancel, WorkflowTask, WorkflowView};

use crate::settings::RedisSettings;

/// Version of the key schema and script protocol. Bumped on any incompatible change so old and
/// new services never write the same data in different layouts.
///
/// Version 4 drops the `running` state index: the lease set already holds exactly the running
/// tasks, so claims and completions write two sorted sets fewer; and a task hash no longer
/// stores its id, nor `run_at_ms` when due at creation (Store::task adds both back). Version
/// 3 services reading such a hash miss only those shown fields. Version 3 services still
/// running go on writing the old index, which nothing of version 4 reads; the index trim
/// removes its entries once their tasks stop running ([`Keys::retired_running_index`]).
///
/// Version 3 keys the outbox of unacknowledged dispatches by attempt in its own sorted set;
/// version 2 kept them as bare ids among the timers in `due`. Version 3 reads such entries
/// (the relay publishes them as the task's next attempt), and version 2 services still running
/// ignore the new set and treat `due`'s timers as before, so a rolling upgrade loses nothing.
pub const SCHEMA_VERSION: u32 = 4;

/// The oldest schema version this build upgrades in place, see [`SCHEMA_VERSION`].
pub const OLDEST_UPGRADABLE: u32 = 2;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("Redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(
        "Redis holds schema version {found} but this build speaks {expected}; \
         refusing to touch data in an unknown layout"
    )]
    SchemaMismatch { found: u32, expected: u32 },
    #[error(
        "Redis holds schema version {found}, which a Fleet service of version {expected} \
         upgrades when it starts; start one (a scheduler first) before using this client"
    )]
    SchemaNotUpgraded { found: u32, expected: u32 },
    #[error("unexpected reply from a Fleet script: {0}")]
    Protocol(&'static str),
    #[error(transparent)]
    NotATask(#[from] NotATask),
}

/// Opens a reconnecting connection to Redis and checks that it answers.
pub async fn connect(settings: &RedisSettings) -> Result<ConnectionManager, StoreError> {
    let client = redis::Client::open(settings.url.expose())?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(3);
    let mut conn = client.get_connection_manager_with_config(config).await?;
    redis::cmd("PING").query_async::<()>(&mut conn).await?;
    Ok(conn)
}

/// Wakes `relay` or `place` whenever a script asks the relays or the dispatchers to run
/// ([`Keys::wake`]), for as long as the process runs: subscribes, and subscribes again a second
/// after the connection drops (meanwhile both run on their own period, as without it).
pub async fn wakeups(
    settings: RedisSettings,
    keys: Keys,
    relay: std::sync::Arc<tokio::sync::Notify>,
    place: std::sync::Arc<tokio::sync::Notify>,
) {
    use futures::StreamExt;
    loop {
        let subscribed = async {
            let client = redis::Client::open(settings.url.expose())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(keys.wake()).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match subscribed.await {
            Ok(mut pubsub) => {
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    match message.get_payload_bytes() {
                        b"place" => place.notify_one(),
                        _ => relay.notify_one(),
                    }
                }
                tracing::debug!("The relay wake-up subscription ended; subscribing again.");
            }
            Err(err) => {
                tracing::debug!(error = %err, "Cannot subscribe to relay wake-ups; retrying.");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What [`check_schema`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaCheck {
    /// No Fleet data yet: this call recorded [`SCHEMA_VERSION`].
    Recorded,
    /// The data is already in [`SCHEMA_VERSION`].
    Current,
    /// The data was in this older version, which this build reads; it is now marked
    /// [`SCHEMA_VERSION`].
    Upgraded { from: u32 },
}

/// Records [`SCHEMA_VERSION`] on first use, upgrades data of a version from
/// [`OLDEST_UPGRADABLE`] on (and logs it), and refuses any other version. For the services.
pub async fn check_schema(
    conn: &mut ConnectionManager,
    keys: &Keys,
    service: &str,
) -> Result<SchemaCheck, StoreError> {
    let check = schema_script(conn, keys, service, OLDEST_UPGRADABLE).await?;
    if let SchemaCheck::Upgraded { from } = check {
        tracing::info!(
            from,
            to = SCHEMA_VERSION,
            "Upgraded the Redis key schema in place."
        );
    }
    Ok(check)
}

/// Like [`check_schema`], but never upgrades: for clients such as `fleetctl`, which may run
/// from a newer release than the fleet's relays, and must not write what those do not read.
pub async fn check_schema_current(
    conn: &mut ConnectionManager,
    keys: &Keys,
    client: &str,
) -> Result<SchemaCheck, StoreError> {
    match schema_script(conn, keys, client, SCHEMA_VERSION).await {
        Err(StoreError::SchemaMismatch { found, expected })
            if found >= OLDEST_UPGRADABLE && found < expected =>
        {
            Err(StoreError::SchemaNotUpgraded { found, expected })
        }
        other => other,
    }
}

async fn schema_script(
    conn: &mut ConnectionManager,
    keys: &Keys,
    who: &str,
    oldest_upgradable: u32,
) -> Result<SchemaCheck, StoreError> {
    let (found, what): (u32, u8) = scripts::SCHEMA
        .key(keys.schema())
        .arg(SCHEMA_VERSION)
        .arg(who)
        .arg(oldest_upgradable)
        .invoke_async(conn)
        .await?;
    match what {
        1 => Ok(SchemaCheck::Recorded),
        2 => Ok(SchemaCheck::Upgraded { from: found }),
        _ if found == SCHEMA_VERSION => Ok(SchemaCheck::Current),
        _ => Err(StoreError::SchemaMismatch {
            found,
            expected: SCHEMA_VERSION,
        }),
    }
}

/// The Redis state store of one fleet. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    keys: Keys,
    retention_ms: u64,
    redeliver_ms: u64,
    idempotency_window_ms: u64,
    timeout_grace_ms: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl Store {
    pub fn new(conn: ConnectionManager, keys: Keys, tasks: &crate::settings::TaskSettings) -> Self {
        Self {
            conn,
            keys,
            retention_ms: tasks.retention_ms,
            redeliver_ms: tasks.redeliver_ms,
            idempotency_window_ms: tasks.idempotency_window_ms,
            timeout_grace_ms: tasks.timeout_grace_ms,
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A connection for plain commands (reads, pipelines).
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn retention_ms(&self) -> u64 {
        self.retention_ms
    }

    fn invocation<'a>(&self, script: &'a redis::Script) -> scripts::ScriptCall<'a> {
        let mut inv = scripts::ScriptCall::new(script);
        for key in self.keys.globals() {
            inv.key(key);
        }
        inv
    }
}

fn text(value: Option<&Value>) -> Result<String, StoreError> {
    match value {
        Some(v) => redis::from_redis_value_ref(v)
            .map_err(|_| StoreError::Protocol("expected text in script reply")),
        None => Err(StoreError::Protocol(
            "script reply is shorter than expected",
        )),
    }
}

fn number(value: Option<&Value>) -> Result<i64, StoreError> {
    match value {
        Some(v) => redis::from_redis_value_ref(v)
            .map_err(|_| StoreError::Protocol("expected a number in script reply")),
        None => Err(StoreError::Protocol(
            "script reply is shorter than expected",
        )),
    }
}
