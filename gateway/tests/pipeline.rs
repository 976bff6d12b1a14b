//! A client may send publishes without waiting for their replies: the gateway
//! works on up to 64 at once, yet replies and errors keep the order of the
//! requests, each publish takes one offset of a dense range, and any other
//! request waits for the publishes before it. (Offsets usually follow the
//! request order too, but Redis may run pipelined writes in another order, as
//! docs/protocol.md says; a client that needs one exact order waits for replies.)

#![allow(clippy::unwrap_used)]

mod common;

use chatcluster_protocol::codec::Encoding;
use common::*;
use serde_json::json;

#[tokio::test]
async fn pipelined_publishes_keep_request_order() {
    let redis = RedisServer::start();
    let gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default()
            .env("PUBLISH_RATE", "100000")
            .env("PUBLISH_BURST", "100000"),
    );
    let url = gateway.ws_url();
    let mut reader = login(&url, Encoding::Json, "reader").await;
    reader
        .ok(json!({"op": "subscribe", "channel": "pipe"}))
        .await;
    // The channel's epoch exists before the burst: a publish that waits for a
    // new epoch or offset block may be overtaken (see the next test).
    reader
        .ok(json!({"op": "publish", "channel": "pipe", "text": "start"}))
        .await;
    reader.messages(1).await;
    for encoding in Encoding::ALL {
        let mut client = login(&url, encoding, "writer").await;
        let mut ids = Vec::new();
        for n in 0..300 {
            let request = if n == 150 {
                // An invalid channel in the middle: its error keeps its place.
                json!({"op": "publish", "channel": "bad channel!", "text": "x"})
            } else {
                json!({"op": "publish", "channel": "pipe", "text": format!("{n}")})
            };
            ids.push(client.send(request).await);
        }
        ids.push(client.send(json!({"op": "ping"})).await);
        let mut offsets = Vec::new();
        for (n, id) in ids.iter().enumerate() {
            let reply = client.next_frame(WAIT).await.expect("reply");
            assert_eq!(reply["id"], json!(id), "replies in request order");
            match n {
                150 => assert_eq!(reply["code"], "bad_request"),
                300 => assert_eq!(reply["type"], "ok", "the ping waited for the publishes"),
                _ => offsets.push(reply["data"]["offset"].as_u64().unwrap()),
            }
        }
        let mut sorted = offsets.clone();
        sorted.sort_unstable();
        assert!(
            sorted.windows(2).all(|w| w[1] == w[0] + 1),
            "one offset each, no gap: {sorted:?}"
        );
        let pushed = reader.messages(299).await;
        let pushed_offsets: Vec<u64> = pushed
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(pushed_offsets, sorted, "pushed in offset order, once each");
        let mut texts: Vec<String> = texts(&pushed);
        texts.sort_unstable();
        let mut expected: Vec<String> = (0..300)
            .filter(|n| *n != 150)
            .map(|n| n.to_string())
            .collect();
        expected.sort_unstable();
        assert_eq!(texts, expected);
    }
}

#[tokio::test]
async fn pipelined_publishes_through_new_epochs_and_offset_blocks_are_each_stored_once() {
    let redis = RedisServer::start();
    // The smallest offset blocks: publishes find their block used up (or the
    // next one being reserved), and the first ones find no epoch; each waits
    // and is sent again. Replies keep the request order.
    let gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default()
            .env("PUBLISH_RATE", "100000")
            .env("PUBLISH_BURST", "100000")
            .env("OFFSET_BLOCK", "100"),
    );
    let url = gateway.ws_url();
    let mut client = login(&url, Encoding::MsgPack, "writer").await;
    let mut ids = Vec::new();
    for n in 0..600 {
        let request = json!({"op": "publish", "channel": "fresh", "text": format!("{n}")});
        ids.push(client.send(request).await);
    }
    let mut replies = Vec::new();
    for id in &ids {
        let reply = client.next_frame(WAIT).await.expect("reply");
        assert_eq!(reply["id"], json!(id), "replies in request order");
        assert_eq!(reply["type"], "ok", "{reply}");
        replies.push(reply["data"].clone());
    }
    let mut stored = Vec::new();
    let mut before = None;
    loop {
        let mut request = json!({"op": "history", "channel": "fresh", "limit": 100});
        if let Some(before) = before {
            request["before"] = json!(before);
        }
        let page = client.ok(request).await["messages"]
            .as_array()
            .unwrap()
            .clone();
        if page.is_empty() {
            break;
        }
        before = page[0]["offset"].as_u64();
        stored.splice(0..0, page);
    }
    let mut texts = texts(&stored);
    texts.sort_by_key(|t| t.parse::<u32>().unwrap());
    let expected: Vec<String> = (0..600).map(|n| n.to_string()).collect();
    assert_eq!(texts, expected, "each publish stored once");
    for (n, reply) in replies.iter().enumerate() {
        let at = stored
            .iter()
            .find(|m| m["msg_id"] == reply["msg_id"])
            .expect("stored");
        assert_eq!(
            (at["offset"].clone(), at["text"].as_str()),
            (reply["offset"].clone(), Some(n.to_string().as_str()))
        );
    }
}
