//! Process lifecycle: build the shared state, listen (Unix socket or TCP, plus
//! the admin address), run background tasks, and shut down gracefully.
//!
//! Shutdown: readiness fails and the listener closes at once (HAProxy's health
//! check sees the socket gone and sends new clients to other processes), open
//! connections get up to `DRAIN_TIMEOUT` to leave on their own, then the rest
//! are closed with 1001 so clients reconnect elsewhere and recover by offset.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::app;
use crate::config::Config;
use crate::history::HistoryError;
use crate::state::Gateway;
use crate::store::StoreError;

/// How often Redis is pinged for readiness.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// How long closing connections may take after the drain.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Invalid flag combination.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Invalid Redis URL.
    #[error("invalid REDIS_URL: {0}")]
    RedisUrl(#[source] redis::RedisError),
    /// Redis client setup failed.
    #[error("redis setup: {0}")]
    Store(#[from] StoreError),
    /// Invalid DATABASE_URL.
    #[error("invalid DATABASE_URL: {0}")]
    Database(#[from] HistoryError),
    /// A listener could not be set up.
    #[error("cannot listen on {what}: {source}")]
    Listen {
        /// Which address or path.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn listen_error(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.to_string();
    move |source| ServeError::Listen { what, source }
}

/// Removes the socket file when dropped.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds a Unix socket with mode 0660, replacing a stale socket file.
fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), ServeError> {
    let error = listen_error(path.display());
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            tracing::info!(path = %path.display(), "removing stale socket file");
            std::fs::remove_file(path).map_err(listen_error(path.display()))?;
        }
        Ok(_) => {
            return Err(error(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "path exists and is not a socket; refusing to remove it",
            )));
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(listen_error(path.display()))?;
    let guard = SocketFile(path.to_owned());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(listen_error(path.display()))?;
    Ok((listener, guard))
}

/// Builds the gateway state and starts its background tasks.
fn build(config: Config, background: &CancellationToken) -> Result<Arc<Gateway>, ServeError> {
    let gateway = Gateway::start(config, background)?;
    tokio::spawn(health_loop(gateway.clone(), background.clone()));
    tokio::spawn(crate::presence::run(gateway.clone(), background.clone()));
    Ok(gateway)
}

async fn health_loop(gateway: Arc<Gateway>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(HEALTH_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {
                let up = gateway.store.ping().await.is_ok();
                if !up {
                    gateway.metrics.redis_errors_total.inc();
                }
                gateway.set_redis_up(up);
            }
        }
    }
}

/// Runs a gateway until `shutdown` resolves, then drains and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let background = CancellationToken::new();
    let gateway = build(config, &background)?;
    let config = &gateway.config;
    let stop_accepting = CancellationToken::new();

    let mut socket_file = None;
    let public = app::app(gateway.clone());
    let server = if let Some(path) = &config.socket_path {
        let (listener, guard) = bind_unix(path)?;
        socket_file = Some(guard);
        tracing::info!(path = %path.display(), instance = %gateway.instance, "listening on unix socket");
        let stop = stop_accepting.clone();
        tokio::spawn(async move {
            axum::serve(listener, public)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        })
    } else {
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .map_err(listen_error(config.listen_addr))?;
        tracing::info!(addr = %config.listen_addr, instance = %gateway.instance, "listening on tcp");
        let stop = stop_accepting.clone();
        tokio::spawn(async move {
            axum::serve(listener, public)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        })
    };
    let admin = match config.admin_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.map_err(listen_error(addr))?;
            tracing::info!(%addr, "admin endpoints listening");
            let stop = background.clone();
            let admin = app::admin_app(gateway.clone());
            Some(tokio::spawn(async move {
                axum::serve(listener, admin)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
            }))
        }
        None => None,
    };

    shutdown.await;
    tracing::info!(drain = ?config.drain_timeout, "shutting down: draining connections");
    gateway.draining.cancel();
    stop_accepting.cancel();
    drop(socket_file.take());
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, server).await;

    let drained = tokio::time::timeout(config.drain_timeout, wait_for_no_connections(&gateway))
        .await
        .is_ok();
    if !drained {
        tracing::info!(
            open = gateway.metrics.connections.get(),
            "drain period over: closing connections with 1001"
        );
    }
    gateway.closing.cancel();
    gateway.connections.close();
    if tokio::time::timeout(CLOSE_TIMEOUT, gateway.connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not close in time");
    }
    background.cancel();
    if let Some(admin) = admin {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, admin).await;
    }
    tracing::info!("gateway stopped");
    Ok(())
}

async fn wait_for_no_connections(gateway: &Gateway) {
    while gateway.metrics.connections.get() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
