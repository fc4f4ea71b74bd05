//! Opens the store a database URL names.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use outbox_core::{NewMessage, Store, redact};
use outbox_mysql::{MySqlConfig, MySqlStore};
use outbox_postgres::{PgConfig, PgStore};
use outbox_sqlite::{SqliteConfig, SqliteStore};
use sqlx::Connection;
use sqlx::mysql::{MySqlConnection, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use uuid::Uuid;

use crate::cli::ClaimArg;
use crate::config::StoreSettings;

/// Connects a pool, saying why when PostgreSQL cannot be reached. The pool retries a refused
/// or unreachable server until its acquire timeout and then reports only "pool timed out";
/// one direct connection attempt gives the reason (refused, unknown host, no such database).
pub async fn connect_postgres(options: PgPoolOptions, url: &str) -> anyhow::Result<PgPool> {
    match options.connect(url).await {
        Err(sqlx::Error::PoolTimedOut) => bail!(unreachable::<PgConnection>(url).await),
        connected => connected.with_context(|| format!("cannot connect to {}", redact(url))),
    }
}

/// [`connect_postgres`] for MySQL and MariaDB.
pub async fn connect_mysql(options: MySqlPoolOptions, url: &str) -> anyhow::Result<MySqlPool> {
    match options.connect(url).await {
        Err(sqlx::Error::PoolTimedOut) => bail!(unreachable::<MySqlConnection>(url).await),
        connected => connected.with_context(|| format!("cannot connect to {}", redact(url))),
    }
}

/// Why a pool could not connect to `url`, from one direct connection attempt.
async fn unreachable<C: Connection>(url: &str) -> String {
    let direct = tokio::time::timeout(Duration::from_secs(5), C::connect(url));
    let why = match direct.await {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            "no connection within the pool's timeout".to_owned()
        }
        Err(_) => "no answer within 5 s".to_owned(),
    };
    format!("cannot connect to {}: {why}", redact(url))
}

/// The URL forms `open` accepts, for error messages.
const SCHEMES: &str = "postgres://…, mysql://… or sqlite://PATH";

/// A store of any kind, for the commands that need the writer's side too.
#[derive(Clone)]
pub enum AnyStore {
    Postgres(PgStore),
    Sqlite(SqliteStore),
    MySql(MySqlStore),
}

impl AnyStore {
    /// Opens the store. With `eager`, connects now so that a wrong URL or a stopped server is
    /// reported at once; the relay opens lazily and waits for the database instead.
    pub async fn open(s: &StoreSettings, eager: bool) -> anyhow::Result<Self> {
        Self::open_with(s, eager, 4).await
    }

    /// Opens the store for a relay: a pool with a connection for each batch in delivery, and
    /// the claim mode asked for (PostgreSQL only; SQLite always leases).
    pub async fn open_relay(
        s: &StoreSettings,
        claim: Option<ClaimArg>,
        in_flight_batches: usize,
    ) -> anyhow::Result<Self> {
        let pool_size = u32::try_from(in_flight_batches + 2)
            .unwrap_or(u32::MAX)
            .max(4);
        match (Self::open_with(s, false, pool_size).await?, claim) {
            (Self::Postgres(pg), Some(claim)) => {
                Ok(Self::Postgres(pg.with_claim_mode(claim.into())))
            }
            (Self::Sqlite(_), Some(ClaimArg::Transaction)) => {
                bail!("--claim transaction needs PostgreSQL; SQLite relays always use leases")
            }
            (Self::MySql(_), Some(ClaimArg::Transaction)) => {
                bail!("--claim transaction needs PostgreSQL; MySQL relays always use leases")
            }
            (store, _) => Ok(store),
        }
    }

    /// Opens the store now, with a pool of `pool_size` connections.
    pub async fn open_sized(s: &StoreSettings, pool_size: u32) -> anyhow::Result<Self> {
        Self::open_with(s, true, pool_size).await
    }

