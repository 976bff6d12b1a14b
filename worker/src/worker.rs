//! The worker's life: start, persist batch after batch, drain on shutdown.
//!
//! Three concurrent parts share one bounded queue of one batch:
//! the [`Reader`] fills the next batch while the writer commits the current
//! one, so Redis and PostgreSQL round trips overlap. The writer commits a batch
//! in one transaction, and only then writes its dead letters and acknowledges
//! and deletes its entries. A failing backend is retried with backoff while the
//! batch is kept; a heartbeat re-claims entries held longer than a third of
//! `CLAIM_IDLE`, so no live worker's entries are claimed by another.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState, Health};
use crate::backoff::Backoff;
use crate::batch::{self, Batch, DeadLetter, Rows};
use crate::config::{Config, redact_url};
use crate::error::{Error, Result};
use crate::metrics::{Metrics, ShardLabel};
use crate::reader::{InFlight, MAX_BLOCK, Reader};
use crate::store::{self, Store};
use crate::streams::{self, Streams};

/// How often readiness and stream lag are refreshed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait for one probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a batch was not finished.
#[derive(Debug)]
struct Abandoned;

/// Runs the worker until `shutdown` completes, serving the admin endpoints on
/// `admin`; then finishes the batches already read (for at most
/// `DRAIN_TIMEOUT`) and returns.
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
        "starting worker"
    );
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let health = Arc::new(Health::default());
    let store = Store::connect_lazy(&config.database_url, config.write_mode, config.writers)?;
    let read_conn = streams::connect(&config.redis_url, MAX_BLOCK + Duration::from_secs(5))?;
    let conn = streams::connect(&config.redis_url, Duration::from_secs(5))?;
    let mut streams = Streams::new(conn, config.stream_shards, &config.worker_id);

    let stop = CancellationToken::new();
    let background = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            tracing::info!("shutdown requested: finishing the batches already read");
            stop.cancel();
        }
    });
    // Cancelled `DRAIN_TIMEOUT` after `stop`: batches still unfinished are left
    // pending for another worker to claim.
    let abandon = CancellationToken::new();
    let drain_timer = tokio::spawn({
        let (stop, abandon, drain) = (stop.clone(), abandon.clone(), config.drain_timeout);
        async move {
            stop.cancelled().await;
            tokio::time::sleep(drain).await;
            abandon.cancel();
        }
    });

    let admin_addr = admin.local_addr().map_err(Error::Serve)?;
    let state = AdminState {
        health: health.clone(),
        registry: Arc::new(registry),
    };
    let server = tokio::spawn({
        let background = background.clone();
        async move {
            axum::serve(admin, admin::app(state))
                .with_graceful_shutdown(background.cancelled_owned())
                .await
        }
    });
    tracing::info!(addr = %admin_addr, "admin server listening");
    let prober = tokio::spawn(probe(
        store.clone(),
        streams.clone(),
        metrics.clone(),
        health.clone(),
        background.clone(),
    ));

    let outcome = persist_all(
        &config,
        store,
        &mut streams,
        read_conn,
        metrics,
        health,
        &stop,
        &abandon,
    )
    .await;

    drain_timer.abort();
    background.cancel();
    let _ = prober.await;
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::Serve(e)),
        Err(e) => tracing::error!(error = %e, "admin server task failed"),
    }
    tracing::info!("worker stopped");
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn persist_all(
    config: &Config,
    store: Store,
    streams: &mut Streams,
    read_conn: redis::aio::ConnectionManager,
    metrics: Metrics,
    health: Arc<Health>,
    stop: &CancellationToken,
    abandon: &CancellationToken,
) -> Result<()> {
    if retry("running migrations", "postgres", &metrics, stop, || {
        store.migrate()
    })
    .await
    .is_err()
    {
        return Ok(());
    }
    health.set_migrated();
    health.set_postgres(true);
    tracing::info!("schema migrations applied");
    if retry("creating consumer groups", "redis", &metrics, stop, || {
        let mut streams = streams.clone();
        async move { streams.ensure_groups().await }
    })
    .await
    .is_err()
    {
        return Ok(());
    }

    let in_flight = Arc::new(InFlight::default());
    // Ends once every batch is acknowledged (or abandoned).
    let done = CancellationToken::new();
    let heartbeat = tokio::spawn(keep_claimed(
        streams.clone(),
        in_flight.clone(),
        config.claim_idle / 3,
        done.clone(),
    ));
    let writers = config.writers.max(1);
    let (tx, rx) = mpsc::channel::<(Instant, Batch)>(1);
    let reader = Reader::new(
        Streams::new(read_conn, config.stream_shards, &config.worker_id),
        config,
        in_flight.clone(),
        metrics.clone(),
        health.clone(),
    );
    let reading = tokio::spawn(read_batches(reader, tx, stop.clone()));
    // Writers take the next batch when free; the acker acknowledges committed
    // batches in the background, so no writer waits for Redis.
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let (ack_tx, ack_rx) = mpsc::channel::<Committed>(writers);
    let mut tasks = Vec::with_capacity(writers);
    for _ in 0..writers {
        let writer = Writer {
            store: store.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            abandon: abandon.clone(),
        };
        tasks.push(tokio::spawn(writer.run(rx.clone(), ack_tx.clone())));
    }
    drop(ack_tx);
    let acker = Acker {
        streams: streams.clone(),
        metrics,
        health,
        abandon: abandon.clone(),
        in_flight,
    };
    let acking = tokio::spawn(acker.run(ack_rx));
    for task in tasks {
        let _ = task.await;
    }
    drop(rx);
    let _ = acking.await;
    let _ = reading.await;
    done.cancel();
    let _ = heartbeat.await;
    Ok(())
}

