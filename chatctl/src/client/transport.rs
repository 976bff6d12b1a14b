//! Where a client connects: a `ws://` URL over TCP (optionally from a chosen loopback source
//! address, so one machine can open tens of thousands of connections), or a gateway's Unix
//! socket directly (`unix:/path/gateway-0.sock`), as HAProxy does.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use chatcluster_protocol::Encoding;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream, UnixStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Bytes read from the socket at a time, per connection. tungstenite zeroes this much of
/// its buffer before every read, so a large one costs a load generator more in `memset`
/// than it saves in system calls (a push is about 200 bytes).
pub const READ_BUFFER: usize = 4 * 1024;

use super::ClientError;

/// A server to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `ws://host:port/path`.
    Url(String),
    /// A gateway's Unix socket.
    Unix(PathBuf),
}

impl Target {
    /// Parses `ws://...` or `unix:/path`.
    pub fn parse(text: &str) -> Result<Self, ClientError> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        if text.starts_with("ws://") {
            return Ok(Target::Url(text.to_owned()));
        }
        Err(ClientError::BadTarget(format!(
            "{text:?}: expected ws://host:port/ws or unix:/path/to/gateway.sock (wss:// needs a TLS-terminating proxy in front)"
        )))
    }

    /// Whether connections may be spread over loopback source addresses.
    pub fn is_loopback(&self) -> bool {
        match self {
            Target::Url(url) => url
                .strip_prefix("ws://")
                .and_then(|rest| rest.split(['/', ':']).next())
                .is_some_and(|host| host == "localhost" || host.starts_with("127.")),
            Target::Unix(_) => false,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Url(url) => f.write_str(url),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A TCP or Unix stream.
#[derive(Debug)]
pub enum Transport {
    /// TCP.
    Tcp(TcpStream),
    /// Unix socket.
    Unix(UnixStream),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}

/// An open WebSocket.
pub type Ws = WebSocketStream<Transport>;

/// How to open one connection.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Bearer token (`AUTH_MODE=jwt`).
    pub token: Option<String>,
    /// Local address to connect from (TCP only), e.g. 127.0.0.3.
    pub source: Option<IpAddr>,
}

/// Opens a WebSocket to `target` asking for `encoding`'s subprotocol.
pub async fn connect(
    target: &Target,
    encoding: Encoding,
    options: &ConnectOptions,
) -> Result<Ws, ClientError> {
    let failed = |e: io::Error| ClientError::Connect {
        target: target.to_string(),
        reason: e.to_string(),
    };
    let (url, stream) = match target {
        Target::Url(url) => {
            let authority = url
                .strip_prefix("ws://")
                .and_then(|rest| rest.split('/').next())
                .unwrap_or_default();
            let addr = tokio::net::lookup_host(if authority.contains(':') {
                authority.to_owned()
            } else {
                format!("{authority}:80")
            })
            .await
            .map_err(failed)?
            .next()
            .ok_or_else(|| failed(io::Error::new(io::ErrorKind::NotFound, "no address")))?;
            (
                url.clone(),
                Transport::Tcp(tcp(addr, options.source).await.map_err(failed)?),
            )
        }
        Target::Unix(path) => (
            "ws://localhost/ws".to_owned(),
            Transport::Unix(UnixStream::connect(path).await.map_err(failed)?),
        ),
    };
    let mut request = url
        .into_client_request()
        .map_err(|e| ClientError::BadTarget(e.to_string()))?;
    let headers = request.headers_mut();
    headers.insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(encoding.subprotocol()),
    );
    if let Some(token) = &options.token {
        let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            ClientError::BadTarget("the token holds characters a header cannot carry".into())
        })?;
        headers.insert("Authorization", value);
    }
    let mut config = WebSocketConfig::default();
    // tungstenite's default 128 KiB read buffer per connection would cost a load generator
    // over a gigabyte at 10,000 connections.
    config.read_buffer_size = READ_BUFFER;
    config.write_buffer_size = 0;
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .map_err(|e| ClientError::Connect {
            target: target.to_string(),
            reason: e.to_string(),
        })?;
    Ok(ws)
}

async fn tcp(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            Target::parse("unix:/run/gw.sock").expect("unix"),
            Target::Unix("/run/gw.sock".into())
        );
        let url = Target::parse("ws://127.0.0.1:8080/ws").expect("ws");
        assert!(url.is_loopback());
        assert!(
            !Target::parse("ws://example.com/ws")
                .expect("ws")
                .is_loopback()
        );
        let err = Target::parse("http://x").expect_err("bad");
        assert!(err.to_string().contains("ws://host:port/ws"), "{err}");
    }
}
