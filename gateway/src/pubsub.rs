//! The gateway's subscriber connection to Redis.
//!
//! One task owns a dedicated connection in subscribe mode. Topics are
//! subscribed when the delivery core asks ([`PubSub::subscribe`], answered once
//! Redis confirms) and unsubscribed when it lets them go. Every message read is
//! handed to an [`Inbound`] at once, as shared bytes: this task never queues
//! messages itself, so its memory is one read buffer however far behind the
//! consumers fall (the [`Inbound`] decides what a full queue means).
//!
//! Health: a `PING` goes out every `ping_interval`; when its pong (or any
//! subscribe confirmation) does not come back within `timeout`, the connection
//! is treated as dead. After any loss the task reconnects with backoff,
//! subscribes every wanted topic again and only then reports itself connected
//! and calls [`Inbound::resubscribed`], so consumers catch up from history.
//!
//! Sharded pub/sub (`SSUBSCRIBE`, Redis Cluster) fits the same interface: a
//! topic maps to the connection of its slot; nothing outside this module
//! assumes there is only one connection.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::metrics::Metrics;
use crate::resp::{self, Value};

/// Commands queued to the task at most.
const COMMAND_QUEUE: usize = 4096;
/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Topics per SUBSCRIBE command when subscribing many at once.
const SUBSCRIBE_CHUNK: usize = 512;
/// Read buffer reserved per read.
const READ_CHUNK: usize = 64 * 1024;

/// A topic could not be subscribed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("pub/sub unavailable: {0}")]
pub struct PubSubError(String);

/// Receives what the subscriber connection reads. Called from the pub/sub
/// task: implementations must not block.
pub trait Inbound: Send + Sync + 'static {
    /// A message published on a subscribed topic.
    fn message(&self, topic: &[u8], payload: Bytes);
    /// The connection was lost and every topic is subscribed again: messages
    /// published in between were missed.
    fn resubscribed(&self);
}

/// Where Redis listens and how to log in, from `REDIS_URL`.
#[derive(Clone)]
pub struct Endpoint {
    address: Address,
    username: Option<String>,
    password: Option<String>,
    db: i64,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("address", &self.address)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .finish()
    }
}

#[derive(Debug, Clone)]
enum Address {
    Tcp(String, u16),
    /// `rediss://`: TLS, trusting the system's CAs plus `SSL_CERT_FILE` / `SSL_CERT_DIR`.
    Tls(String, u16, Arc<ClientConfig>),
    Unix(PathBuf),
}

impl Endpoint {
    /// The endpoint of a redis client's URL.
    pub fn of(client: &redis::Client) -> Result<Self, PubSubError> {
        let info = client.get_connection_info();
        let address = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => Address::Tcp(host.clone(), *port),
            redis::ConnectionAddr::Unix(path) => Address::Unix(path.clone()),
            redis::ConnectionAddr::TcpTls { insecure: true, .. } => {
                return Err(PubSubError(
                    "rediss:// with #insecure is not supported: make the server's CA trusted \
                     (SSL_CERT_FILE or SSL_CERT_DIR) instead"
                        .into(),
                ));
            }
            redis::ConnectionAddr::TcpTls { host, port, .. } => {
                Address::Tls(host.clone(), *port, tls_config()?)
            }
            other => {
                return Err(PubSubError(format!(
                    "unsupported Redis address {other}: use redis:// or redis+unix://"
                )));
            }
        };
        let settings = info.redis_settings();
        Ok(Self {
            address,
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
            db: settings.db(),
        })
    }
}

/// Timing of the subscriber connection.
#[derive(Debug, Clone, Copy)]
pub struct PubSubSettings {
    /// How long connecting, logging in and each confirmation may take.
    pub timeout: Duration,
    /// How often the connection is checked with a PING.
    pub ping_interval: Duration,
}

enum Command {
    Subscribe(Bytes, oneshot::Sender<Result<(), PubSubError>>),
    Unsubscribe(Bytes),
}

/// Handle to the subscriber task.
#[derive(Debug, Clone)]
pub struct PubSub {
    tx: mpsc::Sender<Command>,
    connected: Arc<AtomicBool>,
}

/// The subscriber task, built before it runs so its handle can be given to
/// the consumers that will receive its messages.
pub struct PubSubTask(Task);

