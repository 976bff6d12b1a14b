//! chatcluster's persistence worker: Redis Streams → PostgreSQL.
//!
//! Gateways append every message, direct message, user and channel to a
//! sharded persistence stream (`cc:{sN}:persist`). Workers read those streams
//! in the consumer group `persist`, write each batch to PostgreSQL in one
//! idempotent transaction and only then acknowledge and delete its entries:
//! at-least-once delivery from Redis, exactly-once rows in PostgreSQL. Nothing
//! is dropped without a trace: what cannot be written goes to a dead-letter
//! stream, with a metric and a log line.
//!
//! * [`config`]: flags and environment,
//! * [`reply`]: raw stream replies, read without trusting their contents,
//! * [`batch`]: entries → rows and dead letters (pure),
//! * [`store`]: migrations and the idempotent write,
//! * [`streams`]: the consumer group: read, take back, acknowledge, lag,
//! * [`in_flight`]: what this worker holds,
//! * [`reader`]: when a batch is full, and which delivery each entry is,
//! * [`writer`], [`acker`], [`heartbeat`], [`probe`]: the tasks,
//! * [`retry`] (with [`backoff`]): the one retry loop,
//! * [`worker`]: the pipeline, supervision and shutdown ([`run`]),
//! * [`dead_letters`]: the dead-letter streams, listed and replayed,
//! * [`admin`], [`metrics`]: `/health`, `/ready`, `/metrics`.

pub mod acker;
pub mod admin;
pub mod backoff;
pub mod batch;
pub mod config;
pub mod dead_letters;
pub mod error;
pub mod heartbeat;
pub mod in_flight;
pub mod metrics;
pub mod probe;
pub mod reader;
pub mod reply;
pub mod retry;
pub mod store;
pub mod streams;
pub mod worker;
pub mod writer;

pub use config::{Args, Cli, Config, WriteMode};
pub use error::{Error, Result};
pub use worker::run;
