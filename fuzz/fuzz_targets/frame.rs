//! Client frames, JSON and MessagePack: decoding, bounds, and the pure part
//! of every op's handling (validation, budget cost, channel claims, clock,
//! reply encoding). The first byte picks the encoding.

#![no_main]

use chatcluster_gateway::auth::Identity;
use chatcluster_gateway::budget;
use chatcluster_gateway::outbox::encode_frame;
use chatcluster_protocol::clock::{LamportClock, MAX_CLOCK};
use chatcluster_protocol::codec::{self, Encoding};
use chatcluster_protocol::frame::{
    Empty, ErrorCode, Op, ReplyData, ServerFrame, check_idempotency_key,
};
use chatcluster_protocol::validate::{self, MAX_SAFE_INTEGER, ValidationError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let encoding = if selector & 1 == 0 {
        Encoding::Json
    } else {
        Encoding::MsgPack
    };
    let clock = LamportClock::new();
    clock.observe(u64::from(selector) << 46);
    let frame = match codec::decode_request(encoding, bytes) {
        Ok(request) => {
            assert!(request.clock.is_none_or(|c| c <= MAX_SAFE_INTEGER));
            let again = codec::decode_request(encoding, &codec::encode_request(encoding, &request))
                .expect("a decoded request encodes to a decodable one");
            assert_eq!(again, request, "decode . encode is the identity");
            let now = clock.tick(request.clock);
            assert!(now <= MAX_CLOCK && now > 0);
            match handle(&request.op) {
                Ok(()) => ServerFrame::Ok {
                    id: request.id,
                    clock: now,
                    data: ReplyData::Pong(Empty {}),
                },
                Err(error) => ServerFrame::Error {
                    id: request.id,
                    clock: now,
                    code: error.code(),
                    message: error.to_string(),
                },
            }
        }
        Err(error) => {
            assert_eq!(error.code, ErrorCode::BadRequest);
            ServerFrame::Error {
                id: error.id,
                clock: clock.tick(None),
                code: error.code,
                message: error.message,
            }
        }
    };
    let encoded = encode_frame(encoding, &frame);
    assert!(!encoded.is_empty());
    let plain = codec::encode(encoding, &frame);
    let back: ServerFrame<serde_json::Value> =
        codec::decode(encoding, &plain).expect("server frames decode");
    assert!(matches!(
        back,
        ServerFrame::Ok { .. } | ServerFrame::Error { .. }
    ));
});

/// The checks of a `publish` or `message` body: a decoded key is always valid.
fn keyed_text(text: &str, key: Option<&str>, max_text: usize) -> Result<(), ValidationError> {
    assert!(key.is_none_or(|key| check_idempotency_key(key).is_ok()));
    validate::text(text, max_text)
}

/// What a session checks before any backend call.
fn handle(op: &Op) -> Result<(), ValidationError> {
    let restricted = Identity {
        user: "fuzz".into(),
        channels: Some(vec!["*".into(), "a?c*".into(), "room.*".into()]),
        expires: Some(1),
    };
    if let Some(cost) = budget::cost(op) {
        assert!(cost > 0.0 && cost <= budget::MAX_COST);
    }
    let max_text = validate::DEFAULT_MAX_TEXT_BYTES;
    match op {
        Op::Login { user, since } => {
            if let Some(since) = since {
                assert!(since.offset <= MAX_SAFE_INTEGER);
            }
            validate::user_name(user)
        }
        Op::Users { cursor, limit } | Op::Channels { cursor, limit } => {
            if let Some(cursor) = cursor {
                assert!(cursor.len() <= validate::MAX_CHANNEL_LEN);
            }
            validate::page_limit(*limit, 1000).map(drop)
        }
        Op::Channel { channel }
        | Op::Unsubscribe { channel }
        | Op::Presence { channel }
        | Op::Subscribe { channel, .. } => {
            validate::channel_name(channel)?;
            assert!(restricted.may_use(channel), "* allows every channel");
            Ok(())
        }
        Op::Publish {
            channel,
            text,
            idempotency_key,
        } => {
            validate::channel_name(channel)?;
            keyed_text(text, idempotency_key.as_deref(), max_text)
        }
        Op::Message {
            to,
            text,
            idempotency_key,
        } => {
            validate::user_name(to)?;
            keyed_text(text, idempotency_key.as_deref(), max_text)
        }
        Op::History {
            channel,
            before,
            limit,
        } => {
            assert!(before.is_none_or(|b| b <= MAX_SAFE_INTEGER));
            validate::channel_name(channel)?;
            validate::history_limit(*limit).map(drop)
        }
        Op::Conversations { before, limit } => {
            assert!(before.is_none_or(|b| b <= MAX_SAFE_INTEGER));
            validate::history_limit(*limit).map(drop)
        }
        Op::DmHistory {
            with,
            before,
            limit,
        } => {
            assert!(before.is_none_or(|b| b <= MAX_SAFE_INTEGER));
            validate::user_name(with)?;
            validate::history_limit(*limit).map(drop)
        }
        Op::Ping => Ok(()),
        Op::Refresh { token } => {
            assert!(token.0.len() <= validate::MAX_TOKEN_BYTES);
            assert!(format!("{token:?}").starts_with("Token([redacted"));
            Ok(())
        }
    }
}
