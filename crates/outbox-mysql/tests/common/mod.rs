//! Test fixtures on the local MariaDB or MySQL (`OUTBOX_TEST_MYSQL_URL`, default
//! `mysql://root@127.0.0.1:3306`): a database of its own per test.

#![allow(dead_code)]

use std::sync::Arc;

use async_trait::async_trait;
use outbox_core::{NewMessage, Store};
use outbox_mysql::MySqlStore;
use outbox_testkit::{Backend, Fixture, OpenTx};
use sqlx::mysql::MySqlPoolOptions;
use sqlx::{AssertSqlSafe, MySql};

pub fn server_url() -> String {
    std::env::var("OUTBOX_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// The test server's host and port, for the `mysql` client.
pub fn host_port() -> (String, String) {
    let url = server_url();
    let host_port = url
        .rsplit('@')
        .next()
        .unwrap_or("127.0.0.1:3306")
        .to_owned();
    match host_port.split_once(':') {
        Some((h, p)) => (h.to_owned(), p.to_owned()),
        None => (host_port, "3306".to_owned()),
    }
}

/// A store in a new, migrated database.
pub async fn migrated() -> anyhow::Result<MySqlDb> {
    let db = fresh().await?;
    db.store.migrate().await?;
    Ok(db)
}

/// A store in a new database, not yet migrated.
pub async fn fresh() -> anyhow::Result<MySqlDb> {
    let name = format!("t_{}", uuid::Uuid::now_v7().simple());
    let admin = MySqlPoolOptions::new()
        .max_connections(1)
        .connect(&server_url())
        .await?;
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await?;
    let pool = MySqlPoolOptions::new()
        // Four relays, each with two batches in delivery, and the test's writers.
        .max_connections(16)
        .connect(&format!("{}/{name}", server_url()))
        .await?;
    Ok(MySqlDb {
        store: MySqlStore::new(pool),
        admin,
        name,
    })
}

pub struct MySqlDb {
    pub store: MySqlStore,
    admin: sqlx::MySqlPool,
    pub name: String,
}

impl MySqlDb {
    /// Drops the test's database.
    pub async fn drop(&self) -> anyhow::Result<()> {
        Fixture::cleanup(self).await
    }
}

pub struct MariaDb;

#[async_trait]
impl Backend for MariaDb {
    async fn fixture(&self) -> anyhow::Result<Box<dyn Fixture>> {
        Ok(Box::new(migrated().await?))
    }
}

pub struct MySqlTx(
    sqlx::Transaction<'static, MySql>,
    outbox_mysql::MySqlOutbox,
    outbox_mysql::MySqlInbox,
);

#[async_trait]
impl OpenTx for MySqlTx {
    async fn enqueue(&mut self, msgs: &[NewMessage]) -> anyhow::Result<()> {
        if let [one] = msgs {
            self.1.enqueue(&mut self.0, one).await?;
        } else {
            self.1.enqueue_batch(&mut self.0, msgs).await?;
        }
        Ok(())
    }
    async fn record(&mut self, consumer: &str, id: uuid::Uuid) -> anyhow::Result<bool> {
        Ok(self.2.record(&mut self.0, consumer, id).await?)
    }
    async fn commit(self: Box<Self>) -> anyhow::Result<()> {
        Ok(self.0.commit().await?)
    }
    async fn rollback(self: Box<Self>) -> anyhow::Result<()> {
        Ok(self.0.rollback().await?)
    }
}

#[async_trait]
impl Fixture for MySqlDb {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }
    async fn begin(&self) -> anyhow::Result<Box<dyn OpenTx>> {
        let tx = self.store.pool().begin().await?;
        Ok(Box::new(MySqlTx(
            tx,
            self.store.outbox().clone(),
            self.store.inbox().clone(),
        )))
    }
    fn committed(&self) {
        self.store.notify();
    }
    async fn purge_inbox(
        &self,
        older_than: std::time::Duration,
        limit: usize,
    ) -> anyhow::Result<u64> {
        Ok(self
            .store
            .inbox()
            .purge(self.store.pool(), older_than, limit)
            .await?)
    }
    async fn cleanup(&self) -> anyhow::Result<()> {
        self.store.pool().close().await;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {}",
            self.name
        )))
        .execute(&self.admin)
        .await?;
        Ok(())
    }
}
