//! Keeps one child running: restarts it with exponential backoff whenever it exits on its
//! own, until the supervisor asks it to stop.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};

use super::child::{self, ChildSpec, StopOutcome};
use crate::procstat;

/// First restart delay; doubles per crash up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest restart delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A child that ran this long before crashing starts again from [`FIRST_BACKOFF`].
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

/// A started child with its spec and log.
#[derive(Debug)]
pub struct Running {
    /// How to run it.
    pub spec: ChildSpec,
    /// The process.
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
}

/// What a keeper reports to the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeeperEvent {
    /// The child exited unexpectedly; a restart follows after `delay`.
    Exited {
        /// Index of the child in the stack.
        index: usize,
        /// How it ended.
        status: String,
        /// Backoff before the restart.
        delay: Duration,
    },
    /// The child runs again.
    Restarted {
        /// Index of the child.
        index: usize,
        /// New pid.
        pid: u32,
        /// Its start time.
        start_time: Option<u64>,
    },
    /// Spawning failed; another attempt follows.
    SpawnFailed {
        /// Index of the child.
        index: usize,
        /// Why.
        error: String,
    },
}

/// Exponential backoff between restarts.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: FIRST_BACKOFF,
        }
    }
}

impl Backoff {
    /// The delay to wait now; doubles the next one.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        delay
    }

    /// Back to the first delay.
    pub fn reset(&mut self) {
        self.next = FIRST_BACKOFF;
    }
}

fn note_in_log(running: &Running, text: &str) {
    if let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(&running.log) {
        let _ = writeln!(
            file,
            "--- chatctl {}: {text}",
            chrono::Local::now().format("%H:%M:%S%.3f")
        );
    }
}

/// Runs until `stop` fires (or its sender is dropped), then stops the child as its spec says.
pub async fn keep(
    mut running: Running,
    index: usize,
    mut stop: oneshot::Receiver<()>,
    events: mpsc::Sender<KeeperEvent>,
) -> StopOutcome {
    let mut backoff = Backoff::default();
    let mut started = Instant::now();
    loop {
        let status = tokio::select! {
            _ = &mut stop => return child::stop(&mut running.child, &running.spec).await,
            status = running.child.wait() => status,
        };
        let status = status.map_or_else(|e| format!("cannot wait: {e}"), child::describe);
        if started.elapsed() >= STABLE_AFTER {
            backoff.reset();
        }
        // Keep respawning until it runs or we are told to stop.
        loop {
            let delay = backoff.next_delay();
            tracing::warn!(child = %running.spec.name, %status, ?delay, "exited unexpectedly; restarting");
            note_in_log(
                &running,
                &format!("exited ({status}); restarting in {delay:?}"),
            );
            let _ = events.try_send(KeeperEvent::Exited {
                index,
                status: status.clone(),
                delay,
            });
            tokio::select! {
                _ = &mut stop => {
                    return StopOutcome {
                        name: running.spec.name.clone(),
                        clean: true,
                        detail: format!("was not running ({status}); not restarted"),
                    };
                }
                () = tokio::time::sleep(delay) => {}
            }
            match child::spawn(&running.spec, &running.log) {
                Ok(child) => {
                    running.child = child;
                    break;
                }
                Err(e) => {
                    tracing::error!(child = %running.spec.name, error = %e, "cannot restart");
                    let _ = events.try_send(KeeperEvent::SpawnFailed {
                        index,
                        error: e.to_string(),
                    });
                }
            }
        }
        started = Instant::now();
        let pid = running.child.id().unwrap_or(0);
        tracing::info!(child = %running.spec.name, pid, "restarted");
        note_in_log(&running, &format!("restarted as pid {pid}"));
        let _ = events.try_send(KeeperEvent::Restarted {
            index,
            pid,
            start_time: procstat::start_time(pid),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::child::{Readiness, Role, StopRequest};
    use nix::sys::signal::Signal;

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut backoff = Backoff::default();
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
        assert_eq!(delays[0], FIRST_BACKOFF);
        assert_eq!(delays[1], FIRST_BACKOFF * 2);
        assert_eq!(delays[9], MAX_BACKOFF);
        backoff.reset();
        assert_eq!(backoff.next_delay(), FIRST_BACKOFF);
    }

    #[tokio::test]
    async fn a_killed_child_is_restarted_then_stopped_on_request() {
        let dir = tempfile::tempdir().expect("dir");
        let spec = ChildSpec {
            name: "sleeper".into(),
            role: Role::Worker,
            program: "/bin/sleep".into(),
            args: vec!["30".into()],
            env: Vec::new(),
            run_as: None,
            ready: Readiness::Http { port: 1, path: "/" },
            start_timeout: Duration::from_secs(1),
            stop: StopRequest::Signal(Signal::SIGTERM),
            stop_timeout: Duration::from_secs(5),
        };
        let log = dir.path().join("sleeper.log");
        let child = child::spawn(&spec, &log).expect("spawn");
        let first = child.id().expect("pid");
        let (stop_tx, stop_rx) = oneshot::channel();
        let (events_tx, mut events) = mpsc::channel(8);
        let keeper = tokio::spawn(keep(
            Running {
                spec,
                child,
                log: log.clone(),
            },
            3,
            stop_rx,
            events_tx,
        ));
        child::signal(first, Signal::SIGKILL);
        let exited = events.recv().await.expect("exit event");
        assert!(
            matches!(exited, KeeperEvent::Exited { index: 3, ref status, .. } if status == "killed by SIGKILL")
        );
        let KeeperEvent::Restarted { pid, .. } = events.recv().await.expect("restart event") else {
            panic!("expected a restart");
        };
        assert_ne!(pid, first);
        stop_tx.send(()).expect("stop");
        let outcome = keeper.await.expect("keeper");
        assert!(
            outcome.detail.starts_with("killed by SIGTERM"),
            "{outcome:?}"
        );
        let text = std::fs::read_to_string(&log).expect("log");
        assert!(text.contains("restarted as pid"), "{text}");
    }
}
