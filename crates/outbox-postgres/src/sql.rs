//! Every statement the store runs, built once from the configured names.

use std::sync::Arc;

use outbox_core::StoreError;

/// Where the outbox lives: a schema and a table prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgConfig {
    /// Schema holding the outbox tables (created by `migrate` when missing).
    pub schema: String,
    /// Prefix of every table, index, function and channel name.
    pub table_prefix: String,
}

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            schema: "public".into(),
            table_prefix: "outbox_".into(),
        }
    }
}

impl PgConfig {
    /// Sets [`PgConfig::schema`].
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Sets [`PgConfig::table_prefix`].
    pub fn table_prefix(mut self, table_prefix: impl Into<String>) -> Self {
        self.table_prefix = table_prefix.into();
        self
    }

    /// Names are spliced into SQL, so only plain lower-case identifiers are accepted.
    pub fn validate(&self) -> Result<(), StoreError> {
        outbox_core::check_identifier("schema", &self.schema)?;
        outbox_core::check_identifier("table prefix", &self.table_prefix)
    }

    /// The LISTEN/NOTIFY channel of this outbox. PostgreSQL refuses channel names over 63
    /// bytes, so a long schema and prefix are cut and a hash of the whole name keeps them apart.
    pub fn channel(&self) -> String {
        const MAX: usize = 63;
        let full = format!("{}_{}wake", self.schema, self.table_prefix);
        if full.len() <= MAX {
            return full;
        }
        // Identifiers are ASCII (see `validate`), so any byte index is a character boundary.
        let hash = format!("_{:08x}wake", crc32fast::hash(full.as_bytes()));
        format!("{}{hash}", &full[..MAX - hash.len()])
    }

    /// Substitutes the names into a template (migrations use `{schema}`, `{p}`, `{channel}`).
    pub(crate) fn render(&self, template: &str) -> String {
        template
            .replace("{schema}", &self.schema)
            .replace("{p}", &self.table_prefix)
            .replace("{channel}", &self.channel())
    }
}

const COLUMNS: &str = "m.id, m.seq, m.topic, m.type, m.key, m.partition, m.payload, m.content_type, \
     m.headers::text AS headers, m.created_at, m.available_at, m.attempts, m.last_error, m.status";

/// Prepared SQL text; `Arc<str>` so that handing it to sqlx costs no copy.
#[derive(Debug)]
pub(crate) struct Sql {
    pub insert: Arc<str>,
    pub insert_batch: Arc<str>,
    pub insert_captured: Arc<str>,
    pub insert_batch_captured: Arc<str>,
    pub claim_runs: Arc<str>,
    pub lease: Arc<str>,
    pub delivery_start: Arc<str>,
    pub delivery_end: Arc<str>,
    pub recover: Arc<str>,
    pub fenced: Arc<str>,
    pub ack_delete: Arc<str>,
    pub ack_keep: Arc<str>,
    pub settle_delete: Arc<str>,
    pub settle_keep: Arc<str>,
    pub fail: Arc<str>,
    pub release: Arc<str>,
    pub purge_delivered: Arc<str>,
    pub status: Arc<str>,
    pub backlog: Arc<str>,
    pub dead_list: Arc<str>,
    pub dead_retry: Arc<str>,
    pub delivered_after_dead: Arc<str>,
    pub dead_purge: Arc<str>,
    pub park: Arc<str>,
    pub unpark: Arc<str>,
    pub notify: Arc<str>,
    pub dead_page: Arc<str>,
    pub get_message: Arc<str>,
    pub dead_retry_where: Arc<str>,
    pub dead_purge_where: Arc<str>,
    pub heartbeat: Arc<str>,
    pub relays: Arc<str>,
    pub pause: Arc<str>,
    pub resume: Arc<str>,
    pub paused: Arc<str>,
}

