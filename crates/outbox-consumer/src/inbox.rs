//! The consumer's own database: where the inbox and the handler's effects commit together.

use std::time::Duration;

use async_trait::async_trait;
use outbox_mysql::MySqlStore;
use outbox_postgres::PgStore;
use outbox_sqlite::SqliteStore;
use sqlx::{MySql, Postgres, Sqlite, Transaction};
use uuid::Uuid;

/// A database with an inbox: PostgreSQL ([`PgStore`]), MySQL or MariaDB ([`MySqlStore`]) or
/// SQLite ([`SqliteStore`]). The store
/// must be migrated (`Store::migrate`) before a consumer uses it.
#[async_trait]
pub trait InboxStore: Clone + Send + Sync + 'static {
    /// The sqlx database of the store's transactions (`Postgres`, `MySql` or `Sqlite`), which the
    /// handler's effects are written through.
    type Db: sqlx::Database;

    /// Opens the transaction the inbox record and the handler's effects share.
    async fn begin(&self) -> Result<Transaction<'static, Self::Db>, sqlx::Error>;

    /// Records `message_id` for `consumer` in `tx`; false when it was processed before.
    async fn record(
        &self,
        tx: &mut Transaction<'static, Self::Db>,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool, sqlx::Error>;

    /// Forgets up to `limit` ids processed longer than `older_than` ago.
    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64, sqlx::Error>;
}

#[async_trait]
impl InboxStore for PgStore {
    type Db = Postgres;

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.pool().begin().await
    }

    async fn record(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool, sqlx::Error> {
        self.inbox().record(tx, consumer, message_id).await
    }

    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64, sqlx::Error> {
        self.inbox().purge(self.pool(), older_than, limit).await
    }
}

#[async_trait]
impl InboxStore for SqliteStore {
    type Db = Sqlite;

    /// `BEGIN IMMEDIATE` takes the write lock up front: a handler that reads before it writes
    /// never fails to upgrade its lock against another writer.
    async fn begin(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.pool().begin_with("BEGIN IMMEDIATE").await
    }

    async fn record(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool, sqlx::Error> {
        self.inbox().record(tx, consumer, message_id).await
    }

    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64, sqlx::Error> {
        self.inbox().purge(self.pool(), older_than, limit).await
    }
}

#[async_trait]
impl InboxStore for MySqlStore {
    type Db = MySql;

    async fn begin(&self) -> Result<Transaction<'static, MySql>, sqlx::Error> {
        self.pool().begin().await
    }

    async fn record(
        &self,
        tx: &mut Transaction<'static, MySql>,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool, sqlx::Error> {
        self.inbox().record(tx, consumer, message_id).await
    }

    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64, sqlx::Error> {
        self.inbox().purge(self.pool(), older_than, limit).await
    }
}
