//! `/v1/workflows…`: the workflows tasks form through `depends_on` (see
//! [`fleet_common::workflow`]): list the open ones, show one with every member's state and
//! edges, cancel one.

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::{ApiError, ApiState};

fn check(id: &str) -> Result<(), ApiError> {
    fleet_common::task::check_queue(id).map_err(|_| {
        ApiError::bad_request(
            "bad_workflow",
            "a workflow id is 1 to 128 characters of [A-Za-z0-9_.:/-]",
        )
    })
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "not_found",
        format!("no workflow `{id}` (never created, or expired with its tasks)"),
    )
}

/// `GET /v1/workflows`: workflows with members not yet ended, and how many each has.
pub(super) async fn list(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let open = state.store.open_workflows().await?;
    let open: Vec<Value> = open
        .into_iter()
        .map(|(id, n)| json!({"id": id, "open": n}))
        .collect();
    Ok(Json(json!({ "workflows": open })))
}

/// `GET /v1/workflows/{id}`: every member (at most 10,000), its state, parents and outcome.
pub(super) async fn get(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check(&id)?;
    let view = state
        .store
        .workflow(&id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(serde_json::to_value(view).unwrap_or(Value::Null)))
}

/// `POST /v1/workflows/{id}/cancel`: cancels every member not yet ended, each exactly once.
pub(super) async fn cancel(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check(&id)?;
    let done = state
        .store
        .cancel_workflow(&id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    tracing::info!(workflow = %id, cancelled = done.cancelled, cancelling = done.cancelling, "Workflow cancelled.");
    Ok(Json(json!({
        "id": id,
        "cancelled": done.cancelled,
        "cancelling": done.cancelling,
        "already_ended": done.already_ended,
    })))
}
