//! Log-based capture: what the store does for a relay that reads the outbox from the WAL.
//!
//! With [`EnqueueMode::WalMessage`] a writer's `enqueue` writes no row: it emits one
//! transactional logical decoding message (`pg_logical_emit_message`) per message, which
//! PostgreSQL decodes for a replication slot only once the transaction commits, in commit order.
//! The message's bytes are an [envelope](encode): one line of JSON with everything but the
//! payload, a newline, then the payload as it was given.
//!
//! The relay reading the slot delivers what it can straight away. What it cannot (a failure, a
//! delay, a key that has older messages waiting in the table) it writes to the outbox table with
//! [`PgStore::write_back`]; from there the polling relay's retries, backoff and dead letters take
//! over, and [`PgStore::keys_waiting`] tells the streaming relay which keys must queue behind.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{Bytes, Message, NewMessage, Retention, Status, StoreError, StoreResult};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, PgConnection, Row};
use uuid::Uuid;

use crate::{PgConfig, PgStore};

/// How `enqueue` writes a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum EnqueueMode {
    /// A row in the outbox table, polled by relays.
    #[default]
    Row,
    /// A row in the outbox table that only a relay reading the table's inserts from a slot
    /// (`outbox relay --capture wal`) delivers (table capture): polling relays leave it alone,
    /// so no claim walks past it, and the streaming relay deletes it once delivered. Needs
    /// `wal_level = logical` on the server.
    CapturedRow,
    /// A transactional logical decoding message and no row: the cheapest write PostgreSQL has.
    /// Only a relay reading a slot (`outbox relay --capture wal`) sees these messages; they
    /// need `wal_level = logical` on the server.
    WalMessage,
}

/// Everything of a message but its payload, as the first line of its logical message.
#[derive(Serialize, Deserialize)]
struct Envelope<'a> {
    id: Uuid,
    topic: Cow<'a, str>,
    #[serde(rename = "type")]
    message_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<Cow<'a, str>>,
    partition: i32,
    content_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    headers: Cow<'a, BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delay_ms: Option<u64>,
}

/// A logical message that is not an outbox envelope.
#[derive(Debug, thiserror::Error)]
#[error("not an outbox message: {0}")]
pub struct BadEnvelope(String);

/// The bytes `enqueue` emits for `msg` in [`EnqueueMode::WalMessage`].
pub fn encode(msg: &NewMessage) -> Vec<u8> {
    let envelope = Envelope {
        id: msg.id(),
        topic: msg.topic().into(),
        message_type: msg.message_type().into(),
        key: msg.key_ref().map(Into::into),
        partition: msg.partition(),
        content_type: msg.content_type().into(),
        headers: msg.stored_headers(),
        at: msg.absolute_available_at(),
        delay_ms: msg.delay_duration().map(|d| d.as_millis() as u64),
    };
    // Serialising a struct of strings and numbers into memory cannot fail.
    let mut out = serde_json::to_vec(&envelope).unwrap_or_default();
    out.push(b'\n');
    out.extend_from_slice(msg.payload());
    out
}

/// The message an envelope carries, committed at `committed_at`, with `position` as its `seq`
/// (a relay gives it its commit's position: records of overlapping transactions interleave in
/// the WAL, commits do not).
pub fn decode(
    content: &[u8],
    position: u64,
    committed_at: DateTime<Utc>,
) -> Result<Message, BadEnvelope> {
    let split = content
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| BadEnvelope("no envelope line".into()))?;
    let env: Envelope<'_> =
        serde_json::from_slice(&content[..split]).map_err(|e| BadEnvelope(e.to_string()))?;
    let delayed = env
        .delay_ms
        .map(|ms| committed_at + chrono::Duration::milliseconds(ms as i64));
    let available_at = [env.at, delayed]
        .into_iter()
        .flatten()
        .fold(committed_at, DateTime::max);
    Ok(Message {
        id: env.id,
        seq: i64::try_from(position).unwrap_or(i64::MAX),
        topic: env.topic.into_owned(),
        message_type: env.message_type.into_owned(),
        key: env.key.map(Cow::into_owned),
        partition: env.partition,
        payload: Bytes::copy_from_slice(&content[split + 1..]),
        content_type: env.content_type.into_owned(),
        headers: env.headers.into_owned(),
        created_at: committed_at,
        available_at,
        attempts: 0,
        last_error: None,
        status: Status::Pending,
    })
}

