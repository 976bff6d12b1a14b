//! A client may send publishes without waiting for their replies: the gateway
//! works on up to 64 at once, yet replies, offsets and errors keep the order
//! of the requests, and any other request waits for the publishes before it.

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
        assert!(
            offsets.windows(2).all(|w| w[1] == w[0] + 1),
            "offsets follow the request order"
        );
        let pushed = reader.messages(299).await;
        let texts: Vec<String> = texts(&pushed);
        let expected: Vec<String> = (0..300)
            .filter(|n| *n != 150)
            .map(|n| n.to_string())
            .collect();
        assert_eq!(texts, expected);
    }
}
