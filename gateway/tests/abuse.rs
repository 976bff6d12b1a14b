//! Limits and hostile clients: oversize frames, garbage, slow readers, idle
//! clients, connection limits, JWT, the HTTP API's errors, and SIGTERM drain.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chatcluster_protocol::codec::Encoding;
use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn oversize_frames_and_repeated_garbage_close_the_connection() {
    let redis = RedisServer::start();
    let gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default()
            .env("MAX_FRAME_BYTES", "8192")
            .env("MAX_TEXT_BYTES", "1024")
            .env("MAX_BAD_FRAMES", "5"),
    );
    let mut big = connect(&gateway.ws_url(), Encoding::Json).await;
    big.send_raw(Message::Text("x".repeat(20_000).into())).await;
    let close = big.close_frame(WAIT).await.expect("close frame");
    assert_eq!(u16::from(close.code), 1009);

    let mut noisy = connect(&gateway.ws_url(), Encoding::Json).await;
    for _ in 0..4 {
        noisy.send_raw(Message::Text("garbage".into())).await;
        assert_eq!(noisy.next_frame(WAIT).await.unwrap()["code"], "bad_request");
    }
    // A good frame resets the count.
    noisy.ok(json!({"op": "ping"})).await;
    for _ in 0..5 {
        noisy.send_raw(Message::Text("garbage".into())).await;
    }
    let close = noisy.close_frame(WAIT).await.expect("close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "too many malformed frames");
}

#[tokio::test]
async fn a_slow_reader_is_disconnected_while_fast_readers_keep_up() {
    let redis = RedisServer::start();
    let gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default()
            .env("OUTBOUND_QUEUE", "32")
            .env("PUBLISH_RATE", "100000")
            .env("PUBLISH_BURST", "100000"),
    );
    let url = gateway.ws_url();
    let mut slow = login(&url, Encoding::Json, "slow").await;
    let mut fast = login(&url, Encoding::MsgPack, "fast").await;
    slow.ok(json!({"op": "subscribe", "channel": "flood"}))
        .await;
    fast.ok(json!({"op": "subscribe", "channel": "flood"}))
        .await;

    // The fast reader drains concurrently; the slow one never reads.
    let total = 3000;
    let reader = tokio::spawn(async move {
        let frames = fast.messages(total).await;
        offsets(&frames)
    });
    let mut publisher = login(&url, Encoding::MsgPack, "pub").await;
    let text = "y".repeat(3000);
    for _ in 0..total {
        publisher
            .ok(json!({"op": "publish", "channel": "flood", "text": text}))
            .await;
    }
    let received = reader.await.unwrap();
    assert_eq!(
        received,
        (1..=total as u64).collect::<Vec<_>>(),
        "the fast reader got everything, in order"
    );
    assert!(
        gateway
            .metric("chatcluster_gateway_slow_reader_disconnects_total")
            .await
            >= 1.0,
        "the slow reader was cut off"
    );
    let close = slow.close_frame(WAIT).await;
    if let Some(close) = close {
        assert_eq!(u16::from(close.code), 1008);
    }
}

#[tokio::test]
async fn idle_clients_are_closed_and_connections_are_limited() {
    let redis = RedisServer::start();
    let gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default()
            .env("PING_INTERVAL", "200ms")
            .env("IDLE_TIMEOUT", "600ms")
            .env("MAX_CONNECTIONS", "2"),
    );
    let url = gateway.ws_url();
    let mut idle = connect(&url, Encoding::Json).await;
    let _second = connect(&url, Encoding::Json).await;
    let refused = try_connect(&url, Encoding::Json, &[]).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!(
            "third connection must be refused, got {:?}",
            other.map(|_| ())
        ),
    }
    // The idle client does not read, so it never answers pings.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let close = idle.close_frame(WAIT).await.expect("close frame");
    assert_eq!(u16::from(close.code), 1001);
    assert_eq!(close.reason.as_str(), "idle timeout");
    // Its slot is free again.
    assert!(wait_until(Duration::from_secs(5), || true));
    connect_when_free(&url, Encoding::Json, &[]).await;
}

fn token(claims: serde_json::Value) -> String {
    jwt(&claims, "test-secret")
}

#[tokio::test]
async fn jwt_mode_allows_and_denies() {
    let redis = RedisServer::start();
    let gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default()
            .env("AUTH_MODE", "jwt")
            .env("JWT_SECRET", "test-secret"),
    );
    let url = gateway.ws_url();
    for bad in [
        None,
        Some("not-a-jwt".to_owned()),
        Some(token(json!({"sub": "mallory"})).replace('.', ".x")),
    ] {
        let headers: Vec<(&str, String)> = bad
            .iter()
            .map(|t| ("Authorization", format!("Bearer {t}")))
            .collect();
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match try_connect(&url, Encoding::Json, &headers).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401)
            }
            other => panic!("bad token must get 401, got {:?}", other.map(|_| ())),
        }
    }
    let exp = chrono::Utc::now().timestamp() + 600;
    let limited = token(json!({"sub": "alice", "exp": exp, "channels": ["team.*"]}));
    let auth = format!("Bearer {limited}");
    let mut alice = try_connect(&url, Encoding::MsgPack, &[("Authorization", auth.as_str())])
        .await
        .unwrap();
    // Logged in by the token: no login needed; a different name is refused.
    alice
        .ok(json!({"op": "subscribe", "channel": "team.a"}))
        .await;
    let (code, _) = alice
        .err(json!({"op": "subscribe", "channel": "lobby"}))
        .await;
    assert_eq!(code, "forbidden");
    let (code, _) = alice
        .err(json!({"op": "publish", "channel": "lobby", "text": "hi"}))
        .await;
    assert_eq!(code, "forbidden");
    let (code, _) = alice.err(json!({"op": "login", "user": "bob"})).await;
    assert_eq!(code, "forbidden");
    alice.ok(json!({"op": "login", "user": "alice"})).await;
    // The token also works as a query parameter (browsers).
    let open = token(json!({"sub": "bob", "exp": exp}));
    let mut bob = connect(&format!("{url}?token={open}"), Encoding::Json).await;
    bob.ok(json!({"op": "subscribe", "channel": "team.a"}))
        .await;
    let published = bob
        .ok(json!({"op": "publish", "channel": "team.a", "text": "hello team"}))
        .await;
    let message = alice.push_of("message", WAIT).await.unwrap();
    assert_eq!(message["msg_id"], published["msg_id"]);
}