impl PubSub {
    /// The handle and the task (start it with [`PubSubTask::spawn`]).
    pub fn new(
        endpoint: Endpoint,
        settings: PubSubSettings,
        metrics: Arc<Metrics>,
    ) -> (Self, PubSubTask) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let connected = Arc::new(AtomicBool::new(false));
        let task = Task {
            endpoint,
            settings,
            inbound: None,
            metrics,
            rx,
            wanted: HashSet::new(),
            connected: connected.clone(),
        };
        (Self { tx, connected }, PubSubTask(task))
    }

    /// Asks for `topic` to be subscribed, without waiting; the receiver
    /// resolves once Redis confirmed it, so every message published from then
    /// on reaches the [`Inbound`]. Commands keep their order, so a later
    /// [`PubSub::try_unsubscribe`] of the same topic applies after this.
    pub fn try_subscribe(
        &self,
        topic: Bytes,
    ) -> Result<oneshot::Receiver<Result<(), PubSubError>>, PubSubError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(Command::Subscribe(topic, reply))
            .map_err(|_| PubSubError("pub/sub command queue full or stopped".into()))?;
        Ok(answer)
    }

    /// Asks for `topic` to be unsubscribed, without waiting; false when the
    /// command queue is full (try again later).
    pub fn try_unsubscribe(&self, topic: Bytes) -> bool {
        self.tx.try_send(Command::Unsubscribe(topic)).is_ok()
    }

    /// Whether the connection is up with every wanted topic subscribed.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

impl PubSubTask {
    /// Runs the task, handing what it reads to `inbound`, until `shutdown`.
    pub fn spawn(mut self, inbound: Arc<dyn Inbound>, shutdown: CancellationToken) {
        self.0.inbound = Some(inbound);
        tokio::spawn(self.0.run(shutdown));
    }
}

struct Task {
    endpoint: Endpoint,
    settings: PubSubSettings,
    inbound: Option<Arc<dyn Inbound>>,
    metrics: Arc<Metrics>,
    rx: mpsc::Receiver<Command>,
    /// Topics subscribed (or being subscribed) on behalf of the delivery core.
    wanted: HashSet<Bytes>,
    connected: Arc<AtomicBool>,
}

/// Why a connection ended.
enum Ended {
    Shutdown,
    Lost(PubSubError),
}

