//! Process lifecycle: build the shared state, listen (Unix socket or TCP, plus
//! the admin address), run background tasks, and shut down gracefully.
//!
//! HTTP is served by hyper directly (HTTP/1.1 with upgrades), so an upgraded
//! WebSocket hands back the very Unix or TCP stream it arrived on and the
//! connection writes to it without any wrapper in between.
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

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::app;
use crate::config::Config;
use crate::state::{Gateway, StartError};

/// How often Redis is pinged for readiness.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// How long closing connections may take after the drain.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (such as running out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The shared state could not be built.
    #[error(transparent)]
    Start(#[from] StartError),
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

/// A listening socket of either kind.
enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// Serves `router` on `listener` until `stop`: each connection is HTTP/1.1
/// with upgrades; a connection still open at `stop` finishes its request.
async fn serve(listener: Listener, router: Router, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = accept(&listener) => accepted,
        };
        match accepted {
            Ok(Accepted::Unix(stream)) => spawn_http(TokioIo::new(stream), &router, &stop),
            Ok(Accepted::Tcp(stream)) => spawn_http(TokioIo::new(stream), &router, &stop),
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    Ok(match listener {
        Listener::Unix(listener) => Accepted::Unix(listener.accept().await?.0),
        Listener::Tcp(listener) => {
            let (stream, _) = listener.accept().await?;
            // Chat frames are small and latency-bound.
            stream.set_nodelay(true)?;
            Accepted::Tcp(stream)
        }
    })
}

fn spawn_http<I>(io: TokioIo<I>, router: &Router, stop: &CancellationToken)
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let service = TowerToHyperService::new(router.clone());
    let stop = stop.clone();
    tokio::spawn(async move {
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(io, service)
            .with_upgrades();
        tokio::pin!(connection);
        tokio::select! {
            _ = connection.as_mut() => {}
            () = stop.cancelled() => {
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection).await;
            }
        }
    });
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
                } else if !gateway.is_redis_up() {
                    // Reachable again (or for the first time): names registered
                    // before the sorted indexes existed are indexed.
                    tokio::spawn({
                        let gateway = gateway.clone();
                        async move { gateway.index_registries().await }
                    });
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
    let listener = if let Some(path) = &config.socket_path {
        let (listener, guard) = bind_unix(path)?;
        socket_file = Some(guard);
        tracing::info!(path = %path.display(), instance = %gateway.instance, "listening on unix socket");
        Listener::Unix(listener)
    } else {
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .map_err(listen_error(config.listen_addr))?;
        tracing::info!(addr = %config.listen_addr, instance = %gateway.instance, "listening on tcp");
        Listener::Tcp(listener)
    };
    let server = tokio::spawn(serve(
        listener,
        app::app(gateway.clone()),
        stop_accepting.clone(),
    ));
    let admin = match config.admin_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.map_err(listen_error(addr))?;
            tracing::info!(%addr, "admin endpoints listening");
            Some(tokio::spawn(serve(
                Listener::Tcp(listener),
                app::admin_app(gateway.clone()),
                background.clone(),
            )))
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
