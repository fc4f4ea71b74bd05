//! The consumer inbox: turns at-least-once delivery into exactly-once effects.
//!
//! A consumer records each message id it processes in its own transaction, together with the
//! effects. [`PgInbox::record`] returns true the first time (apply the effects, commit, then ack
//! the broker) and false for a redelivery (commit nothing new, ack). Two deliveries of one
//! message racing each other serialise on the primary key: the second waits for the first
//! transaction and then sees the id, or takes over if the first rolled back.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::sql::PgConfig;

/// The inbox table of one database, shared by every consumer of it: a handle got from the
/// store's `inbox()`, cheap to clone. Use it inside the transaction that applies a message's
/// effects (see the module docs).
#[derive(Debug, Clone)]
pub struct PgInbox {
    record: Arc<str>,
    purge: Arc<str>,
}

impl PgInbox {
    pub(crate) fn new(cfg: &PgConfig) -> Self {
        Self {
            record: cfg
                .render(
                    "INSERT INTO {schema}.{p}inbox (consumer, message_id) VALUES ($1, $2) \
                     ON CONFLICT DO NOTHING",
                )
                .into(),
            purge: cfg
                .render(
                    "DELETE FROM {schema}.{p}inbox WHERE (consumer, message_id) IN (\
                     SELECT consumer, message_id FROM {schema}.{p}inbox \
                     WHERE processed_at <= now() - $1 * interval '1 millisecond' LIMIT $2)",
                )
                .into(),
        }
    }

    /// Records that `consumer` processes `message_id` as part of `tx`; false if it already did.
    pub async fn record(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(AssertSqlSafe(self.record.clone()))
            .bind(consumer)
            .bind(message_id)
            .execute(&mut **tx)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Forgets up to `limit` ids processed longer than `older_than` ago; a redelivery after
    /// that window would be processed again, so keep it longer than any broker redelivers.
    pub async fn purge(
        &self,
        pool: &PgPool,
        older_than: Duration,
        limit: usize,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(AssertSqlSafe(self.purge.clone()))
            .bind(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }
}
