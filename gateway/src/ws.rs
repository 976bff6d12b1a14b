//! The WebSocket wire format (RFC 6455), server side.
//!
//! The gateway frames WebSocket messages itself instead of going through a
//! general-purpose library, because fan-out needs two things such libraries do
//! not offer: a server frame (which is never masked) is the same bytes for every
//! recipient, so it is built once, header included, and shared ([`frame`]); and
//! a connection writes whatever is queued with one vectored write. Reading is a
//! small incremental parser ([`FrameReader`]) with the limits a public server
//! needs: masked client frames only, no extensions, bounded frame and message
//! sizes, valid UTF-8 text, well-formed control frames and fragmentation.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Opcodes of RFC 6455, section 5.2.
pub mod opcode {
    /// A continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// A UTF-8 text message.
    pub const TEXT: u8 = 0x1;
    /// A binary message.
    pub const BINARY: u8 = 0x2;
    /// Closing handshake.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// Close codes the gateway sends (RFC 6455, section 7.4.1).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Going away (idle, shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Invalid payload data (text that is not UTF-8).
    pub const INVALID_DATA: u16 = 1007;
    /// Policy violation (slow reader, repeated garbage).
    pub const POLICY: u16 = 1008;
    /// Message too big.
    pub const TOO_BIG: u16 = 1009;
    /// The session's token expired (private-use range): refresh it with a
    /// new token before `exp`, or reconnect with one.
    pub const TOKEN_EXPIRED: u16 = 4001;
}

/// The `Sec-WebSocket-Accept` answer to a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    use base64::Engine as _;
    use sha1::Digest as _;
    let mut sha = sha1::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Longest header of a server frame: 2 bytes plus a 64-bit length.
pub const MAX_HEADER: usize = 10;

/// Writes the header of an unmasked, final frame into `out`.
fn put_header(out: &mut impl BufMut, opcode: u8, len: usize) {
    out.put_u8(0x80 | opcode);
    if len < 126 {
        out.put_u8(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.put_u8(126);
        out.put_u16(len);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
}

/// The length of the header [`put_header`] writes for a payload of `len` bytes.
fn header_len(len: usize) -> usize {
    if len < 126 {
        2
    } else if len <= usize::from(u16::MAX) {
        4
    } else {
        MAX_HEADER
    }
}

/// A complete server frame (header and payload) carrying `payload`.
pub fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    put_header(&mut out, opcode, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// Builds a frame from a payload written after [`MAX_HEADER`] reserved bytes,
/// without copying the payload: the header is written right before it.
///
/// `buffer` must start with `MAX_HEADER` bytes of room, as left by
/// [`payload_buffer`].
pub fn frame_in_place(opcode: u8, mut buffer: Vec<u8>) -> Bytes {
    let len = buffer.len().saturating_sub(MAX_HEADER);
    let start = MAX_HEADER - header_len(len);
    let mut header = &mut buffer[start..MAX_HEADER];
    put_header(&mut header, opcode, len);
    Bytes::from(buffer).slice(start..)
}

/// An empty payload buffer with room for the header of [`frame_in_place`].
pub fn payload_buffer(capacity: usize) -> Vec<u8> {
    let mut buffer = Vec::with_capacity(MAX_HEADER + capacity);
    buffer.resize(MAX_HEADER, 0);
    buffer
}

/// A close frame with a code and a reason (at most 123 bytes of it are sent).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    frame(opcode::CLOSE, &payload)
}

/// A message or control frame received from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A complete text message (valid UTF-8).
    Text(Bytes),
    /// A complete binary message.
    Binary(Bytes),
    /// A ping with its payload (to be answered with a pong).
    Ping(Bytes),
    /// A pong.
    Pong,
    /// The client's close frame: its code, when it sent one.
    Close(Option<u16>),
}

/// Why a client's bytes are not acceptable WebSocket; the connection is closed
/// with [`WsError::close_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// A frame or message larger than allowed.
    #[error("message of {0} bytes is over the limit")]
    TooBig(u64),
    /// Text that is not UTF-8.
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    /// Anything else RFC 6455 forbids.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

impl WsError {
    /// The close code that tells the client why.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::TooBig(_) => close_code::TOO_BIG,
            Self::InvalidUtf8 => close_code::INVALID_DATA,
            Self::Protocol(_) => close_code::PROTOCOL_ERROR,
        }
    }
}

/// A fragmented message being assembled.
#[derive(Debug)]
struct Partial {
    opcode: u8,
    data: BytesMut,
}

/// Incremental parser of client frames: feed it bytes with [`FrameReader::buffer`],
/// take messages with [`FrameReader::next`].
#[derive(Debug)]
pub struct FrameReader {
    buffer: BytesMut,
    partial: Option<Partial>,
    max_message: usize,
}

