//! Real backing services for integration tests.
//!
//! Tests in this workspace never mock Redis, PostgreSQL or HAProxy: they start
//! the real Debian binaries with the helpers here, and every handle stops its
//! process and removes its files on drop. A missing binary fails with the
//! package to install.
//!
//! * [`redis`], [`postgres`]: servers on Unix sockets in private temp dirs,
//!   so parallel tests never share a port (Redis optionally with an AOF,
//!   restarted from it after a kill);
//! * [`haproxy`]: HAProxy in front of gateway sockets, on TCP ports it is
//!   proven to own ([`process::Guarded::wait_listening`]);
//! * [`process`]: any child process (servers and the project's binaries);
//! * [`http`]: admin endpoints and metrics;
//! * [`proxy`]: a proxy that loses one reply, for fault tests.

pub mod haproxy;
pub mod http;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod tls_redis;

pub use haproxy::Haproxy;
pub use postgres::Postgres;
pub use redis::{Fsync, Persistence, RedisServer};
pub use tls_redis::TlsRedis;

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is released before the caller's server binds it, so another
/// process may take it in between: start servers with
/// [`process::Guarded::spawn_listening`], which checks that the process
/// listening is the one just started and draws again otherwise.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// Polls `ready` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether something accepts TCP connections on `127.0.0.1:port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Finds an executable on `PATH` or in `extra_dirs`, or panics naming the
/// Debian package that provides it.
pub fn find_binary(name: &str, extra_dirs: &[&str], package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra_dirs.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("`{name}` not found: apt-get install -y {package}"))
}

/// Whether this process runs as root (PostgreSQL refuses to).
pub fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|out| out.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}
