//! Recovery under concurrency with real processes: a publisher at a steady
//! rate on gateway A while 50 clients reconnect at once to gateway B with
//! `since`, with the channel already live on B and not live there, in both
//! encodings, and again with Redis restarted while the clients are away.
//! Every client must end with exactly the messages after what it saw, once
//! each; `recovered: false` only when the epoch changed.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chatcluster_protocol::codec::Encoding;
use common::*;
use serde_json::{Value, json};

const CLIENTS: usize = 50;
const CHANNEL: &str = "recovery";
/// Publishes per second.
const RATE: u64 = 200;

/// What the publisher has had acknowledged.
#[derive(Default)]
struct Acked {
    /// Newest acknowledged offset.
    last: AtomicU64,
    /// Acknowledgements in all.
    count: AtomicU64,
}

/// Publishes on gateway A at a steady rate until `stop`, retrying a publish
/// that failed (Redis restarting) until it is acknowledged.
async fn publisher(url: String, acked: Arc<Acked>, stop: Arc<AtomicBool>) {
    let mut client = login(&url, Encoding::Json, "publisher").await;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        tick.tick().await;
        let reply = client
            .request(json!({"op": "publish", "channel": CHANNEL, "text": format!("n{n}")}))
            .await;
        if reply["type"] == "ok" {
            acked
                .last
                .store(reply["data"]["offset"].as_u64().unwrap(), Ordering::Release);
            acked.count.fetch_add(1, Ordering::AcqRel);
            n += 1;
        }
    }
}

/// A client that saw the channel up to (`offset`, `epoch`) and went away.
struct Away {
    user: String,
    offset: u64,
    epoch: String,
}

/// Subscribes on `url`, reads a few live messages and returns what it saw last.
async fn visit(url: String, user: String, encoding: Encoding) -> Away {
    let mut client = login(&url, encoding, &user).await;
    let reply = client
        .ok(json!({"op": "subscribe", "channel": CHANNEL}))
        .await;
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    let mut offset = reply["offset"].as_u64().unwrap();
    for frame in client.messages(3).await {
        let next = frame["offset"].as_u64().unwrap();
        assert_eq!(next, offset + 1, "dense while live");
        offset = next;
    }
    Away {
        user,
        offset,
        epoch,
    }
}

/// Reconnects with `since`; returns the reply and the connection.
async fn come_back(url: String, away: Away, encoding: Encoding) -> (Away, Value, Client) {
    // Right after a Redis restart a request may still meet a broken link:
    // `unavailable` tells a client to retry, as this one does.
    let mut client = connect(&url, encoding).await;
    for attempt in 0.. {
        let reply = client
            .request(json!({"op": "login", "user": away.user}))
            .await;
        if reply["type"] == "ok" {
            break;
        }
        assert!(
            reply["code"] == "unavailable" && attempt < 50,
            "login failed: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reply = client
        .ok(json!({"op": "subscribe", "channel": CHANNEL,
                   "since": {"offset": away.offset, "epoch": away.epoch}}))
        .await;
    (away, reply, client)
}

/// Reads pushes until offset `last`; checks the whole sequence after the reply.
async fn check(away: Away, reply: Value, mut client: Client, last: u64) {
    let recovered = reply["recovered"].as_bool().unwrap();
    let reply_epoch = reply["epoch"].as_str().unwrap();
    let start = if recovered {
        assert_eq!(reply_epoch, away.epoch, "recovered within the same epoch");
        away.offset
    } else {
        assert_ne!(
            reply_epoch, away.epoch,
            "recovered:false only when the epoch changed: {reply}"
        );
        reply["offset"].as_u64().unwrap()
    };
    let mut got = offsets(reply["missed"].as_array().unwrap());
    while got.last().copied().unwrap_or(start) < last {
        let frame = client
            .push_of("message", WAIT)
            .await
            .unwrap_or_else(|| panic!("{}: stuck after {got:?}, want up to {last}", away.user));
        got.push(frame["offset"].as_u64().unwrap());
    }
    assert_eq!(
        got,
        (start + 1..=last).collect::<Vec<u64>>(),
        "{}: exactly the messages after {start}, once each",
        away.user
    );
    assert!(
        client
            .push_of("message", Duration::from_millis(100))
            .await
            .is_none(),
        "{}: nothing after the last",
        away.user
    );
}

async fn scenario(encoding: Encoding, live_on_b: bool, restart_redis: bool) {
    let mut redis = RedisServer::start();
    let a = Gateway::start(&redis.url(), GatewayOptions::default());
    // No linger on B: when its last subscriber leaves, the topic goes at once.
    let b = Gateway::start(
        &redis.url(),
        GatewayOptions::default().env("TOPIC_LINGER", "0s"),
    );
    let acked = Arc::new(Acked::default());
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = tokio::spawn(publisher(a.ws_url(), acked.clone(), stop.clone()));

    let mut keeper = None;
    if live_on_b {
        let mut client = login(&b.ws_url(), Encoding::Json, "keeper").await;
        client
            .ok(json!({"op": "subscribe", "channel": CHANNEL}))
            .await;
        keeper = Some(client);
    }
    let visits = (0..CLIENTS).map(|i| visit(b.ws_url(), format!("c{i}"), encoding));
    let away: Vec<Away> = futures_util::future::join_all(visits).await;

    if !live_on_b {
        // Every client left: the channel must no longer be live on B.
        let mut released = false;
        for _ in 0..100 {
            if b.metric("chatcluster_gateway_topics ").await == 0.0 {
                released = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(released, "B still subscribed with no local subscriber");
    }
    if restart_redis {
        let before = acked.count.load(Ordering::Acquire);
        redis.restart();
        // Wait for publishes in the new epoch.
        for _ in 0..200 {
            if acked.count.load(Ordering::Acquire) >= before + 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // Clients come back once B is ready again (its pub/sub resubscribed).
        assert!(
            wait_until(Duration::from_secs(15), || http_status_blocking(
                b.admin_port,
                "/ready"
            ) == Some(200)),
            "B did not become ready after the restart"
        );
        if let Some(keeper) = &mut keeper {
            // B noticed the new epoch once its live subscriber sees its first offsets.
            loop {
                let frame = keeper.push_of("message", WAIT).await.expect("keeper push");
                if frame["offset"].as_u64().unwrap() <= 20 {
                    break;
                }
            }
        }
    } else {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Everyone comes back at once while publishing goes on.
    let returns = away
        .into_iter()
        .map(|away| come_back(b.ws_url(), away, encoding));
    let returned = futures_util::future::join_all(returns).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Release);
    publishing.await.unwrap();
    let last = acked.last.load(Ordering::Acquire);
    let checks = returned
        .into_iter()
        .map(|(away, reply, client)| check(away, reply, client, last));
    futures_util::future::join_all(checks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_to_a_live_channel_is_exact() {
    for encoding in Encoding::ALL {
        scenario(encoding, true, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_to_a_channel_not_live_is_exact() {
    for encoding in Encoding::ALL {
        scenario(encoding, false, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_after_a_redis_restart_recovers_or_says_the_epoch_changed() {
    for (encoding, live) in [(Encoding::Json, true), (Encoding::MsgPack, false)] {
        scenario(encoding, live, true).await;
    }
}
