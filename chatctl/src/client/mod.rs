//! A protocol v1 client on the `protocol` crate's frame types, in JSON or MessagePack.
//!
//! [`transport`] opens one WebSocket (TCP from a chosen source address, or a gateway's Unix
//! socket); [`session`] keeps a logged-in session alive across disconnects and recovers every
//! subscribed channel by offset, so its user sees each message exactly once; [`retry`] makes
//! its writes idempotent and [`paging`] walks paged listings.

pub mod endpoint;
pub mod format;
pub mod paging;
pub mod retry;
pub mod session;
pub mod transport;

use chatcluster_protocol::Encoding;
use chatcluster_protocol::codec;
use chatcluster_protocol::frame::RawRequest;
use tokio_tungstenite::tungstenite::Message;

pub use endpoint::Wire;
pub use session::{Event, Identity, Session, SessionConfig, SessionHandle};
pub use transport::{ConnectOptions, Target, Ws, connect};

/// What went wrong talking to a gateway.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The target cannot be used.
    #[error("bad target {0}")]
    BadTarget(String),
    /// No WebSocket could be opened.
    #[error("cannot connect to {target}: {reason}")]
    Connect {
        /// The target.
        target: String,
        /// Why.
        reason: String,
    },
    /// The server answered with an error frame.
    #[error("{message} ({code})")]
    Server {
        /// The protocol error code (`rate_limited`, `not_found`, ...).
        code: String,
        /// Its explanation.
        message: String,
    },
    /// The connection dropped before the reply came.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// No reply within the timeout.
    #[error("no reply to {0} within the timeout")]
    Timeout(String),
    /// A frame could not be decoded.
    #[error("undecodable frame from the server: {0}")]
    Decode(String),
    /// The session was closed.
    #[error("the session is closed")]
    Closed,
}

/// A request as one WebSocket message of `encoding`.
pub fn request_message(encoding: Encoding, request: &RawRequest) -> Message {
    let bytes = codec::encode(encoding, request);
    match encoding {
        // serde_json writes UTF-8.
        Encoding::Json => Message::Text(String::from_utf8_lossy(&bytes).into_owned().into()),
        Encoding::MsgPack => Message::Binary(bytes),
    }
}

/// The payload of a data message, if it is one.
pub fn payload(message: &Message) -> Option<&[u8]> {
    match message {
        Message::Text(text) => Some(text.as_bytes()),
        Message::Binary(bytes) => Some(bytes),
        _ => None,
    }
}
