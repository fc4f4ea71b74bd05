//! One message through the inbox: record, handle, commit, and the verdict for the broker.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{Message, SinkError};
use sqlx::Transaction;
use tracing::Instrument;

use crate::inbox::InboxStore;

/// The consumer's business logic. It writes its effects through `tx`, the transaction that
/// also records the message in the inbox: both commit, or neither does.
///
/// Return [`SinkError::Transient`] for a failure worth retrying (the message is redelivered
/// later, after `retry_after` when given) and [`SinkError::Permanent`] for a message that can
/// never be processed (it is set aside: dead-lettered or dropped with a log, per transport).
#[async_trait]
pub trait Handler<Db: sqlx::Database>: Send + Sync + 'static {
    /// Applies the effects of `message` inside `tx`, the transaction that also records it in the
    /// inbox. Do not commit: the processor commits once this returns `Ok`, and rolls everything
    /// back (the inbox record included) on an error.
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Db>,
        message: &Message,
    ) -> Result<(), SinkError>;
}

#[async_trait]
impl<Db: sqlx::Database, H: Handler<Db> + ?Sized> Handler<Db> for Arc<H> {
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Db>,
        message: &Message,
    ) -> Result<(), SinkError> {
        (**self).handle(tx, message).await
    }
}

/// What to tell the broker about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled and committed: ack.
    Handled,
    /// Processed before (a redelivery): nothing committed, ack.
    Duplicate,
    /// Not processed, worth another try: negative-ack for redelivery after `after`.
    Retry {
        /// Why it failed: the handler's message or the inbox database's error.
        reason: String,
        /// How long to wait before the redelivery.
        after: Duration,
    },
    /// Can never be processed: dead-letter (or drop) without retrying.
    Reject(String),
}

impl Outcome {
    /// Whether the broker may forget the message.
    pub fn is_done(&self) -> bool {
        matches!(self, Outcome::Handled | Outcome::Duplicate)
    }
}

/// Settings every transport shares.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// The inbox's name for this consumer: each name processes each message once. Consumers
    /// of different services (or purposes) need different names.
    pub name: String,
    /// Wait before a failed message is redelivered, unless the handler says otherwise.
    pub retry_delay: Duration,
    /// How long processed ids are kept. A redelivery later than this is processed again, so
    /// keep it longer than the broker may redeliver (NATS's duplicate window, queue TTLs).
    pub retention: Duration,
    /// How often old ids are purged.
    pub purge_interval: Duration,
}

impl ConsumerConfig {
    /// A consumer named `name` (see [`ConsumerConfig::name`]) with the default delays.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            retry_delay: Duration::from_secs(1),
            retention: Duration::from_secs(7 * 24 * 3600),
            purge_interval: Duration::from_secs(3600),
        }
    }

    /// Sets [`ConsumerConfig::name`].
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets [`ConsumerConfig::retry_delay`].
    pub fn retry_delay(mut self, retry_delay: Duration) -> Self {
        self.retry_delay = retry_delay;
        self
    }

    /// Sets [`ConsumerConfig::retention`].
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Sets [`ConsumerConfig::purge_interval`].
    pub fn purge_interval(mut self, purge_interval: Duration) -> Self {
        self.purge_interval = purge_interval;
        self
    }
}

/// Runs messages through the inbox and a handler; the transports call it for each message.
pub struct Processor<S: InboxStore, H> {
    store: S,
    handler: H,
    config: ConsumerConfig,
}

#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error("inbox database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    Handler(SinkError),
}

impl<S: InboxStore, H: Handler<S::Db>> Processor<S, H> {
    /// A processor recording messages in `store`'s inbox under `config.name` and handing them to
    /// `handler`.
    pub fn new(store: S, handler: H, config: ConsumerConfig) -> Self {
        Self {
            store,
            handler,
            config,
        }
    }

    /// The settings this processor runs with.
    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// The settings, to change before the processor is handed to a transport.
    pub fn config_mut(&mut self) -> &mut ConsumerConfig {
        &mut self.config
    }

    /// Records `message` in the inbox and runs the handler in the same transaction. A
    /// database error is a retry: nothing was committed.
    ///
    /// It runs in a `process` span whose parent, with feature `otel`, is the trace context the
    /// message arrived with (see `outbox_core::trace`).
    pub async fn process(&self, message: &Message) -> Outcome {
        let span = outbox_core::trace::process_span(&self.config.name, message);
        let outcome = self.verdict(message).instrument(span.clone()).await;
        match &outcome {
            Outcome::Handled | Outcome::Duplicate => {}
            Outcome::Retry { .. } => outbox_core::trace::record_failure(&span, false),
            Outcome::Reject(_) => outbox_core::trace::record_failure(&span, true),
        }
        outcome
    }

    async fn verdict(&self, message: &Message) -> Outcome {
        match self.apply(message).await {
            Ok(true) => Outcome::Handled,
            Ok(false) => Outcome::Duplicate,
            Err(Failed::Handler(SinkError::Permanent(reason))) => Outcome::Reject(reason),
            Err(Failed::Handler(SinkError::Transient {
                message,
                retry_after,
            })) => Outcome::Retry {
                reason: message,
                after: retry_after.unwrap_or(self.config.retry_delay),
            },
            // A database failure, or a kind of handler failure this crate does not know.
            Err(e @ (Failed::Db(_) | Failed::Handler(_))) => Outcome::Retry {
                reason: e.to_string(),
                after: self.config.retry_delay,
            },
        }
    }

    async fn apply(&self, message: &Message) -> Result<bool, Failed> {
        let mut tx = self.store.begin().await?;
        if !self
            .store
            .record(&mut tx, &self.config.name, message.id)
            .await?
        {
            tx.rollback().await?;
            return Ok(false);
        }
        // On error the transaction is dropped, which rolls back the inbox record too.
        self.handler
            .handle(&mut tx, message)
            .await
            .map_err(Failed::Handler)?;
        tx.commit().await?;
        Ok(true)
    }

    /// The purge schedule a transport's receive loop ticks on.
    pub(crate) fn purge_ticker(&self) -> tokio::time::Interval {
        let mut tick = tokio::time::interval(self.config.purge_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    }

    /// Forgets the ids older than the retention, in batches.
    pub async fn purge_expired(&self) {
        loop {
            match self.store.purge(self.config.retention, 1000).await {
                Ok(1000) => continue,
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(consumer = %self.config.name, "inbox purge failed: {e}");
                    return;
                }
            }
        }
    }
}

/// Logs an outcome other than success once per message.
pub(crate) fn log_outcome(consumer: &str, message: &Message, outcome: &Outcome) {
    match outcome {
        Outcome::Handled => {}
        Outcome::Duplicate => {
            tracing::debug!(consumer, id = %message.id, "duplicate delivery, already processed")
        }
        Outcome::Retry { reason, after } => tracing::warn!(
            consumer, id = %message.id, attempt = message.attempts,
            "handler failed, redelivery in {after:?}: {reason}"
        ),
        Outcome::Reject(reason) => {
            tracing::error!(consumer, id = %message.id, "message rejected: {reason}")
        }
    }
}
