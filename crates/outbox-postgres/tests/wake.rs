//! Which inserts wake a parked relay. A polling relay sleeps on LISTEN while nothing is
//! claimable, and writers NOTIFY it while it is parked; a NOTIFY takes a lock that serialises
//! every committing writer. Captured rows (table capture) are delivered by the relay reading
//! the slot, never by a polling one, so they must not pay for it: next to a capture relay the
//! polling relay is parked almost all the time.

mod common;

use outbox_core::Store;
use outbox_postgres::capture::EnqueueMode;
use outbox_testkit::msg;
use sqlx::postgres::PgListener;

/// The notifications on `channel` up to the marker `end`, which the test sends itself: they
/// arrive in commit order, so what a writer sent before the marker is all in the list.
async fn until(listener: &mut PgListener, end: &str) -> anyhow::Result<Vec<String>> {
    let mut seen = Vec::new();
    loop {
        let n = listener.recv().await?;
        if n.payload() == end {
            return Ok(seen);
        }
        seen.push(n.payload().to_owned());
    }
}

#[tokio::test]
async fn captured_rows_do_not_wake_parked_relays_and_polled_rows_do() -> anyhow::Result<()> {
    let store = common::fresh_store().await?;
    store.migrate().await?;
    let channel = store.config().channel();
    let mut listener = PgListener::connect(&common::url()).await?;
    listener.listen(&channel).await?;
    let mut waiter = store.waiter("parked").await?;
    waiter.prepare().await?;
    let marker = |payload: &'static str| {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel.clone())
            .bind(payload)
    };

    let captured = store.clone().with_enqueue_mode(EnqueueMode::CapturedRow);
    let mut tx = store.pool().begin().await?;
    captured.outbox().enqueue(&mut tx, &msg("t", 1)).await?;
    tx.commit().await?;
    let mut tx = store.pool().begin().await?;
    captured
        .outbox()
        .enqueue_batch(&mut tx, &[msg("t", 2), msg("t", 3)])
        .await?;
    tx.commit().await?;
    marker("captured").execute(store.pool()).await?;
    let after_captured = until(&mut listener, "captured").await?;

    let mut tx = store.pool().begin().await?;
    store.outbox().enqueue(&mut tx, &msg("t", 4)).await?;
    tx.commit().await?;
    marker("polled").execute(store.pool()).await?;
    let after_polled = until(&mut listener, "polled").await?;

    // The captured insert's flag lasts for its statement only: a polled row written after it
    // in the same transaction still wakes the relay.
    let mut tx = store.pool().begin().await?;
    captured.outbox().enqueue(&mut tx, &msg("t", 5)).await?;
    store.outbox().enqueue(&mut tx, &msg("t", 6)).await?;
    tx.commit().await?;
    marker("mixed").execute(store.pool()).await?;
    let after_mixed = until(&mut listener, "mixed").await?;

    common::drop_schema(&store).await?;
    assert!(
        after_captured.is_empty(),
        "captured rows woke the parked relay: {after_captured:?}"
    );
    assert_eq!(
        after_polled.len(),
        1,
        "a polled row must wake the parked relay once"
    );
    assert_eq!(
        after_mixed.len(),
        1,
        "a polled row after a captured one in a transaction must wake the parked relay"
    );
    Ok(())
}
