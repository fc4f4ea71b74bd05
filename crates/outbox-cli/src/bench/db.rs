//! The database side of the benchmark: the outbox store, opened and written through the
//! library's API (`outbox-any`), plus the raw-SQL baselines, which run against tables of the
//! outbox's own shape in the same database, so that every ratio compares like with like.

use std::sync::Arc;

use anyhow::bail;
use outbox_any::{AnyStore, Tx};
use outbox_core::{NewMessage, Store};
use outbox_mysql::MySqlStore;
use outbox_postgres::ClaimMode;
use sqlx::{AssertSqlSafe, Executor};

use crate::cli::ClaimArg;
use crate::config::StoreSettings;

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
    /// The business insert plus `enqueue` as a logical decoding message (PostgreSQL, for
    /// log-based capture): no row at all.
    WalMessage,
    /// The business insert plus `enqueue` of a row for table capture (PostgreSQL).
    CapturedRow,
}

impl WriteMode {
    /// How the outbox writes in this mode, when it writes for log-based capture.
    fn capture(self) -> Option<outbox_postgres::EnqueueMode> {
        match self {
            WriteMode::WalMessage => Some(outbox_postgres::EnqueueMode::WalMessage),
            WriteMode::CapturedRow => Some(outbox_postgres::EnqueueMode::CapturedRow),
            _ => None,
        }
    }
}

fn capture_writer(
    pg: &outbox_postgres::PgStore,
    mode: outbox_postgres::EnqueueMode,
) -> outbox_postgres::PgOutbox {
    pg.outbox().clone().with_enqueue_mode(mode)
}

/// The store under test and the names of the tables beside it.
#[derive(Clone)]
pub struct BenchDb {
    any: AnyStore,
    names: Names,
}

/// Qualified names of the outbox table and the benchmark's own tables.
#[derive(Clone)]
pub struct Names {
    messages: String,
    raw: String,
    orders: String,
}

impl Names {
    fn of(any: &AnyStore) -> Self {
        let (qualifier, prefix) = match any {
            AnyStore::Postgres(s) => (format!("{}.", s.config().schema), &s.config().table_prefix),
            AnyStore::Sqlite(s) => (String::new(), &s.config().table_prefix),
            AnyStore::MySql(s) => (String::new(), &s.config().table_prefix),
        };
        Self {
            messages: format!("{qualifier}{prefix}messages"),
            raw: format!("{qualifier}{prefix}bench_raw"),
            orders: format!("{qualifier}{prefix}bench_orders"),
        }
    }
}

impl BenchDb {
    /// Opens the store with a pool large enough for `clients` writers plus the relay. SQLite
    /// keeps the store's usual four connections: its writers take turns on one file anyway.
    pub async fn open(s: &StoreSettings, clients: usize, claim: ClaimArg) -> anyhow::Result<Self> {
        let pool_size = match outbox_any::Backend::from_url(&s.database_url)? {
            outbox_any::Backend::Sqlite => 4,
            _ => u32::try_from(clients + 6).unwrap_or(u32::MAX),
        };
        let any = crate::store::open_sized(s, pool_size, claim).await?;
        let names = Names::of(&any);
        Ok(Self { any, names })
    }

