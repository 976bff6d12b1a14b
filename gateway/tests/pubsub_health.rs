//! The subscriber connection notices a Redis that stops answering without
//! closing the connection (a half-open link): `/ready` fails until every topic
//! is subscribed again, and subscribers then catch up on what they missed.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chatcluster_protocol::codec::Encoding;
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy that can stop forwarding without closing anything.
struct FreezingProxy {
    port: u16,
    frozen: Arc<AtomicBool>,
}

impl FreezingProxy {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let flag = frozen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, flag.clone()));
                tokio::spawn(pump(server_read, client_write, flag.clone()));
            }
        });
        Self { port, frozen }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::Release);
    }
}

/// Copies bytes; while frozen, drops them (a black hole: the link looks alive
/// to both ends, but nothing gets through).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let Ok(n) = from.read(&mut buffer).await else {
            return;
        };
        if n == 0 {
            return;
        }
        if frozen.load(Ordering::Acquire) {
            continue;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

fn ready(gateway: &Gateway) -> Option<u16> {
    http_status_blocking(gateway.admin_port, "/ready")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_pubsub_link_fails_readiness_then_catches_up() {
    let redis = RedisServer::start();
    let proxy = FreezingProxy::start(redis.port()).await;
    // The gateway under test reaches Redis through the proxy; the publisher's does not.
    let watched = Gateway::start(
        &proxy.url(),
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

    proxy.freeze(true);
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
    proxy.freeze(false);
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
