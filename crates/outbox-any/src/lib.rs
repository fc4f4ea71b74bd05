//! # outbox-any
//!
//! The store of the transactional outbox that a database URL names, for programs that let
//! their operators choose the database: `postgres://…` (or `postgresql://`), `mysql://…` (or
//! `mariadb://`) and `sqlite://PATH` open [`outbox_postgres::PgStore`],
//! [`outbox_mysql::MySqlStore`] and [`outbox_sqlite::SqliteStore`]. The `outbox` command, its
//! benchmark and the payment demo all open their databases here.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use outbox_any::{AnyStore, OpenOptions};
//! use outbox_core::NewMessage;
//!
//! let store = AnyStore::open("sqlite://shop.db", &OpenOptions::new()).await?;
//! store.store().migrate().await?;
//! let mut tx = store.begin().await?;
//! // … your own writes, on tx.sql() …
//! let msg = NewMessage::json("orders", "order.created", &serde_json::json!({"id": 42}))?;
//! tx.enqueue(&msg.key("42")).await?;
//! tx.commit().await?; // also wakes a relay of this process at once
//! # Ok(()) }
//! ```
//!
//! ## Guarantees
//!
//! - **Same store, same rules.** What is opened is the store of the backend's own crate, with
//!   its checks: an [`AnyTx`] enqueues through that store's writer handle, so a message is
//!   refused for the same reasons (reserved headers, size limit) and commits or rolls back with
//!   the writes beside it.
//! - **Errors say why once.** A refused or unreachable server is reported with the reason of
//!   one direct connection attempt (the pool alone would say only that it timed out), and every
//!   URL in an error is shown with its password replaced ([`outbox_core::redact()`]).
//! - **Nothing is written by opening.** [`AnyStore::open`] connects (unless asked to connect
//!   lazily) but neither migrates nor checks the schema; call [`outbox_core::Store::migrate`]
//!   or [`outbox_core::Store::check_schema`] for that.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::{NewMessage, Refused, Store, StoreError, redact};
use outbox_mysql::{MySqlConfig, MySqlStore};
use outbox_postgres::{PgConfig, PgStore};
use outbox_sqlite::{SqliteConfig, SqliteStore};
use sqlx::mysql::MySqlPoolOptions;
use sqlx::pool::PoolOptions;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::{Connection, MySql, Pool, Postgres, Sqlite, Transaction};

pub use outbox_postgres::ClaimMode;

/// The URL forms [`AnyStore::open`] accepts, for error messages.
const SCHEMES: &str = "postgres://…, mysql://… or sqlite://PATH";

/// The database behind a store.
///
/// Deliberately exhaustive, like [`AnyStore`] and [`Tx`]: code that matches on them holds SQL
/// in each database's dialect, and a new backend should stop it compiling until that SQL is
/// written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// PostgreSQL: `postgres://` or `postgresql://`.
    Postgres,
    /// SQLite: `sqlite://PATH` or `sqlite::memory:`.
    Sqlite,
    /// MySQL or MariaDB: `mysql://` or `mariadb://`.
    MySql,
}

impl Backend {
    /// The backend a URL names, by its scheme.
    pub fn from_url(url: &str) -> Result<Self, OpenError> {
        let Some((scheme, _)) = url.split_once(':') else {
            return Err(OpenError::NoScheme { url: redact(url) });
        };
        match scheme {
            "postgres" | "postgresql" => Ok(Self::Postgres),
            "sqlite" => Ok(Self::Sqlite),
            "mysql" | "mariadb" => Ok(Self::MySql),
            "" => Err(OpenError::NoScheme { url: redact(url) }),
            other => Err(OpenError::UnknownScheme {
                scheme: other.to_owned(),
            }),
        }
    }

    /// A short lower-case name: `postgres`, `sqlite` or `mysql`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
            Self::MySql => "mysql",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Postgres => "PostgreSQL",
            Self::Sqlite => "SQLite",
            Self::MySql => "MySQL",
        })
    }
}

