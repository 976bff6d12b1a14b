//! chatcluster's persistence worker: Redis Streams → PostgreSQL.
//!
//! Gateways append every message, direct message, user and channel to a
//! sharded persistence stream (`cc:{sN}:persist`). Workers read those streams
//! in the consumer group `persist`, write each batch to PostgreSQL in one
//! idempotent transaction and only then acknowledge and delete its entries:
//! at-least-once delivery from Redis, exactly-once rows in PostgreSQL.
//!
//! * [`config`]: flags and environment,
//! * [`reply`]: raw stream replies, read without trusting their contents,
//! * [`batch`]: entries → rows and dead letters (pure),
//! * [`store`]: migrations and the idempotent write,
//! * [`streams`]: the consumer group: read, claim, acknowledge, lag,
//! * [`reader`]: when a batch is full,
//! * [`worker`]: the pipeline, retries and shutdown ([`run`]),
//! * [`admin`], [`metrics`]: `/health`, `/ready`, `/metrics`.

pub mod admin;
pub mod backoff;
pub mod batch;
pub mod config;
pub mod error;
pub mod metrics;
pub mod reader;
pub mod reply;
pub mod store;
pub mod streams;
pub mod worker;

pub use config::{Args, Config, WriteMode};
pub use error::{Error, Result};
pub use worker::run;
