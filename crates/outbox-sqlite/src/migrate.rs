//! Embedded, versioned schema migrations. Each version runs in one `BEGIN IMMEDIATE`
//! transaction, which takes SQLite's write lock first, so concurrent processes apply it once.

use outbox_core::{StoreError, StoreResult};
use sqlx::{AssertSqlSafe, Row, SqlitePool};

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
];

/// The schema version this build writes.
pub const LATEST_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

fn render(template: &str, prefix: &str) -> String {
    template.replace("{p}", prefix)
}

pub(crate) async fn migrate_to(pool: &SqlitePool, prefix: &str, target: i64) -> StoreResult<()> {
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(StoreError::database)?;
    let setup = render(
        "CREATE TABLE IF NOT EXISTS {p}schema_migrations (
             version INTEGER PRIMARY KEY,
             description TEXT NOT NULL,
             applied_at INTEGER NOT NULL)",
        prefix,
    );
    sqlx::raw_sql(AssertSqlSafe(setup))
        .execute(&mut *tx)
        .await
        .map_err(StoreError::database)?;
    let current: i64 = sqlx::query(AssertSqlSafe(render(
        "SELECT coalesce(max(version), 0) FROM {p}schema_migrations",
        prefix,
    )))
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
        let failed = |e: sqlx::Error| StoreError::Migration {
            version: m.version,
            reason: e.to_string(),
        };
        sqlx::raw_sql(AssertSqlSafe(render(m.sql, prefix)))
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        sqlx::query(AssertSqlSafe(render(
            "INSERT INTO {p}schema_migrations (version, description, applied_at) VALUES (?1, ?2, ?3)",
            prefix,
        )))
        .bind(m.version)
        .bind(m.description)
        .bind(chrono::Utc::now().timestamp_millis())
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
        tracing::info!(
            version = m.version,
            description = m.description,
            "applied migration"
        );
    }
    tx.commit().await.map_err(StoreError::database)
}
