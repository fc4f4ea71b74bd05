//! Schema upgrades on a real PostgreSQL.

mod common;

use outbox_core::{Retention, Store, StoreError};
use outbox_postgres::{LATEST_VERSION, PgConfig, PgStore};
use std::time::Duration;

#[tokio::test]
async fn upgrades_from_the_first_version_with_data_intact() -> anyhow::Result<()> {
    let store = common::fresh_store().await?;
    store.migrate_to(1).await?;
    // A row written by a version-1 writer.
    let msg = outbox_testkit::msg("t", 7).key("k");
    let mut tx = store.pool().begin().await?;
    store.outbox().enqueue(&mut tx, &msg).await?;
    tx.commit().await?;

    store.migrate().await?;
    let version: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT max(version) FROM {}.outbox_schema_migrations",
        store.config().schema
    )))
    .fetch_one(store.pool())
    .await?;
    assert_eq!(version, LATEST_VERSION);
    let got = store.claim("r", 10, Duration::from_secs(30)).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, msg.id());
    assert_eq!(
        got[0].json::<serde_json::Value>()?,
        serde_json::json!({"n": 7})
    );
    assert_eq!(store.ack(&[msg.id()], Retention::Delete).await?, 1);
    common::drop_schema(&store).await
}

#[tokio::test]
async fn concurrent_migrations_apply_once() -> anyhow::Result<()> {
    let store = common::fresh_store().await?;
    let runs = (0..4).map(|_| {
        let s = store.clone();
        tokio::spawn(async move { s.migrate().await })
    });
    for r in futures::future::join_all(runs).await {
        r??;
    }
    let applied: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}.outbox_schema_migrations",
        store.config().schema
    )))
    .fetch_one(store.pool())
    .await?;
    assert_eq!(applied, LATEST_VERSION);
    common::drop_schema(&store).await
}

#[tokio::test]
async fn refuses_a_schema_newer_than_the_build() -> anyhow::Result<()> {
    let store = common::fresh_store().await?;
    store.migrate().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {}.outbox_schema_migrations (version, description) VALUES (999, 'future')",
        store.config().schema
    )))
    .execute(store.pool())
    .await?;
    let err = store.migrate().await.unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 999, .. }),
        "{err}"
    );
    common::drop_schema(&store).await
}

#[tokio::test]
async fn table_prefix_keeps_outboxes_apart() -> anyhow::Result<()> {
    let a = common::fresh_store().await?;
    let config = PgConfig::default()
        .schema(a.config().schema.clone())
        .table_prefix("billing_");
    let b = PgStore::with_config(a.pool().clone(), config)?;
    a.migrate().await?;
    b.migrate().await?;
    let mut tx = a.pool().begin().await?;
    b.outbox()
        .enqueue(&mut tx, &outbox_testkit::msg("t", 1))
        .await?;
    tx.commit().await?;
    assert_eq!(a.status().await?.pending, 0);
    assert_eq!(b.status().await?.pending, 1);
    common::drop_schema(&a).await
}

#[test]
fn rejects_names_that_are_not_plain_identifiers() {
    for (schema, prefix) in [
        ("public; drop table x", "outbox_"),
        ("public", "Outbox"),
        ("", "o_"),
    ] {
        let config = PgConfig::default().schema(schema).table_prefix(prefix);
        assert!(
            matches!(config.validate(), Err(StoreError::Config(_))),
            "{schema:?} {prefix:?}"
        );
    }
}
