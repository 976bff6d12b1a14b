//! Reading stream replies (`XREADGROUP`, `XRANGE`, `XPENDING`, `XCLAIM`) from raw Redis values.
//!
//! The typed replies of redis-rs collect fields into a `HashMap<String, _>`:
//! an entry with a non-UTF-8 field name would fail the whole reply and a
//! repeated field would vanish. A persistence stream may hold anything a buggy
//! producer wrote, and one poison entry must never stall a shard, so the worker
//! reads replies itself, keeping every field as bytes and in order.

use redis::Value;

use crate::error::{Error, Result};

/// One stream entry as read, before decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    /// The persistence shard the entry was read from.
    pub shard: u32,
    /// The stream entry id.
    pub id: String,
    /// Field/value pairs in order; `None` for an entry that is pending but was
    /// deleted from the stream (it only needs its acknowledgement).
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    /// Which delivery of the entry this is.
    pub delivery: Delivery,
}

/// How often an entry has been handed to a worker, as the group's pending
/// list counts it (`XPENDING`'s delivery count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delivery {
    /// Read as new (`XREADGROUP >`): Redis counted this delivery as the first.
    #[default]
    First,
    /// Taken back from a pending list (this consumer's after a crash or a lost
    /// reply, or a dead consumer's): the `n`-th delivery, which the reader
    /// records in Redis (`XCLAIM ... RETRYCOUNT n`) when it hands the entry on.
    Again(u64),
}

impl Delivery {
    /// The delivery's number: 1 for the first.
    pub fn count(self) -> u64 {
        match self {
            Self::First => 1,
            Self::Again(n) => n,
        }
    }
}

impl RawEntry {
    /// A compact key for the entry: shard and the two numbers of its id
    /// (`<ms>-<seq>`), cheap to hash.
    pub fn key(&self) -> EntryKey {
        EntryKey::new(self.shard, &self.id)
    }
}

/// [`RawEntry::key`]: identifies an entry across shards without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryKey {
    /// Shard.
    pub shard: u32,
    /// Milliseconds part of the stream id.
    pub ms: u64,
    /// Sequence part of the stream id.
    pub seq: u64,
}

impl EntryKey {
    /// The key of entry `id` of `shard`.
    pub fn new(shard: u32, id: &str) -> Self {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        Self {
            shard,
            ms: ms.parse().unwrap_or(u64::MAX),
            seq: seq.parse().unwrap_or(u64::MAX),
        }
    }

    /// The stream id, `<ms>-<seq>`.
    pub fn id(&self) -> String {
        format!("{}-{}", self.ms, self.seq)
    }
}

fn bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

fn text(value: &Value, command: &'static str, what: &str) -> Result<String> {
    bytes(value)
        .and_then(|b| std::str::from_utf8(b).ok())
        .map(str::to_owned)
        .ok_or_else(|| reply_error(command, format!("{what} is not a string: {value:?}")))
}

fn reply_error(command: &'static str, detail: String) -> Error {
    Error::Reply { command, detail }
}

/// The bytes of a string value, moved out of it.
fn into_bytes(value: Value) -> Vec<u8> {
    match value {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        Value::VerbatimString { text, .. } => text.into_bytes(),
        _ => Vec::new(),
    }
}

fn into_items(value: Value) -> std::result::Result<Vec<Value>, Value> {
    match value {
        Value::Array(items) | Value::Set(items) => Ok(items),
        other => Err(other),
    }
}

