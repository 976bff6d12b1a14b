//! Dead letters: entries the worker will not write, kept for an operator.
//!
//! Each shard has a stream `cc:{sN}:dead`, capped at `DEAD_LETTER_MAXLEN`
//! entries (the oldest go first). A dead letter holds the field `id` (the
//! entry's id in `cc:{sN}:persist`), `reason` (for people), `cause` (one of
//! [`Cause`], for filters and metrics), then the entry's own fields unchanged,
//! so [`DeadLetters::replay`] can append exactly the original entry to the
//! persistence stream again once its cause is fixed.

use std::fmt::Write as _;

use chatcluster_protocol::entry::PersistEntry;
use chatcluster_protocol::keys::{dead_letter_key, persist_key};
use redis::Value;
use redis::aio::ConnectionManager;

use crate::error::{Error, Result};
use crate::reply::{self, RawEntry};

/// Why an entry became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Cause {
    /// Undecodable, or holding a value PostgreSQL cannot store (NUL byte,
    /// timestamp out of range, number beyond bigint).
    #[value(name = "poison")]
    Poison,
    /// PostgreSQL rejected the row (a data error: SQLSTATE class 22, 23 or 54).
    #[value(name = "rejected")]
    Rejected,
    /// A message whose `(channel, channel_offset)` already holds another message.
    #[value(name = "offset_clash")]
    OffsetClash,
    /// Delivered `MAX_DELIVERIES` times without being acknowledged.
    #[value(name = "max_deliveries")]
    MaxDeliveries,
}

impl Cause {
    /// Every cause.
    pub const ALL: [Self; 4] = [
        Self::Poison,
        Self::Rejected,
        Self::OffsetClash,
        Self::MaxDeliveries,
    ];

    /// The stable name: the `cause` field and the metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Poison => "poison",
            Self::Rejected => "rejected",
            Self::OffsetClash => "offset_clash",
            Self::MaxDeliveries => "max_deliveries",
        }
    }

    fn parse(label: &[u8]) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.label().as_bytes() == label)
    }
}

/// The fields of the dead letter of `entry`: `id`, `reason`, `cause`, then its own fields.
pub fn encode<'a>(entry: &'a RawEntry, cause: Cause, reason: &'a str) -> Vec<(&'a [u8], &'a [u8])> {
    let mut fields: Vec<(&[u8], &[u8])> = vec![
        (b"id", entry.id.as_bytes()),
        (b"reason", reason.as_bytes()),
        (b"cause", cause.label().as_bytes()),
    ];
    if let Some(original) = &entry.fields {
        fields.extend(original.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
    }
    fields
}

/// A dead letter as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Letter {
    /// The shard (of both streams).
    pub shard: u32,
    /// Its id in the dead-letter stream.
    pub id: String,
    /// The entry's id in the persistence stream it came from.
    pub original_id: String,
    /// The cause (`None` for letters written before causes were recorded).
    pub cause: Option<Cause>,
    /// Why, for people.
    pub reason: String,
    /// The original entry's fields, in order.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Letter {
    /// Reads a dead-letter stream entry.
    pub fn parse(entry: RawEntry) -> Result<Self> {
        let bad = |detail: &str| Error::Reply {
            command: "XRANGE",
            detail: format!("dead letter {}: {detail}", entry.id),
        };
        let mut fields = entry.fields.clone().unwrap_or_default().into_iter();
        let (Some((id_name, original_id)), Some((reason_name, reason))) =
            (fields.next(), fields.next())
        else {
            return Err(bad("fewer than 2 fields"));
        };
        if id_name != b"id" || reason_name != b"reason" {
            return Err(bad("does not start with id and reason"));
        }
        let mut rest: Vec<_> = fields.collect();
        let cause = match rest.first() {
            Some((name, value)) if name == b"cause" => {
                let cause = Cause::parse(value);
                rest.remove(0);
                cause
            }
            _ => None,
        };
        Ok(Self {
            shard: entry.shard,
            id: entry.id,
            original_id: String::from_utf8_lossy(&original_id).into_owned(),
            cause,
            reason: String::from_utf8_lossy(&reason).into_owned(),
            fields: rest,
        })
    }

    /// `<shard>/<id>`: how `list` names it and `replay --id` takes it.
    pub fn name(&self) -> String {
        format!("{}/{}", self.shard, self.id)
    }

    /// What the original entry holds, in one line.
    pub fn summary(&self) -> String {
        let decoded = PersistEntry::decode(
            self.fields
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice())),
        );
        match decoded {
            Ok(PersistEntry::Message { offset, message }) => format!(
                "message {} at {}#{offset} by {}",
                message.msg_id, message.channel, message.user
            ),
            Ok(PersistEntry::Direct { inbox, direct }) => {
                let place = inbox
                    .map(|slot| format!(" at inbox {}#{}", slot.owner, slot.offset))
                    .unwrap_or_default();
                format!(
                    "direct message {} from {} to {}{place}",
                    direct.msg_id, direct.from, direct.to
                )
            }
            Ok(PersistEntry::User { name, .. }) => format!("user {name}"),
            Ok(PersistEntry::Channel { name, .. }) => format!("channel {name}"),
            Err(_) => {
                let mut raw = String::from("undecodable:");
                for (k, v) in &self.fields {
                    let _ = write!(raw, " {}={} bytes", String::from_utf8_lossy(k), v.len());
                }
                raw
            }
        }
    }

    /// One JSON object, for `list --json`.
    pub fn to_json(&self) -> serde_json::Value {
        let fields: serde_json::Map<String, serde_json::Value> = self
            .fields
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned().into(),
                )
            })
            .collect();
        serde_json::json!({
            "id": self.name(),
            "shard": self.shard,
            "original_id": self.original_id,
            "cause": self.cause.map(Cause::label),
            "reason": self.reason,
            "summary": self.summary(),
            "fields": fields,
        })
    }
}

