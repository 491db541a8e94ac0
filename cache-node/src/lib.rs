//! The ringcache cache node: sharded, byte-bounded in-memory storage
//! served over gRPC.
//!
//! # Layout
//!
//! - [`config`]: the command line (every flag also an environment
//!   variable), checked for consistency before anything starts.
//! - [`store`]: the storage itself — shards of `quick_cache`, TTLs with an
//!   exact expiry index, per-key versions, conditional writes. Pure Rust, no
//!   gRPC, unit-tested and benchmarked on its own.
//! - [`service`]: the `ringcache.v1.Cache` and `ringcache.v1.Node` gRPC
//!   services: validate the request, call the store, map the outcome.
//! - [`changes`]: the change feed — a bounded log of every change the store
//!   applied, numbered per incarnation, read by orchestrators from a
//!   position (`Internal/Changes`).
//! - [`debts`]: keys other nodes missed changes of, recorded here by
//!   orchestrators (`Owe`) and read back before those nodes serve again
//!   (`Internal/Debts`, `Internal/Settle`).
//! - [`epochs`]: the ring epochs orchestrators call with, so a node shows
//!   when orchestrators disagree about the membership.
//! - [`error`]: the node's error type and its one mapping to `tonic::Status`.
//! - [`metrics`]: a Prometheus collector that reads the store's counters at
//!   scrape time.
//! - [`server`]: wiring — layers, health, reflection, the expiry reclaimer,
//!   the metrics endpoint and graceful shutdown — behind [`server::run`],
//!   which takes its listeners and shutdown signal so tests can drive it.
//!
//! `main.rs` only parses the configuration, sets up logging and calls
//! [`server::run`] with the SIGTERM/SIGINT future.

#![forbid(unsafe_code)]

pub mod changes;
pub mod config;
pub mod debts;
pub mod epochs;
pub mod error;
pub mod metrics;
pub mod parking;
pub mod server;
pub mod service;
pub mod store;
