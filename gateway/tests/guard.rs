//! Nothing let in: auth on every door (HTTP reads, channel claims, `nbf`,
//! `exp`, expiry and `refresh`, metrics only on the admin port), input bounds
//! (clock, numbers, Unicode names) and budgets (op budget, connections per
//! user, channel creation, paging, the history statement timeout), each
//! against a real gateway process and redis-server (and postgres).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use chatcluster_protocol::codec::Encoding;
use chatcluster_testkit::Postgres;
use common::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message};

const SECRET: &str = "guard-secret";

fn token(claims: Value) -> String {
    jwt(&claims, SECRET)
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn jwt_gateway(redis: &RedisServer, extra: &[(&str, &str)]) -> Gateway {
    let mut options = GatewayOptions::default()
        .env("AUTH_MODE", "jwt")
        .env("JWT_SECRET", SECRET)
        .env("API_KEY", "k3y");
    for (key, value) in extra {
        options = options.env(key, value);
    }
    Gateway::start(&redis.url(), options)
}

async fn connect_with(url: &str, jwt: &str) -> Result<Client, tungstenite::Error> {
    let auth = format!("Bearer {jwt}");
    try_connect(url, Encoding::Json, &[("Authorization", auth.as_str())]).await
}

/// `GET path` with an optional `Authorization` value; the status and the JSON body.
async fn get(port: u16, path: &str, authorization: Option<&str>) -> (u16, Value) {
    let headers: Vec<(&str, &str)> = authorization
        .map(|value| ("Authorization", value))
        .into_iter()
        .collect();
    let (status, body) = http(port, "GET", path, &headers, "").await;
    let body = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, body)
}

fn http_status(result: Result<Client, tungstenite::Error>) -> u16 {
    match result {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Ok(_) => 101,
        Err(other) => panic!("not an HTTP refusal: {other}"),
    }
}

#[tokio::test]
async fn http_reads_need_a_token_or_the_api_key_and_respect_the_channels_claim() {
    let redis = RedisServer::start();
    let gateway = jwt_gateway(&redis, &[]);
    let port = gateway.port.unwrap();
    let exp = now() + 600;
    let open = token(json!({"sub": "root", "exp": exp}));
    let mut root = connect_with(&gateway.ws_url(), &open).await.unwrap();
    for channel in ["team.a", "team.b", "secret"] {
        root.ok(json!({"op": "channel", "channel": channel})).await;
    }
    let limited = token(json!({"sub": "alice", "exp": exp, "channels": ["team.*"]}));
    let bearer = format!("Bearer {limited}");

    // No credential, a bad one: 401 with a JSON body.
    for credential in [None, Some("Bearer nope")] {
        for path in ["/api/channels", "/api/channels/team.a/messages"] {
            let (status, body) = get(port, path, credential).await;
            assert_eq!(status, 401, "{path}: {body}");
            assert_eq!(body["code"], "unauthorized");
        }
    }
    // A token lists only what its claim allows; the API key lists everything.
    let (status, body) = get(port, "/api/channels", Some(&bearer)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"channels": ["team.a", "team.b"]}));
    let (status, body) = get(port, "/api/channels", Some("Bearer k3y")).await;
    assert_eq!(status, 200);
    assert_eq!(body["channels"], json!(["secret", "team.a", "team.b"]));
    // `?token=` works as on the WebSocket.
    let (status, _) = get(port, &format!("/api/channels?token={limited}"), None).await;
    assert_eq!(status, 200);
    // History of a channel outside the claim: 403; inside it, the messages
    // (from Redis: this gateway runs without a database).
    let (status, body) = get(port, "/api/channels/secret/messages", Some(&bearer)).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = get(port, "/api/channels/team.a/messages", Some(&bearer)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"channel": "team.a", "messages": []}));

    // The claim on every channel op of the socket.
    let mut alice = connect_with(&gateway.ws_url(), &limited).await.unwrap();
    for op in ["channel", "subscribe", "presence", "history"] {
        let (code, _) = alice.err(json!({"op": op, "channel": "secret"})).await;
        assert_eq!(code, "forbidden", "{op}");
    }
    let (code, _) = alice
        .err(json!({"op": "publish", "channel": "secret", "text": "x"}))
        .await;
    assert_eq!(code, "forbidden");
    let page = alice.ok(json!({"op": "channels"})).await;
    assert_eq!(page["channels"], json!(["team.a", "team.b"]));
    alice
        .ok(json!({"op": "presence", "channel": "team.a"}))
        .await;
}

