//! Nothing stored twice, no offset reused, with real processes: publishes and
//! direct messages retried with an idempotency key, a Redis reply lost after
//! the script ran, and Redis restarted from its AOF — flushed on every write,
//! and rewound the way `appendfsync everysec` can lose the last second.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chatcluster_protocol::codec::Encoding;
use chatcluster_protocol::keys;
use chatcluster_testkit::proxy::{FaultProxy, LoseReply};
use chatcluster_testkit::{Fsync, Persistence, Postgres};
use common::*;
use serde_json::{Value, json};

/// The number in a RESP integer reply (`:3\r\n`).
fn integer(reply: &str) -> i64 {
    reply
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap_or_else(|_| panic!("not an integer reply: {reply:?}"))
}

fn history_len(redis: &RedisServer, channel: &str) -> i64 {
    integer(&redis.command(&["XLEN", &keys::history_key(channel, 4)]))
}

/// The proxy loses the reply of the first `APPEND` that succeeds (longer than
/// the short `NOSCRIPT`/`NOEPOCH` errors that come before it).
fn losing_append_replies(redis: &RedisServer) -> FaultProxy {
    let append = redis::Script::new(chatcluster_protocol::scripts::APPEND);
    FaultProxy::start(
        redis.socket(),
        LoseReply {
            command: append.get_hash().to_owned(),
            min_len: 60,
        },
    )
}

fn through(proxy: &FaultProxy) -> Gateway {
    Gateway::start(
        &proxy.redis_url(),
        GatewayOptions::default()
            .env("BACKEND_TIMEOUT", "300ms")
            .env("PUBSUB_PING_INTERVAL", "300ms"),
    )
}