/// How [`AnyStore::open`] opens a store. Start from [`OpenOptions::new`] and change what you
/// need; new options keep their defaults for code written before them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Connections in the store's pool (default 4). A relay needs one per batch in delivery,
    /// plus two.
    pub max_connections: u32,
    /// How long a caller waits for a pooled connection before failing (default 5 s).
    pub acquire_timeout: Duration,
    /// The PostgreSQL schema holding the outbox tables (default `public`). Refused on the
    /// other backends, which have a table prefix only.
    pub schema: Option<String>,
    /// The prefix of the outbox's tables (default `outbox_`).
    pub table_prefix: Option<String>,
    /// Connect when first used rather than now (default: now). A relay opens lazily and waits
    /// for its database; a command opens eagerly so that a wrong URL is reported at once.
    /// SQLite always opens its file now.
    pub lazy: bool,
    /// Create the directory of a SQLite file when it is missing (default: no).
    pub create_dirs: bool,
    /// How a PostgreSQL relay holds its claims (default: the store's own). Other backends
    /// always lease, and refuse [`ClaimMode::Transaction`].
    pub claim_mode: Option<ClaimMode>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            max_connections: 4,
            acquire_timeout: Duration::from_secs(5),
            schema: None,
            table_prefix: None,
            lazy: false,
            create_dirs: false,
            claim_mode: None,
        }
    }
}

impl OpenOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`OpenOptions::max_connections`] (at least 1).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Sets [`OpenOptions::acquire_timeout`].
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Sets [`OpenOptions::schema`].
    pub fn schema(mut self, schema: Option<String>) -> Self {
        self.schema = schema;
        self
    }

    /// Sets [`OpenOptions::table_prefix`].
    pub fn table_prefix(mut self, prefix: Option<String>) -> Self {
        self.table_prefix = prefix;
        self
    }

    /// Sets [`OpenOptions::lazy`].
    pub fn lazy(mut self, lazy: bool) -> Self {
        self.lazy = lazy;
        self
    }

    /// Sets [`OpenOptions::create_dirs`].
    pub fn create_dirs(mut self, create: bool) -> Self {
        self.create_dirs = create;
        self
    }

    /// Sets [`OpenOptions::claim_mode`].
    pub fn claim_mode(mut self, mode: Option<ClaimMode>) -> Self {
        self.claim_mode = mode;
        self
    }
}

/// Why a store could not be opened. URLs in it are shown without their passwords.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The URL does not start with a scheme.
    #[error("database URL {url:?} has no scheme; expected {SCHEMES}")]
    NoScheme {
        /// The URL, redacted.
        url: String,
    },
    /// The scheme names no supported database.
    #[error("unknown database URL scheme {scheme:?}; expected {SCHEMES}")]
    UnknownScheme {
        /// The scheme, before the first `:`.
        scheme: String,
    },
    /// A schema was asked for on a backend without schemas.
    #[error("a schema applies to PostgreSQL only; use a table prefix on {backend}")]
    SchemaNeedsPostgres {
        /// The backend the URL names.
        backend: Backend,
    },
    /// Claims in a transaction were asked for on a backend that always leases.
    #[error("claims held in a transaction need PostgreSQL; {backend} relays always use leases")]
    ClaimModeNeedsPostgres {
        /// The backend the URL names.
        backend: Backend,
    },
    /// The server could not be reached, with the reason of a direct connection attempt.
    #[error("cannot connect to {url}: {reason}")]
    Unreachable {
        /// The URL, redacted.
        url: String,
        /// What the attempt said (refused, unknown host, bad password, no such database).
        reason: String,
    },
    /// The server was reached but the pool could not be set up.
    #[error("cannot connect to {url}")]
    Connect {
        /// The URL, redacted.
        url: String,
        /// What the driver said.
        #[source]
        source: sqlx::Error,
    },
    /// The URL could not be read.
    #[error("invalid database URL {url}")]
    InvalidUrl {
        /// The URL, redacted.
        url: String,
        /// What the driver said.
        #[source]
        source: sqlx::Error,
    },
    /// The store refused its configuration, or SQLite could not open the file.
    #[error("cannot open {url}")]
    Store {
        /// The URL, redacted.
        url: String,
        /// What the store said.
        #[source]
        source: StoreError,
    },
    /// The directory of a SQLite file could not be created.
    #[error("cannot create {dir}")]
    CreateDir {
        /// The directory.
        dir: String,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
}

/// Why a message could not be enqueued; roll the transaction back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnqueueError {
    /// The message breaks a rule of the outbox (a reserved header, over the size limit);
    /// nothing of the call was written.
    #[error(transparent)]
    Invalid(#[from] Refused),
    /// The database refused the statement.
    #[error(transparent)]
    Database(Box<dyn std::error::Error + Send + Sync>),
}

