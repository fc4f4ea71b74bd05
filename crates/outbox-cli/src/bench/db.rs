//! The database side of the benchmark: the outbox store plus the raw-SQL baselines, which run
//! against tables of the outbox's own shape in the same database, so that every ratio compares
//! like with like.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use outbox_core::{NewMessage, Store};
use outbox_mysql::MySqlStore;
use outbox_postgres::{ClaimMode, PgConfig, PgStore};
use outbox_sqlite::{SqliteConfig, SqliteStore};
use sqlx::mysql::MySqlPoolOptions;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::{AssertSqlSafe, Executor};

use crate::cli::ClaimArg;
use crate::config::StoreSettings;
use outbox_core::redact;

/// What a writer transaction holds besides the business row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// The business insert alone.
    Alone,
    /// The business insert plus `enqueue` of one outbox message.
    Outbox,
    /// The business insert plus a plain INSERT into a table of the outbox's shape: the raw-SQL
    /// cost of an extra row and round trip, which no outbox can avoid.
    RawRow,
}

#[derive(Clone)]
pub enum BenchDb {
    Postgres { store: PgStore, names: Names },
    Sqlite { store: SqliteStore, names: Names },
    MySql { store: MySqlStore, names: Names },
}

/// Qualified names of the outbox table and the benchmark's own tables.
#[derive(Clone)]
pub struct Names {
    messages: String,
    raw: String,
    orders: String,
}

impl Names {
    fn new(qualifier: &str, prefix: &str) -> Self {
        Self {
            messages: format!("{qualifier}{prefix}messages"),
            raw: format!("{qualifier}{prefix}bench_raw"),
            orders: format!("{qualifier}{prefix}bench_orders"),
        }
    }
}

