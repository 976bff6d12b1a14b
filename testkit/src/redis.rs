//! A real `redis-server` on a free loopback port, without persistence.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::process::Guarded;

/// A running `redis-server`; stopped on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    binary: PathBuf,
    process: Option<Guarded>,
}

impl RedisServer {
    /// Starts a fresh server on a free port and waits until it answers `PING`.
    pub fn start() -> Self {
        let mut server = Self {
            port: crate::free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            binary: crate::find_binary("redis-server", &[], "redis-server"),
            process: None,
        };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server with SIGKILL: every key is lost (no persistence).
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts the server again on the same port (empty, unless it was never killed).
    pub fn restart(&mut self) {
        self.kill();
        let mut command = Command::new(&self.binary);
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        self.process = Some(Guarded::spawn("redis-server", &mut command));
        let port = self.port;
        assert!(
            crate::wait_until(Duration::from_secs(10), || ping(port)),
            "redis-server did not answer PING on port {port}"
        );
    }

    /// Runs one command given as words (inline protocol) and returns the raw reply.
    pub fn command(&self, words: &[&str]) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect redis");
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

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(stream.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}
