//! Settling captured rows (table capture) against PostgreSQL's visibility. A walsender may
//! send a transaction as soon as its commit record is flushed, a moment before the transaction
//! is visible to other sessions: the relay can have delivered a row before its own settle can
//! see it. That settle must still remove the row, or it stays behind as `captured` for good.

mod common;

use std::time::Duration;

use outbox_core::{Retention, Store};
use outbox_postgres::capture::EnqueueMode;
use outbox_testkit::{eventually, msg};

#[tokio::test]
async fn a_settle_that_comes_before_its_rows_are_visible_still_removes_them() -> anyhow::Result<()>
{
    let store = common::fresh_store().await?;
    store.migrate().await?;
    let captured = store.clone().with_enqueue_mode(EnqueueMode::CapturedRow);
    let m = msg("t", 1);
    let mut writer = store.pool().begin().await?;
    captured.outbox().enqueue(&mut writer, &m).await?;

    // Settled while the row is still invisible, then committed once the settle has looked.
    let settling = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .settle_captured(&[m.id()], &[], &[], Retention::Delete)
                .await
        })
    };
    let schema = store.config().schema.clone();
    eventually(
        "the settle has run once",
        Duration::from_secs(30),
        || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND query LIKE '%' || $1 || '.%captured_done%')",
            )
            .bind(&schema)
            .fetch_one(store.pool())
            .await
            .unwrap_or(false)
        },
    )
    .await;
    writer.commit().await?;
    settling.await??;

    let left: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {schema}.outbox_messages"
    )))
    .fetch_one(store.pool())
    .await?;
    common::drop_schema(&store).await?;
    assert_eq!(left, 0, "the delivered row stayed behind as captured");
    Ok(())
}
