//! # outbox-sinks
//!
//! Where the relay delivers, chosen by URL with [`from_url`]:
//!
//! | URL | sink | delivered means |
//! |---|---|---|
//! | `file:PATH` | [`FileSink`]: one JSON line per message, appended | written and fsynced |
//! | `stdout:` | [`StdoutSink`]: one JSON line per message | written and flushed |
//! | `null:` | [`NullSink`]: discards, for benchmarks | at once |
//! | `http(s)://…` | `WebhookSink` (feature `webhook`): signed POST per message | 2xx received |
//! | `redis://host:port[?maxlen=N&prefix=P&timeout_ms=N]` | `RedisSink` (feature `redis`): `XADD` to the topic's stream | entry appended |
//! | `nats://host:port[?prefix=P&timeout_ms=N]` | `NatsSink` (feature `nats`): JetStream publish | publish ack from a stream |
//! | `kafka://host:port[,host:port][?prefix=P&timeout_ms=N]` | `KafkaSink` (feature `kafka`, opt-in: builds librdkafka): idempotent producer, `acks=all`, key = message key | delivery report |
//! | `mqtt://host:port[?prefix=P&client_id=C&timeout_ms=N]` | `MqttSink` (feature `mqtt`): MQTT 5, QoS 1, CloudEvents as user properties | PUBACK |
//! | `amqp://user:pass@host:port/vhost[?exchange=E&timeout_ms=N]` | `AmqpSink` (feature `amqp`): RabbitMQ topic exchange, mandatory, persistent | publisher confirm |
//! | `smtp://[user:pass@]host[:port]?from=F&(to=T\|to_field=P)[&tls=none\|starttls\|required&templates=DIR&ca_file=PEM&timeout_ms=N]`, `smtps://…` | `SmtpSink` (feature `smtp`): one email per message, from a template per type, `Message-ID: <id@outbox>` (options in the `smtp` module) | 250 after `DATA` |
//!
//! Every sink returns one outcome per message; an I/O failure is transient (the relay retries
//! with backoff), never a silent drop. `timeout_ms` bounds how long a broker sink waits for its
//! server to confirm a batch (and to connect): a server that stops answering without closing
//! the connection fails the batch within it. Keep it below four fifths of the relay's lease. Each line carries the message id, which is the
//! deduplication key downstream: the relay delivers at least once.

#[cfg(feature = "amqp")]
mod amqp;
pub mod cloudevents;
mod file;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "mqtt")]
mod mqtt;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "redis")]
mod redis;
mod route;
#[cfg(feature = "smtp")]
pub mod smtp;
#[cfg(feature = "webhook")]
mod webhook;

use std::sync::Arc;

use async_trait::async_trait;
use outbox_core::{Delivery, Message, Sink, redact};
use serde::Serialize;

#[cfg(feature = "amqp")]
pub use amqp::AmqpSink;
pub use file::{FileSink, StdoutSink};
#[cfg(feature = "kafka")]
pub use kafka::KafkaSink;
#[cfg(feature = "mqtt")]
pub use mqtt::MqttSink;
#[cfg(feature = "nats")]
pub use nats::NatsSink;
#[cfg(feature = "redis")]
pub use redis::RedisSink;
pub use route::{Breaker, Route, Router};
#[cfg(feature = "smtp")]
pub use smtp::SmtpSink;
#[cfg(feature = "webhook")]
pub use webhook::{WebhookSink, decode_secret, sign};

/// A sink URL that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SinkUrlError {
    /// The URL (given here, credentials removed) has no `scheme:`.
    #[error("sink {0:?} has no scheme; expected one of {schemes}", schemes = schemes())]
    NoScheme(String),
    /// No sink of this build or any feature handles the scheme (given here).
    #[error("sink scheme {0:?} is not supported by this build; supported: {schemes}", schemes = schemes())]
    Unsupported(String),
    /// The scheme's sink exists but was left out of this build.
    #[error(
        "sink scheme {scheme:?} needs the cargo feature {feature:?} (build with --features {feature})"
    )]
    NeedsFeature {
        /// The scheme asked for.
        scheme: String,
        /// The cargo feature of `outbox-sinks` that builds its sink.
        feature: &'static str,
    },
    /// An option is wrong, or the sink could not be set up (bad address, client error).
    #[error("sink {url}: {reason}")]
    Invalid {
        /// The URL, credentials removed.
        url: String,
        /// What is wrong, credentials removed.
        reason: String,
    },
    /// A `file:` URL (given here) without a path.
    #[error("sink {0:?} needs a path, as in file:/var/lib/outbox/events.jsonl")]
    MissingPath(String),
    /// The file of a `file:` sink could not be opened for appending.
    #[error("cannot open sink file {path}: {reason}")]
    Open {
        /// The file's path.
        path: String,
        /// The operating system's error.
        reason: String,
    },
}

