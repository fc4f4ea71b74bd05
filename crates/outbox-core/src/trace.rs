//! Trace context through the outbox: W3C `traceparent` / `tracestate` in message headers.
//!
//! A trace started by the request that enqueued a message should not stop at the outbox. The
//! context travels in two headers of the message, `traceparent` and `tracestate` (W3C Trace
//! Context), which enqueue checks for format like any header and every sink carries in its
//! transport's own headers.
//!
//! - **Explicitly**, with any tracing library: [`NewMessage::trace_context`](crate::NewMessage::trace_context) sets both.
//! - **Automatically**, with cargo feature `otel`, for users of `tracing` with the
//!   `tracing-opentelemetry` layer: a message enqueued inside a span records that span's
//!   context when it has no `traceparent` of its own (a caller's value is never replaced).
//!   `NewMessage::with_current_trace` does the same earlier, at build time.
//! - **The relay** (feature `otel`) opens one `publish {topic}` span per traced message, of
//!   kind PRODUCER, with the OpenTelemetry messaging attributes (`messaging.system`,
//!   `messaging.destination.name`, `messaging.message.id`, `messaging.operation`), as a child
//!   of the context stored with the message, and hands the sink the message with the publish
//!   span's context in place of the stored one: the consumer's span then hangs under the
//!   delivery that brought the message, not under the enqueue. Without an OpenTelemetry layer
//!   the stored context travels as it is. The relay continues traces and does not start them:
//!   a message stored without a context goes out without one, and costs no span.
//!
//! The feature lives in this crate, not a separate one, because the one place every store's
//! enqueue and the relay's publish go through is here; without it no OpenTelemetry crate is
//! compiled.

use crate::headers::HeaderError;
#[cfg(feature = "otel")]
use crate::message::{Message, NewMessage};
#[cfg(feature = "otel")]
use crate::sink::Delivery;

/// The W3C header carrying the trace id, the parent span id and the flags.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header carrying vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// The longest `tracestate` the W3C recommendation allows propagators to pass on.
const MAX_TRACESTATE_LEN: usize = 512;
/// The most list members a `tracestate` may hold.
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// Checks a header value when its name is `traceparent` or `tracestate` (any case); any other
/// header passes.
pub fn check(name: &str, value: &str) -> Result<(), HeaderError> {
    let ok = if name.eq_ignore_ascii_case(TRACEPARENT) {
        is_valid_traceparent(value)
    } else if name.eq_ignore_ascii_case(TRACESTATE) {
        is_valid_tracestate(value)
    } else {
        true
    };
    if ok {
        Ok(())
    } else {
        Err(HeaderError::BadTraceContext(name.to_owned()))
    }
}

