//! History end to end: gateway → Redis streams → worker → PostgreSQL → the
//! `history` op and the HTTP API, with real redis-server and postgres and the
//! worker running in-process.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chatcluster_protocol::codec::Encoding;
use chatcluster_testkit::Postgres;
use common::*;
use serde_json::{Value, json};

async fn start_worker(redis_url: &str, database_url: &str) -> tokio::sync::oneshot::Sender<()> {
    let mut config = chatcluster_worker::Config::new(redis_url, database_url, "history-test");
    config.batch_timeout = Duration::from_millis(50);
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        chatcluster_worker::worker::run(config, admin, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    stop
}

/// Polls `history` until its page (before `before`) ends at offset `newest`.
async fn page_when_persisted(
    client: &mut Client,
    channel: &str,
    before: Option<u64>,
    limit: u64,
    newest: u64,
) -> Vec<Value> {
    for _ in 0..200 {
        let mut request = json!({"op": "history", "channel": channel, "limit": limit});
        if let Some(before) = before {
            request["before"] = json!(before);
        }
        let reply = client.request(request).await;
        if reply["type"] == "ok" {
            let messages = reply["data"]["messages"].as_array().unwrap().clone();
            if messages.last().and_then(|m| m["offset"].as_u64()) == Some(newest) {
                return messages;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("history of {channel} never reached offset {newest}");
}

#[tokio::test]
async fn history_pages_from_postgres_and_offsets_survive_a_redis_wipe() {
    let redis = RedisServer::start();
    let postgres = Postgres::start();
    let _worker = start_worker(&redis.url(), &postgres.url()).await;
    let gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default()
            .env("DATABASE_URL", &postgres.url())
            .env("PUBLISH_RATE", "10000")
            .env("PUBLISH_BURST", "10000"),
    );
    let mut client = login(&gateway.ws_url(), Encoding::MsgPack, "historian").await;
    for n in 1..=150 {
        client
            .ok(json!({"op": "publish", "channel": "hist", "text": format!("m{n}")}))
            .await;
    }

    // Newest page first, newest last inside the page.
    let newest = page_when_persisted(&mut client, "hist", None, 100, 150).await;
    assert_eq!(offsets(&newest), (51..=150).collect::<Vec<u64>>());
    assert_eq!(newest.last().unwrap()["text"], "m150");
    let older = page_when_persisted(&mut client, "hist", Some(51), 100, 50).await;
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
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        offsets(page["messages"].as_array().unwrap()),
        vec![6, 7, 8, 9, 10]
    );

    // Redis loses everything: the channel's next offset continues after PostgreSQL's.
    redis.command(&["FLUSHALL"]);
    let reply = client
        .ok(json!({"op": "publish", "channel": "hist", "text": "after the wipe"}))
        .await;
    assert_eq!(reply["offset"], 151, "offsets never repeat across epochs");
    let newest = page_when_persisted(&mut client, "hist", None, 2, 151).await;
    assert_eq!(offsets(&newest), vec![150, 151]);
    let (code, _) = client
        .err(json!({"op": "history", "channel": "never.created"}))
        .await;
    assert_eq!(code, "not_found");
}