#[tokio::test]
async fn http_api_answers_json_errors() {
    let redis = RedisServer::start();
    let gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default().env("API_KEY", "k3y"),
    );
    let port = gateway.port.unwrap();
    let mut listener = login(&gateway.ws_url(), Encoding::Json, "listener").await;
    listener
        .ok(json!({"op": "subscribe", "channel": "alerts"}))
        .await;

    let body = r#"{"user":"bot","text":"disk full"}"#;
    let (status, reply) = http(
        port,
        "POST",
        "/api/channels/alerts/messages",
        &[
            ("Authorization", "Bearer k3y"),
            ("Content-Type", "application/json"),
        ],
        body,
    )
    .await;
    assert_eq!(status, 201, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let pushed = listener.push_of("message", WAIT).await.unwrap();
    assert_eq!(
        (pushed["user"].as_str(), pushed["msg_id"].clone()),
        (Some("bot"), reply["msg_id"].clone())
    );

    type Case<'a> = (
        &'a str,
        &'a str,
        Vec<(&'a str, &'a str)>,
        &'a str,
        u16,
        &'a str,
    );
    let cases: [Case<'_>; 6] = [
        (
            "POST",
            "/api/channels/alerts/messages",
            vec![("Content-Type", "application/json")],
            body,
            401,
            "unauthorized",
        ),
        (
            "POST",
            "/api/channels/alerts/messages",
            vec![
                ("Authorization", "Bearer wrong"),
                ("Content-Type", "application/json"),
            ],
            body,
            401,
            "unauthorized",
        ),
        (
            "POST",
            "/api/channels/alerts/messages",
            vec![
                ("Authorization", "Bearer k3y"),
                ("Content-Type", "application/json"),
            ],
            "{oops",
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/channels/bad%20name/messages",
            vec![
                ("Authorization", "Bearer k3y"),
                ("Content-Type", "application/json"),
            ],
            body,
            400,
            "bad_request",
        ),
        (
            "GET",
            "/api/channels/alerts/messages?limit=1000",
            vec![],
            "",
            400,
            "bad_request",
        ),
        ("GET", "/no/such/path", vec![], "", 404, "not_found"),
    ];
    for (method, path, headers, body, status, code) in cases {
        let (got, reply) = http(port, method, path, &headers, body).await;
        assert_eq!(got, status, "{method} {path}: {reply}");
        let reply: serde_json::Value = serde_json::from_str(&reply)
            .unwrap_or_else(|_| panic!("JSON body for {path}: {reply}"));
        assert_eq!(reply["code"], code, "{path}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Without a database (EPHEMERAL), history is what Redis keeps.
    let (status, reply) = http(port, "GET", "/api/channels/alerts/messages", &[], "").await;
    assert_eq!(status, 200, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["messages"][0]["text"], "disk full");
    let (status, reply) = http(port, "GET", "/api/channels", &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&reply).unwrap(),
        json!({"channels": ["alerts"]})
    );
    let (status, page) = http(port, "GET", "/", &[], "").await;
    assert_eq!(status, 200);
    assert!(page.contains("<html") || page.contains("<!doctype") || page.contains("<!DOCTYPE"));
}

#[tokio::test]
async fn sigterm_drains_then_closes_with_1001_and_removes_the_socket() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("gateway-0.sock");
    // A stale socket file from a crashed process is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    drop(stale);
    let mut gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default()
            .socket(socket.clone())
            .env("DRAIN_TIMEOUT", "1s"),
    );
    let haproxy = Haproxy::start(std::slice::from_ref(&socket));
    let mut client = login(&haproxy.ws_url(), Encoding::Json, "stayer").await;
    client
        .ok(json!({"op": "subscribe", "channel": "geral"}))
        .await;

    let started = std::time::Instant::now();
    gateway.signal("TERM");
    assert!(
        wait_until(Duration::from_secs(2), || http_status_blocking(
            gateway.admin_port,
            "/ready"
        ) == Some(503)),
        "/ready fails at once"
    );
    assert!(
        wait_until(Duration::from_secs(2), || !socket.exists()),
        "socket file removed"
    );
    let close = client
        .close_frame(Duration::from_secs(5))
        .await
        .expect("close frame");
    assert_eq!(u16::from(close.code), 1001);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "open connections get the drain period"
    );
    assert_eq!(
        gateway.wait_exit(Duration::from_secs(10)),
        Some(0),
        "clean exit"
    );
}
