//! # outbox-consumer
//!
//! The receiving side of the outbox: broker consumers that turn the relay's at-least-once
//! delivery into exactly-once effects, per consumer name.
//!
//! For each message received from NATS JetStream, RabbitMQ or Kafka (feature `kafka`):
//!
//! 1. The outbox message is rebuilt from the wire ([`Received::into_message`]): the id from
//!    `Nats-Msg-Id`, the AMQP `message_id` or the CloudEvents `ce-id` header, the type, key,
//!    headers and payload from the CloudEvents attributes the sinks of `outbox-sinks` write.
//! 2. A transaction opens on the consumer's own database ([`InboxStore`]: PostgreSQL or
//!    SQLite) and the id is recorded in the inbox under the consumer's name.
//! 3. New id: the [`Handler`] runs in that transaction and writes its effects there; then
//!    commit. Known id (a redelivery): nothing is written.
//! 4. Only after the commit is the message acked to the broker.
//!
//! ## Guarantees
//!
//! - **Exactly-once effects per consumer name.** The inbox record and the effects commit
//!   together or not at all; a crash before the ack causes a redelivery that finds the id and
//!   changes nothing. Effects outside the database (an HTTP call) still happen at least once:
//!   make them idempotent (the message id is a good idempotency key).
//! - **Failures are retried, never lost.** A handler error rolls the transaction back and the
//!   message is negatively acknowledged for redelivery after a delay (NATS `Nak`, AMQP
//!   `nack` with requeue, Kafka: the record is retried before its offset is committed).
//! - **Never stuck, never a panic on bad input.** A message without a parsable id or type, or
//!   one the handler rejects as permanent, is logged and set aside (NATS `Term`, AMQP reject to
//!   the dead-letter exchange, Kafka: skipped); the consumer keeps going.
//! - **In order.** Each consumer processes one message at a time; with the default settings
//!   (NATS `max_ack_pending` 1, AMQP prefetch 1, Kafka per partition) a failing message is
//!   retried before any later one, so the relay's per-key order holds.
//! - **Traced.** Each message is processed in a `process {topic}` span (kind CONSUMER); with
//!   feature `otel` its parent is the trace context the message arrived with, so the trace of
//!   the request that enqueued it goes on here.
//! - **Graceful stop.** `run(stop)` finishes and acks the message in hand, then returns.
//! - **Bounded inbox.** Processed ids older than [`ConsumerConfig::retention`] are purged
//!   periodically, in batches.
//!
//! ```no_run
//! # async fn demo(store: outbox_postgres::PgStore) -> anyhow::Result<()> {
//! use outbox_consumer::{ConsumerConfig, Handler, NatsConfig, NatsConsumer, Processor};
//! use outbox_core::{Message, SinkError};
//!
//! struct Billing;
//! #[outbox_core::async_trait]
//! impl Handler<sqlx::Postgres> for Billing {
//!     async fn handle(&self, tx: &mut sqlx::Transaction<'static, sqlx::Postgres>, m: &Message)
//!         -> Result<(), SinkError> {
//!         sqlx::query("INSERT INTO invoices (message_id) VALUES ($1)").bind(m.id)
//!             .execute(&mut **tx).await.map_err(|e| SinkError::transient(e.to_string()))?;
//!         Ok(())
//!     }
//! }
//!
//! let processor = Processor::new(store, Billing, ConsumerConfig::new("billing"));
//! let nats = NatsConfig::new("PAYMENTS", vec!["payments".into()], "billing");
//! let consumer = NatsConsumer::connect("nats://127.0.0.1:4222", &nats, processor).await?;
//! consumer.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! Several processes may run the same consumer (same name, same durable consumer or queue):
//! the broker spreads the messages and the inbox keeps each effect single.

#[cfg(feature = "amqp")]
mod amqp;
mod error;
mod inbox;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "nats")]
mod nats;
mod process;
mod wire;

#[cfg(feature = "amqp")]
pub use amqp::{AmqpConfig, AmqpConsumer};
pub use error::ConsumerError;
pub use inbox::InboxStore;
#[cfg(feature = "kafka")]
pub use kafka::{KafkaConfig, KafkaConsumer};
#[cfg(feature = "nats")]
pub use nats::{NatsConfig, NatsConsumer};
pub use process::{ConsumerConfig, Handler, Outcome, Processor};
pub use wire::{Received, WireError};
