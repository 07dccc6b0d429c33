//! `/v1/tasks…`: submit, read, list, cancel, redrive and reprioritize tasks.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleet_common::Priority;
use fleet_common::flow::OVER_QUOTA;
use fleet_common::store::{Accepted, Cancel, Cursor, NewTask, Reprioritize, TaskFilter};
use fleet_common::task::{State as TaskState, TaskSpec, new_task_id};
use fleet_common::trace::TraceParent;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::{ApiError, ApiState};

/// Most tasks in one submission request.
const MAX_BATCH: usize = 1000;
/// The refusal code of a submission whose dependencies name a task that does not exist.
pub(crate) const INVALID_DEPENDENCY: &str = "invalid_dependency";
/// Seconds a client refused for a quota is told to wait (`Retry-After`): tasks end, and the
/// quota's room comes back, continuously; a second is the limits' own refresh period.
const RETRY_AFTER_S: &str = "1";

/// `POST /v1/tasks`: one task object, or an array of up to 1000. Every task is validated
/// first; if any is invalid nothing is accepted and the answer names it by index. A task that
/// would make more tasks wait than a quota of its queue or tenant allows is refused: the answer
/// is 429 with `Retry-After`, and lists, per task, the ones accepted and the ones refused
/// (`error.code` `over_quota`), so a client resubmits only those.
pub(super) async fn submit(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let parent = headers
        .get(fleet_common::wire::header::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    let body = body?;
    let max = state.settings.tasks.max_task_bytes;
    let trimmed = body.trim_ascii_start();
    let items: Vec<&[u8]> = if trimmed.first() == Some(&b'[') {
        let raw: Vec<&RawValue> = serde_json::from_slice(trimmed).map_err(|err| {
            ApiError::bad_request("invalid_json", format!("body is not a JSON array: {err}"))
        })?;
        raw.into_iter().map(|r| r.get().as_bytes()).collect()
    } else {
        vec![&body[..]]
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(ApiError::bad_request(
            "bad_batch",
            format!("send 1 to {MAX_BATCH} tasks, got {}", items.len()),
        ));
    }
    let mut tasks = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let spec = TaskSpec::parse(item, max).map_err(|err| {
            fleet_common::telemetry::metrics::tasks_rejected(err.code()).increment(1);
            let at = if items.len() > 1 {
                format!("task {index}: ")
            } else {
                String::new()
            };
            ApiError::bad_request(err.code(), format!("{at}{err}"))
        })?;
        let mut task = NewTask::from_spec(spec, &state.settings.tasks, new_task_id);
        task.trace = TraceParent::continue_or_start(parent.as_ref());
        tasks.push(task);
    }
    fleet_common::workflow::prepare(&mut tasks).map_err(|err| {
        fleet_common::telemetry::metrics::tasks_rejected(err.code()).increment(1);
        ApiError::bad_request(err.code(), err.to_string())
    })?;
    state.queues.mark(&mut tasks);
    let accepted = state.submissions.submit(tasks).await.map_err(|err| {
        tracing::warn!(error = %err, "Accepting submissions failed.");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", err)
    })?;
    // A submission with dependencies is refused whole; every task has the same reason.
    if let Some(Accepted::Refused(why)) =
        accepted.iter().find(|a| matches!(a, Accepted::Refused(_)))
    {
        fleet_common::telemetry::metrics::tasks_rejected(INVALID_DEPENDENCY)
            .increment(accepted.len() as u64);
        return Err(ApiError::bad_request(INVALID_DEPENDENCY, why.clone()));
    }
    let created = accepted
        .iter()
        .any(|a| !matches!(a, Accepted::Duplicate(_)));
    let answers: Vec<Value> = accepted
        .iter()
        .map(|a| match a {
            Accepted::Pending(id) => json!({"id": id, "state": "pending", "duplicate": false}),
            Accepted::Scheduled(id) => json!({"id": id, "state": "scheduled", "duplicate": false}),
            Accepted::Placing(id) => {
                json!({"id": id, "state": "pending", "placing": true, "duplicate": false})
            }
            Accepted::Waiting(id) => json!({"id": id, "state": "waiting", "duplicate": false}),
            Accepted::Ended(id, ended) => json!({"id": id, "state": ended, "duplicate": false}),
            Accepted::Duplicate(id) => json!({"id": id, "duplicate": true}),
            Accepted::Refused(why) => json!({
                "error": {"code": INVALID_DEPENDENCY, "message": why}
            }),
            Accepted::OverQuota(why) => json!({
                "error": {"code": OVER_QUOTA, "message": format!("over quota: {why}")}
            }),
        })
        .collect();
    if accepted.iter().any(|a| matches!(a, Accepted::OverQuota(_))) {
        let refused = accepted
            .iter()
            .filter(|a| matches!(a, Accepted::OverQuota(_)))
            .count();
        fleet_common::telemetry::metrics::tasks_rejected(OVER_QUOTA).increment(refused as u64);
        let body = json!({
            "error": {
                "code": OVER_QUOTA,
                "message": format!("{refused} of {} tasks refused: over quota; retry later", accepted.len()),
            },
            "tasks": answers,
        });
        let retry = [(header::RETRY_AFTER, RETRY_AFTER_S)];
        return Ok((StatusCode::TOO_MANY_REQUESTS, retry, Json(body)).into_response());
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({ "tasks": answers }))).into_response())
}