/// `version-traceid-parentid-flags`, lowercase hex, ids not all zero, version not `ff`.
/// Version 00 has exactly these four fields; a later version may append more after a `-`.
pub fn is_valid_traceparent(value: &str) -> bool {
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    let mut parts = value.splitn(5, '-');
    let (Some(version), Some(trace_id), Some(span_id), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let rest = parts.next();
    hex(version, 2)
        && version != "ff"
        && (version != "00" || rest.is_none())
        && hex(trace_id, 32)
        && nonzero(trace_id)
        && hex(span_id, 16)
        && nonzero(span_id)
        && hex(&flags[..flags.len().min(2)], 2)
        && flags.len() == 2
}

/// A comma-separated list of at most 32 `key=value` members, 512 bytes at most.
pub fn is_valid_tracestate(value: &str) -> bool {
    if value.len() > MAX_TRACESTATE_LEN {
        return false;
    }
    let members: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .collect();
    members.len() <= MAX_TRACESTATE_MEMBERS
        && members.iter().all(|m| {
            m.split_once('=')
                .is_some_and(|(k, v)| !k.is_empty() && !v.is_empty() && !v.contains('='))
        })
}

/// The span every store's enqueue runs in: `create {topic}`, of kind PRODUCER, as the
/// messaging conventions name the creation of a message. With feature `otel` its context is
/// the one stored in the messages' headers, so the relay's publish spans hang under it.
///
/// Only inside a span of the caller: an enqueue outside any span starts no trace.
pub fn create_span(msgs: &[crate::NewMessage]) -> tracing::Span {
    if tracing::Span::current().is_none() {
        return tracing::Span::none();
    }
    let topic = msgs
        .first()
        .map(crate::NewMessage::topic)
        .unwrap_or_default();
    let one = msgs.len() == 1;
    tracing::info_span!(
        "create",
        otel.name = format!("create {topic}"),
        otel.kind = "producer",
        messaging.operation = "create",
        messaging.operation.type = "create",
        messaging.destination.name = topic,
        messaging.message.id = one.then(|| msgs[0].id().to_string()),
        messaging.batch.message_count = (!one).then_some(msgs.len()),
    )
}

/// The span a consumer handles a received message in: `process {topic}`, of kind CONSUMER.
/// With feature `otel` its parent is the context the message arrived with (the relay's
/// publish span), so the trace goes on from the request that enqueued the message.
pub fn process_span(consumer: &str, message: &crate::Message) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        otel.name = format!("process {}", message.topic),
        otel.kind = "consumer",
        messaging.operation = "process",
        messaging.operation.type = "process",
        messaging.destination.name = %message.topic,
        messaging.message.id = %message.id,
        messaging.consumer.group.name = consumer,
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    let header = |name: &str| {
        message
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    set_remote_parent(&span, header(TRACEPARENT), header(TRACESTATE));
    span
}

/// Makes a span the child of a context received from elsewhere (an HTTP request's or a
/// message's `traceparent` and `tracestate`). Malformed or missing context leaves the span a
/// root; without feature `otel` this does nothing.
pub fn set_remote_parent(
    span: &tracing::Span,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) {
    #[cfg(feature = "otel")]
    if let Some(traceparent) = traceparent.filter(|t| is_valid_traceparent(t)) {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let mut headers = std::collections::BTreeMap::new();
        headers.insert(TRACEPARENT.to_owned(), traceparent.to_owned());
        if let Some(state) = tracestate {
            headers.insert(TRACESTATE.to_owned(), state.to_owned());
        }
        let parent = extract(&headers);
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    #[cfg(not(feature = "otel"))]
    let _ = (span, traceparent, tracestate);
}

/// Marks `span` (a publish or process span) failed, with the kind of failure.
pub fn record_failure(span: &tracing::Span, permanent: bool) {
    span.record("otel.status_code", "ERROR");
    span.record(
        "error.type",
        if permanent { "permanent" } else { "transient" },
    );
}

#[cfg(feature = "otel")]
mod otel {
    use std::collections::{BTreeMap, HashMap};

    use opentelemetry::Context;
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::*;

    /// The trace context of `span` as `traceparent` (and `tracestate`) headers, when the span
    /// belongs to a sampled-or-not but valid OpenTelemetry trace.
    pub fn headers_of(span: &tracing::Span) -> Option<BTreeMap<String, String>> {
        inject(&span.context())
    }

    /// The trace context of `cx` as headers; `None` for an empty context.
    pub fn inject(cx: &Context) -> Option<BTreeMap<String, String>> {
        if !cx.span().span_context().is_valid() {
            return None;
        }
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(cx, &mut carrier);
        // An empty `tracestate` is no state: leave the header out.
        Some(carrier.into_iter().filter(|(_, v)| !v.is_empty()).collect())
    }

    /// The remote context stored in `headers` (names compared without regard to case, as
    /// transports may change it); an empty context when there is none or it is malformed.
    pub fn extract(headers: &BTreeMap<String, String>) -> Context {
        let carrier: HashMap<String, String> = headers
            .iter()
            .filter(|(n, _)| {
                n.eq_ignore_ascii_case(TRACEPARENT) || n.eq_ignore_ascii_case(TRACESTATE)
            })
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
            .collect();
        TraceContextPropagator::new().extract(&carrier)
    }

    /// Whether `headers` already hold a trace context the caller chose.
    pub(crate) fn has_traceparent(headers: &BTreeMap<String, String>) -> bool {
        headers.keys().any(|n| n.eq_ignore_ascii_case(TRACEPARENT))
    }

    /// The current span's context, unless `headers` carry one already.
    pub(crate) fn current_unless_set(
        headers: &BTreeMap<String, String>,
    ) -> Option<BTreeMap<String, String>> {
        if has_traceparent(headers) {
            return None;
        }
        headers_of(&tracing::Span::current())
    }

    impl NewMessage {
        /// Records the current `tracing` span's OpenTelemetry context in the headers, unless
        /// a `traceparent` is set already. Enqueue does the same by itself; call this to
        /// capture the span the message is built in rather than the one it is enqueued in.
        pub fn with_current_trace(mut self) -> Self {
            if let Some(cx) = current_unless_set(&self.headers) {
                self.headers.extend(cx);
            }
            self
        }
    }

    /// The spans of one wave handed to the sink, one per message, and the messages carrying
    /// their contexts.
    pub(crate) struct Publish {
        spans: Vec<Option<tracing::Span>>,
        traced: Option<Vec<Message>>,
    }

    impl Publish {
        /// Opens a `publish` span per traced message, child of the context the message was stored
        /// with. The messages get the span's context only when an OpenTelemetry layer records
        /// spans; otherwise they go as stored.
        pub(crate) fn start(sink: &str, batch: &[Message]) -> Self {
            let system = messaging_system(sink);
            let mut spans = Vec::with_capacity(batch.len());
            let mut traced: Option<Vec<Message>> = None;
            for (i, m) in batch.iter().enumerate() {
                // The relay continues traces, it does not start them: a message stored
                // without a context is published untraced, at no cost per message.
                let parent = if has_traceparent(&m.headers) {
                    extract(&m.headers)
                } else {
                    Context::new()
                };
                if !parent.span().span_context().is_valid() {
                    spans.push(None);
                    continue;
                }
                let span = publish_span(system, m, parent);
                let Some(cx) = headers_of(&span) else {
                    // No OpenTelemetry layer records spans: the stored context goes on.
                    return Self {
                        spans: Vec::new(),
                        traced: None,
                    };
                };
                let msgs = traced.get_or_insert_with(|| batch.to_vec());
                msgs[i].headers.retain(|n, _| {
                    !n.eq_ignore_ascii_case(TRACEPARENT) && !n.eq_ignore_ascii_case(TRACESTATE)
                });
                msgs[i].headers.extend(cx);
                spans.push(Some(span));
            }
            Self { spans, traced }
        }

        /// The messages to hand to the sink.
        pub(crate) fn batch<'a>(&'a self, batch: &'a [Message]) -> &'a [Message] {
            self.traced.as_deref().unwrap_or(batch)
        }

        /// Records each outcome on its span and ends the spans.
        pub(crate) fn finish(self, outcomes: &[Delivery]) {
            for (span, outcome) in self.spans.iter().zip(outcomes) {
                if let (Some(span), Err(e)) = (span, outcome) {
                    record_failure(span, e.is_permanent());
                }
            }
        }
    }

    /// A `publish` span for `m`, the child of the context it was stored with.
    fn publish_span(system: &str, m: &Message, parent: Context) -> tracing::Span {
        let span = tracing::info_span!(
            "publish",
            otel.name = format!("publish {}", m.topic),
            otel.kind = "producer",
            messaging.system = system,
            messaging.operation = "publish",
            messaging.operation.type = "send",
            messaging.destination.name = %m.topic,
            messaging.message.id = %m.id,
            outbox.attempt = m.attempts,
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let _ = span.set_parent(parent);
        span
    }

    /// The `messaging.system` value for a sink name, as the conventions spell the brokers.
    fn messaging_system(sink: &str) -> &str {
        match sink {
            "amqp" => "rabbitmq",
            "nats" => "nats",
            "kafka" => "kafka",
            "redis" => "redis",
            "mqtt" => "mqtt",
            other => other,
        }
    }
}

#[cfg(feature = "otel")]
pub(crate) use otel::{Publish, current_unless_set};
#[cfg(feature = "otel")]
pub use otel::{extract, headers_of, inject};

/// Without the `otel` feature the relay hands messages to the sink as stored.
#[cfg(not(feature = "otel"))]
pub(crate) struct Publish;

#[cfg(not(feature = "otel"))]
impl Publish {
    pub(crate) fn start(_sink: &str, _batch: &[crate::Message]) -> Self {
        Publish
    }
    pub(crate) fn batch<'a>(&self, batch: &'a [crate::Message]) -> &'a [crate::Message] {
        batch
    }
    pub(crate) fn finish(self, _outcomes: &[crate::Delivery]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_follows_the_w3c_format() {
        assert!(is_valid_traceparent(GOOD));
        assert!(is_valid_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-future"
        ));
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert!(!is_valid_traceparent(bad), "{bad:?}");
        }
    }

    #[test]
    fn tracestate_is_a_bounded_list_of_members() {
        assert!(is_valid_tracestate(
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
        ));
        assert!(is_valid_tracestate(""));
        assert!(!is_valid_tracestate("novalue"));
        assert!(!is_valid_tracestate(&"a=b,".repeat(33)));
        assert!(!is_valid_tracestate(&format!("a={}", "x".repeat(600))));
    }

    #[test]
    fn check_names_the_bad_header_whatever_its_case() {
        assert_eq!(check("TraceParent", GOOD), Ok(()));
        assert_eq!(
            check("TraceParent", "nope"),
            Err(HeaderError::BadTraceContext("TraceParent".into()))
        );
        assert_eq!(check("x-other", "nope"), Ok(()));
    }
}