/// Parses one `[id, [field, value, ...]]` entry, moving the field bytes out of
/// the reply; `fields` is nil for a deleted entry.
fn entry(shard: u32, value: Value, command: &'static str) -> Result<RawEntry> {
    let parts = into_items(value)
        .map_err(|v| reply_error(command, format!("entry is not an array: {v:?}")))?;
    let Ok([id, fields]) = <[Value; 2]>::try_from(parts) else {
        return Err(reply_error(
            command,
            "entry does not have 2 parts".to_owned(),
        ));
    };
    let id = text(&id, command, "entry id")?;
    let fields = match fields {
        Value::Nil => None,
        Value::Map(pairs) => Some(
            pairs
                .into_iter()
                .map(|(k, v)| (into_bytes(k), into_bytes(v)))
                .collect(),
        ),
        other => {
            let flat = into_items(other)
                .map_err(|v| reply_error(command, format!("fields of {id} are {v:?}")))?;
            let mut pairs = Vec::with_capacity(flat.len() / 2);
            let mut flat = flat.into_iter();
            while let Some(key) = flat.next() {
                pairs.push((
                    into_bytes(key),
                    flat.next().map(into_bytes).unwrap_or_default(),
                ));
            }
            Some(pairs)
        }
    };
    Ok(RawEntry {
        shard,
        id,
        fields,
        delivery: Delivery::First,
    })
}

fn entries(shard: u32, value: Value, command: &'static str, out: &mut Vec<RawEntry>) -> Result<()> {
    if value == Value::Nil {
        return Ok(());
    }
    let list = into_items(value).map_err(|v| reply_error(command, format!("entries are {v:?}")))?;
    out.reserve(list.len());
    for item in list {
        // Redis 6 answers with nil for pending entries deleted meanwhile.
        if item != Value::Nil {
            out.push(entry(shard, item, command)?);
        }
    }
    Ok(())
}

