//! Redis Streams: `XADD` to a stream named after the topic (with an optional prefix and an
//! approximate `MAXLEN`), all messages of a batch in one pipeline. Entry fields: `id` (the
//! deduplication key: streams keep duplicates, consumers drop them), `type`, `key`,
//! `content_type`, `payload`, `headers` (JSON), the CloudEvents attributes, and the W3C trace
//! context as fields of their own (`traceparent`, `tracestate`) where consumers' tracing
//! libraries look for it.

use async_trait::async_trait;
use outbox_core::{Delivery, Message, Sink, SinkError, trace};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::cloudevents;

/// Appends to Redis Streams with `XADD`, one stream per topic (see the module docs); made with
/// [`RedisSink::connect`] or from a `redis://` URL.
pub struct RedisSink {
    conn: ConnectionManager,
    stream_prefix: String,
    max_len: Option<usize>,
}

impl RedisSink {
    /// How long a batch waits for its replies, unless told otherwise.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Connects to `url` (`redis://host:port[/db]`); the connection is re-established by itself
    /// after the server restarts. A batch sent while the server is unreachable fails within a
    /// few seconds (two quick reconnection attempts, bounded connect and reply waits) rather
    /// than after the client's default dozen seconds of retries, so the relay's backoff paces
    /// the retries and a server that accepts but never answers cannot hang the relay.
    /// `timeout` bounds the wait for a batch's replies (and for a connection, at most 5 s).
    pub async fn connect(
        url: &str,
        stream_prefix: &str,
        max_len: Option<usize>,
        timeout: Duration,
    ) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1))
            .set_connection_timeout(Some(timeout.min(Duration::from_secs(5))))
            .set_response_timeout(Some(timeout));
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(Self {
            conn,
            stream_prefix: stream_prefix.to_owned(),
            max_len,
        })
    }

    fn xadd(&self, m: &Message) -> redis::Cmd {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(format!("{}{}", self.stream_prefix, m.topic));
        if let Some(n) = self.max_len {
            cmd.arg("MAXLEN").arg("~").arg(n);
        }
        cmd.arg("*")
            .arg("id")
            .arg(m.id.to_string())
            .arg("type")
            .arg(&m.message_type)
            .arg("key")
            .arg(m.key.as_deref().unwrap_or(""))
            .arg("content_type")
            .arg(&m.content_type)
            .arg("payload")
            .arg(&m.payload[..])
            .arg("headers")
            .arg(serde_json::to_string(&m.headers).unwrap_or_default());
        for (name, value) in cloudevents::attributes(m, cloudevents::DEFAULT_SOURCE) {
            cmd.arg(name).arg(value);
        }
        for name in [trace::TRACEPARENT, trace::TRACESTATE] {
            if let Some(value) = m.headers.get(name) {
                cmd.arg(name).arg(value);
            }
        }
        cmd
    }
}

#[async_trait]
impl Sink for RedisSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        let mut pipe = redis::pipe();
        // Per-command results: one refused XADD must not fail its batch-mates.
        pipe.ignore_errors();
        for m in batch {
            pipe.add_command(self.xadd(m));
        }
        let mut conn = self.conn.clone();
        match pipe.query_async::<Vec<redis::Value>>(&mut conn).await {
            Ok(values) => {
                let mut values = values.into_iter();
                batch
                    .iter()
                    .map(|_| match values.next() {
                        Some(redis::Value::ServerError(e)) => {
                            Err(SinkError::transient(format!("XADD: {e:?}")))
                        }
                        Some(_) => Ok(()),
                        None => Err(SinkError::transient("XADD: no reply")),
                    })
                    .collect()
            }
            Err(e) => vec![Err(SinkError::transient(format!("redis: {e}"))); batch.len()],
        }
    }

    fn name(&self) -> &str {
        "redis"
    }
}
