//! Logs and traces of the process: the `tracing` subscriber (text or JSON logs on stderr),
//! and, when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` is set, OpenTelemetry traces
//! exported over OTLP by a batch exporter on the tokio runtime (docs/tracing.md).
//!
//! This module owns the ids and the spans of work that outlives a reconcile ([`ids`],
//! [`spans`]). It must never build a span when tracing is off (every entry point returns at
//! once), and never put a secret in a log line or a span attribute.

pub mod ids;
pub mod spans;

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::Subscriber;
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the `trace_id` and `span_id` of the current span when
    /// tracing is on.
    Json,
}

/// The logging flags every command takes (`shoal --log-format json run`, or after the
/// command, or `SHOAL_LOG_FORMAT`).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log lines as human-readable text, or as JSON objects (one a line, with the trace id
    /// of the current span when tracing is on).
    #[arg(long, global = true, env = "SHOAL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// OTLP transport, as `OTEL_EXPORTER_OTLP_PROTOCOL` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// Tracing settings from the standard OpenTelemetry environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtelSettings {
    pub endpoint: String,
    pub protocol: Protocol,
    /// `OTEL_SERVICE_NAME`, else `shoal`; `None` when `OTEL_RESOURCE_ATTRIBUTES` names the
    /// service (it is then left to the SDK, which reads it).
    pub service_name: Option<String>,
}

impl OtelSettings {
    /// `None` (tracing off) unless an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// or `OTEL_EXPORTER_OTLP_ENDPOINT`); off too with `OTEL_SDK_DISABLED=true` or
    /// `OTEL_TRACES_EXPORTER=none`. The protocol defaults to `http/protobuf`, as the
    /// specification says; `grpc` is the other one built in.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let var = |k: &str| var(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none")) {
            return Ok(None);
        }
        let Some(endpoint) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT")) else {
            return Ok(None);
        };
        let protocol = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL")).as_deref() {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(other) => bail!("OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported: use grpc or http/protobuf"),
        };
        let named_in_attributes = var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.split(',').any(|kv| kv.trim_start().starts_with("service.name=")));
        let service_name = match var("OTEL_SERVICE_NAME") {
            Some(n) => Some(n),
            None if named_in_attributes => None,
            None => Some("shoal".into()),
        };
        Ok(Some(Self { endpoint, protocol, service_name }))
    }
}

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The tracer, when tracing is on.
pub(crate) fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// Is tracing on? Callers skip building spans when it is not.
pub fn enabled() -> bool {
    TRACER.get().is_some() || test::enabled()
}

/// Unit tests turn spans on for their own thread only (with their own subscriber), so tests
/// that check that nothing is built with tracing off are not affected.
#[cfg(test)]
pub mod test {
    use std::cell::Cell;
    thread_local!(static ON: Cell<bool> = const { Cell::new(false) });
    pub fn enable_on_this_thread() {
        ON.with(|c| c.set(true));
    }
    pub(super) fn enabled() -> bool {
        ON.with(|c| c.get())
    }
}
#[cfg(not(test))]
mod test {
    pub(super) fn enabled() -> bool {
        false
    }
}

/// Mark a reconcile's span as failed, with the error (which names no secret: errors never
/// quote one).
pub fn reconcile_failed(span: &tracing::Span, error: &str) {
    if !span.is_disabled() {
        tracing_opentelemetry::OpenTelemetrySpanExt::set_status(span, opentelemetry::trace::Status::error(error.to_string()));
    }
}

