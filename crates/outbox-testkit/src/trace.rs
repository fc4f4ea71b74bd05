//! Spans recorded in memory through the OpenTelemetry layer, for the trace context tests.
//!
//! The relay publishes from tasks of its own, which do not inherit a scoped subscriber, so the
//! layer is installed as the process's global subscriber, once. Tests tell their spans apart
//! by trace id.

use std::sync::OnceLock;

use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();

/// The spans ended in this process so far; installs the recording subscriber on first use.
pub fn recorder() -> &'static InMemorySpanExporter {
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-testkit"));
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer));
        exporter
    })
}

/// The ended spans of one trace.
pub fn spans_of(trace: TraceId) -> Vec<SpanData> {
    recorder()
        .get_finished_spans()
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect()
}

/// The trace and span ids of a `tracing` span.
pub fn ids(span: &tracing::Span) -> (TraceId, SpanId) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    (sc.trace_id(), sc.span_id())
}

/// The trace and span ids of a `traceparent` value.
pub fn parse_traceparent(value: &str) -> Option<(TraceId, SpanId)> {
    let mut parts = value.split('-');
    let _version = parts.next()?;
    let trace = TraceId::from_hex(parts.next()?).ok()?;
    let span = SpanId::from_hex(parts.next()?).ok()?;
    Some((trace, span))
}

/// The string value of an attribute of `span`.
pub fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}
