//! Frames of wire protocol v1: what clients send, what the server replies and pushes.
//!
//! Requests are decoded through [`RawRequest`], a flat struct with every field
//! optional, so that JSON and MessagePack share one decoder and a missing field
//! gets an error naming it (`publish needs "channel"`). Server frames are
//! internally tagged by `type`; `data` is generic so clients can decode it into
//! a `serde_json::Value` first and into the reply struct of their request next.
//!
//! Decoding bounds every field a client controls: numbers at 2^53−1
//! ([`crate::validate::MAX_SAFE_INTEGER`]), string ids, epochs, cursors and
//! tokens by length, and names are normalised to Unicode NFC here, so every
//! later step sees one spelling of a name.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::entry::Timestamp;
use crate::validate::{self, MAX_EPOCH_BYTES, MAX_ID_BYTES, MAX_SAFE_INTEGER, MAX_TOKEN_BYTES};

/// The identifier a client puts on a request; echoed in the reply.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestId {
    /// An integer id.
    Int(i64),
    /// A string id.
    Str(String),
}

/// The position a client last saw in a channel, for recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Since {
    /// Offset of the last message the client saw.
    pub offset: u64,
    /// Epoch of the channel's history when the client saw it.
    pub epoch: String,
}

/// A credential sent by a client (`refresh`): its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token([redacted, {} bytes])", self.0.len())
    }
}

/// A request exactly as it came off the wire: every field optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RawRequest {
    /// The operation name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    /// Client-chosen id echoed in the reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RequestId>,
    /// The client's Lamport clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<u64>,
    /// `login`: the user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Channel-scoped operations: the channel name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// `message`: the recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// `publish` and `message`: the text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `subscribe`: where to recover from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Since>,
    /// `history`: return messages before this offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<u64>,
    /// `history`, `users`, `channels`: page size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// `users`, `channels`: continue after this name (the previous page's `cursor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// `refresh`: the new JWT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Token>,
    /// `publish` and `message`: the client's key for retrying the same send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// `dm_history`: the other user of the conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with: Option<String>,
}

/// Just the id of a request, salvaged from a frame that failed to decode.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct IdOnly {
    #[serde(default)]
    pub id: Option<RequestId>,
}

/// One client operation with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Name the connection's user (`AUTH_MODE=none`).
    Login {
        /// The user name.
        user: String,
        /// The last inbox position the client saw, to recover its direct messages from.
        since: Option<Since>,
    },
    /// List known users, one page at a time.
    Users {
        /// Continue after this name.
        cursor: Option<String>,
        /// Page size.
        limit: Option<u32>,
    },
    /// Create a channel (idempotent).
    Channel {
        /// The channel name.
        channel: String,
    },
    /// List channels, one page at a time.
    Channels {
        /// Continue after this name.
        cursor: Option<String>,
        /// Page size.
        limit: Option<u32>,
    },
    /// Subscribe, optionally recovering after a known position.
    Subscribe {
        /// The channel name.
        channel: String,
        /// Last position seen, for recovery.
        since: Option<Since>,
    },
    /// Stop receiving a channel.
    Unsubscribe {
        /// The channel name.
        channel: String,
    },
    /// Publish a message to a channel.
    Publish {
        /// The channel name.
        channel: String,
        /// The message text.
        text: String,
        /// Retries with the same key return the first result.
        idempotency_key: Option<String>,
    },
    /// Send a direct message.
    Message {
        /// The recipient.
        to: String,
        /// The message text.
        text: String,
        /// Retries with the same key return the first result.
        idempotency_key: Option<String>,
    },
    /// List who is present in a channel.
    Presence {
        /// The channel name.
        channel: String,
    },
    /// Page through a channel's stored history.
    History {
        /// The channel name.
        channel: String,
        /// Only messages with a smaller offset.
        before: Option<u64>,
        /// Page size (1..=100).
        limit: Option<u32>,
    },
    /// List the user's direct-message conversations, newest first.
    Conversations {
        /// Only conversations whose last message has a smaller inbox offset.
        before: Option<u64>,
        /// Page size (1..=100).
        limit: Option<u32>,
    },
    /// Page through one direct-message conversation.
    DmHistory {
        /// The other user.
        with: String,
        /// Only messages with a smaller inbox offset.
        before: Option<u64>,
        /// Page size (1..=100).
        limit: Option<u32>,
    },
    /// Liveness round trip.
    Ping,
    /// Replace the connection's JWT before it expires (`AUTH_MODE=jwt`).
    Refresh {
        /// The new token.
        token: Token,
    },
}

