//! The two encodings of protocol v1: JSON text frames (`chat.v1.json`) and
//! MessagePack binary frames (`chat.v1.msgpack`, maps with the same field names).
//!
//! Both go through serde with the same types, so their semantics cannot drift.
//! MessagePack is written "human readable" so that ids and times are strings in
//! both encodings.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::frame::{IdOnly, RawRequest, Request, RequestError};

/// Subprotocol of JSON text frames.
pub const JSON_SUBPROTOCOL: &str = "chat.v1.json";
/// Subprotocol of MessagePack binary frames.
pub const MSGPACK_SUBPROTOCOL: &str = "chat.v1.msgpack";

/// A wire encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Encoding {
    /// JSON text frames; the default.
    #[default]
    Json,
    /// MessagePack binary frames.
    MsgPack,
}

impl Encoding {
    /// Both encodings.
    pub const ALL: [Encoding; 2] = [Encoding::Json, Encoding::MsgPack];

    /// The WebSocket subprotocol name.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Self::Json => JSON_SUBPROTOCOL,
            Self::MsgPack => MSGPACK_SUBPROTOCOL,
        }
    }

    /// The encoding of a subprotocol name.
    pub fn from_subprotocol(name: &str) -> Option<Self> {
        match name {
            JSON_SUBPROTOCOL => Some(Self::Json),
            MSGPACK_SUBPROTOCOL => Some(Self::MsgPack),
            _ => None,
        }
    }

    /// Whether frames of this encoding are binary WebSocket frames.
    pub fn is_binary(self) -> bool {
        self == Self::MsgPack
    }

    /// Short name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::MsgPack => "msgpack",
        }
    }
}

/// A frame that does not decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Malformed or mistyped JSON.
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Malformed or mistyped MessagePack.
    #[error("invalid MessagePack: {0}")]
    MsgPack(#[from] rmp_serde::decode::Error),
}

/// Encodes a value as named-field, human-readable MessagePack.
pub fn to_msgpack<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let mut serializer = rmp_serde::Serializer::new(&mut out)
        .with_struct_map()
        .with_human_readable();
    // Writing into a Vec cannot fail, and our types have only string map keys.
    if value.serialize(&mut serializer).is_err() {
        out.clear();
    }
    out
}

/// Appends the encoding of any frame to `out` (callers that frame the bytes
/// themselves reserve room in front).
pub fn encode_into<T: Serialize + ?Sized>(encoding: Encoding, value: &T, out: &mut Vec<u8>) {
    let start = out.len();
    let written = match encoding {
        Encoding::Json => serde_json::to_writer(&mut *out, value).is_ok(),
        Encoding::MsgPack => {
            let mut serializer = rmp_serde::Serializer::new(&mut *out)
                .with_struct_map()
                .with_human_readable();
            value.serialize(&mut serializer).is_ok()
        }
    };
    // Our frame types always serialize (string keys only, no NaN floats).
    if !written {
        out.truncate(start);
    }
}

/// Encodes any frame (a server frame, or a client's [`RawRequest`]).
pub fn encode<T: Serialize + ?Sized>(encoding: Encoding, value: &T) -> Bytes {
    match encoding {
        // Serializing our frame types to JSON cannot fail: string keys only, no NaN floats.
        Encoding::Json => Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
        Encoding::MsgPack => Bytes::from(to_msgpack(value)),
    }
}

/// Decodes any frame.
pub fn decode<T: DeserializeOwned>(encoding: Encoding, bytes: &[u8]) -> Result<T, DecodeError> {
    match encoding {
        Encoding::Json => Ok(serde_json::from_slice(bytes)?),
        Encoding::MsgPack => {
            let mut deserializer =
                rmp_serde::Deserializer::from_read_ref(bytes).with_human_readable();
            Ok(T::deserialize(&mut deserializer)?)
        }
    }
}

/// Decodes and checks a client request. On failure the error carries the
/// request's `id` when it could still be read, so the error reply can echo it.
pub fn decode_request(encoding: Encoding, bytes: &[u8]) -> Result<Request, RequestError> {
    match decode::<RawRequest>(encoding, bytes) {
        Ok(raw) => Request::try_from(raw),
        Err(error) => {
            let id = decode::<IdOnly>(encoding, bytes)
                .ok()
                .and_then(|only| only.id);
            Err(RequestError::bad_request(id, error.to_string()))
        }
    }
}

