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

/// The byte budget is applied by the database, not after the rows reached the relay: a claim
/// of big messages returns only what fits (heads first, then runs in wave order), or one.
#[tokio::test]
async fn the_database_returns_only_what_fits_in_the_byte_budget() -> anyhow::Result<()> {
    let store = common::fresh_store().await?;
    store.migrate().await?;
    let big = |key: Option<&str>| -> anyhow::Result<NewMessage> {
        let m = NewMessage::bytes("t", "blob", "application/octet-stream", vec![1u8; 10_000])?;
        Ok(key.map_or(m.clone(), |k| m.key(k)))
    };
    let msgs = [
        big(Some("a"))?,
        big(Some("a"))?,
        big(Some("b"))?,
        big(None)?,
    ];
    let mut tx = store.pool().begin().await?;
    store.outbox().enqueue_batch(&mut tx, &msgs).await?;
    tx.commit().await?;
    let schema = &store.config().schema;
    let claimed = |budget: i64| {
        let sql = format!(
            "SELECT seq FROM {schema}.outbox_claim_runs(10, 10, NULL, NULL, 1, NULL, true, $1)"
        );
        let pool = store.pool().clone();
        async move {
            let mut seqs: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(budget)
                .fetch_all(&pool)
                .await?;
            seqs.sort();
            anyhow::Ok(seqs)
        }
    };
    // Heads 1, 3 and 4 (30,000 bytes) fit in 35,000; a's second message does not.
    assert_eq!(claimed(35_000).await?, [1, 3, 4]);
    assert_eq!(claimed(45_000).await?, [1, 2, 3, 4]);
    assert_eq!(claimed(15_000).await?, [1]);
    assert_eq!(
        claimed(1).await?,
        [1],
        "a message bigger than the budget goes alone"
    );
    common::drop_schema(&store).await
}
