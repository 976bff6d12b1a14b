//! The worker's reading of Redis replies (`worker/src/reply.rs`): any RESP
//! reply, parsed by redis-rs into a value, through every stream-reply parser,
//! then each entry through the persistence-entry and dead-letter decoders.

#![no_main]

use chatcluster_protocol::entry::PersistEntry;
use chatcluster_worker::dead_letters::Letter;
use chatcluster_worker::reply;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = redis::parse_redis_value(data) else {
        return;
    };
    let shard_of = |key: &str| {
        key.strip_prefix("cc:{s")
            .and_then(|k| k.strip_suffix("}:persist"))
            .and_then(|n| n.parse().ok())
    };
    let mut entries = Vec::new();
    if let Ok(read) = reply::parse_read(value.clone(), shard_of) {
        entries.extend(read);
    }
    if let Ok(range) = reply::parse_range(3, value.clone()) {
        assert!(range.iter().all(|e| e.shard == 3));
        entries.extend(range);
    }
    let _ = reply::parse_pending(value.clone());
    let _ = reply::parse_ids(value);
    for entry in entries {
        let key = entry.key();
        let _ = key.id();
        if let Some(fields) = &entry.fields {
            let _ = PersistEntry::decode(fields.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        }
        if let Ok(letter) = Letter::parse(entry) {
            let _ = (letter.name(), letter.summary(), letter.to_json());
        }
    }
});