#[tokio::test]
async fn a_lost_reply_is_an_unknown_outcome_and_the_retry_with_its_key_stores_nothing_twice() {
    let redis = RedisServer::start();
    let proxy = losing_append_replies(&redis);
    // Once the reply is lost Redis is unreachable, so the gateway cannot find
    // out itself what happened.
    proxy.refuse_after_loss(true);
    let gateway = through(&proxy);
    let mut alice = login(&gateway.ws_url(), Encoding::Json, "alice").await;
    let publish =
        json!({"op": "publish", "channel": "kept", "text": "once", "idempotency_key": "k-1"});
    let (code, message) = alice.err(publish.clone()).await;
    assert_eq!(proxy.fired(), 1, "the reply was lost");
    assert_eq!(code, "unknown_outcome", "{message}");
    assert!(message.contains("idempotency_key"), "{message}");
    assert_eq!(history_len(&redis, "kept"), 1, "the script ran");

    proxy.refuse(false);
    assert!(
        wait_until(Duration::from_secs(15), || http_status_blocking(
            gateway.admin_port,
            "/ready"
        ) == Some(200)),
        "the gateway reconnects"
    );
    // The retry is answered with the first result; nothing is added.
    let first = alice.ok(publish.clone()).await;
    assert_eq!(first["offset"], 1);
    let again = alice.ok(publish).await;
    assert_eq!(again, first);
    assert_eq!(history_len(&redis, "kept"), 1);
    let history = alice.ok(json!({"op": "history", "channel": "kept"})).await;
    assert_eq!(history["messages"].as_array().unwrap().len(), 1);
    assert_eq!(history["messages"][0]["msg_id"], first["msg_id"]);
    // Another key is another message.
    let next = alice
        .ok(json!({"op": "publish", "channel": "kept", "text": "twice", "idempotency_key": "k-2"}))
        .await;
    assert_eq!(next["offset"], 2);
    assert_eq!(
        gateway
            .metric("chatcluster_gateway_idempotent_replays_total")
            .await,
        2.0
    );
    assert_eq!(
        gateway
            .metric("chatcluster_gateway_unknown_outcomes_total")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_lost_reply_with_redis_still_there_is_resolved_by_the_gateway_through_the_key() {
    let redis = RedisServer::start();
    let proxy = losing_append_replies(&redis);
    let gateway = through(&proxy);
    let mut alice = login(&gateway.ws_url(), Encoding::MsgPack, "alice").await;
    let reply = alice
        .ok(json!({"op": "publish", "channel": "kept", "text": "once", "idempotency_key": "k-1"}))
        .await;
    assert_eq!(proxy.fired(), 1, "the reply was lost");
    assert_eq!(reply["offset"], 1);
    assert_eq!(history_len(&redis, "kept"), 1, "stored once");
    assert_eq!(
        gateway
            .metric("chatcluster_gateway_idempotent_replays_total")
            .await,
        1.0,
        "answered from the record of the attempt that ran"
    );
}

#[tokio::test]
async fn without_a_key_a_lost_reply_is_still_an_unknown_outcome_not_unavailable() {
    let redis = RedisServer::start();
    let proxy = losing_append_replies(&redis);
    let gateway = through(&proxy);
    let mut alice = login(&gateway.ws_url(), Encoding::Json, "alice").await;
    let (code, _) = alice
        .err(json!({"op": "publish", "channel": "kept", "text": "once"}))
        .await;
    assert_eq!(code, "unknown_outcome");
    assert_eq!(
        history_len(&redis, "kept"),
        1,
        "`unavailable` would have been a lie"
    );
}

#[tokio::test]
async fn direct_messages_retried_with_a_key_are_in_each_inbox_once() {
    let redis = RedisServer::start();
    let gateway = Gateway::start(&redis.url(), GatewayOptions::default());
    let mut alice = login(&gateway.ws_url(), Encoding::Json, "alice").await;
    let _bob = login(&gateway.ws_url(), Encoding::Json, "bob").await;
    let dm = json!({"op": "message", "to": "bob", "text": "oi", "idempotency_key": "dm-1"});
    let first = alice.ok(dm.clone()).await;
    let again = alice.ok(dm).await;
    assert_eq!(again, first, "the same message id and inbox offset");
    for user in ["alice", "bob"] {
        let inbox = redis.command(&["XLEN", &keys::inbox_key(user, 4)]);
        assert_eq!(integer(&inbox), 1, "{user}'s inbox");
    }
    // The same key from another sender is another message.
    let mut carol = login(&gateway.ws_url(), Encoding::Json, "carol").await;
    let other = carol
        .ok(json!({"op": "message", "to": "bob", "text": "oi", "idempotency_key": "dm-1"}))
        .await;
    assert_ne!(other["msg_id"], first["msg_id"]);
}

/// A gateway on `redis` with PostgreSQL for offset blocks (migrated here; no
/// worker is needed for offsets).
async fn with_blocks(redis: &RedisServer, postgres: &Postgres) -> Gateway {
    let pool = sqlx::PgPool::connect(&postgres.url()).await.unwrap();
    chatcluster_worker::store::MIGRATOR
        .run(&pool)
        .await
        .unwrap();
    Gateway::start(
        &redis.url(),
        GatewayOptions::default()
            .env("DATABASE_URL", &postgres.url())
            .env("OFFSET_BLOCK", "100"),
    )
}

async fn publish(client: &mut Client, text: &str) -> u64 {
    client
        .ok(json!({"op": "publish", "channel": "c", "text": text}))
        .await["offset"]
        .as_u64()
        .unwrap()
}

async fn restarted(redis: &mut RedisServer, gateway: &Gateway) {
    redis.restart();
    assert!(
        wait_until(Duration::from_secs(15), || http_status_blocking(
            gateway.admin_port,
            "/ready"
        ) == Some(200)),
        "the gateway reconnects"
    );
}

/// A new client's `subscribe` to `c` recovering after (`offset`, `epoch`).
async fn resubscribe(gateway: &Gateway, offset: u64, epoch: &Value) -> Value {
    let mut late = login(&gateway.ws_url(), Encoding::Json, "late").await;
    late.ok(json!({"op": "subscribe", "channel": "c", "since": {"offset": offset, "epoch": epoch}}))
        .await
}

/// Publishes until one is acknowledged (the first try after a restart can
/// meet the broken connection).
async fn publish_after_restart(client: &mut Client, text: &str) -> Value {
    for _ in 0..50 {
        let reply = client
            .request(json!({"op": "publish", "channel": "c", "text": text}))
            .await;
        if reply["type"] == "ok" {
            return reply["data"].clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("publishing never worked again");
}

#[tokio::test]
async fn a_rewound_redis_starts_a_new_epoch_above_every_offset_handed_out() {
    let mut redis = RedisServer::start_with(Persistence::Aof(Fsync::EverySec));
    let postgres = Postgres::start();
    let gateway = with_blocks(&redis, &postgres).await;
    let mut reader = login(&gateway.ws_url(), Encoding::Json, "reader").await;
    let epoch = reader.ok(json!({"op": "subscribe", "channel": "c"})).await["epoch"].clone();
    let mut writer = login(&gateway.ws_url(), Encoding::Json, "writer").await;
    for n in 1..=3 {
        assert_eq!(publish(&mut writer, &format!("m{n}")).await, n);
    }
    // A crash with `everysec` loses what was not flushed: here, the last two.
    let flushed = redis.snapshot();
    assert_eq!(publish(&mut writer, "m4").await, 4);
    assert_eq!(publish(&mut writer, "m5").await, 5);
    redis.kill();
    redis.restore(&flushed);
    restarted(&mut redis, &gateway).await;
    let after = publish_after_restart(&mut writer, "m6").await["offset"]
        .as_u64()
        .unwrap();
    assert!(after > 5, "offset {after} was handed out before the crash");
    assert_eq!(after, 101, "the new epoch starts above the reserved block");
    // The reader saw 1..=3 at least (4 and 5 were lost with Redis's last
    // second if it crashed before pushing them), then the new epoch: no
    // offset twice, none out of order.
    let mut got = Vec::new();
    while got.last() != Some(&after) {
        let push = reader
            .push_of("message", WAIT)
            .await
            .expect("the new epoch's message");
        got.push(push["offset"].as_u64().unwrap());
    }
    assert_eq!(got[..3], [1, 2, 3], "{got:?}");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    assert!(
        got[3..got.len() - 1].iter().all(|o| [4, 5].contains(o)),
        "{got:?}"
    );
    let reply = resubscribe(&gateway, 5, &epoch).await;
    assert_ne!(reply["epoch"], epoch, "a new epoch");
    assert_eq!(reply["recovered"], false);
    assert_eq!(reply["offset"], after);
}

#[tokio::test]
async fn redis_restarted_from_an_aof_flushed_on_every_write_keeps_its_epochs() {
    let mut redis = RedisServer::start_with(Persistence::Aof(Fsync::Always));
    let postgres = Postgres::start();
    let gateway = with_blocks(&redis, &postgres).await;
    let mut writer = login(&gateway.ws_url(), Encoding::Json, "writer").await;
    let epoch = writer.ok(json!({"op": "subscribe", "channel": "c"})).await["epoch"].clone();
    for n in 1..=3 {
        assert_eq!(publish(&mut writer, &format!("m{n}")).await, n);
    }
    redis.kill();
    restarted(&mut redis, &gateway).await;
    let after = publish_after_restart(&mut writer, "m4").await;
    assert_eq!(
        after["offset"], 4,
        "nothing was lost, so nothing is skipped"
    );
    let reply = resubscribe(&gateway, 2, &epoch).await;
    assert_eq!(reply["epoch"], epoch, "the same epoch");
    assert_eq!(reply["recovered"], true);
    assert_eq!(offsets(reply["missed"].as_array().unwrap()), [3, 4]);
}

#[tokio::test]
async fn server_side_publishes_are_idempotent_with_a_key_header_or_field() {
    let redis = RedisServer::start();
    let gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default().env("API_KEY", "secret"),
    );
    let port = gateway.port.unwrap();
    let post = |headers: Vec<(&'static str, &'static str)>, body: &'static str| async move {
        let mut all = vec![
            ("Authorization", "Bearer secret"),
            ("Content-Type", "application/json"),
        ];
        all.extend(headers);
        let (status, body) = http(port, "POST", "/api/channels/ops/messages", &all, body).await;
        (status, serde_json::from_str::<Value>(&body).unwrap())
    };
    let body = r#"{"user":"bot","text":"deployed"}"#;
    let (status, first) = post(vec![("Idempotency-Key", "deploy-42")], body).await;
    assert_eq!(status, 201, "{first}");
    let (status, again) = post(vec![("Idempotency-Key", "deploy-42")], body).await;
    assert_eq!((status, &again), (201, &first));
    let keyed = r#"{"user":"bot","text":"deployed","idempotency_key":"deploy-42"}"#;
    assert_eq!(
        post(vec![], keyed).await.1,
        first,
        "the body's key is the same key"
    );
    assert_eq!(history_len(&redis, "ops"), 1);
    let (status, error) = post(vec![("Idempotency-Key", "has space")], body).await;
    assert_eq!((status, error["code"].as_str()), (400, Some("bad_request")));
}
