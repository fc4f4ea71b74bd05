//! The payment system across a message broker (`outbox demo --broker URL`).
//!
//! The relay publishes the payment events from the outbox to the broker with the sink the URL
//! names (`nats://…` or `amqp://…`, options as for `outbox relay --sink`), and the worker
//! consumes them from the broker through the inbox on the demo's database: each event's
//! changes to the payments commit together with its inbox record, so a redelivered event
//! changes nothing, and the gateway's idempotency key keeps the charge single.
//!
//! What the worker creates when missing: on NATS the stream `OUTBOX_{PREFIX}PAYMENTS`
//! capturing `{prefix}payments` and the durable consumer `payments-worker`; on RabbitMQ the
//! queue `{exchange}.payments-worker` bound to the exchange with `payments`. Until the worker
//! has created them the relay's publishes fail and are retried.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use futures::future::BoxFuture;
use outbox_consumer::{
    AmqpConfig, AmqpConsumer, ConsumerConfig, Handler, InboxStore, NatsConfig, NatsConsumer,
    Processor,
};
use outbox_core::{Message, Relay, RelayConfig, SinkError, redact};
use outbox_sinks::SinkUrl;
use sqlx::{MySql, Postgres, Sqlite, Transaction};

use crate::db::{Db, TOPIC, Tx};
use crate::worker::Worker;
use outbox_any::AnyStore;

/// The worker's name in the inbox and on the broker.
pub const CONSUMER: &str = "payments-worker";

/// Parses a `--broker` URL as the relay's sink will, and accepts only the brokers the worker
/// can consume from.
fn broker_url(url: &str) -> anyhow::Result<SinkUrl<'_>> {
    let (scheme, _) = url
        .split_once("://")
        .with_context(|| format!("--broker {:?} is not a URL", redact(url)))?;
    anyhow::ensure!(
        matches!(scheme, "nats" | "amqp" | "amqps"),
        "--broker takes nats://… or amqp://…, not {scheme}://"
    );
    SinkUrl::parse(url).with_context(|| format!("--broker {:?}", redact(url)))
}

/// Checks `url` without connecting.
pub fn check_url(url: &str) -> anyhow::Result<()> {
    broker_url(url).map(drop)
}

/// A relay publishing the outbox of `db` to the broker at `url`.
pub async fn relay(db: &Db, url: &str, config: RelayConfig) -> anyhow::Result<Relay> {
    let sink = outbox_sinks::from_url(url)
        .await
        .with_context(|| format!("cannot publish to {}", redact(url)))?;
    Ok(Relay::with_config(db.store(), sink, config))
}

/// What runs the consumer until its stop signal.
pub type Consuming = BoxFuture<'static, anyhow::Result<()>>;

/// Connects to the broker at `url` (creating the stream or queue when missing) and returns
/// the consumer of the payment events, which runs until `stop` completes. On NATS an event
/// not acked within `lease` (its worker died) goes to another worker; RabbitMQ hands it over
/// as soon as the dead worker's connection drops.
pub async fn consume(
    worker: Worker,
    url: &str,
    lease: Duration,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Consuming> {
    let broker = broker_url(url)?;
    let db = worker.db.clone();
    let handler = BrokerWorker(Arc::new(worker));
    match db.any().clone() {
        AnyStore::Postgres(store) => consume_on(store, handler, &broker, lease, stop).await,
        AnyStore::Sqlite(store) => consume_on(store, handler, &broker, lease, stop).await,
        AnyStore::MySql(store) => consume_on(store, handler, &broker, lease, stop).await,
    }
}

async fn consume_on<S: InboxStore>(
    store: S,
    handler: BrokerWorker,
    broker: &SinkUrl<'_>,
    lease: Duration,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Consuming>
where
    BrokerWorker: Handler<S::Db>,
{
    let mut config = ConsumerConfig::new(CONSUMER);
    config.retry_delay = Duration::from_millis(500);
    let processor = Processor::new(store, handler, config);
    if broker.scheme() == "nats" {
        let mut nats = nats_config(broker);
        nats.ack_wait = lease;
        let consumer = NatsConsumer::connect(broker.base(), &nats, processor).await?;
        Ok(Box::pin(async move { Ok(consumer.run(stop).await?) }))
    } else {
        let amqp = amqp_config(broker);
        let consumer = AmqpConsumer::connect(broker.base(), &amqp, processor).await?;
        Ok(Box::pin(async move { Ok(consumer.run(stop).await?) }))
    }
}

fn nats_config(broker: &SinkUrl<'_>) -> NatsConfig {
    let prefix = broker.get("prefix").unwrap_or("");
    let subject = format!("{prefix}{TOPIC}");
    let stream: String = format!("OUTBOX_{prefix}{TOPIC}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    let mut config = NatsConfig::new(stream, vec![subject.clone()], CONSUMER);
    config.filter_subject = subject;
    config
}

fn amqp_config(broker: &SinkUrl<'_>) -> AmqpConfig {
    let exchange = broker.get("exchange").unwrap_or("outbox");
    let mut config = AmqpConfig::new(format!("{exchange}.{CONSUMER}"), TOPIC);
    config.exchange = exchange.to_owned();
    config
}

/// The worker's handlers, run in the consumer's inbox transaction.
struct BrokerWorker(Arc<Worker>);

#[async_trait]
impl Handler<Postgres> for BrokerWorker {
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        m: &Message,
    ) -> Result<(), SinkError> {
        self.0.handle_in(&mut Tx::from(tx), m).await
    }
}

#[async_trait]
impl Handler<Sqlite> for BrokerWorker {
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        m: &Message,
    ) -> Result<(), SinkError> {
        self.0.handle_in(&mut Tx::from(tx), m).await
    }
}

#[async_trait]
impl Handler<MySql> for BrokerWorker {
    async fn handle(
        &self,
        tx: &mut Transaction<'static, MySql>,
        m: &Message,
    ) -> Result<(), SinkError> {
        self.0.handle_in(&mut Tx::from(tx), m).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_sink_options() {
        let nats = nats_config(&broker_url("nats://127.0.0.1:4222?prefix=t1.").unwrap());
        assert_eq!(nats.stream, "OUTBOX_T1_PAYMENTS");
        assert_eq!(nats.subjects, ["t1.payments"]);
        let amqp = amqp_config(&broker_url("amqp://h:5672/%2f?exchange=x").unwrap());
        assert_eq!(
            (amqp.exchange.as_str(), amqp.queue.as_str()),
            ("x", "x.payments-worker")
        );
        assert!(check_url("redis://127.0.0.1").is_err());
        assert!(check_url("127.0.0.1:4222").is_err());
    }
}
