//! # outbox-core
//!
//! The transactional outbox: write an event in the same database transaction as the data it
//! describes, and let a relay deliver it afterwards. This crate holds what every store and
//! transport shares: the message model ([`NewMessage`], [`Message`]), the [`Store`] and
//! [`Sink`] traits, the [`RetryPolicy`] and the [`Relay`] loop. Stores live in
//! `outbox-postgres` and `outbox-sqlite`, transports in `outbox-sinks`.
//!
//! ## Guarantees
//!
//! - **Never before commit, never after rollback.** The message is a row written by the
//!   caller's own transaction; the relay only sees committed rows.
//! - **At least once, never lost.** A relay claims rows under a lease, written on the rows or
//!   held as row locks by a transaction that stays open during delivery (see [`source`]), and
//!   acks them only after the sink reported them delivered. A crash anywhere (before, during or
//!   after the publish, before the ack) leaves the lease to expire or the transaction to roll
//!   back, and the message is delivered again with the same id: consumers deduplicate on it
//!   (see the inbox).
//! - **In order per key.** A key's messages are claimed as a run from its oldest undelivered
//!   one and handed to the sink in waves of at most one message per key; a key stops at its
//!   first failure. Relays own partitions of the keys where the store supports it, and a relay
//!   never claims a key it has in delivery, so a key is never in delivery twice at once, even
//!   with several relays and writers racing on it (see [`pick`] and [`Ownership`]). A failing
//!   key holds back its own later messages (until it is delivered or dead) and nothing else.
//! - **Bounded retries.** A failed delivery is retried with exponential backoff and jitter up
//!   to `max_attempts`, then the message is `dead`: kept with its last error, listed and
//!   replayable. A sink marks hopeless errors permanent and they go dead at once. A delivery
//!   past [`RelayConfig::delivery_deadline`] fails as an attempt, and one that never ends (the
//!   relay died) counts an attempt too ([`Store::recover`]), its messages then going one by one.
//! - **Quiet when idle, patient when down.** An idle relay queries about once per poll interval
//!   and is woken within milliseconds by the store when it can; a relay whose database is down
//!   backs off, reconnects by itself and logs once per change of state.
//!
//! ## Observability
//!
//! The relay records its outcomes, timings and state through the [`metrics`] facade (names in
//! [`instrument`]); the application picks the exporter, and without one the calls cost next to
//! nothing. [`Relay::monitor`] gives health checks the relay's [`RelayState`], the time since its
//! loop last made progress, and its sink's [`Circuit`]s; [`Store::backlog`] counts messages per
//! topic and status. `outbox-server` serves all of it over HTTP.
//!
//! ## Tracing
//!
//! Trace context travels with each message as W3C `traceparent` / `tracestate` headers, from
//! the span that enqueued it, through a `publish` span per message in the relay, to the
//! consumer's `process` span; with feature `otel` this follows `tracing` spans through the
//! OpenTelemetry layer by itself. See [`trace`].
//!
//! ## Usage
//!
//! A store writes a [`NewMessage`] in the caller's transaction (`outbox-postgres` and
//! `outbox-sqlite` show that part with their own transaction types); a [`Relay`] on the same
//! store then delivers it to a [`Sink`]:
//!
//! ```no_run
//! use std::sync::Arc;
//! use outbox_core::{HandlerSink, Message, MessageError, NewMessage, Relay, Store};
//!
//! // The event, enqueued by the store together with your business writes.
//! fn payment_created(id: u64) -> Result<NewMessage, MessageError> {
//!     Ok(NewMessage::json("payments", "payment.created", &serde_json::json!({"id": id}))?
//!         .key(id.to_string()))
//! }
//!
//! // The relay, on any store.
//! async fn relay(store: Arc<dyn Store>) {
//!     let sink = HandlerSink::new(|m: Message| async move { println!("{}", m.id); Ok(()) });
//!     let shutdown = async { let _ = tokio::signal::ctrl_c().await; };
//!     Relay::new(store, Arc::new(sink)).run(shutdown).await;
//! }
//! ```
//!
//! The whole flow, enqueue in a transaction included, is the example of `outbox-postgres` and
//! of `outbox-sqlite`.

mod claim;
pub mod deliver;
pub mod headers;
pub mod instrument;
mod message;
mod ownership;
mod partition;
pub mod redact;
mod relay;
mod retry;
mod sink;
pub mod source;
mod store;
pub mod trace;

pub use claim::{Candidate, ClaimRequest, Head, keep_within_budget, pick, waves};
pub use deliver::{Deliverer, Judged, Outcomes};
pub use message::{
    DEFAULT_MAX_MESSAGE_BYTES, JSON, MAX_TOPIC_LEN, Message, MessageError, NewMessage, Refused,
    Status, UnknownStatus, check_batch, parse_headers,
};
pub use ownership::{Assignment, Ownership, assign};
pub use partition::{PARTITIONS, partition_for};
pub use redact::redact;
pub use relay::{Relay, RelayConfig, RelayMonitor, RelayReport, RelayState, RelayStats};
pub use retry::RetryPolicy;
pub use sink::{Circuit, Delivery, HandlerSink, Sink, SinkError, one_outcome_each};
pub use source::{Batch, Leased, Outcome, Source, Unsettled};
pub use store::{
    DeadFilter, Failure, MAX_ERROR_LEN, PollingWaiter, RelaySeen, Retention, StatusCounts, Store,
    StoreError, StoreResult, TopicBacklog, Waiter, check_identifier, check_schema_version,
    storable_error,
};

pub use async_trait::async_trait;
pub use bytes::Bytes;