impl FrameReader {
    /// A reader accepting messages (and frames) up to `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self {
            buffer: BytesMut::new(),
            partial: None,
            max_message,
        }
    }

    /// The buffer to read socket bytes into.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buffer
    }

    /// Releases the buffer's memory when nothing is left in it (idle
    /// connections then hold no read buffer).
    pub fn shrink_if_empty(&mut self) {
        if self.buffer.is_empty() && self.partial.is_none() && self.buffer.capacity() > 0 {
            self.buffer = BytesMut::new();
        }
    }

    /// The next complete message or control frame, `None` when more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Incoming>, WsError> {
        loop {
            let Some(header) = self.parse_header()? else {
                return Ok(None);
            };
            let total = header.header_len + header.payload_len;
            if self.buffer.len() < total {
                self.buffer.reserve(total - self.buffer.len());
                return Ok(None);
            }
            self.buffer.advance(header.header_len);
            let mut payload = self.buffer.split_to(header.payload_len);
            unmask(&mut payload, header.mask);
            if let Some(incoming) = self.accept(header.fin, header.opcode, payload)? {
                return Ok(Some(incoming));
            }
        }
    }

    /// Reads and checks the next frame header, if all of it is buffered.
    fn parse_header(&self) -> Result<Option<Header>, WsError> {
        let buf = &self.buffer[..];
        if buf.len() < 2 {
            return Ok(None);
        }
        let (first, second) = (buf[0], buf[1]);
        if first & 0x70 != 0 {
            return Err(WsError::Protocol(
                "reserved bits set (no extension was negotiated)",
            ));
        }
        if second & 0x80 == 0 {
            return Err(WsError::Protocol("client frames must be masked"));
        }
        let fin = first & 0x80 != 0;
        let opcode = first & 0x0F;
        let (len, len_bytes) = match second & 0x7F {
            126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 2),
            127 if buf.len() >= 10 => {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(&buf[2..10]);
                (u64::from_be_bytes(raw), 8)
            }
            126 | 127 => return Ok(None),
            short => (u64::from(short), 0),
        };
        let is_control = opcode & 0x8 != 0;
        if is_control {
            if !matches!(opcode, opcode::CLOSE | opcode::PING | opcode::PONG) {
                return Err(WsError::Protocol("unknown control opcode"));
            }
            if !fin {
                return Err(WsError::Protocol("fragmented control frame"));
            }
            if len > 125 {
                return Err(WsError::Protocol("control frame over 125 bytes"));
            }
        } else if !matches!(opcode, opcode::CONTINUATION | opcode::TEXT | opcode::BINARY) {
            return Err(WsError::Protocol("unknown data opcode"));
        }
        let so_far = self.partial.as_ref().map_or(0, |p| p.data.len() as u64);
        if !is_control && so_far.saturating_add(len) > self.max_message as u64 {
            return Err(WsError::TooBig(so_far.saturating_add(len)));
        }
        let header_len = 2 + len_bytes + 4;
        if buf.len() < header_len {
            return Ok(None);
        }
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&buf[2 + len_bytes..header_len]);
        Ok(Some(Header {
            fin,
            opcode,
            // Bounded by `max_message` (data) or 125 (control) above.
            payload_len: usize::try_from(len).map_err(|_| WsError::TooBig(len))?,
            header_len,
            mask,
        }))
    }

    /// Handles one unmasked frame; returns a message once one is complete.
    fn accept(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: BytesMut,
    ) -> Result<Option<Incoming>, WsError> {
        match opcode {
            opcode::PING => Ok(Some(Incoming::Ping(payload.freeze()))),
            opcode::PONG => Ok(Some(Incoming::Pong)),
            opcode::CLOSE => close_payload(&payload).map(|code| Some(Incoming::Close(code))),
            opcode::CONTINUATION => {
                let Some(partial) = self.partial.as_mut() else {
                    return Err(WsError::Protocol("continuation without a message"));
                };
                partial.data.extend_from_slice(&payload);
                if !fin {
                    return Ok(None);
                }
                let Some(Partial { opcode, data }) = self.partial.take() else {
                    return Ok(None);
                };
                message(opcode, data.freeze()).map(Some)
            }
            _ => {
                if self.partial.is_some() {
                    return Err(WsError::Protocol("new message before the last one ended"));
                }
                if fin {
                    return message(opcode, payload.freeze()).map(Some);
                }
                self.partial = Some(Partial {
                    opcode,
                    data: payload,
                });
                Ok(None)
            }
        }
    }
}

#[derive(Debug)]
struct Header {
    fin: bool,
    opcode: u8,
    payload_len: usize,
    header_len: usize,
    mask: [u8; 4],
}