#[tokio::test]
async fn metrics_are_served_on_the_admin_port_only() {
    let redis = RedisServer::start();
    let gateway = Gateway::start(&redis.url(), GatewayOptions::default());
    let port = gateway.port.unwrap();
    let (status, _) = http(port, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 404, "no metrics on the public port");
    for path in ["/health", "/ready"] {
        assert_eq!(http(port, "GET", path, &[], "").await.0, 200, "{path}");
        assert_eq!(
            http(gateway.admin_port, "GET", path, &[], "").await.0,
            200,
            "{path}"
        );
    }
    let (status, body) = http(gateway.admin_port, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    assert!(body.contains("chatcluster_gateway_connections"));
}

#[tokio::test]
async fn nbf_and_exp_are_checked_and_an_expired_session_is_closed_with_4001() {
    let redis = RedisServer::start();
    let gateway = jwt_gateway(&redis, &[("JWT_LEEWAY", "1s")]);
    let url = gateway.ws_url();
    let immature = token(json!({"sub": "alice", "nbf": now() + 60}));
    assert_eq!(http_status(connect_with(&url, &immature).await), 401);
    let expired = token(json!({"sub": "alice", "exp": now() - 30}));
    assert_eq!(http_status(connect_with(&url, &expired).await), 401);
    // Within the leeway.
    let almost = token(json!({"sub": "alice", "nbf": now() + 1}));
    assert_eq!(http_status(connect_with(&url, &almost).await), 101);

    let short = token(json!({"sub": "alice", "exp": now() + 2}));
    let mut client = connect_with(&url, &short).await.unwrap();
    client
        .ok(json!({"op": "subscribe", "channel": "geral"}))
        .await;
    let started = Instant::now();
    let close = client
        .close_frame(Duration::from_secs(10))
        .await
        .expect("close frame");
    assert_eq!(u16::from(close.code), 4001);
    assert_eq!(close.reason.as_str(), "token expired");
    assert!(
        started.elapsed() <= Duration::from_secs(5),
        "closed at exp + leeway"
    );
}

#[tokio::test]
async fn refresh_renews_the_token_on_the_open_connection() {
    let redis = RedisServer::start();
    let gateway = jwt_gateway(&redis, &[("JWT_LEEWAY", "0s")]);
    let url = gateway.ws_url();
    let short = token(json!({"sub": "alice", "exp": now() + 2, "channels": ["team.*"]}));
    let mut client = connect_with(&url, &short).await.unwrap();
    client
        .ok(json!({"op": "subscribe", "channel": "team.a"}))
        .await;

    // Another user's token, or a claim that drops a subscribed channel: refused.
    let bob = token(json!({"sub": "bob", "exp": now() + 600}));
    let (code, _) = client.err(json!({"op": "refresh", "token": bob})).await;
    assert_eq!(code, "forbidden");
    let narrower = token(json!({"sub": "alice", "exp": now() + 600, "channels": ["other"]}));
    let (code, message) = client
        .err(json!({"op": "refresh", "token": narrower}))
        .await;
    assert_eq!(code, "forbidden");
    assert!(message.contains("team.a"), "{message}");
    let (code, _) = client
        .err(json!({"op": "refresh", "token": "garbage"}))
        .await;
    assert_eq!(code, "unauthorized");

    let exp = now() + 600;
    let longer = token(json!({"sub": "alice", "exp": exp, "channels": ["team.*"]}));
    let reply = client.ok(json!({"op": "refresh", "token": longer})).await;
    assert_eq!(reply, json!({"user": "alice", "expires": exp}));
    tokio::time::sleep(Duration::from_secs(3)).await;
    client.ok(json!({"op": "ping"})).await;
    let mut other = connect_with(&url, &longer).await.unwrap();
    let sent = other
        .ok(json!({"op": "publish", "channel": "team.a", "text": "still here"}))
        .await;
    let pushed = client.push_of("message", WAIT).await.unwrap();
    assert_eq!(pushed["msg_id"], sent["msg_id"]);

    // Without JWT auth there is nothing to refresh.
    let plain = Gateway::start(&redis.url(), GatewayOptions::default());
    let mut client = login(&plain.ws_url(), Encoding::Json, "carol").await;
    let (code, _) = client.err(json!({"op": "refresh", "token": longer})).await;
    assert_eq!(code, "bad_request");
}

#[tokio::test]
async fn clocks_and_numbers_are_bounded_and_the_connection_survives() {
    let redis = RedisServer::start();
    let gateway = Gateway::start(&redis.url(), GatewayOptions::default());
    for encoding in Encoding::ALL {
        let mut client = login(&gateway.ws_url(), encoding, "counter").await;
        for bad in [
            json!({"op": "ping", "clock": u64::MAX}),
            json!({"op": "ping", "clock": 1u64 << 53}),
            json!({"op": "history", "channel": "c", "before": u64::MAX}),
            json!({"op": "subscribe", "channel": "c", "since": {"offset": u64::MAX, "epoch": "e"}}),
        ] {
            let (code, message) = client.err(bad.clone()).await;
            assert_eq!(code, "bad_request", "{bad}");
            assert!(message.contains("2^53"), "{message}");
        }
        // The largest accepted clock; the gateway's clock saturates there.
        let max = (1u64 << 53) - 1;
        let reply = client.request(json!({"op": "ping", "clock": max})).await;
        assert_eq!(reply["clock"], json!(max));
        let reply = client.request(json!({"op": "ping"})).await;
        assert_eq!(reply["clock"], json!(max), "saturated, not wrapped");
        client
            .ok(json!({"op": "publish", "channel": "c", "text": "alive"}))
            .await;
        if encoding == Encoding::Json {
            // Ids out of range are refused without being echoed.
            client
                .send_raw(Message::Text(
                    r#"{"op":"ping","id":9007199254740993}"#.into(),
                ))
                .await;
            let error = client.next_frame(WAIT).await.unwrap();
            assert_eq!(error["code"], "bad_request");
            assert!(error.get("id").is_none());
        }
    }
}

#[tokio::test]
async fn unicode_names_are_accepted_normalised_and_too_long_is_an_error() {
    let redis = RedisServer::start();
    let gateway = jwt_gateway(&redis, &[]);
    let url = gateway.ws_url();
    // A JWT whose sub is José, sent decomposed (e + combining acute).
    let jose = token(json!({"sub": "Jose\u{301}", "exp": now() + 600}));
    let mut client = connect_with(&url, &jose).await.unwrap();
    client.ok(json!({"op": "login", "user": "José"})).await;
    client
        .ok(json!({"op": "subscribe", "channel": "café"}))
        .await;
    let sent = client
        .ok(json!({"op": "publish", "channel": "cafe\u{301}", "text": "olá"}))
        .await;
    assert_eq!(sent["channel"], "café");
    let pushed = client.push_of("message", WAIT).await.unwrap();
    assert_eq!(
        (pushed["user"].as_str(), pushed["channel"].as_str()),
        (Some("José"), Some("café"))
    );
    let users = client.ok(json!({"op": "users"})).await;
    assert_eq!(users["users"], json!(["José"]));

    let long = "c".repeat(70);
    let (code, message) = client
        .err(json!({"op": "subscribe", "channel": long}))
        .await;
    assert_eq!(code, "bad_request");
    assert!(message.contains("70 bytes"), "{message}");
    for bad in ["a\u{2236}b", "a\u{200b}b", "a b", "a\u{ff1a}b"] {
        let (code, _) = client.err(json!({"op": "channel", "channel": bad})).await;
        assert_eq!(code, "bad_request", "{bad:?}");
    }
    let channels = client.ok(json!({"op": "channels"})).await;
    assert_eq!(
        channels["channels"],
        json!(["café"]),
        "nothing was cut and created"
    );
}

#[tokio::test]
async fn ops_wait_for_the_op_budget_then_are_refused_past_op_wait() {
    let redis = RedisServer::start();
    let gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default()
            .env("OP_RATE", "20")
            .env("OP_BURST", "25")
            .env("OP_WAIT", "1s"),
    );
    let mut client = login(&gateway.ws_url(), Encoding::Json, "busy").await;
    // Login took 5 units, two subscribes take the other 20; the third waits
    // half a second for its 10 units.
    client.ok(json!({"op": "subscribe", "channel": "a"})).await;
    client.ok(json!({"op": "subscribe", "channel": "b"})).await;
    let started = Instant::now();
    client.ok(json!({"op": "subscribe", "channel": "c"})).await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    // A pipelined burst is slowed down, not refused: 30 pings at 20 per second.
    let started = Instant::now();
    for _ in 0..30 {
        client.send(json!({"op": "ping"})).await;
    }
    for _ in 0..30 {
        let reply = client.next_frame(WAIT).await.unwrap();
        assert_eq!(reply["type"], "ok", "{reply}");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        started.elapsed()
    );

    // When the wait would be longer than OP_WAIT: rate_limited.
    let slow = Gateway::start(
        &redis.url(),
        GatewayOptions::default()
            .env("OP_RATE", "5")
            .env("OP_BURST", "25")
            .env("OP_WAIT", "1s"),
    );
    let mut client = login(&slow.ws_url(), Encoding::MsgPack, "slow").await;
    client.ok(json!({"op": "subscribe", "channel": "a"})).await;
    client.ok(json!({"op": "subscribe", "channel": "b"})).await;
    let (code, message) = client.err(json!({"op": "subscribe", "channel": "c"})).await;
    assert_eq!(code, "rate_limited");
    assert!(message.contains("subscribe costs 10"), "{message}");
    // Publishing is paid from the message bucket, not the op budget.
    client
        .ok(json!({"op": "publish", "channel": "a", "text": "x"}))
        .await;
    tokio::time::sleep(Duration::from_millis(2300)).await;
    client.ok(json!({"op": "subscribe", "channel": "c"})).await;
    // A client that ignores rate_limited is read no faster than refusals refill.
    let started = Instant::now();
    for n in 0..15 {
        let (code, _) = client
            .err(json!({"op": "subscribe", "channel": format!("x{n}")}))
            .await;
        assert_eq!(code, "rate_limited");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "15 refusals at 5 units/s take seconds, took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn connections_per_user_are_limited() {
    let redis = RedisServer::start();
    let gateway = jwt_gateway(&redis, &[("MAX_USER_CONNECTIONS", "2")]);
    let url = gateway.ws_url();
    let alice = token(json!({"sub": "alice", "exp": now() + 600}));
    let first = connect_with(&url, &alice).await.unwrap();
    let _second = connect_with(&url, &alice).await.unwrap();
    assert_eq!(http_status(connect_with(&url, &alice).await), 429);
    let bob = token(json!({"sub": "bob", "exp": now() + 600}));
    connect_with(&url, &bob).await.unwrap();
    drop(first);
    let auth = format!("Bearer {alice}");
    connect_when_free(&url, Encoding::Json, &[("Authorization", auth.as_str())]).await;

    // AUTH_MODE=none: the limit applies at login.
    let plain = Gateway::start(
        &redis.url(),
        GatewayOptions::default().env("MAX_USER_CONNECTIONS", "1"),
    );
    let _carol = login(&plain.ws_url(), Encoding::Json, "carol").await;
    let mut twin = connect(&plain.ws_url(), Encoding::Json).await;
    let (code, _) = twin.err(json!({"op": "login", "user": "carol"})).await;
    assert_eq!(code, "limit_exceeded");
    twin.ok(json!({"op": "login", "user": "dave"})).await;
}

#[tokio::test]
async fn channel_creation_is_limited_per_user_and_in_total() {
    let redis = RedisServer::start();
    let gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default()
            .env("CHANNEL_CREATE_LIMIT", "3")
            .env("MAX_CHANNELS", "5"),
    );
    let url = gateway.ws_url();
    let mut alice = login(&url, Encoding::Json, "alice").await;
    for n in 0..3 {
        alice
            .ok(json!({"op": "channel", "channel": format!("a{n}")}))
            .await;
    }
    for op in [
        json!({"op": "channel", "channel": "a3"}),
        json!({"op": "subscribe", "channel": "a3"}),
        json!({"op": "publish", "channel": "a3", "text": "x"}),
    ] {
        let (code, message) = alice.err(op).await;
        assert_eq!(code, "rate_limited");
        assert!(message.contains("CHANNEL_CREATE_LIMIT"), "{message}");
    }
    // Existing channels are not creations.
    alice.ok(json!({"op": "subscribe", "channel": "a0"})).await;
    let mut bob = login(&url, Encoding::Json, "bob").await;
    bob.ok(json!({"op": "channel", "channel": "b0"})).await;
    bob.ok(json!({"op": "channel", "channel": "b1"})).await;
    let (code, message) = bob.err(json!({"op": "channel", "channel": "b2"})).await;
    assert_eq!(code, "limit_exceeded");
    assert!(message.contains("MAX_CHANNELS"), "{message}");
    let reply = bob.ok(json!({"op": "channel", "channel": "a1"})).await;
    assert_eq!(reply["created"], false);
}

