//! One child process of the stack: how to start it, how to tell it is ready, how to stop it.
//!
//! Children run in their own process group, so the Ctrl-C a terminal sends to chatctl's
//! group does not reach them: only the supervisor decides when and in what order they stop.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use super::probe;
use super::secrets::Secret;

/// What a child is; decides when it stops during shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `redis-server`.
    Redis,
    /// The PostgreSQL postmaster.
    Postgres,
    /// A `chatcluster-worker`.
    Worker,
    /// A `chatcluster-gateway`.
    Gateway,
    /// HAProxy in front of the gateways.
    Haproxy,
}

impl Role {
    /// Shutdown phase: HAProxy and gateways drain first, then workers finish their batches,
    /// then Redis and PostgreSQL stop.
    pub fn stop_phase(self) -> usize {
        match self {
            Role::Haproxy | Role::Gateway => 0,
            Role::Worker => 1,
            Role::Redis | Role::Postgres => 2,
        }
    }
}

/// A user and group to run a child as (PostgreSQL refuses to run as root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// How to tell that a child serves.
#[derive(Debug, Clone)]
pub enum Readiness {
    /// `GET path` on `127.0.0.1:port` answers 200.
    Http {
        /// The port.
        port: u16,
        /// The path.
        path: &'static str,
    },
    /// Redis answers `PING`.
    Redis {
        /// The port.
        port: u16,
        /// `requirepass`.
        password: Secret,
    },
    /// `pg_isready` succeeds.
    Postgres {
        /// The `pg_isready` program.
        pg_isready: PathBuf,
        /// The port.
        port: u16,
    },
}

impl Readiness {
    /// One probe.
    pub async fn check(&self) -> bool {
        match self {
            Readiness::Http { port, path } => probe::http_ok(*port, path).await,
            Readiness::Redis { port, password } => probe::redis_ping(*port, password).await,
            Readiness::Postgres { pg_isready, port } => probe::pg_isready(pg_isready, *port).await,
        }
    }
}

/// How to ask a child to stop.
#[derive(Debug, Clone)]
pub enum StopRequest {
    /// Send this signal.
    Signal(Signal),
    /// Send Redis `SHUTDOWN` (falls back to SIGTERM if that cannot be sent).
    RedisShutdown {
        /// The port.
        port: u16,
        /// `requirepass`.
        password: Secret,
    },
}

/// Everything needed to run one child.
#[derive(Clone)]
pub struct ChildSpec {
    /// Unique name, also the log file's name: `gateway-0`, `redis`, ...
    pub name: String,
    /// What it is.
    pub role: Role,
    /// The program.
    pub program: PathBuf,
    /// Its arguments (never secrets: any local user can read them).
    pub args: Vec<OsString>,
    /// Extra environment (secrets go here).
    pub env: Vec<(String, String)>,
    /// Run as this user instead of chatctl's.
    pub run_as: Option<RunAs>,
    /// How to tell it serves.
    pub ready: Readiness,
    /// Longest wait for readiness at start.
    pub start_timeout: Duration,
    /// How to ask it to stop.
    pub stop: StopRequest,
    /// Longest wait after the stop request before SIGKILL.
    pub stop_timeout: Duration,
}

impl fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Environment values may be secrets: show only the names.
        let env: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("program", &self.program)
            .field("args", &self.args)
            .field("env", &env)
            .finish_non_exhaustive()
    }
}

/// A child that did not come up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// It could not be spawned.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited before it was ready.
    #[error("exited during start ({status})")]
    Exited {
        /// How it ended.
        status: String,
    },
    /// It did not become ready in time.
    #[error("not ready after {0:?}")]
    Timeout(Duration),
}

