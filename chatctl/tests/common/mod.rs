//! A `chatctl up` run as a child process in a temporary state directory, for the tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::Duration;

use chatctl::stack::StackInfo;
use chatctl::stack::state::ChildInfo;

/// The chatctl binary under test.
pub fn chatctl() -> Command {
    build_servers();
    Command::new(env!("CARGO_BIN_EXE_chatctl"))
}

/// Runs chatctl with `args` (and `--state-dir` of `dir` if given) and returns its output.
pub fn run(args: &[&str]) -> Output {
    chatctl()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run chatctl")
}

/// The gateway and worker binaries chatctl starts live beside it. `cargo test --workspace`
/// builds them (their own tests need them); a run of only this package builds them here
/// when they are missing or older than their sources. (Always running `cargo build` here
/// could rebuild them with other features than the workspace test run chose.)
fn build_servers() {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_chatctl"))
            .parent()
            .expect("bin dir")
            .to_owned();
        let sources = newest(&["gateway", "worker", "protocol"].map(|c| root.join(c)));
        let fresh = ["chatcluster-gateway", "chatcluster-worker"]
            .iter()
            .all(|bin| {
                modified(&bin_dir.join(bin))
                    .is_some_and(|built| sources.is_none_or(|src| built >= src))
            });
        if fresh {
            return;
        }
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "chatcluster-gateway",
                "-p",
                "chatcluster-worker",
            ])
            .current_dir(&root)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the gateway and worker failed");
    });
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The newest modification time of the files under `dirs` (skipping `target`).
fn newest(dirs: &[PathBuf]) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack: Vec<PathBuf> = dirs.to_vec();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                if entry.file_name() != "target" {
                    stack.push(path);
                }
            } else if let Some(time) = modified(&path) {
                newest = newest.max(Some(time));
            }
        }
    }
    newest
}

/// A running `chatctl up`; stopped (down, then kill) on drop.
pub struct Up {
    pub dir: tempfile::TempDir,
    pub process: Option<Child>,
}

impl Up {
    /// Starts a stack with `args` and waits until it runs.
    pub fn start(args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("chatctl-test-")
            .tempdir()
            .expect("temp dir");
        let log = std::fs::File::create(dir.path().join("up.out")).expect("log");
        let process = chatctl()
            .arg("up")
            .arg("--state-dir")
            .arg(dir.path())
            .args(["--drain-timeout", "1s", "--port", "0", "--stats-port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn chatctl up");
        let mut up = Self {
            dir,
            process: Some(process),
        };
        let running = chatcluster_testkit::wait_until(Duration::from_secs(120), || {
            up.try_info()
                .is_some_and(|i| i.phase == chatctl::stack::Phase::Running)
                || up.exited()
        });
        assert!(
            running && !up.exited(),
            "chatctl up did not start:\n{}",
            up.output()
        );
        up
    }

    fn exited(&mut self) -> bool {
        self.process
            .as_mut()
            .is_none_or(|p| !matches!(p.try_wait(), Ok(None)))
    }

    /// What `chatctl up` printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.out")).unwrap_or_default()
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    fn try_info(&self) -> Option<StackInfo> {
        StackInfo::read(&self.dir.path().join("stack.json")).ok()
    }

    /// The state file now.
    pub fn info(&self) -> StackInfo {
        self.try_info().expect("stack.json")
    }

    /// One child's record.
    pub fn child(&self, name: &str) -> ChildInfo {
        self.info()
            .children
            .into_iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no child {name}"))
    }

    /// Runs chatctl with `args` against this stack.
    pub fn run(&self, args: &[&str]) -> Output {
        chatctl()
            .args(args)
            .arg("--state-dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run chatctl")
    }

    /// `chatctl down`, then waits for `up` to exit; returns down's output and up's status.
    pub fn down(&mut self) -> (Output, std::process::ExitStatus) {
        let out = self.run(&["down"]);
        let mut process = self.process.take().expect("running");
        let status = process.wait().expect("wait for up");
        (out, status)
    }

    /// The path of a file in the state directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = Command::new(env!("CARGO_BIN_EXE_chatctl"))
                .arg("down")
                .arg("--state-dir")
                .arg(self.dir.path())
                .output();
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

/// Text of an output's stdout and stderr.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
