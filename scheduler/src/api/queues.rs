//! `/v1/queues`: each queue's scheduling settings (strategy, placement policy, placement
//! timeout), changeable at run time, and how many placed tasks wait in it.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use fleet_common::placement::QueueSettings;
use fleet_common::task::{MAX_DELAY_MS, check_queue};
use serde_json::{Value, json};

use super::tasks::parse_body;
use super::{ApiError, ApiState};

/// One queue as the API shows it.
async fn view(state: &ApiState, queue: &str) -> Result<Value, ApiError> {
    let settings = state.queues.get(queue);
    let waiting = state.store.waiting_count(queue).await?;
    Ok(json!({
        "queue": queue,
        "settings": settings,
        "places_all": settings.places_all(),
        "waiting_for_placement": waiting,
    }))
}

fn checked_name(queue: &str) -> Result<(), ApiError> {
    check_queue(queue).map_err(|err| ApiError::bad_request("bad_queue", err.to_string()))
}

/// `GET /v1/queues`: every queue with tasks or settings of its own.
pub(super) async fn list(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let mut names: std::collections::BTreeSet<String> =
        state.store.queue_names().await?.into_iter().collect();
    names.extend(state.queues.all().into_keys());
    let mut queues = Vec::with_capacity(names.len());
    for name in &names {
        queues.push(view(&state, name).await?);
    }
    Ok(Json(json!({ "queues": queues })))
}

/// `GET /v1/queues/{name}`.
pub(super) async fn get(
    State(state): State<ApiState>,
    Path(queue): Path<String>,
) -> Result<Json<Value>, ApiError> {
    checked_name(&queue)?;
    Ok(Json(view(&state, &queue).await?))
}

/// `PUT /v1/queues/{name}`: sets the queue's settings (fields left out take their defaults);
/// every scheduler applies them within about a second.
pub(super) async fn put(
    State(state): State<ApiState>,
    Path(queue): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    checked_name(&queue)?;
    let settings: QueueSettings = parse_body(&body?)?;
    if settings
        .placement_timeout_ms
        .is_some_and(|ms| ms == 0 || ms > MAX_DELAY_MS)
    {
        return Err(ApiError::bad_request(
            "bad_settings",
            format!("`placement_timeout_ms` must be 1 to {MAX_DELAY_MS} (one year)"),
        ));
    }
    state
        .store
        .set_queue_settings(&queue, Some(&settings))
        .await?;
    state.queues.reload(&state.store).await?;
    Ok(Json(view(&state, &queue).await?))
}

/// `DELETE /v1/queues/{name}`: drops the run-time settings; the settings file's apply again.
pub(super) async fn delete(
    State(state): State<ApiState>,
    Path(queue): Path<String>,
) -> Result<Json<Value>, ApiError> {
    checked_name(&queue)?;
    state.store.set_queue_settings(&queue, None).await?;
    state.queues.reload(&state.store).await?;
    Ok(Json(view(&state, &queue).await?))
}
