//! Just enough of RESP2 (the Redis protocol) for a subscriber connection:
//! encoding commands and incrementally parsing replies without copying bulk
//! payloads, so a pub/sub message reaches the delivery core as shared bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Deepest array nesting accepted (pub/sub replies nest one level).
const MAX_DEPTH: usize = 4;
/// Largest array accepted.
const MAX_ARRAY: i64 = 1 << 20;
/// Largest bulk string accepted (Redis's own proto-max-bulk-len default).
const MAX_BULK: i64 = 512 * 1024 * 1024;

/// A parsed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `+OK`.
    Simple(Bytes),
    /// `-ERR ...`.
    Error(Bytes),
    /// `:1`.
    Integer(i64),
    /// `$3 abc`; `None` for the null bulk string.
    Bulk(Option<Bytes>),
    /// `*2 ...`; `None` for the null array.
    Array(Option<Vec<Value>>),
}

impl Value {
    /// The bytes of a simple or bulk string.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Self::Simple(bytes) | Self::Bulk(Some(bytes)) => Some(bytes),
            _ => None,
        }
    }
}

/// The bytes are not RESP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed RESP reply: {0}")]
pub struct RespError(&'static str);

/// Appends a command (an array of bulk strings) to `out`.
pub fn encode_command<A: AsRef<[u8]>>(out: &mut BytesMut, args: &[A]) {
    out.put_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        let arg = arg.as_ref();
        out.put_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.put_slice(arg);
        out.put_slice(b"\r\n");
    }
}

/// Takes the next complete reply off the front of `buffer`; `None` when more
/// bytes are needed (nothing is consumed then).
pub fn parse(buffer: &mut BytesMut) -> Result<Option<Value>, RespError> {
    match scan(buffer, 0, 0)? {
        None => Ok(None),
        Some(end) => {
            let mut frame = buffer.split_to(end).freeze();
            Ok(Some(take(&mut frame)?))
        }
    }
}

/// Finds the end of the value starting at `at` without consuming anything.
fn scan(buffer: &[u8], at: usize, depth: usize) -> Result<Option<usize>, RespError> {
    if depth > MAX_DEPTH {
        return Err(RespError("arrays nested too deep"));
    }
    let Some(kind) = buffer.get(at) else {
        return Ok(None);
    };
    let Some(line_end) = find_crlf(buffer, at + 1) else {
        return Ok(None);
    };
    let line = &buffer[at + 1..line_end];
    let after_line = line_end + 2;
    match kind {
        b'+' | b'-' | b':' => Ok(Some(after_line)),
        b'$' => {
            let len = integer(line)?;
            if len < 0 {
                return Ok(Some(after_line));
            }
            if len > MAX_BULK {
                return Err(RespError("bulk string too large"));
            }
            let end = after_line + usize::try_from(len).map_err(|_| RespError("bulk length"))? + 2;
            Ok((buffer.len() >= end).then_some(end))
        }
        b'*' => {
            let count = integer(line)?;
            if count > MAX_ARRAY {
                return Err(RespError("array too large"));
            }
            let mut end = after_line;
            for _ in 0..count.max(0) {
                match scan(buffer, end, depth + 1)? {
                    Some(next) => end = next,
                    None => return Ok(None),
                }
            }
            Ok(Some(end))
        }
        _ => Err(RespError("unknown type byte")),
    }
}

/// Parses one value from a buffer known to hold it completely.
fn take(frame: &mut Bytes) -> Result<Value, RespError> {
    let kind = frame.get_u8();
    let line_end = find_crlf(frame, 0).ok_or(RespError("truncated line"))?;
    let line = frame.split_to(line_end);
    frame.advance(2);
    match kind {
        b'+' => Ok(Value::Simple(line)),
        b'-' => Ok(Value::Error(line)),
        b':' => Ok(Value::Integer(integer(&line)?)),
        b'$' => {
            let len = integer(&line)?;
            if len < 0 {
                return Ok(Value::Bulk(None));
            }
            let len = usize::try_from(len).map_err(|_| RespError("bulk length"))?;
            let data = frame.split_to(len);
            if !frame.starts_with(b"\r\n") {
                return Err(RespError("bulk string without CRLF"));
            }
            frame.advance(2);
            Ok(Value::Bulk(Some(data)))
        }
        b'*' => {
            let count = integer(&line)?;
            if count < 0 {
                return Ok(Value::Array(None));
            }
            let items = (0..count).map(|_| take(frame)).collect::<Result<_, _>>()?;
            Ok(Value::Array(Some(items)))
        }
        _ => Err(RespError("unknown type byte")),
    }
}

fn find_crlf(buffer: &[u8], from: usize) -> Option<usize> {
    buffer
        .get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

fn integer(line: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(RespError("invalid integer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::Bulk(Some(Bytes::copy_from_slice(s.as_bytes())))
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = BytesMut::new();
        encode_command(&mut out, &["SUBSCRIBE", "cc:ch:a"]);
        assert_eq!(&out[..], b"*2\r\n$9\r\nSUBSCRIBE\r\n$7\r\ncc:ch:a\r\n");
    }

    #[test]
    fn pubsub_replies() {
        let mut buffer = BytesMut::from(
            &b"*3\r\n$7\r\nmessage\r\n$4\r\ncc:x\r\n$5\r\nhe\r\no\r\n*2\r\n$4\r\npong\r\n$0\r\n\r\n+OK\r\n-ERR no\r\n:3\r\n$-1\r\n"[..],
        );
        let mut values = Vec::new();
        while let Some(value) = parse(&mut buffer).unwrap() {
            values.push(value);
        }
        assert_eq!(
            values,
            [
                Value::Array(Some(vec![bulk("message"), bulk("cc:x"), bulk("he\r\no")])),
                Value::Array(Some(vec![bulk("pong"), bulk("")])),
                Value::Simple(Bytes::from_static(b"OK")),
                Value::Error(Bytes::from_static(b"ERR no")),
                Value::Integer(3),
                Value::Bulk(None),
            ]
        );
        assert!(buffer.is_empty());
    }

    #[test]
    fn incomplete_input_consumes_nothing() {
        let full = b"*3\r\n$7\r\nmessage\r\n$4\r\ncc:x\r\n$5\r\nhello\r\n";
        for cut in 0..full.len() {
            let mut buffer = BytesMut::from(&full[..cut]);
            assert_eq!(parse(&mut buffer).unwrap(), None, "cut at {cut}");
            assert_eq!(buffer.len(), cut);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for input in [
            &b"?x\r\n"[..],
            b"$abc\r\n",
            b"*99999999\r\n",
            b"$3\r\nabcXY",
        ] {
            let mut buffer = BytesMut::from(input);
            assert!(parse(&mut buffer).is_err(), "{input:?}");
        }
    }
}
