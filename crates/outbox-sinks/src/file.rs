//! JSON-lines sinks: an append-only file and standard output.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use outbox_core::{Delivery, Message, Sink, SinkError};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::json_lines;

/// Appends one JSON line per message to a file. A batch is written, flushed and fsynced before
/// any of it is reported delivered, so an acked message is on disk. A reader never finds a torn
/// line: a batch whose write fails half-way (disk full, size limit) is cut back before anything
/// else is written, and a torn tail left by a crash is cut when the file is opened. One relay
/// process per file: another process appending at the same time could be cut.
pub struct FileSink {
    path: PathBuf,
    file: Mutex<Appender>,
}

/// The open file, and where to cut it back to after a failed write.
struct Appender {
    file: tokio::fs::File,
    /// False for what cannot be cut back (a pipe, `/dev/full`): nothing of it is on disk.
    regular: bool,
    /// Set while a failed write may have left part of a batch after this length.
    torn_after: Option<u64>,
}

impl FileSink {
    /// Opens (or creates) `path` for appending.
    pub async fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let existed = tokio::fs::try_exists(&path).await.unwrap_or(true);
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .await?;
        if !existed {
            sync_parent(&path).await?;
        }
        let regular = file.metadata().await?.is_file();
        let mut appender = Appender {
            file,
            regular,
            torn_after: None,
        };
        if regular {
            // A crash in the middle of a write leaves a torn last line: cut it.
            appender.torn_after = Some(whole_lines_len(&mut appender.file).await?);
            appender.cut_back().await?;
        }
        Ok(Self {
            path,
            file: Mutex::new(appender),
        })
    }

    /// The file this sink appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Appender {
    /// Truncates what a failed write left behind; a no-op when none did.
    async fn cut_back(&mut self) -> std::io::Result<()> {
        if let Some(len) = self.torn_after {
            self.file.set_len(len).await?;
            self.file.sync_data().await?;
            self.torn_after = None;
        }
        Ok(())
    }

    async fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        // A failed cut-back fails this batch too: appending after a torn line would hide it.
        self.cut_back().await?;
        let before = match self.regular {
            true => Some(self.file.metadata().await?.len()),
            false => None,
        };
        let written = async {
            write_all(&mut self.file, bytes).await?;
            self.file.sync_data().await
        }
        .await;
        if written.is_err() {
            self.torn_after = before;
            // Best effort now; the next batch tries again before it writes.
            let _ = self.cut_back().await;
        }
        written
    }
}

/// The length of the file up to and including its last newline, read from the end.
async fn whole_lines_len(file: &mut tokio::fs::File) -> std::io::Result<u64> {
    let mut end = file.metadata().await?.len();
    let mut buf = vec![0; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start)).await?;
        file.read_exact(chunk).await?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// A new file's directory entry must reach the disk too, or a crash can lose the whole file
/// with every line that was acked into it.
async fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    tokio::fs::File::open(parent).await?.sync_all().await
}

#[async_trait]
impl Sink for FileSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        let written = self.file.lock().await.append(&json_lines(batch)).await;
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
    /// A sink writing to this process's standard output.
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