impl Op {
    /// The wire name of the operation.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Login { .. } => "login",
            Op::Users { .. } => "users",
            Op::Channel { .. } => "channel",
            Op::Channels { .. } => "channels",
            Op::Subscribe { .. } => "subscribe",
            Op::Unsubscribe { .. } => "unsubscribe",
            Op::Publish { .. } => "publish",
            Op::Message { .. } => "message",
            Op::Presence { .. } => "presence",
            Op::History { .. } => "history",
            Op::Conversations { .. } => "conversations",
            Op::DmHistory { .. } => "dm_history",
            Op::Ping => "ping",
            Op::Refresh { .. } => "refresh",
        }
    }
}

/// A decoded, well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Client-chosen id echoed in the reply.
    pub id: Option<RequestId>,
    /// The client's Lamport clock.
    pub clock: Option<u64>,
    /// The operation.
    pub op: Op,
}

/// A request that could not be understood; answered with an error frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    /// The request's id when it could be read.
    pub id: Option<RequestId>,
    /// The error code.
    pub code: ErrorCode,
    /// What was wrong.
    pub message: String,
}

impl RequestError {
    pub(crate) fn bad_request(id: Option<RequestId>, message: impl Into<String>) -> Self {
        Self {
            id,
            code: ErrorCode::BadRequest,
            message: message.into(),
        }
    }
}

fn required(
    op: &str,
    field: &str,
    value: Option<String>,
    id: &Option<RequestId>,
) -> Result<String, RequestError> {
    value.ok_or_else(|| RequestError::bad_request(id.clone(), format!("{op} needs \"{field}\"")))
}

/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// Checks an idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY`] printable ASCII
/// characters without spaces (a UUID is a good key).
pub fn check_idempotency_key(key: &str) -> Result<(), String> {
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY
        || !key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(format!(
            "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters without spaces"
        ));
    }
    Ok(())
}

fn idempotency_key(
    key: Option<String>,
    id: &Option<RequestId>,
) -> Result<Option<String>, RequestError> {
    if let Some(key) = &key {
        check_idempotency_key(key).map_err(|e| RequestError::bad_request(id.clone(), e))?;
    }
    Ok(key)
}

impl TryFrom<RawRequest> for Request {
    type Error = RequestError;

