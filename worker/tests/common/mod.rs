//! Helpers shared by the worker's integration tests: real redis-server and
//! postgres processes, publishing through the gateway's own Lua scripts,
//! in-process and child-process workers, and table/stream/metric probes.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chatcluster_protocol::entry::{PersistEntry, StoredDirect, StoredMessage};
use chatcluster_protocol::keys::{self, PERSIST_GROUP};
use chatcluster_protocol::scripts;
use chatcluster_testkit::{Postgres, RedisServer};
use chatcluster_worker::Config;
use redis::aio::MultiplexedConnection;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const SHARDS: u32 = 4;

/// A redis-server and a postgres, both real processes.
pub struct Stack {
    pub redis: RedisServer,
    pub pg: Postgres,
}

impl Stack {
    pub async fn start() -> Self {
        tokio::task::spawn_blocking(|| Self {
            redis: RedisServer::start(),
            pg: Postgres::start(),
        })
        .await
        .unwrap()
    }

    pub async fn redis(&self) -> MultiplexedConnection {
        redis::Client::open(self.redis.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub async fn pool(&self) -> PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(3)
            .connect(&self.pg.url())
            .await
            .unwrap()
    }

    /// A worker configuration with short timers for tests.
    pub fn config(&self, id: &str) -> Config {
        let mut config = Config::new(self.redis.url(), self.pg.url(), id);
        config.batch_size = 100;
        config.batch_timeout = Duration::from_millis(100);
        config.claim_idle = Duration::from_secs(1);
        config.stream_shards = SHARDS;
        config.drain_timeout = Duration::from_secs(5);
        config
    }
}

/// Runs a blocking testkit call (stop/restart a server) off the runtime threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// A worker running in this process, stopped through its shutdown future.
pub struct InProcess {
    pub addr: SocketAddr,
    stop: CancellationToken,
    handle: JoinHandle<chatcluster_worker::Result<()>>,
}

impl InProcess {
    pub async fn start(config: Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(chatcluster_worker::run(
            config,
            listener,
            stop.clone().cancelled_owned(),
        ));
        Self { addr, stop, handle }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("worker did not stop")
            .unwrap()
            .unwrap();
    }
}

/// The real `chatcluster-worker` binary as a child process.
pub struct Binary {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Binary {
    pub fn spawn(stack: &Stack, id: &str, env: &[(&str, &str)]) -> Self {
        let port = chatcluster_testkit::free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let verbose = std::env::var_os("TESTKIT_VERBOSE").is_some();
        let mut command = Command::new(env!("CARGO_BIN_EXE_chatcluster-worker"));
        command
            .env("REDIS_URL", stack.redis.url())
            .env("DATABASE_URL", stack.pg.url())
            .env("WORKER_ID", id)
            .env("ADMIN_ADDR", addr.to_string())
            .env("STREAM_SHARDS", SHARDS.to_string())
            .env("RUST_LOG", if verbose { "info" } else { "warn" })
            .stdin(Stdio::null())
            .stdout(if verbose {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(if verbose {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        for (key, value) in env {
            command.env(key, value);
        }
        Self {
            child: command.spawn().expect("spawn chatcluster-worker"),
            addr,
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 50 ms until it holds, or panics with `what` after `timeout`.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path` on the admin server: status and body (`0` when nothing listens).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Sum of the samples of `name` (any labels) on the worker's `/metrics`.
pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn wait_ready(addr: SocketAddr) {
    wait_for(Duration::from_secs(30), "/ready 200", || async {
        http_get(addr, "/ready").await.0 == 200
    })
    .await;
}

/// Starts a channel's epoch the way the gateway does (offset floor from PostgreSQL).
pub async fn init_channel(conn: &mut MultiplexedConnection, channel: &str, floor: i64) {
    let _: (i64, String) = redis::Script::new(scripts::INIT_CHANNEL)
        .key(keys::meta_key(channel, SHARDS))
        .key(keys::history_key(channel, SHARDS))
        .arg(Uuid::new_v4().to_string())
        .arg(floor)
        .arg(0)
        .invoke_async(conn)
        .await
        .unwrap();
}

/// Publishes `n` messages to `channel` through `PUBLISH_MESSAGE`, pipelined;
/// returns their ids.
pub async fn publish(conn: &mut MultiplexedConnection, channel: &str, n: usize) -> Vec<Uuid> {
    let script = redis::Script::new(scripts::PUBLISH_MESSAGE);
    let _: (String,) = redis::pipe()
        .load_script(&script)
        .query_async(conn)
        .await
        .unwrap();
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        let mut pipe = redis::pipe();
        let mut invocations = Vec::new();
        for i in chunk {
            let message = StoredMessage {
                channel: channel.to_owned(),
                msg_id: Uuid::new_v4(),
                user: format!("user{}", i % 7),
                text: format!("message {i} with\ttab, newline\n and backslash \\ é"),
                ts: chrono::Utc::now().timestamp_millis(),
                clock: *i as u64,
            };
            ids.push(message.msg_id);
            let mut invocation = script.prepare_invoke();
            invocation
                .key(keys::meta_key(channel, SHARDS))
                .key(keys::history_key(channel, SHARDS))
                .key(keys::persist_key(keys::shard_of(channel, SHARDS)))
                .arg(message.encode())
                .arg(1000)
                .arg(0)
                .arg(keys::channel_topic(channel));
            invocations.push(invocation);
        }
        for invocation in &invocations {
            pipe.invoke_script(invocation);
        }
        let _: Vec<(i64, String)> = pipe.query_async(conn).await.unwrap();
    }
    ids
}

/// Registers a user or channel name through `REGISTER_NAME`.
pub async fn register(conn: &mut MultiplexedConnection, kind: &str, name: &str) {
    let set = if kind == "user" {
        keys::USERS_SET
    } else {
        keys::CHANNELS_SET
    };
    let _: i64 = redis::Script::new(scripts::REGISTER_NAME)
        .key(set)
        .key(keys::persist_key(keys::shard_of(name, SHARDS)))
        .arg(kind)
        .arg(name)
        .arg(chrono::Utc::now().timestamp_millis())
        .invoke_async(conn)
        .await
        .unwrap();
}

/// Sends a direct message through `PUBLISH_DIRECT`.
pub async fn direct(conn: &mut MultiplexedConnection, from: &str, to: &str, text: &str) -> Uuid {
    let message = StoredDirect {
        msg_id: Uuid::new_v4(),
        from: from.to_owned(),
        to: to.to_owned(),
        text: text.to_owned(),
        ts: chrono::Utc::now().timestamp_millis(),
        clock: 1,
    };
    let _: i64 = redis::Script::new(scripts::PUBLISH_DIRECT)
        .key(keys::persist_key(keys::shard_of(to, SHARDS)))
        .arg(message.encode())
        .arg(keys::user_topic(to))
        .arg(keys::user_topic(from))
        .invoke_async(conn)
        .await
        .unwrap();
    message.msg_id
}

/// Appends raw fields to a persistence stream (redelivery and poison tests).
pub async fn xadd(conn: &mut MultiplexedConnection, shard: u32, fields: &[(&str, Vec<u8>)]) {
    let _: String = redis::cmd("XADD")
        .arg(keys::persist_key(shard))
        .arg("*")
        .arg(fields)
        .query_async(conn)
        .await
        .unwrap();
}

/// The fields of `entry` as a script would write them.
pub fn fields_of(entry: &PersistEntry) -> Vec<(&'static str, Vec<u8>)> {
    entry.fields()
}

/// `(rows, distinct msg_ids)` of `messages`; `(0, 0)` before the schema exists.
pub async fn message_counts(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT msg_id) FROM messages")
        .fetch_one(pool)
        .await
        .unwrap_or((0, 0))
}

pub async fn count(pool: &PgPool, table: &'static str) -> i64 {
    let sql = match table {
        "users" => "SELECT count(*) FROM users",
        "channels" => "SELECT count(*) FROM channels",
        "direct_messages" => "SELECT count(*) FROM direct_messages",
        _ => "SELECT count(*) FROM messages",
    };
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or(0)
}

/// Waits until `messages` holds `n` rows, then asserts no duplicate and no extra.
pub async fn assert_exactly(pool: &PgPool, published: &[Uuid], timeout: Duration) {
    let n = published.len() as i64;
    wait_for(timeout, &format!("{n} rows"), || async {
        message_counts(pool).await.0 >= n
    })
    .await;
    let (rows, distinct) = message_counts(pool).await;
    assert_eq!(rows, n, "rows in messages");
    assert_eq!(distinct, n, "distinct msg_ids in messages");
    let stored: Vec<Uuid> = sqlx::query_scalar("SELECT msg_id FROM messages")
        .fetch_all(pool)
        .await
        .unwrap();
    let stored: std::collections::HashSet<Uuid> = stored.into_iter().collect();
    assert!(
        published.iter().all(|id| stored.contains(id)),
        "a published message is missing"
    );
}

/// Entries left in all persistence streams, and entries pending in the group.
pub async fn backlog(conn: &mut MultiplexedConnection) -> (u64, u64) {
    let (mut len, mut pending) = (0, 0);
    for key in keys::persist_keys(SHARDS) {
        let l: u64 = redis::cmd("XLEN")
            .arg(&key)
            .query_async(conn)
            .await
            .unwrap_or(0);
        len += l;
        let summary: redis::Value = redis::cmd("XPENDING")
            .arg(&key)
            .arg(PERSIST_GROUP)
            .query_async(conn)
            .await
            .unwrap_or(redis::Value::Nil);
        if let redis::Value::Array(items) = summary
            && let Some(redis::Value::Int(n)) = items.first()
        {
            pending += *n as u64;
        }
    }
    (len, pending)
}

/// Waits until every persistence stream is empty and nothing is pending.
pub async fn wait_drained(conn: &mut MultiplexedConnection, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let backlog = backlog(conn).await;
        if backlog == (0, 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "streams not drained: (len, pending) = {backlog:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
