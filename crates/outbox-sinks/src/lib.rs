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
//! | `redis://host:port[?maxlen=N&prefix=P]` | `RedisSink` (feature `redis`): `XADD` to the topic's stream | entry appended |
//! | `nats://host:port[?prefix=P]` | `NatsSink` (feature `nats`): JetStream publish | publish ack from a stream |
//! | `kafka://host:port[,host:port][?prefix=P&timeout_ms=N]` | `KafkaSink` (feature `kafka`, opt-in: builds librdkafka): idempotent producer, `acks=all`, key = message key | delivery report |
//! | `mqtt://host:port[?prefix=P&client_id=C]` | `MqttSink` (feature `mqtt`): MQTT 5, QoS 1, CloudEvents as user properties | PUBACK |
//! | `amqp://user:pass@host:port/vhost[?exchange=E]` | `AmqpSink` (feature `amqp`): RabbitMQ topic exchange, mandatory, persistent | publisher confirm |
//!
//! Every sink returns one outcome per message; an I/O failure is transient (the relay retries
//! with backoff), never a silent drop. Each line carries the message id, which is the
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
#[cfg(feature = "webhook")]
mod webhook;

use std::sync::Arc;

use async_trait::async_trait;
use outbox_core::{Delivery, Message, Sink};
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
#[cfg(feature = "webhook")]
pub use webhook::{WebhookSink, decode_secret, sign};

/// A sink URL that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SinkUrlError {
    #[error("sink {0:?} has no scheme; expected one of {schemes}", schemes = schemes())]
    NoScheme(String),
    #[error("sink scheme {0:?} is not supported by this build; supported: {schemes}", schemes = schemes())]
    Unsupported(String),
    #[error(
        "sink scheme {scheme:?} needs the cargo feature {feature:?} (build with --features {feature})"
    )]
    NeedsFeature {
        scheme: String,
        feature: &'static str,
    },
    #[error("sink {url}: {reason}")]
    Invalid { url: String, reason: String },
    #[error("sink {0:?} needs a path, as in file:/var/lib/outbox/events.jsonl")]
    MissingPath(String),
    #[error("cannot open sink file {path}: {reason}")]
    Open { path: String, reason: String },
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
        (cfg!(feature = "kafka"), ", kafka://"),
    ] {
        if on {
            s.push_str(scheme);
        }
    }
    s
}

/// Splits `?name=value&…` options off a URL: (the URL without them, the options).
fn url_options(url: &str) -> (&str, Vec<(&str, &str)>) {
    match url.split_once('?') {
        Some((base, query)) => (
            base,
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .collect(),
        ),
        None => (url, Vec::new()),
    }
}

/// Checks a sink URL without connecting: a known scheme built into this binary, and valid
/// options. `outbox relay --check` reports every problem this finds.
pub fn check_url(url: &str) -> Result<(), SinkUrlError> {
    let (scheme, rest) = url
        .split_once(':')
        .ok_or_else(|| SinkUrlError::NoScheme(url.to_owned()))?;
    let (_, options) = url_options(url);
    let allowed: &[&str] = match scheme {
        "null" | "stdout" => &[],
        "file" if rest.trim_start_matches("//").is_empty() => {
            return Err(SinkUrlError::MissingPath(url.to_owned()));
        }
        "file" => &[],
        "http" | "https" if cfg!(feature = "webhook") => &[],
        "redis" | "rediss" if cfg!(feature = "redis") => &["prefix", "maxlen"],
        "nats" if cfg!(feature = "nats") => &["prefix"],
        "amqp" | "amqps" if cfg!(feature = "amqp") => &["exchange"],
        "mqtt" if cfg!(feature = "mqtt") => &["prefix", "client_id"],
        "mqtt" => {
            return Err(SinkUrlError::NeedsFeature {
                scheme: scheme.into(),
                feature: "mqtt",
            });
        }
        "http" | "https" => {
            return Err(SinkUrlError::NeedsFeature {
                scheme: scheme.into(),
                feature: "webhook",
            });
        }
        "redis" | "rediss" => {
            return Err(SinkUrlError::NeedsFeature {
                scheme: scheme.into(),
                feature: "redis",
            });
        }
        "nats" => {
            return Err(SinkUrlError::NeedsFeature {
                scheme: scheme.into(),
                feature: "nats",
            });
        }
        "amqp" | "amqps" => {
            return Err(SinkUrlError::NeedsFeature {
                scheme: scheme.into(),
                feature: "amqp",
            });
        }
        "kafka" if cfg!(feature = "kafka") => &["prefix", "timeout_ms"],
        "kafka" => {
            return Err(SinkUrlError::NeedsFeature {
                scheme: scheme.into(),
                feature: "kafka",
            });
        }
        other => return Err(SinkUrlError::Unsupported(other.to_owned())),
    };
    for (name, value) in options {
        if !allowed.contains(&name) {
            return Err(SinkUrlError::Invalid {
                url: url.to_owned(),
                reason: format!("unknown option {name:?}"),
            });
        }
        if name == "maxlen" && value.parse::<usize>().is_err() {
            return Err(SinkUrlError::Invalid {
                url: url.to_owned(),
                reason: format!("maxlen {value:?} is not a number"),
            });
        }
    }
    Ok(())
}

