//! History end to end: gateway → Redis streams → worker → PostgreSQL → the
//! `history` op and the HTTP API, with real redis-server and postgres and the
//! worker running in-process. Pages are complete up to now: the Redis history
//! stream answers for the recent window, PostgreSQL for older messages.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use chatcluster_protocol::codec::Encoding;
use chatcluster_testkit::Postgres;
use common::*;
use serde_json::{Value, json};

async fn rows(pool: &sqlx::PgPool, channel: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM messages WHERE channel = $1")
        .bind(channel)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits until PostgreSQL holds at least `n` messages of `channel`.
async fn wait_rows(pool: &sqlx::PgPool, channel: &str, n: i64) {
    for _ in 0..300 {
        if rows(pool, channel).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("PostgreSQL never held {n} messages of {channel}");
}

async fn page(client: &mut Client, channel: &str, before: Option<u64>, limit: u64) -> Vec<Value> {
    let mut request = json!({"op": "history", "channel": channel, "limit": limit});
    if let Some(before) = before {
        request["before"] = json!(before);
    }
    client.ok(request).await["messages"]
        .as_array()
        .unwrap()
        .clone()
}

fn options(postgres: &Postgres, history_size: &str) -> GatewayOptions {
    GatewayOptions::default()
        .env("DATABASE_URL", &postgres.url())
        .env("HISTORY_SIZE", history_size)
        .env("PUBLISH_RATE", "10000")
        .env("PUBLISH_BURST", "10000")
}

#[tokio::test]
async fn history_pages_from_postgres_and_offsets_survive_a_redis_wipe() {
    let redis = RedisServer::start();
    let postgres = Postgres::start();
    let _worker = start_worker(
        &redis.url(),
        &postgres.url(),
        100,
        Duration::from_millis(50),
    )
    .await;
    let gateway = Gateway::start(&redis.url(), options(&postgres, "50"));
    let pool = sqlx::PgPool::connect(&postgres.url()).await.unwrap();
    let mut client = login(&gateway.ws_url(), Encoding::MsgPack, "historian").await;
    for n in 1..=150 {
        client
            .ok(json!({"op": "publish", "channel": "hist", "text": format!("m{n}")}))
            .await;
    }
    wait_rows(&pool, "hist", 150).await;

    // Newest page first, newest last inside the page: 101..=150 from Redis
    // (it keeps 50), 51..=100 from PostgreSQL.
    let newest = page(&mut client, "hist", None, 100).await;
    assert_eq!(offsets(&newest), (51..=150).collect::<Vec<u64>>());
    assert_eq!(newest.last().unwrap()["text"], "m150");
    let older = page(&mut client, "hist", Some(51), 100).await;
    assert_eq!(offsets(&older), (1..=50).collect::<Vec<u64>>());
    assert_eq!(older[0]["user"], "historian");

    let port = gateway.port.unwrap();
    let (status, body) = http(
        port,
        "GET",
        "/api/channels/hist/messages?before=11&limit=5",
        &[],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let http_page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        offsets(http_page["messages"].as_array().unwrap()),
        vec![6, 7, 8, 9, 10]
    );

    // Redis loses everything: the channel's next offset continues above every
    // offset ever reserved in PostgreSQL for it (a new epoch).
    let reserved: i64 = sqlx::query_scalar(
        "SELECT reserved FROM offset_blocks WHERE kind = 'channel' AND name = 'hist'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        reserved >= 150,
        "every offset handed out was reserved first"
    );
    redis.command(&["FLUSHALL"]);
    let reply = client
        .ok(json!({"op": "publish", "channel": "hist", "text": "after the wipe"}))
        .await;
    let after = reply["offset"].as_u64().unwrap();
    assert_eq!(
        after,
        reserved as u64 + 1,
        "offsets never repeat across epochs"
    );
    // History crosses the epochs: the new message at once (from Redis), then
    // the old ones from PostgreSQL.
    let newest = page(&mut client, "hist", None, 2).await;
    assert_eq!(offsets(&newest), vec![150, after]);
    let (code, _) = client
        .err(json!({"op": "history", "channel": "never.created"}))
        .await;
    assert_eq!(code, "not_found");
}

#[tokio::test]
async fn history_is_complete_up_to_now_and_pages_cross_into_postgres_without_gap_or_repeat() {
    let redis = RedisServer::start();
    let postgres = Postgres::start();
    // Batches of 10 and a minute's timeout: PostgreSQL lags behind on purpose.
    let _worker = start_worker(&redis.url(), &postgres.url(), 10, Duration::from_secs(60)).await;
    let gateway = Gateway::start(&redis.url(), options(&postgres, "10"));
    let pool = sqlx::PgPool::connect(&postgres.url()).await.unwrap();
    let mut client = login(&gateway.ws_url(), Encoding::Json, "writer").await;
    for n in 1..=25 {
        let reply = client
            .ok(json!({"op": "publish", "channel": "now", "text": format!("m{n}")}))
            .await;
        // Acknowledged a moment ago, and already in the newest page.
        let newest = page(&mut client, "now", None, 1).await;
        assert_eq!(newest[0]["msg_id"], reply["msg_id"], "message {n}");
    }
    // Full batches of 10 stream entries (the user's and the channel's
    // registrations among them) reach PostgreSQL; the rest waits a minute.
    wait_rows(&pool, "now", 15).await;
    let stored = rows(&pool, "now").await;
    assert!(stored < 25, "PostgreSQL must lag for this test: {stored}");
    // PostgreSQL has 1..=stored, Redis keeps 16..=25: every page is whole.
    assert_eq!(
        offsets(&page(&mut client, "now", None, 100).await),
        (1..=25).collect::<Vec<u64>>()
    );
    let mut seen = BTreeSet::new();
    let mut before = None;
    let mut pages = Vec::new();
    loop {
        let messages = page(&mut client, "now", before, 7).await;
        if messages.is_empty() {
            break;
        }
        let got = offsets(&messages);
        assert!(
            got.windows(2).all(|w| w[1] == w[0] + 1),
            "no gap in {got:?}"
        );
        for offset in &got {
            assert!(seen.insert(*offset), "{offset} twice");
        }
        before = got.first().copied();
        pages.push(got);
    }
    assert_eq!(seen, (1..=25).collect(), "pages: {pages:?}");
    assert_eq!(rows(&pool, "now").await, stored, "PostgreSQL still lags");
    assert_eq!(
        pages,
        [
            (19..=25).collect::<Vec<u64>>(),
            (12..=18).collect(),
            (5..=11).collect(),
            (1..=4).collect()
        ]
    );
}
