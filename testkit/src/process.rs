//! Child processes owned by a test: killed and reaped when their handle drops.
//!
//! One helper for every process a test starts (servers and the project's own
//! binaries): where its output goes, its exit status, signals, and a readiness
//! check that proves the process listening on a port is *this* child, so two
//! tests that drew the same "free" port never talk to each other's server.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Where a child's stdout and stderr go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Discarded, or shown when `TESTKIT_VERBOSE` is set.
    Discard,
    /// The test's own stdout/stderr.
    Inherit,
    /// Appended to a log file kept with the handle (see [`Guarded::output`]);
    /// shown instead when `TESTKIT_VERBOSE` is set.
    Capture,
}

/// Owns a spawned process; kills and reaps it on drop.
#[derive(Debug)]
pub struct Guarded {
    child: Option<Child>,
    name: String,
    status: Option<ExitStatus>,
    log: Option<(tempfile::TempDir, PathBuf)>,
}

/// How many times [`Guarded::spawn_listening`] draws a new port after a collision.
const PORT_ATTEMPTS: usize = 8;

impl Guarded {
    /// Spawns `command` with stdin closed and output discarded unless
    /// `TESTKIT_VERBOSE` is set.
    pub fn spawn(name: &str, command: &mut Command) -> Self {
        Self::spawn_with(name, command, Output::Discard)
    }

    /// Spawns `command` with stdin closed and its output sent to `output`.
    pub fn spawn_with(name: &str, command: &mut Command, output: Output) -> Self {
        let verbose = std::env::var_os("TESTKIT_VERBOSE").is_some();
        let mut log = None;
        let (stdout, stderr) = match output {
            Output::Inherit => (Stdio::inherit(), Stdio::inherit()),
            _ if verbose => (Stdio::inherit(), Stdio::inherit()),
            Output::Discard => (Stdio::null(), Stdio::null()),
            Output::Capture => {
                let dir = tempfile::tempdir().expect("temp dir for a child's log");
                let path = dir.path().join(format!("{name}.log"));
                let file = File::create(&path).expect("create a child's log");
                let err = file.try_clone().expect("clone a log handle");
                log = Some((dir, path));
                (Stdio::from(file), Stdio::from(err))
            }
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            child: Some(child),
            name: name.to_owned(),
            status: None,
            log,
        }
    }

    /// Spawns the command `make(port)` builds for a free loopback port and
    /// waits until this very process listens on it; when another process took
    /// the port first (the child exits, or never listens), draws another port
    /// and tries again. Returns the process and its port.
    pub fn spawn_listening(
        name: &str,
        output: Output,
        timeout: Duration,
        mut make: impl FnMut(u16) -> Command,
    ) -> (Self, u16) {
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = crate::free_port();
            let mut process = Self::spawn_with(name, &mut make(port), output);
            if process.wait_listening(&[port], timeout) {
                return (process, port);
            }
            if !process.has_exited() {
                panic!(
                    "{name} did not listen on port {port} within {timeout:?}\n{}",
                    process.output()
                );
            }
            last = format!("exit {:?}\n{}", process.exit_status(), process.output());
        }
        panic!("{name} exited before listening, {PORT_ATTEMPTS} times; last: {last}");
    }

    /// Waits until this process listens on every TCP port of `ports`; `false`
    /// when it exits first or `timeout` passes.
    pub fn wait_listening(&mut self, ports: &[u16], timeout: Duration) -> bool {
        let pid = self.pid();
        crate::wait_until(timeout, || {
            self.has_exited() || ports.iter().all(|&port| listens_on(pid, port))
        }) && !self.has_exited()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `signal` (a `kill` name such as `TERM` or `KILL`) to the process.
    pub fn signal(&self, signal: &str) {
        if self.child.is_some() && self.status.is_none() {
            signal_pid(self.pid(), signal);
        }
    }

    /// Whether the process has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        self.exit_status().is_some() || self.child.is_none()
    }

    /// The exit status once the process has exited (reaping it), else `None`.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.status = Some(status);
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit; its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if self.child.is_none() || Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process now (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            if let Ok(status) = child.wait() {
                self.status.get_or_insert(status);
            }
        }
    }

    /// What the process wrote so far, when spawned with [`Output::Capture`]
    /// (empty otherwise).
    pub fn output(&self) -> String {
        self.log
            .as_ref()
            .and_then(|(_, path)| std::fs::read(path).ok())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends a signal to a pid with the `kill` command (no unsafe code needed).
pub fn signal_pid(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// Whether process `pid` holds a TCP socket listening on `port` (any address),
/// read from `/proc/net/tcp{,6}` and the process's descriptors.
pub fn listens_on(pid: u32, port: u16) -> bool {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(Path::new("/proc").join(pid.to_string()).join("fd")) else {
        return false;
    };
    fds.filter_map(Result::ok).any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            inodes
                .iter()
                .any(|inode| target == format!("socket:[{inode}]"))
        })
    })
}

/// Inodes of the TCP sockets in state LISTEN on `port`.
fn listening_inodes(port: u16) -> Vec<String> {
    const LISTEN: &str = "0A";
    let port_hex = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    let (local, state, inode) = (cols.get(1)?, cols.get(3)?, cols.get(9)?);
                    (local.ends_with(&port_hex) && *state == LISTEN).then(|| (*inode).to_owned())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_is_found_by_pid_and_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert!(listens_on(std::process::id(), port));
        drop(listener);
        assert!(!listens_on(std::process::id(), port));
    }

    #[test]
    fn captured_output_and_exit_status() {
        let mut child = Guarded::spawn_with(
            "sh",
            Command::new("sh").args(["-c", "echo hello; echo oops >&2; exit 3"]),
            Output::Capture,
        );
        let status = child.wait_exit(Duration::from_secs(10)).expect("exits");
        assert_eq!(status.code(), Some(3));
        let output = child.output();
        assert!(
            output.contains("hello") && output.contains("oops"),
            "{output}"
        );
    }
}