impl Task {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut first = true;
        loop {
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                result = self.connect() => result,
            };
            let error = match result {
                Ok(connection) => {
                    backoff = Duration::from_millis(100);
                    self.connected.store(true, Ordering::Release);
                    tracing::info!(topics = self.wanted.len(), "pub/sub connected");
                    if !first && let Some(inbound) = &self.inbound {
                        inbound.resubscribed();
                    }
                    first = false;
                    let ended = self.serve(connection, &shutdown).await;
                    self.connected.store(false, Ordering::Release);
                    match ended {
                        Ended::Shutdown => return,
                        Ended::Lost(error) => error,
                    }
                }
                Err(error) => error,
            };
            self.metrics.redis_errors_total.inc();
            tracing::warn!(%error, ?backoff, "pub/sub connection down; reconnecting");
            if !self.wait_refusing(backoff, &error, &shutdown).await {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Waits `backoff`, answering requests meanwhile so subscribers get an
    /// error at once instead of hanging. Returns false on shutdown.
    async fn wait_refusing(
        &mut self,
        backoff: Duration,
        error: &PubSubError,
        shutdown: &CancellationToken,
    ) -> bool {
        let deadline = tokio::time::sleep(backoff);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => return true,
                () = shutdown.cancelled() => return false,
                command = self.rx.recv() => match command {
                    Some(Command::Subscribe(_, reply)) => {
                        let _ = reply.send(Err(error.clone()));
                    }
                    Some(Command::Unsubscribe(topic)) => {
                        self.wanted.remove(&topic);
                    }
                    None => return false,
                },
            }
        }
    }

    /// Connects, logs in and subscribes every wanted topic.
    async fn connect(&mut self) -> Result<Connection, PubSubError> {
        let timeout = self.settings.timeout;
        let stream = tokio::time::timeout(timeout, open(&self.endpoint.address))
            .await
            .map_err(|_| PubSubError("connect timed out".into()))?
            .map_err(|e| PubSubError(format!("connect: {e}")))?;
        let mut connection = Connection::new(stream);
        connection.log_in(&self.endpoint, timeout).await?;
        let topics: Vec<Bytes> = self.wanted.iter().cloned().collect();
        for chunk in topics.chunks(SUBSCRIBE_CHUNK) {
            connection.send(&command("SUBSCRIBE", chunk)).await?;
        }
        let mut confirmed = 0;
        let deadline = Instant::now() + timeout + timeout * (topics.len() / 10_000) as u32;
        while confirmed < topics.len() {
            match connection.read_until(deadline).await? {
                Reply::Subscribed(_) => confirmed += 1,
                Reply::Message(topic, payload) => self.inbound(&topic, payload),
                Reply::Other => {}
            }
        }
        self.metrics.topics.set(self.wanted.len() as i64);
        Ok(connection)
    }

    async fn serve(&mut self, mut connection: Connection, shutdown: &CancellationToken) -> Ended {
        let timeout = self.settings.timeout;
        let mut ping = tokio::time::interval(self.settings.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        // Subscribe confirmations awaited, per topic, and when the oldest is due.
        let mut waiting: HashMap<Bytes, Vec<oneshot::Sender<Result<(), PubSubError>>>> =
            HashMap::new();
        let mut due: Option<Instant> = None;
        let result: Result<(), PubSubError> = async {
            loop {
                let deadline = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep_until(deadline) => {
                        return Err(PubSubError("Redis did not confirm in time".into()));
                    }
                    _ = ping.tick() => {
                        connection.send(&command::<&[u8]>("PING", &[])).await?;
                        due.get_or_insert(Instant::now() + timeout);
                    }
                    command = self.rx.recv() => {
                        let Some(command) = command else { return Ok(()) };
                        let mut batch = vec![command];
                        while batch.len() < SUBSCRIBE_CHUNK {
                            match self.rx.try_recv() {
                                Ok(next) => batch.push(next),
                                Err(_) => break,
                            }
                        }
                        self.apply(batch, &mut connection, &mut waiting).await?;
                        if !waiting.is_empty() {
                            due.get_or_insert(Instant::now() + timeout);
                        }
                    }
                    read = connection.read() => match read? {
                        Reply::Message(topic, payload) => self.inbound(&topic, payload),
                        Reply::Subscribed(topic) => {
                            for reply in waiting.remove(&topic).unwrap_or_default() {
                                let _ = reply.send(Ok(()));
                            }
                            due = (!waiting.is_empty()).then(|| Instant::now() + timeout);
                        }
                        Reply::Other => {
                            // A pong (or an unsubscribe confirmation): the link is alive.
                            due = (!waiting.is_empty()).then(|| Instant::now() + timeout);
                        }
                    },
                }
            }
        }
        .await;
        let error = match result {
            Ok(()) => return Ended::Shutdown,
            Err(error) => error,
        };
        // A failed write (a PING to a Redis that just died) leaves unread what
        // it sent before dying: deliver it, it may not be in Redis any more.
        let until = Instant::now() + Duration::from_millis(200);
        while let Ok(Ok(reply)) = tokio::time::timeout_at(until, connection.read()).await {
            if let Reply::Message(topic, payload) = reply {
                self.inbound(&topic, payload);
            }
        }
        // The topics stay wanted (they are subscribed again after the reconnect),
        // but the callers still waiting hear that this attempt failed.
        for (topic, replies) in waiting {
            self.wanted.remove(&topic);
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
        self.metrics.topics.set(self.wanted.len() as i64);
        Ended::Lost(error)
    }

    fn inbound(&self, topic: &[u8], payload: Bytes) {
        if let Some(inbound) = &self.inbound {
            inbound.message(topic, payload);
        }
    }

    /// Applies a batch of commands with one SUBSCRIBE and one UNSUBSCRIBE.
    async fn apply(
        &mut self,
        batch: Vec<Command>,
        connection: &mut Connection,
        waiting: &mut HashMap<Bytes, Vec<oneshot::Sender<Result<(), PubSubError>>>>,
    ) -> Result<(), PubSubError> {
        let mut subscribe = Vec::new();
        let mut unsubscribe = Vec::new();
        for command in batch {
            match command {
                Command::Subscribe(topic, reply) => {
                    self.wanted.insert(topic.clone());
                    unsubscribe.retain(|t| t != &topic);
                    waiting.entry(topic.clone()).or_default().push(reply);
                    subscribe.push(topic);
                }
                Command::Unsubscribe(topic) => {
                    self.wanted.remove(&topic);
                    subscribe.retain(|t| t != &topic);
                    for reply in waiting.remove(&topic).unwrap_or_default() {
                        let _ = reply.send(Err(PubSubError("released before confirmed".into())));
                    }
                    unsubscribe.push(topic);
                }
            }
        }
        if !subscribe.is_empty() {
            connection.send(&command("SUBSCRIBE", &subscribe)).await?;
        }
        if !unsubscribe.is_empty() {
            connection
                .send(&command("UNSUBSCRIBE", &unsubscribe))
                .await?;
        }
        self.metrics.topics.set(self.wanted.len() as i64);
        Ok(())
    }
}

/// A TLS client configuration trusting the system's CAs (and, as OpenSSL
/// does, `SSL_CERT_FILE` and `SSL_CERT_DIR`), like the gateway's command connection.
fn tls_config() -> Result<Arc<ClientConfig>, PubSubError> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), ToString::to_string);
        return Err(PubSubError(format!(
            "no CA certificates to verify Redis with: {why}"
        )));
    }
    let mut roots = RootCertStore::empty();
    for cert in found.certs {
        roots
            .add(cert)
            .map_err(|e| PubSubError(format!("invalid CA certificate: {e}")))?;
    }
    Ok(Arc::new(
        ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

async fn open(address: &Address) -> std::io::Result<Pin<Box<dyn Stream>>> {
    Ok(match address {
        Address::Tcp(host, port) => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            Box::pin(stream)
        }
        Address::Tls(host, port, config) => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            let name = ServerName::try_from(host.clone())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            Box::pin(connector.connect(name, stream).await?)
        }
        Address::Unix(path) => Box::pin(tokio::net::UnixStream::connect(path).await?),
    })
}

