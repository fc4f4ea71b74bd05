//! The claims' cost must not depend on table statistics or on how much of the backlog waits
//! behind keys in flight. Counted in buffers touched (deterministic), not in time.

mod common;

use std::time::Duration;

use outbox_core::{ClaimRequest, NewMessage, Store};
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

async fn enqueue(store: &PgStore, range: std::ops::Range<u64>, keys: u64) -> anyhow::Result<()> {
    let msgs: Vec<NewMessage> = range
        .map(|n| outbox_testkit::msg("t", n).key(format!("k{}", n % keys)))
        .collect();
    for chunk in msgs.chunks(10_000) {
        let mut tx = store.pool().begin().await?;
        store.outbox().enqueue_batch(&mut tx, chunk).await?;
        tx.commit().await?;
    }
    Ok(())
}

/// `claim_runs(limit, scan, lease_ms, owned, lock_ns, lock_key, widen)` for a batch of 1,000.
const CLAIM: &str = "1000, 1000, 30000, NULL, 1, NULL, true";

#[tokio::test]
async fn a_claim_costs_the_same_whatever_the_backlog_behind_its_keys() -> anyhow::Result<()> {
    for keys in [1, 10] {
        let store = common::fresh_store().await?;
        store.migrate().await?;
        // Both sizes have index trees of the same height, so that buffers compare the work.
        enqueue(&store, 0..5_000, keys).await?;
        let (small, found) = buffers_of(&store, "claim_runs", CLAIM).await?;
        assert_eq!(found, 1000, "{keys} keys: a full batch of runs");
        enqueue(&store, 5_000..80_000, keys).await?;
        let (large, found) = buffers_of(&store, "claim_runs", CLAIM).await?;
        assert_eq!(found, 1000);
        assert!(
            large < small * 2,
            "{keys} keys: {small} buffers at 5,000 pending, {large} at 80,000"
        );
        common::drop_schema(&store).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_claim_ahead_behind_keys_in_flight_reads_a_window_not_the_backlog() -> anyhow::Result<()>
{
    let store = common::fresh_store().await?;
    store.migrate().await?;
    // Statistics taken while the table was empty after a drain, as after a quiet night.
    enqueue(&store, 0..1000, 100).await?;
    let table = format!("{}.outbox_messages", store.config().schema);
    for sql in [
        format!("DELETE FROM {table}"),
        format!("VACUUM ANALYZE {table}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(store.pool())
            .await?;
    }
    enqueue(&store, 0..20_000, 100).await?;

    // Every key is in delivery (its head and the start of its run are locked): nothing else is
    // claimable.
    let held = store
        .claim_held(&ClaimRequest::new("a", 1000, LEASE))
        .await?
        .expect("runs");
    assert_eq!(held.messages().len(), 1000);
    let ahead = "1000, 3000, 30000, NULL, 1, NULL, false";
    let (window, found) = buffers_of(&store, "claim_runs", ahead).await?;
    assert_eq!(found, 0, "nothing is claimable while every key is locked");
    let (full, found) = buffers_of(&store, "claim_runs", CLAIM).await?;
    assert_eq!(found, 0);
    // Widened, the claim has to look at every waiting row; ahead, only at its window.
    assert!(
        window * 4 < full,
        "the claim ahead touched {window} buffers, the widened one {full}"
    );
    drop(held);
    common::drop_schema(&store).await
}
