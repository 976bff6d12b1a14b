//! The chatcluster wire contract and shared data layout.
//!
//! Everything that more than one binary must agree on lives here, so that the
//! gateway, the worker and clients read it from one place:
//!
//! * [`frame`]: client requests, replies and server pushes (PROTOCOL.md),
//! * [`codec`]: JSON and MessagePack encodings of those frames,
//! * [`validate`]: name and size rules with precise errors,
//! * [`clock`]: the Lamport clock carried by every frame,
//! * [`keys`]: the Redis key layout (hash tags per persistence shard),
//! * [`entry`]: the payloads stored in Redis streams and published on topics,
//! * [`scripts`]: the Lua scripts that publish atomically,
//! * [`stream`]: channels and inboxes, the two kinds of sequenced streams.

pub mod clock;
pub mod codec;
pub mod entry;
pub mod frame;
pub mod keys;
pub mod scripts;
pub mod stream;
pub mod validate;

pub use clock::LamportClock;
pub use codec::{DecodeError, Encoding};
pub use frame::{ErrorCode, Request, RequestId, ServerFrame};
