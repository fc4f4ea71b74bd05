//! [`SqliteStore`] (the relay's side) and [`SqliteOutbox`] (the writer's side).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use outbox_core::{
    Candidate, ClaimRequest, DEFAULT_MAX_MESSAGE_BYTES, DeadFilter, Failure, Head, Message,
    NewMessage, PollingWaiter, RelaySeen, Retention, Status, StatusCounts, Store, StoreError,
    StoreResult, TopicBacklog, Waiter, keep_within_budget, parse_headers, pick,
};
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, Sqlite, SqlitePool, Transaction};
use tokio::sync::Notify;
use tracing::Instrument;
use uuid::Uuid;

use crate::migrate::{LATEST_VERSION, migrate_to};

/// Where the outbox lives in the database file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SqliteConfig {
    /// Prefix of every table and index name.
    pub table_prefix: String,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        Self {
            table_prefix: "outbox_".into(),
        }
    }
}

impl SqliteConfig {
    /// Sets [`SqliteConfig::table_prefix`].
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

type Query = sqlx::query::Query<'static, Sqlite, SqliteArguments>;

fn q(sql: &Arc<str>) -> Query {
    sqlx::query(AssertSqlSafe(sql.clone()))
}

fn db(e: sqlx::Error) -> StoreError {
    StoreError::database(e)
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A list of ids as one JSON-array parameter, read back with `json_each`.
/// A `(key, count)` row of `delivered_after_dead`.
fn key_count(row: &sqlx::sqlite::SqliteRow) -> StoreResult<(String, u64)> {
    let later: i64 = row.try_get("later").map_err(db)?;
    Ok((row.try_get("key").map_err(db)?, later.max(0) as u64))
}

fn id_list(ids: &[Uuid]) -> String {
    serde_json::to_string(&ids.iter().map(Uuid::to_string).collect::<Vec<_>>())
        .unwrap_or_else(|_| "[]".into())
}

const COLUMNS: &str = "id, seq, topic, type, key, partition, payload, content_type, headers, \
     created_at, available_at, attempts, last_error, status";

/// Columns bound per enqueued row; SQLite allows 32766 parameters per statement.
const INSERT_COLUMNS: usize = 10;
const ROWS_PER_INSERT: usize = 32_766 / INSERT_COLUMNS;

#[derive(Debug)]
struct Sql {
    insert_head: String,
    heads: Arc<str>,
    heads_widened: Arc<str>,
    rows: Arc<str>,
    run: String,
    lease: Arc<str>,
    ack_delete: Arc<str>,
    ack_keep: Arc<str>,
    fail_retry: Arc<str>,
    fail_dead: Arc<str>,
    release: Arc<str>,
    purge_delivered: Arc<str>,
    status: Arc<str>,
    backlog: Arc<str>,
    dead_list: Arc<str>,
    dead_retry_some: Arc<str>,
    dead_retry_all: Arc<str>,
    delivered_after_dead: Arc<str>,
    dead_purge: Arc<str>,
    dead_page: Arc<str>,
    get_message: Arc<str>,
    dead_retry_where: Arc<str>,
    dead_purge_where: Arc<str>,
    heartbeat: Arc<str>,
    relays: Arc<str>,
    pause: Arc<str>,
    resume: Arc<str>,
    paused: Arc<str>,
}

impl Sql {
    fn new(p: &str) -> Self {
        let r = |t: &str| -> Arc<str> { t.replace("{p}", p).replace("{columns}", COLUMNS).into() };
        Self {
            insert_head: format!(
                "INSERT INTO {p}messages (id, topic, type, key, partition, payload, content_type, \
                 headers, created_at, available_at) VALUES "
            ),
            heads: r(HEADS),
            heads_widened: r(HEADS_WIDENED),
            rows: r("SELECT {columns}, available_at <= ?2 AS due \
                 FROM {p}messages WHERE seq IN (SELECT value FROM json_each(?1))"),
            run: RUN.replace("{p}", p).replace("{columns}", COLUMNS),
            lease: r("UPDATE {p}messages \
                 SET status = 'in_flight', locked_by = ?2, attempts = attempts + 1, available_at = ?3 \
                 WHERE seq IN (SELECT value FROM json_each(?1))"),
            ack_delete: r("DELETE FROM {p}messages \
                 WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'in_flight'"),
            ack_keep: r(
                "UPDATE {p}messages SET status = 'delivered', delivered_at = ?2, locked_by = NULL \
                 WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'in_flight'",
            ),
            fail_retry: r("UPDATE {p}messages \
                 SET status = 'pending', available_at = ?2, last_error = ?3, locked_by = NULL \
                 WHERE id = ?1 AND locked_by = ?4 AND status = 'in_flight'"),
            fail_dead: r("UPDATE {p}messages \
                 SET status = 'dead', dead_at = ?2, last_error = ?3, locked_by = NULL \
                 WHERE id = ?1 AND locked_by = ?4 AND status = 'in_flight'"),
            release: r(
                "UPDATE {p}messages SET status = 'pending', available_at = ?3, \
                 attempts = max(attempts - 1, 0), locked_by = NULL \
                 WHERE id IN (SELECT value FROM json_each(?1)) AND locked_by = ?2 AND status = 'in_flight'",
            ),
            purge_delivered: r("DELETE FROM {p}messages WHERE seq IN (\
                 SELECT seq FROM {p}messages WHERE status = 'delivered' AND delivered_at <= ?1 \
                 ORDER BY delivered_at LIMIT ?2)"),
            status: r("SELECT \
                 coalesce(sum(status = 'pending'), 0) AS pending, \
                 coalesce(sum(status = 'in_flight'), 0) AS in_flight, \
                 coalesce(sum(status = 'delivered'), 0) AS delivered, \
                 coalesce(sum(status = 'dead'), 0) AS dead, \
                 min(CASE WHEN status = 'pending' THEN created_at END) AS oldest \
                 FROM {p}messages"),
            backlog: r("SELECT topic, \
                 coalesce(sum(status = 'pending'), 0) AS pending, \
                 coalesce(sum(status = 'in_flight'), 0) AS in_flight, \
                 coalesce(sum(status = 'delivered'), 0) AS delivered, \
                 coalesce(sum(status = 'dead'), 0) AS dead, \
                 min(CASE WHEN status = 'pending' THEN created_at END) AS oldest \
                 FROM {p}messages GROUP BY topic ORDER BY topic"),
            dead_list: r(
                "SELECT {columns} FROM {p}messages WHERE status = 'dead' ORDER BY seq LIMIT ?1",
            ),
            dead_retry_some: r(
                "UPDATE {p}messages SET status = 'pending', attempts = 0, available_at = ?2, \
                 dead_at = NULL, locked_by = NULL \
                 WHERE status = 'dead' AND id IN (SELECT value FROM json_each(?1))",
            ),
            dead_retry_all: r(
                "UPDATE {p}messages SET status = 'pending', attempts = 0, available_at = ?1, \
                 dead_at = NULL, locked_by = NULL WHERE status = 'dead'",
            ),
            delivered_after_dead: r("SELECT d.key, count(l.id) AS later FROM (\
 SELECT key, min(seq) AS seq FROM {p}messages WHERE status = 'dead' AND key IS NOT NULL AND (?1 IS NULL OR id IN (SELECT value FROM json_each(?1))) \
 GROUP BY key) d \
 LEFT JOIN {p}messages l ON l.key = d.key AND l.seq > d.seq AND l.status = 'delivered' \
 GROUP BY d.key ORDER BY d.key"),
            dead_purge: r("DELETE FROM {p}messages WHERE status = 'dead' AND dead_at <= ?1"),
            dead_page: r(&format!(
                "SELECT {{columns}} FROM {{p}}messages WHERE {DEAD_FILTER} \
                 AND (?7 IS NULL OR id > ?7) ORDER BY id LIMIT ?8"
            )),
            get_message: r("SELECT {columns} FROM {p}messages WHERE id = ?1"),
            dead_retry_where: r(&format!(
                "UPDATE {{p}}messages SET status = 'pending', attempts = 0, available_at = ?7, \
                 dead_at = NULL, locked_by = NULL WHERE {DEAD_FILTER}"
            )),
            dead_purge_where: r(&format!("DELETE FROM {{p}}messages WHERE {DEAD_FILTER}")),
            heartbeat: r(
                "INSERT INTO {p}relay_heartbeats (relay_id, state, last_seen, started_at) \
                 VALUES (?1, ?2, ?3, ?3) \
                 ON CONFLICT (relay_id) DO UPDATE SET state = excluded.state, last_seen = excluded.last_seen \
                 WHERE {p}relay_heartbeats.state <> 'stopped'",
            ),
            relays: r(
                "SELECT relay_id, state, last_seen FROM {p}relay_heartbeats \
                 WHERE last_seen >= ?1 ORDER BY relay_id",
            ),
            pause: r(
                "INSERT INTO {p}paused_topics (topic, paused_at) VALUES (?1, ?2) \
                 ON CONFLICT DO NOTHING",
            ),
            resume: r("DELETE FROM {p}paused_topics WHERE topic = ?1"),
            paused: r("SELECT topic FROM {p}paused_topics ORDER BY topic"),
        }
    }
}

/// The dead letters an operator command selects (see `outbox_core::DeadFilter`); `?5` is a
/// lower-case `LIKE` pattern escaped with `\`.
const DEAD_FILTER: &str = "status = 'dead' \
    AND (?1 IS NULL OR id IN (SELECT value FROM json_each(?1))) \
    AND (?2 IS NULL OR topic = ?2) \
    AND (?3 IS NULL OR type = ?3) \
    AND (?4 IS NULL OR key = ?4) \
    AND (?5 IS NULL OR lower(last_error) LIKE ?5 ESCAPE '\\') \
    AND (?6 IS NULL OR dead_at <= ?6)";

/// Binds a dead-letter filter as `?1`–`?6` of the statements built on [`DEAD_FILTER`].
fn bind_dead_filter(query: Query, f: &DeadFilter) -> Query {
    query
        .bind(f.ids.as_deref().map(id_list))
        .bind(f.topic.clone())
        .bind(f.message_type.clone())
        .bind(f.key.clone())
        .bind(f.error_pattern())
        .bind(f.older_than.map(|d| now_ms().saturating_sub(ms(d))))
}

/// The heads in a window of the ready index (see `outbox_core::claim`): unkeyed rows, and each
/// key's oldest row in the window when no older message of the key is undelivered.
///
/// A paused topic's unkeyed rows stay out of the window; its keyed rows stay in, so that their
/// key sits out (a later message of the key must not overtake a paused one), but never head.
const HEADS: &str = "WITH w AS (\
      SELECT seq, key, topic, available_at, length(payload) AS size FROM {p}messages \
      WHERE status IN ('pending', 'in_flight') AND available_at <= ?1 \
        AND (key IS NOT NULL OR topic NOT IN (SELECT topic FROM {p}paused_topics)) \
      ORDER BY available_at, seq LIMIT ?2), \
    firsts AS (SELECT min(seq) AS seq FROM w WHERE key IS NOT NULL GROUP BY key) \
    SELECT w.seq, w.key, w.size FROM w WHERE (w.key IS NULL OR (w.seq IN (SELECT seq FROM firsts) \
      AND NOT EXISTS (SELECT 1 FROM {p}messages e \
        WHERE e.key = w.key AND e.seq < w.seq AND e.status IN ('pending', 'in_flight')))) \
      AND w.topic NOT IN (SELECT topic FROM {p}paused_topics) \
    ORDER BY w.available_at, w.seq LIMIT ?3";

/// The heads anywhere in the backlog, for when the window held none.
const HEADS_WIDENED: &str = "SELECT c.seq, c.key, length(c.payload) AS size FROM {p}messages c \
    WHERE c.status IN ('pending', 'in_flight') AND c.available_at <= ?1 \
      AND c.topic NOT IN (SELECT topic FROM {p}paused_topics) \
      AND (c.key IS NULL OR NOT EXISTS (SELECT 1 FROM {p}messages e \
        WHERE e.key = c.key AND e.seq < c.seq AND e.status IN ('pending', 'in_flight'))) \
    ORDER BY c.available_at, c.seq LIMIT ?3";

/// One key's messages after its head; `?n` placeholders are filled per head. A message of a
/// paused topic is not due, so the run stops before it.
const RUN: &str = "SELECT * FROM (SELECT {columns}, \
    (available_at <= ?1 AND topic NOT IN (SELECT topic FROM {p}paused_topics)) AS due FROM {p}messages \
    WHERE key = ?K AND seq > ?S AND status IN ('pending', 'in_flight') ORDER BY seq LIMIT ?N OFFSET ?2)";

/// Runs are fetched for at most this many keyed heads: past that, a batch is full of heads.
const MAX_RUNS: usize = 256;

/// The writer's handle: enqueues messages inside the caller's transaction.
#[derive(Debug, Clone)]
pub struct SqliteOutbox {
    sql: Arc<Sql>,
    max_message_bytes: usize,
}

impl SqliteOutbox {
    /// Sets the largest message this handle enqueues (see the store's
    /// `with_max_message_size`).
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Adds one message to the outbox as part of `tx`.
    pub async fn enqueue(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        msg: &NewMessage,
    ) -> Result<(), EnqueueError> {
        self.enqueue_batch(tx, std::slice::from_ref(msg)).await
    }

    /// Adds many messages as part of `tx` in one multi-row statement (more only past SQLite's
    /// parameter limit); `seq` follows the slice's order.
    pub async fn enqueue_batch(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        msgs: &[NewMessage],
    ) -> Result<(), EnqueueError> {
        let span = outbox_core::trace::create_span(msgs);
        self.insert_batch(tx, msgs).instrument(span).await
    }

    async fn insert_batch(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        msgs: &[NewMessage],
    ) -> Result<(), EnqueueError> {
        outbox_core::check_batch(msgs, self.max_message_bytes)?;
        let now = Utc::now();
        for chunk in msgs.chunks(ROWS_PER_INSERT) {
            let mut sql = self.sql.insert_head.clone();
            for i in 0..chunk.len() {
                sql.push_str(if i == 0 { "(" } else { ", (" });
                let base = i * INSERT_COLUMNS;
                let marks: Vec<String> = (1..=INSERT_COLUMNS)
                    .map(|c| format!("?{}", base + c))
                    .collect();
                sql.push_str(&marks.join(", "));
                sql.push(')');
            }
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for m in chunk {
                query = query
                    .bind(m.id().to_string())
                    .bind(m.topic().to_owned())
                    .bind(m.message_type().to_owned())
                    .bind(m.key_ref().map(str::to_owned))
                    .bind(m.partition())
                    .bind(m.payload().to_vec())
                    .bind(m.content_type().to_owned())
                    .bind(m.headers_json())
                    .bind(now.timestamp_millis())
                    .bind(m.available_at_from(now).timestamp_millis());
            }
            query.execute(&mut **tx).await?;
        }
        Ok(())
    }
}

/// The outbox in a SQLite database file, for relays and operators.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    config: Arc<SqliteConfig>,
    outbox: SqliteOutbox,
    inbox: crate::SqliteInbox,
    notify: Arc<Notify>,
}

impl SqliteStore {
    /// A store with the default table prefix on an existing pool.
    pub fn new(pool: SqlitePool) -> Self {
        Self::with_config(pool, SqliteConfig::default()).expect("default names are valid")
    }