impl Sql {
    pub fn new(cfg: &PgConfig) -> Self {
        let r = |t: &str| -> Arc<str> { cfg.render(t).into() };
        Self {
            insert: r(&insert("pending")),
            insert_batch: r(&insert_batch("pending")),
            insert_captured: r(&insert("captured")),
            insert_batch_captured: r(&insert_batch("captured")),
            claim_runs: r(&CLAIM_RUNS.replace("{columns}", COLUMNS)),
            lease: r(LEASE),
            // Dated by the claim's transaction, not by this insert: a batch claimed before a
            // restart whose record is written after it is an orphan of the restart too.
            delivery_start: r(
                "INSERT INTO {schema}.{p}deliveries (lock_key, relay, ids, started_at, busy_until) \
                 VALUES ($1, $2, $3, $5, $5 + make_interval(secs => $4::float8)) \
                 ON CONFLICT (lock_key) DO NOTHING",
            ),
            fenced: r("SELECT key, id FROM {schema}.{p}fenced()"),
            delivery_end: r("DELETE FROM {schema}.{p}deliveries WHERE lock_key = $1"),
            recover: r("SELECT {schema}.{p}recover($1, $2)"),
            ack_delete: r(
                "DELETE FROM {schema}.{p}messages WHERE id = ANY($1) AND status = 'in_flight'",
            ),
            ack_keep: r(
                "UPDATE {schema}.{p}messages SET status = 'delivered', delivered_at = now(), locked_by = NULL \
                 WHERE id = ANY($1) AND status = 'in_flight'",
            ),
            // A held batch's rows are locked by its own transaction: no status or owner check.
            settle_delete: r(&settle(
                "DELETE FROM {schema}.{p}messages WHERE id = ANY($2)",
            )),
            settle_keep: r(&settle(
                "UPDATE {schema}.{p}messages SET status = 'delivered', delivered_at = now(), \
                 locked_by = NULL WHERE id = ANY($2)",
            )),
            fail: r(&FAIL.replace("{attempts}", "").replace(
                "{owner}",
                " AND m.locked_by = $4 AND m.status = 'in_flight'",
            )),
            release: r(
                "UPDATE {schema}.{p}messages SET status = 'pending', available_at = now(), \
                 attempts = greatest(attempts - 1, 0), locked_by = NULL \
                 WHERE id = ANY($1) AND locked_by = $2 AND status = 'in_flight'",
            ),
            purge_delivered: r("DELETE FROM {schema}.{p}messages WHERE seq IN (\
                 SELECT seq FROM {schema}.{p}messages \
                 WHERE status = 'delivered' AND delivered_at <= now() - $1 * interval '1 millisecond' \
                 ORDER BY delivered_at LIMIT $2)"),
            status: r(STATUS),
            backlog: r(BACKLOG),
            dead_list: r(&format!(
                "SELECT {COLUMNS} FROM {{schema}}.{{p}}messages m WHERE m.status = 'dead' ORDER BY m.seq LIMIT $1"
            )),
            dead_retry: r(
                "UPDATE {schema}.{p}messages SET status = 'pending', attempts = 0, available_at = now(), \
                 dead_at = NULL, locked_by = NULL, interrupted = false \
                 WHERE status = 'dead' AND ($1::uuid[] IS NULL OR id = ANY($1))",
            ),
            delivered_after_dead: r("SELECT d.key, count(l.id) AS later FROM (\
 SELECT key, min(seq) AS seq FROM {schema}.{p}messages WHERE status = 'dead' AND key IS NOT NULL AND ($1::uuid[] IS NULL OR id = ANY($1)) \
 GROUP BY key) d \
 LEFT JOIN {schema}.{p}messages l ON l.key = d.key AND l.seq > d.seq AND l.status = 'delivered' \
 GROUP BY d.key ORDER BY d.key"),
            dead_purge: r("DELETE FROM {schema}.{p}messages WHERE status = 'dead' \
                 AND ($1::bigint IS NULL OR dead_at <= now() - $1 * interval '1 millisecond')"),
            park: r(PARK),
            unpark: r("DELETE FROM {schema}.{p}relays WHERE relay_id = $1"),
            notify: r("SELECT pg_notify('{channel}', '')"),
            dead_page: r(&format!(
                "SELECT {COLUMNS} FROM {{schema}}.{{p}}messages m WHERE {DEAD_FILTER} \
                 AND ($7::uuid IS NULL OR m.id > $7) ORDER BY m.id LIMIT $8"
            )),
            get_message: r(&format!(
                "SELECT {COLUMNS} FROM {{schema}}.{{p}}messages m WHERE m.id = $1"
            )),
            dead_retry_where: r(&format!(
                "UPDATE {{schema}}.{{p}}messages m SET status = 'pending', attempts = 0, \
                 available_at = now(), dead_at = NULL, locked_by = NULL, interrupted = false \
                 WHERE {DEAD_FILTER}"
            )),
            dead_purge_where: r(&format!(
                "DELETE FROM {{schema}}.{{p}}messages m WHERE {DEAD_FILTER}"
            )),
            heartbeat: r(
                "INSERT INTO {schema}.{p}relay_heartbeats (relay_id, state) VALUES ($1, $2) \
                 ON CONFLICT (relay_id) DO UPDATE SET state = EXCLUDED.state, last_seen = now() \
                 WHERE {p}relay_heartbeats.state <> 'stopped'",
            ),
            relays: r("WITH gc AS (DELETE FROM {schema}.{p}relay_heartbeats \
                   WHERE last_seen < now() - interval '1 day') \
                 SELECT relay_id, state, last_seen, \
                   extract(epoch FROM now() - last_seen)::float8 AS age \
                 FROM {schema}.{p}relay_heartbeats \
                 WHERE last_seen >= now() - $1 * interval '1 millisecond' ORDER BY relay_id"),
            pause: r(
                "INSERT INTO {schema}.{p}paused_topics (topic) VALUES ($1) ON CONFLICT DO NOTHING",
            ),
            resume: r("DELETE FROM {schema}.{p}paused_topics WHERE topic = $1"),
            paused: r("SELECT topic FROM {schema}.{p}paused_topics ORDER BY topic"),
        }
    }
}

