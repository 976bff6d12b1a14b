//! The two kinds of sequenced streams: a channel, and a user's inbox of
//! direct messages (sent and received).
//!
//! Both work the same way (a meta hash with epoch, top and limit; a history
//! stream with entry ids `<offset>-0`; a topic; offsets reserved in blocks in
//! PostgreSQL), so the gateway's delivery core, epochs and history pages
//! handle a [`StreamId`] and only this module knows where the two differ: key
//! names, payload types, the push frame each entry becomes, and the keys and
//! arguments of the [`crate::scripts::APPEND`] and [`crate::scripts::INIT_EPOCH`]
//! calls (the one place their layout is written down, for the gateway and for
//! tests that publish like it).

use std::sync::Arc;

use uuid::Uuid;

use crate::entry::{EntryError, StoredDirect, StoredMessage};
use crate::frame::ServerFrame;
use crate::keys;

/// What a sequenced stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamKind {
    /// A channel's messages.
    Channel,
    /// A user's direct messages, sent and received.
    Inbox,
}

impl StreamKind {
    /// Name in logs, metrics and the `offset_blocks` table.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Channel => "channel",
            Self::Inbox => "inbox",
        }
    }
}

/// A channel or a user's inbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId {
    /// Which kind.
    pub kind: StreamKind,
    /// The channel or user name.
    pub name: Arc<str>,
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind.as_str(), self.name)
    }
}

/// The Redis keys of a stream, all with its shard's hash tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamKeys {
    /// Meta hash (`epoch`, `gen`, `top`, `base`, `limit`).
    pub meta: String,
    /// History stream.
    pub history: String,
    /// The shard's persistence stream.
    pub persist: String,
    /// The shard's life key.
    pub life: String,
}

impl StreamId {
    /// A channel.
    pub fn channel(name: &str) -> Self {
        Self {
            kind: StreamKind::Channel,
            name: name.into(),
        }
    }

    /// A user's inbox.
    pub fn inbox(user: &str) -> Self {
        Self {
            kind: StreamKind::Inbox,
            name: user.into(),
        }
    }

    /// Its Redis keys among `shards` persistence shards.
    pub fn keys(&self, shards: u32) -> StreamKeys {
        let shard = keys::shard_of(&self.name, shards);
        let (meta, history) = match self.kind {
            StreamKind::Channel => (
                keys::meta_key(&self.name, shards),
                keys::history_key(&self.name, shards),
            ),
            StreamKind::Inbox => (
                keys::inbox_meta_key(&self.name, shards),
                keys::inbox_key(&self.name, shards),
            ),
        };
        StreamKeys {
            meta,
            history,
            persist: keys::persist_key(shard),
            life: keys::life_key(shard),
        }
    }

    /// Its pub/sub topic.
    pub fn topic(&self) -> String {
        match self.kind {
            StreamKind::Channel => keys::channel_topic(&self.name),
            StreamKind::Inbox => keys::user_topic(&self.name),
        }
    }

