//! Turning raw stream entries into rows, and poison entries into dead letters.
//!
//! Pure code: a [`Batch`] is built from what was read, holds the rows to write
//! in one transaction and every entry id to acknowledge afterwards. An entry
//! that cannot become a row (undecodable, or a value PostgreSQL would reject),
//! or that was delivered `MAX_DELIVERIES` times already, becomes a
//! [`DeadLetter`] instead of blocking its shard.

use std::collections::HashSet;

use chatcluster_protocol::entry::PersistEntry;
use uuid::Uuid;

use crate::dead_letters::Cause;
use crate::reply::RawEntry;

/// Earliest timestamp accepted (0001-01-01T00:00:00Z), in ms since the epoch.
const MIN_TS_MS: i64 = -62_135_596_800_000;
/// Latest timestamp accepted (9999-12-31T23:59:59.999Z), in ms since the epoch.
const MAX_TS_MS: i64 = 253_402_300_799_999;

/// A row of `messages`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    /// Channel.
    pub channel: String,
    /// Offset in the channel.
    pub offset: i64,
    /// Message id.
    pub msg_id: Uuid,
    /// Author.
    pub user: String,
    /// Text.
    pub body: String,
    /// Acceptance time, ms since the epoch.
    pub sent_at_ms: i64,
    /// Lamport clock.
    pub clock: i64,
}

/// A row of `direct_messages`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectRow {
    /// Message id.
    pub msg_id: Uuid,
    /// Sender.
    pub from: String,
    /// Recipient.
    pub to: String,
    /// Text.
    pub body: String,
    /// Acceptance time, ms since the epoch.
    pub sent_at_ms: i64,
    /// Lamport clock.
    pub clock: i64,
}

/// A row of `inbox`: a direct message in one of its users' inboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxRow {
    /// The inbox owner.
    pub user: String,
    /// The message's offset in that inbox.
    pub offset: i64,
    /// Message id.
    pub msg_id: Uuid,
    /// The other user of the conversation.
    pub partner: String,
}

/// A row of `users` or `channels`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameRow {
    /// The name.
    pub name: String,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
}

/// One decoded entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    /// For `messages`.
    Message(MessageRow),
    /// For `direct_messages`, and `inbox` when the entry names its inbox.
    Direct(DirectRow, Option<InboxRow>),
    /// For `users`.
    User(NameRow),
    /// For `channels`.
    Channel(NameRow),
}

/// The rows of one transaction, per table, without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rows {
    /// `messages` rows.
    pub messages: Vec<MessageRow>,
    /// `direct_messages` rows.
    pub directs: Vec<DirectRow>,
    /// `inbox` rows (and, from them, `conversations`).
    pub inbox: Vec<InboxRow>,
    /// `users` rows.
    pub users: Vec<NameRow>,
    /// `channels` rows.
    pub channels: Vec<NameRow>,
}

impl Rows {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.messages.len()
            + self.directs.len()
            + self.inbox.len()
            + self.users.len()
            + self.channels.len()
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows of a single entry.
    pub fn single(row: Row) -> Self {
        let mut rows = Self::default();
        match row {
            Row::Message(m) => rows.messages.push(m),
            Row::Direct(d, slot) => {
                rows.directs.push(d);
                rows.inbox.extend(slot);
            }
            Row::User(u) => rows.users.push(u),
            Row::Channel(c) => rows.channels.push(c),
        }
        rows
    }
}

/// An entry moved to the dead-letter stream instead of being written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Index of the entry in [`Batch::entries`].
    pub entry: usize,
    /// What kind of failure.
    pub cause: Cause,
    /// Why it was rejected, for the operator.
    pub reason: String,
}

/// Entries read together: their rows, their dead letters, and all their ids.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Every entry of the batch, acknowledged together once the rows committed.
    pub entries: Vec<RawEntry>,
    /// What to write.
    pub rows: Rows,
    /// Entries that will not be written.
    pub dead: Vec<DeadLetter>,
    /// Oldest acceptance time among messages and direct messages, ms since the epoch.
    pub oldest_ms: Option<i64>,
}

