//! `/v1/limits`: the flow limits in force (concurrency, rate, tenant quotas and weights) with
//! their use, changeable at run time (stored in Redis; every scheduler applies a change within
//! about a second).

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use fleet_common::flow::{Limit, Scope};
use serde_json::{Value, json};

use super::tasks::parse_body;
use super::{ApiError, ApiState};

/// Every limit with its use, and the dimensions with tasks blocked that have no limit of
/// their own (their tasks wait for a queue's `key_max_running`).
async fn all(state: &ApiState) -> Result<Value, ApiError> {
    let limits = state.store.limits().await?;
    let views = state.store.limit_views(&limits).await?;
    Ok(json!({ "limits": views }))
}

fn checked(scope: &str, name: &str) -> Result<Scope, ApiError> {
    let scope: Scope = scope
        .parse()
        .map_err(|err: String| ApiError::bad_request("bad_limit", err))?;
    fleet_common::flow::check_name(scope, name)
        .map_err(|err| ApiError::bad_request("bad_limit", err))?;
    Ok(scope)
}

/// Reads the limits again after a change (they are stored: a failure here only delays this
/// scheduler's view to its next refresh, so it is logged, not answered).
async fn reload(state: &ApiState) {
    if let Err(err) = state.queues.reload(&state.store).await {
        tracing::warn!(error = %err, "Cannot read the limits again after a change; the next refresh will.");
    }
}

/// `GET /v1/limits`.
pub(super) async fn list(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(all(&state).await?))
}

/// `PUT /v1/limits/{scope}/{name}`: sets (replaces) a limit.
pub(super) async fn put(
    State(state): State<ApiState>,
    Path((scope, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let scope = checked(&scope, &name)?;
    let limit: Limit = parse_body(&body?)?;
    limit
        .validate(scope, &name)
        .map_err(|err| ApiError::bad_request("bad_limit", err))?;
    state.store.set_limit(scope, &name, Some(&limit)).await?;
    reload(&state).await;
    tracing::info!(scope = scope.as_str(), name = %name, limit = %limit.describe(), "Limit set.");
    Ok(Json(all(&state).await?))
}

/// `DELETE /v1/limits/{scope}/{name}`: removes a limit; tasks waiting for it go on within
/// about a second.
pub(super) async fn delete(
    State(state): State<ApiState>,
    Path((scope, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let scope = checked(&scope, &name)?;
    if !state.store.set_limit(scope, &name, None).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {} limit {name}", scope.as_str()),
        ));
    }
    reload(&state).await;
    tracing::info!(scope = scope.as_str(), name = %name, "Limit deleted.");
    Ok(Json(all(&state).await?))
}
