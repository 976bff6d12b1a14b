//! The worker's life: start, persist batch after batch, drain on shutdown,
//! stop at once on a bug.
//!
//! The pipeline: a [`Reader`] task fills the next batch while writers commit
//! the current ones (a queue of one batch between them), `WRITERS` writer
//! tasks each commit a batch on their own PostgreSQL connection, and the acker
//! acknowledges committed batches (a queue of `WRITERS`). Beside it run the
//! heartbeat (keeps held entries ours), the prober (readiness, lag gauges) and
//! the admin server.
//!
//! [`run`] supervises every task. On shutdown the pipeline drains: the reader
//! stops reading, the batches already read are written and acknowledged, for
//! at most `DRAIN_TIMEOUT`. When any task panics (a bug) or the admin server
//! fails, everything stops at once and [`run`] returns an error, so the process
//! exits non-zero and its pod restarts; what it held stays pending and is
//! delivered again (and counted, see [`crate::reader`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::acker::Acker;
use crate::admin::{self, AdminState, Health};
use crate::batch::Batch;
use crate::config::{Config, redact_url};
use crate::error::{Error, Result};
use crate::heartbeat::keep_claimed;
use crate::in_flight::InFlight;
use crate::metrics::Metrics;
use crate::probe::probe;
use crate::reader::{MAX_BLOCK, Reader};
use crate::retry::{Backend, Retry};
use crate::store::Store;
use crate::streams::{self, Streams};
use crate::writer::{Committed, Queued, Writer};

/// Runs the worker until `shutdown` completes, serving the admin endpoints on
/// `admin`; then finishes the batches already read (for at most
/// `DRAIN_TIMEOUT`) and returns. Returns an error at once when a task panics.
pub async fn run(
    config: Config,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    tracing::info!(
        worker_id = %config.worker_id,
        redis = %redact_url(&config.redis_url),
        database = %redact_url(&config.database_url),
        shards = config.stream_shards,
        batch_size = config.batch_size,
        batch_timeout = ?config.batch_timeout,
        claim_idle = ?config.claim_idle,
        write_mode = ?config.write_mode,
        writers = config.writers,
        max_deliveries = config.max_deliveries,
        dead_letter_maxlen = config.dead_letter_maxlen,
        "starting worker"
    );
    let mut registry = Registry::default();
    let shared = Shared {
        metrics: Metrics::register(&mut registry),
        health: Arc::new(Health::default()),
        store: Store::connect_lazy(&config.database_url, config.write_mode, config.writers)?,
        streams: Streams::new(
            streams::connect(&config.redis_url, Duration::from_secs(5))?,
            config.stream_shards,
            &config.worker_id,
        ),
    };
    let read_conn = streams::connect(&config.redis_url, MAX_BLOCK + Duration::from_secs(5))?;
    let tokens = Tokens::default();
    tokio::spawn({
        let stop = tokens.stop.clone();
        async move {
            shutdown.await;
            tracing::info!("shutdown requested: finishing the batches already read");
            stop.cancel();
        }
    });
    // Cancelled `DRAIN_TIMEOUT` after `stop`: batches still unfinished are left
    // pending for another worker to claim.
    let drain_timer = tokio::spawn({
        let (stop, abandon, drain) = (
            tokens.stop.clone(),
            tokens.abandon.clone(),
            config.drain_timeout,
        );
        async move {
            stop.cancelled().await;
            tokio::time::sleep(drain).await;
            abandon.cancel();
        }
    });

    let mut background = Tasks::default();
    let admin_addr = admin.local_addr().map_err(Error::Serve)?;
    let state = AdminState {
        health: shared.health.clone(),
        registry: Arc::new(registry),
    };
    let quit = tokens.background.clone();
    background.spawn("admin server", async move {
        axum::serve(admin, admin::app(state))
            .with_graceful_shutdown(quit.cancelled_owned())
            .await
            .map_err(Error::Serve)
    });
    tracing::info!(addr = %admin_addr, "admin server listening");
    let prober = probe(
        shared.store.clone(),
        shared.streams.clone(),
        shared.metrics.clone(),
        shared.health.clone(),
        tokens.background.clone(),
    );
    background.spawn("prober", async move {
        prober.await;
        Ok(())
    });

    let mut failure = None;
    if prepare(&shared, &tokens.stop).await {
        let reader = Streams::new(read_conn, config.stream_shards, &config.worker_id);
        let mut pipeline = start_pipeline(&config, &shared, reader, &tokens, &mut background);
        failure = supervise(&mut pipeline, &mut background, &tokens).await;
    }
    tokens.done.cancel();
    tokens.background.cancel();
    while let Some(outcome) = background.next().await {
        if let Err(error) = outcome {
            failure.get_or_insert(error);
        }
    }
    drain_timer.abort();
    match failure {
        None => {
            tracing::info!("worker stopped");
            Ok(())
        }
        Some(error) => {
            tracing::error!(%error, "worker stopped on a failure");
            Err(error)
        }
    }
}

/// Handles every task shares.
struct Shared {
    metrics: Metrics,
    health: Arc<Health>,
    store: Store,
    streams: Streams,
}