/// Builds the sink a URL names. Webhooks are signed with the secret in
/// `OUTBOX_WEBHOOK_SECRET` (`whsec_…`) when it is set.
pub async fn from_url(url: &str) -> Result<Arc<dyn Sink>, SinkUrlError> {
    let (scheme, rest) = url
        .split_once(':')
        .ok_or_else(|| SinkUrlError::NoScheme(url.to_owned()))?;
    match scheme {
        "null" => Ok(Arc::new(NullSink)),
        "stdout" => Ok(Arc::new(StdoutSink::new())),
        "file" => {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(SinkUrlError::MissingPath(url.to_owned()));
            }
            let sink = FileSink::open(path).await.map_err(|e| SinkUrlError::Open {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            Ok(Arc::new(sink))
        }
        "http" | "https" => webhook_sink(url),
        "redis" | "rediss" => redis_sink(url).await,
        "nats" => nats_sink(url).await,
        "amqp" | "amqps" => amqp_sink(url).await,
        "mqtt" => mqtt_sink(url),
        "kafka" => kafka_sink(url),
        other => Err(SinkUrlError::Unsupported(other.to_owned())),
    }
}

#[cfg(feature = "webhook")]
fn webhook_sink(url: &str) -> Result<Arc<dyn Sink>, SinkUrlError> {
    let secret = std::env::var("OUTBOX_WEBHOOK_SECRET")
        .ok()
        .filter(|s| !s.is_empty());
    let sink = WebhookSink::new(url, secret.as_deref(), std::time::Duration::from_secs(10))?;
    Ok(Arc::new(sink))
}

#[cfg(not(feature = "webhook"))]
fn webhook_sink(_: &str) -> Result<Arc<dyn Sink>, SinkUrlError> {
    Err(SinkUrlError::NeedsFeature {
        scheme: "http".into(),
        feature: "webhook",
    })
}

#[cfg(feature = "redis")]
async fn redis_sink(url: &str) -> Result<Arc<dyn Sink>, SinkUrlError> {
    let (base, options) = url_options(url);
    let bad = |reason: String| SinkUrlError::Invalid {
        url: url.to_owned(),
        reason,
    };
    let (mut prefix, mut max_len) = ("", None);
    for (name, value) in options {
        match name {
            "prefix" => prefix = value,
            "maxlen" => {
                max_len = Some(
                    value
                        .parse()
                        .map_err(|_| bad(format!("maxlen {value:?} is not a number")))?,
                )
            }
            other => return Err(bad(format!("unknown option {other:?} (prefix, maxlen)"))),
        }
    }
    let sink = RedisSink::connect(base, prefix, max_len)
        .await
        .map_err(|e| bad(e.to_string()))?;
    Ok(Arc::new(sink))
}

#[cfg(not(feature = "redis"))]
async fn redis_sink(_: &str) -> Result<Arc<dyn Sink>, SinkUrlError> {
    Err(SinkUrlError::NeedsFeature {
        scheme: "redis".into(),
        feature: "redis",
    })
}

#[cfg(feature = "kafka")]
fn kafka_sink(url: &str) -> Result<Arc<dyn Sink>, SinkUrlError> {
    let (base, options) = url_options(url);
    let bad = |reason: String| SinkUrlError::Invalid {
        url: url.to_owned(),
        reason,
    };
    let bootstrap = base.trim_start_matches("kafka://").trim_end_matches('/');
    let (mut prefix, mut timeout) = ("", std::time::Duration::from_secs(30));
    for (name, value) in options {
        match name {
            "prefix" => prefix = value,
            "timeout_ms" => {
                let ms = value
                    .parse()
                    .map_err(|_| bad(format!("timeout_ms {value:?} is not a number")))?;
                timeout = std::time::Duration::from_millis(ms);
            }
            other => {
                return Err(bad(format!(
                    "unknown option {other:?} (prefix, timeout_ms)"
                )));
            }
        }
    }
    let sink = KafkaSink::new(bootstrap, prefix, timeout).map_err(|e| bad(e.to_string()))?;
    Ok(Arc::new(sink))
}

#[cfg(not(feature = "kafka"))]
fn kafka_sink(_: &str) -> Result<Arc<dyn Sink>, SinkUrlError> {
    Err(SinkUrlError::NeedsFeature {
        scheme: "kafka".into(),
        feature: "kafka",
    })
}

#[cfg(feature = "mqtt")]
fn mqtt_sink(url: &str) -> Result<Arc<dyn Sink>, SinkUrlError> {
    let (base, options) = url_options(url);
    let bad = |reason: String| SinkUrlError::Invalid {
        url: url.to_owned(),
        reason,
    };
    let address = base.trim_start_matches("mqtt://").trim_end_matches('/');
    let (host, port) = match address.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse()
                .map_err(|_| bad(format!("port {p:?} is not a number")))?,
        ),
        None => (address, 1883),
    };
    if host.is_empty() {
        return Err(bad("no host".into()));
    }
    let mut prefix = "";
    let mut client_id = format!("outbox-{}", std::process::id());
    for (name, value) in options {
        match name {
            "prefix" => prefix = value,
            "client_id" => client_id = value.to_owned(),
            other => return Err(bad(format!("unknown option {other:?} (prefix, client_id)"))),
        }
    }
    Ok(Arc::new(MqttSink::connect(host, port, &client_id, prefix)))
}

