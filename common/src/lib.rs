//! Code both ringcache services share, so it lives once.
//!
//! # Layout
//!
//! - [`config`]: the flags both binaries take (limits, logging, shutdown).
//! - [`deadline`]: the client's `grpc-timeout`, and the server layer that
//!   answers `DEADLINE_EXCEEDED` when it or `--request-timeout` runs out.
//! - [`server`]: serving with the shared layers, readiness and graceful
//!   shutdown; the runtime both binaries use.
//! - [`logging`]: the log format flag.
//! - [`telemetry`]: the `tracing` subscriber — logs on stderr, text or JSON,
//!   filtered by `RUST_LOG`, and OTLP span export configured by `OTEL_*`.
//! - [`rpc_trace`]: SERVER and CLIENT spans for RPCs, and W3C trace context
//!   in gRPC metadata.
//! - [`shutdown`]: the SIGTERM/SIGINT future that starts a graceful drain.
//! - [`metrics`]: the Prometheus `/metrics` HTTP endpoint and a tower layer
//!   that counts and times every gRPC call by service, method and status.
//! - [`pipeline`]: `Cache/Pipeline`, many single-key calls on one stream,
//!   each run by the service's unary handler.
//! - [`limits`]: a tower layer that caps in-flight requests and sheds the
//!   excess with `RESOURCE_EXHAUSTED` instead of queueing it.
//! - [`grpc`]: reflection (v1 and v1alpha) and health wiring.
//! - [`reload`]: values loaded from files and reloaded when they change.
//! - [`tls`]: TLS on the gRPC port (rustls), certificates reloaded when
//!   their files change.
//! - [`auth`]: bearer tokens with roles (read, write, admin), from a file
//!   reloaded when it changes, checked by a tower layer.
//! - [`size`]: parsing of `512MiB`-style byte sizes for flags.
//! - [`validate`]: request limits (key, value, batch sizes, TTLs), checked
//!   before any work is done, with messages that name the limit.

pub mod auth;
pub mod config;
pub mod deadline;
pub mod direct;
pub mod exhausted;
pub mod grpc;
pub mod inflight_bytes;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod refusals;
pub mod reload;
pub mod rpc_trace;
pub mod server;
pub mod shutdown;
pub mod size;
pub mod telemetry;
pub mod tls;
pub mod validate;
