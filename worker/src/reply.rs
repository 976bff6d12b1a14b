//! Reading stream replies (`XREADGROUP`, `XAUTOCLAIM`) from raw Redis values.
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
}

impl RawEntry {
    /// A compact key for the entry: shard and the two numbers of its id
    /// (`<ms>-<seq>`), cheap to hash.
    pub fn key(&self) -> EntryKey {
        let (ms, seq) = self.id.split_once('-').unwrap_or((&self.id, "0"));
        EntryKey {
            shard: self.shard,
            ms: ms.parse().unwrap_or(u64::MAX),
            seq: seq.parse().unwrap_or(u64::MAX),
        }
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

fn items(value: &Value) -> Option<&[Value]> {
    match value {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
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
    Ok(RawEntry { shard, id, fields })
}

fn entries(shard: u32, value: Value, command: &'static str, out: &mut Vec<RawEntry>) -> Result<()> {
    if value == Value::Nil {
        return Ok(());
    }
    let list = into_items(value).map_err(|v| reply_error(command, format!("entries are {v:?}")))?;
    out.reserve(list.len());
    for item in list {
        // Redis 6 answers XAUTOCLAIM with nil for entries deleted meanwhile.
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

/// A parsed `XAUTOCLAIM` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoClaim {
    /// Cursor for the next call (`0-0` when the scan wrapped around).
    pub next: String,
    /// Entries now owned by this consumer.
    pub claimed: Vec<RawEntry>,
    /// Ids that were pending but no longer exist (Redis removed them from the PEL).
    pub deleted: Vec<String>,
}

/// Parses an `XAUTOCLAIM` reply of shard `shard`.
pub fn parse_autoclaim(shard: u32, value: Value) -> Result<AutoClaim> {
    const COMMAND: &str = "XAUTOCLAIM";
    let parts = into_items(value).map_err(|v| reply_error(COMMAND, format!("{v:?}")))?;
    let mut parts = parts.into_iter();
    let (Some(next), Some(list), deleted) = (parts.next(), parts.next(), parts.next()) else {
        return Err(reply_error(COMMAND, "fewer than 2 parts".to_owned()));
    };
    let deleted = deleted.as_ref();
    let mut claimed = Vec::new();
    entries(shard, list, COMMAND, &mut claimed)?;
    let deleted = deleted
        .and_then(items)
        .unwrap_or_default()
        .iter()
        .map(|id| text(id, COMMAND, "deleted id"))
        .collect::<Result<_>>()?;
    Ok(AutoClaim {
        next: text(&next, COMMAND, "cursor")?,
        claimed,
        deleted,
    })
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
    fn reads_autoclaim_with_deleted_ids() {
        let reply = Value::Array(vec![
            bulk(b"0-0"),
            Value::Array(vec![Value::Array(vec![
                bulk(b"3-0"),
                Value::Array(vec![bulk(b"k"), bulk(b"chan")]),
            ])]),
            Value::Array(vec![bulk(b"2-0")]),
        ]);
        let claim = parse_autoclaim(3, reply).unwrap();
        assert_eq!(claim.next, "0-0");
        assert_eq!(claim.claimed[0].shard, 3);
        assert_eq!(claim.claimed[0].id, "3-0");
        assert_eq!(claim.deleted, ["2-0"]);
        assert!(parse_autoclaim(0, Value::Int(1)).is_err());
    }
}
