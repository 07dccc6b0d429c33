//! The scheduler's HTTP API (`/v1/…`), its OpenAPI document and the web dashboard, served on
//! the same listener as `/healthz`, `/readyz` and `/metrics`.
//!
//! Every `/v1` route but the OpenAPI document needs `Authorization: Bearer <token>` (tokens
//! from `http.tokens` / `http.token_files`); only `http.insecure_no_auth = true` turns that off.
//! Bad input gets a 4xx with a JSON body `{"error": {"code", "message"}}`.

mod auth;
mod error;
mod fleet;
pub mod group;
mod limits;
mod queues;
mod schedules;
mod tasks;
mod workflows;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::Method;
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};
use fleet_common::ops::{self, Readiness};
use fleet_common::settings::Secret;
use fleet_common::store::Store;

use crate::publish::Publisher;
use crate::settings::SchedulerSettings;

pub use error::ApiError;

/// The checked-in OpenAPI document, served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// The dashboard: one HTML page with its script, served at `/`.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Every API route, as documented in [`OPENAPI`] (a test keeps the two in step).
pub const ROUTES: &[(Method, &str)] = &[
    (Method::POST, "/v1/tasks"),
    (Method::GET, "/v1/tasks"),
    (Method::GET, "/v1/tasks/{id}"),
    (Method::POST, "/v1/tasks/{id}/cancel"),
    (Method::POST, "/v1/tasks/{id}/redrive"),
    (Method::POST, "/v1/tasks/{id}/priority"),
    (Method::POST, "/v1/redrive"),
    (Method::POST, "/v1/pause"),
    (Method::POST, "/v1/resume"),
    (Method::GET, "/v1/stats"),
    (Method::GET, "/v1/workers"),
    (Method::GET, "/v1/queues"),
    (Method::GET, "/v1/queues/{name}"),
    (Method::PUT, "/v1/queues/{name}"),
    (Method::DELETE, "/v1/queues/{name}"),
    (Method::GET, "/v1/limits"),
    (Method::PUT, "/v1/limits/{scope}/{name}"),
    (Method::DELETE, "/v1/limits/{scope}/{name}"),
    (Method::GET, "/v1/schedules"),
    (Method::GET, "/v1/schedules/{name}"),
    (Method::PUT, "/v1/schedules/{name}"),
    (Method::DELETE, "/v1/schedules/{name}"),
    (Method::POST, "/v1/schedules/{name}/pause"),
    (Method::POST, "/v1/schedules/{name}/resume"),
    (Method::POST, "/v1/schedules/{name}/run"),
    (Method::GET, "/v1/workflows"),
    (Method::GET, "/v1/workflows/{id}"),
    (Method::POST, "/v1/workflows/{id}/cancel"),
    (Method::GET, "/v1/series"),
    (Method::GET, "/v1/openapi.json"),
    (Method::GET, "/healthz"),
    (Method::GET, "/readyz"),
    (Method::GET, "/metrics"),
    (Method::GET, "/"),
];

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub settings: Arc<SchedulerSettings>,
    pub store: Store,
    pub publisher: Publisher,
    pub tokens: Arc<Vec<Secret>>,
    /// Submissions go through group commit (see `group.rs`).
    pub submissions: group::SubmitGroup,
    /// Each queue's scheduling settings.
    pub queues: crate::queues::Queues,
}

/// The whole HTTP surface of the scheduler.
pub fn router(state: ApiState, readiness: Readiness) -> Router {
    let limit = state.settings.http.max_body_bytes;
    let api = Router::new()
        .route("/v1/tasks", post(tasks::submit).get(tasks::list))
        .route("/v1/tasks/{id}", get(tasks::get))
        .route("/v1/tasks/{id}/cancel", post(tasks::cancel))
        .route("/v1/tasks/{id}/redrive", post(tasks::redrive))
        .route("/v1/tasks/{id}/priority", post(tasks::priority))
        .route("/v1/redrive", post(tasks::redrive_failed))
        .route("/v1/pause", post(fleet::pause))
        .route("/v1/resume", post(fleet::resume))
        .route("/v1/stats", get(fleet::stats))
        .route("/v1/workers", get(fleet::workers))
        .route("/v1/queues", get(queues::list))
        .route(
            "/v1/queues/{name}",
            get(queues::get).put(queues::put).delete(queues::delete),
        )
        .route("/v1/limits", get(limits::list))
        .route(
            "/v1/limits/{scope}/{name}",
            axum::routing::put(limits::put).delete(limits::delete),
        )
        .route("/v1/schedules", get(schedules::list))
        .route(
            "/v1/schedules/{name}",
            get(schedules::get)
                .put(schedules::put)
                .delete(schedules::delete),
        )
        .route("/v1/schedules/{name}/pause", post(schedules::pause))
        .route("/v1/schedules/{name}/resume", post(schedules::resume))
        .route("/v1/schedules/{name}/run", post(schedules::run))
        .route("/v1/workflows", get(workflows::list))
        .route("/v1/workflows/{id}", get(workflows::get))
        .route("/v1/workflows/{id}/cancel", post(workflows::cancel))
        .route("/v1/series", get(fleet::series))
        // Before the token layer: layered routes no longer take a fallback.
        .method_not_allowed_fallback(error::method_not_allowed)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .route("/v1/openapi.json", get(openapi))
        .layer(DefaultBodyLimit::max(limit))
        .fallback(error::not_found)
        .with_state(state);
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .merge(api)
        .merge(ops::router(readiness))
        .method_not_allowed_fallback(error::method_not_allowed)
}

async fn openapi() -> impl IntoResponse {
    ([("content-type", "application/json")], OPENAPI)
}
