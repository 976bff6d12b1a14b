//! What is stored in Redis streams and published on topics.
//!
//! The append script (see [`crate::scripts`]) stores one MessagePack payload
//! three times. A channel message, a [`StoredMessage`]: in the channel's
//! history stream (entry id `<offset>-0`, field `d`), in the shard's
//! persistence stream (fields `k=msg`, `o=<offset>`, `d`), and on the channel
//! topic (`m<offset>:<epoch>:<payload>`). A direct message, a [`StoredDirect`],
//! once per inbox it enters (the recipient's and the sender's): in the user's
//! inbox stream (`<offset>-0`, `d`), in the persistence stream (`k=dm`,
//! `u=<inbox owner>`, `o=<inbox offset>`, `d`) and on the user's topic
//! (`i<offset>:<epoch>:<payload>`). The offset is assigned inside the script,
//! so it travels beside the payload. Gateways and the worker decode those
//! bytes with the functions here only.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::codec::{self, Encoding};
use crate::frame::{ChannelMessage, DirectMessage, PresenceEvent};

/// Milliseconds since the Unix epoch, on the wire as RFC 3339 UTC with
/// milliseconds (`2026-11-22T20:00:00.000Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        Self(chrono::Utc::now().timestamp_millis())
    }

    /// As a `chrono` UTC time (the epoch when out of range).
    pub fn to_datetime(self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_millis(self.0).unwrap_or_default()
    }

    /// From a `chrono` time.
    pub fn from_datetime(time: chrono::DateTime<chrono::Utc>) -> Self {
        Self(time.timestamp_millis())
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_datetime().format("%Y-%m-%dT%H:%M:%S%.3fZ"))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        chrono::DateTime::parse_from_rfc3339(&text)
            .map(|t| Self(t.timestamp_millis()))
            .map_err(|e| serde::de::Error::custom(format!("invalid timestamp {text:?}: {e}")))
    }
}

/// A channel message as stored, before the script gives it an offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// The channel.
    pub channel: String,
    /// Unique id.
    pub msg_id: Uuid,
    /// Author.
    pub user: String,
    /// Text.
    pub text: String,
    /// Acceptance time, ms since the epoch.
    pub ts: i64,
    /// Lamport clock at publish.
    pub clock: u64,
}

impl StoredMessage {
    /// The MessagePack payload stored and published.
    pub fn encode(&self) -> Vec<u8> {
        codec::to_msgpack(self)
    }

    /// Decodes a payload written by [`StoredMessage::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, EntryError> {
        codec::decode(Encoding::MsgPack, bytes).map_err(|e| EntryError::Payload(e.to_string()))
    }

    /// The wire form once the message has its offset.
    pub fn into_channel_message(self, offset: u64) -> ChannelMessage {
        ChannelMessage {
            channel: self.channel,
            offset,
            msg_id: self.msg_id,
            user: self.user,
            text: self.text,
            ts: crate::entry::Timestamp(self.ts),
            clock: self.clock,
        }
    }
}

/// A direct message as stored and published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDirect {
    /// Unique id.
    pub msg_id: Uuid,
    /// Sender.
    pub from: String,
    /// Recipient.
    pub to: String,
    /// Text.
    pub text: String,
    /// Acceptance time, ms since the epoch.
    pub ts: i64,
    /// Lamport clock at send.
    pub clock: u64,
}

impl StoredDirect {
    /// The MessagePack payload stored and published.
    pub fn encode(&self) -> Vec<u8> {
        codec::to_msgpack(self)
    }

    /// Decodes a payload written by [`StoredDirect::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, EntryError> {
        codec::decode(Encoding::MsgPack, bytes).map_err(|e| EntryError::Payload(e.to_string()))
    }

    /// The wire form, at `offset` of the inbox it is pushed from (if any).
    pub fn into_direct_message(self, offset: Option<u64>) -> DirectMessage {
        DirectMessage {
            offset,
            msg_id: self.msg_id,
            from: self.from,
            to: self.to,
            text: self.text,
            ts: Timestamp(self.ts),
            clock: self.clock,
        }
    }
}