/// Converts a store's own enqueue error, whose variants are those of [`EnqueueError`].
macro_rules! enqueue_error {
    ($krate:ident) => {
        impl From<$krate::EnqueueError> for EnqueueError {
            fn from(e: $krate::EnqueueError) -> Self {
                match e {
                    $krate::EnqueueError::Invalid(refused) => Self::Invalid(refused),
                    other => Self::Database(Box::new(other)),
                }
            }
        }
    };
}
enqueue_error!(outbox_postgres);
enqueue_error!(outbox_sqlite);
enqueue_error!(outbox_mysql);

/// The store a URL names. Cheap to clone: clones share the pool. Match on it for the
/// backend's own store and pool (see [`Backend`] on why it is exhaustive).
#[derive(Clone, Debug)]
pub enum AnyStore {
    /// A PostgreSQL store.
    Postgres(PgStore),
    /// A SQLite store.
    Sqlite(SqliteStore),
    /// A MySQL or MariaDB store.
    MySql(MySqlStore),
}

impl AnyStore {
    /// Opens the store `url` names, as `opts` says.
    pub async fn open(url: &str, opts: &OpenOptions) -> Result<Self, OpenError> {
        let backend = Backend::from_url(url)?;
        if opts.schema.is_some() && backend != Backend::Postgres {
            return Err(OpenError::SchemaNeedsPostgres { backend });
        }
        if opts.claim_mode == Some(ClaimMode::Transaction) && backend != Backend::Postgres {
            return Err(OpenError::ClaimModeNeedsPostgres { backend });
        }
        match backend {
            Backend::Postgres => open_postgres(url, opts).await,
            Backend::Sqlite => open_sqlite(url, opts).await,
            Backend::MySql => open_mysql(url, opts).await,
        }
    }

    /// The database behind the store.
    pub fn backend(&self) -> Backend {
        match self {
            Self::Postgres(_) => Backend::Postgres,
            Self::Sqlite(_) => Backend::Sqlite,
            Self::MySql(_) => Backend::MySql,
        }
    }

    /// The store, for a relay, `migrate`, `status` and the dead letters.
    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            Self::Postgres(s) => Arc::new(s.clone()),
            Self::Sqlite(s) => Arc::new(s.clone()),
            Self::MySql(s) => Arc::new(s.clone()),
        }
    }

    /// The same store refusing messages over `bytes` (payload, key and headers together).
    pub fn with_max_message_size(self, bytes: usize) -> Self {
        match self {
            Self::Postgres(s) => Self::Postgres(s.with_max_message_size(bytes)),
            Self::Sqlite(s) => Self::Sqlite(s.with_max_message_size(bytes)),
            Self::MySql(s) => Self::MySql(s.with_max_message_size(bytes)),
        }
    }

    /// Wakes a relay of this process now rather than at its next poll. PostgreSQL relays
    /// are woken by the database itself, so there this does nothing.
    pub fn notify(&self) {
        match self {
            Self::Postgres(_) => {}
            Self::Sqlite(s) => s.notify(),
            Self::MySql(s) => s.notify(),
        }
    }

    /// The same outbox on a pool of its own, `max_connections` large: what a relay in another
    /// process would have.
    pub async fn separate(&self, max_connections: u32) -> Result<Self, OpenError> {
        let store = |source| OpenError::Store {
            url: format!("the {} outbox", self.backend()),
            source,
        };
        let connect = |source| OpenError::Connect {
            url: format!("the {} outbox", self.backend()),
            source,
        };
        Ok(match self {
            Self::Postgres(s) => {
                let pool = same_server(s.pool(), max_connections)
                    .await
                    .map_err(connect)?;
                let separate = PgStore::with_config(pool, s.config().clone()).map_err(store)?;
                Self::Postgres(separate.with_claim_mode(s.claim_mode()))
            }
            Self::Sqlite(s) => {
                let pool = same_server(s.pool(), max_connections)
                    .await
                    .map_err(connect)?;
                Self::Sqlite(SqliteStore::with_config(pool, s.config().clone()).map_err(store)?)
            }
            Self::MySql(s) => {
                let pool = same_server(s.pool(), max_connections)
                    .await
                    .map_err(connect)?;
                Self::MySql(MySqlStore::with_config(pool, s.config().clone()).map_err(store)?)
            }
        })
    }

    /// Starts a transaction in which to write your data and enqueue its messages.
    pub async fn begin(&self) -> Result<AnyTx, sqlx::Error> {
        let tx = match self {
            Self::Postgres(s) => Tx::Postgres(s.pool().begin().await?),
            Self::Sqlite(s) => Tx::Sqlite(s.pool().begin().await?),
            Self::MySql(s) => Tx::MySql(s.pool().begin().await?),
        };
        Ok(AnyTx {
            store: self.clone(),
            tx,
        })
    }
}

