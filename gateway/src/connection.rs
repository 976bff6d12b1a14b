//! One WebSocket connection: the upgrade (auth, limits, subprotocol,
//! handshake), then a reader loop that handles requests in order and a writer
//! task that turns everything queued into one vectored write, joined by the
//! outbox's kill switch.
//!
//! After the upgrade the gateway owns the socket itself (the Unix or TCP
//! stream, split into halves without locks) and speaks WebSocket through
//! [`crate::ws`], so a push is never copied per recipient: its frame bytes are
//! shared and handed to the kernel in place.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use chatcluster_protocol::codec::{self, Encoding};
use chatcluster_protocol::frame::{ErrorCode, Request, RequestError, ServerFrame};

use crate::api::ApiError;
use crate::auth::{self, Identity};
use crate::outbox::{CloseReason, Inbox, Outbox};
use crate::session::Session;
use crate::state::Gateway;
use crate::ws::{self, FrameReader, Incoming, WsError};

/// Publishes (and direct messages) of one connection in flight at once; the
/// socket is not read while that many wait for Redis.
const MAX_PIPELINE: usize = 64;
/// Bytes read from the socket per read at most.
const READ_CHUNK: usize = 4096;
/// Queue slots a connection keeps allocated between writes.
const KEPT_CHUNKS: usize = 8;
/// Most buffers handed to one vectored write.
const MAX_IOV: usize = 512;
/// How long a closing connection may take to send what is queued and its close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Query parameters of `/ws`.
#[derive(Debug, Deserialize)]
pub struct WsQuery {
    /// A JWT, for clients that cannot set headers (browsers).
    token: Option<String>,
}

/// `GET /ws`: checks the upgrade, answers the handshake and starts the connection.
pub async fn upgrade(
    State(gateway): State<Arc<Gateway>>,
    Query(query): Query<WsQuery>,
    mut request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let reject = |reason: &'static str, error: ApiError| {
        gateway
            .metrics
            .rejected_total
            .get_or_create(&[("reason", reason)])
            .inc();
        Err(error)
    };
    if gateway.draining.is_cancelled() {
        return reject(
            "draining",
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "gateway is shutting down; reconnect",
            ),
        );
    }
    let headers = request.headers();
    let header_token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer);
    let identity = match gateway
        .auth
        .authenticate(header_token.or(query.token.as_deref()))
    {
        Ok(identity) => identity,
        Err(error) => {
            return reject(
                "unauthorized",
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::Unauthorized,
                    error.to_string(),
                ),
            );
        }
    };
    let accept = match handshake_key(headers) {
        Ok(key) => ws::accept_key(key),
        Err(error) => return reject("handshake", error),
    };
    let encoding = match negotiate(headers) {
        Ok(encoding) => encoding,
        Err(error) => return reject("subprotocol", error),
    };
    let echo_protocol = headers.contains_key(header::SEC_WEBSOCKET_PROTOCOL);
    let Ok(permit) = gateway.connection_slots.clone().try_acquire_owned() else {
        return reject(
            "limit",
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "connection limit reached; retry elsewhere",
            ),
        );
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let tracker = gateway.connections.clone();
    tracker.spawn(run(gateway, on_upgrade, identity, encoding, permit));
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if echo_protocol {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(encoding.subprotocol()),
        );
    }
    Ok(response)
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// The client's `Sec-WebSocket-Key`, once the request is a valid version-13 upgrade.
fn handshake_key(headers: &HeaderMap) -> Result<&str, ApiError> {
    let bad = |message: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            format!("{message}: /ws speaks WebSocket (RFC 6455)"),
        )
    };
    if !header_has(headers, header::UPGRADE, "websocket")
        || !header_has(headers, header::CONNECTION, "upgrade")
    {
        return Err(bad("not a WebSocket upgrade request"));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(bad("unsupported Sec-WebSocket-Version (send 13)"));
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|key| key.len() == 24)
        .ok_or_else(|| bad("missing or malformed Sec-WebSocket-Key"))
}

/// Picks the encoding from the client's subprotocols (JSON when none is asked for).
fn negotiate(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    let mut requested = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .peekable();
    if requested.peek().is_none() {
        return Ok(Encoding::Json);
    }
    requested
        .find_map(Encoding::from_subprotocol)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!(
                    "unsupported subprotocol: ask for {} or {}",
                    codec::JSON_SUBPROTOCOL,
                    codec::MSGPACK_SUBPROTOCOL
                ),
            )
        })
}

/// The reading half of an upgraded socket.
enum ReadHalf {
    Unix(tokio::net::unix::OwnedReadHalf),
    Tcp(tokio::net::tcp::OwnedReadHalf),
    Other(tokio::io::ReadHalf<TokioIo<Upgraded>>),
}

