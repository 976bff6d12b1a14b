//! Reading a benchmark message push without decoding it.
//!
//! A subscriber of the load generator handles up to a million pushes a second on the same
//! two cores as the servers, so it reads only what it needs: that the frame is a `message`
//! push, its `offset`, and the send time the publisher wrote at the start of its `text`.
//! Field order is not assumed: keys are searched for.

use std::sync::LazyLock;

use chatcluster_protocol::Encoding;
use memchr::memmem::Finder;

/// What the load generator needs from one message push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Push {
    /// The channel offset.
    pub offset: u64,
    /// Microseconds since the run's start when the publisher sent it.
    pub sent_us: u64,
}

static JSON_TYPE: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"type\":\"message\""));
static JSON_OFFSET: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"offset\":"));
static JSON_TEXT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"text\":\""));
static MP_TYPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\xa4type\xa7message"));
static MP_OFFSET: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\xa6offset"));
static MP_TEXT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\xa4text"));

/// The leading decimal digits of `bytes` as a number.
fn digits(bytes: &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    let mut any = false;
    for &b in bytes.iter().take(20) {
        if !b.is_ascii_digit() {
            break;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

fn after<'a>(bytes: &'a [u8], finder: &Finder<'_>) -> Option<&'a [u8]> {
    let at = finder.find(bytes)?;
    bytes.get(at + finder.needle().len()..)
}

fn json(bytes: &[u8]) -> Option<Push> {
    JSON_TYPE.find(bytes.get(..64.min(bytes.len()))?)?;
    let offset = digits(after(bytes, &JSON_OFFSET)?)?;
    let sent_us = digits(after(bytes, &JSON_TEXT)?)?;
    Some(Push { offset, sent_us })
}

/// A MessagePack unsigned integer at the start of `bytes`.
fn mp_uint(bytes: &[u8]) -> Option<u64> {
    let (&marker, rest) = bytes.split_first()?;
    let be = |n: usize| -> Option<u64> {
        Some(
            rest.get(..n)?
                .iter()
                .fold(0u64, |v, &b| (v << 8) | u64::from(b)),
        )
    };
    match marker {
        0x00..=0x7f => Some(u64::from(marker)),
        0xcc => be(1),
        0xcd => be(2),
        0xce => be(4),
        0xcf => be(8),
        _ => None,
    }
}

/// The contents of a MessagePack string at the start of `bytes`.
fn mp_str(bytes: &[u8]) -> Option<&[u8]> {
    let (&marker, rest) = bytes.split_first()?;
    let (len, rest) = match marker {
        0xa0..=0xbf => (usize::from(marker & 0x1f), rest),
        0xd9 => (usize::from(*rest.first()?), rest.get(1..)?),
        0xda => (
            usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])),
            rest.get(2..)?,
        ),
        0xdb => {
            let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
            (usize::try_from(len).ok()?, rest.get(4..)?)
        }
        _ => return None,
    };
    rest.get(..len)
}

fn msgpack(bytes: &[u8]) -> Option<Push> {
    MP_TYPE.find(bytes.get(..64.min(bytes.len()))?)?;
    let offset = mp_uint(after(bytes, &MP_OFFSET)?)?;
    let sent_us = digits(mp_str(after(bytes, &MP_TEXT)?)?)?;
    Some(Push { offset, sent_us })
}

/// The offset and send time of a message push; `None` for any other frame.
pub fn parse(encoding: Encoding, bytes: &[u8]) -> Option<Push> {
    match encoding {
        Encoding::Json => json(bytes),
        Encoding::MsgPack => msgpack(bytes),
    }
}

/// The text a publisher sends: the send time in microseconds, `:`, then `x` up to `size`
/// bytes (never shorter than the time itself).
pub fn text(sent_us: u64, size: usize, buf: &mut String) {
    use std::fmt::Write as _;
    buf.clear();
    let _ = write!(buf, "{sent_us}:");
    while buf.len() < size {
        buf.push('x');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatcluster_protocol::codec;
    use chatcluster_protocol::entry::Timestamp;
    use chatcluster_protocol::frame::{ChannelMessage, PresenceChange, PresenceEvent, ServerFrame};

    fn frame(offset: u64, sent_us: u64) -> ServerFrame {
        let mut text = String::new();
        super::text(sent_us, 64, &mut text);
        ServerFrame::Message(ChannelMessage {
            channel: "bench-1".into(),
            offset,
            msg_id: uuid::Uuid::new_v4(),
            user: "pub-0".into(),
            text,
            ts: Timestamp(1_700_000_000_000),
            clock: 12,
        })
    }

    #[test]
    fn reads_real_frames_in_both_encodings() {
        for encoding in Encoding::ALL {
            for (offset, sent) in [
                (1, 0),
                (127, 5),
                (128, 1_000_000),
                (70_000, 123_456_789),
                (u64::from(u32::MAX) + 3, 9),
            ] {
                let bytes = codec::encode(encoding, &frame(offset, sent));
                assert_eq!(
                    parse(encoding, &bytes),
                    Some(Push {
                        offset,
                        sent_us: sent
                    }),
                    "{encoding:?} {offset}"
                );
            }
        }
    }

    #[test]
    fn ignores_other_frames() {
        let presence: ServerFrame = ServerFrame::Presence(PresenceEvent {
            channel: "bench-1".into(),
            event: PresenceChange::Join,
            user: "message".into(),
            clock: 3,
        });
        for encoding in Encoding::ALL {
            assert_eq!(parse(encoding, &codec::encode(encoding, &presence)), None);
            assert_eq!(parse(encoding, b""), None);
        }
        assert_eq!(
            parse(
                Encoding::Json,
                br#"{"type":"ok","id":1,"clock":2,"data":{"offset":5}}"#
            ),
            None
        );
    }

    #[test]
    fn text_has_the_size_asked_for() {
        let mut buf = String::new();
        text(123, 64, &mut buf);
        assert_eq!(buf.len(), 64);
        assert!(buf.starts_with("123:x"));
        text(123_456, 3, &mut buf);
        assert_eq!(buf, "123456:");
    }
}
