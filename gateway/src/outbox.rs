//! The sending side of one WebSocket connection, and frames shared between many.
//!
//! A push is encoded once per encoding into complete WebSocket frame bytes
//! ([`SharedFrame`]), shared by every local recipient. A connection's queue is
//! a short locked list of those byte chunks: queueing is a lock, a push and an
//! unlock, and the writer is woken only when the queue goes from empty to not
//! empty. The writer takes everything queued at once and writes it with one
//! vectored write. The queue is bounded in frames; a reader that lets it fill
//! up is closed with 1008 rather than allowed to grow memory ([`Outbox::push`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use chatcluster_protocol::codec::{self, Encoding};
use chatcluster_protocol::frame::ServerFrame;

use crate::ws::{self, close_code};

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
    /// Bytes that are not acceptable WebSocket (1002, or 1007 for bad UTF-8).
    Protocol(u16),
    /// Nothing received within the idle timeout (1001).
    Idle,
    /// The gateway is shutting down (1001).
    Shutdown,
    /// The session's token expired and was not refreshed (4001).
    TokenExpired,
}

impl CloseReason {
    /// The close code and reason text sent to the client.
    pub fn close_frame(self) -> (u16, &'static str) {
        match self {
            Self::Normal => (close_code::NORMAL, "bye"),
            Self::SlowReader => (close_code::POLICY, "slow reader: outbound queue full"),
            Self::BadFrames => (close_code::POLICY, "too many malformed frames"),
            Self::TooLarge => (close_code::TOO_BIG, "frame too large"),
            Self::Protocol(code) => (code, "websocket protocol error"),
            Self::Idle => (close_code::GOING_AWAY, "idle timeout"),
            Self::Shutdown => (close_code::GOING_AWAY, "server shutting down"),
            Self::TokenExpired => (close_code::TOKEN_EXPIRED, "token expired"),
        }
    }
}

/// Encodes a server frame as a complete WebSocket frame in `encoding`.
pub fn encode_frame(encoding: Encoding, frame: &ServerFrame) -> Bytes {
    let mut buffer = ws::payload_buffer(256);
    codec::encode_into(encoding, frame, &mut buffer);
    let opcode = if encoding.is_binary() {
        ws::opcode::BINARY
    } else {
        ws::opcode::TEXT
    };
    ws::frame_in_place(opcode, buffer)
}

/// A server frame encoded lazily, at most once per encoding.
#[derive(Debug)]
pub struct SharedFrame {
    frame: ServerFrame,
    json: OnceLock<Bytes>,
    msgpack: OnceLock<Bytes>,
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

    /// The frame.
    pub fn frame(&self) -> &ServerFrame {
        &self.frame
    }

    /// The WebSocket frame bytes for `encoding`, encoded on first use.
    pub fn bytes(&self, encoding: Encoding) -> &Bytes {
        let cell = match encoding {
            Encoding::Json => &self.json,
            Encoding::MsgPack => &self.msgpack,
        };
        cell.get_or_init(|| encode_frame(encoding, &self.frame))
    }
}

/// Frames waiting to be written.
#[derive(Debug, Default)]
struct Queue {
    chunks: Vec<Bytes>,
    frames: usize,
    /// A reply is waiting: write without pacing.
    urgent: bool,
}

#[derive(Debug)]
struct Shared {
    id: ConnId,
    encoding: Encoding,
    capacity: usize,
    queue: Mutex<Queue>,
    wake: Notify,
    /// Set with `kill`; read on every push without taking a lock.
    closing: AtomicBool,
    kill: CancellationToken,
    reason: OnceLock<CloseReason>,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        // The queue holds plain data: a panic elsewhere leaves it usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sending side of one connection: cheap to clone, safe to use from any task.
#[derive(Debug, Clone)]
pub struct Outbox(Arc<Shared>);

/// The receiving side, owned by the connection's writer.
#[derive(Debug)]
pub struct Inbox(Arc<Shared>);

/// What [`Outbox::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// The queue was full: the connection is being closed as a slow reader
    /// (reported once, by the push that found it full).
    Overflowed,
    /// The connection is closing; nothing was queued.
    Closed,
}

