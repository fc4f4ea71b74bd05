//! RabbitMQ (AMQP 0-9-1): each message is published to a durable topic exchange (default
//! `outbox`, declared when missing) with routing key = topic, persistent, `message_id` = the
//! message id, `type` = the message type, and the CloudEvents attributes as headers. The channel
//! is in publisher-confirm mode and messages are `mandatory`: a message counts as delivered only
//! when the broker confirms it, and a message no queue is bound for comes back as an error
//! instead of being dropped. A batch is published pipelined and its confirms awaited together.
//! A lost connection is re-established on the next batch. Connecting and each batch's
//! confirms are bounded in time, so a broker that accepts connections but never answers fails
//! the batch (transient) instead of holding the relay.

use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};

use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use outbox_core::{Delivery, Message, Sink, SinkError};
use tokio::sync::Mutex;

use crate::cloudevents;

/// The longest wait for a connection; a shorter confirm timeout shortens it too.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes to a RabbitMQ topic exchange with publisher confirms (see the module docs); made
/// with [`AmqpSink::connect`] or from an `amqp://` URL.
pub struct AmqpSink {
    uri: String,
    exchange: String,
    link: Mutex<Option<(Connection, Channel)>>,
    connect_timeout: Duration,
    confirm_timeout: Duration,
}

impl AmqpSink {
    /// How long a batch waits for its confirms, unless told otherwise. With the connect
    /// timeout it stays below the relay's default 30 s lease, so a batch fails before another
    /// relay may claim its messages again.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

    /// Connects to `uri` (`amqp://user:pass@host:5672/vhost`) and declares `exchange`.
    /// `timeout` bounds the wait for a batch's confirms (and for a connection).
    pub async fn connect(
        uri: &str,
        exchange: &str,
        timeout: Duration,
    ) -> Result<Self, lapin::Error> {
        let sink = Self {
            uri: uri.to_owned(),
            exchange: exchange.to_owned(),
            link: Mutex::new(None),
            connect_timeout: timeout.min(CONNECT_TIMEOUT),
            confirm_timeout: timeout,
        };
        sink.channel().await?;
        Ok(sink)
    }

    /// The open channel, reconnecting when the connection was lost.
    async fn channel(&self) -> Result<Channel, lapin::Error> {
        let mut link = self.link.lock().await;
        if let Some((conn, ch)) = &*link
            && conn.status().connected()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let conn = Connection::connect(&self.uri, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        ch.exchange_declare(
            self.exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
        *link = Some((conn, ch.clone()));
        Ok(ch)
    }

    async fn forget_channel(&self) {
        *self.link.lock().await = None;
    }

    fn properties(m: &Message) -> Result<BasicProperties, SinkError> {
        let mut headers = FieldTable::default();
        for (name, value) in cloudevents::headers(m, cloudevents::DEFAULT_SOURCE)? {
            headers.insert(name.into(), AMQPValue::LongString(value.into()));
        }
        Ok(BasicProperties::default()
            .with_message_id(m.id.to_string().into())
            .with_type(m.message_type.as_str().into())
            .with_content_type(m.content_type.as_str().into())
            .with_timestamp(m.created_at.timestamp().max(0) as u64)
            .with_delivery_mode(2)
            .with_headers(headers))
    }
}

fn outcome(confirmation: Result<Confirmation, lapin::Error>, topic: &str) -> Delivery {
    match confirmation {
        Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Ok(()),
        Ok(Confirmation::Ack(Some(_))) => Err(SinkError::transient(format!(
            "unroutable: no queue is bound to the exchange for routing key {topic:?}"
        ))),
        Ok(Confirmation::Nack(_)) => Err(SinkError::transient(
            "the broker refused the message (nack)",
        )),
        Err(e) => Err(SinkError::transient(format!("AMQP: {e}"))),
    }
}

impl AmqpSink {
    /// Publishes the batch pipelined, then awaits the confirms.
    async fn send(&self, ch: &Channel, batch: &[Message]) -> Vec<Delivery> {
        let mandatory = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let mut confirms = Vec::with_capacity(batch.len());
        for m in batch {
            let properties = match Self::properties(m) {
                Ok(p) => p,
                Err(e) => {
                    confirms.push(Err(e));
                    continue;
                }
            };
            let sent = ch
                .basic_publish(
                    self.exchange.as_str().into(),
                    m.topic.as_str().into(),
                    mandatory,
                    &m.payload,
                    properties,
                )
                .await;
            confirms.push(Ok(sent));
        }
        let mut out = Vec::with_capacity(batch.len());
        for (m, sent) in batch.iter().zip(confirms) {
            let confirmation = match sent {
                Err(unsendable) => {
                    out.push(Err(unsendable));
                    continue;
                }
                Ok(Ok(confirm)) => confirm.await,
                Ok(Err(e)) => Err(e),
            };
            out.push(outcome(confirmation, &m.topic));
        }
        out
    }
}

fn all_failed(n: usize, why: String) -> Vec<Delivery> {
    vec![Err(SinkError::transient(why)); n]
}

#[async_trait]
impl Sink for AmqpSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        let (connect, confirm) = (self.connect_timeout, self.confirm_timeout);
        let ch = match tokio::time::timeout(connect, self.channel()).await {
            Ok(Ok(ch)) => ch,
            Ok(Err(e)) => return all_failed(batch.len(), format!("AMQP connect: {e}")),
            Err(_) => {
                self.forget_channel().await;
                return all_failed(
                    batch.len(),
                    format!("AMQP connect: no answer in {connect:?}"),
                );
            }
        };
        let Ok(out) = tokio::time::timeout(confirm, self.send(&ch, batch)).await else {
            self.forget_channel().await;
            return all_failed(batch.len(), format!("AMQP: no confirms in {confirm:?}"));
        };
        if out
            .iter()
            .any(|o| o.as_ref().is_err_and(|e| e.to_string().starts_with("AMQP")))
        {
            self.forget_channel().await;
        }
        out
    }

    fn name(&self) -> &str {
        "amqp"
    }
}
