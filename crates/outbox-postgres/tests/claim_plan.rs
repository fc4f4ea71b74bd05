//! The claims' cost must not depend on table statistics or on how much of the backlog waits
//! behind keys in flight. Counted in buffers touched (deterministic), not in time.

mod common;

use std::time::Duration;

use outbox_core::{NewMessage, Store};
use outbox_postgres::PgStore;
use serde_json::Value;

const LEASE: Duration = Duration::from_secs(30);

/// Shared buffers one claim touches, read from `EXPLAIN (ANALYZE, BUFFERS)` of the function.
async fn buffers_of(store: &PgStore, function: &str, args: &str) -> anyhow::Result<(i64, i64)> {
    let schema = &store.config().schema;
    let plan: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) \
         SELECT count(*) FROM {schema}.outbox_{function}({args})"
    )))
    .fetch_one(store.pool())
    .await?;
    let top = &plan[0]["Plan"];
    let hit = top["Shared Hit Blocks"].as_i64().unwrap_or(0);
    let read = top["Shared Read Blocks"].as_i64().unwrap_or(0);
    let rows = top["Plans"][0]["Actual Rows"].as_i64().unwrap_or(-1);
    Ok((hit + read, rows))
}

async fn enqueue(store: &PgStore, range: std::ops::Range<u64>) -> anyhow::Result<()> {
    let msgs: Vec<NewMessage> = range
        .map(|n| outbox_testkit::msg("t", n).key(format!("k{}", n % 100)))
        .collect();
    let mut tx = store.pool().begin().await?;
    store.outbox().enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;
    Ok(())
}

#[tokio::test]
async fn a_pipelined_claim_behind_keys_in_flight_reads_a_window_not_the_backlog()
-> anyhow::Result<()> {
    let store = common::fresh_store().await?;
    store.migrate().await?;
    // Statistics taken while the table was empty after a drain, as after a quiet night.
    enqueue(&store, 0..1000).await?;
    let table = format!("{}.outbox_messages", store.config().schema);
    for sql in [
        format!("DELETE FROM {table}"),
        format!("VACUUM ANALYZE {table}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(store.pool())
            .await?;
    }
    enqueue(&store, 0..20_000).await?;

    // Every key's head goes in flight: nothing else is claimable.
    assert_eq!(store.claim("a", 1000, LEASE).await?.len(), 100);
    let (window, found) = buffers_of(&store, "claim_window", "100, 200, 'b', 30000").await?;
    assert_eq!(
        found, 0,
        "nothing is claimable while every head is in flight"
    );
    let (full, found) = buffers_of(&store, "claim", "100, 'b', 30000").await?;
    assert_eq!(found, 0);
    // The full claim has to look at every waiting row; the window only at its 200.
    assert!(
        window * 20 < full,
        "the bounded claim touched {window} buffers, the full one {full}"
    );
    common::drop_schema(&store).await
}

#[tokio::test]
async fn a_pipelined_held_claim_behind_keys_in_flight_reads_a_window_not_the_backlog()
-> anyhow::Result<()> {
    let store = common::fresh_store().await?;
    store.migrate().await?;
    enqueue(&store, 0..20_000).await?;

    // Every key's head is locked by a batch in delivery: nothing else is claimable.
    let held = store.claim_held(1000, LEASE, false).await?.expect("heads");
    assert_eq!(held.messages().len(), 100);
    let (window, found) = buffers_of(&store, "claim_held", "100, 200, 30000").await?;
    assert_eq!(found, 0, "nothing is claimable while every head is locked");
    let (full, found) = buffers_of(&store, "claim_held", "100, NULL, 30000").await?;
    assert_eq!(found, 0);
    assert!(
        window * 20 < full,
        "the bounded claim touched {window} buffers, the full one {full}"
    );
    drop(held);
    common::drop_schema(&store).await
}
