//! Schema upgrades on real SQLite files.

mod common;

use std::time::Duration;

use outbox_core::{Retention, Store, StoreError};
use outbox_sqlite::{LATEST_VERSION, SqliteConfig, SqliteStore};

#[tokio::test]
async fn upgrades_from_the_first_version_with_data_intact() -> anyhow::Result<()> {
    let f = common::fresh().await?;
    f.store.migrate_to(1).await?;
    let msg = outbox_testkit::msg("t", 7).key("k");
    let mut tx = f.store.pool().begin().await?;
    f.store.outbox().enqueue(&mut tx, &msg).await?;
    tx.commit().await?;

    f.store.migrate().await?;
    let version: i64 = sqlx::query_scalar("SELECT max(version) FROM outbox_schema_migrations")
        .fetch_one(f.store.pool())
        .await?;
    assert_eq!(version, LATEST_VERSION);
    let got = f.store.claim("r", 10, Duration::from_secs(30)).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, msg.id());
    assert_eq!(
        got[0].json::<serde_json::Value>()?,
        serde_json::json!({"n": 7})
    );
    assert_eq!(f.store.ack(&[msg.id()], Retention::Delete).await?, 1);
    Ok(())
}

#[tokio::test]
async fn concurrent_migrations_apply_once() -> anyhow::Result<()> {
    let f = common::fresh().await?;
    let runs = (0..4).map(|_| {
        let s = f.store.clone();
        tokio::spawn(async move { s.migrate().await })
    });
    for r in futures::future::join_all(runs).await {
        r??;
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_schema_migrations")
        .fetch_one(f.store.pool())
        .await?;
    assert_eq!(applied, LATEST_VERSION);
    Ok(())
}

#[tokio::test]
async fn refuses_a_schema_newer_than_the_build() -> anyhow::Result<()> {
    let f = common::fresh().await?;
    f.store.migrate().await?;
    sqlx::query("INSERT INTO outbox_schema_migrations VALUES (999, 'future', 0)")
        .execute(f.store.pool())
        .await?;
    let err = f.store.migrate().await.unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 999, .. }),
        "{err}"
    );
    Ok(())
}

/// The check a relay that does not migrate makes at start: it reads the version and changes
/// nothing (no table is created for it).
#[tokio::test]
async fn the_schema_check_names_the_versions_and_writes_nothing() -> anyhow::Result<()> {
    let f = common::fresh().await?;
    let err = f.store.check_schema().await.unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooOld { found: 0, needed } if needed == LATEST_VERSION),
        "{err}"
    );
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE type = 'table'")
        .fetch_one(f.store.pool())
        .await?;
    assert_eq!(tables, 0, "the check created a table");
    f.store.migrate_to(2).await?;
    let err = f.store.check_schema().await.unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooOld { found: 2, .. }),
        "{err}"
    );
    f.store.migrate().await?;
    f.store.check_schema().await?;
    sqlx::query("INSERT INTO outbox_schema_migrations VALUES (999, 'future', 0)")
        .execute(f.store.pool())
        .await?;
    let err = f.store.check_schema().await.unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 999, .. }),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn table_prefix_keeps_outboxes_apart() -> anyhow::Result<()> {
    let f = common::fresh().await?;
    let config = SqliteConfig::default().table_prefix("billing_");
    let b = SqliteStore::with_config(f.store.pool().clone(), config)?;
    f.store.migrate().await?;
    b.migrate().await?;
    let mut tx = f.store.pool().begin().await?;
    b.outbox()
        .enqueue(&mut tx, &outbox_testkit::msg("t", 1))
        .await?;
    tx.commit().await?;
    assert_eq!(f.store.status().await?.pending, 0);
    assert_eq!(b.status().await?.pending, 1);
    Ok(())
}

#[tokio::test]
async fn a_batch_larger_than_one_statement_allows_keeps_its_order() -> anyhow::Result<()> {
    let f = common::fresh().await?;
    f.store.migrate().await?;
    let msgs: Vec<_> = (0..7000).map(|n| outbox_testkit::msg("t", n)).collect();
    let mut tx = f.store.pool().begin().await?;
    f.store.outbox().enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;
    let got = f.store.claim("r", 10_000, Duration::from_secs(30)).await?;
    let ids: Vec<_> = got.iter().map(|m| m.id).collect();
    let want: Vec<_> = msgs.iter().map(|m| m.id()).collect();
    assert_eq!(ids, want);
    Ok(())
}

#[test]
fn rejects_prefixes_that_are_not_plain_identifiers() {
    for prefix in ["x; drop table y", "Outbox", ""] {
        let config = SqliteConfig::default().table_prefix(prefix);
        assert!(
            matches!(config.validate(), Err(StoreError::Config(_))),
            "{prefix:?}"
        );
    }
}
