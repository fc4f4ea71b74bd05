//! The [`Store`] trait: what a database must do for the relay and the operator commands.
//!
//! Implementations live in their own crates (`outbox-postgres`, `outbox-sqlite`); they share one
//! conformance suite so every store keeps the same guarantees.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::claim::ClaimRequest;
use crate::message::Message;
use crate::ownership::Ownership;
use crate::source::{Leased, Source};

/// A store failure. The relay treats every one as "database unavailable for now": it backs off
/// and tries again, and nothing is lost because nothing was acked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The driver failed: connection lost, query refused, timeout. The driver's error is the
    /// source.
    #[error("database error: {0}")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A schema migration step failed.
    #[error("migration {version} failed: {reason}")]
    Migration {
        /// The schema version the failed step would have reached.
        version: i64,
        /// What went wrong.
        reason: String,
    },
    /// A newer build migrated the database; this build must not write to it.
    #[error(
        "the database schema is at version {found}, newer than this build knows ({known}); upgrade outbox"
    )]
    SchemaTooNew {
        /// The version the database is at.
        found: i64,
        /// The latest version this build knows.
        known: i64,
    },
    /// The database needs migrating (`outbox migrate`) before this build can use it.
    #[error("the database schema is at version {found}, older than this build needs ({needed})")]
    SchemaTooOld {
        /// The version the database is at (0 for no schema).
        found: i64,
        /// The version this build works with.
        needed: i64,
    },
    /// A setting is invalid, or the store does not support the operation asked of it.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Checks a name that a store splices into SQL (schema, table prefix): only plain lower-case
/// identifiers of at most 40 characters are accepted, so no configuration can inject SQL.
pub fn check_identifier(what: &str, name: &str) -> Result<(), StoreError> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 40;
    if ok {
        Ok(())
    } else {
        Err(StoreError::Config(format!(
            "{what} {name:?} must be a lower-case identifier ([a-z_][a-z0-9_]*, at most 40 characters)"
        )))
    }
}

impl StoreError {
    /// Wraps a driver's error as [`StoreError::Database`], keeping it as the source.
    pub fn database(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Database(Box::new(e))
    }
}

/// The result of every [`Store`] operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// What [`Store::check_schema`] concludes from the version the database is at (`found`, 0 for
/// no schema) and the one this build writes (`latest`).
pub fn check_schema_version(found: i64, latest: i64) -> StoreResult<()> {
    match found.cmp(&latest) {
        std::cmp::Ordering::Less => Err(StoreError::SchemaTooOld {
            found,
            needed: latest,
        }),
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Greater => Err(StoreError::SchemaTooNew {
            found,
            known: latest,
        }),
    }
}

fn unsupported(what: &str) -> StoreError {
    StoreError::Config(format!("this store does not support {what}"))
}

/// The most of a failure's text a store keeps: enough for any real error, bounded so that a
/// sink echoing a huge response body cannot bloat every row it fails.
pub const MAX_ERROR_LEN: usize = 4096;

/// A failure's text as a store keeps it: NUL bytes (which PostgreSQL refuses in text, so the
/// failure could never be recorded) become U+FFFD, and the text is cut at [`MAX_ERROR_LEN`]
/// bytes on a character boundary.
pub fn storable_error(text: &str) -> String {
    let mut cut = text.len().min(MAX_ERROR_LEN);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut kept = text[..cut].replace('\0', "\u{fffd}");
    // Each replacement is two bytes longer than the NUL it replaces.
    let mut cut = kept.len().min(MAX_ERROR_LEN);
    while !kept.is_char_boundary(cut) {
        cut -= 1;
    }
    kept.truncate(cut);
    kept
}

impl Failure {
    /// The error text to store; see [`storable_error`].
    pub fn stored_error(&self) -> String {
        storable_error(&self.error)
    }
}

/// What happens to a message whose delivery failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The message that failed (one the relay holds).
    pub id: Uuid,
    /// Why it failed, as the sink said; stores keep it cut to [`MAX_ERROR_LEN`] bytes (see
    /// [`Failure::stored_error`]).
    pub error: String,
    /// `Some(delay)`: back to pending, deliverable again after `delay` (store clock).
    /// `None`: dead.
    pub retry_in: Option<Duration>,
}

