//! Test harness: real gateway processes (the built binary) in front of a real
//! redis-server, optionally behind a real HAProxy on Unix sockets, and a
//! WebSocket client speaking JSON or MessagePack.

// Shared by several test crates; each uses a different part.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use chatcluster_protocol::codec::{self, Encoding};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

pub use chatcluster_testkit::http::{http, http_status_blocking};
use chatcluster_testkit::process::{Guarded, Output};
pub use chatcluster_testkit::{Haproxy, RedisServer, free_port, wait_until};

/// How long a test waits for any one frame.
pub const WAIT: Duration = Duration::from_secs(10);

/// A gateway process; killed on drop.
pub struct Gateway {
    child: Guarded,
    /// Admin port (/health, /ready, /metrics).
    pub admin_port: u16,
    /// Public TCP port, when not on a Unix socket.
    pub port: Option<u16>,
    /// Unix socket, when on one.
    pub socket: Option<PathBuf>,
}

/// How to start a gateway.
#[derive(Clone, Default)]
pub struct GatewayOptions {
    /// Listen on this Unix socket instead of TCP.
    pub socket: Option<PathBuf>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl GatewayOptions {
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn socket(mut self, path: PathBuf) -> Self {
        self.socket = Some(path);
        self
    }
}

impl Gateway {
    /// Starts a gateway against `redis_url` and waits until it is ready;
    /// without a `DATABASE_URL` in the options it runs `EPHEMERAL`.
    pub fn start(redis_url: &str, options: GatewayOptions) -> Self {
        let admin_port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_chatcluster-gateway"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("GATEWAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("REDIS_URL", redis_url)
            .env("ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
            .env("PRESENCE_TTL", "3s")
            .env("DRAIN_TIMEOUT", "1s");
        let port = match &options.socket {
            Some(path) => {
                command.env("SOCKET_PATH", path);
                None
            }
            None => {
                let port = free_port();
                command.env("LISTEN_ADDR", format!("127.0.0.1:{port}"));
                Some(port)
            }
        };
        if !options.env.iter().any(|(key, _)| key == "DATABASE_URL") {
            command.env("EPHEMERAL", "true");
        }
        for (key, value) in &options.env {
            command.env(key, value);
        }
        let child = Guarded::spawn_with("gateway", &mut command, Output::Inherit);
        let gateway = Self {
            child,
            admin_port,
            port,
            socket: options.socket,
        };
        assert!(
            wait_until(Duration::from_secs(15), || http_status_blocking(
                admin_port, "/ready"
            ) == Some(200)),
            "gateway did not become ready"
        );
        gateway
    }

    /// `ws://` URL of a TCP gateway.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port.expect("tcp gateway"))
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Sends a signal by name (`TERM`, `KILL`).
    pub fn signal(&self, signal: &str) {
        self.child.signal(signal);
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        self.child.wait_exit(timeout)?.code()
    }

    /// A metric's value from `/metrics` (first sample whose line starts with `name`).
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, body) = http(self.admin_port, "GET", "/metrics", &[], "").await;
        chatcluster_testkit::http::first_sample(&body, name)
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A protocol client.
pub struct Client {
    ws: Ws,
    pub encoding: Encoding,
    next_id: i64,
    pushes: VecDeque<Value>,
    pub clock: u64,
    closed: bool,
}

/// Connects with a subprotocol and optional extra headers; `Err` carries the HTTP rejection.
pub async fn try_connect(
    url: &str,
    encoding: Encoding,
    headers: &[(&str, &str)],
) -> Result<Client, tungstenite::Error> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        encoding.subprotocol().parse().unwrap(),
    );
    for (key, value) in headers {
        request.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(key.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let (ws, response) = tokio_tungstenite::connect_async(request).await?;
    let selected = response
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok());
    assert_eq!(
        selected,
        Some(encoding.subprotocol()),
        "server must echo the subprotocol"
    );
    Ok(Client {
        ws,
        encoding,
        next_id: 1,
        pushes: VecDeque::new(),
        clock: 0,
        closed: false,
    })
}

/// Connects with `headers` once a connection slot is free: retries a refused
/// upgrade every 50 ms for up to 2.5 s, then answers a `ping` on it.
pub async fn connect_when_free(url: &str, encoding: Encoding, headers: &[(&str, &str)]) -> Client {
    for _ in 0..50 {
        if let Ok(mut client) = try_connect(url, encoding, headers).await {
            client.ok(json!({"op": "ping"})).await;
            return client;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no connection slot freed up at {url}");
}

/// An HS256 JWT of `claims` signed with `secret`.
pub fn jwt(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Connects or panics.
pub async fn connect(url: &str, encoding: Encoding) -> Client {
    try_connect(url, encoding, &[])
        .await
        .expect("websocket connect")
}

/// Connects and logs in as `user`.
pub async fn login(url: &str, encoding: Encoding, user: &str) -> Client {
    let mut client = connect(url, encoding).await;
    client.ok(json!({"op": "login", "user": user})).await;
    client
}

impl Client {
    /// Sends a raw WebSocket message.
    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    /// Sends a request object (an `id` is added) and returns the id.
    pub async fn send(&mut self, mut request: Value) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        request["id"] = json!(id);
        let bytes = codec::encode(self.encoding, &request);
        let message = match self.encoding {
            Encoding::Json => Message::Text(String::from_utf8(bytes.to_vec()).unwrap().into()),
            Encoding::MsgPack => Message::Binary(bytes),
        };
        self.send_raw(message).await;
        id
    }

    /// Reads the next server frame (any kind), decoded; `None` on close or
    /// timeout ([`Client::is_closed`] tells which).
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<Value> {
        loop {
            let next = tokio::time::timeout(timeout, self.ws.next()).await.ok()?;
            let Some(Ok(message)) = next else {
                self.closed = true;
                return None;
            };
            let bytes = match message {
                Message::Text(text) => {
                    assert_eq!(
                        self.encoding,
                        Encoding::Json,
                        "text frame on a msgpack connection"
                    );
                    text.as_bytes().to_vec()
                }
                Message::Binary(bytes) => {
                    assert_eq!(
                        self.encoding,
                        Encoding::MsgPack,
                        "binary frame on a json connection"
                    );
                    bytes.to_vec()
                }
                Message::Close(_) => {
                    self.closed = true;
                    return None;
                }
                _ => continue,
            };
            let value: Value = codec::decode(self.encoding, &bytes).expect("server frame decodes");
            if let Some(clock) = value["clock"].as_u64() {
                self.clock = self.clock.max(clock);
            }
            return Some(value);
        }
    }

    /// Sends a request and returns its reply frame; pushes seen meanwhile are queued.
    pub async fn request(&mut self, request: Value) -> Value {
        let id = self.send(request).await;
        loop {
            let frame = self.next_frame(WAIT).await.expect("reply before timeout");
            if frame["id"] == json!(id) {
                return frame;
            }
            assert!(
                frame["type"] != "ok" && frame["type"] != "error",
                "reply to another request: {frame}"
            );
            self.pushes.push_back(frame);
        }
    }

    /// Sends a request that must succeed; returns `data`.
    pub async fn ok(&mut self, request: Value) -> Value {
        let reply = self.request(request.clone()).await;
        assert_eq!(reply["type"], "ok", "{request} failed: {reply}");
        reply["data"].clone()
    }

    /// Sends a request that must fail; returns (code, message).
    pub async fn err(&mut self, request: Value) -> (String, String) {
        let reply = self.request(request.clone()).await;
        assert_eq!(reply["type"], "error", "{request} should fail: {reply}");
        (
            reply["code"].as_str().unwrap().to_owned(),
            reply["message"].as_str().unwrap().to_owned(),
        )
    }

    /// Whether the server closed the connection (or it broke).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Keeps a push read while waiting for something else, for [`Client::push`].
    pub fn keep(&mut self, frame: Value) {
        self.pushes.push_back(frame);
    }

    /// The oldest push kept, without reading the socket.
    pub fn kept(&mut self) -> Option<Value> {
        self.pushes.pop_front()
    }

    /// The next push (message, direct or presence frame).
    pub async fn push(&mut self, timeout: Duration) -> Option<Value> {
        if let Some(frame) = self.pushes.pop_front() {
            return Some(frame);
        }
        self.next_frame(timeout).await
    }

    /// The next push of a type, skipping others.
    pub async fn push_of(&mut self, kind: &str, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self.push(left).await?;
            if frame["type"] == kind {
                return Some(frame);
            }
        }
    }

    /// Collects `n` channel messages (skipping other pushes).
    pub async fn messages(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.push_of("message", WAIT).await {
                Some(frame) => out.push(frame),
                None => panic!("got {} of {n} messages", out.len()),
            }
        }
        out
    }

    /// Reads until the server closes; returns its close frame.
    pub async fn close_frame(&mut self, timeout: Duration) -> Option<CloseFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return frame,
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }
}

/// Offsets of message frames.
pub fn offsets(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| f["offset"].as_u64().unwrap())
        .collect()
}

/// Texts of message frames.
pub fn texts(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f["text"].as_str().unwrap().to_owned())
        .collect()
}

/// Runs a worker in-process with batches of `batch_size` entries written
/// after `batch_timeout` at the latest; returns once it migrated the database
/// and is ready. Dropping the sender stops it.
pub async fn start_worker(
    redis_url: &str,
    database_url: &str,
    batch_size: usize,
    batch_timeout: Duration,
) -> tokio::sync::oneshot::Sender<()> {
    let mut config = chatcluster_worker::Config::new(redis_url, database_url, "gateway-test");
    (config.batch_size, config.batch_timeout) = (batch_size, batch_timeout);
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = admin.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        chatcluster_worker::worker::run(config, admin, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    for _ in 0..300 {
        if chatcluster_testkit::http::get(port, "/ready").await.0 == 200 {
            return stop;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("worker not ready");
}