/// A persistence-stream entry that could not be decoded (a poison entry).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// A field the kind requires is absent.
    #[error("missing field {0:?}")]
    MissingField(&'static str),
    /// The `k` field names no known kind.
    #[error("unknown entry kind {0:?}")]
    UnknownKind(String),
    /// A field is not what it should be.
    #[error("field {field:?} is invalid: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The MessagePack payload does not decode.
    #[error("undecodable payload: {0}")]
    Payload(String),
    /// A topic message with an unknown shape.
    #[error("malformed topic message: {0}")]
    Topic(&'static str),
}

/// Field names of persistence-stream entries.
pub mod field {
    /// Entry kind: `msg`, `dm`, `user`, `chan`.
    pub const KIND: &str = "k";
    /// Channel offset (`msg`) or inbox offset (`dm`).
    pub const OFFSET: &str = "o";
    /// The user whose inbox a `dm` entry is in.
    pub const OWNER: &str = "u";
    /// MessagePack payload (`msg`, `dm`; also the history stream).
    pub const DATA: &str = "d";
    /// Name (`user`, `chan`).
    pub const NAME: &str = "n";
    /// Creation time in ms (`user`, `chan`).
    pub const TIME: &str = "t";
}

/// Values of the `k` field.
pub mod kind {
    /// A channel message.
    pub const MESSAGE: &str = "msg";
    /// A direct message.
    pub const DIRECT: &str = "dm";
    /// A user seen for the first time.
    pub const USER: &str = "user";
    /// A channel created.
    pub const CHANNEL: &str = "chan";
}

/// One entry of a persistence stream, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PersistEntry {
    /// A channel message with its offset.
    Message {
        /// Offset in the channel.
        offset: u64,
        /// The message.
        message: StoredMessage,
    },
    /// A direct message, in the inbox of one of its two users (entries
    /// written before inboxes existed have none).
    Direct {
        /// The inbox: its owner and the message's offset there.
        inbox: Option<InboxSlot>,
        /// The message.
        direct: StoredDirect,
    },
    /// A user registered.
    User {
        /// User name.
        name: String,
        /// First seen, ms since the epoch.
        ts: i64,
    },
    /// A channel created.
    Channel {
        /// Channel name.
        name: String,
        /// Created, ms since the epoch.
        ts: i64,
    },
}

/// Where a direct message sits in one user's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxSlot {
    /// The inbox owner (the sender or the recipient).
    pub owner: String,
    /// The message's offset in that inbox.
    pub offset: u64,
}

fn utf8(field: &'static str, value: &[u8]) -> Result<String, EntryError> {
    String::from_utf8(value.to_vec()).map_err(|_| EntryError::InvalidField {
        field,
        reason: "not UTF-8".into(),
    })
}

fn number<T: std::str::FromStr>(field: &'static str, value: &[u8]) -> Result<T, EntryError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| EntryError::InvalidField {
            field,
            reason: format!("not an integer: {:?}", String::from_utf8_lossy(value)),
        })
}

impl PersistEntry {
    /// Decodes an entry from its field/value pairs, as `XREADGROUP` returns them.
    pub fn decode<'a>(
        fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Self, EntryError> {
        let (mut kind, mut offset, mut data, mut name, mut time, mut owner) =
            (None, None, None, None, None, None);
        for (key, value) in fields {
            let slot = match key {
                b"k" => &mut kind,
                b"o" => &mut offset,
                b"d" => &mut data,
                b"n" => &mut name,
                b"t" => &mut time,
                b"u" => &mut owner,
                _ => continue,
            };
            *slot = Some(value);
        }
        let kind = kind.ok_or(EntryError::MissingField(field::KIND))?;
        match kind {
            b"msg" => Ok(Self::Message {
                offset: number(
                    field::OFFSET,
                    offset.ok_or(EntryError::MissingField(field::OFFSET))?,
                )?,
                message: StoredMessage::decode(data.ok_or(EntryError::MissingField(field::DATA))?)?,
            }),
            b"dm" => {
                let inbox = match (owner, offset) {
                    (Some(owner), Some(offset)) => Some(InboxSlot {
                        owner: utf8(field::OWNER, owner)?,
                        offset: number(field::OFFSET, offset)?,
                    }),
                    (None, None) => None,
                    (None, Some(_)) => return Err(EntryError::MissingField(field::OWNER)),
                    (Some(_), None) => return Err(EntryError::MissingField(field::OFFSET)),
                };
                let direct =
                    StoredDirect::decode(data.ok_or(EntryError::MissingField(field::DATA))?)?;
                Ok(Self::Direct { inbox, direct })
            }
            b"user" | b"chan" => {
                let name = utf8(
                    field::NAME,
                    name.ok_or(EntryError::MissingField(field::NAME))?,
                )?;
                let ts = number(
                    field::TIME,
                    time.ok_or(EntryError::MissingField(field::TIME))?,
                )?;
                Ok(if kind == b"user" {
                    Self::User { name, ts }
                } else {
                    Self::Channel { name, ts }
                })
            }
            other => Err(EntryError::UnknownKind(
                String::from_utf8_lossy(other).into_owned(),
            )),
        }
    }

