//! Logs and distributed traces: the `tracing` subscriber both binaries
//! install, with an OpenTelemetry layer exporting spans over OTLP when — and
//! only when — an endpoint is configured.
//!
//! Configuration is the standard `OTEL_*` environment:
//!
//! | variable | effect |
//! | --- | --- |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | where to send spans; unset = no exporter at all. A value without a scheme is taken as `http://`. |
//! | `OTEL_EXPORTER_OTLP_PROTOCOL` / `…_TRACES_PROTOCOL` | `grpc` (default) or `http/protobuf` |
//! | `OTEL_SERVICE_NAME` | `service.name`; default the binary's name |
//! | `OTEL_RESOURCE_ATTRIBUTES` | more resource attributes, e.g. `service.instance.id=cache-0` (default: host name and process id) |
//! | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | sampling (`always_on`, `always_off`, `traceidratio`, `parentbased_*`); default `parentbased_always_on`. Decided per request before any span is made, so unsampled requests cost no span work ([`Sampling`]) |
//! | `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_SCHEDULE_DELAY`, … | the batch processor; default queue 2048 spans |
//! | `OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none` | turn tracing off |
//!
//! Values set in code would override these variables in the OpenTelemetry
//! SDK, so this module sets something in code only where the variable is
//! absent (service name, instance id) or needs fixing (an endpoint with no
//! scheme).
//!
//! Export is batched on the SDK's own thread: a request never waits for it,
//! and when the collector is down the bounded queue drops spans rather than
//! growing. [`Telemetry::shutdown`] flushes what is queued.
//!
//! Spans follow the OpenTelemetry semantic conventions for RPC, version
//! 1.26.0 ([`SEMCONV_VERSION`]).

use std::{
    env,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use opentelemetry::{KeyValue, global, trace::TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    propagation::TraceContextPropagator,
    trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter},
};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{FilterExt, Targets, filter_fn},
    fmt,
    prelude::*,
};

use crate::logging::LogFormat;

/// The version of the OpenTelemetry semantic conventions the spans follow.
pub const SEMCONV_VERSION: &str = "1.26.0";

/// Crates whose own spans and events must not reach the exporter: the OTLP
/// exporter talks gRPC itself, and tracing its own calls would feed back.
const QUIET_CRATES: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
];

/// How new and continued traces are sampled, from `OTEL_TRACES_SAMPLER`
/// and `OTEL_TRACES_SAMPLER_ARG` (the standard values).
///
/// The decision is taken once per request, before any span exists
/// ([`crate::rpc_trace`]), so a request that is not sampled costs no span
/// work at all; the SDK's own sampler is then set to follow that decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// `always_on`: every trace.
    AlwaysOn,
    /// `always_off`: none.
    AlwaysOff,
    /// `traceidratio`: this fraction of trace ids, whatever the caller
    /// decided.
    Ratio(f64),
    /// `parentbased_*`: follow the caller's decision; for new traces, this
    /// fraction (1.0 for `parentbased_always_on`, the default).
    ParentBased(f64),
}

impl Sampling {
    fn from_env() -> Self {
        let arg = var("OTEL_TRACES_SAMPLER_ARG")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|r| (0.0..=1.0).contains(r));
        match var("OTEL_TRACES_SAMPLER").as_deref() {
            Some("always_on") => Sampling::AlwaysOn,
            Some("always_off") => Sampling::AlwaysOff,
            Some("traceidratio") => Sampling::Ratio(arg.unwrap_or(1.0)),
            Some("parentbased_always_off") => Sampling::ParentBased(0.0),
            Some("parentbased_traceidratio") => Sampling::ParentBased(arg.unwrap_or(1.0)),
            Some("parentbased_always_on") | None => Sampling::ParentBased(1.0),
            Some(other) => {
                eprintln!(
                    "OTEL_TRACES_SAMPLER={other:?} is not supported; using parentbased_always_on"
                );
                Sampling::ParentBased(1.0)
            }
        }
    }

    /// The SDK sampler that records exactly what this policy decided.
    fn sdk_sampler(self) -> opentelemetry_sdk::trace::Sampler {
        use opentelemetry_sdk::trace::Sampler;
        match self {
            Sampling::AlwaysOff => Sampler::AlwaysOff,
            // Decided per trace id before the span exists: record them all.
            Sampling::AlwaysOn | Sampling::Ratio(_) => Sampler::AlwaysOn,
            Sampling::ParentBased(_) => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        }
    }
}

static SAMPLING: std::sync::OnceLock<Sampling> = std::sync::OnceLock::new();

/// The sampling policy in force (the default until [`init`] ran).
pub fn sampling() -> Sampling {
    *SAMPLING.get().unwrap_or(&Sampling::ParentBased(1.0))
}

/// Set once spans are exported; read on request paths to skip span work
/// when they are not.
static TRACING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans.
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// The installed telemetry. Call [`Telemetry::shutdown`] before exiting so
/// queued spans are exported.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported (an OTLP endpoint is configured).
    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes queued spans and stops the exporter. Call it from outside
    /// the async runtime (after `block_on` returns), while the runtime is
    /// still alive.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "could not flush spans on shutdown");
        }
    }
}

fn var(name: &str) -> Option<String> {
    env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Whether the environment asks for span export.
fn export_configured() -> bool {
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled
        && (var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
            || var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some())
}

/// The endpoint to set in code, if the configured one has no scheme
/// (current exporters would take it as `https://`, which a plain-text
/// collector does not speak).
fn endpoint_fix(http: bool) -> Option<String> {
    let (value, per_signal) = match var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        Some(v) => (v, true),
        None => (var("OTEL_EXPORTER_OTLP_ENDPOINT")?, false),
    };
    if value.contains("://") {
        return None;
    }
    let mut fixed = format!("http://{value}");
    // The generic variable is a base URL; over HTTP the exporter appends the
    // signal's path to it, but not to an endpoint set in code.
    if http && !per_signal {
        fixed = format!("{}/v1/traces", fixed.trim_end_matches('/'));
    }
    Some(fixed)
}

