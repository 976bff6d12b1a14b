//! chatctl: chatcluster's command line.
//!
//! * [`stack`]: `chatctl up`/`down`/`status`, the local stack supervisor;
//! * [`client`]: a protocol v1 client (JSON or MessagePack) that reconnects and recovers by
//!   offset, used by `chat`, `publish`, `subscribe` and `bots`;
//! * [`bench`]: `chatctl bench`, load generation with HDR histograms;
//! * [`procstat`] and [`limits`]: what `/proc` and `getrlimit` say, for both.

pub mod bench;
pub mod bots;
pub mod chat;
pub mod client;
pub mod limits;
pub mod procstat;
pub mod shutdown;
pub mod stack;
pub mod token;