impl Outbox {
    /// A connection's outbox and inbox with room for `capacity` frames.
    pub fn channel(id: ConnId, encoding: Encoding, capacity: usize) -> (Self, Inbox) {
        let shared = Arc::new(Shared {
            id,
            encoding,
            capacity: capacity.max(1),
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            kill: CancellationToken::new(),
            reason: OnceLock::new(),
        });
        (Self(shared.clone()), Inbox(shared))
    }

    /// The connection id.
    pub fn id(&self) -> ConnId {
        self.0.id
    }

    /// The connection's encoding.
    pub fn encoding(&self) -> Encoding {
        self.0.encoding
    }

    /// Queues `bytes` holding `frames` complete WebSocket frames; an `urgent`
    /// one (a reply, a ping or pong), or any push that fills half the queue, is
    /// written without waiting for the writer's pacing. A full queue closes the
    /// connection as a slow reader.
    pub fn push(&self, bytes: Bytes, frames: usize, urgent: bool) -> Pushed {
        if self.0.closing.load(Ordering::Acquire) {
            return Pushed::Closed;
        }
        let wake = {
            let mut queue = self.0.queue();
            if queue.frames + frames > self.0.capacity {
                drop(queue);
                return if self.close(CloseReason::SlowReader) {
                    Pushed::Overflowed
                } else {
                    Pushed::Closed
                };
            }
            queue.frames += frames;
            queue.chunks.push(bytes);
            // Half full: write now rather than wait for the pacing and overflow.
            let urgent = urgent || queue.frames * 2 >= self.0.capacity;
            let newly_urgent = urgent && !queue.urgent;
            queue.urgent |= urgent;
            queue.chunks.len() == 1 || newly_urgent
        };
        if wake {
            self.0.wake.notify_one();
        }
        Pushed::Queued
    }

    /// Queues a shared frame (a push) in this connection's encoding.
    pub fn push_shared(&self, frame: &SharedFrame) -> Pushed {
        self.push(frame.bytes(self.0.encoding).clone(), 1, false)
    }

    /// Encodes and queues a reply for this connection only.
    pub fn push_frame(&self, frame: &ServerFrame) -> Pushed {
        self.push(encode_frame(self.0.encoding, frame), 1, true)
    }

    /// Asks the connection to close; the first reason wins. Returns whether
    /// this call set the reason.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self.0.reason.set(reason).is_ok();
        self.0.closing.store(true, Ordering::Release);
        self.0.kill.cancel();
        first
    }

    /// Resolves once the connection was asked to close.
    pub async fn closed(&self) {
        self.0.kill.cancelled().await;
    }

    /// Whether the connection was asked to close.
    pub fn is_closed(&self) -> bool {
        self.0.closing.load(Ordering::Acquire)
    }
}

impl Inbox {
    /// Waits until something is queued (or the connection is closing).
    pub async fn ready(&self) {
        tokio::select! {
            () = self.0.wake.notified() => {}
            () = self.0.kill.cancelled() => {}
        }
    }

    /// Moves everything queued into `into` (which must be empty); returns the
    /// number of frames moved.
    pub fn take(&self, into: &mut Vec<Bytes>) -> usize {
        let mut queue = self.0.queue();
        std::mem::swap(&mut queue.chunks, into);
        queue.urgent = false;
        std::mem::take(&mut queue.frames)
    }

    /// Whether a reply is queued (to be written without pacing).
    pub fn is_urgent(&self) -> bool {
        self.0.queue().urgent
    }

    /// Cancelled when the connection must close.
    pub fn kill(&self) -> &CancellationToken {
        &self.0.kill
    }

    /// Why the connection is being closed, once it is.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.0.reason.get().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatcluster_protocol::frame::{Empty, ReplyData};

