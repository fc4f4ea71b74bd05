//! [`PgStore`] (the relay's side) and [`PgOutbox`] (the writer's side).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use outbox_core::{
    Batch, Candidate, ClaimRequest, DEFAULT_MAX_MESSAGE_BYTES, DeadFilter, Failure, Leased,
    Message, NewMessage, Outcome, Ownership, RelaySeen, Retention, Source, Status, StatusCounts,
    Store, StoreError, StoreResult, TopicBacklog, Unsettled, Waiter, parse_headers, pick,
};
use sqlx::postgres::{PgListener, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Postgres, Row, Transaction};
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use crate::capture::EnqueueMode;
use crate::migrate::{LATEST_VERSION, migrate_to};
use crate::sql::{PgConfig, Sql};

/// Why an enqueue failed; the caller's transaction should be rolled back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnqueueError {
    /// The message breaks a rule of the outbox (a reserved header, over the size limit, see
    /// [`NewMessage::check`]); nothing of the call was written.
    #[error(transparent)]
    Invalid(#[from] outbox_core::Refused),
    /// The database refused the statement.
    #[error("could not enqueue outbox message: {0}")]
    Database(#[from] sqlx::Error),
}

fn q(sql: &Arc<str>) -> sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(AssertSqlSafe(sql.clone()))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn int(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn db(e: sqlx::Error) -> StoreError {
    StoreError::database(e)
}

/// A database operation that got no answer in time.
#[derive(Debug, thiserror::Error)]
#[error("PostgreSQL did not answer within {0:?} (network down or server overloaded)")]
pub struct NoAnswer(pub Duration);

/// Runs one database operation within `limit`. sqlx waits forever on a connection whose
/// network went silent (no FIN, no RST): without this bound a partition would hang the relay
/// with nothing logged until TCP gives up, which takes many minutes.
pub(crate) async fn bounded<T>(
    limit: Duration,
    op: impl std::future::Future<Output = StoreResult<T>>,
) -> StoreResult<T> {
    tokio::time::timeout(limit, op)
        .await
        .unwrap_or_else(|_| Err(StoreError::database(NoAnswer(limit))))
}

/// The writer's handle: enqueues messages inside the caller's transaction.
#[derive(Debug, Clone)]
pub struct PgOutbox {
    sql: Arc<Sql>,
    max_message_bytes: usize,
    mode: EnqueueMode,
    /// The prefix of this outbox's logical messages ([`EnqueueMode::WalMessage`]).
    wal_prefix: Arc<str>,
}

impl PgOutbox {
    /// Sets the largest message this handle enqueues (see the store's
    /// `with_max_message_size`).
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Chooses how `enqueue` writes (default: a row; see [`EnqueueMode`]).
    pub fn with_enqueue_mode(mut self, mode: EnqueueMode) -> Self {
        self.mode = mode;
        self
    }

    /// How `enqueue` writes.
    pub fn enqueue_mode(&self) -> EnqueueMode {
        self.mode
    }

    /// Emits messages as transactional logical decoding messages, in the slice's order.
    async fn emit(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        msgs: &[NewMessage],
    ) -> Result<(), EnqueueError> {
        outbox_core::check_batch(msgs, self.max_message_bytes)?;
        let bodies: Vec<Vec<u8>> = msgs.iter().map(crate::capture::encode).collect();
        sqlx::query(
            "SELECT count(pg_logical_emit_message(true, $1, b)) \
             FROM unnest($2::bytea[]) WITH ORDINALITY AS u(b, ord)",
        )
        .bind(&*self.wal_prefix)
        .bind(bodies)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Adds one message to the outbox as part of `tx`.
    pub async fn enqueue(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        msg: &NewMessage,
    ) -> Result<(), EnqueueError> {
        let span = outbox_core::trace::create_span(std::slice::from_ref(msg));
        if self.mode == EnqueueMode::WalMessage {
            return self
                .emit(tx, std::slice::from_ref(msg))
                .instrument(span)
                .await;
        }
        self.insert_one(tx, msg).instrument(span).await
    }

    async fn insert_one(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        msg: &NewMessage,
    ) -> Result<(), EnqueueError> {
        outbox_core::check_batch(std::slice::from_ref(msg), self.max_message_bytes)?;
        let sql = match self.mode {
            EnqueueMode::CapturedRow => &self.sql.insert_captured,
            _ => &self.sql.insert,
        };
        q(sql)
            .bind(msg.id())
            .bind(msg.topic())
            .bind(msg.message_type())
            .bind(msg.key_ref())
            .bind(msg.partition())
            .bind(msg.payload())
            .bind(msg.content_type())
            .bind(msg.headers_json())
            .bind(msg.absolute_available_at())
            .bind(msg.delay_duration().map(millis))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Adds many messages as part of `tx` in one statement; `seq` follows the slice's order.
    pub async fn enqueue_batch(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        msgs: &[NewMessage],
    ) -> Result<(), EnqueueError> {
        if msgs.is_empty() {
            return Ok(());
        }
        let span = outbox_core::trace::create_span(msgs);
        if self.mode == EnqueueMode::WalMessage {
            return self.emit(tx, msgs).instrument(span).await;
        }
        self.insert_batch(tx, msgs).instrument(span).await
    }

    async fn insert_batch(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        msgs: &[NewMessage],
    ) -> Result<(), EnqueueError> {
        outbox_core::check_batch(msgs, self.max_message_bytes)?;
        let col = |f: &dyn Fn(&NewMessage) -> String| msgs.iter().map(f).collect::<Vec<_>>();
        let sql = match self.mode {
            EnqueueMode::CapturedRow => &self.sql.insert_batch_captured,
            _ => &self.sql.insert_batch,
        };
        q(sql)
            .bind(msgs.iter().map(NewMessage::id).collect::<Vec<_>>())
            .bind(col(&|m| m.topic().to_owned()))
            .bind(col(&|m| m.message_type().to_owned()))
            .bind(
                msgs.iter()
                    .map(|m| m.key_ref().map(str::to_owned))
                    .collect::<Vec<_>>(),
            )
            .bind(msgs.iter().map(NewMessage::partition).collect::<Vec<_>>())
            .bind(
                msgs.iter()
                    .map(|m| m.payload().to_vec())
                    .collect::<Vec<_>>(),
            )
            .bind(col(&|m| m.content_type().to_owned()))
            .bind(col(&NewMessage::headers_json))
            .bind(
                msgs.iter()
                    .map(NewMessage::absolute_available_at)
                    .collect::<Vec<_>>(),
            )
            .bind(
                msgs.iter()
                    .map(|m| m.delay_duration().map(millis))
                    .collect::<Vec<_>>(),
            )
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// How a relay on this store holds the messages it is delivering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClaimMode {
    /// Row locks in a transaction that stays open during delivery; the delivered rows are
    /// deleted in it before it commits. Nothing is written at claim time, and a relay that dies
    /// frees its messages at once. Each batch in delivery holds one pooled connection.
    #[default]
    Transaction,
    /// A lease written on the rows (`in_flight` until the lease expires), so no transaction
    /// stays open during delivery and in-flight messages show in `status`. Costs an UPDATE of
    /// every claimed row.
    Lease,
}

/// The outbox in a PostgreSQL database, for relays and operators.
///
/// A relay holds one pooled connection per batch in delivery ([`ClaimMode::Transaction`]) and
/// one for LISTEN: give the pool at least `in_flight_batches + 2` connections.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Connections to the same database that commit without waiting for the WAL flush, for the
    /// delivery records of held batches: a record lost in a database crash only loses the count
    /// of an attempt whose transaction died with it.
    records: PgPool,
    config: Arc<PgConfig>,
    outbox: PgOutbox,
    inbox: crate::PgInbox,
    claim_mode: ClaimMode,
    query_timeout: Duration,
}

impl PgStore {
    /// A store with the default names (`public.outbox_messages`).
    pub fn new(pool: PgPool) -> Self {
        Self::with_config(pool, PgConfig::default()).expect("default names are valid")
    }

    /// A store in another schema or with another table prefix.
    pub fn with_config(pool: PgPool, config: PgConfig) -> StoreResult<Self> {
        config.validate()?;
        let sql = Arc::new(Sql::new(&config));
        let wal_prefix = crate::capture::wal_prefix(&config).into();
        let records = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(
                (*pool.connect_options())
                    .clone()
                    .options([("synchronous_commit", "off")]),
            );
        Ok(Self {
            pool,
            records,
            inbox: crate::PgInbox::new(&config),
            config: Arc::new(config),
            outbox: PgOutbox {
                sql,
                max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
                mode: EnqueueMode::default(),
                wal_prefix,
            },
            claim_mode: ClaimMode::default(),
            query_timeout: Self::DEFAULT_QUERY_TIMEOUT,
        })
    }

    /// How long one operation of the relay or of an operator command may wait for the
    /// database, unless set with [`PgStore::with_query_timeout`]. `dead_retry` and
    /// `dead_purge`, which may touch every dead letter in one statement, are not bounded.
    pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(10);

    /// Bounds each operation (a claim, an ack, a settle, a rebalance…) so that a database that
    /// stops answering without closing the connection fails it: the relay then reports the
    /// database down and backs off instead of hanging. Migrations and the bulk dead-letter
    /// commands are not bounded. Keep it well below the lease, and above the slowest claim or
    /// settle the database may take.
    pub fn with_query_timeout(mut self, limit: Duration) -> Self {
        self.query_timeout = limit.max(Duration::from_millis(1));
        self
    }

    /// The bound on each operation set by [`PgStore::with_query_timeout`] (default
    /// [`PgStore::DEFAULT_QUERY_TIMEOUT`]).
    pub fn query_timeout(&self) -> Duration {
        self.query_timeout
    }

    async fn bounded<T>(
        &self,
        op: impl std::future::Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        bounded(self.query_timeout, op).await
    }

    /// Chooses how relays on this store hold their messages (default: in a transaction).
    pub fn with_claim_mode(mut self, mode: ClaimMode) -> Self {
        self.claim_mode = mode;
        self
    }

    /// How relays on this store hold their claims: row locks in an open transaction, or leases.
    pub fn claim_mode(&self) -> ClaimMode {
        self.claim_mode
    }

    /// Connects a small pool to `url` (lazily: an unreachable database fails on first use).
    pub async fn connect(url: &str, config: PgConfig) -> StoreResult<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(url)
            .map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: {e}")))?;
        Self::with_config(pool, config)
    }

    /// The pool the store runs on, for the caller's own transactions (`enqueue` takes one).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema and table prefix the store uses.
    pub fn config(&self) -> &PgConfig {
        &self.config
    }

    /// Sets the largest message enqueue accepts, payload and headers counted (default
    /// [`DEFAULT_MAX_MESSAGE_BYTES`], 1 MiB). A bigger message is refused with an error naming
    /// the limit; relays and brokers then never meet a message too big for them.
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.outbox = self.outbox.with_max_message_size(bytes);
        self
    }

    /// Chooses how `enqueue` writes (default: a row; see [`EnqueueMode`]).
    pub fn with_enqueue_mode(mut self, mode: EnqueueMode) -> Self {
        self.outbox = self.outbox.with_enqueue_mode(mode);
        self
    }

    /// The writer's handle, cheap to clone.
    pub fn outbox(&self) -> &PgOutbox {
        &self.outbox
    }

    /// The consumer's handle: exactly-once effects from at-least-once deliveries.
    pub fn inbox(&self) -> &crate::PgInbox {
        &self.inbox
    }

    /// Applies migrations up to `version` only (for staged upgrades and their tests).
    pub async fn migrate_to(&self, version: i64) -> StoreResult<()> {
        migrate_to(&self.pool, &self.config, version).await
    }

    fn sql(&self) -> &Sql {
        &self.outbox.sql
    }

    /// Connections that commit without waiting for the WAL flush (delivery records).
    pub(crate) fn records_pool(&self) -> &PgPool {
        &self.records
    }

    /// The advisory-lock namespace of this outbox's `what` (deliveries, members, partitions):
    /// two outboxes in one database never share a lock.
    pub(crate) fn lock_ns(&self, what: &str) -> i32 {
        let name = format!(
            "outbox:{}.{}:{what}",
            self.config.schema, self.config.table_prefix
        );
        (crc32fast::hash(name.as_bytes()) & 0x7fff_ffff) as i32
    }

    /// Runs the claim in `conn`'s transaction and picks the batch; its rows stay locked by it.
    /// A held claim passes its lease as the transaction's idle timeout (`idle_ms`) and the key
    /// of its delivery lock. Also returns the claim transaction's time (none when nothing was
    /// found).
    async fn pick_in(
        &self,
        conn: &mut PgConnection,
        req: &ClaimRequest<'_>,
        idle_ms: Option<i64>,
        lock_key: Option<i32>,
    ) -> StoreResult<(Vec<Message>, Option<DateTime<Utc>>)> {
        let claim = q(&self.sql().claim_runs)
            .bind(int(req.limit))
            .bind(int(req.scan_window()))
            .bind(idle_ms)
            .bind(req.partitions.map(<[bool]>::to_vec))
            .bind(self.lock_ns("deliveries"))
            .bind(lock_key)
            .bind(!req.ahead)
            .bind(i64::try_from(req.max_bytes).ok())
            .fetch_all(&mut *conn);
        // Read on another connection while the claim runs: it costs the claim no round trip.
        let (rows, fence) = tokio::try_join!(async { claim.await.map_err(db) }, self.fence())?;
        let candidates = rows
            .iter()
            .map(candidate_from_row)
            .filter(|c| c.as_ref().map_or(true, |c| !fence.covers(&c.message)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        let claimed_at = match rows.first() {
            Some(row) => Some(row.try_get("claimed_at").map_err(db)?),
            None => None,
        };
        Ok((pick(candidates, req), claimed_at))
    }

    /// What a database restart cut off while its relays may still be delivering it (see
    /// migration 9): nothing, but for one lease after a restart.
    async fn fence(&self) -> StoreResult<Fence> {
        let rows = q(&self.sql().fenced)
            .fetch_all(&self.records)
            .await
            .map_err(db)?;
        let mut fence = Fence::default();
        for row in rows {
            match row.try_get::<Option<String>, _>(0).map_err(db)? {
                Some(key) => fence.keys.insert(key),
                None => fence.ids.insert(row.try_get(1).map_err(db)?),
            };
        }
        Ok(fence)
    }

    async fn execute(
        &self,
        query: sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments>,
    ) -> StoreResult<u64> {
        let run = async { query.execute(&self.pool).await.map_err(db) };
        Ok(self.bounded(run).await?.rows_affected())
    }

    /// For operator commands that touch every dead letter at once: cut off by the query
    /// timeout, such a statement would still run to its end on the server while the command
    /// reported a failure.
    async fn execute_unbounded(
        &self,
        query: sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments>,
    ) -> StoreResult<u64> {
        Ok(query.execute(&self.pool).await.map_err(db)?.rows_affected())
    }
}

fn message_from_row(row: &PgRow) -> Result<Message, sqlx::Error> {
    let status: String = row.try_get("status")?;
    Ok(Message {
        id: row.try_get("id")?,
        seq: row.try_get("seq")?,
        topic: row.try_get("topic")?,
        message_type: row.try_get("type")?,
        key: row.try_get("key")?,
        partition: row.try_get("partition")?,
        payload: row.try_get::<Vec<u8>, _>("payload")?.into(),
        content_type: row.try_get("content_type")?,
        headers: parse_headers(row.try_get("headers")?),
        created_at: row.try_get::<DateTime<Utc>, _>("created_at")?,
        available_at: row.try_get::<DateTime<Utc>, _>("available_at")?,
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
        status: status
            .parse::<Status>()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
    })
}

/// A claimed row. A row found `in_flight` had a lease that expired: its delivery never recorded
/// an outcome either.
fn candidate_from_row(row: &PgRow) -> Result<Candidate, sqlx::Error> {
    let message = message_from_row(row)?;
    let interrupted = row.try_get::<bool, _>("interrupted")? || message.status == Status::InFlight;
    Ok(Candidate {
        message,
        due: row.try_get("due")?,
        interrupted,
    })
}

/// Keys, and unkeyed messages, that no relay may claim yet.
#[derive(Default)]
struct Fence {
    keys: HashSet<String>,
    ids: HashSet<Uuid>,
}

impl Fence {
    fn covers(&self, m: &Message) -> bool {
        match &m.key {
            Some(key) => self.keys.contains(key),
            None => self.ids.contains(&m.id),
        }
    }
}

fn messages(rows: Vec<PgRow>) -> StoreResult<Vec<Message>> {
    let mut out = rows
        .iter()
        .map(message_from_row)
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    out.sort_by_key(|m| m.seq);
    Ok(out)
}

impl PgStore {
    async fn claim_leased_unbounded(&self, req: &ClaimRequest<'_>) -> StoreResult<Vec<Message>> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let (mut batch, _) = self.pick_in(&mut tx, req, None, None).await?;
        if batch.is_empty() {
            tx.rollback().await.map_err(db)?;
            return Ok(batch);
        }
        let until: DateTime<Utc> = q(&self.sql().lease)
            .bind(batch.iter().map(|m| m.seq).collect::<Vec<_>>())
            .bind(req.relay.to_owned())
            .bind(millis(req.lease))
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?
            .try_get(0)
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        for m in &mut batch {
            m.attempts += 1;
            m.status = Status::InFlight;
            m.available_at = until;
        }
        Ok(batch)
    }

    /// Claims like [`Store::claim_leased`], but instead of writing a lease it locks the rows
    /// in a transaction that stays open until the batch is settled: a relay that dies gives
    /// its messages back at once. Messages carry the attempt number of this delivery; it is
    /// stored when the delivery fails, or by [`Store::recover`] when it never ends. `None`
    /// when nothing is claimable. `req.lease` bounds how long the transaction may stay idle:
    /// past it the database ends the session and the messages go to other relays.
    pub async fn claim_held(&self, req: &ClaimRequest<'_>) -> StoreResult<Option<Box<dyn Batch>>> {
        self.bounded(self.claim_held_unbounded(req)).await
    }

    async fn claim_held_unbounded(
        &self,
        req: &ClaimRequest<'_>,
    ) -> StoreResult<Option<Box<dyn Batch>>> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let lock_key = (rand::random::<u32>() & 0x7fff_ffff) as i32;
        // The idle timeout is an int of milliseconds; 0 would mean none.
        let idle = millis(req.lease).clamp(1, i64::from(i32::MAX));
        let (mut messages, claimed_at) = self
            .pick_in(&mut tx, req, Some(idle), Some(lock_key))
            .await?;
        let Some(claimed_at) = claimed_at.filter(|_| !messages.is_empty()) else {
            tx.rollback().await.map_err(db)?;
            return Ok(None);
        };
        for m in &mut messages {
            m.attempts += 1;
            m.status = Status::InFlight;
        }
        // Committed before the sink sees anything: if this batch never settles, recover()
        // finds the record with its lock free and counts the attempt.
        let started = q(&self.sql().delivery_start)
            .bind(lock_key)
            .bind(req.relay.to_owned())
            .bind(messages.iter().map(|m| m.id).collect::<Vec<_>>())
            .bind(req.lease.as_secs_f64())
            .bind(claimed_at)
            .execute(&self.records)
            .await;
        if let Err(e) = started {
            tx.rollback().await.map_err(db)?;
            return Err(db(e));
        }
        Ok(Some(Box::new(PgHeldBatch {
            tx: tokio::sync::Mutex::new(tx),
            messages,
            sql: self.outbox.sql.clone(),
            pool: self.pool.clone(),
            lock_key,
            timeout: self.query_timeout,
            fenced_until: Instant::now() + req.lease,
        })))
    }
}

#[async_trait]
impl Store for PgStore {
    async fn migrate(&self) -> StoreResult<()> {
        migrate_to(&self.pool, &self.config, LATEST_VERSION).await
    }

    async fn check_schema(&self) -> StoreResult<()> {
        let found = self
            .bounded(crate::migrate::schema_version(&self.pool, &self.config))
            .await?;
        outbox_core::check_schema_version(found, LATEST_VERSION)
    }

    async fn claim_leased(&self, req: &ClaimRequest<'_>) -> StoreResult<Vec<Message>> {
        self.bounded(self.claim_leased_unbounded(req)).await
    }

    async fn ack(&self, ids: &[Uuid], retention: Retention) -> StoreResult<u64> {
        let sql = match retention {
            Retention::Delete => &self.sql().ack_delete,
            Retention::Keep(_) => &self.sql().ack_keep,
        };
        self.execute(q(sql).bind(ids.to_vec())).await
    }

    async fn fail(&self, relay: &str, failures: &[Failure]) -> StoreResult<()> {
        let query = fail_query(&self.sql().fail, failures).bind(relay.to_owned());
        self.execute(query).await.map(drop)
    }

    /// Held claims ([`ClaimMode::Transaction`], the default) or leased ones.
    fn source(self: Arc<Self>) -> Arc<dyn Source> {
        match self.claim_mode {
            ClaimMode::Transaction => Arc::new(Held(self)),
            ClaimMode::Lease => Arc::new(Leased::new(self)),
        }
    }

    async fn ownership(&self, relay: &str) -> StoreResult<Option<Box<dyn Ownership>>> {
        let _ = relay;
        Ok(Some(Box::new(crate::ownership::PgOwnership::new(self))))
    }

    async fn recover(&self, max_attempts: i32) -> StoreResult<u64> {
        let query = q(&self.sql().recover)
            .bind(self.lock_ns("deliveries"))
            .bind(max_attempts);
        let row = self
            .bounded(async { query.fetch_one(&self.pool).await.map_err(db) })
            .await?;
        let n: i64 = row.try_get(0).map_err(db)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn release(&self, relay: &str, ids: &[Uuid]) -> StoreResult<()> {
        let query = q(&self.sql().release)
            .bind(ids.to_vec())
            .bind(relay.to_owned());
        self.execute(query).await.map(drop)
    }

    async fn purge_delivered(&self, older_than: Duration, limit: usize) -> StoreResult<u64> {
        let query = q(&self.sql().purge_delivered)
            .bind(millis(older_than))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        self.execute(query).await
    }

    async fn status(&self) -> StoreResult<StatusCounts> {
        let query = q(&self.sql().status);
        let row = self
            .bounded(async { query.fetch_one(&self.pool).await.map_err(db) })
            .await?;
        let get = |name: &str| row.try_get::<i64, _>(name).map_err(db);
        Ok(StatusCounts {
            pending: get("pending")?,
            in_flight: get("in_flight")?,
            delivered: get("delivered")?,
            dead: get("dead")?,
            oldest_pending_age_seconds: row.try_get("oldest").map_err(db)?,
        })
    }

    async fn backlog(&self) -> StoreResult<Vec<TopicBacklog>> {
        let query = q(&self.sql().backlog);
        let rows = self
            .bounded(async { query.fetch_all(&self.pool).await.map_err(db) })
            .await?;
        rows.iter()
            .map(|row| {
                let get = |name: &str| row.try_get::<i64, _>(name).map_err(db);
                Ok(TopicBacklog {
                    topic: row.try_get("topic").map_err(db)?,
                    pending: get("pending")?,
                    in_flight: get("in_flight")?,
                    delivered: get("delivered")?,
                    dead: get("dead")?,
                    oldest_pending_age_seconds: row.try_get("oldest").map_err(db)?,
                })
            })
            .collect()
    }

    async fn ping(&self) -> StoreResult<()> {
        let query = sqlx::query("SELECT 1");
        self.bounded(async { query.execute(&self.pool).await.map_err(db) })
            .await
            .map(drop)
    }

    async fn dead_list(&self, limit: usize) -> StoreResult<Vec<Message>> {
        let query = q(&self.sql().dead_list).bind(i64::try_from(limit).unwrap_or(i64::MAX));
        let rows = self
            .bounded(async { query.fetch_all(&self.pool).await.map_err(db) })
            .await?;
        messages(rows)
    }

    async fn dead_retry(&self, ids: Option<&[Uuid]>) -> StoreResult<u64> {
        let n = self
            .execute_unbounded(q(&self.sql().dead_retry).bind(ids.map(<[Uuid]>::to_vec)))
            .await?;
        // Retried rows are updates, which the insert trigger does not see: wake relays here.
        if n > 0 {
            self.execute(q(&self.sql().notify)).await?;
        }
        Ok(n)
    }

    async fn delivered_after_dead(&self, ids: Option<&[Uuid]>) -> StoreResult<Vec<(String, u64)>> {
        let rows = q(&self.sql().delivered_after_dead)
            .bind(ids.map(<[Uuid]>::to_vec))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| {
                let later: i64 = row.try_get("later").map_err(db)?;
                Ok((row.try_get("key").map_err(db)?, later.max(0) as u64))
            })
            .collect()
    }

    async fn dead_purge(&self, older_than: Option<Duration>) -> StoreResult<u64> {
        self.execute_unbounded(q(&self.sql().dead_purge).bind(older_than.map(millis)))
            .await
    }

    async fn dead_page(
        &self,
        filter: &DeadFilter,
        after: Option<Uuid>,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        let query = bind_dead_filter(q(&self.sql().dead_page), filter)
            .bind(after)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        let rows = self
            .bounded(async { query.fetch_all(&self.pool).await.map_err(db) })
            .await?;
        rows.iter()
            .map(message_from_row)
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)
    }

    async fn get_message(&self, id: Uuid) -> StoreResult<Option<Message>> {
        let query = q(&self.sql().get_message).bind(id);
        let row = self
            .bounded(async { query.fetch_optional(&self.pool).await.map_err(db) })
            .await?;
        row.as_ref().map(message_from_row).transpose().map_err(db)
    }

    async fn dead_retry_where(&self, filter: &DeadFilter) -> StoreResult<u64> {
        let n = self
            .execute_unbounded(bind_dead_filter(q(&self.sql().dead_retry_where), filter))
            .await?;
        // Retried rows are updates, which the insert trigger does not see: wake relays here.
        if n > 0 {
            self.execute(q(&self.sql().notify)).await?;
        }
        Ok(n)
    }

    async fn dead_purge_where(&self, filter: &DeadFilter) -> StoreResult<u64> {
        self.execute_unbounded(bind_dead_filter(q(&self.sql().dead_purge_where), filter))
            .await
    }

    async fn heartbeat(&self, relay: &str, state: &str) -> StoreResult<()> {
        let query = q(&self.sql().heartbeat)
            .bind(relay.to_owned())
            .bind(state.to_owned());
        self.execute(query).await.map(drop)
    }

    async fn relays(&self, within: Duration) -> StoreResult<Vec<RelaySeen>> {
        let query = q(&self.sql().relays).bind(millis(within));
        let rows = self
            .bounded(async { query.fetch_all(&self.pool).await.map_err(db) })
            .await?;
        rows.iter()
            .map(|row| {
                Ok(RelaySeen {
                    id: row.try_get("relay_id")?,
                    state: row.try_get("state")?,
                    last_seen: row.try_get("last_seen")?,
                    age_seconds: row.try_get("age")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(db)
    }

    async fn pause_topic(&self, topic: &str) -> StoreResult<bool> {
        Ok(self
            .execute(q(&self.sql().pause).bind(topic.to_owned()))
            .await?
            > 0)
    }

    async fn resume_topic(&self, topic: &str) -> StoreResult<bool> {
        let resumed = self
            .execute(q(&self.sql().resume).bind(topic.to_owned()))
            .await?
            > 0;
        // The topic's messages were there all along: no insert will wake a parked relay.
        if resumed {
            self.execute(q(&self.sql().notify)).await?;
        }
        Ok(resumed)
    }

    async fn paused_topics(&self) -> StoreResult<Vec<String>> {
        let query = q(&self.sql().paused);
        let rows = self
            .bounded(async { query.fetch_all(&self.pool).await.map_err(db) })
            .await?;
        rows.iter()
            .map(|row| row.try_get("topic"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)
    }

    async fn waiter(&self, relay: &str) -> StoreResult<Box<dyn Waiter>> {
        let listener = self.bounded(async {
            let mut listener = PgListener::connect_with(&self.pool).await.map_err(db)?;
            listener.listen(&self.config.channel()).await.map_err(db)?;
            Ok(listener)
        });
        let listener = listener.await?;
        Ok(Box::new(PgWaiter {
            store: self.clone(),
            listener,
            relay: relay.to_owned(),
            parked_until: None,
            settle: PgWaiter::FIRST_SETTLE,
        }))
    }
}

/// Binds a dead-letter filter as `$1`–`$6` of the statements built on `DEAD_FILTER`.
fn bind_dead_filter(
    query: sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments>,
    f: &DeadFilter,
) -> sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(f.ids.clone())
        .bind(f.topic.clone())
        .bind(f.message_type.clone())
        .bind(f.key.clone())
        .bind(f.error_pattern())
        .bind(f.older_than.map(millis))
}

/// Binds the failures as the `UNNEST` arrays of the fail statements.
fn fail_query(
    sql: &Arc<str>,
    failures: &[Failure],
) -> sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments> {
    bind_failures(q(sql), failures)
}

/// Appends the failures' `UNNEST` arrays (ids, errors, delays) to a query's parameters.
fn bind_failures(
    query: sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments>,
    failures: &[Failure],
) -> sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(failures.iter().map(|f| f.id).collect::<Vec<_>>())
        .bind(
            failures
                .iter()
                .map(Failure::stored_error)
                .collect::<Vec<_>>(),
        )
        .bind(
            failures
                .iter()
                .map(|f| f.retry_in.map(millis))
                .collect::<Vec<_>>(),
        )
}

/// A claim whose rows stay locked by `tx` until it is settled or dropped (rolled back). Its
/// delivery record (`lock_key`) goes with the outcome, in the same commit.
struct PgHeldBatch {
    /// Locked only to ask whether the session is alive while the batch is in delivery.
    tx: tokio::sync::Mutex<Transaction<'static, Postgres>>,
    messages: Vec<Message>,
    sql: Arc<Sql>,
    pool: PgPool,
    lock_key: i32,
    timeout: Duration,
    /// The end of the fence its delivery record sets after a database restart (migration 10).
    fenced_until: Instant,
}

impl PgHeldBatch {
    /// The relay is done with a batch whose outcome could not be recorded (its session died
    /// with a database restart, or the database stopped answering): its delivery record goes,
    /// so that the keys a restart fenced are claimable at once instead of at the end of the
    /// lease. Retried in the background until the database answers or the fence ends anyway.
    /// No attempt is counted: the database failed, not the messages.
    fn lift_fence(pool: PgPool, sql: Arc<Sql>, lock_key: i32, until: Instant) {
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(50);
            loop {
                let end = q(&sql.delivery_end).bind(lock_key);
                if end.execute(&pool).await.is_ok() || Instant::now() + pause >= until {
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        });
    }
}

/// The held source: [`PgStore::claim_held`].
struct Held(Arc<PgStore>);

#[async_trait]
impl Source for Held {
    fn name(&self) -> &'static str {
        "held"
    }

    async fn claim(&self, req: &ClaimRequest<'_>) -> StoreResult<Option<Box<dyn Batch>>> {
        self.0.claim_held(req).await
    }
}

#[async_trait]
impl Batch for PgHeldBatch {
    fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Records the outcome and commits: acks done per `retention`, failures back to pending
    /// with the attempt counted (or dead); messages left behind by a failed key are simply
    /// unlocked. If this fails nothing was recorded, and every message will be delivered
    /// again: the transaction is gone, so there is nothing to try again.
    async fn settle(self: Box<Self>, outcome: &Outcome<'_>) -> Result<(), Unsettled> {
        self.commit(outcome.acks, outcome.failures, outcome.retention)
            .await
            .map_err(|error| Unsettled { error, retry: None })
    }

    async fn release(self: Box<Self>) -> StoreResult<()> {
        self.roll_back().await
    }

    async fn is_held(&self) -> bool {
        self.alive().await
    }
}

impl PgHeldBatch {
    async fn commit(
        self: Box<Self>,
        acks: &[Uuid],
        failures: &[Failure],
        retention: Retention,
    ) -> StoreResult<()> {
        let PgHeldBatch {
            tx,
            sql,
            pool,
            lock_key,
            timeout,
            fenced_until,
            ..
        } = *self;
        let mut tx = tx.into_inner();
        let done = match retention {
            Retention::Delete => &sql.settle_delete,
            Retention::Keep(_) => &sql.settle_keep,
        };
        let query = bind_failures(q(done).bind(lock_key).bind(acks.to_vec()), failures);
        // If the commit's answer is what the timeout cuts off, the outcome may still be
        // recorded; either way every message was delivered at least once.
        let settled = bounded(timeout, async {
            query.execute(&mut *tx).await.map_err(db)?;
            tx.commit().await.map_err(db)
        })
        .await;
        if settled.is_err() {
            Self::lift_fence(pool, sql, lock_key, fenced_until);
        }
        settled
    }

    async fn roll_back(self: Box<Self>) -> StoreResult<()> {
        let PgHeldBatch {
            tx,
            sql,
            pool,
            lock_key,
            timeout,
            fenced_until,
            ..
        } = *self;
        let rolled_back = bounded(timeout, async {
            tx.into_inner().rollback().await.map_err(db)
        })
        .await;
        if let Err(e) = rolled_back {
            Self::lift_fence(pool, sql, lock_key, fenced_until);
            return Err(e);
        }
        // A release counts no attempt; if this fails, recover() counts one, which is harmless.
        let end = q(&sql.delivery_end).bind(lock_key);
        bounded(timeout, async { end.execute(&pool).await.map_err(db) })
            .await
            .map(drop)
    }

    async fn alive(&self) -> bool {
        // Bounded too: over a silent partition the answer would never come.
        let check = async {
            let mut tx = self.tx.lock().await;
            sqlx::query("SELECT 1").execute(&mut **tx).await.map_err(db)
        };
        bounded(self.timeout, check).await.is_ok()
    }
}

/// Sleeps on LISTEN while registered as parked, so that writers notify only idle relays.
struct PgWaiter {
    store: PgStore,
    listener: PgListener,
    relay: String,
    /// Local view of the registration's expiry; `None` when not registered.
    parked_until: Option<Instant>,
    /// The next sleep right after parking, doubled per sleep up to the poll interval.
    settle: Duration,
}

impl PgWaiter {
    /// A registration lives this long without renewal, so a relay that dies while parked
    /// stops costing writers a NOTIFY soon after.
    const REGISTRATION: Duration = Duration::from_secs(60);

    /// A writer whose trigger ran just before the registration committed, and whose own
    /// commit lands after the relay's last claim, sends no NOTIFY. Right after parking the
    /// relay therefore polls at 5, 10, 20 … ms until it reaches its poll interval, which
    /// catches such commits within milliseconds for a handful of extra queries per idle spell.
    const FIRST_SETTLE: Duration = Duration::from_millis(5);

    async fn park(&mut self) -> StoreResult<()> {
        let query = q(&self.store.sql().park)
            .bind(self.relay.clone())
            .bind(millis(Self::REGISTRATION));
        self.store.execute(query).await?;
        if self.parked_until.is_none() {
            self.settle = Self::FIRST_SETTLE;
        }
        self.parked_until = Some(Instant::now() + Self::REGISTRATION);
        Ok(())
    }
}

#[async_trait]
impl Waiter for PgWaiter {
    async fn prepare(&mut self) -> StoreResult<bool> {
        match self.parked_until {
            // Just registered: a writer may have committed before it saw the registration,
            // so the relay claims once more before it sleeps.
            None => self.park().await.map(|()| true),
            Some(until)
                if until.saturating_duration_since(Instant::now()) < Self::REGISTRATION / 2 =>
            {
                self.park().await.map(|()| false)
            }
            Some(_) => Ok(false),
        }
    }

    async fn idle(&mut self, timeout: Duration) -> StoreResult<()> {
        let sleep = timeout.min(self.settle);
        self.settle = self.settle.saturating_mul(2);
        match tokio::time::timeout(sleep, self.listener.recv()).await {
            Err(_elapsed) => Ok(()),
            Ok(Ok(_notification)) => {
                // Several writers may have notified; one claim serves them all.
                while self.listener.next_buffered().is_some() {}
                Ok(())
            }
            Ok(Err(e)) => Err(db(e)),
        }
    }

    async fn busy(&mut self) -> StoreResult<()> {
        if self.parked_until.take().is_some() {
            let query = q(&self.store.sql().unpark).bind(self.relay.clone());
            self.store.execute(query).await?;
        }
        Ok(())
    }
}