/// The schemes this build delivers to.
pub fn schemes() -> String {
    let mut s = String::from("file:PATH, stdout:, null:");
    for (on, scheme) in [
        (cfg!(feature = "webhook"), ", http(s)://"),
        (cfg!(feature = "redis"), ", redis://"),
        (cfg!(feature = "nats"), ", nats://"),
        (cfg!(feature = "amqp"), ", amqp://"),
        (cfg!(feature = "mqtt"), ", mqtt://"),
        (cfg!(feature = "smtp"), ", smtp(s)://"),
        (cfg!(feature = "kafka"), ", kafka://"),
    ] {
        if on {
            s.push_str(scheme);
        }
    }
    s
}

/// The `?name=value` options a scheme built into this binary takes, or why it cannot be used.
fn scheme_options(scheme: &str) -> Result<&'static [&'static str], SinkUrlError> {
    let built = |on: bool, feature: &'static str, options: &'static [&'static str]| {
        if on {
            Ok(options)
        } else {
            Err(SinkUrlError::NeedsFeature {
                scheme: scheme.to_owned(),
                feature,
            })
        }
    };
    match scheme {
        "null" | "stdout" | "file" => Ok(&[]),
        "http" | "https" => built(cfg!(feature = "webhook"), "webhook", &[]),
        "redis" | "rediss" => built(
            cfg!(feature = "redis"),
            "redis",
            &["prefix", "maxlen", "timeout_ms"],
        ),
        "nats" => built(cfg!(feature = "nats"), "nats", &["prefix", "timeout_ms"]),
        "amqp" | "amqps" => built(cfg!(feature = "amqp"), "amqp", &["exchange", "timeout_ms"]),
        "mqtt" => built(
            cfg!(feature = "mqtt"),
            "mqtt",
            &["prefix", "client_id", "timeout_ms"],
        ),
        "kafka" => built(cfg!(feature = "kafka"), "kafka", &["prefix", "timeout_ms"]),
        "smtp" | "smtps" => built(
            cfg!(feature = "smtp"),
            "smtp",
            &[
                "from",
                "to",
                "to_field",
                "tls",
                "templates",
                "ca_file",
                "timeout_ms",
            ],
        ),
        other => Err(SinkUrlError::Unsupported(other.to_owned())),
    }
}

/// Options whose value must be a whole number.
const NUMERIC: &[&str] = &["maxlen", "timeout_ms"];

/// A sink URL split into scheme, address and `?name=value` options, each option checked
/// against what its scheme takes. Public so that code which also reads a sink's URL (a consumer
/// of the same broker, a benchmark preparing a stream) reads it the same way.
#[derive(Debug)]
pub struct SinkUrl<'a> {
    url: &'a str,
    scheme: &'a str,
    /// The URL without its options.
    base: &'a str,
    options: Vec<(&'a str, &'a str)>,
}

impl<'a> SinkUrl<'a> {
    /// Splits `url` and checks its options against its scheme. Fails when there is no scheme, the
    /// scheme is unknown or not built in, a `file:` URL has no path, or an option is unknown or
    /// not a whole number where one is needed. Errors quote the URL with its credentials removed.
    pub fn parse(url: &'a str) -> Result<Self, SinkUrlError> {
        let (scheme, rest) = url
            .split_once(':')
            .ok_or_else(|| SinkUrlError::NoScheme(redact(url)))?;
        let allowed = scheme_options(scheme)?;
        if scheme == "file" && rest.trim_start_matches("//").is_empty() {
            return Err(SinkUrlError::MissingPath(url.to_owned()));
        }
        // A webhook's query belongs to its receiver (a route, an access token): it is part of
        // the address, not options of ours.
        let (base, query) = if matches!(scheme, "http" | "https") {
            (url, "")
        } else {
            url.split_once('?').unwrap_or((url, ""))
        };
        let options: Vec<_> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let parsed = Self {
            url,
            scheme,
            base,
            options,
        };
        for (name, value) in &parsed.options {
            if !allowed.contains(name) {
                return Err(parsed.invalid(format!(
                    "unknown option {name:?} (takes: {})",
                    allowed.join(", ")
                )));
            }
            if NUMERIC.contains(name) && value.parse::<u64>().is_err() {
                return Err(parsed.invalid(format!("{name} {value:?} is not a whole number")));
            }
            if *name == "timeout_ms" && value.parse::<u64>() == Ok(0) {
                return Err(parsed.invalid("timeout_ms must be at least 1".into()));
            }
        }
        Ok(parsed)
    }

