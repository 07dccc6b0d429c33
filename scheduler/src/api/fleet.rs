//! `/v1/stats`, `/v1/series`, `/v1/workers`, `/v1/pause`, `/v1/resume`: the fleet as a whole.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use fleet_common::Priority;
use fleet_common::store::Selector;
use fleet_common::store::series::{KEEP_MS, SeriesOf};
use serde::Deserialize;
use serde_json::{Value, json};

use super::tasks::parse_body;
use super::{ApiError, ApiState};

/// `GET /v1/stats`: tasks per state, per queue and per priority, throughput, pauses, counters.
pub(super) async fn stats(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let stats = state.store.stats().await?;
    Ok(Json(serde_json::to_value(stats).unwrap_or_default()))
}

/// Query of `GET /v1/series`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SeriesQuery {
    of: Option<String>,
    minutes: Option<u64>,
}

/// `GET /v1/series?of=&minutes=`: the dashboard's time series of all tasks, a queue or a
/// priority, one point per 10-second slot over the last `minutes` (default and most: 60).
pub(super) async fn series(
    State(state): State<ApiState>,
    query: Result<Query<SeriesQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    let most = KEEP_MS / 60_000;
    let minutes = q.minutes.unwrap_or(most);
    if !(1..=most).contains(&minutes) {
        return Err(ApiError::bad_request(
            "bad_query",
            format!("minutes must be 1 to {most}"),
        ));
    }
    let of: SeriesOf = q.of.as_deref().unwrap_or("all").parse().map_err(
        |err: fleet_common::store::series::BadSeries| {
            ApiError::bad_request("bad_series", err.to_string())
        },
    )?;
    let series = state.store.series(&of, minutes).await?;
    Ok(Json(serde_json::to_value(series).unwrap_or_default()))
}

/// `GET /v1/workers`: workers heard from within one lease.
pub(super) async fn workers(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let workers = state.store.workers(state.settings.lease.lease_ms).await?;
    Ok(Json(json!({ "workers": workers })))
}

/// Body of pause and resume: exactly one of `queue` and `priority`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SelectorBody {
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
pub(super) async fn pause(
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
pub(super) async fn resume(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let selector = selector(&body?)?;
    let released = state.store.resume(&selector).await?;
    Ok(Json(
        json!({ "resumed": selector.member(), "released": released }),
    ))
}
