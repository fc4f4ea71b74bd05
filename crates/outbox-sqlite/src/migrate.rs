//! Embedded, versioned schema migrations, recorded in `{prefix}schema_migrations`.
//!
//! Each version runs in its own `BEGIN IMMEDIATE` transaction. That takes SQLite's write lock
//! before the current version is read, so when several processes migrate at once the others
//! wait (busy timeout), then see the version applied and skip it: every version runs once.
//! A failure leaves the earlier versions applied and the failing one not at all.

use outbox_core::{StoreError, StoreResult};
use sqlx::{AssertSqlSafe, Row, SqliteConnection, SqlitePool};

struct Migration {
    version: i64,
    description: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "create messages",
        sql: include_str!("../migrations/0001_create_messages.sql"),
    },
    Migration {
        version: 2,
        description: "index dead letters",
        sql: include_str!("../migrations/0002_index_dead_letters.sql"),
    },
    Migration {
        version: 3,
        description: "consumer inbox",
        sql: include_str!("../migrations/0003_inbox.sql"),
    },
    Migration {
        version: 4,
        description: "paused topics, relay heartbeats, dead letters by id",
        sql: include_str!("../migrations/0004_admin.sql"),
    },
];

/// The version the schema is at, without creating anything: 0 when there is none.
pub(crate) async fn schema_version(pool: &SqlitePool, prefix: &str) -> StoreResult<i64> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?)",
    )
    .bind(format!("{prefix}schema_migrations"))
    .fetch_one(pool)
    .await
    .map_err(StoreError::database)?;
    if !exists {
        return Ok(0);
    }
    let sql = render(
        "SELECT coalesce(max(version), 0) FROM {p}schema_migrations",
        prefix,
    );
    sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .map_err(StoreError::database)
}

/// The schema version this build writes.
pub const LATEST_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

fn render(template: &str, prefix: &str) -> String {
    template.replace("{p}", prefix)
}

/// Applies, in order, every migration up to `target` that the database lacks.
pub(crate) async fn migrate_to(pool: &SqlitePool, prefix: &str, target: i64) -> StoreResult<()> {
    while apply_next(pool, prefix, target).await? {}
    Ok(())
}

/// Applies the first missing migration up to `target`; false when there is none left.
async fn apply_next(pool: &SqlitePool, prefix: &str, target: i64) -> StoreResult<bool> {
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(StoreError::database)?;
    let current = current_version(&mut tx, prefix).await?;
    if current > LATEST_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: current,
            known: LATEST_VERSION,
        });
    }
    let Some(m) = MIGRATIONS
        .iter()
        .find(|m| m.version > current && m.version <= target)
    else {
        return Ok(false);
    };
    apply(&mut tx, prefix, m).await?;
    tx.commit().await.map_err(StoreError::database)?;
    tracing::info!(
        version = m.version,
        description = m.description,
        "applied migration"
    );
    Ok(true)
}

async fn current_version(conn: &mut SqliteConnection, prefix: &str) -> StoreResult<i64> {
    let setup = render(
        "CREATE TABLE IF NOT EXISTS {p}schema_migrations (
             version INTEGER PRIMARY KEY,
             description TEXT NOT NULL,
             applied_at INTEGER NOT NULL)",
        prefix,
    );
    sqlx::raw_sql(AssertSqlSafe(setup))
        .execute(&mut *conn)
        .await
        .map_err(StoreError::database)?;
    sqlx::query(AssertSqlSafe(render(
        "SELECT coalesce(max(version), 0) FROM {p}schema_migrations",
        prefix,
    )))
    .fetch_one(&mut *conn)
    .await
    .and_then(|row| row.try_get(0))
    .map_err(StoreError::database)
}

async fn apply(conn: &mut SqliteConnection, prefix: &str, m: &Migration) -> StoreResult<()> {
    let failed = |e: sqlx::Error| StoreError::Migration {
        version: m.version,
        reason: e.to_string(),
    };
    sqlx::raw_sql(AssertSqlSafe(render(m.sql, prefix)))
        .execute(&mut *conn)
        .await
        .map_err(failed)?;
    sqlx::query(AssertSqlSafe(render(
        "INSERT INTO {p}schema_migrations (version, description, applied_at) VALUES (?1, ?2, ?3)",
        prefix,
    )))
    .bind(m.version)
    .bind(m.description)
    .bind(chrono::Utc::now().timestamp_millis())
    .execute(&mut *conn)
    .await
    .map_err(failed)?;
    Ok(())
}
