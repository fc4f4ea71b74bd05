//! # outbox-sinks
//!
//! Where the relay delivers, chosen by URL with [`from_url`]:
//!
//! | URL | sink | delivered means |
//! |---|---|---|
//! | `file:PATH` | [`FileSink`]: one JSON line per message, appended | written and fsynced |
//! | `stdout:` | [`StdoutSink`]: one JSON line per message | written and flushed |
//! | `null:` | [`NullSink`]: discards, for benchmarks | at once |
//!
//! Every sink returns one outcome per message; an I/O failure is transient (the relay retries
//! with backoff), never a silent drop. Each line carries the message id, which is the
//! deduplication key downstream: the relay delivers at least once.

mod file;

use std::sync::Arc;

use async_trait::async_trait;
use outbox_core::{Delivery, Message, Sink};
use serde::Serialize;

pub use file::{FileSink, StdoutSink};

/// A sink URL that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SinkUrlError {
    #[error("sink {0:?} has no scheme; expected one of file:PATH, stdout:, null:")]
    NoScheme(String),
    #[error(
        "sink scheme {0:?} is not supported by this build; supported: file:PATH, stdout:, null:"
    )]
    Unsupported(String),
    #[error("sink {0:?} needs a path, as in file:/var/lib/outbox/events.jsonl")]
    MissingPath(String),
    #[error("cannot open sink file {path}: {reason}")]
    Open { path: String, reason: String },
}

/// Builds the sink a URL names.
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
        other => Err(SinkUrlError::Unsupported(other.to_owned())),
    }
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