/// The reader task: builds batches until stopped; decoding happens here so it
/// overlaps with the writer's transaction.
async fn read_batches(
    mut reader: Reader,
    tx: mpsc::Sender<(Instant, Batch)>,
    stop: CancellationToken,
) {
    while let Some(raw) = reader.next_batch(&stop).await {
        let started = Instant::now();
        if tx.send((started, Batch::build(raw))).await.is_err() {
            break;
        }
    }
}

/// Retries `op` with backoff until it succeeds; `Err` when stopped first.
async fn retry<F, Fut>(
    what: &str,
    backend: &'static str,
    metrics: &Metrics,
    stop: &CancellationToken,
    mut op: F,
) -> Result<(), Abandoned>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut backoff = Backoff::default();
    loop {
        match op().await {
            Ok(()) => return Ok(()),
            Err(error) => {
                metrics.failed(backend);
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in = ?delay, "{what} failed");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => return Err(Abandoned),
                }
            }
        }
    }
}

/// Re-claims entries in flight for a long time, so that while a write is
/// retried no other worker takes them over.
async fn keep_claimed(
    mut streams: Streams,
    in_flight: Arc<InFlight>,
    every: Duration,
    done: CancellationToken,
) {
    let every = every.max(Duration::from_millis(50));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = done.cancelled() => return,
        }
        let held = in_flight.older_than(every);
        if held.is_empty() {
            continue;
        }
        let batch = Batch {
            entries: held
                .into_iter()
                .map(|key| crate::reply::RawEntry {
                    shard: key.shard,
                    id: key.id(),
                    fields: None,
                })
                .collect(),
            ..Batch::default()
        };
        match streams.keep_claimed(&batch, every / 2).await {
            Ok(()) => tracing::debug!(entries = batch.len(), "re-claimed entries still in flight"),
            Err(error) => tracing::warn!(%error, "re-claiming entries in flight failed"),
        }
    }
}

