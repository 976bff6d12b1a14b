//! `stack.json`: what a running `chatctl up` is made of, for `status`, `down`, the
//! benchmarks and the tests. Written atomically (temp file + rename) at every change.
//!
//! It holds no secrets: URLs are printed without passwords.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::child::{Role, StopOutcome};

/// The lifecycle of a stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Children are being started.
    Starting,
    /// Everything is up and supervised.
    Running,
    /// The ordered shutdown is under way.
    Stopping,
    /// Everything has stopped.
    Stopped,
    /// Start failed; what was started has been stopped.
    Failed,
}

/// One child as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildInfo {
    /// Its name (`gateway-0`, `redis`, ...).
    pub name: String,
    /// What it is.
    pub role: Role,
    /// The current process, when running.
    pub pid: Option<u32>,
    /// Its start time (see [`crate::procstat::start_time`]), to recognise it later.
    pub start_time: Option<u64>,
    /// How often it was restarted after a crash.
    pub restarts: u32,
    /// How its last run ended, when it was restarted.
    pub last_exit: Option<String>,
    /// Its admin or service port on 127.0.0.1.
    pub port: Option<u16>,
    /// Its Unix socket (gateways).
    pub socket: Option<PathBuf>,
    /// Its log file.
    pub log: PathBuf,
}

/// How the last shutdown went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownReport {
    /// One line per child, in stop order.
    pub children: Vec<StopOutcome>,
    /// Whether PostgreSQL's log shows "database system is shut down".
    pub postgres_clean: Option<bool>,
}

impl ShutdownReport {
    /// Whether every child exited by itself and PostgreSQL logged a normal shutdown.
    pub fn clean(&self) -> bool {
        self.children.iter().all(|c| c.clean) && self.postgres_clean != Some(false)
    }
}

/// The whole state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackInfo {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The supervising `chatctl up` process.
    pub supervisor_pid: u32,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// Where the stack is in its life.
    pub phase: Phase,
    /// `none` or `jwt`.
    pub auth: String,
    /// HAProxy's WebSocket and page port on 127.0.0.1.
    pub port: Option<u16>,
    /// HAProxy's stats and metrics port.
    pub stats_port: Option<u16>,
    /// The web chat page (through HAProxy).
    pub page_url: Option<String>,
    /// The WebSocket endpoint (through HAProxy).
    pub ws_url: Option<String>,
    /// HAProxy's stats page.
    pub stats_url: Option<String>,
    /// HAProxy's Prometheus exporter.
    pub metrics_url: Option<String>,
    /// Redis on 127.0.0.1 (password in `secrets/redis-password`).
    pub redis_port: u16,
    /// PostgreSQL on 127.0.0.1 (user `chatcluster`, password in `secrets/postgres-password`).
    pub postgres_port: Option<u16>,
    /// This run's log directory.
    pub log_dir: PathBuf,
    /// Every child.
    pub children: Vec<ChildInfo>,
    /// Filled in when stopped.
    pub shutdown: Option<ShutdownReport>,
}

impl StackInfo {
    /// Writes the state file atomically.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }

    /// Reads a state file.
    pub fn read(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read(path)?;
        serde_json::from_slice(&text).map_err(std::io::Error::other)
    }

    /// The children of a role.
    pub fn of_role(&self, role: Role) -> impl Iterator<Item = &ChildInfo> {
        self.children.iter().filter(move |c| c.role == role)
    }

    /// `(name, pid)` of every running server process.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .filter_map(|c| Some((c.name.clone(), c.pid?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let info = StackInfo {
            state_dir: dir.path().to_owned(),
            supervisor_pid: 1,
            started_at: "2026-01-01T00:00:00Z".into(),
            phase: Phase::Running,
            auth: "none".into(),
            port: Some(8080),
            stats_port: Some(8404),
            page_url: Some("http://127.0.0.1:8080/".into()),
            ws_url: None,
            stats_url: None,
            metrics_url: None,
            redis_port: 6390,
            postgres_port: Some(5440),
            log_dir: dir.path().join("logs"),
            children: vec![ChildInfo {
                name: "gateway-0".into(),
                role: Role::Gateway,
                pid: Some(42),
                start_time: Some(7),
                restarts: 1,
                last_exit: Some("killed by SIGKILL".into()),
                port: Some(9100),
                socket: Some(dir.path().join("run/gateway-0.sock")),
                log: dir.path().join("logs/gateway-0.log"),
            }],
            shutdown: None,
        };
        let path = dir.path().join("stack.json");
        info.write(&path).expect("write");
        assert_eq!(StackInfo::read(&path).expect("read"), info);
        assert_eq!(info.pids(), vec![("gateway-0".to_owned(), 42)]);
        let text = std::fs::read_to_string(&path).expect("text");
        assert!(text.contains("\"role\": \"gateway\""), "{text}");
    }
}