impl ReadHalf {
    /// Reads what is available into `buffer`, reserving room only once the
    /// socket is readable, so an idle connection holds no read buffer.
    async fn read_into(&mut self, buffer: &mut BytesMut) -> std::io::Result<usize> {
        macro_rules! ready_then_read {
            ($half:expr) => {
                loop {
                    $half.readable().await?;
                    buffer.reserve(READ_CHUNK);
                    match $half.try_read_buf(buffer) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            // A spurious wake-up: do not wait holding the room.
                            if buffer.is_empty() {
                                *buffer = BytesMut::new();
                            }
                        }
                        other => return other,
                    }
                }
            };
        }
        match self {
            Self::Unix(half) => ready_then_read!(half),
            Self::Tcp(half) => ready_then_read!(half),
            Self::Other(half) => {
                buffer.reserve(READ_CHUNK);
                half.read_buf(buffer).await
            }
        }
    }
}

type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// Splits an upgraded connection; the bytes already read past the handshake come first.
fn split(upgraded: Upgraded) -> (ReadHalf, WriteHalf, Bytes) {
    let upgraded = match upgraded.downcast::<TokioIo<UnixStream>>() {
        Ok(parts) => {
            let (read, write) = parts.io.into_inner().into_split();
            return (ReadHalf::Unix(read), Box::new(write), parts.read_buf);
        }
        Err(upgraded) => upgraded,
    };
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let (read, write) = parts.io.into_inner().into_split();
            return (ReadHalf::Tcp(read), Box::new(write), parts.read_buf);
        }
        Err(upgraded) => upgraded,
    };
    let (read, write) = tokio::io::split(TokioIo::new(upgraded));
    (ReadHalf::Other(read), Box::new(write), Bytes::new())
}

#[tracing::instrument(name = "conn", skip_all, fields(id))]
async fn run(
    gateway: Arc<Gateway>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    identity: Option<Identity>,
    encoding: Encoding,
    _permit: OwnedSemaphorePermit,
) {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(error) => {
            tracing::debug!(%error, "upgrade failed");
            return;
        }
    };
    let id = gateway.next_connection_id();
    tracing::Span::current().record("id", id);
    gateway.metrics.connections.inc();
    gateway
        .metrics
        .connections_total
        .get_or_create(&[("encoding", encoding.as_str())])
        .inc();
    let (outbox, inbox) = Outbox::channel(id, encoding, gateway.config.outbound_queue as usize);
    let (mut read_half, write_half, early) = split(upgraded);
    let writer = tokio::spawn(write_loop(
        write_half,
        inbox,
        outbox.clone(),
        gateway.config.write_coalesce,
    ));
    let mut reader = FrameReader::new(gateway.config.max_frame_bytes);
    if !early.is_empty() {
        reader.buffer().extend_from_slice(&early);
    }
    // The early bytes may be a view of hyper's whole read buffer: let it go now.
    drop(early);
    match Box::pin(Session::start(gateway.clone(), outbox.clone(), identity)).await {
        Ok(mut session) => {
            // Boxed, like every step of a connection's life: the task then holds
            // no more than the pointers, whichever step it is in.
            Box::pin(read_loop(
                &gateway,
                &mut read_half,
                &mut reader,
                &outbox,
                &mut session,
            ))
            .await;
            Box::pin(session.close()).await;
        }
        Err(error) => {
            tracing::warn!(%error, "session start failed");
            outbox.push_frame(&ServerFrame::Error {
                id: None,
                clock: gateway.clock.tick(None),
                code: error.code,
                message: error.message,
            });
        }
    }
    outbox.close(CloseReason::Normal);
    Box::pin(await_close_frame(&mut read_half, &mut reader)).await;
    let _ = writer.await;
    gateway.metrics.connections.dec();
    tracing::debug!("connection closed");
}

/// Closing handshake: reads until the client's close frame (or a timeout), so
/// unread client bytes do not turn our close into a reset that loses the close frame.
async fn await_close_frame(read_half: &mut ReadHalf, reader: &mut FrameReader) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        loop {
            match reader.next_message() {
                Ok(Some(Incoming::Close(_))) | Err(_) => return,
                Ok(Some(_)) => continue,
                Ok(None) => {}
            }
            if !matches!(read_half.read_into(reader.buffer()).await, Ok(n) if n > 0) {
                return;
            }
        }
    })
    .await;
}

