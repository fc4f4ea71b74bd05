//! Logs and traces: the subscriber every command logs through, and OpenTelemetry export.
//!
//! Traces are exported over OTLP (HTTP, protobuf bodies) when, and only when, the standard
//! variables ask for it: `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! set, `OTEL_EXPORTER_OTLP_PROTOCOL` unset or `http/protobuf`, `OTEL_SERVICE_NAME` naming the
//! service (default `outbox`), and neither `OTEL_SDK_DISABLED=true` nor
//! `OTEL_TRACES_EXPORTER=none`. The exporter's HTTP client blocks, on the batch processor's own
//! thread, so the provider is built and shut down outside the async runtime: see `main`.

use std::io::Write;

use anyhow::{Context, bail};
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use serde::Serialize;
use tracing::dispatcher::WeakDispatch;
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::cli::LogFormat;

/// The OTLP trace export of this process, when configured.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Reads the standard variables; `None` when export is off.
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
        let Some(endpoint) = endpoint.filter(|_| !disabled) else {
            return Ok(None);
        };
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(p) = var(name)
                && p != "http/protobuf"
            {
                bail!("{name}={p} is not supported: this build exports OTLP as http/protobuf");
            }
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .with_context(|| {
                format!("cannot export traces to {}", outbox_core::redact(&endpoint))
            })?;
        let mut resource = Resource::builder();
        if var("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("outbox");
        }
        let provider = SdkTracerProvider::builder()
            .with_resource(resource.build())
            .with_batch_exporter(exporter)
            .build();
        Ok(Some(Self { provider }))
    }

    fn tracer(&self) -> SdkTracer {
        self.provider.tracer("outbox")
    }

    /// Exports the spans still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            let line = outbox_core::redact(&format!("could not flush the last traces: {e}"));
            eprintln!("warning: {line}");
        }
    }
}

/// The replication client logs an error each time its session ends, which for a standby
/// relay (`--capture wal`) is every retry while another relay streams. The relay reports a lost
/// stream itself, with its cause; the client's own lines are shown only when the filter names
/// its target.
fn quiet_replication_client(filter: String) -> String {
    if filter.contains("pgwire_replication") {
        return filter;
    }
    format!("{filter},pgwire_replication=off")
}

/// Installs the subscriber: `filter` (as in `RUST_LOG`, default `info`), lines in `format`,
/// every line redacted, and spans to OpenTelemetry when `telemetry` is on.
pub fn init_logging(filter: Option<&str>, format: LogFormat, telemetry: Option<&Telemetry>) {
    let filter = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let filter = quiet_replication_client(filter);
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Each layer has its own filter, so that `--log warn` quiets the log without losing the
    // spans of a trace (they are all at INFO).
    let otel = telemetry.map(|t| {
        tracing_opentelemetry::layer()
            .with_tracer(t.tracer())
            .with_filter(LevelFilter::INFO)
    });
    let registry = tracing_subscriber::registry().with(otel);
    let installed = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(|| RedactedLine(Vec::new()))
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .event_format(WithTraceId(tracing_subscriber::fmt::format().json()))
                    .with_writer(|| RedactedLine(Vec::new()))
                    .with_filter(filter),
            )
            .try_init(),
    };
    if installed.is_ok() {
        let _ = DISPATCH.set(tracing::dispatcher::get_default(|d| d.downgrade()));
    }
}

/// The subscriber, for the JSON formatter to find the OpenTelemetry context of a span (an
/// event is formatted inside the subscriber, where the current dispatcher is not reachable).
static DISPATCH: std::sync::OnceLock<WeakDispatch> = std::sync::OnceLock::new();

/// The JSON line of `tracing-subscriber`, led by `trace_id` and `span_id` when the event
/// happens inside a span of an OpenTelemetry trace.
struct WithTraceId(Format<Json>);

#[derive(Serialize)]
struct Ids {
    trace_id: String,
    span_id: String,
}

impl<S, N> FormatEvent<S, N> for WithTraceId
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let ids = ctx.lookup_current().and_then(|span| {
            let dispatch = DISPATCH.get()?.upgrade()?;
            let cx = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)?;
            let sc = cx.span().span_context().clone();
            sc.is_valid().then(|| Ids {
                trace_id: sc.trace_id().to_string(),
                span_id: sc.span_id().to_string(),
            })
        });
        let Some(ids) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        // Both are JSON objects: splice the ids in after the opening brace.
        let ids = serde_json::to_string(&ids).map_err(|_| std::fmt::Error)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{},{rest}", &ids[..ids.len() - 1]),
            None => writer.write_str(&line),
        }
    }
}

/// One log line on its way to stderr. Client libraries log the URLs they connect to and our
/// own errors quote them, so every line loses its credentials before it is written.
struct RedactedLine(Vec<u8>);

impl Write for RedactedLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RedactedLine {
    fn drop(&mut self) {
        let line = outbox_core::redact(&String::from_utf8_lossy(&self.0));
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}
