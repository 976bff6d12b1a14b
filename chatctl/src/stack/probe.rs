//! Is it up? Small probes of the stack's parts: an HTTP status, a Redis `PING`, `pg_isready`.
//!
//! They are used while starting (readiness with a deadline) and by `chatctl status`.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::secrets::Secret;

/// The status code of `GET path` on `127.0.0.1:port`, or `None` when nothing answers within
/// `timeout`.
pub async fn http_status(port: u16, path: &str, timeout: Duration) -> Option<u16> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 64];
        let mut len = 0;
        while len < 12 {
            let n = stream.read(&mut head[len..]).await.ok()?;
            if n == 0 {
                break;
            }
            len += n;
        }
        // "HTTP/1.1 200 OK"
        std::str::from_utf8(head.get(9..12)?).ok()?.parse().ok()
    };
    tokio::time::timeout(timeout, fetch).await.ok().flatten()
}

/// Whether `GET path` answers 200.
pub async fn http_ok(port: u16, path: &str) -> bool {
    http_status(port, path, Duration::from_secs(2)).await == Some(200)
}

/// `redis://:<password>@127.0.0.1:<port>/`.
pub fn redis_url(port: u16, password: &Secret) -> String {
    format!("redis://:{}@127.0.0.1:{port}/", password.expose())
}

/// Whether Redis on `port` answers `PING` (after `AUTH`).
pub async fn redis_ping(port: u16, password: &Secret) -> bool {
    let ping = async {
        let client = redis::Client::open(redis_url(port, password)).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let pong: String = redis::cmd("PING").query_async(&mut conn).await.ok()?;
        Some(pong == "PONG")
    };
    tokio::time::timeout(Duration::from_secs(2), ping)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Asks Redis on `port` to `SHUTDOWN` (it flushes the append-only file and exits). The
/// connection closing without a reply is the expected answer.
pub async fn redis_shutdown(port: u16, password: &Secret) -> bool {
    let shutdown = async {
        let client = redis::Client::open(redis_url(port, password)).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN").query_async(&mut conn).await;
        Some(())
    };
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// Whether PostgreSQL on `port` accepts connections (`pg_isready`).
pub async fn pg_isready(pg_isready: &Path, port: u16) -> bool {
    tokio::process::Command::new(pg_isready)
        .args(["-q", "-h", "127.0.0.1", "-t", "2", "-p", &port.to_string()])
        .stdin(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn http_status_reads_the_code() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 256];
            let _ = socket.read(&mut buf).await;
            let _ = socket
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                .await;
        });
        assert_eq!(
            http_status(port, "/ready", Duration::from_secs(2)).await,
            Some(503)
        );
        let closed = super::super::ports::any_free(&[]);
        assert_eq!(
            http_status(closed, "/", Duration::from_millis(500)).await,
            None
        );
    }
}
