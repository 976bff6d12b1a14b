//! The subscriber connection notices a Redis that stops answering without
//! closing the connection (a half-open link): `/ready` fails until every topic
//! is subscribed again, and subscribers then catch up on what they missed.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chatcluster_protocol::codec::Encoding;
use chatcluster_testkit::proxy::FaultProxy;
use common::*;
use serde_json::json;

fn ready(gateway: &Gateway) -> Option<u16> {
    http_status_blocking(gateway.admin_port, "/ready")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_pubsub_link_fails_readiness_then_catches_up() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::transparent(redis.socket());
    // The gateway under test reaches Redis through the proxy; the publisher's does not.
    let watched = Gateway::start(
        &proxy.redis_url(),
        GatewayOptions::default()
            .env("PUBSUB_PING_INTERVAL", "300ms")
            .env("BACKEND_TIMEOUT", "500ms"),
    );
    let direct = Gateway::start(&redis.url(), GatewayOptions::default());
    let mut reader = login(&watched.ws_url(), Encoding::Json, "reader").await;
    let reply = reader
        .ok(json!({"op": "subscribe", "channel": "news"}))
        .await;
    let start = reply["offset"].as_u64().unwrap();
    let mut publisher = login(&direct.ws_url(), Encoding::Json, "pub").await;
    publisher
        .ok(json!({"op": "publish", "channel": "news", "text": "before"}))
        .await;
    assert_eq!(offsets(&reader.messages(1).await), [start + 1]);

    proxy.black_hole(true);
    assert!(
        wait_until(Duration::from_secs(10), || ready(&watched) == Some(503)),
        "a silent Redis link must fail readiness"
    );
    // Published while the watched gateway cannot hear.
    for n in 0..5 {
        publisher
            .ok(json!({"op": "publish", "channel": "news", "text": format!("during {n}")}))
            .await;
    }
    proxy.black_hole(false);
    assert!(
        wait_until(Duration::from_secs(15), || ready(&watched) == Some(200)),
        "readiness must come back once every topic is subscribed again"
    );
    // Nothing is published after the freeze: only noticing the dead link and
    // resubscribing (then catching up from history) brings these.
    let rest = reader.messages(5).await;
    assert_eq!(
        offsets(&rest),
        (start + 2..=start + 6).collect::<Vec<u64>>(),
        "what was published meanwhile is caught up from history, once, in order"
    );
    assert!(watched.metric("chatcluster_gateway_gap_fills_total").await >= 5.0);
}