/// What an acked message leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Retention {
    /// Delete delivered rows at once (the cheapest, and the default).
    #[default]
    Delete,
    /// Keep delivered rows, with their delivery time, for this long; the relay then removes them
    /// in bounded batches.
    Keep(Duration),
}

/// Counts for `outbox status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusCounts {
    /// Messages waiting for delivery, delayed and backing-off ones included.
    pub pending: i64,
    /// Messages claimed by a relay and not settled yet.
    pub in_flight: i64,
    /// Delivered messages still kept under [`Retention::Keep`].
    pub delivered: i64,
    /// Dead letters, waiting for an operator to retry or purge them.
    pub dead: i64,
    /// Age of the oldest pending message (delayed ones included), in seconds.
    pub oldest_pending_age_seconds: Option<f64>,
}

/// The backlog of one topic, for metrics: [`Store::backlog`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TopicBacklog {
    /// The topic these counts are for.
    pub topic: String,
    /// The topic's messages waiting for delivery, delayed ones included.
    pub pending: i64,
    /// The topic's messages claimed and not settled yet.
    pub in_flight: i64,
    /// The topic's delivered messages still kept under [`Retention::Keep`].
    pub delivered: i64,
    /// The topic's dead letters.
    pub dead: i64,
    /// Age of the topic's oldest pending message (delayed ones included), in seconds.
    pub oldest_pending_age_seconds: Option<f64>,
}

/// Which dead letters an operator command lists, retries or purges. Every field that is set
/// must match; the default matches every dead letter.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeadFilter {
    /// Only these messages.
    pub ids: Option<Vec<Uuid>>,
    /// Only messages of this topic (exact match).
    pub topic: Option<String>,
    /// Only messages of this type (exact match).
    #[serde(rename = "type")]
    pub message_type: Option<String>,
    /// Only messages with this ordering key (exact match).
    pub key: Option<String>,
    /// A substring of the last error, matched case-insensitively.
    pub error: Option<String>,
    /// Only messages dead for longer than this.
    #[serde(skip)]
    pub older_than: Option<Duration>,
}

impl DeadFilter {
    /// The filter that matches exactly these messages (when they are dead).
    pub fn ids(ids: impl Into<Vec<Uuid>>) -> Self {
        Self {
            ids: Some(ids.into()),
            ..Self::default()
        }
    }

    /// The error substring as a `LIKE` pattern (both stores escape with `\`).
    pub fn error_pattern(&self) -> Option<String> {
        self.error.as_ref().map(|e| {
            let escaped = e
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            format!("%{}%", escaped.to_lowercase())
        })
    }
}

/// What a relay last reported about itself (see [`Store::heartbeat`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelaySeen {
    /// The relay's unique id (see `Relay::id`).
    pub id: String,
    /// `working`, `idle`, `database_down`, `starting` or `stopped`.
    pub state: String,
    /// When the relay last reported.
    pub last_seen: chrono::DateTime<chrono::Utc>,
    /// Seconds since `last_seen`, by the database's clock.
    pub age_seconds: f64,
}