/// `GET /v1/tasks/{id}`: every field of the task; JSON fields (`record`, `result`, `history`)
/// as JSON.
pub(super) async fn get(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let task = state
        .store
        .task(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no task `{id}`")))?;
    Ok(Json(serde_json::to_value(task).unwrap_or_default()))
}

/// Query of `GET /v1/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    state: Option<TaskState>,
    queue: Option<String>,
    kind: Option<String>,
    priority: Option<Priority>,
    #[serde(default = "default_limit")]
    limit: usize,
    cursor: Option<String>,
}

fn default_limit() -> usize {
    50
}

/// `GET /v1/tasks?state=&queue=&kind=&priority=&limit=&cursor=`: newest first, paged.
pub(super) async fn list(
    State(state): State<ApiState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    if !(1..=1000).contains(&q.limit) {
        return Err(ApiError::bad_request(
            "bad_query",
            "limit must be 1 to 1000",
        ));
    }
    let cursor = q
        .cursor
        .as_deref()
        .map(str::parse::<Cursor>)
        .transpose()
        .map_err(|err| ApiError::bad_request("bad_cursor", err.to_string()))?;
    let filter = TaskFilter {
        state: q.state,
        queue: q.queue,
        kind: q.kind,
        priority: q.priority,
    };
    let page = state.store.list(&filter, cursor, q.limit).await?;
    Ok(Json(serde_json::to_value(page).unwrap_or_default()))
}

/// `POST /v1/tasks/{id}/cancel`.
pub(super) async fn cancel(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let answer = state.store.cancel(std::slice::from_ref(&id)).await?;
    match answer.first().copied().unwrap_or(Cancel::Unknown) {
        Cancel::Cancelled => {
            fleet_common::telemetry::metrics::tasks_cancelled_waiting().increment(1);
            Ok(Json(json!({"id": id, "result": "cancelled"})))
        }
        Cancel::Cancelling => Ok(Json(json!({"id": id, "result": "cancelling"}))),
        Cancel::Ended(s) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_ended",
            format!("task `{id}` already ended: {s}"),
        )),
        Cancel::Unknown => Err(ApiError::not_found(format!("no task `{id}`"))),
    }
}

/// `POST /v1/tasks/{id}/redrive`: a failed task runs again with a fresh attempt budget.
pub(super) async fn redrive(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if state.store.redrive(std::slice::from_ref(&id)).await? == 1 {
        return Ok(Json(json!({"id": id, "result": "redriven"})));
    }
    match state.store.task(&id).await? {
        None => Err(ApiError::not_found(format!("no task `{id}`"))),
        Some(task) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_failed",
            format!(
                "task `{id}` is {}, only failed tasks are redriven",
                task.state.as_str()
            ),
        )),
    }
}

/// Body of `POST /v1/redrive`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RedriveBody {
    kind: Option<String>,
    queue: Option<String>,
}

/// `POST /v1/redrive` `{"kind"?, "queue"?}`: every failed task of a kind and/or queue.
pub(super) async fn redrive_failed(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body: RedriveBody = parse_body(&body?)?;
    let n = state
        .store
        .redrive_failed(body.kind.as_deref(), body.queue.as_deref())
        .await?;
    Ok(Json(json!({ "redriven": n })))
}

/// Body of `POST /v1/tasks/{id}/priority`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PriorityBody {
    priority: Priority,
}

/// `POST /v1/tasks/{id}/priority` `{"priority": "high"}`: only before the task started.
pub(super) async fn priority(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body: PriorityBody = parse_body(&body?)?;
    match state.store.set_priority(&id, body.priority).await? {
        Reprioritize::Moved => Ok(Json(json!({"id": id, "result": "moved"}))),
        Reprioritize::Unchanged => Ok(Json(json!({"id": id, "result": "unchanged"}))),
        Reprioritize::Started(s) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "started",
            format!("task `{id}` is {s}; only pending or scheduled tasks change priority"),
        )),
        Reprioritize::Unknown => Err(ApiError::not_found(format!("no task `{id}`"))),
    }
}

/// A small JSON body, with errors that name what was wrong.
pub(super) fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut json = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut json).map_err(|err| {
        // Name the field: serde's own text says only where in the body it went wrong.
        let path = err.path().to_string();
        let message = if path == "." {
            format!("body: {}", err.inner())
        } else {
            format!("body: `{path}`: {}", err.inner())
        };
        ApiError::bad_request("invalid_json", message)
    })
}
