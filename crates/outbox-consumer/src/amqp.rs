//! RabbitMQ (AMQP 0-9-1): a durable queue bound to the outbox's topic exchange, manual acks.
//!
//! At start the exchange (durable, topic), the queue (durable) and its binding are declared;
//! declaring what exists is a no-op, so every instance may run it. Each delivery is processed
//! through the inbox, then acked. A handler failure is a `basic.nack` with requeue after the
//! retry delay; a message that can never be processed (no parsable id, or a permanent handler
//! error) is rejected without requeue: RabbitMQ moves it to the queue's dead-letter exchange
//! when [`AmqpConfig::dead_letter_exchange`] is set, and drops it otherwise (logged here).
//!
//! A classic queue redelivers a failing message until it is handled; to bound the attempts,
//! make the queue a quorum queue with a delivery limit (a RabbitMQ policy), after which the
//! broker dead-letters it too.
//!
//! With the default prefetch of 1 the broker sends the next delivery only after the previous
//! one is settled, and a requeued message goes back to its place, so the queue is processed
//! in order. Several processes may consume one queue: each message goes to one of them.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};

use crate::error::ConsumerError;
use crate::inbox::InboxStore;
use crate::process::{Handler, Outcome, Processor, log_outcome};
use crate::wire::Received;

/// Where and how to consume.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AmqpConfig {
    /// The topic exchange the relay publishes to (`outbox` unless `?exchange=` said otherwise).
    pub exchange: String,
    /// The durable queue of this consumer; instances sharing it share the work.
    pub queue: String,
    /// Routing-key pattern of the binding (`payments`, `payment.*`, `#`).
    pub binding: String,
    /// Deliveries in hand at once; 1 keeps the queue's order through failures.
    pub prefetch: u16,
    /// Rejected messages go to this exchange (set when the queue is first declared).
    pub dead_letter_exchange: Option<String>,
}

impl AmqpConfig {
    /// The durable queue `queue`, bound with the pattern `binding` to the `outbox` exchange.
    pub fn new(queue: impl Into<String>, binding: impl Into<String>) -> Self {
        Self {
            exchange: "outbox".into(),
            queue: queue.into(),
            binding: binding.into(),
            prefetch: 1,
            dead_letter_exchange: None,
        }
    }

    /// Sets [`AmqpConfig::exchange`].
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// Sets [`AmqpConfig::queue`].
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Sets [`AmqpConfig::binding`].
    pub fn binding(mut self, binding: impl Into<String>) -> Self {
        self.binding = binding.into();
        self
    }

    /// Sets [`AmqpConfig::prefetch`].
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Sets [`AmqpConfig::dead_letter_exchange`].
    pub fn dead_letter_exchange(mut self, dead_letter_exchange: Option<String>) -> Self {
        self.dead_letter_exchange = dead_letter_exchange;
        self
    }
}

/// Consumes a durable RabbitMQ queue with manual acks, each delivery processed through the
/// inbox and then acked (see the module docs). Made with [`AmqpConsumer::connect`], then
/// [`AmqpConsumer::run`].
pub struct AmqpConsumer<S: InboxStore, H> {
    processor: Arc<Processor<S, H>>,
    connection: Connection,
    deliveries: lapin::Consumer,
}

impl<S: InboxStore, H: Handler<S::Db>> AmqpConsumer<S, H> {
    /// Connects to `uri` (`amqp://user:pass@host:5672/vhost`), declares the topology and
    /// starts consuming.
    pub async fn connect(
        uri: &str,
        config: &AmqpConfig,
        processor: Processor<S, H>,
    ) -> Result<Self, ConsumerError> {
        let connection = Connection::connect(uri, ConnectionProperties::default())
            .await
            .map_err(|e| ConsumerError::connect(uri, e))?;
        let deliveries = declare_and_consume(&connection, config, &processor.config().name)
            .await
            .map_err(|e| ConsumerError::setup(format!("queue {}", config.queue), e))?;
        Ok(Self {
            processor: Arc::new(processor),
            connection,
            deliveries,
        })
    }

