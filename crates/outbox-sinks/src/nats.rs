//! NATS JetStream: each message is published to the subject named after its topic (with an
//! optional prefix), with `Nats-Msg-Id` = the message id so the server drops duplicates within
//! its duplicate window, and the CloudEvents attributes as headers. A batch is sent pipelined
//! and its publish acks awaited together. A subject that no stream captures is an error the
//! operator sees (the message is retried, then dead with that reason), never a silent loss.
//! While the client is disconnected a batch fails at once instead of waiting out one ack
//! timeout per message: the relay's backoff, not the sink, paces the retries.

use std::str::FromStr;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::connection::State;
use async_nats::jetstream::{self, Context};
use async_trait::async_trait;
use outbox_core::{Delivery, Message, Sink, SinkError};

use crate::cloudevents;

/// Publishes to NATS JetStream with `Nats-Msg-Id` set to the message id, a message delivered
/// once its stream acks it (see the module docs); made with [`NatsSink::connect`] or from a
/// `nats://` URL.
pub struct NatsSink {
    client: async_nats::Client,
    js: Context,
    subject_prefix: String,
}

impl NatsSink {
    /// How long a batch waits for its acks from the stream, unless told otherwise.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Connects to `url` (`nats://host:port`). The client reconnects by itself; while the
    /// server is away publishes fail and the relay retries them. `timeout` bounds the wait
    /// for a batch's acks.
    pub async fn connect(
        url: &str,
        subject_prefix: &str,
        timeout: Duration,
    ) -> Result<Self, async_nats::ConnectError> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(url)
            .await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .build(client.clone());
        Ok(Self {
            client,
            js,
            subject_prefix: subject_prefix.to_owned(),
        })
    }

    /// The message's headers and then the sink's, which replace any namesake (a stored
    /// `Nats-Msg-Id` would make JetStream drop the message as a duplicate of another).
    fn headers(m: &Message) -> Result<HeaderMap, SinkError> {
        let mut h = HeaderMap::new();
        for (name, value) in cloudevents::message_headers(m)? {
            // The client panics on names it cannot send; `message_headers` let through only
            // names every transport can carry, and this keeps a panic impossible regardless.
            let name = async_nats::HeaderName::from_str(name).map_err(|e| {
                SinkError::permanent(format!(
                    "cannot send message {}: header {name:?}: {e}",
                    m.id
                ))
            })?;
            h.append(name, value);
        }
        h.insert("Nats-Msg-Id", m.id.to_string().as_str());
        h.insert("content-type", m.content_type.as_str());
        for (name, value) in cloudevents::attributes(m, cloudevents::DEFAULT_SOURCE) {
            h.insert(name.as_str(), value.as_str());
        }
        Ok(h)
    }
}

fn explain(e: impl std::fmt::Display, subject: &str) -> SinkError {
    let text = e.to_string();
    if text.contains("no responders") || text.contains("no stream found") {
        SinkError::transient(format!("no JetStream stream captures subject {subject:?}"))
    } else {
        SinkError::transient(format!("NATS publish to {subject:?}: {text}"))
    }
}

#[async_trait]
impl Sink for NatsSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        // Only a lost connection fails at once: right after `connect` the first connection may
        // still be in progress (Pending), and the ack timeout covers that wait.
        if self.client.connection_state() == State::Disconnected {
            let why = "NATS: not connected to the server (reconnecting)";
            return vec![Err(SinkError::transient(why)); batch.len()];
        }
        // Send everything first, then await the acks together: one round trip for the batch,
        // and one timeout, not one per message, when the acks do not come.
        let mut pending = Vec::with_capacity(batch.len());
        for m in batch {
            let subject = format!("{}{}", self.subject_prefix, m.topic);
            let headers = match Self::headers(m) {
                Ok(h) => h,
                Err(e) => {
                    pending.push((subject, Err(e)));
                    continue;
                }
            };
            let sent = self
                .js
                .publish_with_headers(subject.clone(), headers, m.payload.clone())
                .await
                .map_err(|e| explain(e, &subject));
            pending.push((subject, sent));
        }
        let acks = pending.into_iter().map(|(subject, sent)| async move {
            sent?.await.map(drop).map_err(|e| explain(e, &subject))
        });
        futures::future::join_all(acks).await
    }

    fn name(&self) -> &str {
        "nats"
    }
}
