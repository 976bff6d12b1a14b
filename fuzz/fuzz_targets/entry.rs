//! The stream-entry codec (`chatcluster_protocol::entry`): stored messages and
//! direct messages, topic payloads and persistence-stream entries. What
//! decodes must encode back to the same value.

#![no_main]

use chatcluster_protocol::entry::{PersistEntry, StoredDirect, StoredMessage, TopicEvent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 => {
            if let Ok(message) = StoredMessage::decode(rest) {
                assert_eq!(
                    StoredMessage::decode(&message.encode()),
                    Ok(message.clone())
                );
                let pushed = message.into_channel_message(7);
                assert_eq!(pushed.offset, 7);
            }
        }
        1 => {
            if let Ok(direct) = StoredDirect::decode(rest) {
                assert_eq!(StoredDirect::decode(&direct.encode()), Ok(direct.clone()));
                let pushed = direct.into_direct_message(Some(7));
                assert_eq!(pushed.offset, Some(7));
            }
        }
        2 => {
            if let Ok(event) = TopicEvent::decode(rest) {
                assert_eq!(TopicEvent::decode(&event.encode()), Ok(event));
            }
        }
        _ => {
            // Field/value pairs separated by 0xFF.
            let parts: Vec<&[u8]> = rest.split(|&b| b == 0xFF).collect();
            let fields = parts
                .chunks(2)
                .map(|pair| (pair[0], pair.get(1).copied().unwrap_or(b"")));
            if let Ok(entry) = PersistEntry::decode(fields) {
                let encoded = entry.fields();
                let again =
                    PersistEntry::decode(encoded.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())));
                assert_eq!(again, Ok(entry));
            }
        }
    }
});