/// Every name of a registry, page by page.
async fn all_pages(client: &mut Client, op: &str, field: &str, limit: u32) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut request = json!({"op": op, "limit": limit});
        if let Some(cursor) = &cursor {
            request["cursor"] = json!(cursor);
        }
        let page = client.ok(request).await;
        pages.push(serde_json::from_value(page[field].clone()).unwrap());
        match page["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return pages,
        }
    }
}

#[tokio::test]
async fn users_and_channels_are_paged_by_cursor() {
    let redis = RedisServer::start();
    // Names an older gateway registered before the sorted index existed.
    for n in 0..5 {
        redis.command(&["SADD", "cc:channels", &format!("old{n}")]);
    }
    let gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default()
            .env("MAX_LIST_PAGE", "10")
            .env("OP_RATE", "1000")
            .env("OP_BURST", "1000"),
    );
    let url = gateway.ws_url();
    let mut client = login(&url, Encoding::MsgPack, "pager").await;
    let mut expected: Vec<String> = (0..5).map(|n| format!("old{n}")).collect();
    for n in 0..20 {
        let name = format!("ch{n:02}");
        client.ok(json!({"op": "channel", "channel": name})).await;
        expected.push(name);
    }
    expected.sort();
    let pages = all_pages(&mut client, "channels", "channels", 10).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
    assert_eq!(pages.concat(), expected, "sorted, every name once");
    // The default page is the smaller of 100 and MAX_LIST_PAGE; more is refused.
    let page = client.ok(json!({"op": "channels"})).await;
    assert_eq!(page["channels"].as_array().unwrap().len(), 10);
    let (code, _) = client.err(json!({"op": "channels", "limit": 11})).await;
    assert_eq!(code, "bad_request");
    let (code, _) = client.err(json!({"op": "users", "limit": 0})).await;
    assert_eq!(code, "bad_request");

    for n in 0..12 {
        login(&url, Encoding::Json, &format!("u{n:02}")).await;
    }
    let users = all_pages(&mut client, "users", "users", 5).await.concat();
    assert_eq!(users.len(), 13);
    assert!(users.windows(2).all(|w| w[0] < w[1]), "{users:?}");

    // The HTTP list pages the same way.
    let port = gateway.port.unwrap();
    let (status, page) = get(port, "/api/channels?limit=3", None).await;
    assert_eq!(status, 200);
    assert_eq!(page["channels"], json!(expected[..3]));
    let cursor = page["cursor"].as_str().unwrap();
    let (_, next) = get(
        port,
        &format!("/api/channels?limit=3&cursor={cursor}"),
        None,
    )
    .await;
    assert_eq!(next["channels"], json!(expected[3..6]));
    let (status, _) = get(port, "/api/channels?limit=11", None).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_blocked_history_query_is_cancelled_by_the_statement_timeout() {
    let redis = RedisServer::start();
    let postgres = Postgres::start();
    let pool = sqlx::PgPool::connect(&postgres.url()).await.unwrap();
    chatcluster_worker::store::MIGRATOR
        .run(&pool)
        .await
        .unwrap();
    let gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default()
            .env("DATABASE_URL", &postgres.url())
            .env("HISTORY_QUERY_TIMEOUT", "300ms")
            .env("BACKEND_TIMEOUT", "5s"),
    );
    let mut client = login(&gateway.ws_url(), Encoding::Json, "reader").await;
    client
        .ok(json!({"op": "channel", "channel": "locked"}))
        .await;
    client
        .ok(json!({"op": "history", "channel": "locked"}))
        .await;

    // Another session holds a lock that blocks every read of the table.
    let mut locker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let started = Instant::now();
    let (code, _) = client
        .err(json!({"op": "history", "channel": "locked"}))
        .await;
    assert_eq!(code, "unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cancelled by the server after 300 ms, took {:?}",
        started.elapsed()
    );
    locker.rollback().await.unwrap();
    client
        .ok(json!({"op": "history", "channel": "locked"}))
        .await;
}