/// A transaction of an [`AnyStore`]: enqueue messages on it, run your own statements on
/// [`AnyTx::sql`], then [`AnyTx::commit`]. Dropped without a commit, it rolls back.
#[derive(Debug)]
pub struct AnyTx {
    store: AnyStore,
    tx: Tx,
}

/// The transaction of an [`AnyTx`], typed by its database, for statements of your own.
#[derive(Debug)]
pub enum Tx {
    /// On PostgreSQL.
    Postgres(Transaction<'static, Postgres>),
    /// On SQLite.
    Sqlite(Transaction<'static, Sqlite>),
    /// On MySQL or MariaDB.
    MySql(Transaction<'static, MySql>),
}

impl AnyTx {
    /// Adds one message to the outbox as part of this transaction.
    pub async fn enqueue(&mut self, msg: &NewMessage) -> Result<(), EnqueueError> {
        match (&self.store, &mut self.tx) {
            (AnyStore::Postgres(s), Tx::Postgres(t)) => s.outbox().enqueue(t, msg).await?,
            (AnyStore::Sqlite(s), Tx::Sqlite(t)) => s.outbox().enqueue(t, msg).await?,
            (AnyStore::MySql(s), Tx::MySql(t)) => s.outbox().enqueue(t, msg).await?,
            _ => unreachable!("a transaction is begun on its own store"),
        }
        Ok(())
    }

    /// Adds many messages as part of this transaction, in the slice's order: all or none.
    pub async fn enqueue_batch(&mut self, msgs: &[NewMessage]) -> Result<(), EnqueueError> {
        match (&self.store, &mut self.tx) {
            (AnyStore::Postgres(s), Tx::Postgres(t)) => s.outbox().enqueue_batch(t, msgs).await?,
            (AnyStore::Sqlite(s), Tx::Sqlite(t)) => s.outbox().enqueue_batch(t, msgs).await?,
            (AnyStore::MySql(s), Tx::MySql(t)) => s.outbox().enqueue_batch(t, msgs).await?,
            _ => unreachable!("a transaction is begun on its own store"),
        }
        Ok(())
    }

    /// The typed transaction, for your own statements beside the messages.
    pub fn sql(&mut self) -> &mut Tx {
        &mut self.tx
    }

    /// Commits, then wakes a relay of this process (see [`AnyStore::notify`]).
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self.tx {
            Tx::Postgres(t) => t.commit().await?,
            Tx::Sqlite(t) => t.commit().await?,
            Tx::MySql(t) => t.commit().await?,
        }
        self.store.notify();
        Ok(())
    }

    /// Rolls back: nothing written or enqueued in it remains.
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self.tx {
            Tx::Postgres(t) => t.rollback().await,
            Tx::Sqlite(t) => t.rollback().await,
            Tx::MySql(t) => t.rollback().await,
        }
    }
}

async fn open_postgres(url: &str, opts: &OpenOptions) -> Result<AnyStore, OpenError> {
    let mut config = PgConfig::default();
    if let Some(schema) = &opts.schema {
        config.schema = schema.clone();
    }
    if let Some(prefix) = &opts.table_prefix {
        config.table_prefix = prefix.clone();
    }
    let options = PgPoolOptions::new()
        .max_connections(opts.max_connections)
        .acquire_timeout(opts.acquire_timeout);
    let pool = connect(options, url, url, opts.lazy).await?;
    let store = PgStore::with_config(pool, config).map_err(|source| OpenError::Store {
        url: redact(url),
        source,
    })?;
    Ok(AnyStore::Postgres(match opts.claim_mode {
        Some(mode) => store.with_claim_mode(mode),
        None => store,
    }))
}

async fn open_sqlite(url: &str, opts: &OpenOptions) -> Result<AnyStore, OpenError> {
    let mut config = SqliteConfig::default();
    if let Some(prefix) = &opts.table_prefix {
        config.table_prefix = prefix.clone();
    }
    if opts.create_dirs {
        create_parent_dir(url)?;
    }
    let failed = |source| OpenError::Store {
        url: redact(url),
        source,
    };
    let options = SqliteStore::connect_options(url).map_err(failed)?;
    let pool = SqlitePoolOptions::new()
        .max_connections(opts.max_connections)
        .acquire_timeout(opts.acquire_timeout)
        .connect_with(options)
        .await
        .map_err(|e| failed(StoreError::database(e)))?;
    Ok(AnyStore::Sqlite(
        SqliteStore::with_config(pool, config).map_err(failed)?,
    ))
}

async fn open_mysql(url: &str, opts: &OpenOptions) -> Result<AnyStore, OpenError> {
    let mut config = MySqlConfig::default();
    if let Some(prefix) = &opts.table_prefix {
        config.table_prefix = prefix.clone();
    }
    // The driver knows the scheme as mysql:// only; errors still show the URL as given.
    let driver_url = match url.split_once(':') {
        Some(("mariadb", rest)) => format!("mysql:{rest}"),
        _ => url.to_owned(),
    };
    let options = MySqlPoolOptions::new()
        .max_connections(opts.max_connections)
        .acquire_timeout(opts.acquire_timeout);
    let pool = connect(options, &driver_url, url, opts.lazy).await?;
    let store = MySqlStore::with_config(pool, config).map_err(|source| OpenError::Store {
        url: redact(url),
        source,
    })?;
    Ok(AnyStore::MySql(store))
}

/// Creates the directory of the file a `sqlite://` URL names, when it has one.
fn create_parent_dir(url: &str) -> Result<(), OpenError> {
    let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    match path.rsplit_once('/').map(|(dir, _)| dir) {
        Some(dir) if !dir.is_empty() => {
            std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
                dir: dir.to_owned(),
                source,
            })
        }
        _ => Ok(()),
    }
}

