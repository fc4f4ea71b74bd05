//! NATS JetStream: a durable pull consumer with explicit acks on a stream.
//!
//! At start the stream is created when missing (capturing [`NatsConfig::subjects`]) and the
//! durable consumer likewise; an existing stream or consumer is used as it is. Each message is
//! processed through the inbox, then acked. A handler failure is a `Nak` with the retry delay,
//! so the server redelivers it; a message that can never be processed (no parsable id, or a
//! permanent handler error) is terminated (`Term`), which the server reports as a
//! `$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED` advisory instead of redelivering it forever.
//!
//! With the default `max_ack_pending` of 1 the server hands out the next message only once the
//! previous one is acked, so messages are processed in stream order, a failed one included.
//! Several processes may share one durable consumer: each message goes to one of them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{PullConsumer, pull};
use async_nats::jetstream::{self, AckKind, stream};
use futures::StreamExt;

use crate::error::ConsumerError;
use crate::inbox::InboxStore;
use crate::process::{Handler, Outcome, Processor, log_outcome};
use crate::wire::Received;

/// Where and how to consume.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NatsConfig {
    /// The stream to read; created with `subjects` when missing.
    pub stream: String,
    /// The subjects the stream captures when this consumer creates it.
    pub subjects: Vec<String>,
    /// The durable consumer's name: its position survives restarts.
    pub durable: String,
    /// Only these subjects of the stream (empty: all).
    pub filter_subject: String,
    /// Messages handed out but not yet acked; 1 keeps stream order through failures.
    pub max_ack_pending: i64,
    /// A message not acked within this time is redelivered (a consumer that died with it).
    pub ack_wait: Duration,
    /// Deliveries after which the server gives up on a failing message and reports it with a
    /// `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES` advisory; -1 (the default) retries forever.
    pub max_deliver: i64,
}

impl NatsConfig {
    /// The durable consumer `durable` of `stream` (created capturing `subjects` when missing),
    /// with the defaults for the rest.
    pub fn new(
        stream: impl Into<String>,
        subjects: Vec<String>,
        durable: impl Into<String>,
    ) -> Self {
        Self {
            stream: stream.into(),
            subjects,
            durable: durable.into(),
            filter_subject: String::new(),
            max_ack_pending: 1,
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
        }
    }

    /// Sets [`NatsConfig::stream`].
    pub fn stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = stream.into();
        self
    }

    /// Sets [`NatsConfig::subjects`].
    pub fn subjects(mut self, subjects: Vec<String>) -> Self {
        self.subjects = subjects;
        self
    }

    /// Sets [`NatsConfig::durable`].
    pub fn durable(mut self, durable: impl Into<String>) -> Self {
        self.durable = durable.into();
        self
    }

    /// Sets [`NatsConfig::filter_subject`].
    pub fn filter_subject(mut self, filter_subject: impl Into<String>) -> Self {
        self.filter_subject = filter_subject.into();
        self
    }

    /// Sets [`NatsConfig::max_ack_pending`].
    pub fn max_ack_pending(mut self, max_ack_pending: i64) -> Self {
        self.max_ack_pending = max_ack_pending;
        self
    }

    /// Sets [`NatsConfig::ack_wait`].
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// Sets [`NatsConfig::max_deliver`].
    pub fn max_deliver(mut self, max_deliver: i64) -> Self {
        self.max_deliver = max_deliver;
        self
    }
}

/// Consumes a JetStream stream through a durable pull consumer, each message processed
/// through the inbox and then acked (see the module docs). Made with [`NatsConsumer::connect`],
/// then [`NatsConsumer::run`].
pub struct NatsConsumer<S: InboxStore, H> {
    processor: Arc<Processor<S, H>>,
    consumer: PullConsumer,
}

impl<S: InboxStore, H: Handler<S::Db>> NatsConsumer<S, H> {
    /// Connects to `url` and creates the stream and the durable consumer when missing.
    pub async fn connect(
        url: &str,
        config: &NatsConfig,
        processor: Processor<S, H>,
    ) -> Result<Self, ConsumerError> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(url)
            .await
            .map_err(|e| ConsumerError::connect(url, e))?;
        let js = jetstream::new(client);
        let stream = js
            .get_or_create_stream(stream::Config {
                name: config.stream.clone(),
                subjects: config.subjects.clone(),
                ..stream::Config::default()
            })
            .await
            .map_err(|e| ConsumerError::setup(format!("stream {}", config.stream), e))?;
        let consumer = stream
            .get_or_create_consumer(
                &config.durable,
                pull::Config {
                    durable_name: Some(config.durable.clone()),
                    filter_subject: config.filter_subject.clone(),
                    max_ack_pending: config.max_ack_pending,
                    ack_wait: config.ack_wait,
                    max_deliver: config.max_deliver,
                    ..pull::Config::default()
                },
            )
            .await
            .map_err(|e| ConsumerError::setup(format!("consumer {}", config.durable), e))?;
        Ok(Self {
            processor: Arc::new(processor),
            consumer,
        })
    }

    /// Receives and processes until `stop` completes; the message in hand is finished and
    /// acked first.
    pub async fn run(self, stop: impl Future<Output = ()> + Send) -> Result<(), ConsumerError> {
        let mut messages = self
            .consumer
            .messages()
            .await
            .map_err(|e| ConsumerError::Receive(e.to_string()))?;
        let mut purge = self.processor.purge_ticker();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return Ok(()),
                _ = purge.tick() => self.processor.purge_expired().await,
                next = messages.next() => match next {
                    None => return Err(ConsumerError::Receive("the message stream ended".into())),
                    // Missed heartbeats and similar hiccups: the client resubscribes by itself.
                    Some(Err(e)) => tracing::warn!("NATS receive: {e}"),
                    Some(Ok(msg)) => self.settle(msg).await,
                },
            }
        }
    }

    async fn settle(&self, msg: jetstream::Message) {
        let consumer = &self.processor.config().name;
        let ack = match received(&msg).into_message() {
            Err(e) => {
                tracing::error!(consumer, subject = %msg.subject, "unreadable message terminated: {e}");
                AckKind::Term
            }
            Ok(m) => {
                let outcome = self.processor.process(&m).await;
                log_outcome(consumer, &m, &outcome);
                match outcome {
                    Outcome::Handled | Outcome::Duplicate => AckKind::Ack,
                    Outcome::Retry { after, .. } => AckKind::Nak(Some(after)),
                    Outcome::Reject(_) => AckKind::Term,
                }
            }
        };
        // A lost ack only means a redelivery, which the inbox recognises.
        if let Err(e) = msg.ack_with(ack).await {
            tracing::warn!(consumer, "NATS ack failed: {e}");
        }
    }
}

fn received(msg: &jetstream::Message) -> Received {
    let headers = msg
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .filter_map(|(name, values)| Some((name.to_string(), values.first()?.to_string())))
        .collect();
    let info = msg.info().ok();
    Received {
        id: msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.to_string()),
        topic: msg.subject.to_string(),
        headers,
        payload: msg.payload.to_vec(),
        attempt: info
            .as_ref()
            .map_or(1, |i| i32::try_from(i.delivered).unwrap_or(i32::MAX)),
        seq: info.map_or(0, |i| i64::try_from(i.stream_sequence).unwrap_or(i64::MAX)),
        ..Received::default()
    }
}