/// A database holding an outbox table.
///
/// Claiming follows four rules that give the relay its guarantees:
/// 1. only committed rows are visible, so nothing is delivered before its transaction commits
///    or ever if it rolls back;
/// 2. a claim is a lease, written on the rows or held as a row lock by an open transaction
///    (the store's [`Store::source`]): a relay that dies leaves rows that any relay reclaims
///    once the lease expires or the transaction ends, so a crash loses nothing;
/// 3. a key's messages are claimed only as a run from its oldest undelivered one (the *head*),
///    in order, and only by one relay at a time, so one key is delivered in order while other
///    keys go on; [`crate::pick`] applies the rules every store shares;
/// 4. a delivery that never records its outcome still counts as an attempt: the lease's
///    claim counted it, or [`Store::recover`] does for a held claim whose relay died.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates or upgrades the schema. Idempotent and safe to run from several processes.
    async fn migrate(&self) -> StoreResult<()>;

    /// Checks, without changing anything, that the schema is the one this build works with:
    /// [`StoreError::SchemaTooOld`] or [`StoreError::SchemaTooNew`] otherwise. For a relay
    /// that does not migrate at start, so that it refuses an old schema at once instead of
    /// failing every claim. Stores without versioned schemas have nothing to check.
    async fn check_schema(&self) -> StoreResult<()> {
        Ok(())
    }

    /// Claims up to `limit` deliverable messages for `relay`, leased for `lease`, oldest first.
    /// Each claim counts as an attempt.
    async fn claim(&self, relay: &str, limit: usize, lease: Duration) -> StoreResult<Vec<Message>> {
        self.claim_leased(&ClaimRequest::new(relay, limit, lease))
            .await
    }

    /// Claims per `req` and writes a lease on what it claimed: runs of each key, in the wave
    /// order of [`crate::pick`]. Each claimed message counts an attempt.
    async fn claim_leased(&self, req: &ClaimRequest<'_>) -> StoreResult<Vec<Message>>;

    /// Where relays get this store's batches: [`crate::source::Leased`] (rows claimed under
    /// a lease) unless the store has a better way, such as PostgreSQL's claims held by an
    /// open transaction. See [`crate::source`].
    fn source(self: Arc<Self>) -> Arc<dyn Source> {
        Arc::new(Leased::new(self))
    }

    /// Joins the relays that share this outbox, for a relay that claims with
    /// [`ClaimRequest::partitions`]. `None`: the store has no ownership and every relay claims
    /// from every partition.
    async fn ownership(&self, relay: &str) -> StoreResult<Option<Box<dyn Ownership>>> {
        let _ = relay;
        Ok(None)
    }

    /// Counts an attempt for each message whose held delivery ended without an outcome (its
    /// relay crashed, was killed, or lost its session) and makes those at `max_attempts` dead.
    /// Returns how many messages it counted. Relays call it at start and then periodically.
    async fn recover(&self, max_attempts: i32) -> StoreResult<u64> {
        let _ = max_attempts;
        Ok(0)
    }

    /// Marks delivered messages done: deleted, or kept as `delivered` per `retention`.
    async fn ack(&self, ids: &[Uuid], retention: Retention) -> StoreResult<u64>;

    /// Records failed deliveries of messages `relay` holds: back to pending later, or dead.
    async fn fail(&self, relay: &str, failures: &[Failure]) -> StoreResult<()>;

    /// Gives claimed messages back without counting the attempt (graceful shutdown).
    async fn release(&self, relay: &str, ids: &[Uuid]) -> StoreResult<()>;

    /// Removes up to `limit` delivered messages older than `older_than`; returns how many.
    async fn purge_delivered(&self, older_than: Duration, limit: usize) -> StoreResult<u64>;

    /// Counts the messages in each status, for `outbox status` and readiness checks.
    async fn status(&self) -> StoreResult<StatusCounts>;

    /// The counts of [`Store::status`] per topic, in one query, ordered by topic. Topics with
    /// no message left do not appear. Meant for a metrics timer, not for every scrape: it
    /// reads the whole table.
    async fn backlog(&self) -> StoreResult<Vec<TopicBacklog>> {
        Err(StoreError::Config(
            "this store cannot report its backlog per topic".into(),
        ))
    }

    /// One cheap round trip to the database, for readiness checks.
    async fn ping(&self) -> StoreResult<()> {
        self.status().await.map(drop)
    }

    /// Dead messages, oldest first.
    async fn dead_list(&self, limit: usize) -> StoreResult<Vec<Message>>;

    /// Makes dead messages pending again with a fresh attempt count: `None` retries all.
    async fn dead_retry(&self, ids: Option<&[Uuid]>) -> StoreResult<u64>;

    /// For each key among the dead messages `ids` would retry (`None`: all), how many later
    /// messages of that key were delivered and are still kept (see [`Retention`]): retrying
    /// puts the dead message after them, against the key's order.
    async fn delivered_after_dead(&self, ids: Option<&[Uuid]>) -> StoreResult<Vec<(String, u64)>>;

    /// Deletes dead messages, all or those dead for longer than `older_than`.
    async fn dead_purge(&self, older_than: Option<Duration>) -> StoreResult<u64>;

    /// Dead messages matching `filter`, oldest first by id (UUIDv7 ids sort by creation), at
    /// most `limit` of them and only those after `after`: a keyset page that stays correct
    /// while messages are retried or purged between pages.
    async fn dead_page(
        &self,
        filter: &DeadFilter,
        after: Option<Uuid>,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        let _ = (filter, after, limit);
        Err(unsupported("filtered dead-letter listing"))
    }

    /// One message by id, whatever its status.
    async fn get_message(&self, id: Uuid) -> StoreResult<Option<Message>> {
        let _ = id;
        Err(unsupported("reading one message"))
    }

    /// Makes the dead messages matching `filter` pending again with a fresh attempt count, and
    /// wakes the relays; returns how many.
    async fn dead_retry_where(&self, filter: &DeadFilter) -> StoreResult<u64> {
        let _ = filter;
        Err(unsupported("retrying dead letters by filter"))
    }

    /// Deletes the dead messages matching `filter`; returns how many.
    async fn dead_purge_where(&self, filter: &DeadFilter) -> StoreResult<u64> {
        let _ = filter;
        Err(unsupported("purging dead letters by filter"))
    }

    /// Records that `relay` is alive and in `state` (a relay calls it every few seconds);
    /// `stopped` is recorded by a relay that ends cleanly, and is final: relay ids are unique
    /// per process, so a later heartbeat of a stopped relay is a stale one and is ignored.
    async fn heartbeat(&self, relay: &str, state: &str) -> StoreResult<()> {
        let _ = (relay, state);
        Ok(())
    }

    /// The relays that reported within `within`, by id.
    async fn relays(&self, within: Duration) -> StoreResult<Vec<RelaySeen>> {
        let _ = within;
        Err(unsupported("listing relays"))
    }

    /// Stops claiming the messages of `topic` until [`Store::resume_topic`]; messages that are
    /// in delivery finish. A key whose next message is paused waits too, so order holds.
    /// Returns false when it was already paused.
    async fn pause_topic(&self, topic: &str) -> StoreResult<bool> {
        let _ = topic;
        Err(unsupported("pausing topics"))
    }

    /// Makes a paused topic's messages claimable again and wakes the relays; false when it
    /// was not paused.
    async fn resume_topic(&self, topic: &str) -> StoreResult<bool> {
        let _ = topic;
        Err(unsupported("pausing topics"))
    }

    /// The paused topics, sorted.
    async fn paused_topics(&self) -> StoreResult<Vec<String>> {
        Ok(Vec::new())
    }

    /// A waiter through which `relay` sleeps while the outbox is empty.
    async fn waiter(&self, relay: &str) -> StoreResult<Box<dyn Waiter>>;
}

