//! The gateway's RESP parser (`gateway/src/resp.rs`), which reads the pub/sub
//! connection: replies fed in pieces, and commands encoded then parsed back.

#![no_main]

use bytes::{Bytes, BytesMut};
use chatcluster_gateway::resp::{self, Value};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&piece, bytes)) = data.split_first() else {
        return;
    };
    let piece = 1 + usize::from(piece % 32);
    let mut buffer = BytesMut::new();
    'feed: for chunk in bytes.chunks(piece) {
        buffer.extend_from_slice(chunk);
        loop {
            let before = buffer.len();
            match resp::parse(&mut buffer) {
                Ok(Some(_)) => assert!(buffer.len() < before, "a value consumes bytes"),
                Ok(None) => {
                    assert_eq!(buffer.len(), before, "nothing consumed without a value");
                    break;
                }
                Err(_) => break 'feed,
            }
        }
    }
    // Any arguments encode to a command that parses back to them.
    let args: Vec<&[u8]> = bytes.split(|&b| b == 0).collect();
    let mut out = BytesMut::new();
    resp::encode_command(&mut out, &args);
    let parsed = resp::parse(&mut out)
        .expect("own encoding parses")
        .expect("complete");
    let expected = Value::Array(Some(
        args.iter()
            .map(|a| Value::Bulk(Some(Bytes::copy_from_slice(a))))
            .collect(),
    ));
    assert_eq!(parsed, expected);
    assert!(out.is_empty());
});
