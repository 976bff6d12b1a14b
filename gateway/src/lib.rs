//! The chatcluster gateway: WebSocket clients in, Redis out.
//!
//! A gateway process serves the wire protocol of `docs/protocol.md` on a Unix
//! socket (behind the pod's HAProxy sidecar) or TCP. Every publish is one Redis
//! script that assigns the channel offset and writes history, the persistence
//! stream and the pub/sub fan-out together; each gateway subscribes only to the
//! topics its own clients need and delivers every message to them in offset
//! order, encoded once.
//!
//! Modules: [`config`] flags; [`server`] lifecycle; [`app`] routes; [`connection`]
//! socket I/O; [`session`] protocol operations; [`state`] shared state and shared
//! operations; [`hub`] local routing; [`topics`] the pub/sub connection; [`store`]
//! Redis requests; [`history`] PostgreSQL reads; [`presence`] presence upkeep;
//! [`outbox`] per-connection queues; [`names`] registered names; [`auth`], [`ratelimit`], [`metrics`], [`api`].

pub mod api;
pub mod app;
pub mod auth;
pub mod config;
pub mod connection;
pub mod history;
pub mod hub;
pub mod metrics;
pub mod names;
pub mod outbox;
pub mod presence;
pub mod ratelimit;
pub mod server;
pub mod session;
pub mod state;
pub mod store;
pub mod topics;

pub use config::Config;
pub use server::{ServeError, run};
