//! An edge case of delivery with held claims (`ClaimMode::Transaction`, the default) that the
//! conformance suite does not reach: a sink that stays in a delivery for longer than the lease.
//! Racing writers are covered for every claim mode by `outbox_testkit::concurrent_writer_tests!`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outbox_core::{HandlerSink, Message, Relay, RetryPolicy, Store};
use outbox_testkit::{drain_config, msg};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};
use uuid::Uuid;

/// Generous bound for anything the test waits for.
const DEADLINE: Duration = Duration::from_secs(30);

/// A sink that takes far longer than the lease: every such delivery must count as a failed
/// attempt, so the message goes dead after `max_attempts` calls instead of being handed to
/// the sink again and again with no attempt ever recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sink_slower_than_the_lease_counts_attempts_and_goes_dead() -> anyhow::Result<()> {
    const LEASE: Duration = Duration::from_secs(1);
    /// How long the sink takes: five leases.
    const SLOW: Duration = Duration::from_secs(5);

    let store = common::fresh_store().await?;
    store.migrate().await?;
    let m = msg("t", 1);
    let mut tx = store.pool().begin().await?;
    store.outbox().enqueue(&mut tx, &m).await?;
    tx.commit().await?;

    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let sink = HandlerSink::new(move |_m: Message| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(SLOW).await;
            Ok(())
        }
    });
    let config = drain_config()
        .relay_id("slow")
        .lease(LEASE)
        .exit_when_idle(false)
        .shutdown_timeout(Duration::from_millis(100))
        .retry(
            RetryPolicy::default()
                .max_attempts(3)
                .base_delay(Duration::ZERO)
                .max_delay(Duration::ZERO),
        );
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let relay = Relay::with_config(Arc::new(store.clone()), Arc::new(sink), config);
    let relay = tokio::spawn(relay.run(async move {
        let _ = stop_rx.await;
    }));

    let deadline = Instant::now() + DEADLINE;
    let dead = loop {
        let dead = store.dead_list(10).await?;
        if !dead.is_empty() || Instant::now() >= deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let status = store.status().await?;
    // For the report only: where the message stands when it is not dead.
    let row: Option<(String, i32)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT status, attempts FROM {}.outbox_messages WHERE id = $1",
        store.config().schema
    )))
    .bind(m.id())
    .fetch_optional(store.pool())
    .await?;
    let _ = stop_tx.send(());
    let stopped = timeout(DEADLINE, relay).await.is_ok();
    let calls = calls.load(Ordering::SeqCst);
    common::drop_schema(&store).await?;

    let got: Vec<(Uuid, i32)> = dead.iter().map(|d| (d.id, d.attempts)).collect();
    assert_eq!(
        got,
        [(m.id(), 3)],
        "the message did not go dead after 3 attempts within {DEADLINE:?}: \
         row (status, attempts) = {row:?}, {status:?}, sink called {calls} times"
    );
    assert_eq!(calls, 3, "the sink must be called once per attempt");
    assert!(stopped, "the relay did not stop");
    Ok(())
}

/// A status this build does not know (corrupt data, or a schema written by a newer build) is
/// an error naming it, never read back as `pending`, which would put the message in delivery.
#[tokio::test]
async fn an_unknown_status_read_back_is_an_error_not_pending() -> anyhow::Result<()> {
    let store = common::fresh_store().await?;
    store.migrate().await?;
    let m = outbox_core::NewMessage::json("orders", "order.created", &serde_json::json!({}))?;
    let mut tx = store.pool().begin().await?;
    store.outbox().enqueue(&mut tx, &m).await?;
    tx.commit().await?;
    let table = format!("{}.outbox_messages", store.config().schema);
    // The table's CHECK keeps the status to the known ones: only corruption gets past it.
    let checks: Vec<String> = sqlx::query_scalar(
        "SELECT conname::text FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'c'",
    )
    .bind(&table)
    .fetch_all(store.pool())
    .await?;
    for check in checks {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {table} DROP CONSTRAINT {check}"
        )))
        .execute(store.pool())
        .await?;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {table} SET status = 'archived' WHERE id = $1"
    )))
    .bind(m.id())
    .execute(store.pool())
    .await?;
    let read = store.get_message(m.id()).await;
    common::drop_schema(&store).await?;
    let e = read.expect_err("a message of unknown status was read back");
    assert!(e.to_string().contains("\"archived\""), "{e}");
    Ok(())
}