async fn read_loop(
    gateway: &Gateway,
    read_half: &mut ReadHalf,
    reader: &mut FrameReader,
    outbox: &Outbox,
    session: &mut Session,
) {
    let config = &gateway.config;
    let mut ping =
        tokio::time::interval_at(Instant::now() + config.ping_interval, config.ping_interval);
    let mut last_seen = Instant::now();
    let mut bad_frames = 0u32;
    // Publishes (and direct messages) whose Redis work is under way, replies in order.
    let mut pipeline = FuturesOrdered::new();
    loop {
        while pipeline.len() < MAX_PIPELINE {
            let incoming = match reader.next_message() {
                Ok(Some(incoming)) => incoming,
                Ok(None) => break,
                Err(error) => {
                    tracing::debug!(%error, "websocket protocol violation");
                    outbox.close(match error {
                        WsError::TooBig(_) => CloseReason::TooLarge,
                        other => CloseReason::Protocol(other.close_code()),
                    });
                    return;
                }
            };
            last_seen = Instant::now();
            let (data, is_text) = match incoming {
                Incoming::Close(_) => {
                    outbox.close(CloseReason::Normal);
                    return;
                }
                Incoming::Ping(payload) => {
                    outbox.push(ws::frame(ws::opcode::PONG, &payload), 1, true);
                    continue;
                }
                Incoming::Pong => continue,
                Incoming::Text(data) => (data, true),
                Incoming::Binary(data) => (data, false),
            };
            let request = match decode(outbox.encoding(), &data, is_text) {
                Ok(request) => {
                    bad_frames = 0;
                    match session.start_pipelined(request) {
                        Ok(pending) => {
                            pipeline.push_back(pending);
                            continue;
                        }
                        Err(request) => Ok(request),
                    }
                }
                Err(error) => Err(error),
            };
            // Anything else waits for the publishes before it, so replies keep their order.
            while let Some(reply) = pipeline.next().await {
                outbox.push_frame(&reply);
            }
            let open = match request {
                Ok(request) => {
                    if let Some(reply) = Box::pin(session.handle(request)).await {
                        outbox.push_frame(&reply);
                    }
                    true
                }
                Err(error) => refuse(gateway, outbox, error, &mut bad_frames),
            };
            if !open {
                return;
            }
        }
        reader.shrink_if_empty();
        tokio::select! {
            () = outbox.closed() => return,
            () = gateway.closing.cancelled() => {
                outbox.close(CloseReason::Shutdown);
                return;
            }
            _ = ping.tick() => {
                if last_seen.elapsed() >= config.idle_timeout {
                    outbox.close(CloseReason::Idle);
                    return;
                }
                outbox.push(ws::frame(ws::opcode::PING, b""), 1, true);
            }
            Some(reply) = pipeline.next(), if !pipeline.is_empty() => {
                outbox.push_frame(&reply);
            }
            read = read_half.read_into(reader.buffer()), if pipeline.len() < MAX_PIPELINE => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}

/// Decodes one data message as a request of this connection's encoding.
fn decode(encoding: Encoding, data: &[u8], is_text: bool) -> Result<Request, RequestError> {
    if is_text == encoding.is_binary() {
        let message = format!(
            "this connection speaks {}: send {} frames",
            encoding.subprotocol(),
            if encoding.is_binary() {
                "binary"
            } else {
                "text"
            }
        );
        return Err(RequestError {
            id: None,
            code: ErrorCode::BadRequest,
            message,
        });
    }
    codec::decode_request(encoding, data)
}

/// Answers a frame that could not be understood; closes the connection after
/// too many in a row. Returns whether the connection stays open.
fn refuse(gateway: &Gateway, outbox: &Outbox, error: RequestError, bad_frames: &mut u32) -> bool {
    gateway
        .metrics
        .errors_total
        .get_or_create(&[("code", error.code.as_str())])
        .inc();
    outbox.push_frame(&ServerFrame::Error {
        id: error.id,
        clock: gateway.clock.tick(None),
        code: error.code,
        message: error.message,
    });
    *bad_frames += 1;
    if *bad_frames >= gateway.config.max_bad_frames {
        outbox.close(CloseReason::BadFrames);
        return false;
    }
    true
}

/// Writes `chunks` completely, as few vectored writes as the kernel allows.
async fn write_chunks(write_half: &mut WriteHalf, chunks: &[Bytes]) -> std::io::Result<()> {
    let (mut index, mut offset) = (0, 0);
    while index < chunks.len() {
        let slices: Vec<IoSlice<'_>> = chunks[index..]
            .iter()
            .take(MAX_IOV)
            .enumerate()
            .map(|(i, chunk)| IoSlice::new(if i == 0 { &chunk[offset..] } else { chunk }))
            .collect();
        let mut written = write_half.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while index < chunks.len() && written >= chunks[index].len() - offset {
            written -= chunks[index].len() - offset;
            index += 1;
            offset = 0;
        }
        offset += written;
    }
    Ok(())
}

/// How often a connection's frame rate is measured for [`Pacer`].
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// Frames per second at which a connection's writes are spaced by the whole
/// coalescing interval.
const FULL_COALESCE_RATE: u64 = 1000;

/// Spaces a connection's writes by an interval that grows with the frames it
/// receives: a quiet chat connection writes at once, a connection receiving
/// 1,000 frames a second writes once per `max` and sends them together.
struct Pacer {
    max: Duration,
    interval: Duration,
    window_start: Instant,
    frames: u64,
    last_write: Option<Instant>,
}

impl Pacer {
    fn new(max: Duration) -> Self {
        Self {
            max,
            interval: Duration::ZERO,
            window_start: Instant::now(),
            frames: 0,
            last_write: None,
        }
    }

    /// When the next write may happen.
    fn next_write(&self) -> Option<Instant> {
        self.last_write
            .filter(|_| !self.interval.is_zero())
            .map(|last| last + self.interval)
    }

    /// Records a write of `frames` frames at `now`.
    fn wrote(&mut self, frames: usize, now: Instant) {
        self.last_write = Some(now);
        self.frames += frames as u64;
        let elapsed = now.duration_since(self.window_start);
        if elapsed >= RATE_WINDOW {
            let rate = self.frames * 1000 / elapsed.as_millis().max(1) as u64;
            self.interval = self
                .max
                .mul_f64((rate as f64 / FULL_COALESCE_RATE as f64).min(1.0));
            self.window_start = now;
            self.frames = 0;
        }
    }
}

/// Writes what is queued, paced by [`Pacer`], until the connection closes;
/// then what is left (unless the reader was too slow) and the close frame.
async fn write_loop(mut write_half: WriteHalf, inbox: Inbox, outbox: Outbox, coalesce: Duration) {
    let kill = inbox.kill().clone();
    let mut chunks = Vec::new();
    let mut pacer = Pacer::new(coalesce);
    loop {
        inbox.ready().await;
        if kill.is_cancelled() {
            break;
        }
        if let Some(due) = pacer.next_write()
            && !inbox.is_urgent()
        {
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                // A reply was queued: it goes out now, with what is waiting.
                () = inbox.ready() => {}
                () = kill.cancelled() => break,
            }
        }
        let frames = inbox.take(&mut chunks);
        if chunks.is_empty() {
            continue;
        }
        let written = tokio::select! {
            written = write_chunks(&mut write_half, &chunks) => written.is_ok(),
            () = kill.cancelled() => break,
        };
        if !written {
            outbox.close(CloseReason::Normal);
            break;
        }
        chunks.clear();
        // This buffer and the queue's are swapped on every take: keep them
        // small so an idle connection holds no leftover of a burst.
        if chunks.capacity() > KEPT_CHUNKS {
            chunks = Vec::new();
        }
        pacer.wrote(frames, Instant::now());
    }
    Box::pin(close(write_half, inbox, chunks)).await;
}

/// Writes what is left (unless the reader was too slow) and the close frame.
async fn close(mut write_half: WriteHalf, inbox: Inbox, mut chunks: Vec<Bytes>) {
    let reason = inbox.close_reason().unwrap_or(CloseReason::Normal);
    let (code, text) = reason.close_frame();
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if reason != CloseReason::SlowReader {
            chunks.clear();
            inbox.take(&mut chunks);
            write_chunks(&mut write_half, &chunks).await?;
        }
        write_half.write_all(&ws::close_frame(code, text)).await?;
        write_half.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn writes_are_spaced_in_proportion_to_the_frame_rate() {
        let max = Duration::from_millis(20);
        let mut pacer = Pacer::new(max);
        assert_eq!(pacer.next_write(), None, "a new connection writes at once");
        // One second of 100 frames a second: 2 ms apart.
        for _ in 0..100 {
            tokio::time::advance(Duration::from_millis(10)).await;
            pacer.wrote(1, Instant::now());
        }
        assert_eq!(pacer.interval, Duration::from_millis(2));
        // One second of 5,000 frames a second: the whole 20 ms.
        for _ in 0..50 {
            tokio::time::advance(Duration::from_millis(20)).await;
            pacer.wrote(100, Instant::now());
        }
        assert_eq!(pacer.interval, max);
        let last = Instant::now();
        assert_eq!(pacer.next_write(), Some(last + max));
        // Quiet again for a second: one frame a second spaces writes by 20 µs.
        tokio::time::advance(Duration::from_secs(1)).await;
        pacer.wrote(1, Instant::now());
        assert_eq!(pacer.interval, Duration::from_micros(20));
    }

    #[tokio::test]
    async fn chunks_larger_than_one_vectored_write_are_written_completely() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut write_half: WriteHalf = Box::new(server);
        let chunks: Vec<Bytes> = (0..(MAX_IOV * 2 + 7))
            .map(|i| Bytes::from(vec![(i % 251) as u8; 1 + i % 5]))
            .collect();
        let expected: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        write_chunks(&mut write_half, &chunks).await.unwrap();
        drop(write_half);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expected);
    }
}
