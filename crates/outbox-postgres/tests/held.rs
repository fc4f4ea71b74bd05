//! Claims held by an open transaction (`ClaimMode::Transaction`): what other relays see while
//! a batch is in delivery, what settling and dropping a batch record, and what happens to a
//! relay that stays in delivery longer than its lease.

mod common;

use std::time::Duration;

use outbox_core::{Failure, NewMessage, Retention, Status, Store};
use outbox_postgres::PgStore;
use tokio::time::Instant;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

async fn enqueue(store: &PgStore, msgs: &[NewMessage]) -> anyhow::Result<()> {
    let mut tx = store.pool().begin().await?;
    store.outbox().enqueue_batch(&mut tx, msgs).await?;
    tx.commit().await?;
    Ok(())
}

fn ids(held: &dyn outbox_core::HeldBatch) -> Vec<Uuid> {
    held.messages().iter().map(|m| m.id).collect()
}

#[tokio::test]
async fn a_held_batch_hides_its_rows_and_its_keys_until_it_settles() -> anyhow::Result<()> {
    let store = common::fresh_store().await?;
    store.migrate().await?;
    let a1 = outbox_testkit::msg("t", 1).key("a");
    let a2 = outbox_testkit::msg("t", 2).key("a");
    let b1 = outbox_testkit::msg("t", 3).key("b");
    let free = outbox_testkit::msg("t", 4);
    enqueue(&store, &[a1.clone(), a2.clone(), b1.clone(), free.clone()]).await?;

    // One message per key, plus the unkeyed one; attempt numbers are this delivery's.
    let first = store.claim_held(10, LEASE, false).await?.expect("a batch");
    assert_eq!(ids(first.as_ref()), [a1.id(), b1.id(), free.id()]);
    assert!(first.messages().iter().all(|m| m.attempts == 1));
    assert!(
        first
            .messages()
            .iter()
            .all(|m| m.status == Status::InFlight)
    );
    // Another relay gets neither the locked rows nor a2, whose key is in delivery.
    assert!(store.claim_held(10, LEASE, false).await?.is_none());
    assert!(store.claim("lease-relay", 10, LEASE).await?.is_empty());

    // Released unsettled: everything is back at once, no attempt counted.
    first.release().await?;
    let second = store.claim_held(10, LEASE, false).await?.expect("a batch");
    assert_eq!(ids(second.as_ref()), [a1.id(), b1.id(), free.id()]);
    assert!(second.messages().iter().all(|m| m.attempts == 1));

    // a1 delivered, b1 failed (retry at once), free dead.
    let failures = [
        Failure {
            id: b1.id(),
            error: "broker down".into(),
            retry_in: Some(Duration::ZERO),
        },
        Failure {
            id: free.id(),
            error: "rejected".into(),
            retry_in: None,
        },
    ];
    second
        .settle(&[a1.id()], &failures, Retention::Delete)
        .await?;
    let counts = store.status().await?;
    assert_eq!((counts.pending, counts.dead), (2, 1), "{counts:?}");
    let dead = store.dead_list(10).await?;
    assert_eq!(dead[0].id, free.id());
    assert_eq!(
        (dead[0].attempts, dead[0].last_error.as_deref()),
        (1, Some("rejected"))
    );

    // a2 is now its key's head; b1 comes back as its second attempt.
    let third = store.claim_held(10, LEASE, false).await?.expect("a batch");
    let got: Vec<_> = third
        .messages()
        .iter()
        .map(|m| (m.id, m.attempts))
        .collect();
    assert_eq!(got, [(a2.id(), 1), (b1.id(), 2)]);
    third
        .settle(&[a2.id(), b1.id()], &[], Retention::Delete)
        .await?;
    assert_eq!(store.status().await?.pending, 0);
    common::drop_schema(&store).await
}

#[tokio::test]
async fn a_relay_stuck_past_its_lease_loses_its_session_and_its_messages() -> anyhow::Result<()> {
    let store = common::fresh_store().await?;
    store.migrate().await?;
    let m = outbox_testkit::msg("t", 1).key("k");
    enqueue(&store, std::slice::from_ref(&m)).await?;

    let lease = Duration::from_millis(300);
    let stuck = store.claim_held(10, lease, false).await?.expect("a batch");
    // The database ends the idle session after the lease; then another relay gets the message.
    let deadline = Instant::now() + Duration::from_secs(30);
    let taken = loop {
        if let Some(batch) = store.claim_held(10, LEASE, false).await? {
            break batch;
        }
        assert!(Instant::now() < deadline, "the stuck relay kept its lock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ids(taken.as_ref()), [m.id()]);

    // The stuck relay's late outcome cannot be recorded; the new holder's is.
    assert!(
        stuck
            .settle(&[m.id()], &[], Retention::Delete)
            .await
            .is_err()
    );
    assert_eq!(store.status().await?.pending, 1);
    taken.settle(&[m.id()], &[], Retention::Delete).await?;
    assert_eq!(store.status().await?.pending, 0);
    common::drop_schema(&store).await
}

#[tokio::test]
async fn kept_rows_are_marked_delivered() -> anyhow::Result<()> {
    let store = common::fresh_store().await?;
    store.migrate().await?;
    let m = outbox_testkit::msg("t", 1);
    enqueue(&store, std::slice::from_ref(&m)).await?;
    let held = store.claim_held(10, LEASE, false).await?.expect("a batch");
    held.settle(&[m.id()], &[], Retention::Keep(LEASE)).await?;
    let counts = store.status().await?;
    assert_eq!((counts.pending, counts.delivered), (0, 1), "{counts:?}");
    common::drop_schema(&store).await
}