    async fn open_with(s: &StoreSettings, eager: bool, pool_size: u32) -> anyhow::Result<Self> {
        let url = s.database_url.as_str();
        let shown = redact(url);
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
        match scheme {
            "postgres" | "postgresql" => {
                let mut config = PgConfig::default();
                if let Some(schema) = &s.schema {
                    config.schema = schema.clone();
                }
                if let Some(prefix) = &s.table_prefix {
                    config.table_prefix = prefix.clone();
                }
                let options = PgPoolOptions::new()
                    .max_connections(pool_size)
                    .acquire_timeout(Duration::from_secs(5));
                let pool = if eager {
                    connect_postgres(options, url).await?
                } else {
                    options
                        .connect_lazy(url)
                        .with_context(|| format!("invalid database URL {shown}"))?
                };
                Ok(Self::Postgres(PgStore::with_config(pool, config)?))
            }
            "sqlite" => {
                if s.schema.is_some() {
                    bail!("--schema applies to PostgreSQL only; use --table-prefix with SQLite");
                }
                let mut config = SqliteConfig::default();
                if let Some(prefix) = &s.table_prefix {
                    config.table_prefix = prefix.clone();
                }
                let store = SqliteStore::connect_with(url, config)
                    .await
                    .with_context(|| format!("cannot open {shown}"))?;
                Ok(Self::Sqlite(store))
            }
            "mysql" | "mariadb" => {
                if s.schema.is_some() {
                    bail!(
                        "--schema applies to PostgreSQL only; name the database in the URL and \
                         use --table-prefix with MySQL"
                    );
                }
                let mut config = MySqlConfig::default();
                if let Some(prefix) = &s.table_prefix {
                    config.table_prefix = prefix.clone();
                }
                // sqlx knows the scheme as mysql:// only.
                let url = format!("mysql:{}", &url[scheme.len() + 1..]);
                let options = MySqlPoolOptions::new()
                    .max_connections(pool_size)
                    .acquire_timeout(Duration::from_secs(5));
                let pool = if eager {
                    connect_mysql(options, &url).await?
                } else {
                    options
                        .connect_lazy(&url)
                        .with_context(|| format!("invalid database URL {shown}"))?
                };
                Ok(Self::MySql(MySqlStore::with_config(pool, config)?))
            }
            "" => bail!("database URL {shown:?} has no scheme; expected {SCHEMES}"),
            other => bail!("unknown database URL scheme {other:?}; expected {SCHEMES}"),
        }
    }

    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            Self::Postgres(s) => Arc::new(s.clone()),
            Self::Sqlite(s) => Arc::new(s.clone()),
            Self::MySql(s) => Arc::new(s.clone()),
        }
    }

    /// Enqueues `first` and then every chunk `next` returns until an empty one, all in one
    /// transaction: all of them or none (an error from `next` rolls back what was written).
    /// The store refuses a message over `max_bytes` or with a reserved header.
    pub async fn enqueue_stream(
        &self,
        first: Vec<NewMessage>,
        mut next: impl FnMut() -> anyhow::Result<Vec<NewMessage>>,
        max_bytes: usize,
    ) -> anyhow::Result<Vec<Uuid>> {
        let mut ids = Vec::new();
        let mut chunk = first;
        macro_rules! stream {
            ($s:expr) => {{
                let outbox = $s.outbox().clone().with_max_message_size(max_bytes);
                let mut tx = $s.pool().begin().await?;
                while !chunk.is_empty() {
                    outbox.enqueue_batch(&mut tx, &chunk).await?;
                    ids.extend(chunk.iter().map(NewMessage::id));
                    chunk = next()?;
                }
                tx.commit().await?;
            }};
        }
        match self {
            Self::Postgres(s) => stream!(s),
            Self::Sqlite(s) => stream!(s),
            Self::MySql(s) => stream!(s),
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_urls_are_shown_without_credentials() {
        use outbox_core::redact;
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact("postgres://u@h/db?password=secret"),
            "postgres://u@h/db?password=***"
        );
        assert_eq!(
            redact("host=h user=u password=secret"),
            "host=h user=u password=***"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }
}
