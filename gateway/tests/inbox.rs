//! Direct messages as users expect, with real processes: a message to a user
//! with no connection is pushed at their next login (recovered by inbox
//! offset, or from what the server last pushed them), every connection of
//! both users sees it live, and conversations and their pages come from Redis
//! for what is recent and from PostgreSQL for the rest.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chatcluster_protocol::codec::Encoding;
use chatcluster_protocol::keys;
use chatcluster_testkit::Postgres;
use common::*;
use serde_json::{Value, json};

/// Logs in with a `since` (or none) and returns the login reply's `data`;
/// pushes that follow stay queued on the client.
async fn login_since(url: &str, user: &str, since: Option<&Value>) -> (Client, Value) {
    let mut client = connect(url, Encoding::Json).await;
    let mut request = json!({"op": "login", "user": user});
    if let Some(since) = since {
        request["since"] = since.clone();
    }
    let data = client.ok(request).await;
    (client, data)
}

/// The next `n` direct-message pushes.
async fn directs(client: &mut Client, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let push = client
            .push_of("direct", WAIT)
            .await
            .unwrap_or_else(|| panic!("got {} of {n} direct messages", out.len()));
        out.push(push);
    }
    out
}

/// Asserts no direct message is pushed before the answer to a `ping`.
async fn no_direct_pending(client: &mut Client) {
    let id = client.send(json!({"op": "ping"})).await;
    loop {
        let frame = client.push(WAIT).await.expect("the ping is answered");
        assert_ne!(frame["type"], "direct", "unexpected push {frame}");
        if frame["id"] == json!(id) {
            return;
        }
    }
}