/// Refreshes readiness and the lag gauges.
async fn probe(
    store: Store,
    mut streams: Streams,
    metrics: Metrics,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(PROBE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        let pg = tokio::time::timeout(PROBE_TIMEOUT, store.ping()).await;
        let pg_up = matches!(pg, Ok(Ok(())));
        health.set_postgres(pg_up);
        if pg_up {
            metrics.answered("postgres");
        } else {
            metrics
                .up
                .get_or_create(&crate::metrics::BackendLabel {
                    backend: "postgres",
                })
                .set(0);
        }
        let lag = tokio::time::timeout(PROBE_TIMEOUT, streams.lag()).await;
        match lag {
            Ok(Ok(shards)) => {
                health.set_redis(true);
                metrics.answered("redis");
                for (shard, lag) in shards.iter().enumerate() {
                    let label = ShardLabel {
                        shard: shard as u32,
                    };
                    metrics.stream_lag.get_or_create(&label).set(lag.lag as i64);
                    metrics
                        .stream_pending
                        .get_or_create(&label)
                        .set(lag.pending as i64);
                }
            }
            Ok(Err(error)) => {
                // An error reply (e.g. the streams are being recreated after
                // Redis lost its data) still means Redis answers.
                tracing::debug!(%error, "reading stream lag failed");
                let up = matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, streams.ping()).await,
                    Ok(Ok(()))
                );
                health.set_redis(up);
            }
            Err(_) => {
                health.set_redis(false);
                metrics
                    .up
                    .get_or_create(&crate::metrics::BackendLabel { backend: "redis" })
                    .set(0);
            }
        }
    }
}

/// A batch whose rows are committed, waiting for its acknowledgement.
struct Committed {
    batch: Batch,
    started: Instant,
    write_time: Duration,
}

/// Commits batches to PostgreSQL.
struct Writer {
    store: Store,
    metrics: Metrics,
    health: Arc<Health>,
    abandon: CancellationToken,
}

/// The queue of batches shared by the writers.
type Batches = Arc<tokio::sync::Mutex<mpsc::Receiver<(Instant, Batch)>>>;