    fn try_from(raw: RawRequest) -> Result<Self, RequestError> {
        let id = checked_id(raw.id)?;
        let Some(name) = raw.op else {
            return Err(RequestError::bad_request(id, "missing \"op\""));
        };
        let bound = |field: &str, value: Option<u64>| at_most_safe(field, value, &id);
        let clock = bound("clock", raw.clock)?;
        let before = bound("before", raw.before)?;
        if let Some(since) = &raw.since {
            bound("since.offset", Some(since.offset))?;
            short(&id, "since.epoch", Some(&since.epoch), MAX_EPOCH_BYTES)?;
        }
        short(
            &id,
            "cursor",
            raw.cursor.as_deref(),
            validate::MAX_CHANNEL_LEN,
        )?;
        short(
            &id,
            "token",
            raw.token.as_ref().map(|t| t.0.as_str()),
            MAX_TOKEN_BYTES,
        )?;
        let need = |field: &str, value: Option<String>| required(&name, field, value, &id);
        // One spelling per name: NFC (see `validate`).
        let (user, channel, to) = (
            raw.user.map(validate::nfc_owned),
            raw.channel.map(validate::nfc_owned),
            raw.to.map(validate::nfc_owned),
        );
        let cursor = raw.cursor.map(validate::nfc_owned);
        let op = match name.as_str() {
            "login" => Op::Login {
                user: need("user", user)?,
                since: raw.since,
            },
            "users" => Op::Users {
                cursor,
                limit: raw.limit,
            },
            "channel" => Op::Channel {
                channel: need("channel", channel)?,
            },
            "channels" => Op::Channels {
                cursor,
                limit: raw.limit,
            },
            "subscribe" => Op::Subscribe {
                channel: need("channel", channel)?,
                since: raw.since,
            },
            "unsubscribe" => Op::Unsubscribe {
                channel: need("channel", channel)?,
            },
            "publish" => Op::Publish {
                channel: need("channel", channel)?,
                text: need("text", raw.text)?,
                idempotency_key: idempotency_key(raw.idempotency_key, &id)?,
            },
            "message" => Op::Message {
                to: need("to", to)?,
                text: need("text", raw.text)?,
                idempotency_key: idempotency_key(raw.idempotency_key, &id)?,
            },
            "presence" => Op::Presence {
                channel: need("channel", channel)?,
            },
            "history" => Op::History {
                channel: need("channel", channel)?,
                before,
                limit: raw.limit,
            },
            "conversations" => Op::Conversations {
                before,
                limit: raw.limit,
            },
            "dm_history" => Op::DmHistory {
                with: need("with", raw.with.map(validate::nfc_owned))?,
                before,
                limit: raw.limit,
            },
            "ping" => Op::Ping,
            "refresh" => Op::Refresh {
                token: raw.token.ok_or_else(|| {
                    RequestError::bad_request(id.clone(), "refresh needs \"token\"")
                })?,
            },
            other => {
                let shown: String = other.chars().take(32).collect();
                return Err(RequestError::bad_request(
                    id,
                    format!("unknown op {shown:?}"),
                ));
            }
        };
        Ok(Request { id, clock, op })
    }
}

/// The request id, when it is within bounds: integers within ±(2^53−1),
/// strings of at most [`MAX_ID_BYTES`] bytes. An id out of bounds is refused
/// without being echoed.
fn checked_id(id: Option<RequestId>) -> Result<Option<RequestId>, RequestError> {
    match &id {
        Some(RequestId::Int(n)) if n.unsigned_abs() > MAX_SAFE_INTEGER => Err(
            RequestError::bad_request(None, "\"id\" must be an integer within ±(2^53-1)"),
        ),
        Some(RequestId::Str(s)) if s.len() > MAX_ID_BYTES => Err(RequestError::bad_request(
            None,
            format!("\"id\" must be at most {MAX_ID_BYTES} bytes"),
        )),
        _ => Ok(id),
    }
}

/// `value` when it is at most 2^53−1.
fn at_most_safe(
    field: &str,
    value: Option<u64>,
    id: &Option<RequestId>,
) -> Result<Option<u64>, RequestError> {
    match value {
        Some(n) if n > MAX_SAFE_INTEGER => Err(RequestError::bad_request(
            id.clone(),
            format!("\"{field}\" must be at most 2^53-1 ({MAX_SAFE_INTEGER}), got {n}"),
        )),
        other => Ok(other),
    }
}

/// Refuses a string field longer than `max` bytes.
fn short(
    id: &Option<RequestId>,
    field: &str,
    value: Option<&str>,
    max: usize,
) -> Result<(), RequestError> {
    match value {
        Some(value) if value.len() > max => Err(RequestError::bad_request(
            id.clone(),
            format!(
                "\"{field}\" is {} bytes, more than the limit of {max}",
                value.len()
            ),
        )),
        _ => Ok(()),
    }
}

