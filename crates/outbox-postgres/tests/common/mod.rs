//! Test fixtures on the local PostgreSQL (`OUTBOX_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`).

#![allow(dead_code)]

use std::sync::Arc;

use async_trait::async_trait;
use outbox_core::{NewMessage, Store};
use outbox_postgres::{PgConfig, PgStore};
use outbox_testkit::{Backend, Fixture, OpenTx};
use sqlx::postgres::PgPoolOptions;

pub fn url() -> String {
    std::env::var("OUTBOX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh schema name per test, so tests run in parallel and leave nothing shared behind.
pub fn schema_name() -> String {
    format!("t_{}", uuid::Uuid::now_v7().simple())
}

/// A store in a fresh schema, not yet migrated.
pub async fn fresh_store() -> anyhow::Result<PgStore> {
    let pool = PgPoolOptions::new()
        // Four relays, each with a LISTEN connection and two batches held in delivery.
        .max_connections(16)
        .connect(&url())
        .await?;
    let config = PgConfig::default().schema(schema_name());
    Ok(PgStore::with_config(pool, config)?)
}

/// Drops the test's schema. A relay task of the test may still be finishing a statement on one
/// of its tables (a heartbeat, a recovery), and `DROP … CASCADE` locks every object in an order
/// of its own: PostgreSQL then breaks the deadlock by failing one of them, so a drop it chose
/// is tried again.
pub async fn drop_schema(store: &PgStore) -> anyhow::Result<()> {
    let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", store.config().schema);
    let mut tries = 0;
    loop {
        let dropped = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(store.pool())
            .await;
        match dropped {
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("40P01") && tries < 5 => {
                tries += 1;
            }
            other => return other.map(drop).map_err(Into::into),
        }
    }
}

/// Relays hold claims in a transaction (the default).
pub struct Postgres;

/// Relays write leases instead.
pub struct PostgresLease;

pub struct PgFixture {
    store: PgStore,
}

pub struct PgTx(
    sqlx::Transaction<'static, sqlx::Postgres>,
    outbox_postgres::PgOutbox,
    outbox_postgres::PgInbox,
);

#[async_trait]
impl OpenTx for PgTx {
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
impl Fixture for PgFixture {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }
    async fn begin(&self) -> anyhow::Result<Box<dyn OpenTx>> {
        let tx = self.store.pool().begin().await?;
        Ok(Box::new(PgTx(
            tx,
            self.store.outbox().clone(),
            self.store.inbox().clone(),
        )))
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
        drop_schema(&self.store).await
    }
}

#[async_trait]
impl Backend for Postgres {
    async fn fixture(&self) -> anyhow::Result<Box<dyn Fixture>> {
        let store = fresh_store().await?;
        store.migrate().await?;
        Ok(Box::new(PgFixture { store }))
    }
}

#[async_trait]
impl Backend for PostgresLease {
    async fn fixture(&self) -> anyhow::Result<Box<dyn Fixture>> {
        let store = fresh_store()
            .await?
            .with_claim_mode(outbox_postgres::ClaimMode::Lease);
        store.migrate().await?;
        Ok(Box::new(PgFixture { store }))
    }
}

/// The conformance fixture over a store the test configured itself.
pub async fn fixture_for(store: PgStore) -> anyhow::Result<Box<dyn Fixture>> {
    store.migrate().await?;
    Ok(Box::new(PgFixture { store }))
}
