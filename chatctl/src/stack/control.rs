//! `chatctl status` and `chatctl down`: acting on a stack another `chatctl up` runs, through
//! its lock and state file.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::Serialize;

use super::child::{Role, signal};
use super::layout::Layout;
use super::lock::{self, LockError, StateLock};
use super::secrets::Secret;
use super::state::{ShutdownReport, StackInfo};
use super::{StackError, io_error, orphans, probe};
use crate::procstat;

/// One child as seen by `status`.
#[derive(Debug, Clone, Serialize)]
pub struct ChildStatus {
    /// Its name.
    pub name: String,
    /// What it is.
    pub role: Role,
    /// Its pid when alive.
    pub pid: Option<u32>,
    /// Whether the recorded process is alive.
    pub alive: bool,
    /// Whether it answers (`/ready` for gateways, workers and HAProxy; `PING` for Redis; a
    /// TCP connect for PostgreSQL).
    pub ready: bool,
    /// Restarts after crashes.
    pub restarts: u32,
    /// Resident memory in bytes.
    pub rss_bytes: Option<u64>,
    /// How its last run ended, if it was restarted.
    pub last_exit: Option<String>,
}

/// The answer of `status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Whether a `chatctl up` holds the state directory.
    pub running: bool,
    /// The state file, when there is one.
    pub stack: Option<StackInfo>,
    /// Each child, probed now (empty when not running).
    pub children: Vec<ChildStatus>,
}

async fn probe_child(
    layout: &Layout,
    info: &StackInfo,
    child: &super::state::ChildInfo,
) -> ChildStatus {
    let alive = match (child.pid, child.start_time) {
        (Some(pid), Some(started)) => procstat::is_same_process(pid, started),
        _ => false,
    };
    let ready = match (child.role, child.port) {
        _ if !alive => false,
        (Role::Gateway | Role::Worker, Some(port)) => probe::http_ok(port, "/ready").await,
        (Role::Haproxy, _) => match info.stats_port {
            Some(port) => probe::http_ok(port, chatcluster_haproxy::READINESS_PATH).await,
            None => false,
        },
        (Role::Redis, Some(port)) => {
            let password = std::fs::read_to_string(layout.secrets().join("redis-password"))
                .unwrap_or_default();
            probe::redis_ping(port, &Secret::from(password.trim())).await
        }
        (Role::Postgres, Some(port)) => tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok(),
        _ => false,
    };
    ChildStatus {
        name: child.name.clone(),
        role: child.role,
        pid: child.pid.filter(|_| alive),
        alive,
        ready,
        restarts: child.restarts,
        rss_bytes: child.pid.filter(|_| alive).and_then(procstat::rss_bytes),
        last_exit: child.last_exit.clone(),
    }
}

/// Reads and probes the stack in `state_dir`.
pub async fn status(state_dir: &Path) -> Status {
    let layout = Layout::new(state_dir);
    let running = lock::is_held(&layout.lock());
    let stack = StackInfo::read(&layout.state_file()).ok();
    let mut children = Vec::new();
    if let (true, Some(info)) = (running, &stack) {
        for child in &info.children {
            children.push(probe_child(&layout, info, child).await);
        }
    }
    Status {
        running,
        stack,
        children,
    }
}

/// What `down` did.
#[derive(Debug, Clone)]
pub enum Down {
    /// The supervisor stopped the stack; its report.
    Stopped(Option<ShutdownReport>),
    /// No supervisor ran, but it had left these processes, now stopped.
    Leftovers(Vec<String>),
    /// Nothing was running.
    NothingRunning,
}

/// Asks the `chatctl up` of `state_dir` to stop (SIGTERM: the ordered shutdown) and waits up
/// to `timeout` for it to finish. Without a supervisor, stops processes one left behind.
pub async fn down(state_dir: &Path, timeout: Duration) -> Result<Down, StackError> {
    let layout = Layout::new(state_dir);
    if !lock::is_held(&layout.lock()) {
        // Hold the lock while cleaning, so a concurrent `up` does not start meanwhile.
        return match StateLock::acquire(&layout.lock()) {
            Ok(_held) => {
                let left = orphans::stop_leftovers(&layout.state_file()).await;
                Ok(if left.is_empty() {
                    Down::NothingRunning
                } else {
                    Down::Leftovers(left)
                })
            }
            Err(LockError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(Down::NothingRunning)
            }
            Err(LockError::Held(_)) => Err(StackError::Invalid(format!(
                "a chatctl up is just starting in {}; try again",
                state_dir.display()
            ))),
            Err(e) => Err(StackError::Lock(e)),
        };
    }
    let pid = std::fs::read_to_string(layout.lock())
        .map_err(io_error("read the lock file"))?
        .trim()
        .parse::<u32>()
        .map_err(|_| StackError::Invalid(format!("{} holds no pid", layout.lock().display())))?;
    signal(pid, Signal::SIGTERM);
    let deadline = Instant::now() + timeout;
    while lock::is_held(&layout.lock()) {
        if Instant::now() >= deadline {
            return Err(StackError::Invalid(format!(
                "the stack in {} is still stopping after {timeout:?} (chatctl pid {pid}); see its log directory",
                state_dir.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = StackInfo::read(&layout.state_file())
        .ok()
        .and_then(|i| i.shutdown);
    Ok(Down::Stopped(report))
}