impl From<&Request> for RawRequest {
    fn from(request: &Request) -> Self {
        let mut raw = RawRequest {
            op: Some(request.op.name().to_owned()),
            id: request.id.clone(),
            clock: request.clock,
            ..RawRequest::default()
        };
        match &request.op {
            Op::Login { user, since } => {
                raw.user = Some(user.clone());
                raw.since = since.clone();
            }
            Op::Ping => {}
            Op::Users { cursor, limit } | Op::Channels { cursor, limit } => {
                raw.cursor = cursor.clone();
                raw.limit = *limit;
            }
            Op::Refresh { token } => raw.token = Some(token.clone()),
            Op::Channel { channel } | Op::Unsubscribe { channel } | Op::Presence { channel } => {
                raw.channel = Some(channel.clone())
            }
            Op::Subscribe { channel, since } => {
                raw.channel = Some(channel.clone());
                raw.since = since.clone();
            }
            Op::Publish {
                channel,
                text,
                idempotency_key,
            } => {
                raw.channel = Some(channel.clone());
                raw.text = Some(text.clone());
                raw.idempotency_key = idempotency_key.clone();
            }
            Op::Message {
                to,
                text,
                idempotency_key,
            } => {
                raw.to = Some(to.clone());
                raw.text = Some(text.clone());
                raw.idempotency_key = idempotency_key.clone();
            }
            Op::History {
                channel,
                before,
                limit,
            } => {
                raw.channel = Some(channel.clone());
                raw.before = *before;
                raw.limit = *limit;
            }
            Op::Conversations { before, limit } => {
                raw.before = *before;
                raw.limit = *limit;
            }
            Op::DmHistory {
                with,
                before,
                limit,
            } => {
                raw.with = Some(with.clone());
                raw.before = *before;
                raw.limit = *limit;
            }
        }
        raw
    }
}

/// Error codes of error replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed or invalid request.
    BadRequest,
    /// Not logged in, or bad credentials.
    Unauthorized,
    /// Logged in but not allowed (JWT `channels` claim).
    Forbidden,
    /// No such channel or user.
    NotFound,
    /// A rate limit was exceeded (the connection's op budget, its message
    /// rate, or the user's channel-creation quota); retry later.
    RateLimited,
    /// A configured limit is reached (total channels, connections of one
    /// user); retrying does not help until something is released.
    LimitExceeded,
    /// Text or frame over the limit.
    TooLarge,
    /// A backend (Redis, PostgreSQL) is unreachable; retry later.
    Unavailable,
    /// A write may or may not have happened (Redis did not answer after the
    /// request was sent): retry with the same idempotency key.
    UnknownOutcome,
    /// A bug on the server.
    Internal,
}