    /// The value of option `name`, if given.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.options
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    /// A numeric option; `parse` already checked that it is one.
    #[allow(dead_code)]
    fn number(&self, name: &str) -> Option<u64> {
        self.get(name).and_then(|v| v.parse().ok())
    }

    /// `timeout_ms`, or the sink's default.
    #[allow(dead_code)]
    fn timeout(&self, default: std::time::Duration) -> std::time::Duration {
        self.number("timeout_ms")
            .map_or(default, std::time::Duration::from_millis)
    }

    /// A connection or client error, reported with the URL.
    #[allow(dead_code)]
    fn failed(&self, e: impl std::fmt::Display) -> SinkUrlError {
        self.invalid(e.to_string())
    }

    /// Every error about a URL goes through here: it is printed at start and may quote
    /// a client library's message, so both lose their credentials.
    fn invalid(&self, reason: String) -> SinkUrlError {
        SinkUrlError::Invalid {
            url: redact(self.url),
            reason: redact(&reason),
        }
    }

    /// The scheme, without `:` (`nats`, `https`, …).
    pub fn scheme(&self) -> &'a str {
        self.scheme
    }

    /// The whole URL without its options.
    pub fn base(&self) -> &'a str {
        self.base
    }

    /// The address after `scheme://`, without options or a trailing slash.
    pub fn address(&self) -> &'a str {
        self.base
            .trim_start_matches(self.scheme)
            .trim_start_matches(':')
            .trim_start_matches("//")
            .trim_end_matches('/')
    }
}

/// Checks a sink URL without connecting: a known scheme built into this binary, and valid
/// options (for `smtp://`, also that the templates and CA files read and parse).
/// `outbox relay --check` reports every problem this finds.
pub fn check_url(url: &str) -> Result<(), SinkUrlError> {
    let u = SinkUrl::parse(url)?;
    #[cfg(feature = "smtp")]
    if matches!(u.scheme, "smtp" | "smtps") {
        smtp::Config::parse(&u)?;
    }
    drop(u);
    Ok(())
}