/// How tasks are told to end.
#[derive(Default)]
struct Tokens {
    /// Stop reading (shutdown, or a failure).
    stop: CancellationToken,
    /// Stop retrying: the drain time is over, or a failure.
    abandon: CancellationToken,
    /// Every batch is acknowledged or abandoned: the heartbeat ends.
    done: CancellationToken,
    /// The pipeline is over: the prober and admin server end.
    background: CancellationToken,
}

/// Runs the migrations and creates the consumer groups, retrying until they
/// succeed; `false` when shut down first.
async fn prepare(shared: &Shared, stop: &CancellationToken) -> bool {
    let postgres = Retry {
        backend: Backend::Postgres,
        metrics: &shared.metrics,
        health: &shared.health,
        cancel: stop,
        interrupt: true,
    };
    if postgres
        .until_ok("running migrations", || shared.store.migrate())
        .await
        .is_err()
    {
        return false;
    }
    shared.health.set_migrated();
    tracing::info!("schema migrations applied");
    let redis = Retry {
        backend: Backend::Redis,
        ..postgres
    };
    redis
        .until_ok("creating consumer groups", || {
            let mut streams = shared.streams.clone();
            async move { streams.ensure_groups().await }
        })
        .await
        .is_ok()
}

/// Spawns the reader, the writers and the acker (into the returned set) and
/// the heartbeat (into `background`).
fn start_pipeline(
    config: &Config,
    shared: &Shared,
    reader: Streams,
    tokens: &Tokens,
    background: &mut Tasks,
) -> Tasks {
    let mut pipeline = Tasks::default();
    let in_flight = Arc::new(InFlight::default());
    let heartbeat = keep_claimed(
        shared.streams.clone(),
        in_flight.clone(),
        config.claim_idle / 3,
        tokens.done.clone(),
    );
    background.spawn("heartbeat", async move {
        heartbeat.await;
        Ok(())
    });
    let writers = config.writers.max(1);
    let (tx, rx) = mpsc::channel::<Queued>(1);
    let reader = Reader::new(
        reader,
        config,
        in_flight.clone(),
        shared.metrics.clone(),
        shared.health.clone(),
    );
    let reading = read_batches(
        reader,
        tx,
        config.max_deliveries,
        tokens.stop.clone(),
        tokens.abandon.clone(),
    );
    pipeline.spawn("reader", async move {
        reading.await;
        Ok(())
    });
    // Writers take the next batch when free; the acker acknowledges committed
    // batches in the background, so no writer waits for Redis.
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let (ack_tx, ack_rx) = mpsc::channel::<Committed>(writers);
    for _ in 0..writers {
        let writer = Writer {
            store: shared.store.clone(),
            metrics: shared.metrics.clone(),
            health: shared.health.clone(),
            abandon: tokens.abandon.clone(),
            hooks: config.hooks.clone(),
        };
        let writing = writer.run(rx.clone(), ack_tx.clone());
        pipeline.spawn("writer", async move {
            writing.await;
            Ok(())
        });
    }
    let acker = Acker {
        streams: shared.streams.clone(),
        metrics: shared.metrics.clone(),
        health: shared.health.clone(),
        abandon: tokens.abandon.clone(),
        in_flight,
        dead_max_len: config.dead_letter_maxlen,
    };
    pipeline.spawn("acker", async move {
        acker.run(ack_rx).await;
        Ok(())
    });
    pipeline
}

/// Waits for the pipeline to end; a failure of any task stops everything at
/// once (no drain) and is returned.
async fn supervise(pipeline: &mut Tasks, background: &mut Tasks, tokens: &Tokens) -> Option<Error> {
    let mut failure = None;
    while !pipeline.is_empty() {
        let outcome = tokio::select! {
            Some(outcome) = pipeline.next() => outcome,
            Some(outcome) = background.next(), if !background.is_empty() => outcome,
        };
        if let Err(error) = outcome {
            tracing::error!(%error, "stopping the worker");
            failure.get_or_insert(error);
            tokens.stop.cancel();
            tokens.abandon.cancel();
        }
    }
    failure
}

/// The reader task: builds batches until stopped; decoding happens here so it
/// overlaps with the writers' transactions.
async fn read_batches(
    mut reader: Reader,
    tx: mpsc::Sender<Queued>,
    max_deliveries: u64,
    stop: CancellationToken,
    abandon: CancellationToken,
) {
    while let Some(raw) = reader.next_batch(&stop).await {
        let queued = (Instant::now(), Batch::build(raw, max_deliveries));
        tokio::select! {
            sent = tx.send(queued) => if sent.is_err() { break },
            () = abandon.cancelled() => break,
        }
    }
}

/// Named tasks whose panics become [`Error::TaskPanicked`].
#[derive(Default)]
struct Tasks {
    set: JoinSet<Result<()>>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl Tasks {
    fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = Result<()>> + Send + 'static,
    ) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// The outcome of the next task to end; `None` when none is left.
    async fn next(&mut self) -> Option<Result<()>> {
        let joined = self.set.join_next_with_id().await?;
        Some(match joined {
            Ok((_, outcome)) => outcome,
            Err(error) => {
                let task = self.names.get(&error.id()).copied().unwrap_or("unnamed");
                if error.is_panic() {
                    Err(Error::TaskPanicked { task })
                } else {
                    Ok(())
                }
            }
        })
    }
}
