//! Helpers shared by the worker's integration tests: real redis-server and
//! postgres processes, publishing through the gateway's own Lua scripts,
//! in-process and child-process workers, and table/stream/metric probes.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use chatcluster_protocol::entry::{PersistEntry, StoredDirect, StoredMessage};
use chatcluster_protocol::keys::{self, PERSIST_GROUP};
use chatcluster_protocol::scripts;
use chatcluster_protocol::stream::{AppendSettings, ScriptCall, StreamId};
use chatcluster_testkit::process::{Guarded, Output};
use chatcluster_testkit::{Postgres, RedisServer};
use chatcluster_worker::Config;
use redis::aio::MultiplexedConnection;
use sqlx::PgPool;
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

    /// Shuts the worker down and expects a clean stop.
    pub async fn stop(self) {
        self.stop.cancel();
        self.ended(Duration::from_secs(20))
            .await
            .expect("worker stopped with an error");
    }

    /// Waits (without asking it to stop) until the worker's `run` returns.
    pub async fn ended(self, timeout: Duration) -> chatcluster_worker::Result<()> {
        tokio::time::timeout(timeout, self.handle)
            .await
            .expect("worker did not stop")
            .expect("run itself panicked")
    }
}

/// The real `chatcluster-worker` binary as a child process, its output captured.
pub struct Binary {
    pub process: Guarded,
    pub addr: SocketAddr,
}

