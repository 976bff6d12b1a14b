//! Every operation and every error code against one real gateway and Redis,
//! in both encodings.

#![allow(clippy::unwrap_used)]

mod common;

use chatcluster_protocol::codec::Encoding;
use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn every_operation_in_both_encodings() {
    let redis = RedisServer::start();
    let gateway = Gateway::start(&redis.url(), GatewayOptions::default());
    for encoding in Encoding::ALL {
        let (alice, bob, room) = match encoding {
            Encoding::Json => ("alice", "bob", "room.json"),
            Encoding::MsgPack => ("carol", "dave", "room.msgpack"),
        };
        let mut a = login(&gateway.ws_url(), encoding, alice).await;
        let mut b = login(&gateway.ws_url(), encoding, bob).await;

        let pong = a.request(json!({"op": "ping", "clock": 1000})).await;
        assert_eq!(pong["type"], "ok");
        assert!(
            pong["clock"].as_u64().unwrap() > 1000,
            "Lamport: max(local, received) + 1"
        );

        let created = a.ok(json!({"op": "channel", "channel": room})).await;
        assert_eq!(created, json!({"channel": room, "created": true}));
        let again = b.ok(json!({"op": "channel", "channel": room})).await;
        assert_eq!(again["created"], false, "channel creation is idempotent");
        let channels = a.ok(json!({"op": "channels"})).await;
        assert!(
            channels["channels"]
                .as_array()
                .unwrap()
                .contains(&json!(room))
        );
        let users = a.ok(json!({"op": "users"})).await;
        assert!(users["users"].as_array().unwrap().contains(&json!(bob)));

        let sub = a.ok(json!({"op": "subscribe", "channel": room})).await;
        assert_eq!(sub["channel"], room);
        assert_eq!(sub["offset"], 0);
        assert_eq!(sub["recovered"], false);
        assert_eq!(sub["presence"], json!([alice]));
        b.ok(json!({"op": "subscribe", "channel": room})).await;
        let join = loop {
            let event = a.push_of("presence", WAIT).await.unwrap();
            if event["user"] != alice {
                break event;
            }
        };
        assert_eq!(
            (join["event"].as_str(), join["user"].as_str()),
            (Some("join"), Some(bob))
        );

        let presence = a.ok(json!({"op": "presence", "channel": room})).await;
        let mut expected = vec![alice, bob];
        expected.sort();
        assert_eq!(presence["users"], json!(expected));

        let published = b
            .ok(json!({"op": "publish", "channel": room, "text": "Olá!"}))
            .await;
        assert_eq!(published["offset"], 1);
        let message = a.push_of("message", WAIT).await.unwrap();
        assert_eq!(message["text"], "Olá!");
        assert_eq!(message["user"], bob);
        assert_eq!(message["offset"], 1);
        assert_eq!(message["msg_id"], published["msg_id"]);
        assert!(message["ts"].as_str().unwrap().ends_with('Z'));

        let dm = a
            .ok(json!({"op": "message", "to": bob, "text": "Oi!"}))
            .await;
        let direct = b.push_of("direct", WAIT).await.unwrap();
        assert_eq!(
            (direct["from"].as_str(), direct["to"].as_str()),
            (Some(alice), Some(bob))
        );
        assert_eq!(direct["msg_id"], dm["msg_id"]);
        // The sender's own connections see the DM too.
        let echo = a.push_of("direct", WAIT).await.unwrap();
        assert_eq!(echo["msg_id"], dm["msg_id"]);

        let unsub = b.ok(json!({"op": "unsubscribe", "channel": room})).await;
        assert_eq!(unsub, json!({"channel": room}));
        let leave = a.push_of("presence", WAIT).await.unwrap();
        assert_eq!(
            (leave["event"].as_str(), leave["user"].as_str()),
            (Some("leave"), Some(bob))
        );

        // No database (EPHEMERAL): history is what the Redis history stream keeps.
        let history = a.ok(json!({"op": "history", "channel": room})).await;
        assert_eq!(history["messages"][0]["msg_id"], published["msg_id"]);
        assert_eq!(history["messages"].as_array().map(Vec::len), Some(1));
    }
}

