//! [`MySqlStore`] (the relay's side) and [`MySqlOutbox`] (the writer's side).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use outbox_core::{
    Candidate, ClaimRequest, DEFAULT_MAX_MESSAGE_BYTES, DeadFilter, Failure, Head, Message,
    NewMessage, PollingWaiter, RelaySeen, Retention, Status, StatusCounts, Store, StoreError,
    StoreResult, TopicBacklog, Waiter, keep_within_budget, parse_headers, pick,
};
use sqlx::mysql::{MySqlArguments, MySqlPoolOptions, MySqlRow};
use sqlx::{AssertSqlSafe, Connection, MySql, MySqlConnection, MySqlPool, Row, Transaction};
use tokio::sync::Notify;
use tracing::Instrument;
use uuid::Uuid;

use crate::migrate::{LATEST_VERSION, migrate_to};

/// The database server's clock in Unix milliseconds: every time the store writes or compares
/// comes from it, so relays and writers on different machines agree on leases and delays.
pub(crate) const NOW_MS: &str = "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)";

/// Where the outbox lives in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MySqlConfig {
    /// Prefix of every table and index name.
    pub table_prefix: String,
}

impl Default for MySqlConfig {
    fn default() -> Self {
        Self {
            table_prefix: "outbox_".into(),
        }
    }
}

impl MySqlConfig {
    /// Sets [`MySqlConfig::table_prefix`].
    pub fn table_prefix(mut self, table_prefix: impl Into<String>) -> Self {
        self.table_prefix = table_prefix.into();
        self
    }

    /// The prefix is spliced into SQL, so only plain lower-case identifiers are accepted.
    pub fn validate(&self) -> StoreResult<()> {
        outbox_core::check_identifier("table prefix", &self.table_prefix)
    }
}

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

type Query = sqlx::query::Query<'static, MySql, MySqlArguments>;

fn q(sql: impl Into<String>) -> Query {
    sqlx::query(AssertSqlSafe(sql.into()))
}