impl BenchDb {
    /// Opens the store with a pool large enough for `clients` writers plus the relay.
    pub async fn open(s: &StoreSettings, clients: usize, claim: ClaimArg) -> anyhow::Result<Self> {
        let url = s.database_url.as_str();
        let shown = redact(url);
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut config = PgConfig::default();
            if let Some(schema) = &s.schema {
                config.schema = schema.clone();
            }
            if let Some(prefix) = &s.table_prefix {
                config.table_prefix = prefix.clone();
            }
            let options = PgPoolOptions::new()
                .max_connections(clients as u32 + 6)
                .acquire_timeout(Duration::from_secs(10));
            let pool = crate::store::connect_postgres(options, url).await?;
            let names = Names::new(&format!("{}.", config.schema), &config.table_prefix);
            let store = PgStore::with_config(pool, config)?.with_claim_mode(claim.into());
            return Ok(Self::Postgres { store, names });
        }
        if url.starts_with("sqlite:") {
            if s.schema.is_some() {
                bail!("--schema applies to PostgreSQL only; use --table-prefix with SQLite");
            }
            let mut config = SqliteConfig::default();
            if let Some(prefix) = &s.table_prefix {
                config.table_prefix = prefix.clone();
            }
            let names = Names::new("", &config.table_prefix);
            let store = SqliteStore::connect_with(url, config)
                .await
                .with_context(|| format!("cannot open {shown}"))?;
            return Ok(Self::Sqlite { store, names });
        }
        if url.starts_with("mysql:") || url.starts_with("mariadb:") {
            let crate::store::AnyStore::MySql(store) =
                crate::store::AnyStore::open_sized(s, clients as u32 + 6).await?
            else {
                unreachable!("a MySQL URL opens the MySQL store")
            };
            let names = Names::new("", &store.config().table_prefix);
            return Ok(Self::MySql { store, names });
        }
        bail!("outbox bench runs on postgres://…, mysql://… or sqlite://PATH, not {shown}")
    }

    pub fn claim_mode(&self) -> &'static str {
        match self {
            Self::Postgres { store, .. } if store.claim_mode() == ClaimMode::Transaction => {
                "transaction"
            }
            _ => "lease",
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Self::Postgres { .. } => "postgres",
            Self::Sqlite { .. } => "sqlite",
            Self::MySql { .. } => "mysql",
        }
    }

    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            Self::Postgres { store, .. } => Arc::new(store.clone()),
            Self::Sqlite { store, .. } => Arc::new(store.clone()),
            Self::MySql { store, .. } => Arc::new(store.clone()),
        }
    }

    /// A store of the same outbox on a pool of its own, `connections` large: what a relay in
    /// another process would have, so that relays of one run do not queue for one pool.
    pub async fn separate_store(&self, connections: u32) -> anyhow::Result<Arc<dyn Store>> {
        let timeout = Duration::from_secs(10);
        Ok(match self {
            Self::Postgres { store, .. } => {
                let options = store.pool().connect_options();
                let pool = PgPoolOptions::new()
                    .max_connections(connections)
                    .acquire_timeout(timeout)
                    .connect_with((*options).clone())
                    .await?;
                let separate = PgStore::with_config(pool, store.config().clone())?;
                Arc::new(separate.with_claim_mode(store.claim_mode()))
            }
            Self::Sqlite { store, .. } => {
                let options = store.pool().connect_options();
                let pool = SqlitePoolOptions::new()
                    .max_connections(connections)
                    .acquire_timeout(timeout)
                    .connect_with((*options).clone())
                    .await?;
                Arc::new(SqliteStore::with_config(pool, store.config().clone())?)
            }
            Self::MySql { store, .. } => {
                let options = store.pool().connect_options();
                let pool = MySqlPoolOptions::new()
                    .max_connections(connections)
                    .acquire_timeout(timeout)
                    .connect_with((*options).clone())
                    .await?;
                Arc::new(MySqlStore::with_config(pool, store.config().clone())?)
            }
        })
    }

    fn names(&self) -> &Names {
        match self {
            Self::Postgres { names, .. }
            | Self::Sqlite { names, .. }
            | Self::MySql { names, .. } => names,
        }
    }

    /// Migrates, refuses an outbox that holds anything (the benchmark deletes what it drains),
    /// and creates the business and raw tables afresh.
    pub async fn prepare(&self) -> anyhow::Result<()> {
        self.store().migrate().await?;
        let counts = self.store().status().await?;
        let held = counts.pending + counts.in_flight + counts.delivered + counts.dead;
        if held > 0 {
            bail!(
                "the outbox holds {held} messages; outbox bench drains and deletes messages, \
                 so run it on a scratch database"
            );
        }
        let n = self.names().clone();
        let statements = match self {
            Self::Postgres { .. } => vec![
                format!("DROP TABLE IF EXISTS {}, {}", n.raw, n.orders),
                format!("CREATE TABLE {} (LIKE {} INCLUDING ALL)", n.raw, n.messages),
                format!(
                    "CREATE TABLE {} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
                     customer text NOT NULL, amount numeric(12,2) NOT NULL, \
                     created_at timestamptz NOT NULL DEFAULT now())",
                    n.orders
                ),
            ],
            Self::Sqlite { .. } => vec![
                format!("DROP TABLE IF EXISTS {}", n.raw),
                format!("DROP TABLE IF EXISTS {}", n.orders),
                format!(
                    "CREATE TABLE {} (id INTEGER PRIMARY KEY AUTOINCREMENT, \
                     customer TEXT NOT NULL, amount TEXT NOT NULL, created_at INTEGER NOT NULL)",
                    n.orders
                ),
            ]
            .into_iter()
            .chain(self.sqlite_raw_ddl().await?)
            .collect(),
            Self::MySql { .. } => vec![
                format!("DROP TABLE IF EXISTS {}, {}", n.raw, n.orders),
                format!("CREATE TABLE {} LIKE {}", n.raw, n.messages),
                format!(
                    "CREATE TABLE {} (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, \
                     customer VARCHAR(255) NOT NULL, amount DECIMAL(12,2) NOT NULL, \
                     created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)) \
                     ENGINE = InnoDB",
                    n.orders
                ),
            ],
        };
        for sql in statements {
            self.execute(&sql).await?;
        }
        Ok(())
    }

    /// SQLite has no `CREATE TABLE … LIKE`: the raw table and its indexes are the outbox's own
    /// DDL, renamed.
    async fn sqlite_raw_ddl(&self) -> anyhow::Result<Vec<String>> {
        let Self::Sqlite { store, names } = self else {
            unreachable!("SQLite only")
        };
        let ddl: Vec<String> = sqlx::query_scalar(
            "SELECT sql FROM sqlite_master WHERE tbl_name = ?1 AND sql IS NOT NULL \
             ORDER BY type = 'index'",
        )
        .bind(&names.messages)
        .fetch_all(store.pool())
        .await?;
        Ok(ddl
            .into_iter()
            .map(|sql| sql.replace(&names.messages, &names.raw))
            .collect())
    }

    /// Drops the benchmark's tables and empties the outbox it filled.
    pub async fn cleanup(&self) -> anyhow::Result<()> {
        let n = self.names().clone();
        self.execute(&format!("DROP TABLE IF EXISTS {}", n.raw))
            .await?;
        self.execute(&format!("DROP TABLE IF EXISTS {}", n.orders))
            .await?;
        self.clear().await
    }

    /// Empties the outbox and the benchmark tables between scenarios.
    pub async fn clear(&self) -> anyhow::Result<()> {
        let n = self.names().clone();
        for table in [&n.messages, &n.raw, &n.orders] {
            self.execute(&format!("DELETE FROM {table}")).await.ok();
        }
        // The next scenario starts from the state autovacuum keeps a queue table in, not from
        // the dead rows of the last one.
        match self {
            Self::Postgres { .. } => {
                self.execute(&format!("VACUUM ANALYZE {}", n.messages))
                    .await
            }
            Self::Sqlite { .. } => Ok(()),
            Self::MySql { .. } => self.execute(&format!("ANALYZE TABLE {}", n.messages)).await,
        }
    }

    async fn execute(&self, sql: &str) -> anyhow::Result<()> {
        match self {
            Self::Postgres { store, .. } => {
                store.pool().execute(AssertSqlSafe(sql.to_owned())).await?;
            }
            Self::Sqlite { store, .. } => {
                store.pool().execute(AssertSqlSafe(sql.to_owned())).await?;
            }
            Self::MySql { store, .. } => {
                store.pool().execute(AssertSqlSafe(sql.to_owned())).await?;
            }
        }
        Ok(())
    }

    /// One writer transaction: a business row, and per `mode` an outbox message.
    pub async fn write(&self, mode: WriteMode, msg: &NewMessage) -> anyhow::Result<()> {
        let n = self.names();
        match self {
            Self::Postgres { store, .. } => {
                let mut tx = store.pool().begin().await?;
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {} (customer, amount) VALUES ($1, $2::numeric)",
                    n.orders
                )))
                .bind(msg.key_ref().unwrap_or("anonymous"))
                .bind("12.50")
                .execute(&mut *tx)
                .await?;
                match mode {
                    WriteMode::Alone => {}
                    WriteMode::Outbox => store.outbox().enqueue(&mut tx, msg).await?,
                    WriteMode::RawRow => pg_raw_insert(&mut tx, &n.raw, msg).await?,
                }
                tx.commit().await?;
            }
            Self::Sqlite { store, .. } => {
                let mut tx = store.pool().begin().await?;
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {} (customer, amount, created_at) VALUES (?1, '12.50', ?2)",
                    n.orders
                )))
                .bind(msg.key_ref().unwrap_or("anonymous"))
                .bind(chrono::Utc::now().timestamp_millis())
                .execute(&mut *tx)
                .await?;
                match mode {
                    WriteMode::Alone => {}
                    WriteMode::Outbox => store.outbox().enqueue(&mut tx, msg).await?,
                    WriteMode::RawRow => sqlite_raw_insert(&mut tx, &n.raw, msg).await?,
                }
                tx.commit().await?;
                if mode == WriteMode::Outbox {
                    store.notify();
                }
            }
            Self::MySql { store, .. } => {
                let mut tx = store.pool().begin().await?;
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {} (customer, amount) VALUES (?, 12.50)",
                    n.orders
                )))
                .bind(msg.key_ref().unwrap_or("anonymous"))
                .execute(&mut *tx)
                .await?;
                match mode {
                    WriteMode::Alone => {}
                    WriteMode::Outbox => store.outbox().enqueue(&mut tx, msg).await?,
                    WriteMode::RawRow => mysql_raw_insert(&mut tx, &n.raw, msg).await?,
                }
                tx.commit().await?;
                if mode == WriteMode::Outbox {
                    store.notify();
                }
            }
        }
        Ok(())
    }

    /// Enqueues a batch in one transaction (prefill).
    pub async fn enqueue_batch(&self, msgs: &[NewMessage]) -> anyhow::Result<()> {
        match self {
            Self::Postgres { store, .. } => {
                let mut tx = store.pool().begin().await?;
                store.outbox().enqueue_batch(&mut tx, msgs).await?;
                tx.commit().await?;
            }
            Self::Sqlite { store, .. } => {
                let mut tx = store.pool().begin().await?;
                store.outbox().enqueue_batch(&mut tx, msgs).await?;
                tx.commit().await?;
            }
            Self::MySql { store, .. } => {
                let mut tx = store.pool().begin().await?;
                store.outbox().enqueue_batch(&mut tx, msgs).await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Refreshes the outbox's statistics after a prefill, as [`Self::copy_to_raw`] does, so
    /// that every drain of a run starts from the same kind of plan.
    pub async fn analyze(&self) -> anyhow::Result<()> {
        match self {
            Self::Postgres { names, .. } => {
                self.execute(&format!("VACUUM ANALYZE {}", names.messages))
                    .await
            }
            Self::Sqlite { .. } => self.execute("ANALYZE").await,
            Self::MySql { names, .. } => {
                self.execute(&format!("ANALYZE TABLE {}", names.messages))
                    .await
            }
        }
    }

    /// Copies the prefilled outbox into the raw table, and refreshes both tables' statistics
    /// so that neither drain starts from a worse plan than the other.
    pub async fn copy_to_raw(&self) -> anyhow::Result<()> {
        let n = self.names().clone();
        match self {
            Self::Postgres { .. } => {
                self.execute(&format!(
                    "INSERT INTO {} OVERRIDING SYSTEM VALUE SELECT * FROM {}",
                    n.raw, n.messages
                ))
                .await?;
                self.execute(&format!("VACUUM ANALYZE {}, {}", n.raw, n.messages))
                    .await
            }
            Self::Sqlite { .. } => {
                self.execute(&format!(
                    "INSERT INTO {} SELECT * FROM {}",
                    n.raw, n.messages
                ))
                .await?;
                self.execute("ANALYZE").await
            }
            Self::MySql { .. } => {
                // The generated column is computed, never copied.
                let columns = "seq, id, topic, type, msg_key, msg_partition, payload, \
                     content_type, headers, created_at, available_at, status, attempts, \
                     last_error, locked_by, delivered_at, dead_at";
                self.execute(&format!(
                    "INSERT INTO {} ({columns}) SELECT {columns} FROM {}",
                    n.raw, n.messages
                ))
                .await?;
                self.execute(&format!("ANALYZE TABLE {}, {}", n.raw, n.messages))
                    .await
            }
        }
    }

    /// The raw-SQL drain limit: claim the oldest `limit` rows and delete them in one
    /// statement, returning every column to the client. Returns how many rows it took.
    pub async fn raw_drain_batch(&self, limit: usize) -> anyhow::Result<usize> {
        let raw = &self.names().raw;
        let rows = match self {
            Self::Postgres { store, .. } => sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {raw} WHERE seq IN (SELECT seq FROM {raw} \
                 WHERE status IN ('pending', 'in_flight') AND available_at <= now() \
                 ORDER BY available_at, seq LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING *"
            )))
            .bind(limit as i64)
            .fetch_all(store.pool())
            .await?
            .len(),
            Self::Sqlite { store, .. } => sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {raw} WHERE seq IN (SELECT seq FROM {raw} \
                 WHERE status IN ('pending', 'in_flight') AND available_at <= ?2 \
                 ORDER BY available_at, seq LIMIT ?1) RETURNING *"
            )))
            .bind(limit as i64)
            .bind(chrono::Utc::now().timestamp_millis())
            .fetch_all(store.pool())
            .await?
            .len(),
            Self::MySql { store, .. } => mysql_raw_drain(store, raw, limit).await?,
        };
        Ok(rows)
    }
}

