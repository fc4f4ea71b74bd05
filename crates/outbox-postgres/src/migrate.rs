//! Embedded, versioned schema migrations.
//!
//! Each version runs in one transaction under an advisory lock, so concurrent relays starting
//! together apply it once; applied versions are recorded in `{prefix}schema_migrations`.

use outbox_core::{StoreError, StoreResult};
use sqlx::{AssertSqlSafe, PgPool, Row};

use crate::sql::PgConfig;

pub(crate) struct Migration {
    pub version: i64,
    pub description: &'static str,
    pub sql: &'static str,
}

pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "create messages",
        sql: include_str!("../migrations/0001_create_messages.sql"),
    },
    Migration {
        version: 2,
        description: "wake parked relays, index dead letters",
        sql: include_str!("../migrations/0002_wake_parked_relays.sql"),
    },
    Migration {
        version: 3,
        description: "claim function with a statistics-proof plan",
        sql: include_str!("../migrations/0003_claim_function.sql"),
    },
    Migration {
        version: 4,
        description: "consumer inbox",
        sql: include_str!("../migrations/0004_inbox.sql"),
    },
    Migration {
        version: 5,
        description: "bounded claim for pipelined batches",
        sql: include_str!("../migrations/0005_claim_window.sql"),
    },
    Migration {
        version: 6,
        description: "claim held by the relay's transaction",
        sql: include_str!("../migrations/0006_claim_held.sql"),
    },
    Migration {
        version: 7,
        description: "claims by key runs, partition ownership, attempts of unfinished deliveries",
        sql: include_str!("../migrations/0007_claim_runs.sql"),
    },
    Migration {
        version: 8,
        description: "claims bounded by the bytes of their payloads",
        sql: include_str!("../migrations/0008_claim_byte_budget.sql"),
    },
    Migration {
        version: 9,
        description: "paused topics, relay heartbeats, dead letters by id",
        sql: include_str!("../migrations/0009_admin.sql"),
    },
    Migration {
        version: 10,
        description: "keys of deliveries cut off by a database restart stay fenced until their deadline",
        sql: include_str!("../migrations/0010_restart_fence.sql"),
    },
    Migration {
        version: 11,
        description: "enqueue from SQL: outbox_enqueue() and outbox_enqueue_bytes()",
        sql: include_str!("../migrations/0011_sql_enqueue.sql"),
    },
    Migration {
        version: 12,
        description: "claims of keyed heads skip the per-head probe when nothing is rescheduled",
        sql: include_str!("../migrations/0012_claim_less_per_head.sql"),
    },
    Migration {
        version: 13,
        description: "log-based capture: the batch a streaming relay has in its sink",
        sql: include_str!("../migrations/0013_capture_inflight.sql"),
    },
    Migration {
        version: 14,
        description: "table capture: rows only a relay streaming from a slot delivers",
        sql: include_str!("../migrations/0014_captured_rows.sql"),
    },
    Migration {
        version: 15,
        description: "inserts of captured rows wake no polling relay",
        sql: include_str!("../migrations/0015_captured_rows_wake_no_one.sql"),
    },
];

/// The version the schema is at, without creating anything: 0 when there is none.
pub(crate) async fn schema_version(pool: &PgPool, cfg: &PgConfig) -> StoreResult<i64> {
    let sql = cfg.render("SELECT coalesce(max(version), 0) FROM {schema}.{p}schema_migrations");
    match sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
    {
        Ok(v) => Ok(v),
        // No schema or no table yet (undefined_table, invalid_schema_name).
        Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42P01" | "3F000")) => {
            Ok(0)
        }
        Err(e) => Err(StoreError::database(e)),
    }
}

/// The schema version this build writes.
pub const LATEST_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Applies every migration up to `target` that the database lacks.
pub(crate) async fn migrate_to(pool: &PgPool, cfg: &PgConfig, target: i64) -> StoreResult<()> {
    let mut tx = pool.begin().await.map_err(StoreError::database)?;
    // One lock per outbox, held to the end of the transaction.
    let lock_key = crc32fast::hash(format!("{}.{}", cfg.schema, cfg.table_prefix).as_bytes());
    sqlx::query("SELECT pg_advisory_xact_lock(7150411, $1)")
        .bind(lock_key as i32)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::database)?;
    let setup = cfg.render(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.{p}schema_migrations (
             version bigint PRIMARY KEY,
             description text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    );
    sqlx::raw_sql(AssertSqlSafe(setup))
        .execute(&mut *tx)
        .await
        .map_err(StoreError::database)?;
    let current: i64 = sqlx::query(AssertSqlSafe(
        cfg.render("SELECT coalesce(max(version), 0) FROM {schema}.{p}schema_migrations"),
    ))
    .fetch_one(&mut *tx)
    .await
    .and_then(|row| row.try_get(0))
    .map_err(StoreError::database)?;
    if current > LATEST_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: current,
            known: LATEST_VERSION,
        });
    }
    for m in MIGRATIONS
        .iter()
        .filter(|m| m.version > current && m.version <= target)
    {
        apply(&mut tx, cfg, m).await?;
    }
    tx.commit().await.map_err(StoreError::database)
}

async fn apply(tx: &mut sqlx::PgConnection, cfg: &PgConfig, m: &Migration) -> StoreResult<()> {
    let failed = |e: sqlx::Error| StoreError::Migration {
        version: m.version,
        reason: e.to_string(),
    };
    sqlx::raw_sql(AssertSqlSafe(cfg.render(m.sql)))
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
    sqlx::query(AssertSqlSafe(cfg.render(
        "INSERT INTO {schema}.{p}schema_migrations (version, description) VALUES ($1, $2)",
    )))
    .bind(m.version)
    .bind(m.description)
    .execute(&mut *tx)
    .await
    .map_err(failed)?;
    tracing::info!(
        version = m.version,
        description = m.description,
        "applied migration"
    );
    Ok(())
}
