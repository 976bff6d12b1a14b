//! Writers: commit batches to PostgreSQL and pass them to the acker.
//!
//! A batch is one transaction. A backend failure is retried with backoff while
//! the batch is kept (until the drain time runs out on shutdown). Data
//! PostgreSQL will never accept is isolated entry by entry: the good entries
//! commit, the rejected ones become dead letters, and a message whose
//! `(channel, channel_offset)` already holds another message is reported as an
//! offset clash (metric, log line, dead letter) rather than dropped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::batch::{self, Batch, DeadLetter, Row, Rows};
use crate::config::Hooks;
use crate::dead_letters::Cause;
use crate::metrics::Metrics;
use crate::retry::{Abandoned, Backend, Retry};
use crate::store::{self, Store, Written};

/// A batch as the reader hands it on, with the time its first entry was read.
pub type Queued = (Instant, Batch);

/// The queue of batches shared by the writers.
pub type Batches = Arc<Mutex<mpsc::Receiver<Queued>>>;

/// A batch whose rows are committed, waiting for its acknowledgement.
pub struct Committed {
    /// The batch, with the dead letters found while writing it.
    pub batch: Batch,
    /// When its first entry was read.
    pub started: Instant,
    /// How long the write took.
    pub write_time: Duration,
}

/// Commits batches to PostgreSQL.
pub struct Writer {
    /// The tables.
    pub store: Store,
    /// Counters.
    pub metrics: Metrics,
    /// Readiness.
    pub health: Arc<Health>,
    /// Fires when the drain time is over: stop retrying.
    pub abandon: CancellationToken,
    /// Test hooks.
    pub hooks: Hooks,
}

impl Writer {
    /// Writes batches until the reader is done (or the drain time is over),
    /// passing each committed batch to the acker.
    pub async fn run(self, batches: Batches, committed: mpsc::Sender<Committed>) {
        loop {
            let next = tokio::select! {
                next = async { batches.lock().await.recv().await } => next,
                () = self.abandon.cancelled() => return,
            };
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
            let done = Committed {
                batch,
                started,
                write_time,
            };
            if committed.send(done).await.is_err() {
                return;
            }
        }
    }

    /// Writes the batch's rows, retrying until it succeeds or the drain time is over.
    async fn persist(&self, batch: &mut Batch) -> Result<(), Abandoned> {
        if batch.rows.is_empty() {
            return Ok(());
        }
        match self.write(&batch.rows).await? {
            Ok(written) => self.metrics.written(&written),
            Err(error) => {
                tracing::warn!(%error, "PostgreSQL rejected the batch's data: writing its entries one by one");
                self.write_one_by_one(batch).await?;
            }
        }
        if let Some(oldest) = batch.oldest_ms {
            let now = chrono::Utc::now().timestamp_millis();
            self.metrics
                .persistence_lag
                .observe((now - oldest).max(0) as f64 / 1000.0);
        }
        Ok(())
    }

    /// Commits `rows`, retrying backend failures; `Ok(Err(_))` when PostgreSQL
    /// rejects the data itself (retrying would fail the same way).
    async fn write(&self, rows: &Rows) -> Result<Result<Written, sqlx::Error>, Abandoned> {
        if let Some(hook) = &self.hooks.before_write {
            hook(rows);
        }
        let retry = Retry {
            backend: Backend::Postgres,
            metrics: &self.metrics,
            health: &self.health,
            cancel: &self.abandon,
            interrupt: true,
        };
        let store = &self.store;
        retry
            .until_ok("writing to PostgreSQL", || async move {
                match store.write(rows).await {
                    Ok(written) => Ok(Ok(written)),
                    Err(error) if store::is_permanent(&error) => Ok(Err(error)),
                    Err(error) => Err(error),
                }
            })
            .await
    }

    /// Writes each entry of the batch in its own transaction; those PostgreSQL
    /// rejects become dead letters.
    async fn write_one_by_one(&self, batch: &mut Batch) -> Result<(), Abandoned> {
        for index in 0..batch.entries.len() {
            if batch.dead.iter().any(|d| d.entry == index) {
                continue;
            }
            let Ok(Some(row)) = batch::decode(&batch.entries[index]) else {
                continue;
            };
            let clashing = match &row {
                Row::Message(m) => Some(Place::Channel(m.channel.clone(), m.offset, m.msg_id)),
                Row::Direct(_, Some(slot)) => {
                    Some(Place::Inbox(slot.user.clone(), slot.offset, slot.msg_id))
                }
                _ => None,
            };
            let error = match self.write(&Rows::single(row)).await? {
                Ok(written) => {
                    self.metrics.written(&written);
                    continue;
                }
                Err(error) => error,
            };
            let dead = match clashing {
                Some(place) if store::clash(&error) => self.offset_clash(index, &place).await,
                _ => DeadLetter {
                    entry: index,
                    cause: Cause::Rejected,
                    reason: format!("rejected by PostgreSQL: {error}"),
                },
            };
            batch.dead.push(dead);
        }
        Ok(())
    }

    /// The dead letter of a message whose offset already holds another message.
    async fn offset_clash(&self, entry: usize, place: &Place) -> DeadLetter {
        let (stored, name, offset, msg_id) = match place {
            Place::Channel(channel, offset, msg_id) => (
                self.store.message_at(channel, *offset).await,
                channel.clone(),
                *offset,
                *msg_id,
            ),
            Place::Inbox(user, offset, msg_id) => (
                self.store.inbox_at(user, *offset).await,
                format!("inbox:{user}"),
                *offset,
                *msg_id,
            ),
        };
        let stored = stored
            .ok()
            .flatten()
            .map_or_else(|| "another message".to_owned(), |id| id.to_string());
        tracing::error!(
            stream = %name,
            offset,
            msg_id = %msg_id,
            stored = %stored,
            "offset clash: the offset already holds another message; moving this one to the dead letters"
        );
        DeadLetter {
            entry,
            cause: Cause::OffsetClash,
            reason: format!(
                "offset clash: {name}#{offset} already holds {stored}; message {msg_id} was not stored"
            ),
        }
    }
}

/// Where a message that can clash sits: a channel offset or an inbox offset.
enum Place {
    /// Channel, offset, message id.
    Channel(String, i64, uuid::Uuid),
    /// Inbox owner, inbox offset, message id.
    Inbox(String, i64, uuid::Uuid),
}