/// Which dead letters a command applies to.
#[derive(Debug, Clone, Copy, Default)]
pub struct Filter {
    /// Only this shard.
    pub shard: Option<u32>,
    /// Only this cause.
    pub cause: Option<Cause>,
}

impl Filter {
    fn shards(&self, shards: u32) -> Vec<u32> {
        match self.shard {
            Some(shard) => vec![shard],
            None => (0..shards).collect(),
        }
    }

    fn keeps(&self, letter: &Letter) -> bool {
        self.cause.is_none_or(|cause| letter.cause == Some(cause))
    }
}

/// Parses `<shard>/<id>` as printed by `list`.
pub fn parse_name(name: &str) -> std::result::Result<(u32, String), String> {
    let (shard, id) = name
        .split_once('/')
        .ok_or_else(|| format!("{name:?} is not <shard>/<id> (as `dead-letters list` prints)"))?;
    let shard = shard
        .parse()
        .map_err(|_| format!("{name:?}: shard {shard:?} is not a number"))?;
    Ok((shard, id.to_owned()))
}

/// How many letters one round trip reads or replays.
const PAGE: usize = 100;

/// The dead-letter streams of every shard.
pub struct DeadLetters {
    conn: ConnectionManager,
    shards: u32,
}

impl DeadLetters {
    /// The dead letters of `shards` shards over `conn`.
    pub fn new(conn: ConnectionManager, shards: u32) -> Self {
        Self { conn, shards }
    }

    /// Up to `count` letters of `shard` after id `after` (exclusive; `-` for the start) up to `end`.
    async fn page(
        &mut self,
        shard: u32,
        after: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<Letter>> {
        let value: Value = redis::cmd("XRANGE")
            .arg(dead_letter_key(shard))
            .arg(after)
            .arg(end)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn)
            .await?;
        reply::parse_range(shard, value)?
            .into_iter()
            .map(Letter::parse)
            .collect()
    }

