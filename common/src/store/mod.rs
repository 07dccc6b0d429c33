//! The Redis state store: connection, key schema ([`keys`]) and transition scripts
//! ([`scripts`]). Redis is the source of truth for task state; Kafka only carries messages.

mod control;
pub mod keys;
mod query;
pub mod scripts;
mod tasks;

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

pub use control::{Cancel, Reprioritize, Selector};
pub use keys::Keys;
pub use query::{Page, Stats, TaskFilter, TaskSummary, WorkerView};
pub use tasks::{
    Accepted, Attempt, Beat, Claim, Completion, Dispatch, Heartbeat, NewTask, Outcome, Requeue,
    Store,
};

use crate::settings::RedisSettings;

/// Version of the key schema and script protocol. Bumped on any incompatible change so old and
/// new services never write the same data in different layouts.
pub const SCHEMA_VERSION: u32 = 2;

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
    #[error("unexpected reply from a Fleet script: {0}")]
    Protocol(&'static str),
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

/// Records [`SCHEMA_VERSION`] on first use, or checks it matches what is stored.
/// Returns whether this call recorded it.
pub async fn check_schema(
    conn: &mut ConnectionManager,
    keys: &Keys,
    service: &str,
) -> Result<bool, StoreError> {
    let (found, created): (u32, u8) = scripts::SCHEMA
        .key(keys.schema())
        .arg(SCHEMA_VERSION)
        .arg(service)
        .invoke_async(conn)
        .await?;
    if found != SCHEMA_VERSION {
        return Err(StoreError::SchemaMismatch {
            found,
            expected: SCHEMA_VERSION,
        });
    }
    Ok(created == 1)
}