    /// The field/value pairs of this entry, as the scripts write them.
    pub fn fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        match self {
            Self::Message { offset, message } => vec![
                (field::KIND, kind::MESSAGE.into()),
                (field::OFFSET, offset.to_string().into_bytes()),
                (field::DATA, message.encode()),
            ],
            Self::Direct { inbox, direct } => {
                let mut fields = vec![(field::KIND, kind::DIRECT.into())];
                if let Some(slot) = inbox {
                    fields.push((field::OWNER, slot.owner.clone().into_bytes()));
                    fields.push((field::OFFSET, slot.offset.to_string().into_bytes()));
                }
                fields.push((field::DATA, direct.encode()));
                fields
            }
            Self::User { name, ts } | Self::Channel { name, ts } => vec![
                (
                    field::KIND,
                    if matches!(self, Self::User { .. }) {
                        kind::USER
                    } else {
                        kind::CHANNEL
                    }
                    .into(),
                ),
                (field::NAME, name.clone().into_bytes()),
                (field::TIME, ts.to_string().into_bytes()),
            ],
        }
    }
}

/// A message received on a topic (`cc:ch:*` or `cc:user:*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicEvent {
    /// `m<offset>:<epoch>:<StoredMessage>`: a channel message.
    Message {
        /// Offset in the channel.
        offset: u64,
        /// Epoch of the channel's history (epochs never contain `:`).
        epoch: String,
        /// The message.
        message: StoredMessage,
    },
    /// `i<offset>:<epoch>:<StoredDirect>`: a direct message entering the
    /// inbox of the topic's user.
    Inbox {
        /// Offset in the user's inbox.
        offset: u64,
        /// Epoch of the inbox's history.
        epoch: String,
        /// The message.
        direct: StoredDirect,
    },
    /// `p<PresenceEvent>`: a presence change.
    Presence(PresenceEvent),
}

/// Splits `<offset>:<epoch>:<payload>`.
fn sequenced(rest: &[u8]) -> Result<(u64, String, &[u8]), EntryError> {
    let mut parts = rest.splitn(3, |&b| b == b':');
    let (Some(offset), Some(epoch), Some(payload)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(EntryError::Topic("message without offset and epoch"));
    };
    Ok((
        number(field::OFFSET, offset)?,
        utf8("epoch", epoch)?,
        payload,
    ))
}

impl TopicEvent {
    /// Decodes a topic payload.
    pub fn decode(payload: &[u8]) -> Result<Self, EntryError> {
        let (&tag, rest) = payload.split_first().ok_or(EntryError::Topic("empty"))?;
        match tag {
            b'm' => {
                let (offset, epoch, payload) = sequenced(rest)?;
                Ok(Self::Message {
                    offset,
                    epoch,
                    message: StoredMessage::decode(payload)?,
                })
            }
            b'i' => {
                let (offset, epoch, payload) = sequenced(rest)?;
                Ok(Self::Inbox {
                    offset,
                    epoch,
                    direct: StoredDirect::decode(payload)?,
                })
            }
            b'p' => Ok(Self::Presence(
                codec::decode(Encoding::MsgPack, rest)
                    .map_err(|e| EntryError::Payload(e.to_string()))?,
            )),
            _ => Err(EntryError::Topic("unknown tag")),
        }
    }