pub(crate) fn wal_prefix(config: &PgConfig) -> String {
    format!("outbox:{}.{}messages", config.schema, config.table_prefix)
}

/// What becomes of a captured message written to the outbox table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteBack {
    /// Not attempted (delayed, or behind an earlier message of its key): pending from its
    /// `available_at`.
    Waiting,
    /// Its streamed delivery never ended (the relay died in the sink): one attempt counted,
    /// due again at `at`, and delivered alone next time, as the polling relay does with any
    /// delivery that never ended.
    Interrupted {
        /// When the next attempt is due.
        at: DateTime<Utc>,
        /// What happened, as the store keeps it.
        error: String,
    },
    /// One failed attempt; due again at `at`.
    Retry {
        /// When the next attempt is due.
        at: DateTime<Utc>,
        /// The attempt's error, as the store keeps it.
        error: String,
    },
    /// Failed for good: a dead letter at once.
    Dead {
        /// Why.
        error: String,
    },
}

/// What the last relay streaming from a slot had handed to its sink when it stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unfinished {
    /// The ids of its last batch: replayed, each counts the attempt that may never have ended.
    pub ids: HashSet<Uuid>,
    /// Where that batch's last transaction ends in the WAL: a replay up to here may meet
    /// captured rows already delivered, which are gone from the table.
    pub through: Option<u64>,
}

/// A replication slot of this database, as `outbox status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotStatus {
    /// The slot's name.
    pub name: String,
    /// Whether a relay streams from it now.
    pub active: bool,
    /// WAL the slot keeps that its relay has not confirmed, in bytes.
    pub lag_bytes: i64,
    /// The position up to which the relay confirmed, as PostgreSQL writes it (`0/16B3748`).
    pub confirmed: Option<String>,
}

/// A written-back row is due no earlier than its insert: claims take a key's rows in `seq`
/// order and look for an older row of the key only among rows whose `available_at` moved past
/// their `created_at`. A row written back with its commit time instead would sort before rows
/// of its key written earlier (a replay after a crash writes old messages again, with new
/// `seq`s), and its key would go out of order.
const WRITE_BACK: &str = "INSERT INTO {schema}.{p}messages \
    (id, topic, type, key, partition, payload, content_type, headers, created_at, available_at, \
     attempts, last_error, status, dead_at, interrupted) \
    SELECT id, topic, type, key, partition, payload, content_type, headers::jsonb, created_at, \
      greatest(available_at, now()), attempts, last_error, status, CASE WHEN status = 'dead' THEN now() END, \
      interrupted \
    FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::bytea[], \
                $7::text[], $8::text[], $9::timestamptz[], $10::timestamptz[], $11::int[], \
                $12::text[], $13::text[], $14::bool[]) WITH ORDINALITY \
      AS b(id, topic, type, key, partition, payload, content_type, headers, created_at, \
           available_at, attempts, last_error, status, interrupted, ord) \
    ORDER BY ord \
    ON CONFLICT (id) DO NOTHING";

/// Through a function that plans with the index of waiting keys (migration 14).
const KEYS_WAITING: &str = "SELECT * FROM {schema}.{p}keys_waiting($1)";

/// Advice for a server that cannot decode its WAL for a slot.
pub const WAL_LEVEL_ADVICE: &str = "run ALTER SYSTEM SET wal_level = logical; and restart \
    PostgreSQL (check max_replication_slots and max_wal_senders too)";

impl PgStore {
    /// The prefix of this outbox's logical messages: other outboxes and other applications
    /// emitting messages in the same database are left alone.
    pub fn wal_prefix(&self) -> String {
        wal_prefix(self.config())
    }

    /// The schema and name of this outbox's table, whose inserts table capture streams.
    pub fn table(&self) -> (String, String) {
        let c = self.config();
        (c.schema.clone(), format!("{}messages", c.table_prefix))
    }

