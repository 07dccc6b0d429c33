//! `/v1/stats`, `/v1/workers`, `/v1/pause`, `/v1/resume`: the fleet as a whole.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use fleet_common::Priority;
use fleet_common::store::Selector;
use serde::Deserialize;
use serde_json::{Value, json};

use super::tasks::parse_body;
use super::{ApiError, ApiState};

/// `GET /v1/stats`: tasks per state, per queue and per priority, throughput, pauses, counters.
pub async fn stats(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let stats = state.store.stats().await?;
    Ok(Json(serde_json::to_value(stats).unwrap_or_default()))
}

/// `GET /v1/workers`: workers heard from within one lease.
pub async fn workers(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let workers = state.store.workers(state.settings.lease.lease_ms).await?;
    Ok(Json(json!({ "workers": workers })))
}

/// Body of pause and resume: exactly one of `queue` and `priority`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectorBody {
    queue: Option<String>,
    priority: Option<Priority>,
}

fn selector(body: &[u8]) -> Result<Selector, ApiError> {
    let body: SelectorBody = parse_body(body)?;
    match (body.queue, body.priority) {
        (Some(queue), None) => match fleet_common::task::check_queue(&queue) {
            Ok(()) => Ok(Selector::Queue(queue)),
            Err(err) => Err(ApiError::bad_request("bad_selector", err.to_string())),
        },
        (None, Some(priority)) => Ok(Selector::Priority(priority)),
        _ => Err(ApiError::bad_request(
            "bad_selector",
            "send exactly one of {\"queue\": \"<name>\"} or {\"priority\": \"<level>\"}",
        )),
    }
}

/// `POST /v1/pause`: workers stop starting the tasks of a queue or priority.
pub async fn pause(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let selector = selector(&body?)?;
    let newly = state.store.pause(&selector).await?;
    Ok(Json(
        json!({ "paused": selector.member(), "already_paused": !newly }),
    ))
}

/// `POST /v1/resume`: undoes a pause and publishes the tasks held meanwhile.
pub async fn resume(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let selector = selector(&body?)?;
    let released = state.store.resume(&selector).await?;
    Ok(Json(
        json!({ "resumed": selector.member(), "released": released }),
    ))
}
