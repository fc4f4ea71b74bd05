//! Where a relay's batches come from.
//!
//! A [`Source`] hands the relay [`Batch`]es. The relay delivers each batch to its sink, a key
//! at a time in waves and stopping a key at its first failure, then gives the batch its
//! [`Outcome`] ([`Batch::settle`]). Every source keeps one contract:
//!
//! - a message is in at most one batch at a time, across all relays, and a key's messages come
//!   in the key's order, from its oldest undelivered one;
//! - a batch whose outcome is never recorded (a crash, a kill, a lost session) is delivered
//!   again, and that delivery counts as an attempt, so a message that kills its relay goes
//!   dead after `max_attempts` instead of looping.
//!
//! Three sources exist:
//!
//! | source | store | a batch is | a relay that dies leaves its batch |
//! |---|---|---|---|
//! | **leased** ([`Leased`]) | every store (the default of [`Store::source`]) | rows with a lease written on them | to be claimed again when the lease expires |
//! | **held** | PostgreSQL with `ClaimMode::Transaction` (its default) | rows locked by a transaction that stays open while the sink works | to be claimed again at once: the transaction ends with the session |
//! | **log** | PostgreSQL with `outbox-capture` | committed messages streamed from a replication slot, in commit order | to be replayed from the slot's confirmed position |
//!
//! The two table sources are pulled by [`crate::Relay`]: it asks [`Source::claim`] for the next
//! batch, passing the keys it has in delivery. The log source pushes: the stream decides what
//! comes next, and `outbox-capture`'s relay delivers its batches through the same
//! [`Batch`] contract (what a log batch cannot deliver now is written to the table, where the
//! held or leased source takes it over).

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use crate::claim::ClaimRequest;
use crate::message::Message;
use crate::store::{Failure, Retention, Store, StoreError, StoreResult};

/// What became of a batch, for [`Batch::settle`].
#[derive(Debug, Clone, Copy)]
pub struct Outcome<'a> {
    /// Delivered: done, deleted or kept per `retention`.
    pub acks: &'a [Uuid],
    /// Failed: back to pending with the attempt counted and a delay, or dead.
    pub failures: &'a [Failure],
    /// Not handed to the sink because an earlier message of their key failed: given back as
    /// they were, with no attempt counted.
    pub left: &'a [Uuid],
    /// What delivered messages leave behind.
    pub retention: Retention,
}

impl<'a> Outcome<'a> {
    /// Every message of `acks` delivered, nothing failed or left.
    pub fn delivered(acks: &'a [Uuid], retention: Retention) -> Self {
        Self {
            acks,
            failures: &[],
            left: &[],
            retention,
        }
    }
}

/// A batch whose outcome could not be recorded.
pub struct Unsettled {
    /// Why.
    pub error: StoreError,
    /// The batch, when recording its outcome may be tried again (a leased batch: its lease
    /// still holds it); `None` when nothing can be recorded any more (a held batch's
    /// transaction is gone) and every message will be delivered again.
    pub retry: Option<Box<dyn Batch>>,
}

impl std::fmt::Debug for Unsettled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unsettled")
            .field("error", &self.error)
            .field("retry", &self.retry.is_some())
            .finish()
    }
}

impl std::fmt::Display for Unsettled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "could not record the batch's outcome: {}", self.error)
    }
}

impl std::error::Error for Unsettled {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Messages a relay holds for delivery, and how their outcome is recorded.
#[async_trait]
pub trait Batch: Send + Sync {
    /// The messages, in the wave order of [`crate::pick`]: a key's messages in its order.
    fn messages(&self) -> &[Message];

    /// Whether this relay still holds the batch (one round trip at most). A lease holds until
    /// it expires, which the delivery deadline keeps ahead of; a held claim lives only as long
    /// as its session, and once it is lost another relay may claim the same messages: a
    /// delivery must not go on with it.
    async fn is_held(&self) -> bool {
        true
    }

    /// Records the outcome. On error, part of it or none was recorded; what was not is
    /// delivered again (after the lease, at once, or from the slot's confirmed position).
    async fn settle(self: Box<Self>, outcome: &Outcome<'_>) -> Result<(), Unsettled>;

    /// Gives every message back without counting the attempt (a relay shutting down before
    /// its sink finished).
    async fn release(self: Box<Self>) -> StoreResult<()>;
}

/// A source a relay pulls batches from.
#[async_trait]
pub trait Source: Send + Sync {
    /// A short name for logs and metrics: `leased`, `held`, `log`.
    fn name(&self) -> &'static str;

    /// The next batch per `req` (its size, lease, partitions, and the keys the relay has in
    /// delivery, which it gets nothing of), or `None` when nothing is deliverable now.
    async fn claim(&self, req: &ClaimRequest<'_>) -> StoreResult<Option<Box<dyn Batch>>>;
}

/// The source every store has: rows claimed with a lease written on them
/// ([`Store::claim_leased`]), the outcome recorded by [`Store::ack`], [`Store::fail`] and
/// [`Store::release`]. Each claim counts an attempt, so a batch that never settles has its
/// attempt counted already.
pub struct Leased<S: ?Sized> {
    store: Arc<S>,
}

impl<S: Store + ?Sized + 'static> Leased<S> {
    /// The leased source of `store`.
    pub fn new(store: Arc<S>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl<S: Store + ?Sized + 'static> Source for Leased<S> {
    fn name(&self) -> &'static str {
        "leased"
    }

    async fn claim(&self, req: &ClaimRequest<'_>) -> StoreResult<Option<Box<dyn Batch>>> {
        let messages = self.store.claim_leased(req).await?;
        if messages.is_empty() {
            return Ok(None);
        }
        Ok(Some(Box::new(LeasedBatch {
            store: self.store.clone(),
            relay: req.relay.to_owned(),
            messages,
        })))
    }
}

/// A batch under a lease: every step of its outcome is idempotent, so a failed settle is
/// simply tried again while the lease lasts.
struct LeasedBatch<S: ?Sized> {
    store: Arc<S>,
    relay: String,
    messages: Vec<Message>,
}

impl<S: Store + ?Sized + 'static> LeasedBatch<S> {
    async fn record(&self, outcome: &Outcome<'_>) -> StoreResult<()> {
        if !outcome.acks.is_empty() {
            self.store.ack(outcome.acks, outcome.retention).await?;
        }
        if !outcome.failures.is_empty() {
            self.store.fail(&self.relay, outcome.failures).await?;
        }
        if !outcome.left.is_empty() {
            self.store.release(&self.relay, outcome.left).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl<S: Store + ?Sized + 'static> Batch for LeasedBatch<S> {
    fn messages(&self) -> &[Message] {
        &self.messages
    }

    async fn settle(self: Box<Self>, outcome: &Outcome<'_>) -> Result<(), Unsettled> {
        match self.record(outcome).await {
            Ok(()) => Ok(()),
            Err(error) => Err(Unsettled {
                error,
                retry: Some(self),
            }),
        }
    }

    async fn release(self: Box<Self>) -> StoreResult<()> {
        let ids: Vec<Uuid> = self.messages.iter().map(|m| m.id).collect();
        self.store.release(&self.relay, &ids).await
    }
}