/// How a relay sleeps when there is nothing to claim, and how it is woken.
#[async_trait]
pub trait Waiter: Send {
    /// Called after a claim found nothing, before sleeping: registers for wake-ups. Returns
    /// true when the relay must claim once more before it sleeps, because a writer may have
    /// committed before the registration took effect.
    async fn prepare(&mut self) -> StoreResult<bool> {
        Ok(false)
    }

    /// Sleeps until new work may exist: a wake-up from a writer, or `timeout` (the polling
    /// fallback).
    async fn idle(&mut self, timeout: Duration) -> StoreResult<()>;

    /// Called after a claim found work, so the store can stop waking this relay.
    async fn busy(&mut self) -> StoreResult<()>;
}

/// A waiter that polls, and that in-process writers can wake through a shared
/// [`tokio::sync::Notify`] after they commit.
pub struct PollingWaiter {
    notify: std::sync::Arc<tokio::sync::Notify>,
}

impl PollingWaiter {
    /// A waiter that wakes on `notify` or after the poll timeout, whichever comes first.
    pub fn new(notify: std::sync::Arc<tokio::sync::Notify>) -> Self {
        Self { notify }
    }
}

#[async_trait]
impl Waiter for PollingWaiter {
    async fn idle(&mut self, timeout: Duration) -> StoreResult<()> {
        let _ = tokio::time::timeout(timeout, self.notify.notified()).await;
        Ok(())
    }

    async fn busy(&mut self) -> StoreResult<()> {
        Ok(())
    }
}