    /// The oldest `limit` letters that pass `filter`, shard by shard.
    pub async fn list(&mut self, filter: Filter, limit: usize) -> Result<Vec<Letter>> {
        let mut out = Vec::new();
        for shard in filter.shards(self.shards) {
            let mut after = "-".to_owned();
            while out.len() < limit {
                let page = self.page(shard, &after, "+", PAGE).await?;
                let Some(last) = page.last() else { break };
                after = format!("({}", last.id);
                let full = page.len() == PAGE;
                out.extend(page.into_iter().filter(|l| filter.keeps(l)));
                if !full {
                    break;
                }
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    /// The letter `id` of `shard`, if it exists.
    pub async fn get(&mut self, shard: u32, id: &str) -> Result<Option<Letter>> {
        Ok(self.page(shard, id, id, 1).await?.pop())
    }

    /// Appends each letter's original entry to its shard's persistence stream
    /// and deletes the letter, atomically per call. Returns the new entry ids.
    pub async fn replay(&mut self, letters: &[Letter]) -> Result<Vec<String>> {
        if letters.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for letter in letters {
            let fields: Vec<(&[u8], &[u8])> = letter
                .fields
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect();
            pipe.cmd("XADD")
                .arg(persist_key(letter.shard))
                .arg("*")
                .arg(&fields);
            pipe.cmd("XDEL")
                .arg(dead_letter_key(letter.shard))
                .arg(&letter.id)
                .ignore();
        }
        Ok(pipe.query_async(&mut self.conn).await?)
    }

    /// Replays every letter that passes `filter` and was there when the call
    /// began (letters that fail again are not replayed twice); calls
    /// `progress(replayed so far)` after each page. Returns how many were replayed.
    pub async fn replay_all(
        &mut self,
        filter: Filter,
        mut progress: impl FnMut(usize),
    ) -> Result<usize> {
        let mut replayed = 0;
        for shard in filter.shards(self.shards) {
            let Some(end) = self.last_id(shard).await? else {
                continue;
            };
            let mut after = "-".to_owned();
            loop {
                let page = self.page(shard, &after, &end, PAGE).await?;
                let Some(last) = page.last() else { break };
                after = format!("({}", last.id);
                let full = page.len() == PAGE;
                let chosen: Vec<Letter> = page.into_iter().filter(|l| filter.keeps(l)).collect();
                replayed += self.replay(&chosen).await?.len();
                progress(replayed);
                if !full {
                    break;
                }
            }
        }
        Ok(replayed)
    }

    /// The newest letter's id of `shard`.
    async fn last_id(&mut self, shard: u32) -> Result<Option<String>> {
        let value: Value = redis::cmd("XREVRANGE")
            .arg(dead_letter_key(shard))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn)
            .await?;
        Ok(reply::parse_range(shard, value)?.pop().map(|e| e.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::Delivery;

    fn entry(id: &str, fields: &[(&[u8], &[u8])]) -> RawEntry {
        RawEntry {
            shard: 1,
            id: id.to_owned(),
            fields: Some(
                fields
                    .iter()
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .collect(),
            ),
            delivery: Delivery::First,
        }
    }

    #[test]
    fn a_letter_round_trips_with_its_original_fields() {
        let original = entry("5-0", &[(b"k", b"user"), (b"n", b"ana"), (b"t", b"1")]);
        let stored: Vec<(Vec<u8>, Vec<u8>)> = encode(&original, Cause::Rejected, "too big")
            .into_iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        let letter = Letter::parse(RawEntry {
            id: "9-0".into(),
            fields: Some(stored),
            ..original.clone()
        })
        .unwrap();
        assert_eq!(letter.name(), "1/9-0");
        assert_eq!(letter.original_id, "5-0");
        assert_eq!(letter.cause, Some(Cause::Rejected));
        assert_eq!(letter.reason, "too big");
        assert_eq!(Some(letter.fields.clone()), original.fields);
        assert_eq!(letter.summary(), "user ana");
        assert_eq!(letter.to_json()["cause"], "rejected");
        assert_eq!(letter.to_json()["fields"]["n"], "ana");
    }

    #[test]
    fn older_letters_without_a_cause_and_garbage_are_read() {
        let old = Letter::parse(entry(
            "9-0",
            &[(b"id", b"5-0"), (b"reason", b"x"), (b"d", b"\xc1")],
        ))
        .unwrap();
        assert_eq!(old.cause, None);
        assert_eq!(old.fields, [(b"d".to_vec(), b"\xc1".to_vec())]);
        assert!(
            old.summary().starts_with("undecodable: d=1 bytes"),
            "{}",
            old.summary()
        );
        assert!(Letter::parse(entry("9-0", &[(b"k", b"msg")])).is_err());
    }

    #[test]
    fn names_parse_back() {
        assert_eq!(parse_name("3/17-0"), Ok((3, "17-0".to_owned())));
        assert!(parse_name("17-0").unwrap_err().contains("<shard>/<id>"));
        assert!(parse_name("x/17-0").is_err());
        assert!(
            Cause::ALL
                .iter()
                .all(|c| Cause::parse(c.label().as_bytes()) == Some(*c))
        );
    }
}