    /// The tag of its messages on the topic (see `TopicEvent`).
    pub fn topic_tag(&self) -> &'static str {
        match self.kind {
            StreamKind::Channel => "m",
            StreamKind::Inbox => "i",
        }
    }

    /// The `k` field of its persistence entries.
    pub fn persist_kind(&self) -> &'static str {
        match self.kind {
            StreamKind::Channel => crate::entry::kind::MESSAGE,
            StreamKind::Inbox => crate::entry::kind::DIRECT,
        }
    }

    /// The keys and arguments of an [`crate::scripts::APPEND`] of `payload`
    /// (a [`StoredMessage`] or [`StoredDirect`]) with id `msg_id`, keeping
    /// its result in `record` (an idempotency record key) when given.
    pub fn append_call(
        &self,
        shards: u32,
        payload: Vec<u8>,
        msg_id: Uuid,
        record: Option<String>,
        settings: &AppendSettings,
    ) -> ScriptCall {
        let keys = self.keys(shards);
        let mut call = ScriptCall {
            keys: vec![keys.meta, keys.history, keys.persist, keys.life],
            args: Vec::with_capacity(11),
        };
        call.keys.extend(record);
        let owner = match self.kind {
            StreamKind::Channel => "",
            StreamKind::Inbox => &self.name,
        };
        let block = settings.block.max(2);
        call.args.push(payload);
        for arg in [
            settings.history_size.to_string(),
            settings.ttl_secs.to_string(),
            self.topic(),
            self.topic_tag().to_owned(),
            self.persist_kind().to_owned(),
            owner.to_owned(),
            msg_id.to_string(),
            settings.record_ms.max(1).to_string(),
            (block / 2).to_string(),
            (block / 16).max(1).to_string(),
        ] {
            call.args.push(arg.into_bytes());
        }
        call
    }

    /// The keys and arguments of an [`crate::scripts::INIT_EPOCH`] starting
    /// `epoch` after `floor` with offsets up to `limit` reserved.
    pub fn init_call(
        &self,
        shards: u32,
        epoch: &str,
        floor: u64,
        limit: u64,
        ttl_secs: u64,
    ) -> ScriptCall {
        let keys = self.keys(shards);
        ScriptCall {
            keys: vec![keys.meta, keys.history, keys.life],
            args: [
                epoch.to_owned(),
                floor.to_string(),
                limit.to_string(),
                ttl_secs.to_string(),
            ]
            .map(String::into_bytes)
            .into(),
        }
    }

    /// The push a history entry at `offset` becomes.
    pub fn decode_entry(&self, offset: u64, payload: &[u8]) -> Result<ServerFrame, EntryError> {
        Ok(match self.kind {
            StreamKind::Channel => {
                ServerFrame::Message(StoredMessage::decode(payload)?.into_channel_message(offset))
            }
            StreamKind::Inbox => ServerFrame::Direct(
                StoredDirect::decode(payload)?.into_direct_message(Some(offset)),
            ),
        })
    }
}

/// The `KEYS` and `ARGV` of one script call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptCall {
    /// `KEYS`.
    pub keys: Vec<String>,
    /// `ARGV`.
    pub args: Vec<Vec<u8>>,
}

/// How [`crate::scripts::APPEND`] keeps what it appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendSettings {
    /// Entries kept in the history stream.
    pub history_size: u64,
    /// Lifetime of an idle stream's meta and history in seconds (0: none).
    pub ttl_secs: u64,
    /// Lifetime of an idempotency record in ms.
    pub record_ms: u64,
    /// Offsets reserved at a time (the script reports when half is left).
    pub block: u64,
}

/// The offset of a sequenced push (`None` for other frames).
pub fn offset_of(frame: &ServerFrame) -> Option<u64> {
    match frame {
        ServerFrame::Message(message) => Some(message.offset),
        ServerFrame::Direct(direct) => direct.offset,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_and_inboxes_have_their_own_keys_in_their_shard() {
        let channel = StreamId::channel("bob").keys(4);
        let inbox = StreamId::inbox("bob").keys(4);
        assert_ne!(channel.meta, inbox.meta);
        assert_ne!(channel.history, inbox.history);
        assert_eq!(channel.persist, inbox.persist, "same name, same shard");
        assert_eq!(channel.life, inbox.life);
        assert!(inbox.meta.contains(":imeta:bob"));
        assert_eq!(StreamId::inbox("bob").topic(), "cc:user:bob");
        assert_eq!(StreamId::channel("bob").topic(), "cc:ch:bob");
    }

    #[test]
    fn append_calls_name_the_inbox_owner_and_the_record() {
        let settings = AppendSettings {
            history_size: 10,
            ttl_secs: 0,
            record_ms: 60_000,
            block: 1000,
        };
        let call = StreamId::inbox("bob").append_call(
            4,
            b"p".to_vec(),
            Uuid::nil(),
            Some("rec".into()),
            &settings,
        );
        assert_eq!(call.keys.len(), 5);
        assert_eq!(call.keys[4], "rec");
        let args: Vec<String> = call
            .args
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "p",
                "10",
                "0",
                "cc:user:bob",
                "i",
                "dm",
                "bob",
                "00000000-0000-0000-0000-000000000000",
                "60000",
                "500",
                "62"
            ]
        );
        let call =
            StreamId::channel("geral").append_call(4, Vec::new(), Uuid::nil(), None, &settings);
        assert_eq!(call.keys.len(), 4);
        assert_eq!(call.args[6], b"", "a channel has no inbox owner");
    }
}