/// Starts `spec` with stdout and stderr appended to `log`.
pub fn spawn(spec: &ChildSpec, log: &Path) -> Result<Child, StartError> {
    let spawn_error = |source| StartError::Spawn {
        program: spec.program.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(spawn_error)?;
    let err = file.try_clone().map_err(spawn_error)?;
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(false);
    if let Some(run_as) = spec.run_as {
        // std drops root's supplementary groups before switching user.
        command.uid(run_as.uid).gid(run_as.gid);
    }
    command.spawn().map_err(spawn_error)
}

/// Waits until `spec.ready` holds, failing early when the child exits.
pub async fn wait_ready(child: &mut Child, spec: &ChildSpec) -> Result<(), StartError> {
    let deadline = Instant::now() + spec.start_timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(StartError::Exited {
                status: describe(status),
            });
        }
        if spec.ready.check().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(StartError::Timeout(spec.start_timeout));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How a child ended when asked to stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopOutcome {
    /// The child.
    pub name: String,
    /// Whether it exited by itself with status 0 after the request.
    pub clean: bool,
    /// What happened, for people.
    pub detail: String,
}

/// Sends `signal` to `pid`; an already-gone process is not an error.
pub fn signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// Asks `child` to stop as `spec` says, waits up to `spec.stop_timeout`, then kills it.
pub async fn stop(child: &mut Child, spec: &ChildSpec) -> StopOutcome {
    let outcome = |clean, detail: String| StopOutcome {
        name: spec.name.clone(),
        clean,
        detail,
    };
    if let Ok(Some(status)) = child.try_wait() {
        return outcome(false, format!("had already exited ({})", describe(status)));
    }
    let pid = child.id().unwrap_or(0);
    match &spec.stop {
        StopRequest::Signal(sig) => signal(pid, *sig),
        StopRequest::RedisShutdown { port, password } => {
            if !probe::redis_shutdown(*port, password).await {
                signal(pid, Signal::SIGTERM);
            }
        }
    }
    let started = Instant::now();
    match tokio::time::timeout(spec.stop_timeout, child.wait()).await {
        Ok(Ok(status)) => outcome(
            status.success(),
            format!(
                "{} after {:.1}s",
                describe(status),
                started.elapsed().as_secs_f64()
            ),
        ),
        Ok(Err(e)) => outcome(false, format!("cannot wait: {e}")),
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            outcome(
                false,
                format!("did not stop within {:?}; killed", spec.stop_timeout),
            )
        }
    }
}

/// `exit 0`, `exit 3`, `killed by SIGKILL`.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(sig) => format!("killed by {}", sig.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => "ended".to_owned(),
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(program: &str, args: &[&str], ready_port: u16) -> ChildSpec {
        ChildSpec {
            name: "t".into(),
            role: Role::Worker,
            program: program.into(),
            args: args.iter().map(OsString::from).collect(),
            env: vec![("SECRET".into(), "hunter2".into())],
            run_as: None,
            ready: Readiness::Http {
                port: ready_port,
                path: "/",
            },
            start_timeout: Duration::from_secs(2),
            stop: StopRequest::Signal(Signal::SIGTERM),
            stop_timeout: Duration::from_secs(2),
        }
    }

    #[test]
    fn debug_hides_environment_values() {
        let text = format!("{:?}", spec("/bin/true", &[], 1));
        assert!(
            text.contains("SECRET") && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_child_that_exits_during_start_is_reported_with_its_status() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("t.log");
        let s = spec("/bin/sh", &["-c", "echo boom; exit 3"], 1);
        let mut child = spawn(&s, &log).expect("spawn");
        let err = wait_ready(&mut child, &s).await.expect_err("exits");
        assert_eq!(err.to_string(), "exited during start (exit 3)");
        assert_eq!(log_tail(&log, 5), "boom");
    }

    #[tokio::test]
    async fn stop_escalates_to_kill() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = spec("/bin/sh", &["-c", "trap '' TERM; sleep 30"], 1);
        s.stop_timeout = Duration::from_millis(300);
        let mut child = spawn(&s, &dir.path().join("t.log")).expect("spawn");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let outcome = stop(&mut child, &s).await;
        assert!(!outcome.clean);
        assert!(outcome.detail.contains("killed"), "{outcome:?}");
        let mut polite = spec("/bin/sleep", &["30"], 1);
        polite.stop_timeout = Duration::from_secs(5);
        let mut child = spawn(&polite, &dir.path().join("p.log")).expect("spawn");
        let outcome = stop(&mut child, &polite).await;
        assert_eq!(
            outcome.detail.split(" after").next(),
            Some("killed by SIGTERM")
        );
    }
}