/// `service.name` and `service.instance.id` defaults, where the environment
/// does not set them.
fn resource(service: &'static str) -> Resource {
    let attributes = var("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
    let has = |key: &str| {
        attributes
            .split(',')
            .any(|kv| kv.trim().starts_with(&format!("{key}=")))
    };
    let mut builder = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if var("OTEL_SERVICE_NAME").is_none() && !has("service.name") {
        builder = builder.with_service_name(service);
    }
    if !has("service.instance.id") {
        builder = builder.with_attribute(KeyValue::new(
            "service.instance.id",
            format!(
                "{}-{}",
                gethostname::gethostname().to_string_lossy(),
                std::process::id()
            ),
        ));
    }
    builder.build()
}

/// Runs an exporter's exports on the tokio runtime. The batch processor
/// exports from a thread of its own, outside any runtime, and the HTTP
/// exporter's hyper client needs one.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: Arc<E>,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let inner = self.inner.clone();
        self.runtime
            .spawn(async move { inner.export(batch).await })
            .await
            .map_err(|e| OTelSdkError::InternalFailure(format!("export task failed: {e}")))?
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called once, while the processor is built and nothing else holds
        // the exporter.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

fn provider(service: &'static str) -> anyhow::Result<SdkTracerProvider> {
    let protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "grpc".to_owned());
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| anyhow::anyhow!("telemetry must be set up inside the tokio runtime"))?;
    let exporter = match protocol.as_str() {
        "grpc" => {
            let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(endpoint) = endpoint_fix(false) {
                b = b.with_endpoint(endpoint);
            }
            b.build()?
        }
        "http/protobuf" => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary);
            if let Some(endpoint) = endpoint_fix(true) {
                b = b.with_endpoint(endpoint);
            }
            b.build()?
        }
        other => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported; use grpc or http/protobuf"
        ),
    };
    let exporter = OnRuntime {
        inner: Arc::new(exporter),
        runtime,
    };
    // OTEL_TRACES_SAMPLER is honoured by the per-request decision in
    // rpc_trace; the SDK records what it decided.
    let sampling = *SAMPLING.get_or_init(Sampling::from_env);
    Ok(SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter).build())
        .with_sampler(sampling.sdk_sampler())
        .with_resource(resource(service))
        .build())
}

/// Installs the global subscriber: logs on stderr in `format`, filtered by
/// `RUST_LOG` (default `info`), and — if an OTLP endpoint is configured —
/// spans exported as `service` (unless `OTEL_SERVICE_NAME` says otherwise).
///
/// Must be called inside the tokio runtime (the gRPC exporter needs it).
pub fn init(service: &'static str, format: LogFormat) -> anyhow::Result<Telemetry> {
    let log_filter = match var("RUST_LOG") {
        Some(spec) => EnvFilter::try_new(&spec)
            .map_err(|e| anyhow::anyhow!("RUST_LOG={spec:?} does not parse: {e}"))?,
        None => EnvFilter::new("info"),
    };
    let logs = match format {
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    }
    // Logs are events: spans (one per RPC when tracing is on) are for the
    // exporter, and formatting their fields for a log nobody reads would
    // cost every request.
    .with_filter(log_filter.and(filter_fn(|meta| meta.is_event())));

    let provider = if export_configured() {
        Some(provider(service)?)
    } else {
        None
    };
    let traces = provider.as_ref().map(|p| {
        global::set_text_map_propagator(TraceContextPropagator::new());
        let quiet = QUIET_CRATES
            .iter()
            .fold(Targets::new().with_default(LevelFilter::INFO), |t, c| {
                t.with_target(*c, LevelFilter::OFF)
            });
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            // Per-span extras that cost on every request and say nothing
            // the RPC attributes do not: poll timing, thread and source
            // location attributes.
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_filter(quiet)
    });
    // Not `.with(Option<Layer>)`: an absent layer answers "always" to every
    // callsite, which would make the registry record every trace-level span
    // of h2, hyper and tonic — the single largest CPU cost per request.
    match traces {
        Some(traces) => tracing_subscriber::registry()
            .with(logs)
            .with(traces)
            .try_init()?,
        None => tracing_subscriber::registry().with(logs).try_init()?,
    }
    if provider.is_some() {
        TRACING.store(true, Ordering::Relaxed);
        tracing::info!(semconv = SEMCONV_VERSION, "exporting traces over OTLP");
    }
    Ok(Telemetry { provider })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The environment is process-wide: these tests only read variables
    // that no other test in this crate sets.

    #[test]
    fn no_endpoint_means_no_exporter() {
        if var("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
            && var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        {
            assert!(!export_configured());
            assert_eq!(endpoint_fix(false), None);
        }
    }

    #[test]
    fn default_resource_names_the_service_and_instance() {
        if var("OTEL_SERVICE_NAME").is_none() && var("OTEL_RESOURCE_ATTRIBUTES").is_none() {
            let r = resource("cache-node");
            assert_eq!(
                r.get(&opentelemetry::Key::from_static_str("service.name")),
                Some("cache-node".into())
            );
            assert!(
                r.get(&opentelemetry::Key::from_static_str("service.instance.id"))
                    .is_some()
            );
        }
    }
}
