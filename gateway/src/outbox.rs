//! The sending side of one WebSocket connection, and frames shared between many.
//!
//! A push is encoded at most once per encoding ([`SharedFrame`]) and the bytes
//! are shared by every local recipient. Each connection has a bounded queue; a
//! reader that lets it fill up is closed with 1008 rather than allowed to grow
//! memory ([`Outbox::push`]).

use std::sync::{Arc, OnceLock};

use axum::extract::ws::{Message, Utf8Bytes};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use chatcluster_protocol::codec::{self, Encoding};
use chatcluster_protocol::frame::ServerFrame;

use crate::metrics::Metrics;

/// Identifies a connection within this process.
pub type ConnId = u64;

/// Why the server closes a connection, with its WebSocket close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The session ended normally (1000).
    Normal,
    /// The outbound queue filled up (1008).
    SlowReader,
    /// Too many malformed frames in a row (1008).
    BadFrames,
    /// A frame over the size limit (1009).
    TooLarge,
    /// Nothing received within the idle timeout (1001).
    Idle,
    /// The gateway is shutting down (1001).
    Shutdown,
}

impl CloseReason {
    /// The close code and reason text sent to the client.
    pub fn close_frame(self) -> (u16, &'static str) {
        match self {
            Self::Normal => (1000, "bye"),
            Self::SlowReader => (1008, "slow reader: outbound queue full"),
            Self::BadFrames => (1008, "too many malformed frames"),
            Self::TooLarge => (1009, "frame too large"),
            Self::Idle => (1001, "idle timeout"),
            Self::Shutdown => (1001, "server shutting down"),
        }
    }
}

/// Encodes a frame for an encoding as the WebSocket message to send.
pub fn ws_message(encoding: Encoding, frame: &ServerFrame) -> Message {
    let bytes = codec::encode(encoding, frame);
    match encoding {
        // serde_json output is always valid UTF-8.
        Encoding::Json => match Utf8Bytes::try_from(bytes) {
            Ok(text) => Message::Text(text),
            Err(_) => Message::Binary(codec::encode(encoding, frame)),
        },
        Encoding::MsgPack => Message::Binary(bytes),
    }
}

/// A server frame encoded lazily, at most once per encoding.
#[derive(Debug)]
pub struct SharedFrame {
    frame: ServerFrame,
    json: OnceLock<Message>,
    msgpack: OnceLock<Message>,
}

impl SharedFrame {
    /// Wraps a frame to be sent to many connections.
    pub fn new(frame: ServerFrame) -> Arc<Self> {
        Arc::new(Self {
            frame,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
        })
    }

    /// The message for `encoding`, encoding it on first use.
    pub fn message(&self, encoding: Encoding) -> Message {
        let cell = match encoding {
            Encoding::Json => &self.json,
            Encoding::MsgPack => &self.msgpack,
        };
        cell.get_or_init(|| ws_message(encoding, &self.frame))
            .clone()
    }
}

/// An entry of a connection's queue: a pointer-sized handle, so an idle
/// connection's queue block stays small. Shared frames are encoded by the
/// first writer that needs their encoding.
#[derive(Debug)]
pub enum Outgoing {
    /// A frame shared with other recipients.
    Shared(Arc<SharedFrame>),
    /// A frame for this connection only (replies, pings).
    Own(Box<Message>),
}

impl Outgoing {
    /// The WebSocket message to write in `encoding`.
    pub fn into_message(self, encoding: Encoding) -> Message {
        match self {
            Self::Shared(frame) => frame.message(encoding),
            Self::Own(message) => *message,
        }
    }
}

#[derive(Debug)]
struct Control {
    kill: CancellationToken,
    reason: OnceLock<CloseReason>,
}

/// Sending side of one connection: cheap to clone, safe to use from any task.
#[derive(Debug, Clone)]
pub struct Outbox {
    id: ConnId,
    encoding: Encoding,
    tx: mpsc::Sender<Outgoing>,
    control: Arc<Control>,
    metrics: Arc<Metrics>,
}

