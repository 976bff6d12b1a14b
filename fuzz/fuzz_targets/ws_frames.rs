//! The gateway's WebSocket frame reader (`gateway/src/ws.rs`): client bytes
//! fed in pieces, as a socket delivers them. The first two bytes choose the
//! message limit and the piece size.

#![no_main]

use chatcluster_gateway::ws::{FrameReader, Incoming};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [limit, piece, bytes @ ..] = data else {
        return;
    };
    let max_message = 1 + usize::from(*limit) * 64;
    let piece = 1 + usize::from(*piece % 64);
    let mut reader = FrameReader::new(max_message);
    for chunk in bytes.chunks(piece) {
        reader.buffer().extend_from_slice(chunk);
        loop {
            match reader.next_message() {
                Ok(Some(Incoming::Text(text))) => {
                    assert!(text.len() <= max_message);
                    assert!(std::str::from_utf8(&text).is_ok(), "text is UTF-8");
                }
                Ok(Some(Incoming::Binary(data))) => assert!(data.len() <= max_message),
                Ok(Some(Incoming::Ping(payload))) => assert!(payload.len() <= 125),
                Ok(Some(Incoming::Pong | Incoming::Close(_))) => {}
                Ok(None) => break,
                Err(error) => {
                    let _ = error.close_code();
                    return;
                }
            }
        }
        reader.shrink_if_empty();
    }
});