    /// The default name of this outbox's replication slot.
    pub fn default_slot(&self) -> String {
        self.capture_name("slot")
    }

    /// The publication this outbox's relays read from.
    pub fn publication(&self) -> String {
        self.capture_name("capture")
    }

    fn capture_name(&self, what: &str) -> String {
        let name = format!(
            "{}_{}{what}",
            self.config().schema,
            self.config().table_prefix
        );
        if name.len() <= 63 {
            return name;
        }
        let hash = format!("_{:08x}", crc32fast::hash(name.as_bytes()));
        format!("{}{hash}", &name[..63 - hash.len()])
    }

    /// Of `keys`, those with messages waiting in the outbox table (pending or in delivery):
    /// their captured messages must queue behind them.
    pub async fn keys_waiting(&self, keys: &[String]) -> StoreResult<HashSet<String>> {
        if keys.is_empty() {
            return Ok(HashSet::new());
        }
        let sql = self.config().render(KEYS_WAITING);
        let rows: Vec<String> = sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(keys)
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::database)?;
        Ok(rows.into_iter().collect())
    }

    /// Writes captured messages to the outbox table in one statement, in the given order (so a
    /// key's messages keep their order in `seq`). A message already there (a replay after a
    /// crash) is left as it is.
    pub async fn write_back(&self, rows: &[(&Message, WriteBack)]) -> StoreResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        self.write_back_query(rows)
            .execute(self.pool())
            .await
            .map_err(StoreError::database)?;
        Ok(())
    }

    fn write_back_query(
        &self,
        rows: &[(&Message, WriteBack)],
    ) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let col = |f: &dyn Fn(&Message, &WriteBack) -> Option<String>| -> Vec<Option<String>> {
            rows.iter().map(|(m, w)| f(m, w)).collect()
        };
        let headers = col(&|m, _| serde_json::to_string(&m.headers).ok());
        let available_at: Vec<DateTime<Utc>> = rows
            .iter()
            .map(|(m, w)| match w {
                WriteBack::Retry { at, .. } | WriteBack::Interrupted { at, .. } => *at,
                _ => m.available_at,
            })
            .collect();
        let attempts: Vec<i32> = rows
            .iter()
            .map(|(_, w)| i32::from(!matches!(w, WriteBack::Waiting)))
            .collect();
        let errors = col(&|_, w| match w {
            WriteBack::Waiting => None,
            WriteBack::Retry { error, .. }
            | WriteBack::Interrupted { error, .. }
            | WriteBack::Dead { error } => Some(outbox_core::storable_error(error)),
        });
        let status = col(&|_, w| {
            Some(match w {
                WriteBack::Dead { .. } => Status::Dead.as_str().into(),
                _ => Status::Pending.as_str().into(),
            })
        });
        let sql = self.config().render(WRITE_BACK);
        sqlx::query(AssertSqlSafe(sql))
            .bind(rows.iter().map(|(m, _)| m.id).collect::<Vec<_>>())
            .bind(col(&|m, _| Some(m.topic.clone())))
            .bind(col(&|m, _| Some(m.message_type.clone())))
            .bind(col(&|m, _| m.key.clone()))
            .bind(rows.iter().map(|(m, _)| m.partition).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|(m, _)| m.payload.to_vec())
                    .collect::<Vec<_>>(),
            )
            .bind(col(&|m, _| Some(m.content_type.clone())))
            .bind(headers)
            .bind(rows.iter().map(|(m, _)| m.created_at).collect::<Vec<_>>())
            .bind(available_at)
            .bind(attempts)
            .bind(errors)
            .bind(status)
            .bind(
                rows.iter()
                    .map(|(_, w)| matches!(w, WriteBack::Interrupted { .. }))
                    .collect::<Vec<_>>(),
            )
    }

    /// Settles a streamed batch in one transaction: the captured rows whose messages the sink
    /// took are removed (`delivered`; kept as delivered rows with [`Retention::Keep`]), the
    /// captured rows of messages handed to the polling path (`handed`) are replaced by their
    /// `rows`, written back as [`PgStore::write_back`] does, after every other message of
    /// their key. Rows no longer captured (a replay after a crash) are left as they are.
    pub async fn settle_captured(
        &self,
        delivered: &[Uuid],
        handed: &[Uuid],
        rows: &[(&Message, WriteBack)],
        retention: Retention,
    ) -> StoreResult<()> {
        if delivered.is_empty() && handed.is_empty() {
            return self.write_back(rows).await;
        }
        let keep = matches!(retention, Retention::Keep(_));
        // Committed with the WAL flushed, unlike the in-flight record: the slot may keep a
        // confirmed position on disk before an unflushed commit, and a crash would then leave
        // delivered rows behind as captured, where no stream comes back for them.
        if rows.is_empty() && !keep {
            let mut conn = self.pool().acquire().await.map_err(StoreError::database)?;
            return self.captured_done(&mut conn, delivered, false).await;
        }
        let mut tx = self.pool().begin().await.map_err(StoreError::database)?;
        if keep {
            self.captured_done(&mut tx, delivered, true).await?;
            self.captured_done(&mut tx, handed, false).await?;
        } else {
            let all = [delivered, handed].concat();
            self.captured_done(&mut tx, &all, false).await?;
        }
        if !rows.is_empty() {
            self.write_back_query(rows)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::database)?;
        }
        tx.commit().await.map_err(StoreError::database)
    }

    /// Removes (or, with `keep`, marks delivered) the captured rows `ids`, through a function
    /// that plans with the index on id whatever the table's statistics say (migration 14).
    ///
    /// A walsender sends a transaction once its commit record is flushed, which can be a moment
    /// before the transaction is visible to other sessions: the relay may settle a row it
    /// delivered before it can see it. So the statement runs again, with a fresh snapshot each
    /// time, until it has found every row, for at most about a second (a replay may name rows
    /// that are gone already, and those are never found).
    async fn captured_done(
        &self,
        conn: &mut PgConnection,
        ids: &[Uuid],
        keep: bool,
    ) -> StoreResult<()> {
        const PATIENCE: Duration = Duration::from_secs(1);
        if ids.is_empty() {
            return Ok(());
        }
        let sql = self
            .config()
            .render("SELECT {schema}.{p}captured_done($1, $2)");
        let mut found = 0;
        let mut pause = Duration::from_millis(1);
        loop {
            let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql.clone()))
                .bind(ids)
                .bind(keep)
                .fetch_one(&mut *conn)
                .await
                .map_err(StoreError::database)?;
            found += usize::try_from(n).unwrap_or(0);
            if found >= ids.len() || pause > PATIENCE {
                return Ok(());
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }

    /// Records the batch a relay streaming from `slot` hands to its sink now, replacing the
    /// previous one, and `end`, where its last transaction ends in the WAL. Written without
    /// waiting for the WAL flush: it matters when the relay dies, not the database.
    pub async fn capture_started(&self, slot: &str, ids: &[Uuid], end: u64) -> StoreResult<()> {
        let sql = self.config().render(
            "INSERT INTO {schema}.{p}capture_inflight (slot, ids, end_lsn) VALUES ($1, $2, $3) \
             ON CONFLICT (slot) DO UPDATE \
             SET ids = excluded.ids, end_lsn = excluded.end_lsn, started_at = now()",
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(slot)
            .bind(ids)
            .bind(i64::try_from(end).unwrap_or(i64::MAX))
            .execute(self.records_pool())
            .await
            .map_err(StoreError::database)?;
        Ok(())
    }

    /// Forgets the batch of a relay that stopped cleanly, every outcome recorded and its last
    /// position confirmed.
    pub async fn capture_finished(&self, slot: &str) -> StoreResult<()> {
        let sql = self
            .config()
            .render("DELETE FROM {schema}.{p}capture_inflight WHERE slot = $1");
        sqlx::query(AssertSqlSafe(sql))
            .bind(slot)
            .execute(self.pool())
            .await
            .map_err(StoreError::database)?;
        Ok(())
    }

    /// The batch the last relay on `slot` handed to its sink: whatever of it the slot replays
    /// had a delivery that may never have ended.
    pub async fn capture_unfinished(&self, slot: &str) -> StoreResult<Unfinished> {
        let sql = self
            .config()
            .render("SELECT ids, end_lsn FROM {schema}.{p}capture_inflight WHERE slot = $1");
        let row: Option<(Vec<Uuid>, Option<i64>)> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(slot)
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::database)?;
        let (ids, end) = row.unwrap_or_default();
        Ok(Unfinished {
            ids: ids.into_iter().collect(),
            through: end.and_then(|e| u64::try_from(e).ok()),
        })
    }

    /// Of `ids`, those whose rows are still captured: the others were delivered, or handed to
    /// the polling relay, by a relay before this one.
    pub async fn captured_left(&self, ids: &[Uuid]) -> StoreResult<HashSet<Uuid>> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let sql = self
            .config()
            .render("SELECT * FROM {schema}.{p}captured_left($1)");
        let left: Vec<Uuid> = sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(ids)
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::database)?;
        Ok(left.into_iter().collect())
    }

    /// Prepares log-based capture: checks `wal_level`, creates the publication relays read
    /// and, with `slot`, the logical replication slot (both only when missing). Fails with
    /// what to change when the server cannot decode its WAL.
    pub async fn setup_capture(&self, slot: Option<&str>) -> StoreResult<()> {
        let level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
            .fetch_one(self.pool())
            .await
            .map_err(StoreError::database)?;
        if level != "logical" {
            return Err(StoreError::Config(format!(
                "log-based capture needs wal_level = logical, and this server has {level}: \
                 {WAL_LEVEL_ADVICE}"
            )));
        }
        self.create_publication().await?;
        if let Some(slot) = slot {
            self.create_slot(slot).await?;
        }
        Ok(())
    }

    /// The publication carries the outbox table's inserts (table capture) and, as every
    /// publication does, the logical messages (message capture). Updates and deletes are left
    /// out: the polling relay's claims and acks are of no interest to the stream.
    ///
    /// Relays starting together would race on the publication's catalog row (PostgreSQL fails
    /// concurrent ALTER PUBLICATIONs with "tuple concurrently updated"), so the check and the
    /// change run in one transaction under an advisory lock named after the publication.
    async fn create_publication(&self) -> StoreResult<()> {
        let publication = self.publication();
        let (schema, table) = self.table();
        let mut tx = self.pool().begin().await.map_err(StoreError::database)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(&publication)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::database)?;
        let found: Option<(bool, bool)> = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_tables \
                            WHERE pubname = $1 AND schemaname = $2 AND tablename = $3), \
                    pubinsert AND NOT (pubupdate OR pubdelete OR pubtruncate) \
             FROM pg_publication WHERE pubname = $1",
        )
        .bind(&publication)
        .bind(&schema)
        .bind(&table)
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::database)?;
        let target = format!("{schema}.{table}");
        let mut changes = Vec::new();
        match found {
            None => changes.push(format!(
                "CREATE PUBLICATION {publication} FOR TABLE {target} WITH (publish = 'insert')"
            )),
            Some((has_table, only_inserts)) => {
                // A publication of an earlier version carried only the logical messages.
                if !has_table {
                    changes.push(format!(
                        "ALTER PUBLICATION {publication} ADD TABLE {target}"
                    ));
                }
                if !only_inserts {
                    changes.push(format!(
                        "ALTER PUBLICATION {publication} SET (publish = 'insert')"
                    ));
                }
            }
        }
        for sql in changes {
            sqlx::query(AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await
                .map_err(StoreError::database)?;
        }
        tx.commit().await.map_err(StoreError::database)
    }

    async fn create_slot(&self, slot: &str) -> StoreResult<()> {
        check_slot(slot)?;
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
        )
        .bind(slot)
        .fetch_one(self.pool())
        .await
        .map_err(StoreError::database)?;
        if exists {
            return Ok(());
        }
        let created = sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(slot)
            .execute(self.pool())
            .await;
        match created {
            Err(e) if already_exists(&e) => Ok(()),
            Err(e) => Err(StoreError::database(e)),
            Ok(_) => self.hand_over_unstreamed().await,
        }
    }

    /// Captured rows committed before the slot existed never reach its stream: they go to the
    /// polling path, in their `seq` order. A row committed while the slot was being created
    /// may reach both (delivered twice, never lost).
    async fn hand_over_unstreamed(&self) -> StoreResult<()> {
        let sql = self.config().render(
            "UPDATE {schema}.{p}messages \
             SET status = 'pending', available_at = greatest(available_at, now(), created_at + interval '1 microsecond') \
             WHERE status = 'captured'",
        );
        let moved = sqlx::query(AssertSqlSafe(sql))
            .execute(self.pool())
            .await
            .map_err(StoreError::database)?
            .rows_affected();
        if moved > 0 {
            tracing::warn!(
                rows = moved,
                "rows written for table capture before its slot existed go to the polling relay"
            );
        }
        Ok(())
    }

    /// Drops a replication slot, releasing the WAL it keeps. Messages emitted since its relay
    /// last confirmed are lost with it; refused while a relay streams from it.
    pub async fn drop_slot(&self, slot: &str) -> StoreResult<bool> {
        let dropped = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1",
        )
        .bind(slot)
        .execute(self.pool())
        .await
        .map_err(StoreError::database)?;
        Ok(dropped.rows_affected() > 0)
    }

    /// The logical slots of this database using `pgoutput`, with their lag.
    pub async fn slots(&self) -> StoreResult<Vec<SlotStatus>> {
        let rows = sqlx::query(
            "SELECT slot_name::text AS name, active, \
               coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8 AS lag, \
               confirmed_flush_lsn::text AS confirmed \
             FROM pg_replication_slots \
             WHERE slot_type = 'logical' AND plugin = 'pgoutput' AND database = current_database() \
             ORDER BY slot_name",
        )
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::database)?;
        rows.iter()
            .map(|r| {
                Ok(SlotStatus {
                    name: r.try_get("name")?,
                    active: r.try_get("active")?,
                    lag_bytes: r.try_get("lag")?,
                    confirmed: r.try_get("confirmed")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::database)
    }
}

/// PostgreSQL's rule for slot names: lower-case letters, digits and underscores, 63 at most.
fn check_slot(slot: &str) -> StoreResult<()> {
    let valid = (1..=63).contains(&slot.len())
        && slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        return Ok(());
    }
    Err(StoreError::Config(format!(
        "slot {slot:?} must be 1 to 63 lower-case letters, digits or underscores"
    )))
}

