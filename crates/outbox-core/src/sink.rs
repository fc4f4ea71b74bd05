//! Where the relay delivers: the [`Sink`] trait and the in-process handler sink.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, StreamExt};

use crate::message::Message;

/// Why one message was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// Worth retrying later (broker down, timeout, 5xx). `retry_after` overrides the backoff
    /// when the other side said how long to wait.
    #[error("{message}")]
    Transient {
        /// What went wrong, as the sink saw it (recorded as the message's last error).
        message: String,
        /// How long the other side asked to wait (an HTTP `Retry-After`), if it said.
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help (malformed payload, rejected by the receiver): dead at once.
    #[error("{0}")]
    Permanent(String),
}

impl SinkError {
    /// A failure worth retrying, after the retry policy's backoff.
    pub fn transient(message: impl Into<String>) -> Self {
        SinkError::Transient {
            message: message.into(),
            retry_after: None,
        }
    }

    /// A failure that retrying cannot fix: the message goes dead at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        SinkError::Permanent(message.into())
    }

    /// True for [`SinkError::Permanent`]: the message goes dead without another attempt.
    pub fn is_permanent(&self) -> bool {
        matches!(self, SinkError::Permanent(_))
    }
}

/// The outcome for one message of a batch.
pub type Delivery = Result<(), SinkError>;

/// Holds a sink to its contract of one outcome per message, for whoever collects outcomes
/// (the relay, a router). Outcomes are matched to messages by position, so when a sink
/// returns another count none of them can be trusted: every message of the batch fails
/// (transient) and is delivered again, rather than acked on a guess.
pub fn one_outcome_each(sink: &str, messages: usize, outcomes: Vec<Delivery>) -> Vec<Delivery> {
    if outcomes.len() == messages {
        return outcomes;
    }
    let err = SinkError::transient(format!(
        "sink {sink} returned {} outcomes for {messages} messages",
        outcomes.len()
    ));
    vec![Err(err); messages]
}

/// The circuit breaker of one sink, as health checks and metrics report it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Circuit {
    /// The sink's [`Sink::name`].
    pub sink: String,
    /// True while the sink is not called and its messages fail at once.
    pub open: bool,
    /// Batches in a row that failed entirely.
    pub failures: u32,
}

/// A destination for messages.
///
/// `publish` receives a batch and returns exactly one outcome per message, in the batch's
/// order. A batch never holds two messages with the same key, so a sink may deliver its
/// messages concurrently; it must not let one message's failure fail the others. Returning
/// from `publish` with `Ok` for a message means it is durably handed over: the relay acks it
/// next, and a crash in between only causes a redelivery with the same id.
#[async_trait]
pub trait Sink: Send + Sync {
    /// Delivers `batch` and returns one outcome per message, in the batch's order (see the trait
    /// docs for the contract).
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery>;

    /// A short name for logs and metrics (`file`, `nats`, …).
    fn name(&self) -> &str;

    /// The circuit breakers inside this sink (none for a plain sink; one per sink in a
    /// router of breakers).
    fn circuits(&self) -> Vec<Circuit> {
        Vec::new()
    }
}

#[async_trait]
impl<S: Sink + ?Sized> Sink for Arc<S> {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        (**self).publish(batch).await
    }
    fn name(&self) -> &str {
        (**self).name()
    }
    fn circuits(&self) -> Vec<Circuit> {
        (**self).circuits()
    }
}

#[async_trait]
impl<S: Sink + ?Sized> Sink for Box<S> {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        (**self).publish(batch).await
    }
    fn name(&self) -> &str {
        (**self).name()
    }
    fn circuits(&self) -> Vec<Circuit> {
        (**self).circuits()
    }
}

/// Delivers to an async function in this process: the seed's worker that "processes the
/// message". Messages of a batch run concurrently, up to `concurrency` at a time (their keys
/// differ, so order per key holds).
pub struct HandlerSink<F> {
    handler: F,
    concurrency: usize,
}

impl<F, Fut> HandlerSink<F>
where
    F: Fn(Message) -> Fut + Send + Sync,
    Fut: Future<Output = Delivery> + Send,
{
    /// A sink that calls `handler` for each message, up to 16 at a time (see
    /// [`HandlerSink::concurrency`]).
    pub fn new(handler: F) -> Self {
        Self {
            handler,
            concurrency: 16,
        }
    }

    /// How many messages of a batch the handler processes at once (default 16).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }
}

#[async_trait]
impl<F, Fut> Sink for HandlerSink<F>
where
    F: Fn(Message) -> Fut + Send + Sync,
    Fut: Future<Output = Delivery> + Send,
{
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        stream::iter(batch.iter().cloned().map(&self.handler))
            .buffered(self.concurrency)
            .collect()
            .await
    }

    fn name(&self) -> &str {
        "handler"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Status;
    use chrono::Utc;
    use uuid::Uuid;

    fn msg(seq: i64) -> Message {
        Message {
            id: Uuid::now_v7(),
            seq,
            topic: "t".into(),
            message_type: "e".into(),
            key: None,
            partition: 0,
            payload: "{}".into(),
            content_type: crate::JSON.into(),
            headers: Default::default(),
            created_at: Utc::now(),
            available_at: Utc::now(),
            attempts: 1,
            last_error: None,
            status: Status::InFlight,
        }
    }

    #[tokio::test]
    async fn handler_outcomes_follow_batch_order() {
        let sink = HandlerSink::new(|m: Message| async move {
            if m.seq % 2 == 0 {
                Ok(())
            } else {
                Err(SinkError::permanent(format!("odd {}", m.seq)))
            }
        });
        let out = sink.publish(&[msg(0), msg(1), msg(2)]).await;
        assert_eq!(out[0], Ok(()));
        assert_eq!(out[1], Err(SinkError::permanent("odd 1")));
        assert_eq!(out[2], Ok(()));
    }
}
