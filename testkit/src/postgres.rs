//! A real PostgreSQL server in a temp data directory (initdb), listening only
//! on a Unix socket in that directory.
//!
//! No TCP port means no collision with another test's server, and a restart
//! comes back at the same address. PostgreSQL refuses to run as root, so under
//! root (CI) the server runs as the `postgres` system user through `runuser`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::process::{Guarded, signal_pid};

const PG_DIRS: &[&str] = &[
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/17/bin",
];

/// The port number naming the socket file (`.s.PGSQL.5432`); no TCP port is opened.
const SOCKET_PORT: u16 = 5432;

/// A running `postgres`; stopped and its data removed on drop.
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    bin_dir: PathBuf,
    process: Option<Guarded>,
}

impl Postgres {
    /// Runs `initdb` into a temp dir and starts the server; waits until it accepts connections.
    pub fn start() -> Self {
        let initdb = crate::find_binary("initdb", PG_DIRS, "postgresql");
        let initdb = std::fs::canonicalize(&initdb).unwrap_or(initdb);
        let bin_dir = initdb.parent().map(PathBuf::from).unwrap_or_default();
        let dir = tempfile::Builder::new()
            .prefix("cc-pg")
            .tempdir()
            .expect("temp dir");
        if crate::running_as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown of the data dir failed");
        }
        let data = dir.path().join("data");
        let out = as_postgres(&initdb)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut server = Self {
            dir,
            bin_dir,
            process: None,
        };
        server.restart();
        server
    }

    /// `postgres://postgres@localhost:5432/postgres?host=<dir>`: the socket
    /// directory as `host`, understood by sqlx and libpq.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@localhost:{SOCKET_PORT}/postgres?host={}",
            self.socket_dir().display()
        )
    }

    /// The directory holding the server's socket `.s.PGSQL.5432`.
    pub fn socket_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Starts (or starts again) the server on the same socket and data.
    pub fn restart(&mut self) {
        self.stop();
        let mut command = as_postgres(&self.bin_dir.join("postgres"));
        command
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &SOCKET_PORT.to_string(), "-c", "listen_addresses="])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .args(["-c", "max_connections=200"]);
        let mut process = Guarded::spawn("postgres", &mut command);
        let isready = self.bin_dir.join("pg_isready");
        let dir = self.dir.path().to_owned();
        let ready = crate::wait_until(Duration::from_secs(30), || {
            process.has_exited()
                || Command::new(&isready)
                    .args(["-q", "-p", &SOCKET_PORT.to_string(), "-h"])
                    .arg(&dir)
                    .status()
                    .is_ok_and(|s| s.success())
        });
        assert!(
            ready && !process.has_exited(),
            "postgres did not accept connections on {}",
            dir.display()
        );
        self.process = Some(process);
    }

    /// Stops the server with a fast shutdown and waits for it to exit.
    pub fn stop(&mut self) {
        let Some(mut process) = self.process.take() else {
            return;
        };
        if let Some(pid) = self.postmaster_pid() {
            signal_pid(pid, "INT");
            let data = self.dir.path().join("data").join("postmaster.pid");
            crate::wait_until(Duration::from_secs(20), || !data.exists());
        }
        process.kill();
    }

    fn postmaster_pid(&self) -> Option<u32> {
        let text =
            std::fs::read_to_string(self.dir.path().join("data").join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn as_postgres(program: &std::path::Path) -> Command {
    if crate::running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}
