//! The consumer inbox: turns at-least-once delivery into exactly-once effects.
//!
//! A consumer records each message id it processes in its own transaction, together with the
//! effects. [`SqliteInbox::record`] returns true the first time (apply the effects, commit, then
//! ack the broker) and false for a redelivery (commit nothing new, ack). SQLite runs one writer
//! at a time, so two deliveries of one message cannot both record it.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::{AssertSqlSafe, Sqlite, SqlitePool, Transaction};
use uuid::Uuid;

/// The inbox table of one database, shared by every consumer of it: a handle got from the
/// store's `inbox()`, cheap to clone. Use it inside the transaction that applies a message's
/// effects (see the module docs).
#[derive(Debug, Clone)]
pub struct SqliteInbox {
    record: Arc<str>,
    purge: Arc<str>,
}

impl SqliteInbox {
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            record: format!(
                "INSERT INTO {prefix}inbox (consumer, message_id, processed_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT DO NOTHING"
            )
            .into(),
            purge: format!(
                "DELETE FROM {prefix}inbox WHERE rowid IN (\
                 SELECT rowid FROM {prefix}inbox WHERE processed_at <= ?1 LIMIT ?2)"
            )
            .into(),
        }
    }

    /// Records that `consumer` processes `message_id` as part of `tx`; false if it already did.
    pub async fn record(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(AssertSqlSafe(self.record.clone()))
            .bind(consumer)
            .bind(message_id.to_string())
            .bind(Utc::now().timestamp_millis())
            .execute(&mut **tx)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Forgets up to `limit` ids processed longer than `older_than` ago; a redelivery after
    /// that window would be processed again, so keep it longer than any broker redelivers.
    pub async fn purge(
        &self,
        pool: &SqlitePool,
        older_than: Duration,
        limit: usize,
    ) -> Result<u64, sqlx::Error> {
        let cutoff = Utc::now().timestamp_millis()
            - i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
        let done = sqlx::query(AssertSqlSafe(self.purge.clone()))
            .bind(cutoff)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }
}