fn invalid(url: &str, source: sqlx::Error) -> OpenError {
    OpenError::InvalidUrl {
        url: redact(url),
        source,
    }
}

fn connect_error(url: &str, source: sqlx::Error) -> OpenError {
    OpenError::Connect {
        url: redact(url),
        source,
    }
}

/// Connects a pool to `url` (as the driver knows it; errors show `shown` instead), now or,
/// with `lazy`, when first used.
async fn connect<DB: sqlx::Database>(
    options: PoolOptions<DB>,
    url: &str,
    shown: &str,
    lazy: bool,
) -> Result<Pool<DB>, OpenError> {
    if lazy {
        return options
            .connect_lazy(url)
            .map_err(|source| invalid(shown, source));
    }
    match options.connect(url).await {
        Err(sqlx::Error::PoolTimedOut) => Err(unreachable::<DB::Connection>(url, shown).await),
        connected => connected.map_err(|source| connect_error(shown, source)),
    }
}

/// A pool of its own, `max_connections` large, on the server and database of `pool`.
async fn same_server<DB: sqlx::Database>(
    pool: &Pool<DB>,
    max_connections: u32,
) -> Result<Pool<DB>, sqlx::Error> {
    PoolOptions::<DB>::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with((*pool.connect_options()).clone())
        .await
}

/// Why a pool could not connect to `url`, from one direct connection attempt. The pool
/// retries a refused or unreachable server until its acquire timeout and then reports only
/// that it timed out; one attempt gives the reason (refused, unknown host, no such database).
async fn unreachable<C: Connection>(url: &str, shown: &str) -> OpenError {
    let direct = tokio::time::timeout(Duration::from_secs(5), C::connect(url));
    let reason = match direct.await {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            "no connection within the pool's timeout".to_owned()
        }
        Err(_) => "no answer within 5 s".to_owned(),
    };
    OpenError::Unreachable {
        url: redact(shown),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_names_the_backend() {
        assert_eq!(
            Backend::from_url("postgres://h/db").unwrap(),
            Backend::Postgres
        );
        assert_eq!(
            Backend::from_url("postgresql://h/db").unwrap(),
            Backend::Postgres
        );
        assert_eq!(Backend::from_url("mariadb://h/db").unwrap(), Backend::MySql);
        assert_eq!(Backend::from_url("mysql://h/db").unwrap(), Backend::MySql);
        assert_eq!(
            Backend::from_url("sqlite::memory:").unwrap(),
            Backend::Sqlite
        );
        let e = Backend::from_url("oracle://u:secret@h").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown database URL scheme \"oracle\"; expected postgres://…, mysql://… or sqlite://PATH"
        );
        let e = Backend::from_url("nothing").unwrap_err();
        assert!(e.to_string().contains("has no scheme"), "{e}");
    }

    #[test]
    fn options_start_from_the_defaults() {
        let opts = OpenOptions::new().max_connections(0).lazy(true);
        assert_eq!(opts.max_connections, 1);
        assert!(opts.lazy);
        assert_eq!(opts.acquire_timeout, OpenOptions::default().acquire_timeout);
    }
}