impl Writer {
    /// Writes batches until the reader is done (or the drain time is over),
    /// passing each committed batch to the acker.
    async fn run(mut self, batches: Batches, committed: mpsc::Sender<Committed>) {
        loop {
            let next = batches.lock().await.recv().await;
            let Some((started, mut batch)) = next else {
                return;
            };
            let writing = Instant::now();
            if let Err(Abandoned) = self.persist(&mut batch).await {
                tracing::warn!(
                    entries = batch.len(),
                    "drain timeout: leaving the batch pending for another worker"
                );
                return;
            }
            let write_time = writing.elapsed();
            if committed
                .send(Committed {
                    batch,
                    started,
                    write_time,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Writes the batch's rows, retrying until it succeeds or the drain time is over.
    async fn persist(&mut self, batch: &mut Batch) -> Result<(), Abandoned> {
        if !batch.rows.is_empty() {
            let rows = std::mem::take(&mut batch.rows);
            self.write(batch, &rows).await?;
            batch.rows = rows;
            if let Some(oldest) = batch.oldest_ms {
                let now = chrono::Utc::now().timestamp_millis();
                self.metrics
                    .persistence_lag
                    .observe((now - oldest).max(0) as f64 / 1000.0);
            }
        }
        Ok(())
    }

    async fn pause(&self, delay: Duration) -> Result<(), Abandoned> {
        tokio::select! {
            () = tokio::time::sleep(delay) => Ok(()),
            () = self.abandon.cancelled() => Err(Abandoned),
        }
    }

    /// Commits `rows`; a data error PostgreSQL will never accept is isolated
    /// entry by entry and turns those entries into dead letters.
    async fn write(&mut self, batch: &mut Batch, rows: &Rows) -> Result<(), Abandoned> {
        let mut backoff = Backoff::default();
        loop {
            let attempt = tokio::select! {
                result = self.store.write(rows) => result,
                () = self.abandon.cancelled() => return Err(Abandoned),
            };
            match attempt {
                Ok(written) => {
                    self.health.set_postgres(true);
                    self.metrics.answered("postgres");
                    self.metrics.written(&written);
                    return Ok(());
                }
                Err(error) if store::is_permanent(&error) => {
                    tracing::warn!(%error, "PostgreSQL rejected the batch's data: writing its entries one by one");
                    return self.write_one_by_one(batch).await;
                }
                Err(error) => {
                    self.health.set_postgres(false);
                    self.metrics.failed("postgres");
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, entries = batch.len(), "writing a batch to PostgreSQL failed; keeping it");
                    self.pause(delay).await?;
                }
            }
        }
    }

    async fn write_one_by_one(&mut self, batch: &mut Batch) -> Result<(), Abandoned> {
        for index in 0..batch.entries.len() {
            if batch.dead.iter().any(|d| d.entry == index) {
                continue;
            }
            let Ok(Some(row)) = batch::decode(&batch.entries[index]) else {
                continue;
            };
            let rows = Rows::single(row);
            let mut backoff = Backoff::default();
            loop {
                let attempt = tokio::select! {
                    result = self.store.write(&rows) => result,
                    () = self.abandon.cancelled() => return Err(Abandoned),
                };
                match attempt {
                    Ok(written) => {
                        self.metrics.written(&written);
                        break;
                    }
                    Err(error) if store::is_permanent(&error) => {
                        batch.dead.push(DeadLetter {
                            entry: index,
                            reason: format!("rejected by PostgreSQL: {error}"),
                        });
                        break;
                    }
                    Err(error) => {
                        self.metrics.failed("postgres");
                        let delay = backoff.next_delay();
                        tracing::warn!(%error, retry_in = ?delay, "writing an entry to PostgreSQL failed");
                        self.pause(delay).await?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Acknowledges committed batches: dead letters, `XACK`, `XDEL`.
struct Acker {
    streams: Streams,
    metrics: Metrics,
    health: Arc<Health>,
    abandon: CancellationToken,
    in_flight: Arc<InFlight>,
}

impl Acker {
    async fn run(mut self, mut committed: mpsc::Receiver<Committed>) {
        while let Some(Committed {
            batch,
            started,
            write_time,
        }) = committed.recv().await
        {
            for dead in &batch.dead {
                let entry = &batch.entries[dead.entry];
                tracing::warn!(
                    shard = entry.shard,
                    id = %entry.id,
                    reason = %dead.reason,
                    "moving poison entry to the dead-letter stream"
                );
            }
            let acking = Instant::now();
            let mut backoff = Backoff::default();
            let acked = loop {
                match self.streams.finish(&batch).await {
                    Ok(acked) => break acked,
                    Err(error) => {
                        self.health.set_redis(false);
                        self.metrics.failed("redis");
                        let delay = backoff.next_delay();
                        tracing::warn!(%error, retry_in = ?delay, "acknowledging a committed batch failed");
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = self.abandon.cancelled() => {
                                tracing::warn!(entries = batch.len(), "drain timeout: committed batch left unacknowledged (it will be delivered again and skipped)");
                                return;
                            }
                        }
                    }
                }
            };
            self.in_flight.remove(&batch.entries);
            self.metrics.batches.inc();
            self.metrics.entries_acked.inc_by(acked);
            self.metrics.dead_lettered.inc_by(batch.dead.len() as u64);
            self.metrics.batch_entries.observe(batch.len() as f64);
            self.metrics
                .batch_duration
                .observe(started.elapsed().as_secs_f64());
            tracing::debug!(
                entries = batch.len(),
                rows = batch.rows.len(),
                dead = batch.dead.len(),
                write_ms = write_time.as_millis() as u64,
                ack_ms = acking.elapsed().as_millis() as u64,
                total_ms = started.elapsed().as_millis() as u64,
                "batch persisted"
            );
        }
    }
}