/// Parses an `XREADGROUP` reply (RESP2 array or RESP3 map of stream → entries);
/// `shard_of_key` maps a stream key back to its shard.
pub fn parse_read(
    value: Value,
    shard_of_key: impl Fn(&str) -> Option<u32>,
) -> Result<Vec<RawEntry>> {
    const COMMAND: &str = "XREADGROUP";
    let mut out = Vec::new();
    let mut stream = |key: &Value, list: Value| -> Result<()> {
        let key = text(key, COMMAND, "stream key")?;
        let shard = shard_of_key(&key)
            .ok_or_else(|| reply_error(COMMAND, format!("unexpected stream {key}")))?;
        entries(shard, list, COMMAND, &mut out)
    };
    match value {
        Value::Nil => {}
        Value::Map(streams) => {
            for (key, list) in streams {
                stream(&key, list)?;
            }
        }
        other => {
            let streams = into_items(other).map_err(|v| reply_error(COMMAND, format!("{v:?}")))?;
            for item in streams {
                match <[Value; 2]>::try_from(into_items(item).unwrap_or_default()) {
                    Ok([key, list]) => stream(&key, list)?,
                    Err(item) => {
                        return Err(reply_error(COMMAND, format!("stream reply {item:?}")));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Parses an `XRANGE` reply of shard `shard` (empty when the entry is gone).
pub fn parse_range(shard: u32, value: Value) -> Result<Vec<RawEntry>> {
    let mut out = Vec::new();
    entries(shard, value, "XRANGE", &mut out)?;
    Ok(out)
}

/// One entry of a consumer group's pending list (`XPENDING` extended form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The stream entry id.
    pub id: String,
    /// The consumer holding it.
    pub consumer: String,
    /// Milliseconds since it was last delivered (or re-claimed).
    pub idle_ms: u64,
    /// How many times it was delivered.
    pub deliveries: u64,
}

/// Parses an extended `XPENDING` reply: `[[id, consumer, idle, deliveries], ...]`.
pub fn parse_pending(value: Value) -> Result<Vec<Pending>> {
    const COMMAND: &str = "XPENDING";
    let list = into_items(value).map_err(|v| reply_error(COMMAND, format!("{v:?}")))?;
    list.into_iter()
        .map(|item| {
            let parts = into_items(item)
                .map_err(|v| reply_error(COMMAND, format!("pending entry {v:?}")))?;
            match parts.as_slice() {
                [id, consumer, Value::Int(idle), Value::Int(deliveries)] => Ok(Pending {
                    id: text(id, COMMAND, "id")?,
                    consumer: text(consumer, COMMAND, "consumer")?,
                    idle_ms: (*idle).max(0) as u64,
                    deliveries: (*deliveries).max(0) as u64,
                }),
                other => Err(reply_error(COMMAND, format!("pending entry {other:?}"))),
            }
        })
        .collect()
}

/// Parses a `XCLAIM ... JUSTID` reply: the ids now owned by the caller.
pub fn parse_ids(value: Value) -> Result<Vec<String>> {
    const COMMAND: &str = "XCLAIM";
    into_items(value)
        .map_err(|v| reply_error(COMMAND, format!("{v:?}")))?
        .iter()
        .map(|id| text(id, COMMAND, "id"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    fn shard_of(key: &str) -> Option<u32> {
        ["cc:{s0}:persist", "cc:{s1}:persist"]
            .iter()
            .position(|k| *k == key)
            .map(|i| i as u32)
    }

    #[test]
    fn reads_resp2_entries_with_binary_and_repeated_fields() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk(b"cc:{s1}:persist"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk(b"1-0"),
                    Value::Array(vec![
                        bulk(b"k"),
                        bulk(b"msg"),
                        bulk(b"\xff"),
                        bulk(b"x"),
                        bulk(b"k"),
                        bulk(b"dm"),
                    ]),
                ]),
                Value::Array(vec![bulk(b"2-0"), Value::Nil]),
            ]),
        ])]);
        let entries = parse_read(reply, shard_of).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].shard, 1);
        assert_eq!(entries[0].id, "1-0");
        let fields = entries[0].fields.as_ref().unwrap();
        assert_eq!(fields.len(), 3, "repeated and non-UTF-8 fields are kept");
        assert_eq!(fields[1], (b"\xff".to_vec(), b"x".to_vec()));
        assert_eq!(
            entries[1].fields, None,
            "a deleted pending entry has no fields"
        );
    }

    #[test]
    fn reads_resp3_maps_and_nil() {
        let reply = Value::Map(vec![(
            bulk(b"cc:{s0}:persist"),
            Value::Array(vec![Value::Array(vec![
                bulk(b"5-1"),
                Value::Map(vec![(bulk(b"k"), bulk(b"user"))]),
            ])]),
        )]);
        let entries = parse_read(reply, shard_of).unwrap();
        assert_eq!(
            entries[0].fields,
            Some(vec![(b"k".to_vec(), b"user".to_vec())])
        );
        assert!(
            parse_read(Value::Nil, shard_of).unwrap().is_empty(),
            "BLOCK timeout"
        );
        let stranger = Value::Array(vec![Value::Array(vec![
            bulk(b"other"),
            Value::Array(vec![]),
        ])]);
        assert!(parse_read(stranger, shard_of).is_err());
    }

    #[test]
    fn reads_pending_lists_ranges_and_claimed_ids() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk(b"3-0"),
            bulk(b"w1"),
            Value::Int(1500),
            Value::Int(4),
        ])]);
        assert_eq!(
            parse_pending(reply).unwrap(),
            [Pending {
                id: "3-0".into(),
                consumer: "w1".into(),
                idle_ms: 1500,
                deliveries: 4
            }]
        );
        assert!(parse_pending(Value::Array(vec![Value::Int(1)])).is_err());
        let range = Value::Array(vec![Value::Array(vec![
            bulk(b"3-0"),
            Value::Array(vec![bulk(b"k"), bulk(b"chan")]),
        ])]);
        let entries = parse_range(2, range).unwrap();
        assert_eq!((entries[0].shard, entries[0].id.as_str()), (2, "3-0"));
        assert_eq!(entries[0].delivery, Delivery::First);
        assert!(parse_range(2, Value::Array(vec![])).unwrap().is_empty());
        assert_eq!(
            parse_ids(Value::Array(vec![bulk(b"1-0"), bulk(b"2-0")])).unwrap(),
            ["1-0", "2-0"]
        );
    }
}