fn checked_text(field: &str, value: String) -> Result<String, String> {
    if value.contains('\0') {
        Err(format!(
            "{field} contains a NUL byte, which PostgreSQL text cannot store"
        ))
    } else {
        Ok(value)
    }
}

fn checked_ts(ts: i64) -> Result<i64, String> {
    if (MIN_TS_MS..=MAX_TS_MS).contains(&ts) {
        Ok(ts)
    } else {
        Err(format!("timestamp {ts} ms is outside years 1..=9999"))
    }
}

fn checked_i64(field: &str, value: u64) -> Result<i64, String> {
    i64::try_from(value).map_err(|_| format!("{field} {value} does not fit a bigint"))
}

/// Decodes one entry into its row; `Ok(None)` for an entry deleted from the
/// stream while pending (nothing to write, only to acknowledge).
pub fn decode(entry: &RawEntry) -> Result<Option<Row>, String> {
    let Some(fields) = &entry.fields else {
        return Ok(None);
    };
    let decoded = PersistEntry::decode(fields.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
        .map_err(|e| e.to_string())?;
    let row = match decoded {
        PersistEntry::Message { offset, message } => Row::Message(MessageRow {
            channel: checked_text("channel", message.channel)?,
            offset: checked_i64("offset", offset)?,
            msg_id: message.msg_id,
            user: checked_text("user", message.user)?,
            body: checked_text("text", message.text)?,
            sent_at_ms: checked_ts(message.ts)?,
            clock: checked_i64("clock", message.clock)?,
        }),
        PersistEntry::Direct { inbox, direct } => {
            let slot = match inbox {
                Some(slot) => {
                    let partner = if slot.owner == direct.from {
                        &direct.to
                    } else if slot.owner == direct.to {
                        &direct.from
                    } else {
                        return Err(format!(
                            "inbox owner {:?} is neither sender nor recipient",
                            slot.owner
                        ));
                    };
                    Some(InboxRow {
                        partner: checked_text("to", partner.clone())?,
                        user: checked_text("inbox owner", slot.owner)?,
                        offset: checked_i64("inbox offset", slot.offset)?,
                        msg_id: direct.msg_id,
                    })
                }
                None => None,
            };
            Row::Direct(
                DirectRow {
                    msg_id: direct.msg_id,
                    from: checked_text("from", direct.from)?,
                    to: checked_text("to", direct.to)?,
                    body: checked_text("text", direct.text)?,
                    sent_at_ms: checked_ts(direct.ts)?,
                    clock: checked_i64("clock", direct.clock)?,
                },
                slot,
            )
        }
        PersistEntry::User { name, ts } => Row::User(NameRow {
            name: checked_text("name", name)?,
            created_ms: checked_ts(ts)?,
        }),
        PersistEntry::Channel { name, ts } => Row::Channel(NameRow {
            name: checked_text("name", name)?,
            created_ms: checked_ts(ts)?,
        }),
    };
    Ok(Some(row))
}

impl Batch {
    /// Builds a batch; an entry seen twice (same shard and id, e.g. read from
    /// the own pending list and claimed again) is kept once, and a message or
    /// direct message with the same id is written once (a message id already
    /// in PostgreSQL is skipped there). An entry on a delivery beyond
    /// `max_deliveries` is not decoded: it becomes a dead letter.
    pub fn build(raw: Vec<RawEntry>, max_deliveries: u64) -> Self {
        let mut batch = Self::default();
        let mut ids = HashSet::with_capacity(raw.len());
        let mut msg_ids = HashSet::with_capacity(raw.len());
        let (mut dm_ids, mut slots, mut users, mut channels) = (
            HashSet::new(),
            HashSet::new(),
            HashSet::new(),
            HashSet::new(),
        );
        for entry in raw {
            if !ids.insert(entry.key()) {
                continue;
            }
            let index = batch.entries.len();
            let delivery = entry.delivery.count();
            if delivery > max_deliveries {
                batch.dead.push(DeadLetter {
                    entry: index,
                    cause: Cause::MaxDeliveries,
                    reason: format!(
                        "delivered {delivery} times without being acknowledged \
                         (MAX_DELIVERIES={max_deliveries}): it may crash the worker"
                    ),
                });
                batch.entries.push(entry);
                continue;
            }
            match decode(&entry) {
                Ok(None) => {}
                Ok(Some(Row::Message(m))) => {
                    batch.oldest_ms = Some(
                        batch
                            .oldest_ms
                            .map_or(m.sent_at_ms, |o| o.min(m.sent_at_ms)),
                    );
                    if msg_ids.insert(m.msg_id) {
                        batch.rows.messages.push(m);
                    }
                }
                Ok(Some(Row::Direct(d, slot))) => {
                    batch.oldest_ms = Some(
                        batch
                            .oldest_ms
                            .map_or(d.sent_at_ms, |o| o.min(d.sent_at_ms)),
                    );
                    if let Some(slot) = slot
                        && slots.insert((slot.user.clone(), slot.msg_id))
                    {
                        batch.rows.inbox.push(slot);
                    }
                    if dm_ids.insert(d.msg_id) {
                        batch.rows.directs.push(d);
                    }
                }
                Ok(Some(Row::User(u))) => {
                    if users.insert(u.name.clone()) {
                        batch.rows.users.push(u);
                    }
                }
                Ok(Some(Row::Channel(c))) => {
                    if channels.insert(c.name.clone()) {
                        batch.rows.channels.push(c);
                    }
                }
                Err(reason) => batch.dead.push(DeadLetter {
                    entry: index,
                    cause: Cause::Poison,
                    reason,
                }),
            }
            batch.entries.push(entry);
        }
        batch
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the batch holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use chatcluster_protocol::entry::{StoredDirect, StoredMessage};

    use super::*;
    use crate::reply::Delivery;

    fn raw(shard: u32, id: &str, entry: &PersistEntry) -> RawEntry {
        RawEntry {
            shard,
            id: id.to_owned(),
            fields: Some(
                entry
                    .fields()
                    .into_iter()
                    .map(|(k, v)| (k.as_bytes().to_vec(), v))
                    .collect(),
            ),
            delivery: Delivery::First,
        }
    }

    fn message(offset: u64, n: u128, text: &str) -> PersistEntry {
        PersistEntry::Message {
            offset,
            message: StoredMessage {
                channel: "geral".into(),
                msg_id: Uuid::from_u128(n),
                user: "alice".into(),
                text: text.into(),
                ts: 1_795_000_000_000 + offset as i64,
                clock: 3,
            },
        }
    }

    #[test]
    fn decodes_every_kind_and_dedupes() {
        let direct = StoredDirect {
            msg_id: Uuid::from_u128(99),
            from: "a".into(),
            to: "b".into(),
            text: "oi".into(),
            ts: 5,
            clock: 1,
        };
        let in_inbox = |owner: &str, offset| PersistEntry::Direct {
            inbox: Some(chatcluster_protocol::entry::InboxSlot {
                owner: owner.into(),
                offset,
            }),
            direct: direct.clone(),
        };
        let (dm, dm_b, dm_a) = (
            PersistEntry::Direct {
                inbox: None,
                direct: direct.clone(),
            },
            in_inbox("b", 7),
            in_inbox("a", 3),
        );
        let batch = Batch::build(
            vec![
                raw(0, "1-0", &message(1, 1, "x")),
                raw(0, "1-0", &message(1, 1, "x")),
                raw(1, "1-0", &message(1, 1, "x")),
                raw(0, "2-0", &message(2, 2, "y")),
                raw(2, "1-0", &dm),
                raw(2, "2-0", &dm_b),
                raw(1, "2-0", &dm_a),
                raw(1, "3-0", &dm_a),
                raw(
                    3,
                    "1-0",
                    &PersistEntry::User {
                        name: "bob".into(),
                        ts: 1,
                    },
                ),
                raw(
                    3,
                    "2-0",
                    &PersistEntry::User {
                        name: "bob".into(),
                        ts: 2,
                    },
                ),
                raw(
                    1,
                    "7-0",
                    &PersistEntry::Channel {
                        name: "geral".into(),
                        ts: 1,
                    },
                ),
                RawEntry {
                    shard: 0,
                    id: "3-0".into(),
                    fields: None,
                    delivery: Delivery::First,
                },
            ],
            5,
        );
        assert_eq!(batch.len(), 11, "the same shard+id is one entry");
        assert_eq!(
            batch.rows.messages.len(),
            2,
            "a message redelivered through another id is one row"
        );
        assert_eq!(batch.rows.directs.len(), 1, "one message, in two inboxes");
        let inbox: Vec<_> = batch
            .rows
            .inbox
            .iter()
            .map(|r| (r.user.as_str(), r.offset, r.partner.as_str()))
            .collect();
        assert_eq!(inbox, [("b", 7, "a"), ("a", 3, "b")], "each inbox once");
        assert_eq!(
            batch.rows.users,
            [NameRow {
                name: "bob".into(),
                created_ms: 1
            }]
        );
        assert_eq!(batch.rows.channels.len(), 1);
        assert!(batch.dead.is_empty());
        assert_eq!(batch.oldest_ms, Some(5));
    }

    #[test]
    fn poison_becomes_dead_letters_between_good_entries() {
        let garbage = RawEntry {
            shard: 0,
            id: "2-0".into(),
            fields: Some(vec![
                (b"k".to_vec(), b"msg".to_vec()),
                (b"o".to_vec(), b"1".to_vec()),
                (b"d".to_vec(), b"\xc1".to_vec()),
            ]),
            delivery: Delivery::First,
        };
        let batch = Batch::build(
            vec![
                raw(0, "1-0", &message(1, 1, "ok")),
                garbage,
                raw(0, "3-0", &message(2, 2, "nul\0byte")),
                raw(0, "4-0", &message(3, 3, "ok")),
                raw(
                    0,
                    "5-0",
                    &PersistEntry::User {
                        name: "old".into(),
                        ts: i64::MIN,
                    },
                ),
            ],
            5,
        );
        assert_eq!(batch.rows.messages.len(), 2);
        let dead: Vec<_> = batch
            .dead
            .iter()
            .map(|d| (d.entry, d.reason.as_str()))
            .collect();
        assert_eq!(dead.len(), 3, "{dead:?}");
        assert_eq!(dead[0].0, 1);
        assert!(dead[0].1.contains("undecodable payload"), "{dead:?}");
        assert!(dead[1].1.contains("NUL"), "{dead:?}");
        assert!(dead[2].1.contains("outside years"), "{dead:?}");
        assert!(batch.dead.iter().all(|d| d.cause == Cause::Poison));
        assert_eq!(
            batch.len(),
            5,
            "dead letters are acknowledged with the batch"
        );
    }

    #[test]
    fn entries_delivered_too_often_become_dead_letters_unread() {
        let again = |n: u64, offset: u64| {
            let mut entry = raw(
                0,
                &format!("{offset}-0"),
                &message(offset, offset.into(), "x"),
            );
            entry.delivery = Delivery::Again(n);
            entry
        };
        let batch = Batch::build(
            vec![again(3, 1), again(4, 2), raw(0, "3-0", &message(3, 3, "x"))],
            3,
        );
        assert_eq!(batch.len(), 3);
        assert_eq!(
            batch
                .rows
                .messages
                .iter()
                .map(|m| m.offset)
                .collect::<Vec<_>>(),
            [1, 3],
            "the third delivery is still written; the fourth is not"
        );
        assert_eq!(batch.dead.len(), 1);
        assert_eq!(
            (batch.dead[0].entry, batch.dead[0].cause),
            (1, Cause::MaxDeliveries)
        );
        assert!(
            batch.dead[0].reason.contains("delivered 4 times"),
            "{:?}",
            batch.dead
        );
    }

    #[test]
    fn numbers_beyond_bigint_are_rejected() {
        let entry = PersistEntry::Message {
            offset: u64::MAX,
            message: match message(1, 1, "x") {
                PersistEntry::Message { message, .. } => message,
                _ => unreachable!(),
            },
        };
        assert!(
            decode(&raw(0, "1-0", &entry))
                .unwrap_err()
                .contains("bigint")
        );
    }
}
