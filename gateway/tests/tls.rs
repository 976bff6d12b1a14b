//! A gateway reaches a Redis that speaks TLS only (`rediss://`), for commands
//! and for its subscriber connection, trusting the CA given in `SSL_CERT_FILE`.

#![allow(clippy::unwrap_used)]

mod common;

use chatcluster_protocol::codec::Encoding;
use chatcluster_testkit::TlsRedis;
use common::*;
use serde_json::json;

#[tokio::test]
async fn publish_and_subscribe_over_a_tls_only_redis() {
    let redis = TlsRedis::start();
    let ca = redis.ca_file().to_string_lossy().into_owned();
    let gateway = Gateway::start(
        &redis.url(),
        GatewayOptions::default().env("SSL_CERT_FILE", &ca),
    );
    let url = gateway.ws_url();
    let mut reader = login(&url, Encoding::Json, "reader").await;
    reader
        .ok(json!({"op": "subscribe", "channel": "secure"}))
        .await;
    let mut writer = login(&url, Encoding::MsgPack, "writer").await;
    let reply = writer
        .ok(json!({"op": "publish", "channel": "secure", "text": "over tls"}))
        .await;
    let pushed = reader.messages(1).await;
    assert_eq!(pushed[0]["text"], "over tls");
    assert_eq!(pushed[0]["offset"], reply["offset"]);
}
