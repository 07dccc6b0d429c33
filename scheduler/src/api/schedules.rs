//! `/v1/schedules…`: cron and interval schedules (see [`fleet_common::schedule`]): list, show
//! with their next occurrences, create or replace, delete, pause, resume, run now.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use fleet_common::schedule::{self, Schedule};
use serde_json::{Value, json};

use super::{ApiError, ApiState};

/// How many next occurrences a schedule is shown with.
const SHOWN: usize = 5;

fn bad(err: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("bad_schedule", err.to_string())
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no schedule `{name}`"),
    )
}

async fn shown(state: &ApiState, name: &str) -> Result<Value, ApiError> {
    let stored = state
        .store
        .schedule(name)
        .await?
        .ok_or_else(|| not_found(name))?;
    let now = state.store.redis_time_ms().await?;
    Ok(schedule::view(&stored.schedule, stored.next_ms, now, SHOWN))
}

/// `GET /v1/schedules`.
pub(super) async fn list(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let now = state.store.redis_time_ms().await?;
    let all: Vec<Value> = state
        .store
        .schedules()
        .await?
        .iter()
        .map(|s| schedule::view(&s.schedule, s.next_ms, now, 1))
        .collect();
    Ok(Json(json!({ "schedules": all })))
}

/// `GET /v1/schedules/{name}`.
pub(super) async fn get(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    schedule::check_name(&name).map_err(bad)?;
    Ok(Json(shown(&state, &name).await?))
}

/// `PUT /v1/schedules/{name}`: creates or replaces it (201 when created).
pub(super) async fn put(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    schedule::check_name(&name).map_err(bad)?;
    let schedule =
        Schedule::parse(&name, &body?, state.settings.tasks.max_task_bytes).map_err(bad)?;
    let existed = state.store.put_schedule(schedule).await?;
    tracing::info!(schedule = %name, "Schedule set.");
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(shown(&state, &name).await?)))
}

/// `DELETE /v1/schedules/{name}`: the tasks it fired stay.
pub(super) async fn delete(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    schedule::check_name(&name).map_err(bad)?;
    if !state.store.delete_schedule(&name).await? {
        return Err(not_found(&name));
    }
    tracing::info!(schedule = %name, "Schedule deleted.");
    Ok(Json(json!({ "deleted": name })))
}

async fn set_paused(state: &ApiState, name: &str, paused: bool) -> Result<Json<Value>, ApiError> {
    schedule::check_name(name).map_err(bad)?;
    if !state.store.pause_schedule(name, paused).await? {
        return Err(not_found(name));
    }
    tracing::info!(schedule = %name, paused, "Schedule paused or resumed.");
    Ok(Json(shown(state, name).await?))
}

/// `POST /v1/schedules/{name}/pause`.
pub(super) async fn pause(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_paused(&state, &name, true).await
}

/// `POST /v1/schedules/{name}/resume`: goes on from its next occurrence after now.
pub(super) async fn resume(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_paused(&state, &name, false).await
}

/// `POST /v1/schedules/{name}/run`: submits its task now, once more (id `<name>:run-<ms>`),
/// whatever its timing or pause.
pub(super) async fn run(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    schedule::check_name(&name).map_err(bad)?;
    let stored = state
        .store
        .schedule(&name)
        .await?
        .ok_or_else(|| not_found(&name))?;
    let now = state.store.redis_time_ms().await?;
    let id = format!("{name}:run-{now}");
    let tasks = crate::schedules::tasks_of_ids(&stored.schedule, vec![id.clone()], &state.settings);
    crate::schedules::fire(
        &state.store,
        &state.publisher,
        &state.queues,
        &stored.schedule,
        tasks,
        "run-now",
    )
    .await?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id }))))
}