impl Binary {
    /// Starts the binary against `stack` and waits until it serves its admin port.
    pub fn spawn(stack: &Stack, id: &str, env: &[(&str, &str)]) -> Self {
        let (process, port) = Guarded::spawn_listening(
            "chatcluster-worker",
            Output::Capture,
            Duration::from_secs(20),
            |port| {
                let mut command = Command::new(env!("CARGO_BIN_EXE_chatcluster-worker"));
                command
                    .env("REDIS_URL", stack.redis.url())
                    .env("DATABASE_URL", stack.pg.url())
                    .env("WORKER_ID", id)
                    .env("ADMIN_ADDR", format!("127.0.0.1:{port}"))
                    .env("STREAM_SHARDS", SHARDS.to_string())
                    .env("RUST_LOG", "warn,chatcluster_worker=info")
                    .env_remove("CHATCLUSTER_WORKER_PANIC_ON");
                for (key, value) in env {
                    command.env(key, value);
                }
                command
            },
        );
        Self {
            process,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

/// Runs `chatcluster-worker <args>` (a tool) against `redis_url`, without a
/// database; returns its exit status, stdout and stderr.
pub async fn tool(redis_url: &str, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chatcluster-worker"));
    command
        .args(args)
        .env("REDIS_URL", redis_url)
        .env("STREAM_SHARDS", SHARDS.to_string())
        .env_remove("DATABASE_URL");
    let out = blocking(move || command.output().unwrap()).await;
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    chatcluster_testkit::http::get(addr.port(), path).await
}

/// Sum of the samples of `name` (any labels) on the worker's `/metrics`.
pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").await;
    chatcluster_testkit::http::sum_samples(&body, name)
}

/// The value of one labelled series, e.g. `..._total{cause="offset_clash"}`.
pub async fn series(addr: SocketAddr, series: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").await;
    chatcluster_testkit::http::first_sample(&body, series)
}

pub async fn wait_ready(addr: SocketAddr) {
    wait_for(Duration::from_secs(30), "/ready 200", || async {
        http_get(addr, "/ready").await.0 == 200
    })
    .await;
}

/// How these tests append: no TTL, no idempotency records.
const APPEND: AppendSettings = AppendSettings {
    history_size: 1000,
    ttl_secs: 0,
    record_ms: 1,
    block: 1 << 40,
};

/// Runs one script call.
async fn call<T: redis::FromRedisValue>(
    conn: &mut MultiplexedConnection,
    script: &redis::Script,
    call: ScriptCall,
) -> T {
    let mut invocation = script.prepare_invoke();
    invocation.key(call.keys).arg(call.args);
    invocation.invoke_async(conn).await.unwrap()
}

/// Starts a stream's epoch after `floor` the way the gateway does, with a
/// block of offsets large enough for any test.
pub async fn init_stream(conn: &mut MultiplexedConnection, stream: &StreamId, floor: i64) {
    let epoch = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let init = stream.init_call(SHARDS, &epoch, floor as u64, APPEND.block, 0);
    let _: (i64, String, i64, i64) =
        call(conn, &redis::Script::new(scripts::INIT_EPOCH), init).await;
}

/// Starts a channel's epoch after `floor` (the gateway's offset floor).
pub async fn init_channel(conn: &mut MultiplexedConnection, channel: &str, floor: i64) {
    init_stream(conn, &StreamId::channel(channel), floor).await;
}

/// A message the gateway's script accepted: where it must land.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Published {
    pub channel: String,
    pub offset: i64,
    pub msg_id: Uuid,
}

/// Publishes `n` messages to `channel` through `PUBLISH_MESSAGE`, pipelined.
pub async fn publish(conn: &mut MultiplexedConnection, channel: &str, n: usize) -> Vec<Published> {
    let texts: Vec<String> = (0..n)
        .map(|i| format!("message {i} with\ttab, newline\n and backslash \\ é"))
        .collect();
    publish_texts(conn, channel, &texts).await
}

/// Publishes one message per text to `channel` through `PUBLISH_MESSAGE`, pipelined.
pub async fn publish_texts(
    conn: &mut MultiplexedConnection,
    channel: &str,
    texts: &[String],
) -> Vec<Published> {
    let script = redis::Script::new(scripts::APPEND);
    let _: (String,) = redis::pipe()
        .load_script(&script)
        .query_async(conn)
        .await
        .unwrap();
    let stream = StreamId::channel(channel);
    let mut published = Vec::with_capacity(texts.len());
    for chunk in texts.iter().enumerate().collect::<Vec<_>>().chunks(200) {
        let mut pipe = redis::pipe();
        let mut invocations = Vec::new();
        let mut ids = Vec::new();
        for (i, text) in chunk {
            let message = StoredMessage {
                channel: channel.to_owned(),
                msg_id: Uuid::new_v4(),
                user: format!("user{}", i % 7),
                text: (*text).clone(),
                ts: chrono::Utc::now().timestamp_millis(),
                clock: *i as u64,
            };
            ids.push(message.msg_id);
            let append =
                stream.append_call(SHARDS, message.encode(), message.msg_id, None, &APPEND);
            let mut invocation = script.prepare_invoke();
            invocation.key(append.keys).arg(append.args);
            invocations.push(invocation);
        }
        for invocation in &invocations {
            pipe.invoke_script(invocation);
        }
        let replies: Vec<(i64, String, String, i64, i64)> = pipe.query_async(conn).await.unwrap();
        for (msg_id, (offset, ..)) in ids.into_iter().zip(replies) {
            published.push(Published {
                channel: channel.to_owned(),
                offset,
                msg_id,
            });
        }
    }
    published
}

/// The ids of `published`.
pub fn ids(published: &[Published]) -> Vec<Uuid> {
    published.iter().map(|p| p.msg_id).collect()
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

/// Sends a direct message like the gateway: appended to the recipient's
/// inbox, then to the sender's (once for a note to oneself). Returns its id
/// and its offsets in the two inboxes.
pub async fn direct(
    conn: &mut MultiplexedConnection,
    from: &str,
    to: &str,
    text: &str,
) -> (Uuid, Vec<i64>) {
    let message = StoredDirect {
        msg_id: Uuid::new_v4(),
        from: from.to_owned(),
        to: to.to_owned(),
        text: text.to_owned(),
        ts: chrono::Utc::now().timestamp_millis(),
        clock: 1,
    };
    let script = redis::Script::new(scripts::APPEND);
    let mut offsets = Vec::new();
    let owners = if from == to { vec![to] } else { vec![to, from] };
    for owner in owners {
        let inbox = StreamId::inbox(owner);
        let (epoch, _): (Option<String>, i64) = redis::Script::new(scripts::INBOX_CURSOR)
            .key(keys::inbox_meta_key(owner, SHARDS))
            .key(keys::life_key(keys::shard_of(owner, SHARDS)))
            .invoke_async(conn)
            .await
            .unwrap();
        if epoch.is_none() {
            init_stream(conn, &inbox, 0).await;
        }
        let append = inbox.append_call(SHARDS, message.encode(), message.msg_id, None, &APPEND);
        let (offset, ..): (i64, String, String, i64, i64) = call(conn, &script, append).await;
        offsets.push(offset);
    }
    (message.msg_id, offsets)
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

/// The dead letters of `shard`: `(reason, cause, fields)` in order.
pub async fn dead_letters(
    conn: &mut MultiplexedConnection,
    shard: u32,
) -> Vec<HashMap<String, Vec<u8>>> {
    let dead: redis::streams::StreamRangeReply =
        redis::AsyncCommands::xrange_all(conn, keys::dead_letter_key(shard))
            .await
            .unwrap();
    dead.ids
        .iter()
        .map(|entry| {
            entry
                .map
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        redis::from_redis_value_ref::<Vec<u8>>(v).unwrap(),
                    )
                })
                .collect()
        })
        .collect()
}

