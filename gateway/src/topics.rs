//! The gateway's one Redis pub/sub connection.
//!
//! A single task owns it: it counts how many local users each topic has,
//! subscribes a topic when its first local user arrives and unsubscribes after
//! the last leaves (so no gateway receives traffic it cannot deliver), reads
//! messages and hands them to the [`Hub`] in arrival order. Pending commands
//! are batched into one SUBSCRIBE/UNSUBSCRIBE. When the connection drops it
//! reconnects with backoff, subscribes every topic still wanted, and asks the
//! hub to deliver what was missed in between.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::metrics::Metrics;

/// Commands queued to the pub/sub task at most.
const COMMAND_QUEUE: usize = 4096;
/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The topic could not be subscribed (Redis unreachable).
#[derive(Debug, thiserror::Error)]
#[error("pub/sub unavailable: {0}")]
pub struct TopicError(String);

enum Command {
    Acquire(String, oneshot::Sender<Result<(), TopicError>>),
    Release(String),
}

/// Handle to the pub/sub task.
#[derive(Debug, Clone)]
pub struct Topics {
    tx: mpsc::Sender<Command>,
    connected: Arc<AtomicBool>,
}

impl Topics {
    /// Starts the pub/sub task; it ends when `shutdown` is cancelled.
    pub fn start(
        client: redis::Client,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        timeout: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let connected = Arc::new(AtomicBool::new(false));
        let task = Task {
            client,
            hub,
            metrics,
            timeout,
            rx,
            wanted: HashMap::new(),
            connected: connected.clone(),
        };
        tokio::spawn(task.run(shutdown));
        Self { tx, connected }
    }

    /// Counts one more local user of `topic`; returns once the gateway is
    /// subscribed to it.
    pub async fn acquire(&self, topic: String) -> Result<(), TopicError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Acquire(topic, reply))
            .await
            .map_err(|_| TopicError("pub/sub task stopped".into()))?;
        answer
            .await
            .map_err(|_| TopicError("pub/sub task stopped".into()))?
    }

    /// Counts one local user of `topic` less.
    pub async fn release(&self, topic: String) {
        let _ = self.tx.send(Command::Release(topic)).await;
    }

    /// Whether the pub/sub connection is up.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }
}

struct Task {
    client: redis::Client,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    timeout: Duration,
    rx: mpsc::Receiver<Command>,
    wanted: HashMap<String, usize>,
    connected: Arc<AtomicBool>,
}

impl Task {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.connect().await {
                Ok((sink, stream)) => {
                    backoff = Duration::from_millis(100);
                    self.connected.store(true, Ordering::Release);
                    tracing::info!(topics = self.wanted.len(), "pub/sub connected");
                    self.hub.resync().await;
                    self.serve(sink, stream, &shutdown).await;
                    self.connected.store(false, Ordering::Release);
                    if !shutdown.is_cancelled() {
                        self.metrics.redis_errors_total.inc();
                        tracing::warn!("pub/sub connection lost; reconnecting");
                    }
                }
                Err(error) => {
                    self.metrics.redis_errors_total.inc();
                    tracing::warn!(%error, ?backoff, "pub/sub connect failed");
                    // Answer requests while down so subscribers get `unavailable`, not a hang.
                    let deadline = tokio::time::sleep(backoff);
                    tokio::pin!(deadline);
                    loop {
                        tokio::select! {
                            () = &mut deadline => break,
                            () = shutdown.cancelled() => return,
                            command = self.rx.recv() => match command {
                                Some(command) => self.refuse(command, &error),
                                None => return,
                            },
                        }
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn refuse(&mut self, command: Command, error: &TopicError) {
        match command {
            Command::Acquire(_, reply) => {
                let _ = reply.send(Err(TopicError(error.0.clone())));
            }
            Command::Release(topic) => self.release(&topic),
        }
    }

    fn release(&mut self, topic: &str) {
        if let Some(count) = self.wanted.get_mut(topic) {
            *count -= 1;
            if *count == 0 {
                self.wanted.remove(topic);
            }
        }
    }

    async fn connect(&mut self) -> Result<(PubSubSink, PubSubStream), TopicError> {
        let pubsub = tokio::time::timeout(self.timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| TopicError("connect timed out".into()))?
            .map_err(|e| TopicError(e.to_string()))?;
        let (mut sink, stream) = pubsub.split();
        let topics: Vec<&String> = self.wanted.keys().collect();
        if !topics.is_empty() {
            sink.subscribe(topics)
                .await
                .map_err(|e| TopicError(e.to_string()))?;
        }
        self.metrics.topics.set(self.wanted.len() as i64);
        Ok((sink, stream))
    }

    async fn serve(
        &mut self,
        mut sink: PubSubSink,
        mut stream: PubSubStream,
        shutdown: &CancellationToken,
    ) {
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                command = self.rx.recv() => {
                    let Some(command) = command else { return };
                    if let Err(error) = self.apply(command, &mut sink).await {
                        tracing::warn!(%error, "pub/sub command failed");
                        return;
                    }
                }
                message = stream.next() => {
                    let Some(message) = message else { return };
                    self.hub.dispatch(message.get_channel_name(), message.get_payload_bytes()).await;
                }
            }
        }
    }

    /// Applies `first` and every command already queued behind it with one
    /// SUBSCRIBE and one UNSUBSCRIBE.
    async fn apply(&mut self, first: Command, sink: &mut PubSubSink) -> Result<(), TopicError> {
        let mut before: HashMap<String, bool> = HashMap::new();
        let mut replies = Vec::new();
        let mut acquired = Vec::new();
        let mut next = Some(first);
        while let Some(command) = next {
            match command {
                Command::Acquire(topic, reply) => {
                    before
                        .entry(topic.clone())
                        .or_insert_with(|| self.wanted.contains_key(&topic));
                    *self.wanted.entry(topic.clone()).or_default() += 1;
                    acquired.push(topic);
                    replies.push(reply);
                }
                Command::Release(topic) => {
                    before
                        .entry(topic.clone())
                        .or_insert_with(|| self.wanted.contains_key(&topic));
                    self.release(&topic);
                }
            }
            next = self.rx.try_recv().ok();
        }
        let (mut subscribe, mut unsubscribe) = (Vec::new(), Vec::new());
        for (topic, was) in before {
            match (was, self.wanted.contains_key(&topic)) {
                (false, true) => subscribe.push(topic),
                (true, false) => unsubscribe.push(topic),
                _ => {}
            }
        }
        let result = async {
            if !subscribe.is_empty() {
                sink.subscribe(&subscribe).await?;
            }
            if !unsubscribe.is_empty() {
                sink.unsubscribe(&unsubscribe).await?;
            }
            Ok::<_, redis::RedisError>(())
        };
        let result = tokio::time::timeout(self.timeout, result)
            .await
            .map_err(|_| TopicError("subscribe timed out".into()))
            .and_then(|r| r.map_err(|e| TopicError(e.to_string())));
        if result.is_err() {
            // Callers that get an error hold nothing: undo their counts.
            for topic in &acquired {
                self.release(topic);
            }
        }
        self.metrics.topics.set(self.wanted.len() as i64);
        for reply in replies {
            let _ = reply.send(
                result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| TopicError(e.0.clone())),
            );
        }
        result
    }
}
