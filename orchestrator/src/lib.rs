//! The ringcache orchestrator: serves `ringcache.v1.Cache` and routes each
//! key to the cache node(s) that own it.
//!
//! # Layout
//!
//! - [`answers`]: what a read's answer will take, held against
//!   `--max-in-flight-bytes` before the nodes are asked.
//! - [`ring`]: rendezvous hashing — which nodes own a key, in preference
//!   order. Pure, deterministic, heavily tested and benchmarked.
//! - [`health`]: the ejection state machine (pure; times passed in).
//! - [`invalidation`]: keys a node may hold stale values of (writes and
//!   deletes that could not reach it), replayed there before it serves
//!   them again.
//! - [`handoff`]: warm handoff — refilling a node that joined or restarted
//!   empty, reads that miss on it answered from other holders, and the
//!   record of running writes that keeps copies from resurrecting deletes.
//! - [`parking`]: keeping a stopping node's entries on the nodes that take
//!   its keys while it is away (`Internal/Park`), so planned restarts
//!   keep the cache with one copy of each key.
//! - [`hotkeys`]: a bounded sketch of the busiest keys (`Cluster/HotKeys`).
//! - [`hedge`]: hedged reads — the delay (observed p99 of answered node
//!   calls, or `--hedge-delay`) and the budget that bounds them.
//! - [`feeds`]: following the nodes' change feeds (`Internal/Changes`):
//!   every change on any node reaches this orchestrator's relief, and each
//!   node's feed says whether it is in sync.
//! - [`nearcache`]: hot-key relief — a byte-bounded cache of hot keys'
//!   answers, fresh for a short TTL and voided by every write through this
//!   orchestrator.
//! - [`client`]: how one node is called — a coalescer over a tower stack
//!   (trace, metrics, passive health, shedding, timeout) over HTTP/2
//!   connections, failing with a typed [`client::CallError`].
//! - [`nodes`]: the [`nodes::Cluster`] — a client and a health record per
//!   node, the current topology behind an `ArcSwap`, and the active health
//!   checks.
//! - [`membership`]: static `--nodes` or DNS discovery (`--nodes-dns`).
//! - [`service`]: the router (`ringcache.v1.Cache`: reads with fallback,
//!   writes with replication, batches split by node) and
//!   `ringcache.v1.Cluster`.
//! - [`metrics`]: per-node call metrics and cluster gauges.
//! - [`config`], [`server`]: flags and wiring; `main.rs` is a table of
//!   contents.

#![forbid(unsafe_code)]

pub mod answers;
pub mod client;
pub mod config;
pub mod feeds;
pub mod handoff;
pub mod health;
pub mod hedge;
pub mod hotkeys;
pub mod invalidation;
pub mod membership;
pub mod metrics;
pub mod nearcache;
pub mod nodes;
pub mod parking;
pub mod ring;
pub mod server;
pub mod service;