fn already_exists(e: &sqlx::Error) -> bool {
    // Another relay created it between our check and our create: 42710 duplicate_object, or
    // 23505 from the catalog's unique index when both creates ran at once.
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "42710" || c == "23505")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_carries_the_message_and_its_delay() {
        let new = NewMessage::bytes(
            "orders",
            "order.created",
            "application/json",
            b"{\"a\":\n1}".to_vec(),
        )
        .expect("valid names")
        .key("k1")
        .header("x-tenant", "t")
        .delay(std::time::Duration::from_secs(5));
        let committed = Utc::now();
        let m = decode(&encode(&new), 42, committed).expect("decodes");
        assert_eq!(m.id, new.id());
        assert_eq!(m.seq, 42);
        assert_eq!(
            (m.topic.as_str(), m.message_type.as_str()),
            ("orders", "order.created")
        );
        assert_eq!(m.key.as_deref(), Some("k1"));
        assert_eq!(m.partition, new.partition());
        assert_eq!(&m.payload[..], b"{\"a\":\n1}");
        assert_eq!(m.headers.get("x-tenant").map(String::as_str), Some("t"));
        assert_eq!(m.created_at, committed);
        assert_eq!(m.available_at, committed + chrono::Duration::seconds(5));
    }

    #[test]
    fn slot_names_follow_postgresql() {
        assert!(check_slot("public_outbox_slot").is_ok());
        assert!(check_slot(&"a".repeat(63)).is_ok());
        for bad in ["", "Upper", "dash-ed", &"a".repeat(64)] {
            assert!(check_slot(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bytes_that_are_no_envelope_are_refused() {
        assert!(decode(b"no newline", 1, Utc::now()).is_err());
        assert!(decode(b"{\"id\":1}\npayload", 1, Utc::now()).is_err());
    }
}