    /// A store with the tables named by `config` on an existing pool. Fails with
    /// [`StoreError::Config`] when the table prefix is not a plain lower-case identifier.
    pub fn with_config(pool: SqlitePool, config: SqliteConfig) -> StoreResult<Self> {
        config.validate()?;
        let sql = Arc::new(Sql::new(&config.table_prefix));
        Ok(Self {
            pool,
            inbox: crate::SqliteInbox::new(&config.table_prefix),
            config: Arc::new(config),
            outbox: SqliteOutbox {
                sql,
                max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            },
            notify: Arc::new(Notify::new()),
        })
    }

    /// Opens (creating when missing) the database file of `url` (`sqlite://PATH`).
    pub async fn connect(url: &str) -> StoreResult<Self> {
        Self::connect_with(url, SqliteConfig::default()).await
    }

    /// [`SqliteStore::connect`] with the outbox's tables named by `config`.
    pub async fn connect_with(url: &str, config: SqliteConfig) -> StoreResult<Self> {
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(Self::connect_options(url)?)
            .await
            .map_err(db)?;
        Self::with_config(pool, config)
    }

    /// How the store opens `url` (`sqlite://PATH`), for a pool of one's own: the file created
    /// when missing, write-ahead logging so that readers never block the writer, and a busy
    /// timeout so that concurrent writers wait for each other instead of failing.
    pub fn connect_options(url: &str) -> StoreResult<SqliteConnectOptions> {
        Ok(SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("invalid SQLite URL {url:?}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5)))
    }

    /// The pool the store runs on, for the caller's own transactions (`enqueue` takes one).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The table prefix the store uses.
    pub fn config(&self) -> &SqliteConfig {
        &self.config
    }

    /// Sets the largest message enqueue accepts, payload and headers counted (default
    /// [`DEFAULT_MAX_MESSAGE_BYTES`], 1 MiB). A bigger message is refused with an error naming
    /// the limit; relays and brokers then never meet a message too big for them.
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.outbox = self.outbox.with_max_message_size(bytes);
        self
    }

    /// The writer's handle, cheap to clone.
    pub fn outbox(&self) -> &SqliteOutbox {
        &self.outbox
    }

    /// The consumer's handle: exactly-once effects from at-least-once deliveries.
    pub fn inbox(&self) -> &crate::SqliteInbox {
        &self.inbox
    }

    /// Wakes a relay of this process that sleeps on this store; call it after commit.
    pub fn notify(&self) {
        self.notify.notify_one();
    }

    /// The wake-up handle that this store's waiters sleep on, for writers that keep it apart
    /// from the store: `notify_one()` after commit wakes one idle relay, `notify_waiters()`
    /// all of them. Another process's relay is not woken and finds the rows at its next poll.
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

    /// The heads of a claim and, for keyed ones, the runs that follow them.
    async fn candidates(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        req: &ClaimRequest<'_>,
        now: i64,
    ) -> StoreResult<Vec<Candidate>> {
        let limit = i64::try_from(req.limit).unwrap_or(i64::MAX);
        let scan = i64::try_from(req.scan_window()).unwrap_or(i64::MAX);
        let mut heads: Vec<Head> = Vec::new();
        for sql in [&self.sql().heads, &self.sql().heads_widened] {
            let rows = q(sql)
                .bind(now)
                .bind(scan)
                .bind(limit)
                .fetch_all(&mut **tx)
                .await
                .map_err(db)?;
            heads = rows
                .iter()
                .map(|r| Ok((r.try_get("seq")?, r.try_get("key")?, r.try_get("size")?)))
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
        let seqs = serde_json::to_string(&heads.iter().map(|h| h.0).collect::<Vec<_>>())
            .unwrap_or_else(|_| "[]".into());
        let rows = q(&self.sql().rows)
            .bind(seqs)
            .bind(now)
            .fetch_all(&mut **tx)
            .await
            .map_err(db)?;
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
            let first = self.runs(tx, &keyed, per_key, 0, now).await?;
            let missing = room.saturating_sub(first.len());
            out.extend(first);
            if missing > 0 {
                out.extend(self.runs(tx, &keyed, missing, per_key, now).await?);
            }
        }
        Ok(out)
    }

    /// Up to `per_key` messages of each head's key after its first `skip` followers, in one
    /// compound statement.
    async fn runs(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        heads: &[(i64, String)],
        per_key: usize,
        skip: usize,
        now: i64,
    ) -> StoreResult<Vec<Candidate>> {
        let parts: Vec<String> = (0..heads.len())
            .map(|i| {
                let n = 3 + i * 3;
                self.sql()
                    .run
                    .replace("?K", &format!("?{n}"))
                    .replace("?S", &format!("?{}", n + 1))
                    .replace("?N", &format!("?{}", n + 2))
            })
            .collect();
        let mut query = sqlx::query(AssertSqlSafe(parts.join(" UNION ALL ")))
            .bind(now)
            .bind(i64::try_from(skip).unwrap_or(i64::MAX));
        for (seq, key) in heads {
            query = query
                .bind(key.clone())
                .bind(*seq)
                .bind(i64::try_from(per_key).unwrap_or(i64::MAX));
        }
        let rows = query.fetch_all(&mut **tx).await.map_err(db)?;
        candidates(&rows)
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

fn message_from_row(row: &SqliteRow) -> Result<Message, sqlx::Error> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    Ok(Message {
        id: Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        seq: row.try_get("seq")?,
        topic: row.try_get("topic")?,
        message_type: row.try_get("type")?,
        key: row.try_get("key")?,
        partition: row.try_get("partition")?,
        payload: row.try_get::<Vec<u8>, _>("payload")?.into(),
        content_type: row.try_get("content_type")?,
        headers: parse_headers(row.try_get("headers")?),
        created_at: time(row.try_get("created_at")?),
        available_at: time(row.try_get("available_at")?),
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
        status: status
            .parse::<Status>()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
    })
}

/// Claimed rows; one found `in_flight` had a lease that expired without an outcome.
fn candidates(rows: &[SqliteRow]) -> StoreResult<Vec<Candidate>> {
    rows.iter()
        .map(|r| {
            let message = message_from_row(r)?;
            Ok(Candidate {
                interrupted: message.status == Status::InFlight,
                due: r.try_get("due")?,
                message,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(db)
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> StoreResult<()> {
        migrate_to(&self.pool, &self.config.table_prefix, LATEST_VERSION).await
    }

    async fn check_schema(&self) -> StoreResult<()> {
        let found = crate::migrate::schema_version(&self.pool, &self.config.table_prefix).await?;
        outbox_core::check_schema_version(found, LATEST_VERSION)
    }

    async fn claim_leased(&self, req: &ClaimRequest<'_>) -> StoreResult<Vec<Message>> {
        let now = now_ms();
        // The write lock up front: the claim reads, then writes its lease, with no writer between.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
        let candidates = self.candidates(&mut tx, req, now).await?;
        let mut batch = pick(candidates, req);
        if !batch.is_empty() {
            let seqs = serde_json::to_string(&batch.iter().map(|m| m.seq).collect::<Vec<_>>())
                .unwrap_or_else(|_| "[]".into());
            q(&self.sql().lease)
                .bind(seqs)
                .bind(req.relay.to_owned())
                .bind(now.saturating_add(ms(req.lease)))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        let until = time(now.saturating_add(ms(req.lease)));
        for m in &mut batch {
            m.attempts += 1;
            m.status = Status::InFlight;
            m.available_at = until;
        }
        Ok(batch)
    }

    async fn ack(&self, ids: &[Uuid], retention: Retention) -> StoreResult<u64> {
        let query = match retention {
            Retention::Delete => q(&self.sql().ack_delete).bind(id_list(ids)),
            Retention::Keep(_) => q(&self.sql().ack_keep).bind(id_list(ids)).bind(now_ms()),
        };
        self.execute(query).await
    }

    async fn fail(&self, relay: &str, failures: &[Failure]) -> StoreResult<()> {
        let now = now_ms();
        // Take the write lock up front so the batch never has to upgrade a read lock.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
        for f in failures {
            let query = match f.retry_in {
                Some(d) => q(&self.sql().fail_retry)
                    .bind(f.id.to_string())
                    .bind(now.saturating_add(ms(d))),
                None => q(&self.sql().fail_dead).bind(f.id.to_string()).bind(now),
            };
            query
                .bind(f.stored_error())
                .bind(relay.to_owned())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn release(&self, relay: &str, ids: &[Uuid]) -> StoreResult<()> {
        let query = q(&self.sql().release)
            .bind(id_list(ids))
            .bind(relay.to_owned())
            .bind(now_ms());
        self.execute(query).await.map(drop)
    }

    async fn purge_delivered(&self, older_than: Duration, limit: usize) -> StoreResult<u64> {
        let query = q(&self.sql().purge_delivered)
            .bind(now_ms().saturating_sub(ms(older_than)))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        self.execute(query).await
    }

    async fn status(&self) -> StoreResult<StatusCounts> {
        let row = q(&self.sql().status)
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        let get = |name: &str| row.try_get::<i64, _>(name).map_err(db);
        let oldest: Option<i64> = row.try_get("oldest").map_err(db)?;
        Ok(StatusCounts {
            pending: get("pending")?,
            in_flight: get("in_flight")?,
            delivered: get("delivered")?,
            dead: get("dead")?,
            oldest_pending_age_seconds: oldest.map(|t| (now_ms() - t).max(0) as f64 / 1000.0),
        })
    }

    async fn backlog(&self) -> StoreResult<Vec<TopicBacklog>> {
        let rows = q(&self.sql().backlog)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        let now = now_ms();
        rows.iter()
            .map(|row| {
                let get = |name: &str| row.try_get::<i64, _>(name).map_err(db);
                let oldest: Option<i64> = row.try_get("oldest").map_err(db)?;
                Ok(TopicBacklog {
                    topic: row.try_get("topic").map_err(db)?,
                    pending: get("pending")?,
                    in_flight: get("in_flight")?,
                    delivered: get("delivered")?,
                    dead: get("dead")?,
                    oldest_pending_age_seconds: oldest.map(|t| (now - t).max(0) as f64 / 1000.0),
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
        let query = q(&self.sql().dead_list).bind(i64::try_from(limit).unwrap_or(i64::MAX));
        self.fetch_messages(query).await
    }

    async fn dead_retry(&self, ids: Option<&[Uuid]>) -> StoreResult<u64> {
        let query = match ids {
            Some(ids) => q(&self.sql().dead_retry_some)
                .bind(id_list(ids))
                .bind(now_ms()),
            None => q(&self.sql().dead_retry_all).bind(now_ms()),
        };
        let n = self.execute(query).await?;
        if n > 0 {
            self.notify();
        }
        Ok(n)
    }

    async fn delivered_after_dead(&self, ids: Option<&[Uuid]>) -> StoreResult<Vec<(String, u64)>> {
        let rows = q(&self.sql().delivered_after_dead)
            .bind(ids.map(id_list))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter().map(key_count).collect()
    }

    async fn dead_purge(&self, older_than: Option<Duration>) -> StoreResult<u64> {
        let cutoff = older_than.map_or(i64::MAX, |d| now_ms().saturating_sub(ms(d)));
        self.execute(q(&self.sql().dead_purge).bind(cutoff)).await
    }

    async fn dead_page(
        &self,
        filter: &DeadFilter,
        after: Option<Uuid>,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        let rows = bind_dead_filter(q(&self.sql().dead_page), filter)
            .bind(after.map(|id| id.to_string()))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(message_from_row)
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)
    }

    async fn get_message(&self, id: Uuid) -> StoreResult<Option<Message>> {
        let row = q(&self.sql().get_message)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.as_ref().map(message_from_row).transpose().map_err(db)
    }

    async fn dead_retry_where(&self, filter: &DeadFilter) -> StoreResult<u64> {
        let query = bind_dead_filter(q(&self.sql().dead_retry_where), filter).bind(now_ms());
        let n = self.execute(query).await?;
        if n > 0 {
            self.notify();
        }
        Ok(n)
    }

    async fn dead_purge_where(&self, filter: &DeadFilter) -> StoreResult<u64> {
        self.execute(bind_dead_filter(q(&self.sql().dead_purge_where), filter))
            .await
    }

    async fn heartbeat(&self, relay: &str, state: &str) -> StoreResult<()> {
        let query = q(&self.sql().heartbeat)
            .bind(relay.to_owned())
            .bind(state.to_owned())
            .bind(now_ms());
        self.execute(query).await.map(drop)
    }

    async fn relays(&self, within: Duration) -> StoreResult<Vec<RelaySeen>> {
        let now = now_ms();
        let rows = q(&self.sql().relays)
            .bind(now.saturating_sub(ms(within)))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| {
                let seen: i64 = row.try_get("last_seen")?;
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
        let query = q(&self.sql().pause).bind(topic.to_owned()).bind(now_ms());
        Ok(self.execute(query).await? > 0)
    }

    async fn resume_topic(&self, topic: &str) -> StoreResult<bool> {
        let resumed = self
            .execute(q(&self.sql().resume).bind(topic.to_owned()))
            .await?
            > 0;
        if resumed {
            self.notify();
        }
        Ok(resumed)
    }

    async fn paused_topics(&self) -> StoreResult<Vec<String>> {
        let rows = q(&self.sql().paused)
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