fn texts_of(frames: &[Value]) -> Vec<&str> {
    frames.iter().map(|f| f["text"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn a_message_to_an_offline_user_is_pushed_at_their_next_login() {
    let redis = RedisServer::start();
    let gateway = Gateway::start(&redis.url(), GatewayOptions::default());
    let url = gateway.ws_url();
    let (bob, first) = login_since(&url, "bob", None).await;
    assert_eq!(first["inbox"]["offset"], 0, "an empty inbox");
    drop(bob);
    let mut alice = login(&url, Encoding::MsgPack, "alice").await;
    let mut alice_phone = login(&url, Encoding::Json, "alice").await;
    for n in 1..=3 {
        let sent = alice
            .ok(json!({"op": "message", "to": "bob", "text": format!("d{n}")}))
            .await;
        assert_eq!(sent["offset"], n, "the sender's own inbox offset");
    }
    // The sender's other connection sees what it sent, at its inbox offsets.
    let echoed = directs(&mut alice_phone, 3).await;
    assert_eq!(offsets(&echoed), [1, 2, 3]);

    // Bob comes back without saying what he saw: the server knows it pushed
    // him nothing, so all three follow the login reply.
    let (mut bob, reply) = login_since(&url, "bob", None).await;
    assert_eq!(reply["inbox"]["offset"], 3);
    assert_eq!(reply["inbox"]["recovered"], true);
    let got = directs(&mut bob, 3).await;
    assert_eq!(texts_of(&got), ["d1", "d2", "d3"]);
    assert_eq!(offsets(&got), [1, 2, 3]);
    assert!(got.iter().all(|d| d["from"] == "alice" && d["to"] == "bob"));
    let epoch = reply["inbox"]["epoch"].clone();

    // What reached bob is remembered: a login elsewhere gets nothing again.
    let seen = keys::inbox_meta_key("bob", 4);
    assert!(
        wait_until(Duration::from_secs(5), || redis
            .command(&["HGET", &seen, "seen"])
            .contains("\r\n3\r\n")),
        "the server records what it pushed"
    );
    let (mut laptop, reply) = login_since(&url, "bob", None).await;
    assert_eq!(reply["inbox"]["offset"], 3);
    no_direct_pending(&mut laptop).await;

    // Live: both of bob's connections, and alice's phone.
    alice
        .ok(json!({"op": "message", "to": "bob", "text": "d4"}))
        .await;
    for client in [&mut bob, &mut laptop] {
        let live = directs(client, 1).await;
        assert_eq!(
            (live[0]["text"].as_str(), live[0]["offset"].as_u64()),
            (Some("d4"), Some(4))
        );
    }
    assert_eq!(directs(&mut alice_phone, 1).await[0]["offset"], 4);

    // A client that says where it was recovers exactly what followed.
    drop(laptop);
    alice
        .ok(json!({"op": "message", "to": "bob", "text": "d5"}))
        .await;
    let since = json!({"offset": 3, "epoch": epoch});
    let (mut tablet, reply) = login_since(&url, "bob", Some(&since)).await;
    assert_eq!(
        (
            reply["inbox"]["offset"].as_u64(),
            &reply["inbox"]["recovered"]
        ),
        (Some(5), &json!(true))
    );
    assert_eq!(texts_of(&directs(&mut tablet, 2).await), ["d4", "d5"]);
    no_direct_pending(&mut tablet).await;
}

async fn conversation(
    client: &mut Client,
    with: &str,
    before: Option<u64>,
    limit: u64,
) -> Vec<Value> {
    let mut request = json!({"op": "dm_history", "with": with, "limit": limit});
    if let Some(before) = before {
        request["before"] = json!(before);
    }
    let reply = client.ok(request).await;
    assert_eq!(reply["with"], with);
    reply["messages"].as_array().unwrap().clone()
}

#[tokio::test]
async fn conversations_and_their_pages_come_from_redis_and_postgres_without_gap_or_repeat() {
    let redis = RedisServer::start();
    let postgres = Postgres::start();
    let _worker = start_worker(
        &redis.url(),
        &postgres.url(),
        100,
        Duration::from_millis(20),
    )
    .await;
    // Redis keeps 4 messages per inbox: older pages come from PostgreSQL.
    let gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default()
            .env("DATABASE_URL", &postgres.url())
            .env("HISTORY_SIZE", "4"),
    );
    let url = gateway.ws_url();
    let mut alice = login(&url, Encoding::Json, "alice").await;
    let mut bob = login(&url, Encoding::Json, "bob").await;
    let mut carol = login(&url, Encoding::Json, "carol").await;
    for n in 1..=5 {
        alice
            .ok(json!({"op": "message", "to": "bob", "text": format!("a{n}")}))
            .await;
    }
    carol
        .ok(json!({"op": "message", "to": "alice", "text": "c1"}))
        .await;
    carol
        .ok(json!({"op": "message", "to": "alice", "text": "c2"}))
        .await;
    let last = bob
        .ok(json!({"op": "message", "to": "alice", "text": "b1"}))
        .await;

    // At once (PostgreSQL may not have them yet), newest conversation first.
    let listed = alice.ok(json!({"op": "conversations"})).await;
    let list = listed["conversations"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{listed}");
    assert_eq!(list[0]["with"], "bob");
    assert_eq!(list[0]["last"]["msg_id"], last["msg_id"]);
    assert_eq!(
        list[0]["last"]["offset"], 8,
        "alice's inbox: a1..a5, c1, c2, b1"
    );
    assert_eq!(list[1]["with"], "carol");
    assert_eq!(list[1]["last"]["text"], "c2");
    let paged = alice.ok(json!({"op": "conversations", "before": 8})).await;
    assert_eq!(paged["conversations"][0]["with"], "carol");
    assert_eq!(paged["conversations"].as_array().unwrap().len(), 1);

    // Once PostgreSQL holds them, pages cross from Redis (alice's last 4) into
    // PostgreSQL, each message once, in order.
    let pool = sqlx::PgPool::connect(&postgres.url()).await.unwrap();
    for _ in 0..200 {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE user_name = 'alice'")
            .fetch_one(&pool)
            .await
            .unwrap();
        if rows == 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let whole = conversation(&mut alice, "bob", None, 100).await;
    assert_eq!(texts_of(&whole), ["a1", "a2", "a3", "a4", "a5", "b1"]);
    assert_eq!(offsets(&whole), [1, 2, 3, 4, 5, 8]);
    let (mut pages, mut before) = (Vec::new(), None);
    loop {
        let page = conversation(&mut alice, "bob", before, 2).await;
        if page.is_empty() {
            break;
        }
        before = page.first().and_then(|m| m["offset"].as_u64());
        pages.push(offsets(&page));
    }
    assert_eq!(pages, [vec![5, 8], vec![3, 4], vec![1, 2]]);
    // Bob's side of it, at bob's own offsets.
    let his = conversation(&mut bob, "alice", None, 100).await;
    assert_eq!(texts_of(&his), ["a1", "a2", "a3", "a4", "a5", "b1"]);
    assert_eq!(offsets(&his), [1, 2, 3, 4, 5, 6]);
    // Redis loses everything: conversations are still there, from PostgreSQL.
    redis.command(&["FLUSHALL"]);
    let listed = alice.ok(json!({"op": "conversations"})).await;
    let with: Vec<&str> = listed["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["with"].as_str().unwrap())
        .collect();
    assert_eq!(with, ["bob", "carol"]);
}
