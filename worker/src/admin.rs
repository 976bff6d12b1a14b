//! The admin HTTP server: liveness, readiness and Prometheus metrics.
//!
//! `/ready` answers from [`Health`], which the worker's probes and its own
//! reads and writes keep current, so a probe never waits on a dead backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;

/// What readiness depends on; cheap to share and update.
#[derive(Debug, Default)]
pub struct Health {
    redis: AtomicBool,
    postgres: AtomicBool,
    migrated: AtomicBool,
}

/// A snapshot of [`Health`], the body of `/ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Readiness {
    /// Whether every check holds.
    pub ready: bool,
    /// Redis answered last time it was asked.
    pub redis: bool,
    /// PostgreSQL answered last time it was asked.
    pub postgres: bool,
    /// The schema migrations ran.
    pub migrations: bool,
}

impl Health {
    /// Records whether Redis answered.
    pub fn set_redis(&self, up: bool) {
        self.redis.store(up, Ordering::Relaxed);
    }

    /// Records whether PostgreSQL answered.
    pub fn set_postgres(&self, up: bool) {
        self.postgres.store(up, Ordering::Relaxed);
    }

    /// Records whether `backend` answered.
    pub fn set(&self, backend: crate::retry::Backend, up: bool) {
        match backend {
            crate::retry::Backend::Redis => self.set_redis(up),
            crate::retry::Backend::Postgres => self.set_postgres(up),
        }
    }

    /// Records that the migrations ran.
    pub fn set_migrated(&self) {
        self.migrated.store(true, Ordering::Relaxed);
    }

    /// The current state.
    pub fn readiness(&self) -> Readiness {
        let (redis, postgres, migrations) = (
            self.redis.load(Ordering::Relaxed),
            self.postgres.load(Ordering::Relaxed),
            self.migrated.load(Ordering::Relaxed),
        );
        Readiness {
            ready: redis && postgres && migrations,
            redis,
            postgres,
            migrations,
        }
    }
}

/// State of the admin routes.
#[derive(Clone)]
pub struct AdminState {
    /// Readiness inputs.
    pub health: Arc<Health>,
    /// Metrics to expose.
    pub registry: Arc<Registry>,
}

/// The admin router: `GET /health`, `GET /ready`, `GET /metrics`.
pub fn app(state: AdminState) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn ready(State(state): State<AdminState>) -> Response {
    let readiness = state.health.readiness();
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(readiness)).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_everything_holds() {
        let health = Health::default();
        assert!(!health.readiness().ready);
        health.set_redis(true);
        health.set_postgres(true);
        assert!(!health.readiness().ready, "migrations not run yet");
        health.set_migrated();
        assert!(health.readiness().ready);
        health.set_postgres(false);
        let r = health.readiness();
        assert!(!r.ready && r.redis && !r.postgres && r.migrations);
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"ready":false,"redis":true,"postgres":false,"migrations":true}"#
        );
    }
}