    /// Receives and processes until `stop` completes; the delivery in hand is finished and
    /// settled first, the ones prefetched but not started go back to the queue.
    pub async fn run(mut self, stop: impl Future<Output = ()> + Send) -> Result<(), ConsumerError> {
        let mut purge = self.processor.purge_ticker();
        tokio::pin!(stop);
        let result = loop {
            tokio::select! {
                () = &mut stop => break Ok(()),
                _ = purge.tick() => self.processor.purge_expired().await,
                next = self.deliveries.next() => match next {
                    None => break Err(ConsumerError::Receive("the consumer was cancelled".into())),
                    Some(Err(e)) => break Err(ConsumerError::Receive(e.to_string())),
                    Some(Ok(delivery)) => self.settle(delivery).await,
                },
            }
        };
        let _ = self.connection.close(200, "consumer stopped".into()).await;
        result
    }

    async fn settle(&self, delivery: Delivery) {
        let consumer = &self.processor.config().name;
        let outcome = match received(&delivery).into_message() {
            Err(e) => {
                tracing::error!(consumer, routing_key = %delivery.routing_key, "unreadable message rejected: {e}");
                Outcome::Reject(e.to_string())
            }
            Ok(m) => {
                let outcome = self.processor.process(&m).await;
                log_outcome(consumer, &m, &outcome);
                outcome
            }
        };
        let settled = match outcome {
            Outcome::Handled | Outcome::Duplicate => delivery.ack(BasicAckOptions::default()).await,
            Outcome::Retry { after, .. } => {
                // RabbitMQ redelivers a requeued message at once: the delay is spent here.
                tokio::time::sleep(after).await;
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                delivery.nack(requeue).await
            }
            Outcome::Reject(_) => delivery.reject(BasicRejectOptions { requeue: false }).await,
        };
        // A lost ack only means a redelivery, which the inbox recognises.
        if let Err(e) = settled {
            tracing::warn!(consumer, "AMQP ack failed: {e}");
        }
    }
}

async fn declare_and_consume(
    connection: &Connection,
    config: &AmqpConfig,
    tag: &str,
) -> Result<lapin::Consumer, lapin::Error> {
    let ch = connection.create_channel().await?;
    ch.basic_qos(config.prefetch, BasicQosOptions::default())
        .await?;
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    ch.exchange_declare(
        config.exchange.as_str().into(),
        ExchangeKind::Topic,
        durable_exchange,
        FieldTable::default(),
    )
    .await?;
    let mut arguments = FieldTable::default();
    if let Some(dlx) = &config.dead_letter_exchange {
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(dlx.as_str().into()),
        );
    }
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(config.queue.as_str().into(), durable_queue, arguments)
        .await?;
    ch.queue_bind(
        config.queue.as_str().into(),
        config.exchange.as_str().into(),
        config.binding.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.basic_consume(
        config.queue.as_str().into(),
        format!("{tag}-{}", uuid::Uuid::now_v7().simple()).into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
}

fn received(delivery: &Delivery) -> Received {
    let props = &delivery.properties;
    let headers = props
        .headers()
        .as_ref()
        .map(|t| {
            t.inner()
                .iter()
                .filter_map(|(name, value)| Some((name.to_string(), text(value)?)))
                .collect()
        })
        .unwrap_or_default();
    Received {
        id: props.message_id().as_ref().map(|s| s.to_string()),
        topic: delivery.routing_key.to_string(),
        message_type: props.kind().as_ref().map(|s| s.to_string()),
        content_type: props.content_type().as_ref().map(|s| s.to_string()),
        headers,
        payload: delivery.data.clone(),
        // Classic queues only say whether a delivery is a redelivery.
        attempt: if delivery.redelivered { 2 } else { 1 },
        seq: i64::try_from(delivery.delivery_tag).unwrap_or(i64::MAX),
        ..Received::default()
    }
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}