/// `Debug` of the configuration, and of the gateway holding it (auth, stores,
/// pools), shows no secret, while what is not secret stays readable.
#[tokio::test]
async fn debug_output_of_the_config_and_the_gateway_holds_no_secret() {
    use clap::Parser;
    let config = chatcluster_gateway::Config::parse_from([
        "gw",
        "--auth-mode",
        "jwt",
        "--jwt-secret",
        "jwt-s3cret-value",
        "--api-key",
        "api-k3y-value",
        "--redis-url",
        "redis://default:redis-passw0rd@127.0.0.1:1",
        "--database-url",
        "postgres://chat:pg-passw0rd@127.0.0.1:1/chat",
    ]);
    assert_eq!(config.jwt_secret.as_deref(), Some("jwt-s3cret-value"));
    let config_shown = format!("{config:?} {config:#?}");
    let background = tokio_util::sync::CancellationToken::new();
    let gateway = chatcluster_gateway::state::Gateway::start(config, &background).unwrap();
    let shown = format!("{config_shown} {gateway:?} {gateway:#?}");
    background.cancel();
    for secret in [
        "jwt-s3cret-value",
        "api-k3y-value",
        "redis-passw0rd",
        "pg-passw0rd",
    ] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(config_shown.contains("127.0.0.1:1/chat"), "{config_shown}");
}
