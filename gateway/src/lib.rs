//! The chatcluster gateway: WebSocket clients in, Redis out.
//!
//! A gateway process serves the wire protocol of `docs/protocol.md` on a Unix
//! socket (behind the pod's HAProxy sidecar) or TCP. Every publish is one Redis
//! script that assigns the channel offset and writes history, the persistence
//! stream and the pub/sub fan-out together; each gateway subscribes only to the
//! topics its own clients need and delivers every message to them in offset
//! order, encoded once.
//!
//! Layers, each depending only on those below it:
//! - lifecycle and HTTP: [`server`] (listeners, drain), [`app`] (routes),
//!   [`connection`] (WebSocket upgrade and socket I/O), [`api`] (HTTP API);
//! - operations: [`session`] (one client's protocol operations), [`inbox`]
//!   (direct messages: send, conversations, one conversation's pages),
//!   [`state`] (the shared gateway and operations both doors use), [`presence`] upkeep;
//! - the delivery core: [`delivery`] (dispatchers and the sequencers of
//!   channels and user inboxes), [`pubsub`] (the subscriber connection),
//!   [`outbox`] (per-connection queues), [`ws`] (WebSocket framing);
//! - offsets and pages: [`epochs`] (writes that never reuse an offset),
//!   [`blocks`] (offsets reserved in PostgreSQL), [`life`] (which Redis
//!   process, and whether it can lose writes), [`pages`] (history merged from
//!   Redis and PostgreSQL);
//! - backends and leaves: [`store`] (Redis), [`history`] (PostgreSQL),
//!   [`resp`], [`names`], [`auth`], [`budget`], [`ratelimit`], [`listing`],
//!   [`metrics`], [`config`], [`secret`].

pub mod api;
pub mod app;
pub mod auth;
pub mod blocks;
pub mod budget;
pub mod config;
pub mod connection;
pub mod delivery;
pub mod epochs;
pub mod history;
pub mod inbox;
pub mod life;
pub mod listing;
pub mod metrics;
pub mod names;
pub mod outbox;
pub mod pages;
pub mod presence;
pub mod pubsub;
pub mod ratelimit;
pub mod resp;
pub mod secret;
pub mod server;
pub mod session;
pub mod state;
pub mod store;
pub mod ws;

pub use config::Config;
pub use server::{ServeError, run};
