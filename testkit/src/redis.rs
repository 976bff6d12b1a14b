//! A real `redis-server` on a Unix socket in its own temp dir, without persistence.
//!
//! A socket in a private directory cannot collide with another test's server
//! (a loopback port drawn by [`crate::free_port`] can), and survives restarts
//! under the same path, so clients keep their URL.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::Guarded;

/// A running `redis-server`; stopped on drop.
#[derive(Debug)]
pub struct RedisServer {
    dir: tempfile::TempDir,
    socket: PathBuf,
    binary: PathBuf,
    process: Option<Guarded>,
}

impl RedisServer {
    /// Starts a fresh server and waits until it answers `PING`.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cc-redis")
            .tempdir()
            .expect("temp dir");
        let mut server = Self {
            socket: dir.path().join("redis.sock"),
            dir,
            binary: crate::find_binary("redis-server", &[], "redis-server"),
            process: None,
        };
        server.restart();
        server
    }

    /// `unix://<dir>/redis.sock`, as `REDIS_URL` for the binaries and redis-rs.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The server's Unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Kills the server with SIGKILL: every key is lost (no persistence).
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts the server again on the same socket (empty, unless it was never killed).
    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.socket);
        let mut command = Command::new(&self.binary);
        command
            .args(["--port", "0"])
            .arg("--unixsocket")
            .arg(&self.socket)
            .args(["--unixsocketperm", "700"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        let mut process = Guarded::spawn("redis-server", &mut command);
        let socket = self.socket.clone();
        let ready = crate::wait_until(Duration::from_secs(10), || {
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
