//! The chatcluster operator: runs a whole chatcluster from one `ChatCluster` object.
//!
//! [`crd`] defines the resource, [`build`] turns a spec into child objects (pure),
//! [`controller`] applies them and reports status, [`autoscale`] sizes the workers from the
//! Redis persistence lag, [`leader`] keeps two replicas from acting at once, [`server`]
//! serves health and metrics, and [`quantity`] reads storage sizes.

pub mod autoscale;
pub mod build;
pub mod config;
pub mod controller;
pub mod crd;
pub mod error;
#[cfg(test)]
mod fake_api;
pub mod leader;
pub mod metrics;
pub mod quantity;
pub mod server;
pub mod status;

pub use error::{Error, Result};