/// The dead letters an operator command selects (see `outbox_core::DeadFilter`); `$5` is a
/// lower-case `LIKE` pattern escaped with `\`.
const DEAD_FILTER: &str = "m.status = 'dead' \
    AND ($1::uuid[] IS NULL OR m.id = ANY($1)) \
    AND ($2::text IS NULL OR m.topic = $2) \
    AND ($3::text IS NULL OR m.type = $3) \
    AND ($4::text IS NULL OR m.key = $4) \
    AND ($5::text IS NULL OR lower(m.last_error) LIKE $5) \
    AND ($6::bigint IS NULL OR m.dead_at <= now() - $6 * interval '1 millisecond')";

/// The status a row is inserted with, as SQL. Captured rows also tell the wake-up trigger
/// (migration 15) that this statement wakes no polling relay.
fn status_sql(status: &str) -> String {
    match status {
        "captured" => {
            "CASE WHEN set_config('outbox.captured_insert', 'on', true) = 'on' THEN 'captured' END"
                .into()
        }
        other => format!("'{other}'"),
    }
}

/// One message; `available_at` is the later of the caller's absolute time and now + delay.
/// `status` is `pending`, or `captured` for rows only a relay streaming from a slot delivers.
fn insert(status: &str) -> String {
    let status = status_sql(status);
    format!(
        "INSERT INTO {{schema}}.{{p}}messages \
         (id, topic, type, key, partition, payload, content_type, headers, available_at, status) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, \
           greatest(coalesce($9::timestamptz, now()), now() + coalesce($10::bigint, 0) * interval '1 millisecond'), \
           {status})"
    )
}

/// One statement for a whole batch; `ORDINALITY` keeps the caller's order in `seq`.
fn insert_batch(status: &str) -> String {
    let status = status_sql(status);
    format!(
        "INSERT INTO {{schema}}.{{p}}messages \
         (id, topic, type, key, partition, payload, content_type, headers, available_at, status) \
         SELECT id, topic, type, key, partition, payload, content_type, headers::jsonb, \
           greatest(coalesce(at, now()), now() + coalesce(delay_ms, 0) * interval '1 millisecond'), \
           {status} \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::bytea[], $7::text[], \
                     $8::text[], $9::timestamptz[], $10::bigint[]) \
           WITH ORDINALITY AS b(id, topic, type, key, partition, payload, content_type, headers, at, delay_ms, ord) \
         ORDER BY ord"
    )
}