#[cfg(not(feature = "mqtt"))]
fn mqtt_sink(_: &str) -> Result<Arc<dyn Sink>, SinkUrlError> {
    Err(SinkUrlError::NeedsFeature {
        scheme: "mqtt".into(),
        feature: "mqtt",
    })
}

#[cfg(feature = "amqp")]
async fn amqp_sink(url: &str) -> Result<Arc<dyn Sink>, SinkUrlError> {
    let (base, options) = url_options(url);
    let bad = |reason: String| SinkUrlError::Invalid {
        url: url.to_owned(),
        reason,
    };
    let mut exchange = "outbox";
    for (name, value) in options {
        match name {
            "exchange" => exchange = value,
            other => return Err(bad(format!("unknown option {other:?} (exchange)"))),
        }
    }
    let sink = AmqpSink::connect(base, exchange)
        .await
        .map_err(|e| bad(e.to_string()))?;
    Ok(Arc::new(sink))
}

#[cfg(not(feature = "amqp"))]
async fn amqp_sink(_: &str) -> Result<Arc<dyn Sink>, SinkUrlError> {
    Err(SinkUrlError::NeedsFeature {
        scheme: "amqp".into(),
        feature: "amqp",
    })
}

#[cfg(feature = "nats")]
async fn nats_sink(url: &str) -> Result<Arc<dyn Sink>, SinkUrlError> {
    let (base, options) = url_options(url);
    let bad = |reason: String| SinkUrlError::Invalid {
        url: url.to_owned(),
        reason,
    };
    let mut prefix = "";
    for (name, value) in options {
        match name {
            "prefix" => prefix = value,
            other => return Err(bad(format!("unknown option {other:?} (prefix)"))),
        }
    }
    let sink = NatsSink::connect(base, prefix)
        .await
        .map_err(|e| bad(e.to_string()))?;
    Ok(Arc::new(sink))
}

#[cfg(not(feature = "nats"))]
async fn nats_sink(_: &str) -> Result<Arc<dyn Sink>, SinkUrlError> {
    Err(SinkUrlError::NeedsFeature {
        scheme: "nats".into(),
        feature: "nats",
    })
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
    pub id: uuid::Uuid,
    pub topic: &'a str,
    #[serde(rename = "type")]
    pub message_type: &'a str,
    pub key: Option<&'a str>,
    pub payload: serde_json::Value,
    pub content_type: &'a str,
    pub headers: &'a std::collections::BTreeMap<String, String>,
    pub attempt: i32,
    pub seq: i64,
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