    /// Encodes a topic payload (the scripts build `m` and `d` payloads themselves;
    /// this is their reference and the encoder of presence events).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Message {
                offset,
                epoch,
                message,
            } => {
                let mut out = format!("m{offset}:{epoch}:").into_bytes();
                out.extend(message.encode());
                out
            }
            Self::Inbox {
                offset,
                epoch,
                direct,
            } => {
                let mut out = format!("i{offset}:{epoch}:").into_bytes();
                out.extend(direct.encode());
                out
            }
            Self::Presence(event) => {
                let mut out = vec![b'p'];
                out.extend(codec::to_msgpack(event));
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> StoredMessage {
        StoredMessage {
            channel: "geral".into(),
            msg_id: Uuid::from_u128(7),
            user: "alice".into(),
            text: "Olá!".into(),
            ts: 1_795_000_000_123,
            clock: 19,
        }
    }

    fn direct() -> StoredDirect {
        StoredDirect {
            msg_id: Uuid::from_u128(9),
            from: "alice".into(),
            to: "bob".into(),
            text: "Oi".into(),
            ts: 5,
            clock: 2,
        }
    }

    #[test]
    fn timestamp_wire_form() {
        let ts = Timestamp(1_795_000_000_123);
        let json = serde_json::to_string(&ts).unwrap();
        assert_eq!(json, "\"2026-11-18T11:06:40.123Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), ts);
        assert!(serde_json::from_str::<Timestamp>("\"yesterday\"").is_err());
    }

    #[test]
    fn persist_entries_round_trip() {
        let entries = [
            PersistEntry::Message {
                offset: 42,
                message: message(),
            },
            PersistEntry::Direct {
                inbox: Some(InboxSlot {
                    owner: "bob".into(),
                    offset: 12,
                }),
                direct: direct(),
            },
            PersistEntry::Direct {
                inbox: None,
                direct: direct(),
            },
            PersistEntry::User {
                name: "bob".into(),
                ts: 3,
            },
            PersistEntry::Channel {
                name: "geral".into(),
                ts: 4,
            },
        ];
        for entry in entries {
            let fields = entry.fields();
            let decoded =
                PersistEntry::decode(fields.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())));
            assert_eq!(decoded, Ok(entry));
        }
    }

    #[test]
    fn poison_entries_are_errors_not_panics() {
        let decode = |pairs: &[(&str, &[u8])]| {
            PersistEntry::decode(pairs.iter().map(|(k, v)| (k.as_bytes(), *v)))
        };
        assert_eq!(decode(&[]), Err(EntryError::MissingField("k")));
        assert!(matches!(
            decode(&[("k", b"zzz")]),
            Err(EntryError::UnknownKind(_))
        ));
        assert!(matches!(
            decode(&[("k", b"msg"), ("o", b"x"), ("d", b"")]),
            Err(EntryError::InvalidField { .. })
        ));
        assert!(matches!(
            decode(&[("k", b"msg"), ("o", b"1"), ("d", b"\xc1")]),
            Err(EntryError::Payload(_))
        ));
        assert_eq!(
            decode(&[("k", b"user"), ("t", b"1")]),
            Err(EntryError::MissingField("n"))
        );
        assert_eq!(
            decode(&[("k", b"dm"), ("o", b"1"), ("d", b"")]),
            Err(EntryError::MissingField("u")),
            "an inbox offset needs its owner"
        );
    }

    #[test]
    fn topic_events_round_trip() {
        let events = [
            TopicEvent::Message {
                offset: 3,
                epoch: "e1".into(),
                message: message(),
            },
            TopicEvent::Inbox {
                offset: 4,
                epoch: "e2".into(),
                direct: direct(),
            },
            TopicEvent::Presence(PresenceEvent {
                channel: "geral".into(),
                event: crate::frame::PresenceChange::Leave,
                user: "carol".into(),
                clock: 8,
            }),
        ];
        for event in events {
            assert_eq!(TopicEvent::decode(&event.encode()), Ok(event));
        }
        assert!(TopicEvent::decode(b"").is_err());
        assert!(TopicEvent::decode(b"m12").is_err());
        assert!(TopicEvent::decode(b"m12:e1").is_err());
        assert!(TopicEvent::decode(b"x").is_err());
    }
}