/// Encodes a client request.
pub fn encode_request(encoding: Encoding, request: &Request) -> Bytes {
    encode(encoding, &RawRequest::from(request))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Timestamp;
    use crate::frame::*;
    use proptest::prelude::*;
    use uuid::Uuid;

    const MAX: u64 = crate::validate::MAX_SAFE_INTEGER;

    #[test]
    fn numbers_above_2_pow_53_are_refused() {
        for (frame, field) in [
            (r#"{"op":"ping","clock":9007199254740992}"#, "clock"),
            (r#"{"op":"ping","clock":18446744073709551615}"#, "clock"),
            (
                r#"{"op":"history","channel":"a","before":9007199254740992}"#,
                "before",
            ),
            (
                r#"{"op":"subscribe","channel":"a","since":{"offset":9007199254740992,"epoch":"e"}}"#,
                "since.offset",
            ),
        ] {
            let err = decode_request(Encoding::Json, frame.as_bytes()).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{frame}");
            assert!(err.message.contains(field), "{frame}: {}", err.message);
        }
        let ok =
            decode_request(Encoding::Json, br#"{"op":"ping","clock":9007199254740991}"#).unwrap();
        assert_eq!(ok.clock, Some(MAX));
        let err =
            decode_request(Encoding::Json, br#"{"op":"ping","id":9007199254740992}"#).unwrap_err();
        assert!(err.message.contains("id"), "{}", err.message);
        assert_eq!(err.id, None, "an id out of bounds is not echoed");
        let long_id = format!(r#"{{"op":"ping","id":"{}"}}"#, "i".repeat(65));
        assert!(decode_request(Encoding::Json, long_id.as_bytes()).is_err());
        let long_epoch = format!(
            r#"{{"op":"subscribe","channel":"a","since":{{"offset":1,"epoch":"{}"}}}}"#,
            "e".repeat(65)
        );
        assert!(decode_request(Encoding::Json, long_epoch.as_bytes()).is_err());
    }

    #[test]
    fn names_are_normalised_to_nfc() {
        let request = decode_request(
            Encoding::Json,
            "{\"op\":\"login\",\"user\":\"Jose\u{301}\"}".as_bytes(),
        )
        .unwrap();
        assert_eq!(
            request.op,
            Op::Login {
                user: "José".into(),
                since: None,
            }
        );
    }

    #[test]
    fn refresh_tokens_are_not_shown_by_debug() {
        let request = decode_request(
            Encoding::Json,
            br#"{"op":"refresh","token":"eyJhbGciOi.secret.sig"}"#,
        )
        .unwrap();
        let shown = format!("{request:?}");
        assert!(!shown.contains("secret"), "{shown}");
        let err = decode_request(Encoding::Json, br#"{"op":"refresh"}"#).unwrap_err();
        assert_eq!(err.message, "refresh needs \"token\"");
    }

    #[test]
    fn subprotocols() {
        for encoding in Encoding::ALL {
            assert_eq!(
                Encoding::from_subprotocol(encoding.subprotocol()),
                Some(encoding)
            );
        }
        assert_eq!(Encoding::from_subprotocol("chat.v2"), None);
    }

    #[test]
    fn bad_json_keeps_the_id_when_it_can() {
        let err =
            decode_request(Encoding::Json, br#"{"op":"publish","id":7,"limit":"x"}"#).unwrap_err();
        assert_eq!(err.id, Some(RequestId::Int(7)));
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(err.message.contains("invalid JSON"), "{}", err.message);

        let err = decode_request(Encoding::Json, b"{not json").unwrap_err();
        assert_eq!(err.id, None);

        let err =
            decode_request(Encoding::Json, br#"{"op":"publish","id":"a","text":"x"}"#).unwrap_err();
        assert_eq!(err.message, "publish needs \"channel\"");
        assert_eq!(err.id, Some(RequestId::Str("a".into())));

        let err = decode_request(Encoding::Json, br#"{"op":"fly"}"#).unwrap_err();
        assert_eq!(err.message, "unknown op \"fly\"");
        let err = decode_request(Encoding::Json, br#"{"id":1}"#).unwrap_err();
        assert_eq!(err.message, "missing \"op\"");
        let err = decode_request(Encoding::Json, b"[1,2]").unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
    }

    #[test]
    fn idempotency_keys_are_checked_when_decoded() {
        let ok = decode_request(
            Encoding::Json,
            br#"{"op":"publish","channel":"c","text":"t","idempotency_key":"9f0e-01"}"#,
        )
        .unwrap();
        assert!(matches!(
            ok.op,
            Op::Publish { idempotency_key: Some(ref k), .. } if k == "9f0e-01"
        ));
        let long = format!(
            r#"{{"op":"message","id":3,"to":"b","text":"t","idempotency_key":"{}"}}"#,
            "k".repeat(MAX_IDEMPOTENCY_KEY + 1)
        );
        for bad in [
            br#"{"op":"message","id":3,"to":"b","text":"t","idempotency_key":""}"#.to_vec(),
            br#"{"op":"message","id":3,"to":"b","text":"t","idempotency_key":"a b"}"#.to_vec(),
            long.into_bytes(),
        ] {
            let err = decode_request(Encoding::Json, &bad).unwrap_err();
            assert_eq!(
                (err.code, err.id),
                (ErrorCode::BadRequest, Some(RequestId::Int(3)))
            );
            assert!(err.message.contains("idempotency_key"), "{}", err.message);
        }
    }

    #[test]
    fn bad_msgpack_is_bad_request() {
        let err = decode_request(Encoding::MsgPack, b"\xc1\xc1").unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(err.message.contains("MessagePack"));
    }

    #[test]
    fn server_frames_have_the_documented_shape() {
        let frame: ServerFrame = ServerFrame::Ok {
            id: Some(RequestId::Int(1)),
            clock: 5,
            data: ReplyData::Publish(PublishReply {
                channel: "geral".into(),
                offset: 42,
                msg_id: Uuid::nil(),
            }),
        };
        let json: serde_json::Value =
            serde_json::from_slice(&encode(Encoding::Json, &frame)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type":"ok","id":1,"clock":5,"data":{"channel":"geral","offset":42,"msg_id":"00000000-0000-0000-0000-000000000000"}})
        );
        let push: ServerFrame = ServerFrame::Message(ChannelMessage {
            channel: "geral".into(),
            offset: 42,
            msg_id: Uuid::nil(),
            user: "alice".into(),
            text: "Olá!".into(),
            ts: Timestamp(0),
            clock: 19,
        });
        let json: serde_json::Value =
            serde_json::from_slice(&encode(Encoding::Json, &push)).unwrap();
        assert_eq!(json["type"], "message");
        assert_eq!(json["ts"], "1970-01-01T00:00:00.000Z");
        let error: ServerFrame = ServerFrame::Error {
            id: None,
            clock: 1,
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
        };
        let json: serde_json::Value =
            serde_json::from_slice(&encode(Encoding::Json, &error)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type":"error","clock":1,"code":"rate_limited","message":"slow down"})
        );
        // MessagePack carries the same map.
        let back: serde_json::Value =
            decode(Encoding::MsgPack, &encode(Encoding::MsgPack, &push)).unwrap();
        assert_eq!(
            back,
            serde_json::from_slice::<serde_json::Value>(&encode(Encoding::Json, &push)).unwrap()
        );
    }

    fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_.:-]{1,64}"
    }

    fn any_id() -> impl Strategy<Value = Option<RequestId>> {
        prop_oneof![
            Just(None),
            (-(MAX as i64)..=MAX as i64).prop_map(|n| Some(RequestId::Int(n))),
            ".{0,16}".prop_map(|s| Some(RequestId::Str(s))),
        ]
    }

    fn any_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (name(), proptest::option::of((0..=MAX, "[a-z0-9]{0,12}"))).prop_map(
                |(user, since)| Op::Login {
                    user,
                    since: since.map(|(offset, epoch)| Since { offset, epoch }),
                }
            ),
            (proptest::option::of(name()), any::<Option<u32>>())
                .prop_map(|(cursor, limit)| Op::Users { cursor, limit }),
            name().prop_map(|channel| Op::Channel { channel }),
            (proptest::option::of(name()), any::<Option<u32>>())
                .prop_map(|(cursor, limit)| Op::Channels { cursor, limit }),
            ".{0,64}".prop_map(|token| Op::Refresh {
                token: Token(token)
            }),
            (name(), proptest::option::of((0..=MAX, "[a-z0-9]{0,12}"))).prop_map(
                |(channel, since)| Op::Subscribe {
                    channel,
                    since: since.map(|(offset, epoch)| Since { offset, epoch }),
                }
            ),
            name().prop_map(|channel| Op::Unsubscribe { channel }),
            (name(), ".{0,64}", proptest::option::of("[!-~]{1,128}")).prop_map(
                |(channel, text, idempotency_key)| Op::Publish {
                    channel,
                    text,
                    idempotency_key
                }
            ),
            (name(), ".{0,64}", proptest::option::of("[!-~]{1,128}")).prop_map(
                |(to, text, idempotency_key)| Op::Message {
                    to,
                    text,
                    idempotency_key
                }
            ),
            name().prop_map(|channel| Op::Presence { channel }),
            (name(), proptest::option::of(0..=MAX), any::<Option<u32>>()).prop_map(
                |(channel, before, limit)| Op::History {
                    channel,
                    before,
                    limit
                }
            ),
            (proptest::option::of(0..=MAX), any::<Option<u32>>())
                .prop_map(|(before, limit)| Op::Conversations { before, limit }),
            (name(), proptest::option::of(0..=MAX), any::<Option<u32>>()).prop_map(
                |(with, before, limit)| Op::DmHistory {
                    with,
                    before,
                    limit
                }
            ),
            Just(Op::Ping),
        ]
    }

    fn any_message() -> impl Strategy<Value = ChannelMessage> {
        (
            name(),
            any::<u64>(),
            any::<u128>(),
            name(),
            ".{0,64}",
            0i64..4_000_000_000_000,
            any::<u64>(),
        )
            .prop_map(
                |(channel, offset, id, user, text, ts, clock)| ChannelMessage {
                    channel,
                    offset,
                    msg_id: Uuid::from_u128(id),
                    user,
                    text,
                    ts: Timestamp(ts),
                    clock,
                },
            )
    }

    proptest! {
        #[test]
        fn requests_round_trip(id in any_id(), clock in proptest::option::of(0..=MAX), op in any_op()) {
            let request = Request { id, clock, op };
            for encoding in Encoding::ALL {
                let bytes = encode_request(encoding, &request);
                prop_assert_eq!(decode_request(encoding, &bytes), Ok(request.clone()));
            }
        }

        #[test]
        fn pushes_round_trip(message in any_message()) {
            let frame: ServerFrame<serde_json::Value> = ServerFrame::Message(message);
            for encoding in Encoding::ALL {
                let back: ServerFrame<serde_json::Value> = decode(encoding, &encode(encoding, &frame)).unwrap();
                prop_assert_eq!(&back, &frame);
            }
        }

        #[test]
        fn replies_round_trip(id in any_id(), clock in any::<u64>(), missed in proptest::collection::vec(any_message(), 0..4), recovered in any::<bool>()) {
            let reply = SubscribeReply {
                channel: "geral".into(),
                epoch: "e1".into(),
                offset: 9,
                presence: vec!["alice".into()],
                recovered,
                missed,
            };
            let frame: ServerFrame = ServerFrame::Ok { id: id.clone(), clock, data: ReplyData::Subscribe(reply.clone()) };
            for encoding in Encoding::ALL {
                let back: ServerFrame<serde_json::Value> = decode(encoding, &encode(encoding, &frame)).unwrap();
                let ServerFrame::Ok { id: back_id, clock: back_clock, data } = back else {
                    panic!("not an ok frame");
                };
                prop_assert_eq!(&back_id, &id);
                prop_assert_eq!(back_clock, clock);
                prop_assert_eq!(serde_json::from_value::<SubscribeReply>(data).unwrap(), reply.clone());
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            for encoding in Encoding::ALL {
                let _ = decode_request(encoding, &bytes);
            }
        }
    }
}