    fn pong() -> ServerFrame {
        ServerFrame::Ok {
            id: None,
            clock: 1,
            data: ReplyData::Pong(Empty {}),
        }
    }

    #[test]
    fn full_queue_closes_as_slow_reader_once() {
        let (outbox, inbox) = Outbox::channel(1, Encoding::Json, 2);
        let frame = SharedFrame::new(pong());
        assert_eq!(outbox.push_shared(&frame), Pushed::Queued);
        assert_eq!(outbox.push_shared(&frame), Pushed::Queued);
        assert_eq!(outbox.push_shared(&frame), Pushed::Overflowed);
        assert_eq!(outbox.push_shared(&frame), Pushed::Closed);
        assert!(outbox.is_closed());
        assert_eq!(inbox.close_reason(), Some(CloseReason::SlowReader));
    }

    #[test]
    fn a_half_full_queue_is_written_without_pacing() {
        let (outbox, inbox) = Outbox::channel(1, Encoding::Json, 4);
        let frame = SharedFrame::new(pong());
        outbox.push_shared(&frame);
        assert!(!inbox.is_urgent());
        outbox.push_shared(&frame);
        assert!(inbox.is_urgent());
    }

    #[test]
    fn the_writer_takes_everything_queued_at_once() {
        let (outbox, inbox) = Outbox::channel(1, Encoding::Json, 10);
        let frame = SharedFrame::new(pong());
        for _ in 0..3 {
            outbox.push_shared(&frame);
        }
        let mut chunks = Vec::new();
        assert_eq!(inbox.take(&mut chunks), 3);
        assert_eq!(chunks.len(), 3);
        let mut again = Vec::new();
        assert_eq!(inbox.take(&mut again), 0, "the queue is empty after a take");
        assert!(again.is_empty());
        // Room again after the take: the bound is on frames not yet taken.
        for _ in 0..10 {
            assert_eq!(outbox.push_shared(&frame), Pushed::Queued);
        }
    }

    #[test]
    fn shared_frames_encode_once_per_encoding_as_complete_websocket_frames() {
        let frame = SharedFrame::new(pong());
        let json = frame.bytes(Encoding::Json).clone();
        assert_eq!(
            json.as_ptr(),
            frame.bytes(Encoding::Json).as_ptr(),
            "same bytes shared"
        );
        assert_eq!(json[0], 0x81, "final text frame");
        let body: serde_json::Value = serde_json::from_slice(&json[2..]).unwrap();
        assert_eq!(body["type"], "ok");
        let msgpack = frame.bytes(Encoding::MsgPack);
        assert_eq!(msgpack[0], 0x82, "final binary frame");
    }

    #[tokio::test]
    async fn a_reply_wakes_the_writer_even_behind_queued_pushes() {
        let (outbox, inbox) = Outbox::channel(1, Encoding::Json, 10);
        let frame = SharedFrame::new(pong());
        outbox.push_shared(&frame);
        inbox.ready().await;
        assert!(!inbox.is_urgent());
        outbox.push_shared(&frame);
        outbox.push_frame(&pong());
        assert!(inbox.is_urgent());
        tokio::time::timeout(std::time::Duration::from_secs(1), inbox.ready())
            .await
            .expect("the reply wakes the pacing writer");
        let mut chunks = Vec::new();
        assert_eq!(inbox.take(&mut chunks), 3);
        assert!(!inbox.is_urgent());
    }

    #[tokio::test]
    async fn the_writer_wakes_once_per_empty_to_full_transition() {
        let (outbox, inbox) = Outbox::channel(1, Encoding::Json, 10);
        let frame = SharedFrame::new(pong());
        outbox.push_shared(&frame);
        outbox.push_shared(&frame);
        tokio::time::timeout(std::time::Duration::from_secs(1), inbox.ready())
            .await
            .expect("woken by the first push");
        let mut chunks = Vec::new();
        inbox.take(&mut chunks);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), inbox.ready())
                .await
                .is_err(),
            "no stale wake-up once drained"
        );
    }
}
