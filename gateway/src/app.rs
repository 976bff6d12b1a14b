//! The HTTP routes of a gateway: the public router (WebSocket, API, page,
//! probes) and the admin router (probes and metrics only).
//!
//! `/metrics` is served on `ADMIN_ADDR` only: the public socket is what the
//! client Service and HAProxy expose, and metrics are not for clients.
//! `/health` (HAProxy's check on the socket) and `/ready` are on both.

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::api;
use crate::connection;
use crate::state::Gateway;

/// The web chat page, embedded at build time.
const INDEX_HTML: &str = include_str!("../assets/index.html");

/// Every public route.
pub fn app(gateway: Arc<Gateway>) -> Router {
    let body_limit = gateway.config.max_frame_bytes;
    Router::new()
        .route("/", get(index))
        .route("/ws", get(connection::upgrade))
        .route("/api/channels", get(api::list_channels))
        .route(
            "/api/channels/{channel}/messages",
            get(api::channel_messages).post(api::post_message),
        )
        .merge(probes())
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(gateway)
}

/// Only `/health`, `/ready` and `/metrics`, for `ADMIN_ADDR`.
pub fn admin_app(gateway: Arc<Gateway>) -> Router {
    probes()
        .route("/metrics", get(metrics))
        .fallback(api::not_found)
        .with_state(gateway)
}

fn probes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

/// Liveness: the process serves HTTP.
async fn health() -> &'static str {
    "ok"
}

/// Readiness: Redis reachable and connections accepted.
async fn ready(State(gateway): State<Arc<Gateway>>) -> Response {
    if gateway.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else if gateway.draining.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "redis unavailable").into_response()
    }
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        gateway.metrics.render(),
    )
        .into_response()
}