/// What [`init`] set up; [`Telemetry::shutdown`] flushes the spans not yet exported.
#[must_use = "call shutdown() at exit, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Install the global `tracing` subscriber: `RUST_LOG` (else `default_filter`) filters both
/// logs and spans; logs go to stderr as `format` says; spans are exported when `otel` is
/// given. `instance` names this replica (`service.instance.id`). Call it inside the tokio
/// runtime: the exporter runs on it.
pub fn init(format: LogFormat, default_filter: &str, otel: Option<&OtelSettings>, instance: Option<&str>) -> Result<Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let provider = otel.map(|s| provider(s, instance)).transpose()?;
    let otel_layer = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("shoal")));
    let text = (format == LogFormat::Text).then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json = (format == LogFormat::Json).then(|| tracing_subscriber::fmt::layer().json().event_format(JsonWithTraceId::default()).with_writer(std::io::stderr));
    tracing_subscriber::registry().with(filter).with(otel_layer).with(text).with(json).try_init().context("installing the log subscriber")?;
    if let (Some(p), Some(s)) = (&provider, otel) {
        let _ = TRACER.set(p.tracer("shoal"));
        tracing::info!(endpoint = %s.endpoint, protocol = ?s.protocol, service = s.service_name.as_deref().unwrap_or("(from OTEL_RESOURCE_ATTRIBUTES)"), "tracing on: exporting spans over OTLP");
    }
    Ok(Telemetry { provider })
}

fn provider(s: &OtelSettings, instance: Option<&str>) -> Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    // The endpoint and the other OTEL_EXPORTER_OTLP_* variables (headers, timeout,
    // compression) are read by the exporter itself; only the transport is chosen here.
    let exporter = match s.protocol {
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder().with_tonic().build(),
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder().with_http().with_protocol(opentelemetry_otlp::Protocol::HttpBinary).build(),
    }
    .context("building the OTLP span exporter")?;
    let mut resource = Resource::builder();
    if let Some(name) = &s.service_name {
        resource = resource.with_service_name(name.clone());
    }
    if let Some(i) = instance {
        resource = resource.with_attribute(opentelemetry::KeyValue::new("service.instance.id", i.to_string()));
    }
    resource = resource.with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    Ok(SdkTracerProvider::builder().with_span_processor(processor).with_id_generator(ids::DeterministicIds::default()).with_resource(resource.build()).build())
}

impl Telemetry {
    /// Export what is still queued and stop the exporter, waiting at most `timeout`.
    pub async fn shutdown(self, timeout: Duration) {
        let Some(p) = self.provider else {
            return;
        };
        // The SDK blocks the calling thread until its exporter task (on this runtime) is
        // done, so it must not block a runtime worker.
        let done = tokio::task::spawn_blocking(move || p.shutdown_with_timeout(timeout));
        match tokio::time::timeout(timeout + Duration::from_secs(1), done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("tracing: flushing spans at exit failed: {e}"),
            Ok(Err(e)) => eprintln!("tracing: flushing spans at exit failed: {e}"),
            Err(_) => eprintln!("tracing: flushing spans at exit took longer than {timeout:?}; the last spans may be lost"),
        }
    }
}

/// tracing-subscriber's JSON lines, with `trace_id` and `span_id` (lowercase hex, as
/// OpenTelemetry and Jaeger write them) of the current span first when tracing is on.
pub struct JsonWithTraceId {
    inner: Format<Json>,
}

impl Default for JsonWithTraceId {
    fn default() -> Self {
        Self { inner: tracing_subscriber::fmt::format().json() }
    }
}

impl<S, N> FormatEvent<S, N> for JsonWithTraceId
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &tracing::Event<'_>) -> std::fmt::Result {
        let mut line = String::new();
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        // The OpenTelemetry layer attaches an entered span's context to the thread (the
        // dispatcher cannot be asked from inside an event: it refuses re-entry).
        let ids = ctx.lookup_current().and_then(|_| {
            let sc = opentelemetry::Context::map_current(|cx| cx.span().span_context().clone());
            sc.is_valid().then(|| (sc.trace_id(), sc.span_id()))
        });
        match (ids, line.strip_prefix('{')) {
            (Some((t, s)), Some(rest)) => write!(writer, "{{\"trace_id\":\"{t}\",\"span_id\":\"{s}\",{rest}"),
            _ => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
