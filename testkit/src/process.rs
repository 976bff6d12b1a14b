//! A child process that is killed when its handle drops.

use std::process::{Child, Command, Stdio};

/// Owns a spawned process; kills and reaps it on drop.
#[derive(Debug)]
pub struct Guarded {
    child: Option<Child>,
    name: String,
}

impl Guarded {
    /// Spawns `command` with stdin closed and output discarded unless
    /// `TESTKIT_VERBOSE` is set.
    pub fn spawn(name: &str, command: &mut Command) -> Self {
        let verbose = std::env::var_os("TESTKIT_VERBOSE").is_some();
        let output = || {
            if verbose {
                Stdio::inherit()
            } else {
                Stdio::null()
            }
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(output())
            .stderr(output())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            child: Some(child),
            name: name.to_owned(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `signal` (a `kill` name such as `TERM` or `KILL`) to the process.
    pub fn signal(&self, signal: &str) {
        signal_pid(self.pid(), signal);
    }

    /// Whether the process has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        match self.child.as_mut() {
            None => true,
            Some(child) => !matches!(child.try_wait(), Ok(None)),
        }
    }

    /// Kills the process now and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
