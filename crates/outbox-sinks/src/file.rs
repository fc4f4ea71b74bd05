//! JSON-lines sinks: an append-only file and standard output.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use outbox_core::{Delivery, Message, Sink, SinkError};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::json_lines;

/// Appends one JSON line per message to a file. A batch is written, flushed and fsynced before
/// any of it is reported delivered, so an acked message is on disk.
pub struct FileSink {
    path: PathBuf,
    file: Mutex<tokio::fs::File>,
}

impl FileSink {
    /// Opens (or creates) `path` for appending.
    pub async fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await?;
        Ok(Self {
            path,
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[async_trait]
impl Sink for FileSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        let mut file = self.file.lock().await;
        let written = async {
            write_all(&mut *file, &json_lines(batch)).await?;
            file.sync_data().await
        }
        .await;
        outcome(batch.len(), written, &self.path.display().to_string())
    }

    fn name(&self) -> &str {
        "file"
    }
}

/// Writes one JSON line per message to standard output, flushed per batch.
pub struct StdoutSink {
    out: Mutex<tokio::io::Stdout>,
}

impl StdoutSink {
    pub fn new() -> Self {
        Self {
            out: Mutex::new(tokio::io::stdout()),
        }
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Sink for StdoutSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        let mut out = self.out.lock().await;
        let written = write_all(&mut *out, &json_lines(batch)).await;
        outcome(batch.len(), written, "stdout")
    }

    fn name(&self) -> &str {
        "stdout"
    }
}

async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// A write failure (disk full, closed pipe) is transient for the whole batch: nothing of it
/// is acked, and the relay retries with backoff.
fn outcome(n: usize, written: std::io::Result<()>, target: &str) -> Vec<Delivery> {
    match written {
        Ok(()) => vec![Ok(()); n],
        Err(e) => vec![Err(SinkError::transient(format!("writing to {target}: {e}"))); n],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use outbox_core::Status;
    use uuid::Uuid;

    fn message(n: i64, payload: &[u8], content_type: &str) -> Message {
        Message {
            id: Uuid::now_v7(),
            seq: n,
            topic: "orders".into(),
            message_type: "order.created".into(),
            key: Some(format!("k{n}")),
            partition: 3,
            payload: payload.to_vec().into(),
            content_type: content_type.into(),
            headers: [("traceparent".to_string(), "00-abc-def-01".to_string())].into(),
            created_at: Utc::now(),
            available_at: Utc::now(),
            attempts: 2,
            last_error: None,
            status: Status::InFlight,
        }
    }

    #[tokio::test]
    async fn file_sink_appends_one_json_line_per_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let sink = FileSink::open(&path).await.unwrap();
        let batch = [
            message(1, br#"{"amount":"10.00"}"#, outbox_core::JSON),
            message(2, b"plain text", "text/plain"),
        ];
        assert_eq!(sink.publish(&batch).await, vec![Ok(()), Ok(())]);
        assert_eq!(sink.publish(&batch[..1]).await, vec![Ok(())]);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["id"], batch[0].id.to_string());
        assert_eq!(lines[0]["type"], "order.created");
        assert_eq!(lines[0]["key"], "k1");
        assert_eq!(lines[0]["attempt"], 2);
        assert_eq!(lines[0]["payload"], serde_json::json!({"amount": "10.00"}));
        assert_eq!(lines[0]["headers"]["traceparent"], "00-abc-def-01");
        assert_eq!(lines[1]["payload"], "plain text");
    }

    #[tokio::test]
    async fn from_url_reports_bad_urls() {
        use crate::{SinkUrlError, from_url};
        assert!(matches!(
            from_url("nothing").await,
            Err(SinkUrlError::NoScheme(_))
        ));
        #[cfg(not(feature = "kafka"))]
        assert!(matches!(
            from_url("kafka://127.0.0.1:9092").await,
            Err(SinkUrlError::NeedsFeature {
                feature: "kafka",
                ..
            })
        ));
        assert!(
            matches!(from_url("gopher://x").await, Err(SinkUrlError::Unsupported(s)) if s == "gopher")
        );
        assert!(matches!(
            from_url("file:").await,
            Err(SinkUrlError::MissingPath(_))
        ));
        assert!(matches!(
            from_url("file:/nonexistent-dir/x/y.jsonl").await,
            Err(SinkUrlError::Open { .. })
        ));
        assert_eq!(from_url("null:").await.unwrap().name(), "null");
    }
}
