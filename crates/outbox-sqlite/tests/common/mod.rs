//! Test fixtures: a fresh SQLite file per test in a temporary folder.

#![allow(dead_code)]

use std::sync::Arc;

use async_trait::async_trait;
use outbox_core::{NewMessage, Store};
use outbox_sqlite::SqliteStore;
use outbox_testkit::{Backend, Fixture, OpenTx};

pub struct SqliteFile {
    pub store: SqliteStore,
    _dir: tempfile::TempDir,
}

/// A store on a new file, not yet migrated.
pub async fn fresh() -> anyhow::Result<SqliteFile> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("outbox.db").display());
    let store = SqliteStore::connect(&url).await?;
    Ok(SqliteFile { store, _dir: dir })
}

pub struct Sqlite;

pub struct SqliteTx(
    sqlx::Transaction<'static, sqlx::Sqlite>,
    outbox_sqlite::SqliteOutbox,
    outbox_sqlite::SqliteInbox,
);

#[async_trait]
impl OpenTx for SqliteTx {
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
impl Fixture for SqliteFile {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }
    async fn begin(&self) -> anyhow::Result<Box<dyn OpenTx>> {
        let tx = self.store.pool().begin().await?;
        Ok(Box::new(SqliteTx(
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
        Ok(())
    }
}

#[async_trait]
impl Backend for Sqlite {
    async fn fixture(&self) -> anyhow::Result<Box<dyn Fixture>> {
        let f = fresh().await?;
        f.store.migrate().await?;
        Ok(Box::new(f))
    }
}
