//! The one shutdown future of every long-running command: Ctrl-C, SIGTERM or SIGHUP.

use tokio::signal::unix::{SignalKind, signal};

/// Completes on the first Ctrl-C (SIGINT), SIGTERM or SIGHUP.
pub async fn requested() {
    let mut streams = Vec::new();
    for kind in [
        SignalKind::interrupt(),
        SignalKind::terminate(),
        SignalKind::hangup(),
    ] {
        match signal(kind) {
            Ok(stream) => streams.push(stream),
            Err(e) => tracing::warn!(error = %e, "cannot listen for a signal"),
        }
    }
    if streams.is_empty() {
        return std::future::pending().await;
    }
    let waits = streams.iter_mut().map(|s| Box::pin(s.recv()));
    futures_util::future::select_all(waits).await;
}
