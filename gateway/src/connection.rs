//! One WebSocket connection: the upgrade (auth, limits, subprotocol), then a
//! reader loop that handles requests in order and a writer task that drains
//! the connection's bounded queue in batches, joined by a shared kill switch.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use chatcluster_protocol::codec::{self, Encoding};
use chatcluster_protocol::frame::{ErrorCode, RequestError, ServerFrame};

use crate::api::ApiError;
use crate::auth::{self, Identity};
use crate::outbox::{CloseReason, Inbox, Outbox};
use crate::session::Session;
use crate::state::Gateway;

/// Frames written per flush at most.
const WRITE_BATCH: usize = 256;
/// Capacity of the WebSocket read buffer (grows for larger frames); small to keep idle connections cheap.
const READ_BUFFER: usize = 1024;
/// Bytes buffered before a write reaches the socket (flushes write sooner).
const WRITE_BUFFER: usize = 16 * 1024;
/// How long a closing connection may take to send its close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Query parameters of `/ws`.
#[derive(Debug, Deserialize)]
pub struct WsQuery {
    /// A JWT, for clients that cannot set headers (browsers).
    token: Option<String>,
}

/// `GET /ws`: checks the upgrade and starts the connection.
pub async fn upgrade(
    State(gateway): State<Arc<Gateway>>,
    Query(query): Query<WsQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
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
    let encoding = match negotiate(&ws) {
        Ok(encoding) => encoding,
        Err(error) => return reject("subprotocol", error),
    };
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
    let max_frame = gateway.config.max_frame_bytes;
    let tracker = gateway.connections.clone();
    // Echoes the chosen subprotocol when the client asked for one.
    Ok(ws
        .protocols([encoding.subprotocol()])
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .on_upgrade(move |socket| {
            tracker.track_future(run(gateway, socket, identity, encoding, permit))
        }))
}

/// Picks the encoding from the client's subprotocols (JSON when none is asked for).
fn negotiate(ws: &WebSocketUpgrade) -> Result<Encoding, ApiError> {
    let mut requested = ws.requested_protocols().peekable();
    if requested.peek().is_none() {
        return Ok(Encoding::Json);
    }
    requested
        .find_map(|p| p.to_str().ok().and_then(Encoding::from_subprotocol))
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

#[tracing::instrument(name = "conn", skip_all, fields(id))]
async fn run(
    gateway: Arc<Gateway>,
    socket: WebSocket,
    identity: Option<Identity>,
    encoding: Encoding,
    _permit: OwnedSemaphorePermit,
) {
    let id = gateway.next_connection_id();
    tracing::Span::current().record("id", id);
    gateway.metrics.connections.inc();
    gateway
        .metrics
        .connections_total
        .get_or_create(&[("encoding", encoding.as_str())])
        .inc();
    let (outbox, inbox) = Outbox::channel(
        id,
        encoding,
        gateway.config.outbound_queue as usize,
        gateway.metrics.clone(),
    );
    let (sink, mut stream) = socket.split();
    let writer = tokio::spawn(write_loop(sink, inbox, gateway.config.write_delay));
    match Box::pin(Session::start(gateway.clone(), outbox.clone(), identity)).await {
        Ok(mut session) => {
            read_loop(&gateway, &mut stream, &outbox, &mut session).await;
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
    // Closing handshake: read until the client's close frame (or a timeout), so
    // unread client bytes do not turn our close into a reset that loses the close frame.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    let _ = writer.await;
    gateway.metrics.connections.dec();
    tracing::debug!("connection closed");
}

async fn read_loop(
    gateway: &Gateway,
    stream: &mut SplitStream<WebSocket>,
    outbox: &Outbox,
    session: &mut Session,
) {
    let config = &gateway.config;
    let encoding = outbox.encoding();
    let mut ping =
        tokio::time::interval_at(Instant::now() + config.ping_interval, config.ping_interval);
    let mut last_seen = Instant::now();
    let mut bad_frames = 0u32;
    loop {
        let frame = tokio::select! {
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
                outbox.push(Message::Ping(bytes::Bytes::new()));
                continue;
            }
            frame = stream.next() => frame,
        };
        let bytes = match frame {
            None => return,
            Some(Ok(Message::Close(_))) => {
                outbox.close(CloseReason::Normal);
                return;
            }
            Some(Err(error)) => {
                // Oversize frames surface as read errors; tell the client why if we can.
                if let Some(tungstenite::Error::Capacity(_)) =
                    error.into_inner().downcast_ref::<tungstenite::Error>()
                {
                    outbox.close(CloseReason::TooLarge);
                }
                return;
            }
            Some(Ok(message)) => {
                last_seen = Instant::now();
                match (message, encoding) {
                    (Message::Text(text), Encoding::Json) => bytes::Bytes::from(text),
                    (Message::Binary(data), Encoding::MsgPack) => data,
                    (Message::Ping(_) | Message::Pong(_), _) => continue,
                    (_, encoding) => {
                        let message = format!(
                            "this connection speaks {}: send {} frames",
                            encoding.subprotocol(),
                            if encoding.is_binary() {
                                "binary"
                            } else {
                                "text"
                            }
                        );
                        if !refuse(
                            gateway,
                            outbox,
                            RequestError {
                                id: None,
                                code: ErrorCode::BadRequest,
                                message,
                            },
                            &mut bad_frames,
                        ) {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        match codec::decode_request(encoding, &bytes) {
            Ok(request) => {
                bad_frames = 0;
                // Boxed: the deepest operation's state would otherwise live in
                // every idle connection's task for its whole life.
                let outcome = Box::pin(session.handle(request)).await;
                outbox.push_frame(&outcome.reply);
                if let Some(activation) = outcome.activation {
                    session.activate(activation);
                }
            }
            Err(error) => {
                if !refuse(gateway, outbox, error, &mut bad_frames) {
                    return;
                }
            }
        }
    }
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

async fn write_loop(mut sink: SplitSink<WebSocket, Message>, mut inbox: Inbox, delay: Duration) {
    let kill = inbox.kill.clone();
    let written = async {
        let encoding = inbox.encoding;
        while let Some(first) = inbox.rx.recv().await {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            sink.feed(first.into_message(encoding)).await?;
            for _ in 1..WRITE_BATCH {
                match inbox.rx.try_recv() {
                    Ok(next) => sink.feed(next.into_message(encoding)).await?,
                    Err(_) => break,
                }
            }
            sink.flush().await?;
        }
        Ok::<_, axum::Error>(())
    };
    tokio::select! {
        _ = written => {}
        () = kill.cancelled() => {}
    }
    let (code, reason) = inbox
        .close_reason()
        .unwrap_or(CloseReason::Normal)
        .close_frame();
    let close = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        sink.send(close).await?;
        sink.close().await
    })
    .await;
}