/// The receiving side, owned by the connection's writer.
#[derive(Debug)]
pub struct Inbox {
    /// Frames to write.
    pub rx: mpsc::Receiver<Outgoing>,
    /// The connection's encoding.
    pub encoding: Encoding,
    /// Cancelled when the connection must close.
    pub kill: CancellationToken,
    control: Arc<Control>,
}

impl Inbox {
    /// Why the connection is being closed, once it is.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.control.reason.get().copied()
    }
}

impl Outbox {
    /// A connection's outbox and inbox with room for `capacity` frames.
    pub fn channel(
        id: ConnId,
        encoding: Encoding,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> (Self, Inbox) {
        let (tx, rx) = mpsc::channel(capacity);
        let control = Arc::new(Control {
            kill: CancellationToken::new(),
            reason: OnceLock::new(),
        });
        let inbox = Inbox {
            rx,
            encoding,
            kill: control.kill.clone(),
            control: control.clone(),
        };
        (
            Self {
                id,
                encoding,
                tx,
                control,
                metrics,
            },
            inbox,
        )
    }

    /// The connection id.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The connection's encoding.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Queues a message for this connection only; a full queue closes the
    /// connection as a slow reader. Returns whether the message was queued.
    pub fn push(&self, message: Message) -> bool {
        self.enqueue(Outgoing::Own(Box::new(message)))
    }

    fn enqueue(&self, outgoing: Outgoing) -> bool {
        match self.tx.try_send(outgoing) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if self.close(CloseReason::SlowReader) {
                    self.metrics.slow_reader_disconnects_total.inc();
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Queues a shared frame (encoded in this connection's encoding when written).
    pub fn push_shared(&self, frame: &Arc<SharedFrame>) -> bool {
        let queued = self.enqueue(Outgoing::Shared(frame.clone()));
        if queued {
            self.metrics.messages_out_total.inc();
        }
        queued
    }

    /// Queues a frame for this connection only.
    pub fn push_frame(&self, frame: &ServerFrame) -> bool {
        self.push(ws_message(self.encoding, frame))
    }

    /// Asks the connection to close; the first reason wins. Returns whether
    /// this call set the reason.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self.control.reason.set(reason).is_ok();
        self.control.kill.cancel();
        first
    }

    /// Resolves once the connection was asked to close.
    pub async fn closed(&self) {
        self.control.kill.cancelled().await;
    }

    /// Whether the connection was asked to close.
    pub fn is_closed(&self) -> bool {
        self.control.kill.is_cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatcluster_protocol::frame::Empty;
    use chatcluster_protocol::frame::ReplyData;

    fn pong() -> ServerFrame {
        ServerFrame::Ok {
            id: None,
            clock: 1,
            data: ReplyData::Pong(Empty {}),
        }
    }

    #[test]
    fn full_queue_closes_as_slow_reader_once() {
        let metrics = Arc::new(Metrics::new());
        let (outbox, inbox) = Outbox::channel(1, Encoding::Json, 2, metrics.clone());
        let frame = SharedFrame::new(pong());
        assert!(outbox.push_shared(&frame));
        assert!(outbox.push_shared(&frame));
        assert!(!outbox.push_shared(&frame));
        assert!(!outbox.push_shared(&frame));
        assert!(outbox.is_closed());
        assert_eq!(inbox.close_reason(), Some(CloseReason::SlowReader));
        assert_eq!(metrics.slow_reader_disconnects_total.get(), 1);
        assert_eq!(metrics.messages_out_total.get(), 2);
    }

    #[test]
    fn shared_frames_encode_once_per_encoding() {
        let frame = SharedFrame::new(pong());
        let (Message::Text(a), Message::Text(b)) =
            (frame.message(Encoding::Json), frame.message(Encoding::Json))
        else {
            panic!("json frames are text");
        };
        assert_eq!(
            a.as_str().as_ptr(),
            b.as_str().as_ptr(),
            "same bytes shared"
        );
        assert!(matches!(
            frame.message(Encoding::MsgPack),
            Message::Binary(_)
        ));
    }
}