/// A field of a dead letter as text.
pub fn field(letter: &HashMap<String, Vec<u8>>, name: &str) -> String {
    String::from_utf8_lossy(letter.get(name).map_or(&[][..], Vec::as_slice)).into_owned()
}

/// The fields of `entry` as a script would write them.
pub fn fields_of(entry: &PersistEntry) -> Vec<(&'static str, Vec<u8>)> {
    entry.fields()
}

/// Rows in `messages`; 0 before the schema exists.
pub async fn message_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

pub async fn count(pool: &PgPool, table: &'static str) -> i64 {
    let sql = match table {
        "users" => "SELECT count(*) FROM users",
        "channels" => "SELECT count(*) FROM channels",
        "direct_messages" => "SELECT count(*) FROM direct_messages",
        "inbox" => "SELECT count(*) FROM inbox",
        "messages" => "SELECT count(*) FROM messages",
        other => panic!("count of unknown table {other}"),
    };
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or(0)
}

/// Waits until `messages` holds as many rows as were published, then asserts
/// that the table holds exactly the published messages, each at the channel
/// and offset its script returned: a lost, extra or misplaced row fails it.
pub async fn assert_exactly(pool: &PgPool, published: &[Published], timeout: Duration) {
    let n = published.len() as i64;
    wait_for(timeout, &format!("{n} rows"), || async {
        message_rows(pool).await >= n
    })
    .await;
    let rows: Vec<(String, i64, Uuid)> =
        sqlx::query_as("SELECT channel, channel_offset, msg_id FROM messages")
            .fetch_all(pool)
            .await
            .unwrap();
    let stored: HashSet<Published> = rows
        .into_iter()
        .map(|(channel, offset, msg_id)| Published {
            channel,
            offset,
            msg_id,
        })
        .collect();
    let expected: HashSet<Published> = published.iter().cloned().collect();
    assert_eq!(
        expected.len(),
        published.len(),
        "the test published a message twice"
    );
    let missing: Vec<_> = expected.difference(&stored).take(5).collect();
    let extra: Vec<_> = stored.difference(&expected).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "messages table differs from what was published: missing {missing:?}, extra {extra:?}"
    );
}

/// Logs every insert attempt into `messages` that commits, skipped ones
/// (`ON CONFLICT DO NOTHING`) included: a `BEFORE INSERT` row trigger fires
/// before the conflict check. A message processed twice shows two attempts.
pub async fn install_insert_log(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE insert_log (msg_id uuid NOT NULL);
         CREATE FUNCTION log_insert() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO insert_log VALUES (NEW.msg_id); RETURN NEW; END $$;
         CREATE TRIGGER log_insert BEFORE INSERT ON messages
           FOR EACH ROW EXECUTE FUNCTION log_insert();",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// Insert attempts per message id, from [`install_insert_log`].
pub async fn insert_attempts(pool: &PgPool) -> HashMap<Uuid, i64> {
    let rows: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT msg_id, count(*) FROM insert_log GROUP BY msg_id")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter().collect()
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
