//! Embedded, versioned schema migrations, recorded in `{prefix}schema_migrations`.
//!
//! MySQL commits every DDL statement on its own, so a migration cannot be one transaction.
//! Instead each statement of a migration can run again (`IF NOT EXISTS`, `INSERT IGNORE`), a
//! version is recorded only after all its statements ran, and migrating processes take turns
//! under a named lock (`GET_LOCK`) of the database and prefix: every version runs once, and a
//! migration cut short is finished by the next run.

use outbox_core::{StoreError, StoreResult};
use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, MySql, MySqlPool, Row};

struct Migration {
    version: i64,
    description: &'static str,
    sql: &'static str,
    /// What ends a statement at the end of a line: `;`, or `$$` in files that define
    /// routines, whose bodies hold semicolons.
    delimiter: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "messages, claim lock, inbox, paused topics, relay heartbeats",
        sql: include_str!("../migrations/0001_create.sql"),
        delimiter: ";",
    },
    Migration {
        version: 2,
        description: "enqueue from SQL: outbox_enqueue() and outbox_enqueue_bytes()",
        sql: include_str!("../migrations/0002_sql_enqueue.sql"),
        delimiter: "$$",
    },
];

/// The schema version this build writes.
pub const LATEST_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// How long a migration waits for another process's migration to finish.
const LOCK_WAIT_SECONDS: i64 = 60;

fn render(template: &str, prefix: &str) -> String {
    template.replace("{p}", prefix)
}

fn db(e: sqlx::Error) -> StoreError {
    StoreError::database(e)
}

/// The statements of a migration file: split at each `delimiter` that ends a line, comment
/// lines dropped.
fn statements(sql: &str, delimiter: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        let code = line.trim();
        if code.is_empty() || code.starts_with("--") {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if code.ends_with(delimiter) {
            let statement = current.trim().strip_suffix(delimiter).unwrap_or(&current);
            out.push(statement.trim().to_owned());
            current.clear();
        }
    }
    if !current.trim().is_empty() {
        out.push(current.trim().to_owned());
    }
    out
}

/// The version the schema is at, without creating anything: 0 when there is none.
pub(crate) async fn schema_version(pool: &MySqlPool, prefix: &str) -> StoreResult<i64> {
    let exists: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables \
         WHERE table_schema = DATABASE() AND table_name = ?",
    )
    .bind(format!("{prefix}schema_migrations"))
    .fetch_one(pool)
    .await
    .map_err(db)?;
    if exists == 0 {
        return Ok(0);
    }
    let sql = render(
        "SELECT CAST(coalesce(max(version), 0) AS SIGNED) FROM {p}schema_migrations",
        prefix,
    );
    sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .map_err(db)
}

/// Applies, in order, every migration up to `target` that the database lacks.
pub(crate) async fn migrate_to(pool: &MySqlPool, prefix: &str, target: i64) -> StoreResult<()> {
    let mut conn = pool.acquire().await.map_err(db)?;
    let lock = format!("outbox migrate {prefix}");
    let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(concat(DATABASE(), ' ', ?), ?)")
        .bind(&lock)
        .bind(LOCK_WAIT_SECONDS)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    if got != Some(1) {
        return Err(StoreError::Config(format!(
            "another process has been migrating this database for over {LOCK_WAIT_SECONDS} s"
        )));
    }
    let applied = apply_all(&mut conn, prefix, target).await;
    let released = sqlx::query("SELECT RELEASE_LOCK(concat(DATABASE(), ' ', ?))")
        .bind(&lock)
        .execute(&mut *conn)
        .await;
    applied?;
    released.map(drop).map_err(db)
}

async fn apply_all(conn: &mut PoolConnection<MySql>, prefix: &str, target: i64) -> StoreResult<()> {
    let current = current_version(conn, prefix).await?;
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
        apply(conn, prefix, m).await?;
        tracing::info!(
            version = m.version,
            description = m.description,
            "applied migration"
        );
    }
    Ok(())
}

async fn current_version(conn: &mut PoolConnection<MySql>, prefix: &str) -> StoreResult<i64> {
    let setup = render(
        "CREATE TABLE IF NOT EXISTS {p}schema_migrations (
             version BIGINT NOT NULL PRIMARY KEY,
             description VARCHAR(255) NOT NULL,
             applied_at BIGINT NOT NULL) ENGINE = InnoDB",
        prefix,
    );
    sqlx::raw_sql(AssertSqlSafe(setup))
        .execute(&mut **conn)
        .await
        .map_err(db)?;
    sqlx::query(AssertSqlSafe(render(
        "SELECT CAST(coalesce(max(version), 0) AS SIGNED) FROM {p}schema_migrations",
        prefix,
    )))
    .fetch_one(&mut **conn)
    .await
    .and_then(|row| row.try_get(0))
    .map_err(db)
}

async fn apply(conn: &mut PoolConnection<MySql>, prefix: &str, m: &Migration) -> StoreResult<()> {
    let failed = |e: sqlx::Error| StoreError::Migration {
        version: m.version,
        reason: e.to_string(),
    };
    for statement in statements(&render(m.sql, prefix), m.delimiter) {
        sqlx::raw_sql(AssertSqlSafe(statement))
            .execute(&mut **conn)
            .await
            .map_err(failed)?;
    }
    sqlx::query(AssertSqlSafe(render(
        "INSERT INTO {p}schema_migrations (version, description, applied_at) \
         VALUES (?, ?, CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED))",
        prefix,
    )))
    .bind(m.version)
    .bind(m.description)
    .execute(&mut **conn)
    .await
    .map_err(failed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::statements;

    #[test]
    fn a_file_splits_into_its_statements_without_comments() {
        let sql = "-- a comment; with a semicolon\nCREATE TABLE a (\n  x INT\n);\n\n\
                   INSERT IGNORE INTO a VALUES (1);\nSELECT 1";
        assert_eq!(
            statements(sql, ";"),
            vec![
                "CREATE TABLE a (\n  x INT\n)".to_owned(),
                "INSERT IGNORE INTO a VALUES (1)".to_owned(),
                "SELECT 1".to_owned(),
            ]
        );
        let routine =
            "CREATE FUNCTION f() RETURNS INT\nBEGIN\n  RETURN 1;\nEND $$\nDROP TABLE a $$";
        assert_eq!(
            statements(routine, "$$"),
            vec![
                "CREATE FUNCTION f() RETURNS INT\nBEGIN\n  RETURN 1;\nEND".to_owned(),
                "DROP TABLE a".to_owned(),
            ]
        );
    }
}