fn db(e: sqlx::Error) -> StoreError {
    StoreError::database(e)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `n` placeholders for an `IN (…)` list; never empty (`NULL` matches nothing).
fn marks(n: usize) -> String {
    if n == 0 {
        return "NULL".into();
    }
    let mut s = "?, ".repeat(n);
    s.truncate(s.len() - 2);
    s
}

/// Columns read back into a [`Message`]; `key` and `partition` are reserved words in MySQL.
const COLUMNS: &str = "id, seq, topic, type, msg_key, msg_partition, payload, content_type, \
     headers, created_at, available_at, attempts, last_error, status";

/// Columns bound per enqueued row; MySQL allows 65,535 placeholders per statement.
const INSERT_COLUMNS: usize = 10;
const ROWS_PER_INSERT: usize = 65_535 / INSERT_COLUMNS;

/// Runs are fetched for at most this many keyed heads: past that, a batch is full of heads.
const MAX_RUNS: usize = 256;

/// The statements of one table prefix. Those whose `IN (…)` lists vary in length keep a
/// `{in}` mark, filled per call by [`with_list`].
#[derive(Debug)]
struct Sql {
    insert_head: String,
    insert_row: String,
    lock: String,
    heads: String,
    heads_widened: String,
    rows: String,
    run: String,
    lease: String,
    ack_delete: String,
    ack_keep: String,
    fail_retry: String,
    fail_dead: String,
    release: String,
    purge_delivered: String,
    status: String,
    backlog: String,
    dead_list: String,
    dead_retry_some: String,
    dead_retry_all: String,
    delivered_after_dead: String,
    dead_purge: String,
    dead_page: String,
    get_message: String,
    dead_retry_where: String,
    dead_purge_where: String,
    heartbeat: String,
    relays: String,
    pause: String,
    resume: String,
    paused: String,
}

fn with_list(sql: &str, n: usize) -> String {
    sql.replace("{in}", &marks(n))
}

/// The condition under which a keyed row `w` may head a claim: no older message of its key
/// is undelivered, and no other message of its key is in delivery under a live lease. The
/// second half matters when writers race: a message committed after a newer one of its key
/// was claimed waits for that delivery to end.
const KEY_IS_FREE: &str = "NOT EXISTS (SELECT 1 FROM {p}messages e \
    WHERE e.msg_key = w.msg_key AND e.seq <> w.seq AND e.status IN ('pending', 'in_flight') \
      AND (e.seq < w.seq OR (e.status = 'in_flight' AND e.available_at > {now})))";

/// The heads in a window of the ready index (see `outbox_core::claim`): unkeyed rows, and each
/// key's oldest row in the window when its key is free.
///
/// A paused topic's unkeyed rows stay out of the window; its keyed rows stay in, so that their
/// key sits out (a later message of the key must not overtake a paused one), but never head.
const HEADS: &str = "SELECT w.seq, w.msg_key, w.size FROM (\
      SELECT seq, msg_key, topic, ready_at, length(payload) AS size FROM {p}messages \
      WHERE ready_at <= {now} \
        AND (msg_key IS NOT NULL OR topic NOT IN (SELECT topic FROM {p}paused_topics)) \
      ORDER BY ready_at, seq LIMIT ?) w \
    WHERE (w.msg_key IS NULL OR {free}) \
      AND w.topic NOT IN (SELECT topic FROM {p}paused_topics) \
    ORDER BY w.ready_at, w.seq LIMIT ?";

/// The heads anywhere in the backlog, for when the window held none.
const HEADS_WIDENED: &str = "SELECT w.seq, w.msg_key, length(w.payload) AS size \
    FROM {p}messages w \
    WHERE w.ready_at <= {now} AND w.topic NOT IN (SELECT topic FROM {p}paused_topics) \
      AND (w.msg_key IS NULL OR {free}) \
    ORDER BY w.ready_at, w.seq LIMIT ?";

/// One key's messages after its head, locked for the claim. A message of a paused topic is
/// not due, so the run stops before it.
const RUN: &str = "(SELECT {columns}, \
    (available_at <= {now} AND topic NOT IN (SELECT topic FROM {p}paused_topics)) AS due \
    FROM {p}messages WHERE msg_key = ? AND seq > ? AND status IN ('pending', 'in_flight') \
    ORDER BY seq LIMIT ? OFFSET ? FOR UPDATE)";

/// The dead letters an operator command selects (see `outbox_core::DeadFilter`), found through
/// the index of `dead_at`, which only dead letters have; the fifth
/// parameter is a lower-case `LIKE` pattern escaped with `\`. The id list is bound as a JSON
/// array, so that the statement has one shape for any number of ids.
const DEAD_FILTER: &str = "dead_at IS NOT NULL AND status = 'dead' \
    AND (? IS NULL OR JSON_CONTAINS(?, JSON_QUOTE(id))) \
    AND (? IS NULL OR topic = ?) \
    AND (? IS NULL OR type = ?) \
    AND (? IS NULL OR msg_key = ?) \
    AND (? IS NULL OR lower(last_error) LIKE ? ESCAPE '\\\\') \
    AND (? IS NULL OR dead_at <= {now} - ?)";

impl Sql {
    fn new(p: &str) -> Self {
        let r = |t: &str| -> String {
            t.replace("{free}", KEY_IS_FREE)
                .replace("{p}", p)
                .replace("{columns}", COLUMNS)
                .replace("{now}", NOW_MS)
        };
        let dead = |t: &str| r(&t.replace("{filter}", DEAD_FILTER));
        Self {
            insert_head: format!(
                "INSERT INTO {p}messages (id, topic, type, msg_key, msg_partition, payload, \
                 content_type, headers, created_at, available_at) VALUES "
            ),
            insert_row: format!("(?, ?, ?, ?, ?, ?, ?, ?, {NOW_MS}, {NOW_MS} + ?)"),
            lock: r("SELECT id FROM {p}claim_lock WHERE id = 1 FOR UPDATE"),
            heads: r(HEADS),
            heads_widened: r(HEADS_WIDENED),
            rows: r("SELECT {columns}, available_at <= {now} AS due \
                 FROM {p}messages WHERE seq IN ({in}) AND status IN ('pending', 'in_flight') \
                 FOR UPDATE"),
            run: r(RUN),
            lease: r("UPDATE {p}messages \
                 SET status = 'in_flight', locked_by = ?, attempts = attempts + 1, \
                     available_at = {now} + ? \
                 WHERE seq IN ({in})"),
            ack_delete: r("DELETE FROM {p}messages WHERE id IN ({in}) AND status = 'in_flight'"),
            ack_keep: r("UPDATE {p}messages \
                 SET status = 'delivered', delivered_at = {now}, locked_by = NULL \
                 WHERE id IN ({in}) AND status = 'in_flight'"),
            fail_retry: r("UPDATE {p}messages \
                 SET status = 'pending', available_at = {now} + ?, last_error = ?, locked_by = NULL \
                 WHERE id = ? AND locked_by = ? AND status = 'in_flight'"),
            fail_dead: r("UPDATE {p}messages \
                 SET status = 'dead', dead_at = {now}, last_error = ?, locked_by = NULL \
                 WHERE id = ? AND locked_by = ? AND status = 'in_flight'"),
            release: r(
                "UPDATE {p}messages SET status = 'pending', available_at = {now}, \
                 attempts = greatest(attempts - 1, 0), locked_by = NULL \
                 WHERE id IN ({in}) AND locked_by = ? AND status = 'in_flight'",
            ),
            purge_delivered: r("DELETE FROM {p}messages \
                 WHERE status = 'delivered' AND delivered_at <= {now} - ? \
                 ORDER BY delivered_at LIMIT ?"),
            status: r(&format!("SELECT {COUNTS} FROM {{p}}messages")),
            backlog: r(&format!(
                "SELECT topic, {COUNTS} FROM {{p}}messages GROUP BY topic ORDER BY topic"
            )),
            dead_list: r(
                "SELECT {columns} FROM {p}messages WHERE status = 'dead' ORDER BY seq LIMIT ?",
            ),
            dead_retry_some: r("UPDATE {p}messages SET status = 'pending', attempts = 0, \
                 available_at = {now}, dead_at = NULL, locked_by = NULL \
                 WHERE status = 'dead' AND id IN ({in})"),
            dead_retry_all: r("UPDATE {p}messages SET status = 'pending', attempts = 0, \
                 available_at = {now}, dead_at = NULL, locked_by = NULL WHERE status = 'dead'"),
            delivered_after_dead: r("SELECT d.msg_key AS msg_key, count(l.id) AS later FROM (\
                 SELECT msg_key, min(seq) AS seq FROM {p}messages \
                 WHERE status = 'dead' AND msg_key IS NOT NULL \
                   AND (? IS NULL OR JSON_CONTAINS(?, JSON_QUOTE(id))) \
                 GROUP BY msg_key) d \
                 LEFT JOIN {p}messages l \
                   ON l.msg_key = d.msg_key AND l.seq > d.seq AND l.status = 'delivered' \
                 GROUP BY d.msg_key ORDER BY d.msg_key"),
            dead_purge: r("DELETE FROM {p}messages \
                 WHERE status = 'dead' AND (? IS NULL OR dead_at <= {now} - ?)"),
            dead_page: dead(
                "SELECT {columns} FROM {p}messages WHERE {filter} \
                 AND (? IS NULL OR id > ?) ORDER BY id LIMIT ?",
            ),
            get_message: r("SELECT {columns} FROM {p}messages WHERE id = ?"),
            dead_retry_where: dead(
                "UPDATE {p}messages SET status = 'pending', attempts = 0, \
                 available_at = {now}, dead_at = NULL, locked_by = NULL WHERE {filter}",
            ),
            dead_purge_where: dead("DELETE FROM {p}messages WHERE {filter}"),
            // Assignments run left to right and see the ones before: last_seen goes first,
            // while `state` still holds the old value.
            heartbeat: r(
                "INSERT INTO {p}relay_heartbeats (relay_id, state, last_seen, started_at) \
                 VALUES (?, ?, {now}, {now}) ON DUPLICATE KEY UPDATE \
                 last_seen = IF(state <> 'stopped', VALUES(last_seen), last_seen), \
                 state = IF(state <> 'stopped', VALUES(state), state)",
            ),
            relays: r("SELECT relay_id, state, last_seen, {now} AS now \
                 FROM {p}relay_heartbeats WHERE last_seen >= {now} - ? ORDER BY relay_id"),
            pause: r("INSERT IGNORE INTO {p}paused_topics (topic, paused_at) VALUES (?, {now})"),
            resume: r("DELETE FROM {p}paused_topics WHERE topic = ?"),
            paused: r("SELECT topic FROM {p}paused_topics ORDER BY topic"),
        }
    }
}

/// Counts per state, and the age of the oldest pending message by the database's clock.
const COUNTS: &str = "\
    CAST(coalesce(sum(status = 'pending'), 0) AS SIGNED) AS pending, \
    CAST(coalesce(sum(status = 'in_flight'), 0) AS SIGNED) AS in_flight, \
    CAST(coalesce(sum(status = 'delivered'), 0) AS SIGNED) AS delivered, \
    CAST(coalesce(sum(status = 'dead'), 0) AS SIGNED) AS dead, \
    {now} - min(CASE WHEN status = 'pending' THEN created_at END) AS oldest_ms";

/// Binds a dead-letter filter as the parameters of [`DEAD_FILTER`], each twice (once for its
/// `IS NULL` test).
fn bind_dead_filter(query: Query, f: &DeadFilter) -> Query {
    let ids = f.ids.as_deref().map(id_json);
    let older = f.older_than.map(ms);
    query
        .bind(ids.clone())
        .bind(ids)
        .bind(f.topic.clone())
        .bind(f.topic.clone())
        .bind(f.message_type.clone())
        .bind(f.message_type.clone())
        .bind(f.key.clone())
        .bind(f.key.clone())
        .bind(f.error_pattern())
        .bind(f.error_pattern())
        .bind(older)
        .bind(older)
}

fn id_json(ids: &[Uuid]) -> String {
    serde_json::to_string(&ids.iter().map(Uuid::to_string).collect::<Vec<_>>())
        .unwrap_or_else(|_| "[]".into())
}

fn bind_ids(mut query: Query, ids: &[Uuid]) -> Query {
    for id in ids {
        query = query.bind(id.to_string());
    }
    query
}

/// The writer's handle: enqueues messages inside the caller's transaction.
#[derive(Debug, Clone)]
pub struct MySqlOutbox {
    sql: Arc<Sql>,
    max_message_bytes: usize,
}

impl MySqlOutbox {
    /// Sets the largest message this handle enqueues (see the store's
    /// `with_max_message_size`).
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Adds one message to the outbox as part of `tx`.
    pub async fn enqueue(
        &self,
        tx: &mut Transaction<'_, MySql>,
        msg: &NewMessage,
    ) -> Result<(), EnqueueError> {
        self.enqueue_batch(tx, std::slice::from_ref(msg)).await
    }

    /// Adds many messages as part of `tx` in one multi-row statement (more only past MySQL's
    /// placeholder limit); `seq` follows the slice's order.
    pub async fn enqueue_batch(
        &self,
        tx: &mut Transaction<'_, MySql>,
        msgs: &[NewMessage],
    ) -> Result<(), EnqueueError> {
        let span = outbox_core::trace::create_span(msgs);
        self.insert_batch(tx, msgs).instrument(span).await
    }

    async fn insert_batch(
        &self,
        tx: &mut Transaction<'_, MySql>,
        msgs: &[NewMessage],
    ) -> Result<(), EnqueueError> {
        outbox_core::check_batch(msgs, self.max_message_bytes)?;
        // Delays are turned into offsets from the server's clock, which stamps the row.
        let now = Utc::now();
        for chunk in msgs.chunks(ROWS_PER_INSERT) {
            let rows = vec![self.sql.insert_row.as_str(); chunk.len()].join(", ");
            let mut query = q(format!("{}{rows}", self.sql.insert_head));
            for m in chunk {
                let delay = (m.available_at_from(now) - now).num_milliseconds().max(0);
                query = query
                    .bind(m.id().to_string())
                    .bind(m.topic().to_owned())
                    .bind(m.message_type().to_owned())
                    .bind(m.key_ref().map(str::to_owned))
                    .bind(m.partition())
                    .bind(m.payload().to_vec())
                    .bind(m.content_type().to_owned())
                    .bind(m.headers_json())
                    .bind(delay);
            }
            query.execute(&mut **tx).await?;
        }
        Ok(())
    }
}

/// The outbox in a MySQL or MariaDB database, for relays and operators.
#[derive(Debug, Clone)]
pub struct MySqlStore {
    pool: MySqlPool,
    config: Arc<MySqlConfig>,
    outbox: MySqlOutbox,
    inbox: crate::MySqlInbox,
    notify: Arc<Notify>,
}

impl MySqlStore {
    /// A store with the default table prefix on an existing pool.
    pub fn new(pool: MySqlPool) -> Self {
        Self::with_config(pool, MySqlConfig::default()).expect("default names are valid")
    }

    /// A store with the tables named by `config` on an existing pool. Fails with
    /// [`StoreError::Config`] when the table prefix is not a plain lower-case identifier.
    pub fn with_config(pool: MySqlPool, config: MySqlConfig) -> StoreResult<Self> {
        config.validate()?;
        let sql = Arc::new(Sql::new(&config.table_prefix));
        Ok(Self {
            pool,
            inbox: crate::MySqlInbox::new(&config.table_prefix),
            config: Arc::new(config),
            outbox: MySqlOutbox {
                sql,
                max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            },
            notify: Arc::new(Notify::new()),
        })
    }

    /// Connects a pool of four to `url` (`mysql://user:password@host:port/database`).
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let pool = MySqlPoolOptions::new()
            .max_connections(4)
            .connect(url)
            .await
            .map_err(db)?;
        Ok(Self::new(pool))
    }

    /// The pool the store runs on, for the caller's own transactions (`enqueue` takes one).
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// The table prefix the store uses.
    pub fn config(&self) -> &MySqlConfig {
        &self.config
    }

    /// Sets the largest message enqueue accepts, payload and headers counted (default
    /// [`DEFAULT_MAX_MESSAGE_BYTES`], 1 MiB). A bigger message is refused with an error naming
    /// the limit. Check that the server's `max_allowed_packet` is larger.
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.outbox = self.outbox.with_max_message_size(bytes);
        self
    }

    /// The writer's handle, cheap to clone.
    pub fn outbox(&self) -> &MySqlOutbox {
        &self.outbox
    }

    /// The consumer's handle: exactly-once effects from at-least-once deliveries.
    pub fn inbox(&self) -> &crate::MySqlInbox {
        &self.inbox
    }

    /// Wakes a relay of this process that sleeps on this store; call it after commit.
    pub fn notify(&self) {
        self.notify.notify_one();
    }

    /// The wake-up handle that this store's waiters sleep on: `notify_one()` after commit wakes
    /// one idle relay of this process. Relays in other processes find the rows at their next
    /// poll: MySQL has no notifications.
    pub fn notifier(&self) -> Arc<Notify> {
        self.notify.clone()
    }

    /// Applies migrations up to `version` only (for staged upgrades and their tests).
    pub async fn migrate_to(&self, version: i64) -> StoreResult<()> {
        migrate_to(&self.pool, &self.config.table_prefix, version).await
    }

    fn sql(&self) -> &Sql {
        &self.outbox.sql
    }

    async fn execute(&self, query: Query) -> StoreResult<u64> {
        Ok(query.execute(&self.pool).await.map_err(db)?.rows_affected())
    }

    /// The heads of a claim and, for keyed ones, the runs that follow them, locked.
    async fn candidates(
        &self,
        conn: &mut MySqlConnection,
        req: &ClaimRequest<'_>,
    ) -> StoreResult<Vec<Candidate>> {
        let mut heads: Vec<Head> = Vec::new();
        for (sql, windowed) in [
            (&self.sql().heads, true),
            (&self.sql().heads_widened, false),
        ] {
            let mut query = q(sql.as_str());
            if windowed {
                query = query.bind(count(req.scan_window()));
            }
            let rows = query
                .bind(count(req.limit))
                .fetch_all(&mut *conn)
                .await
                .map_err(db)?;
            heads = rows
                .iter()
                .map(|r| Ok((r.try_get("seq")?, r.try_get("msg_key")?, r.try_get("size")?)))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(db)?;
            if !heads.is_empty() || req.ahead {
                break;
            }
        }
        if heads.is_empty() {
            return Ok(Vec::new());
        }
        // Only the heads that fit in the byte budget are read whole; `pick` cuts the runs.
        let used = keep_within_budget(&mut heads, req.max_bytes);
        let mut query = q(with_list(&self.sql().rows, heads.len()));
        for h in &heads {
            query = query.bind(h.0);
        }
        let rows = query.fetch_all(&mut *conn).await.map_err(db)?;
        let mut out = candidates(&rows)?;
        let keyed: Vec<(i64, String)> = heads
            .into_iter()
            .filter_map(|(seq, key, _)| key.map(|k| (seq, k)))
            .collect();
        // As on PostgreSQL: each key brings its fair share of the room left, then, when some
        // had less, the others what is still missing.
        let room = req.limit.saturating_sub(out.len());
        let per_key = room / keyed.len().max(1);
        if !keyed.is_empty() && keyed.len() <= MAX_RUNS && per_key > 0 && used < req.max_bytes {
            let first = self.runs(conn, &keyed, per_key, 0).await?;
            let missing = room.saturating_sub(first.len());
            out.extend(first);
            if missing > 0 {
                out.extend(self.runs(conn, &keyed, missing, per_key).await?);
            }
        }
        Ok(out)
    }

    /// Up to `per_key` messages of each head's key after its first `skip` followers, in one
    /// compound statement.
    async fn runs(
        &self,
        conn: &mut MySqlConnection,
        heads: &[(i64, String)],
        per_key: usize,
        skip: usize,
    ) -> StoreResult<Vec<Candidate>> {
        let sql = vec![self.sql().run.as_str(); heads.len()].join(" UNION ALL ");
        let mut query = q(sql);
        for (seq, key) in heads {
            query = query
                .bind(key.clone())
                .bind(*seq)
                .bind(count(per_key))
                .bind(count(skip));
        }
        let rows = query.fetch_all(&mut *conn).await.map_err(db)?;
        candidates(&rows)
    }

    /// A claim in one transaction, holding the claim lock from its first read to its commit.
    /// `READ COMMITTED`: each statement sees the claims committed before it, and locking reads
    /// take no gap locks, so writers inserting new rows never wait for a claim.
    ///
    /// The transaction runs to its end in a task of its own, whatever happens to the caller: a
    /// relay task dropped in the middle of a claim (aborted, or a shutdown that stops
    /// waiting) could otherwise leave its connection halfway through a statement, its
    /// rollback never sent, and the claim lock held against every other relay. What it
    /// leased then comes back when the lease expires, as after a crash.
    async fn claim_locked(&self, req: &ClaimRequest<'_>) -> StoreResult<Vec<Message>> {
        let (store, owned) = (self.clone(), OwnedClaim::from(req));
        detached(async move { store.claim_in_tx(&owned.request()).await }).await
    }

    async fn claim_in_tx(&self, req: &ClaimRequest<'_>) -> StoreResult<Vec<Message>> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        let mut tx = conn.begin().await.map_err(db)?;
        q(self.sql().lock.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let candidates = self.candidates(&mut tx, req).await?;
        let batch = pick(candidates, req);
        if !batch.is_empty() {
            let mut query = q(with_list(&self.sql().lease, batch.len()))
                .bind(req.relay.to_owned())
                .bind(ms(req.lease));
            for m in &batch {
                query = query.bind(m.seq);
            }
            query.execute(&mut *tx).await.map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(batch)
    }

    async fn fail_in_tx(&self, relay: &str, failures: &[Failure]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(db)?;

        for f in failures {
            let query = match f.retry_in {
                Some(d) => q(self.sql().fail_retry.as_str()).bind(ms(d)),
                None => q(self.sql().fail_dead.as_str()),
            };
            query
                .bind(f.stored_error())
                .bind(f.id.to_string())
                .bind(relay.to_owned())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn fetch_messages(&self, query: Query) -> StoreResult<Vec<Message>> {
        let rows = query.fetch_all(&self.pool).await.map_err(db)?;
        let mut out = rows
            .iter()
            .map(message_from_row)
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        out.sort_by_key(|m| m.seq);
        Ok(out)
    }
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn decode(e: impl std::error::Error + Send + Sync + 'static) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(e))
}

fn message_from_row(row: &MySqlRow) -> Result<Message, sqlx::Error> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let headers: String = row.try_get("headers")?;
    Ok(Message {
        id: Uuid::parse_str(&id).map_err(decode)?,
        seq: row.try_get("seq")?,
        topic: row.try_get("topic")?,
        message_type: row.try_get("type")?,
        key: row.try_get("msg_key")?,
        partition: row.try_get("msg_partition")?,
        payload: row.try_get::<Vec<u8>, _>("payload")?.into(),
        content_type: row.try_get("content_type")?,
        headers: parse_headers(&headers),
        created_at: time(row.try_get("created_at")?),
        available_at: time(row.try_get("available_at")?),
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
        status: status.parse::<Status>().map_err(decode)?,
    })
}

/// Claimed rows; one found `in_flight` had a lease that expired without an outcome.
fn candidates(rows: &[MySqlRow]) -> StoreResult<Vec<Candidate>> {
    rows.iter()
        .map(|r| {
            let message = message_from_row(r)?;
            let due: i64 = r.try_get("due")?;
            Ok(Candidate {
                interrupted: message.status == Status::InFlight,
                due: due != 0,
                message,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(db)
}

fn age(oldest_ms: Option<i64>) -> Option<f64> {
    oldest_ms.map(|d| d.max(0) as f64 / 1000.0)
}

fn counts(row: &MySqlRow) -> StoreResult<StatusCounts> {
    let get = |name: &str| row.try_get::<i64, _>(name).map_err(db);
    Ok(StatusCounts {
        pending: get("pending")?,
        in_flight: get("in_flight")?,
        delivered: get("delivered")?,
        dead: get("dead")?,
        oldest_pending_age_seconds: age(row.try_get("oldest_ms").map_err(db)?),
    })
}

#[async_trait]
impl Store for MySqlStore {
    async fn migrate(&self) -> StoreResult<()> {
        migrate_to(&self.pool, &self.config.table_prefix, LATEST_VERSION).await
    }

    async fn check_schema(&self) -> StoreResult<()> {
        let found = crate::migrate::schema_version(&self.pool, &self.config.table_prefix).await?;
        outbox_core::check_schema_version(found, LATEST_VERSION)
    }

    async fn claim_leased(&self, req: &ClaimRequest<'_>) -> StoreResult<Vec<Message>> {
        let mut batch = self.claim_locked(req).await?;
        let until = Utc::now() + chrono::Duration::milliseconds(ms(req.lease));
        for m in &mut batch {
            m.attempts += 1;
            m.status = Status::InFlight;
            m.available_at = until;
        }
        Ok(batch)
    }

    async fn ack(&self, ids: &[Uuid], retention: Retention) -> StoreResult<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let sql = match retention {
            Retention::Delete => &self.sql().ack_delete,
            Retention::Keep(_) => &self.sql().ack_keep,
        };
        self.execute(bind_ids(q(with_list(sql, ids.len())), ids))
            .await
    }

    async fn fail(&self, relay: &str, failures: &[Failure]) -> StoreResult<()> {
        // Several statements under row locks: finished even if the caller goes away (see
        // `claim_locked`).
        let (store, relay, failures) = (self.clone(), relay.to_owned(), failures.to_vec());
        detached(async move { store.fail_in_tx(&relay, &failures).await }).await
    }

    async fn release(&self, relay: &str, ids: &[Uuid]) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let query = bind_ids(q(with_list(&self.sql().release, ids.len())), ids);
        self.execute(query.bind(relay.to_owned())).await.map(drop)
    }

    async fn purge_delivered(&self, older_than: Duration, limit: usize) -> StoreResult<u64> {
        let query = q(self.sql().purge_delivered.as_str())
            .bind(ms(older_than))
            .bind(count(limit));
        self.execute(query).await
    }

    async fn status(&self) -> StoreResult<StatusCounts> {
        let row = q(self.sql().status.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        counts(&row)
    }

    async fn backlog(&self) -> StoreResult<Vec<TopicBacklog>> {
        let rows = q(self.sql().backlog.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| {
                let c = counts(row)?;
                Ok(TopicBacklog {
                    topic: row.try_get("topic").map_err(db)?,
                    pending: c.pending,
                    in_flight: c.in_flight,
                    delivered: c.delivered,
                    dead: c.dead,
                    oldest_pending_age_seconds: c.oldest_pending_age_seconds,
                })
            })
            .collect()
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(db)
    }

    async fn dead_list(&self, limit: usize) -> StoreResult<Vec<Message>> {
        let query = q(self.sql().dead_list.as_str()).bind(count(limit));
        self.fetch_messages(query).await
    }

    async fn dead_retry(&self, ids: Option<&[Uuid]>) -> StoreResult<u64> {
        let query = match ids {
            Some([]) => return Ok(0),
            Some(ids) => bind_ids(q(with_list(&self.sql().dead_retry_some, ids.len())), ids),
            None => q(self.sql().dead_retry_all.as_str()),
        };
        let n = self.execute(query).await?;
        if n > 0 {
            self.notify();
        }
        Ok(n)
    }

    async fn delivered_after_dead(&self, ids: Option<&[Uuid]>) -> StoreResult<Vec<(String, u64)>> {
        let ids = ids.map(id_json);
        let rows = q(self.sql().delivered_after_dead.as_str())
            .bind(ids.clone())
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| {
                let later: i64 = row.try_get("later").map_err(db)?;
                Ok((row.try_get("msg_key").map_err(db)?, later.max(0) as u64))
            })
            .collect()
    }

    async fn dead_purge(&self, older_than: Option<Duration>) -> StoreResult<u64> {
        let older = older_than.map(ms);
        let query = q(self.sql().dead_purge.as_str()).bind(older).bind(older);
        self.execute(query).await
    }

    async fn dead_page(
        &self,
        filter: &DeadFilter,
        after: Option<Uuid>,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        let after = after.map(|id| id.to_string());
        let rows = bind_dead_filter(q(self.sql().dead_page.as_str()), filter)
            .bind(after.clone())
            .bind(after)
            .bind(count(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(message_from_row)
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)
    }

    async fn get_message(&self, id: Uuid) -> StoreResult<Option<Message>> {
        let row = q(self.sql().get_message.as_str())
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.as_ref().map(message_from_row).transpose().map_err(db)
    }

    async fn dead_retry_where(&self, filter: &DeadFilter) -> StoreResult<u64> {
        let query = bind_dead_filter(q(self.sql().dead_retry_where.as_str()), filter);
        let n = self.execute(query).await?;
        if n > 0 {
            self.notify();
        }
        Ok(n)
    }

    async fn dead_purge_where(&self, filter: &DeadFilter) -> StoreResult<u64> {
        self.execute(bind_dead_filter(
            q(self.sql().dead_purge_where.as_str()),
            filter,
        ))
        .await
    }

    async fn heartbeat(&self, relay: &str, state: &str) -> StoreResult<()> {
        let query = q(self.sql().heartbeat.as_str())
            .bind(relay.to_owned())
            .bind(state.to_owned());
        self.execute(query).await.map(drop)
    }

    async fn relays(&self, within: Duration) -> StoreResult<Vec<RelaySeen>> {
        let rows = q(self.sql().relays.as_str())
            .bind(ms(within))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| {
                let seen: i64 = row.try_get("last_seen")?;
                let now: i64 = row.try_get("now")?;
                Ok(RelaySeen {
                    id: row.try_get("relay_id")?,
                    state: row.try_get("state")?,
                    last_seen: time(seen),
                    age_seconds: (now - seen).max(0) as f64 / 1000.0,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(db)
    }

    async fn pause_topic(&self, topic: &str) -> StoreResult<bool> {
        let query = q(self.sql().pause.as_str()).bind(topic.to_owned());
        Ok(self.execute(query).await? > 0)
    }

    async fn resume_topic(&self, topic: &str) -> StoreResult<bool> {
        let query = q(self.sql().resume.as_str()).bind(topic.to_owned());
        let resumed = self.execute(query).await? > 0;
        if resumed {
            self.notify();
        }
        Ok(resumed)
    }

    async fn paused_topics(&self) -> StoreResult<Vec<String>> {
        let rows = q(self.sql().paused.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| row.try_get("topic"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)
    }

    async fn waiter(&self, _relay: &str) -> StoreResult<Box<dyn Waiter>> {
        Ok(Box::new(PollingWaiter::new(self.notify.clone())))
    }
}

/// Runs `work` to its end in a task of its own: dropping the returned future no longer stops
/// it in the middle of a transaction.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = StoreResult<T>> + Send + 'static,
) -> StoreResult<T> {
    tokio::spawn(work)
        .await
        .map_err(|e| StoreError::database(std::io::Error::other(e.to_string())))?
}

/// A [`ClaimRequest`] that owns what it refers to, for a claim that outlives its caller.
struct OwnedClaim {
    relay: String,
    limit: usize,
    lease: Duration,
    ahead: bool,
    partitions: Option<Vec<bool>>,
    busy_keys: Option<HashSet<String>>,
    max_bytes: usize,
}

impl From<&ClaimRequest<'_>> for OwnedClaim {
    fn from(r: &ClaimRequest<'_>) -> Self {
        Self {
            relay: r.relay.to_owned(),
            limit: r.limit,
            lease: r.lease,
            ahead: r.ahead,
            partitions: r.partitions.map(<[bool]>::to_vec),
            busy_keys: r.busy_keys.cloned(),
            max_bytes: r.max_bytes,
        }
    }
}

impl OwnedClaim {
    fn request(&self) -> ClaimRequest<'_> {
        let mut req = ClaimRequest::new(&self.relay, self.limit, self.lease);
        req.ahead = self.ahead;
        req.partitions = self.partitions.as_deref();
        req.busy_keys = self.busy_keys.as_ref();
        req.max_bytes = self.max_bytes;
        req
    }
}

#[cfg(test)]
mod tests {
    use super::marks;

    #[test]
    fn an_in_list_has_one_mark_per_value_and_is_never_empty() {
        assert_eq!(marks(3), "?, ?, ?");
        assert_eq!(marks(1), "?");
        assert_eq!(marks(0), "NULL");
    }
}