impl ErrorCode {
    /// The wire name, as used in metrics labels too.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::RateLimited => "rate_limited",
            Self::LimitExceeded => "limit_exceeded",
            Self::TooLarge => "too_large",
            Self::Unavailable => "unavailable",
            Self::UnknownOutcome => "unknown_outcome",
            Self::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A channel message, pushed live and returned by `subscribe` (`missed`) and `history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelMessage {
    /// The channel.
    pub channel: String,
    /// Dense per-channel sequence number.
    pub offset: u64,
    /// Unique id of the message.
    pub msg_id: Uuid,
    /// Author.
    pub user: String,
    /// Text.
    pub text: String,
    /// When the gateway accepted it.
    pub ts: Timestamp,
    /// Lamport clock at publish.
    pub clock: u64,
}

/// A direct message push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectMessage {
    /// Position in the inbox of the user it is pushed to (or listed for):
    /// dense per user, like a channel offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Unique id of the message.
    pub msg_id: Uuid,
    /// Sender.
    pub from: String,
    /// Recipient.
    pub to: String,
    /// Text.
    pub text: String,
    /// When the gateway accepted it.
    pub ts: Timestamp,
    /// Lamport clock at send.
    pub clock: u64,
}

/// What happened to a member of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceChange {
    /// A user's first connection subscribed.
    Join,
    /// A user's last connection left (or expired).
    Leave,
}

/// A presence push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    /// The channel.
    pub channel: String,
    /// Join or leave.
    pub event: PresenceChange,
    /// The user.
    pub user: String,
    /// Lamport clock of the event.
    pub clock: u64,
}

/// Every frame the server sends. `D` is the reply payload type: [`ReplyData`]
/// when encoding, any self-describing value (e.g. `serde_json::Value`) when decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<D = ReplyData> {
    /// Successful reply.
    Ok {
        /// The request's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        /// Lamport clock.
        clock: u64,
        /// Operation-specific payload.
        data: D,
    },
    /// Error reply.
    Error {
        /// The request's id, when it could be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        /// Lamport clock.
        #[serde(default)]
        clock: u64,
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
    },
    /// A channel message.
    Message(ChannelMessage),
    /// A direct message.
    Direct(DirectMessage),
    /// A presence change.
    Presence(PresenceEvent),
}

/// `login` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginReply {
    /// The user now bound to the connection.
    pub user: String,
    /// Where the user's inbox stands; direct messages after `inbox.offset`
    /// follow as pushes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbox: Option<InboxPosition>,
}

/// Where a user's inbox (its direct messages, sent and received) stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxPosition {
    /// Epoch of the inbox's recent history in Redis.
    pub epoch: String,
    /// The inbox offset the reply covers; pushes continue after it.
    pub offset: u64,
    /// Whether every direct message after the position recovered from (the
    /// request's `since`, or what the server last pushed to this user) is pushed.
    pub recovered: bool,
}

/// `users` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsersReply {
    /// One page of known users, sorted.
    pub users: Vec<String>,
    /// Where the next page starts (send it as `cursor`); absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// `channel` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelReply {
    /// The channel.
    pub channel: String,
    /// Whether this request created it.
    pub created: bool,
}

/// `channels` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelsReply {
    /// One page of known channels, sorted.
    pub channels: Vec<String>,
    /// Where the next page starts (send it as `cursor`); absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// `refresh` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshReply {
    /// The user (unchanged).
    pub user: String,
    /// The new token's `exp` (seconds since the Unix epoch), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
}

/// `subscribe` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeReply {
    /// The channel.
    pub channel: String,
    /// Epoch of the channel's history.
    pub epoch: String,
    /// Newest offset of the channel (0 when empty).
    pub offset: u64,
    /// Users present, sorted.
    pub presence: Vec<String>,
    /// Whether `missed` holds exactly every message after `since`.
    pub recovered: bool,
    /// Messages after `since`, oldest first.
    pub missed: Vec<ChannelMessage>,
}

/// Reply that names only a channel (`unsubscribe`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelOnly {
    /// The channel.
    pub channel: String,
}

/// `publish` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishReply {
    /// The channel.
    pub channel: String,
    /// Offset given to the message.
    pub offset: u64,
    /// Id given to the message.
    pub msg_id: Uuid,
}

/// `message` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectReply {
    /// Id given to the message.
    pub msg_id: Uuid,
    /// The message's offset in the sender's own inbox.
    pub offset: u64,
}

/// `presence` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceReply {
    /// The channel.
    pub channel: String,
    /// Users present, sorted.
    pub users: Vec<String>,
}

/// `history` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryReply {
    /// The channel.
    pub channel: String,
    /// Messages, newest last.
    pub messages: Vec<ChannelMessage>,
}

/// One direct-message conversation of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// The other user.
    pub with: String,
    /// The newest message of the conversation (`offset`: in the asking user's inbox).
    pub last: DirectMessage,
}

/// `conversations` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationsReply {
    /// Conversations, the one with the newest message first.
    pub conversations: Vec<Conversation>,
}

/// `dm_history` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmHistoryReply {
    /// The other user.
    pub with: String,
    /// Messages sent and received, newest last (`offset`: in the asking user's inbox).
    pub messages: Vec<DirectMessage>,
}

/// `ping` reply: an empty object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// The payload of an `ok` reply, one variant per operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ReplyData {
    /// `login`.
    Login(LoginReply),
    /// `users`.
    Users(UsersReply),
    /// `channel`.
    Channel(ChannelReply),
    /// `channels`.
    Channels(ChannelsReply),
    /// `subscribe`.
    Subscribe(SubscribeReply),
    /// `unsubscribe`.
    Unsubscribe(ChannelOnly),
    /// `publish`.
    Publish(PublishReply),
    /// `message`.
    Direct(DirectReply),
    /// `presence`.
    Presence(PresenceReply),
    /// `history`.
    History(HistoryReply),
    /// `conversations`.
    Conversations(ConversationsReply),
    /// `dm_history`.
    DmHistory(DmHistoryReply),
    /// `ping`.
    Pong(Empty),
    /// `refresh`.
    Refresh(RefreshReply),
}
