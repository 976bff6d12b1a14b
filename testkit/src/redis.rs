//! A real `redis-server` on a Unix socket in its own temp dir, without
//! persistence or with an append-only file.
//!
//! A socket in a private directory cannot collide with another test's server
//! (a loopback port drawn by [`crate::free_port`] can), and survives restarts
//! under the same path, so clients keep their URL. With [`Persistence::Aof`],
//! [`RedisServer::kill`] then [`RedisServer::restart`] is a crash and a
//! restart from the AOF; [`RedisServer::snapshot`] and
//! [`RedisServer::restore`] put back an older AOF, the rewind a crash with
//! `appendfsync everysec` can cause.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::Guarded;

/// Whether and how the server persists its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing: a killed server comes back empty.
    None,
    /// An append-only file, flushed to disk as `appendfsync` says.
    Aof(Fsync),
}

/// Redis `appendfsync` policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// After every write, before the reply.
    Always,
    /// Once a second.
    EverySec,
}

impl Fsync {
    /// The option's value.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::EverySec => "everysec",
        }
    }
}

/// A copy of the server's append-only file at one moment.
#[derive(Debug)]
pub struct AofSnapshot(tempfile::TempDir);

/// Where Redis 7 keeps its multi-part AOF, inside `--dir`.
const AOF_DIR: &str = "appendonlydir";

/// A running `redis-server`; stopped on drop.
#[derive(Debug)]
pub struct RedisServer {
    dir: tempfile::TempDir,
    socket: PathBuf,
    binary: PathBuf,
    persistence: Persistence,
    process: Option<Guarded>,
}

impl RedisServer {
    /// Starts a fresh server without persistence and waits until it answers `PING`.
    pub fn start() -> Self {
        Self::start_with(Persistence::None)
    }

    /// Starts a fresh server persisting as `persistence` says.
    pub fn start_with(persistence: Persistence) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cc-redis")
            .tempdir()
            .expect("temp dir");
        let mut server = Self {
            socket: dir.path().join("redis.sock"),
            dir,
            binary: crate::find_binary("redis-server", &[], "redis-server"),
            persistence,
            process: None,
        };
        server.restart();
        server
    }

    /// Copies the append-only file as it is on disk now.
    pub fn snapshot(&self) -> AofSnapshot {
        let copy = tempfile::tempdir().expect("temp dir");
        copy_dir(&self.dir.path().join(AOF_DIR), copy.path());
        AofSnapshot(copy)
    }

    /// Replaces the append-only file with `snapshot` (the server must be
    /// killed first); the next [`RedisServer::restart`] loads it.
    pub fn restore(&self, snapshot: &AofSnapshot) {
        assert!(
            self.process.is_none(),
            "kill the server before restoring its AOF"
        );
        let aof = self.dir.path().join(AOF_DIR);
        let _ = std::fs::remove_dir_all(&aof);
        std::fs::create_dir_all(&aof).expect("create the AOF dir");
        copy_dir(snapshot.0.path(), &aof);
    }

    /// The process id (0 when stopped).
    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Guarded::pid)
    }

    /// `unix://<dir>/redis.sock`, as `REDIS_URL` for the binaries and redis-rs.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The server's Unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Kills the server with SIGKILL: without persistence every key is lost;
    /// with an AOF, what it had not flushed is.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts the server again on the same socket: empty without
    /// persistence, else from its AOF.
    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.socket);
        let mut command = Command::new(&self.binary);
        command
            .args(["--port", "0"])
            .arg("--unixsocket")
            .arg(&self.socket)
            .args(["--unixsocketperm", "700"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(self.dir.path());
        match self.persistence {
            Persistence::None => command.args(["--appendonly", "no"]),
            Persistence::Aof(fsync) => command
                .args(["--appendonly", "yes", "--appendfsync", fsync.as_arg()])
                .args(["--appenddirname", AOF_DIR]),
        };
        let mut process = Guarded::spawn("redis-server", &mut command);
        let socket = self.socket.clone();
        // Loading a large AOF takes a while; PING answers LOADING until done.
        let ready = crate::wait_until(Duration::from_secs(60), || {
            process.has_exited() || ping(&socket)
        });
        assert!(
            ready && !process.has_exited(),
            "redis-server did not answer PING on {}",
            self.socket.display()
        );
        self.process = Some(process);
    }

    /// Runs one command given as words and returns the raw RESP reply.
    pub fn command(&self, words: &[&str]) -> String {
        let mut stream = UnixStream::connect(&self.socket).expect("connect redis");
        let mut request = format!("*{}\r\n", words.len());
        for word in words {
            request.push_str(&format!("${}\r\n{word}\r\n", word.len()));
        }
        stream.write_all(request.as_bytes()).expect("write redis");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = vec![0u8; 64 * 1024];
        let n = stream.read(&mut buf).expect("read redis");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read the AOF dir") {
        let entry = entry.expect("AOF dir entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy an AOF file");
    }
}

fn ping(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(stream.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}