fn command<A: AsRef<[u8]>>(name: &str, args: &[A]) -> BytesMut {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(args.len() + 1);
    parts.push(name.as_bytes());
    parts.extend(args.iter().map(AsRef::as_ref));
    let mut out = BytesMut::new();
    resp::encode_command(&mut out, &parts);
    out
}

/// What a subscribed connection can read.
enum Reply {
    Message(Bytes, Bytes),
    Subscribed(Bytes),
    Other,
}

struct Connection {
    stream: Pin<Box<dyn Stream>>,
    buffer: BytesMut,
}

impl Connection {
    fn new(stream: Pin<Box<dyn Stream>>) -> Self {
        Self {
            stream,
            buffer: BytesMut::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), PubSubError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| PubSubError(format!("write: {e}")))
    }

    async fn log_in(&mut self, endpoint: &Endpoint, timeout: Duration) -> Result<(), PubSubError> {
        let deadline = Instant::now() + timeout;
        if let Some(password) = &endpoint.password {
            let auth = match &endpoint.username {
                Some(user) => command("AUTH", &[user.as_bytes(), password.as_bytes()]),
                None => command("AUTH", &[password.as_bytes()]),
            };
            self.send(&auth).await?;
            self.expect_ok(deadline, "AUTH").await?;
        }
        if endpoint.db != 0 {
            self.send(&command("SELECT", &[endpoint.db.to_string()]))
                .await?;
            self.expect_ok(deadline, "SELECT").await?;
        }
        Ok(())
    }

    async fn expect_ok(&mut self, deadline: Instant, what: &str) -> Result<(), PubSubError> {
        match self.read_value_until(deadline).await? {
            Value::Simple(_) => Ok(()),
            Value::Error(e) => Err(PubSubError(format!(
                "{what} refused: {}",
                String::from_utf8_lossy(&e)
            ))),
            other => Err(PubSubError(format!("unexpected {what} reply {other:?}"))),
        }
    }

    async fn read_until(&mut self, deadline: Instant) -> Result<Reply, PubSubError> {
        let value = self.read_value_until(deadline).await?;
        classify(value)
    }

    async fn read_value_until(&mut self, deadline: Instant) -> Result<Value, PubSubError> {
        tokio::time::timeout_at(deadline, self.read_value())
            .await
            .map_err(|_| PubSubError("Redis did not answer in time".into()))?
    }

    /// The next reply; cancel-safe (bytes read stay in the buffer).
    async fn read(&mut self) -> Result<Reply, PubSubError> {
        let value = self.read_value().await?;
        classify(value)
    }

    async fn read_value(&mut self) -> Result<Value, PubSubError> {
        loop {
            if let Some(value) =
                resp::parse(&mut self.buffer).map_err(|e| PubSubError(e.to_string()))?
            {
                return Ok(value);
            }
            self.buffer.reserve(READ_CHUNK);
            let read = self
                .stream
                .read_buf(&mut self.buffer)
                .await
                .map_err(|e| PubSubError(format!("read: {e}")))?;
            if read == 0 {
                return Err(PubSubError("connection closed by Redis".into()));
            }
        }
    }
}

/// Sorts a reply of subscribe mode.
fn classify(value: Value) -> Result<Reply, PubSubError> {
    let Value::Array(Some(items)) = value else {
        return match value {
            Value::Error(e) => Err(PubSubError(format!(
                "Redis error: {}",
                String::from_utf8_lossy(&e)
            ))),
            _ => Ok(Reply::Other),
        };
    };
    let mut items = items.into_iter();
    let kind = items.next();
    let kind = kind.as_ref().and_then(Value::as_bytes).map(|b| &b[..]);
    match kind {
        Some(b"message") => match (items.next(), items.next()) {
            (Some(Value::Bulk(Some(topic))), Some(Value::Bulk(Some(payload)))) => {
                Ok(Reply::Message(topic, payload))
            }
            _ => Err(PubSubError("malformed message reply".into())),
        },
        Some(b"subscribe") => match items.next() {
            Some(Value::Bulk(Some(topic))) => Ok(Reply::Subscribed(topic)),
            _ => Err(PubSubError("malformed subscribe reply".into())),
        },
        _ => Ok(Reply::Other),
    }
}