async fn pg_raw_insert(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    raw: &str,
    msg: &NewMessage,
) -> anyhow::Result<()> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {raw} (id, topic, type, key, partition, payload, content_type, headers) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb)"
    )))
    .bind(msg.id())
    .bind(msg.topic())
    .bind(msg.message_type())
    .bind(msg.key_ref())
    .bind(msg.partition())
    .bind(msg.payload())
    .bind(msg.content_type())
    .bind(msg.headers_json())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn sqlite_raw_insert(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    raw: &str,
    msg: &NewMessage,
) -> anyhow::Result<()> {
    let now = chrono::Utc::now().timestamp_millis();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {raw} (id, topic, type, key, partition, payload, content_type, headers, \
         created_at, available_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)"
    )))
    .bind(msg.id().to_string())
    .bind(msg.topic().to_owned())
    .bind(msg.message_type().to_owned())
    .bind(msg.key_ref().map(str::to_owned))
    .bind(msg.partition())
    .bind(msg.payload().to_vec())
    .bind(msg.content_type().to_owned())
    .bind(msg.headers_json())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn mysql_raw_insert(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    raw: &str,
    msg: &NewMessage,
) -> anyhow::Result<()> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {raw} (id, topic, type, msg_key, msg_partition, payload, content_type, \
         headers, created_at, available_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, \
         CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED), CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED))"
    )))
    .bind(msg.id().to_string())
    .bind(msg.topic().to_owned())
    .bind(msg.message_type().to_owned())
    .bind(msg.key_ref().map(str::to_owned))
    .bind(msg.partition())
    .bind(msg.payload().to_vec())
    .bind(msg.content_type().to_owned())
    .bind(msg.headers_json())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// MySQL has no `DELETE … RETURNING`: the raw loop reads the oldest rows with their locks,
/// every column to the client, and deletes them in the same transaction.
async fn mysql_raw_drain(store: &MySqlStore, raw: &str, limit: usize) -> anyhow::Result<usize> {
    use sqlx::Row;
    let mut tx = store.pool().begin().await?;
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT * FROM {raw} WHERE ready_at <= CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED) \
         ORDER BY ready_at, seq LIMIT ? FOR UPDATE SKIP LOCKED"
    )))
    .bind(limit as i64)
    .fetch_all(&mut *tx)
    .await?;
    if !rows.is_empty() {
        let seqs: Vec<i64> = rows
            .iter()
            .map(|r| r.try_get("seq"))
            .collect::<Result<_, _>>()?;
        let marks = vec!["?"; seqs.len()].join(", ");
        let mut delete = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {raw} WHERE seq IN ({marks})"
        )));
        for seq in seqs {
            delete = delete.bind(seq);
        }
        delete.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(rows.len())
}