#[tokio::test]
async fn every_error_code_and_the_connection_stays_open() {
    let redis = RedisServer::start();
    let gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default()
            .env("PUBLISH_RATE", "1")
            .env("PUBLISH_BURST", "3")
            .env("MAX_TEXT_BYTES", "16"),
    );
    let url = gateway.ws_url();
    let mut anon = connect(&url, Encoding::Json).await;

    // bad_request: malformed JSON, unknown op, wrong types, missing fields, bad names.
    anon.send_raw(Message::Text("{not json".into())).await;
    let frame = anon.next_frame(WAIT).await.unwrap();
    assert_eq!(
        (frame["type"].as_str(), frame["code"].as_str()),
        (Some("error"), Some("bad_request"))
    );
    let (code, message) = anon.err(json!({"op": "teleport"})).await;
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("bad_request", "unknown op \"teleport\"")
    );
    let (code, _) = anon
        .err(json!({"op": "history", "channel": "x", "limit": "ten"}))
        .await;
    assert_eq!(code, "bad_request");
    let (code, message) = anon.err(json!({"op": "publish", "text": "x"})).await;
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("bad_request", "publish needs \"channel\"")
    );
    let (code, _) = anon.err(json!({"op": "login", "user": "no spaces"})).await;
    assert_eq!(code, "bad_request");
    let (code, _) = anon
        .err(json!({"op": "history", "channel": "x", "limit": 500}))
        .await;
    assert_eq!(code, "bad_request");
    // A binary frame on a JSON connection.
    anon.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(anon.next_frame(WAIT).await.unwrap()["code"], "bad_request");

    // unauthorized: publishing before login.
    let (code, _) = anon
        .err(json!({"op": "publish", "channel": "geral", "text": "hi"}))
        .await;
    assert_eq!(code, "unauthorized");
    let (code, _) = anon
        .err(json!({"op": "subscribe", "channel": "geral"}))
        .await;
    assert_eq!(code, "unauthorized");

    anon.ok(json!({"op": "login", "user": "eve"})).await;
    // not_found: unknown DM recipient, history of a channel never created, unsubscribing what was not subscribed.
    let (code, _) = anon
        .err(json!({"op": "message", "to": "nobody", "text": "hi"}))
        .await;
    assert_eq!(code, "not_found");
    let (code, _) = anon
        .err(json!({"op": "history", "channel": "never.made"}))
        .await;
    assert_eq!(code, "not_found");
    let (code, _) = anon
        .err(json!({"op": "unsubscribe", "channel": "geral"}))
        .await;
    assert_eq!(code, "not_found");

    // too_large: text over MAX_TEXT_BYTES.
    let (code, message) = anon
        .err(json!({"op": "publish", "channel": "geral", "text": "x".repeat(17)}))
        .await;
    assert_eq!(code, "too_large", "{message}");

    // rate_limited: a fresh connection has a burst of 3, then is refused.
    let mut fast = login(&url, Encoding::MsgPack, "fast").await;
    for i in 0..3 {
        fast.ok(json!({"op": "publish", "channel": "geral", "text": format!("m{i}")}))
            .await;
    }
    let (code, _) = fast
        .err(json!({"op": "publish", "channel": "geral", "text": "one too many"}))
        .await;
    assert_eq!(code, "rate_limited");
    fast.ok(json!({"op": "ping"})).await;

    // Still open after all of that.
    anon.ok(json!({"op": "ping"})).await;
    assert!(
        gateway
            .metric("chatcluster_gateway_errors_total{code=\"bad_request\"}")
            .await
            >= 7.0
    );
}

#[tokio::test]
async fn redis_down_means_unavailable_then_recovers() {
    let mut redis = RedisServer::start();
    let gateway = Gateway::start(&redis.url(), GatewayOptions::default());
    let mut sub = login(&gateway.ws_url(), Encoding::MsgPack, "sub").await;
    let mut publisher = login(&gateway.ws_url(), Encoding::Json, "pub").await;
    sub.ok(json!({"op": "subscribe", "channel": "geral"})).await;
    publisher
        .ok(json!({"op": "publish", "channel": "geral", "text": "before"}))
        .await;
    assert_eq!(sub.messages(1).await[0]["text"], "before");

    redis.kill();
    // The connection broke under the request: the gateway cannot know
    // whether Redis ran it, and says so.
    let (code, _) = publisher
        .err(json!({"op": "publish", "channel": "geral", "text": "during"}))
        .await;
    assert!(code == "unknown_outcome" || code == "unavailable", "{code}");
    assert!(
        wait_until(std::time::Duration::from_secs(5), || http_status_blocking(
            gateway.admin_port,
            "/ready"
        ) == Some(503)),
        "/ready must fail while Redis is down"
    );
    // Refused outright: nothing was stored.
    let (code, _) = publisher
        .err(json!({"op": "publish", "channel": "geral", "text": "during"}))
        .await;
    assert_eq!(code, "unavailable");
    assert_eq!(
        http_status_blocking(gateway.admin_port, "/health"),
        Some(200),
        "liveness is unaffected"
    );

    redis.restart();
    assert!(
        wait_until(std::time::Duration::from_secs(15), || http_status_blocking(
            gateway.admin_port,
            "/ready"
        ) == Some(200)),
        "/ready must recover"
    );
    // Redis lost everything. Connections keep their identity, the gateway
    // re-subscribed its topics and registered its connected users again.
    let mut published = None;
    for _ in 0..50 {
        let reply = publisher
            .request(json!({"op": "publish", "channel": "geral", "text": "after"}))
            .await;
        if reply["type"] == "ok" {
            published = Some(reply);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(published.is_some(), "publishing works again");
    let after = sub
        .push_of("message", WAIT)
        .await
        .expect("subscriber receives after Redis returns");
    assert_eq!(after["text"], "after");
    assert!(
        gateway
            .metric("chatcluster_gateway_redis_errors_total")
            .await
            >= 1.0
    );
}