/// Builds the sink a URL names. Webhooks are signed with the secret in
/// `OUTBOX_WEBHOOK_SECRET` (`whsec_…`) when it is set.
pub async fn from_url(url: &str) -> Result<Arc<dyn Sink>, SinkUrlError> {
    let u = SinkUrl::parse(url)?;
    let sink: Arc<dyn Sink> = match u.scheme {
        "null" => Arc::new(NullSink),
        "stdout" => Arc::new(StdoutSink::new()),
        "file" => {
            let path = u.address();
            let sink = FileSink::open(path).await.map_err(|e| SinkUrlError::Open {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            Arc::new(sink)
        }
        #[cfg(feature = "webhook")]
        "http" | "https" => {
            let secret = std::env::var("OUTBOX_WEBHOOK_SECRET")
                .ok()
                .filter(|s| !s.is_empty());
            Arc::new(WebhookSink::new(
                u.base,
                secret.as_deref(),
                std::time::Duration::from_secs(10),
            )?)
        }
        #[cfg(feature = "redis")]
        "redis" | "rediss" => {
            let max_len = u.number("maxlen").map(|n| n as usize);
            let timeout = u.timeout(RedisSink::DEFAULT_TIMEOUT);
            let sink = RedisSink::connect(u.base, u.get("prefix").unwrap_or(""), max_len, timeout);
            let sink = sink.await;
            Arc::new(sink.map_err(|e| u.failed(e))?)
        }
        #[cfg(feature = "nats")]
        "nats" => Arc::new(
            NatsSink::connect(
                u.base,
                u.get("prefix").unwrap_or(""),
                u.timeout(NatsSink::DEFAULT_TIMEOUT),
            )
            .await
            .map_err(|e| u.failed(e))?,
        ),
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => {
            let exchange = u.get("exchange").unwrap_or("outbox");
            let timeout = u.timeout(AmqpSink::DEFAULT_TIMEOUT);
            let sink = AmqpSink::connect(u.base, exchange, timeout).await;
            Arc::new(sink.map_err(|e| u.failed(e))?)
        }
        #[cfg(feature = "mqtt")]
        "mqtt" => {
            let (host, port) = match u.address().rsplit_once(':') {
                Some((h, p)) => (
                    h,
                    p.parse()
                        .map_err(|_| u.invalid(format!("port {p:?} is not a number")))?,
                ),
                None => (u.address(), 1883),
            };
            if host.is_empty() {
                return Err(u.invalid("no host".into()));
            }
            let client_id = u
                .get("client_id")
                .map_or_else(|| format!("outbox-{}", std::process::id()), str::to_owned);
            Arc::new(MqttSink::connect(
                host,
                port,
                &client_id,
                u.get("prefix").unwrap_or(""),
                u.timeout(MqttSink::DEFAULT_TIMEOUT),
            ))
        }
        #[cfg(feature = "smtp")]
        "smtp" | "smtps" => Arc::new(smtp::from_url(&u)?),
        #[cfg(feature = "kafka")]
        "kafka" => {
            let timeout =
                std::time::Duration::from_millis(u.number("timeout_ms").unwrap_or(30_000));
            Arc::new(
                KafkaSink::new(u.address(), u.get("prefix").unwrap_or(""), timeout)
                    .map_err(|e| u.failed(e))?,
            )
        }
        other => return Err(SinkUrlError::Unsupported(other.to_owned())),
    };
    Ok(sink)
}

/// Accepts everything and does nothing: measures the relay and the store alone.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

#[async_trait]
impl Sink for NullSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        vec![Ok(()); batch.len()]
    }
    fn name(&self) -> &str {
        "null"
    }
}

/// The JSON line written for each delivered message.
#[derive(Debug, Serialize)]
pub struct Line<'a> {
    /// The message id; consumers deduplicate by it.
    pub id: uuid::Uuid,
    /// The message's topic.
    pub topic: &'a str,
    /// The message type.
    #[serde(rename = "type")]
    pub message_type: &'a str,
    /// The ordering key, if the message has one.
    pub key: Option<&'a str>,
    /// The payload: JSON as is when the content type is JSON, else the bytes as (lossy UTF-8)
    /// text.
    pub payload: serde_json::Value,
    /// The payload's content type.
    pub content_type: &'a str,
    /// The message's headers.
    pub headers: &'a std::collections::BTreeMap<String, String>,
    /// This delivery's attempt number, from 1.
    pub attempt: i32,
    /// Position in the outbox: the per-key delivery order.
    pub seq: i64,
    /// When the message was enqueued.
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl<'a> From<&'a Message> for Line<'a> {
    fn from(m: &'a Message) -> Self {
        Line {
            id: m.id,
            topic: &m.topic,
            message_type: &m.message_type,
            key: m.key.as_deref(),
            payload: m.payload_value(),
            content_type: &m.content_type,
            headers: &m.headers,
            attempt: m.attempts,
            seq: m.seq,
            created_at: m.created_at,
        }
    }
}

/// Serialises a batch as JSON lines.
pub fn json_lines(batch: &[Message]) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.len() * 256);
    for m in batch {
        // Serialising owned, valid data into a Vec cannot fail.
        serde_json::to_writer(&mut out, &Line::from(m)).expect("serialise line");
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::SinkUrl;

    #[test]
    fn a_webhook_query_is_part_of_its_address() {
        let u = SinkUrl::parse("https://h/hook?token=t&route=a").unwrap();
        assert_eq!(u.base(), "https://h/hook?token=t&route=a");
        assert_eq!(u.get("token"), None);
        let u = SinkUrl::parse("nats://h:4222?prefix=p.").unwrap();
        assert_eq!((u.base(), u.get("prefix")), ("nats://h:4222", Some("p.")));
    }
}