/// The claim (migrations 7 and 8): key heads and their runs in a window of the ready index,
/// locked by the caller's transaction and bounded by count and bytes; `due` tells the caller
/// where a run must stop.
const CLAIM_RUNS: &str = "SELECT {columns}, m.interrupted, (m.available_at <= now()) AS due, \
    now() AS claimed_at FROM {schema}.{p}claim_runs($1, $2, $3, $4, $5, $6, $7, $8) m";

/// A leased claim writes its lease on the rows it picked, in the transaction of the claim.
const LEASE: &str = "UPDATE {schema}.{p}messages SET status = 'in_flight', locked_by = $2, \
    attempts = attempts + 1, interrupted = false, \
    available_at = now() + $3 * interval '1 millisecond' \
    WHERE seq = ANY($1) RETURNING available_at";

/// The outcome of a held batch in one statement: its delivery record goes (`$1`), the delivered
/// rows are done (`$2`), and the failures recorded with the attempt counted (`$3`–`$5`).
fn settle(ack: &str) -> String {
    let fail = FAIL
        .replace("{attempts}", "attempts = m.attempts + 1, ")
        .replace("{owner}", "")
        .replace(
            "$1::uuid[], $2::text[], $3::bigint[]",
            "$3::uuid[], $4::text[], $5::bigint[]",
        );
    format!(
        "WITH done AS (DELETE FROM {{schema}}.{{p}}deliveries WHERE lock_key = $1), \
         acked AS ({ack}), failed AS ({fail}) SELECT 1"
    )
}

/// Records failures: a NULL delay means dead. `{attempts}` and `{owner}` differ between a
/// leased claim (attempt counted at claim time; the lease must still be this relay's) and a held
/// one (attempt counted here; the rows are locked by the very transaction that runs this).
const FAIL: &str = "UPDATE {schema}.{p}messages m SET \
      status = CASE WHEN f.delay_ms IS NULL THEN 'dead' ELSE 'pending' END, \
      available_at = CASE WHEN f.delay_ms IS NULL THEN m.available_at \
                     ELSE now() + f.delay_ms * interval '1 millisecond' END, \
      dead_at = CASE WHEN f.delay_ms IS NULL THEN now() END, \
      {attempts}last_error = f.error, locked_by = NULL, interrupted = false \
    FROM UNNEST($1::uuid[], $2::text[], $3::bigint[]) AS f(id, error, delay_ms) \
    WHERE m.id = f.id{owner}";

/// Rows waiting for a slot's stream (`captured`) count as pending: they wait for delivery.
const STATUS: &str = "SELECT \
      count(*) FILTER (WHERE status IN ('pending', 'captured')) AS pending, \
      count(*) FILTER (WHERE status = 'in_flight') AS in_flight, \
      count(*) FILTER (WHERE status = 'delivered') AS delivered, \
      count(*) FILTER (WHERE status = 'dead') AS dead, \
      extract(epoch FROM now() - min(created_at) FILTER (WHERE status IN ('pending', 'captured')))::float8 AS oldest \
    FROM {schema}.{p}messages";

/// [`STATUS`] per topic, for the metrics timer: one scan of the table.
const BACKLOG: &str = "SELECT topic, \
      count(*) FILTER (WHERE status IN ('pending', 'captured')) AS pending, \
      count(*) FILTER (WHERE status = 'in_flight') AS in_flight, \
      count(*) FILTER (WHERE status = 'delivered') AS delivered, \
      count(*) FILTER (WHERE status = 'dead') AS dead, \
      extract(epoch FROM now() - min(created_at) FILTER (WHERE status IN ('pending', 'captured')))::float8 AS oldest \
    FROM {schema}.{p}messages GROUP BY topic ORDER BY topic";

/// Registers an idle relay for wake-ups (and forgets relays that died while registered).
const PARK: &str = "WITH gc AS (\
      DELETE FROM {schema}.{p}relays WHERE parked_until < now() - interval '1 hour') \
    INSERT INTO {schema}.{p}relays (relay_id, parked_until) \
    VALUES ($1, now() + $2 * interval '1 millisecond') \
    ON CONFLICT (relay_id) DO UPDATE SET parked_until = EXCLUDED.parked_until";