fn message(opcode: u8, data: Bytes) -> Result<Incoming, WsError> {
    if opcode == opcode::TEXT {
        std::str::from_utf8(&data).map_err(|_| WsError::InvalidUtf8)?;
        Ok(Incoming::Text(data))
    } else {
        Ok(Incoming::Binary(data))
    }
}

/// The code of a close frame's payload (empty, or a code and a UTF-8 reason).
fn close_payload(payload: &[u8]) -> Result<Option<u16>, WsError> {
    match payload {
        [] => Ok(None),
        [_] => Err(WsError::Protocol("close frame with a one-byte payload")),
        [high, low, reason @ ..] => {
            std::str::from_utf8(reason).map_err(|_| WsError::InvalidUtf8)?;
            Ok(Some(u16::from_be_bytes([*high, *low])))
        }
    }
}

/// XORs a client payload with its mask, eight bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A client frame as a browser would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = Vec::new();
        out.push(if fin { 0x80 } else { 0 } | opcode);
        match payload.len() {
            len @ 0..=125 => out.push(0x80 | len as u8),
            len @ 126..=65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn read_all(reader: &mut FrameReader, bytes: &[u8]) -> Result<Vec<Incoming>, WsError> {
        reader.buffer().extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(incoming) = reader.next_message()? {
            out.push(incoming);
        }
        Ok(out)
    }

    #[test]
    fn accept_key_of_rfc_6455() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn server_frames_have_the_shortest_header() {
        assert_eq!(&frame(opcode::TEXT, b"hi")[..], b"\x81\x02hi");
        let medium = frame(opcode::BINARY, &[7u8; 300]);
        assert_eq!(&medium[..4], &[0x82, 126, 0x01, 0x2C]);
        assert_eq!(medium.len(), 304);
        let large = frame(opcode::TEXT, &vec![b'a'; 70_000]);
        assert_eq!(&large[..2], &[0x81, 127]);
        assert_eq!(u64::from_be_bytes(large[2..10].try_into().unwrap()), 70_000);
    }

    #[test]
    fn in_place_frames_equal_copied_frames() {
        for len in [0, 1, 125, 126, 65_535, 65_536] {
            let payload = vec![b'x'; len];
            let mut buffer = payload_buffer(len);
            buffer.extend_from_slice(&payload);
            assert_eq!(
                frame_in_place(opcode::TEXT, buffer),
                frame(opcode::TEXT, &payload),
                "length {len}"
            );
        }
    }

    #[test]
    fn close_frames_carry_code_and_a_bounded_reason() {
        assert_eq!(&close_frame(1008, "slow")[..], b"\x88\x06\x03\xF0slow");
        let long = "é".repeat(100);
        let frame = close_frame(1000, &long);
        assert!(frame.len() <= 2 + 125);
        assert!(
            std::str::from_utf8(&frame[4..]).is_ok(),
            "cut on a char boundary"
        );
    }

    #[test]
    fn masked_frames_of_every_length_class() {
        let mut reader = FrameReader::new(1 << 20);
        for len in [0, 5, 125, 126, 300, 65_535, 65_536, 100_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let bytes = client_frame(true, opcode::BINARY, &payload, [1, 2, 3, 4]);
            assert_eq!(
                read_all(&mut reader, &bytes).unwrap(),
                [Incoming::Binary(Bytes::from(payload))],
                "length {len}"
            );
        }
    }

    #[test]
    fn fragmented_messages_with_interleaved_control_frames() {
        let mut reader = FrameReader::new(1024);
        let mut bytes = client_frame(false, opcode::TEXT, "Olá, ".as_bytes(), [9, 8, 7, 6]);
        bytes.extend(client_frame(true, opcode::PING, b"p", [1, 1, 1, 1]));
        bytes.extend(client_frame(
            true,
            opcode::CONTINUATION,
            b"mundo",
            [5, 5, 5, 5],
        ));
        assert_eq!(
            read_all(&mut reader, &bytes).unwrap(),
            [
                Incoming::Ping(Bytes::from_static(b"p")),
                Incoming::Text(Bytes::from("Olá, mundo"))
            ]
        );
    }

    #[test]
    fn text_split_inside_a_character_is_valid_once_complete() {
        let mut reader = FrameReader::new(1024);
        let text = "é".as_bytes();
        let mut bytes = client_frame(false, opcode::TEXT, &text[..1], [0; 4]);
        bytes.extend(client_frame(true, opcode::CONTINUATION, &text[1..], [0; 4]));
        assert_eq!(
            read_all(&mut reader, &bytes).unwrap(),
            [Incoming::Text(Bytes::from("é"))]
        );
    }

    #[test]
    fn byte_by_byte_input_gives_the_same_messages() {
        let mut bytes = client_frame(true, opcode::TEXT, b"hello", [3, 1, 4, 1]);
        bytes.extend(client_frame(
            true,
            opcode::CLOSE,
            b"\x03\xE8bye",
            [2, 7, 1, 8],
        ));
        let mut reader = FrameReader::new(1024);
        let mut out = Vec::new();
        for byte in bytes {
            out.extend(read_all(&mut reader, &[byte]).unwrap());
        }
        assert_eq!(
            out,
            [
                Incoming::Text(Bytes::from_static(b"hello")),
                Incoming::Close(Some(1000))
            ]
        );
    }

    #[test]
    fn violations_are_refused_with_the_right_close_code() {
        let cases: [(Vec<u8>, u16); 9] = [
            (b"\x81\x05hello".to_vec(), close_code::PROTOCOL_ERROR), // unmasked
            (
                client_frame(true, 0x1 | 0x40, b"x", [0; 4]),
                close_code::PROTOCOL_ERROR,
            ), // RSV1
            (
                client_frame(true, 0x3, b"x", [0; 4]),
                close_code::PROTOCOL_ERROR,
            ),
            (
                client_frame(true, 0xB, b"x", [0; 4]),
                close_code::PROTOCOL_ERROR,
            ),
            (
                client_frame(false, opcode::PING, b"x", [0; 4]),
                close_code::PROTOCOL_ERROR,
            ),
            (
                client_frame(true, opcode::PING, &[0; 126], [0; 4]),
                close_code::PROTOCOL_ERROR,
            ),
            (
                client_frame(true, opcode::CONTINUATION, b"x", [0; 4]),
                close_code::PROTOCOL_ERROR,
            ),
            (
                client_frame(true, opcode::TEXT, &[0xC3, 0x28], [0; 4]),
                close_code::INVALID_DATA,
            ),
            (
                client_frame(true, opcode::BINARY, &[0; 2000], [0; 4]),
                close_code::TOO_BIG,
            ),
        ];
        for (bytes, code) in cases {
            let mut reader = FrameReader::new(1024);
            let error = read_all(&mut reader, &bytes).unwrap_err();
            assert_eq!(error.close_code(), code, "{error} for {bytes:?}");
        }
    }

    #[test]
    fn oversize_is_refused_from_the_header_before_the_payload_arrives() {
        let mut reader = FrameReader::new(1024);
        let header = &client_frame(true, opcode::BINARY, &vec![0; 1 << 20], [0; 4])[..14];
        assert_eq!(
            read_all(&mut reader, header).unwrap_err(),
            WsError::TooBig(1 << 20)
        );
        let mut reader = FrameReader::new(1024);
        let mut bytes = client_frame(false, opcode::TEXT, &[b'a'; 600], [0; 4]);
        bytes.extend(client_frame(
            true,
            opcode::CONTINUATION,
            &[b'a'; 600],
            [0; 4],
        ));
        assert!(matches!(
            read_all(&mut reader, &bytes),
            Err(WsError::TooBig(1200))
        ));
    }

    #[test]
    fn idle_reader_releases_its_buffer() {
        let mut reader = FrameReader::new(1024);
        read_all(
            &mut reader,
            &client_frame(true, opcode::TEXT, b"hi", [0; 4]),
        )
        .unwrap();
        reader.shrink_if_empty();
        assert_eq!(reader.buffer().capacity(), 0);
    }

    proptest! {
        #[test]
        fn any_fragmentation_and_chunking_round_trips(
            payload in proptest::collection::vec(any::<u8>(), 0..3000),
            cuts in proptest::collection::vec(1usize..400, 0..8),
            chunk in 1usize..64,
            mask in any::<[u8; 4]>(),
        ) {
            let mut bytes = Vec::new();
            let mut rest = &payload[..];
            let mut first = true;
            for cut in cuts {
                let cut = cut.min(rest.len());
                let opcode = if first { opcode::BINARY } else { opcode::CONTINUATION };
                bytes.extend(client_frame(false, opcode, &rest[..cut], mask));
                rest = &rest[cut..];
                first = false;
            }
            let opcode = if first { opcode::BINARY } else { opcode::CONTINUATION };
            bytes.extend(client_frame(true, opcode, rest, mask));
            let mut reader = FrameReader::new(1 << 20);
            let mut out = Vec::new();
            for piece in bytes.chunks(chunk) {
                out.extend(read_all(&mut reader, piece).unwrap());
            }
            prop_assert_eq!(out, vec![Incoming::Binary(Bytes::from(payload))]);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut reader = FrameReader::new(256);
            let _ = read_all(&mut reader, &bytes);
        }
    }
}