    pub fn claim_mode(&self) -> &'static str {
        match &self.any {
            AnyStore::Postgres(store) if store.claim_mode() == ClaimMode::Transaction => {
                "transaction"
            }
            _ => "lease",
        }
    }

    pub fn backend(&self) -> &'static str {
        self.any.backend().name()
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.any.store()
    }

    /// A store of the same outbox on a pool of its own, `connections` large: what a relay in
    /// another process would have, so that relays of one run do not queue for one pool.
    pub async fn separate_store(&self, connections: u32) -> anyhow::Result<Arc<dyn Store>> {
        Ok(self.any.separate(connections).await?.store())
    }

    fn names(&self) -> &Names {
        &self.names
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
        let statements = match &self.any {
            AnyStore::Postgres(_) => vec![
                format!("DROP TABLE IF EXISTS {}, {}", n.raw, n.orders),
                format!("CREATE TABLE {} (LIKE {} INCLUDING ALL)", n.raw, n.messages),
                format!(
                    "CREATE TABLE {} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
                     customer text NOT NULL, amount numeric(12,2) NOT NULL, \
                     created_at timestamptz NOT NULL DEFAULT now())",
                    n.orders
                ),
            ],
            AnyStore::Sqlite(_) => vec![
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
            AnyStore::MySql(_) => vec![
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
        let AnyStore::Sqlite(store) = &self.any else {
            unreachable!("SQLite only")
        };
        let names = self.names();
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
        match &self.any {
            AnyStore::Postgres(_) => {
                self.execute(&format!("VACUUM ANALYZE {}", n.messages))
                    .await
            }
            AnyStore::Sqlite(_) => Ok(()),
            AnyStore::MySql(_) => self.execute(&format!("ANALYZE TABLE {}", n.messages)).await,
        }
    }

    async fn execute(&self, sql: &str) -> anyhow::Result<()> {
        let sql = AssertSqlSafe(sql.to_owned());
        match &self.any {
            AnyStore::Postgres(store) => {
                store.pool().execute(sql).await?;
            }
            AnyStore::Sqlite(store) => {
                store.pool().execute(sql).await?;
            }
            AnyStore::MySql(store) => {
                store.pool().execute(sql).await?;
            }
        }
        Ok(())
    }

    /// One writer transaction: a business row, and per `mode` an outbox message.
    pub async fn write(&self, mode: WriteMode, msg: &NewMessage) -> anyhow::Result<()> {
        let n = self.names();
        let customer = msg.key_ref().unwrap_or("anonymous");
        let mut tx = self.any.begin().await?;
        match tx.sql() {
            Tx::Postgres(t) => {
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {} (customer, amount) VALUES ($1, $2::numeric)",
                    n.orders
                )))
                .bind(customer)
                .bind("12.50")
                .execute(&mut **t)
                .await?;
                if mode == WriteMode::RawRow {
                    pg_raw_insert(t, &n.raw, msg).await?;
                }
            }
            Tx::Sqlite(t) => {
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {} (customer, amount, created_at) VALUES (?1, '12.50', ?2)",
                    n.orders
                )))
                .bind(customer)
                .bind(chrono::Utc::now().timestamp_millis())
                .execute(&mut **t)
                .await?;
                if mode == WriteMode::RawRow {
                    sqlite_raw_insert(t, &n.raw, msg).await?;
                }
            }
            Tx::MySql(t) => {
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {} (customer, amount) VALUES (?, 12.50)",
                    n.orders
                )))
                .bind(customer)
                .execute(&mut **t)
                .await?;
                if mode == WriteMode::RawRow {
                    mysql_raw_insert(t, &n.raw, msg).await?;
                }
            }
        }
        match (mode, mode.capture(), tx.sql(), &self.any) {
            (WriteMode::Outbox, ..) => tx.enqueue(msg).await?,
            (_, Some(capture), Tx::Postgres(t), AnyStore::Postgres(pg)) => {
                capture_writer(pg, capture).enqueue(t, msg).await?;
            }
            (_, Some(_), _, _) => bail!("log-based capture needs PostgreSQL"),
            _ => {}
        }
        tx.commit().await?;
        Ok(())
    }

    /// The PostgreSQL store under test, for log-based capture.
    pub fn postgres(&self) -> anyhow::Result<&outbox_postgres::PgStore> {
        match &self.any {
            AnyStore::Postgres(pg) => Ok(pg),
            _ => bail!("the capture scenario needs PostgreSQL"),
        }
    }

    /// Writes a batch for log-based capture in one transaction, as logical messages or as
    /// captured rows (the capture prefill).
    pub async fn emit_batch(
        &self,
        msgs: &[NewMessage],
        mode: outbox_postgres::EnqueueMode,
    ) -> anyhow::Result<()> {
        let pg = self.postgres()?;
        let mut tx = pg.pool().begin().await?;
        capture_writer(pg, mode)
            .enqueue_batch(&mut tx, msgs)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Enqueues a batch in one transaction (prefill).
    pub async fn enqueue_batch(&self, msgs: &[NewMessage]) -> anyhow::Result<()> {
        let mut tx = self.any.begin().await?;
        tx.enqueue_batch(msgs).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Refreshes the outbox's statistics after a prefill, as [`Self::copy_to_raw`] does, so
    /// that every drain of a run starts from the same kind of plan.
    pub async fn analyze(&self) -> anyhow::Result<()> {
        match &self.any {
            AnyStore::Postgres(_) => {
                self.execute(&format!("VACUUM ANALYZE {}", self.names.messages))
                    .await
            }
            AnyStore::Sqlite(_) => self.execute("ANALYZE").await,
            AnyStore::MySql(_) => {
                self.execute(&format!("ANALYZE TABLE {}", self.names.messages))
                    .await
            }
        }
    }

    /// Copies the prefilled outbox into the raw table, and refreshes both tables' statistics
    /// so that neither drain starts from a worse plan than the other.
    pub async fn copy_to_raw(&self) -> anyhow::Result<()> {
        let n = self.names().clone();
        match &self.any {
            AnyStore::Postgres(_) => {
                self.execute(&format!(
                    "INSERT INTO {} OVERRIDING SYSTEM VALUE SELECT * FROM {}",
                    n.raw, n.messages
                ))
                .await?;
                self.execute(&format!("VACUUM ANALYZE {}, {}", n.raw, n.messages))
                    .await
            }
            AnyStore::Sqlite(_) => {
                self.execute(&format!(
                    "INSERT INTO {} SELECT * FROM {}",
                    n.raw, n.messages
                ))
                .await?;
                self.execute("ANALYZE").await
            }
            AnyStore::MySql(_) => {
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
        let rows = match &self.any {
            AnyStore::Postgres(store) => sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {raw} WHERE seq IN (SELECT seq FROM {raw} \
                 WHERE status IN ('pending', 'in_flight') AND available_at <= now() \
                 ORDER BY available_at, seq LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING *"
            )))
            .bind(limit as i64)
            .fetch_all(store.pool())
            .await?
            .len(),
            AnyStore::Sqlite(store) => sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {raw} WHERE seq IN (SELECT seq FROM {raw} \
                 WHERE status IN ('pending', 'in_flight') AND available_at <= ?2 \
                 ORDER BY available_at, seq LIMIT ?1) RETURNING *"
            )))
            .bind(limit as i64)
            .bind(chrono::Utc::now().timestamp_millis())
            .fetch_all(store.pool())
            .await?
            .len(),
            AnyStore::MySql(store) => mysql_raw_drain(store, raw, limit).await?,
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
