//! Claims held by an open transaction (`ClaimMode::Transaction`): what other relays see while
//! a batch is in delivery, what settling and dropping a batch record, and what happens to a
//! relay that stays in delivery longer than its lease.

mod common;

use std::time::Duration;

use outbox_core::{Batch, ClaimRequest, Failure, NewMessage, Outcome, Retention, Status, Store};
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

fn ids(held: &dyn Batch) -> Vec<Uuid> {
    held.messages().iter().map(|m| m.id).collect()
}

async fn claim(store: &PgStore, lease: Duration) -> anyhow::Result<Option<Box<dyn Batch>>> {
    Ok(store
        .claim_held(&ClaimRequest::new("test", 10, lease))
        .await?)
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

    // Each key's run and the unkeyed one, in waves (a1, b1 and free, then a2); attempt numbers
    // are this delivery's.
    let first = claim(&store, LEASE).await?.expect("a batch");
    assert_eq!(ids(first.as_ref()), [a1.id(), b1.id(), free.id(), a2.id()]);
    assert!(first.messages().iter().all(|m| m.attempts == 1));
    assert!(
        first
            .messages()
            .iter()
            .all(|m| m.status == Status::InFlight)
    );
    // Another relay gets none of the locked rows.
    assert!(claim(&store, LEASE).await?.is_none());
    assert!(store.claim("lease-relay", 10, LEASE).await?.is_empty());

    // Released unsettled: everything is back at once, no attempt counted.
    first.release().await?;
    let second = claim(&store, LEASE).await?.expect("a batch");
    assert_eq!(ids(second.as_ref()), [a1.id(), b1.id(), free.id(), a2.id()]);
    assert!(second.messages().iter().all(|m| m.attempts == 1));

    // a1 delivered, b1 failed (retry at once), free dead; a2, in neither list, is unlocked.
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
        .settle(&Outcome {
            acks: &[a1.id()],
            failures: &failures,
            left: &[],
            retention: Retention::Delete,
        })
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
    let third = claim(&store, LEASE).await?.expect("a batch");
    let got: Vec<_> = third
        .messages()
        .iter()
        .map(|m| (m.id, m.attempts))
        .collect();
    assert_eq!(got, [(a2.id(), 1), (b1.id(), 2)]);
    third
        .settle(&Outcome::delivered(&[a2.id(), b1.id()], Retention::Delete))
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
    let stuck = claim(&store, lease).await?.expect("a batch");
    // The database ends the idle session after the lease; then another relay gets the message.
    let deadline = Instant::now() + Duration::from_secs(30);
    let taken = loop {
        if let Some(batch) = claim(&store, LEASE).await? {
            break batch;
        }
        assert!(Instant::now() < deadline, "the stuck relay kept its lock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ids(taken.as_ref()), [m.id()]);

    // The stuck relay's late outcome cannot be recorded; the new holder's is.
    assert!(
        stuck
            .settle(&Outcome::delivered(&[m.id()], Retention::Delete))
            .await
            .is_err()
    );
    assert_eq!(store.status().await?.pending, 1);
    taken
        .settle(&Outcome::delivered(&[m.id()], Retention::Delete))
        .await?;
    assert_eq!(store.status().await?.pending, 0);
    common::drop_schema(&store).await
}

#[tokio::test]
async fn kept_rows_are_marked_delivered() -> anyhow::Result<()> {
    let store = common::fresh_store().await?;
    store.migrate().await?;
    let m = outbox_testkit::msg("t", 1);
    enqueue(&store, std::slice::from_ref(&m)).await?;
    let held = claim(&store, LEASE).await?.expect("a batch");
    held.settle(&Outcome::delivered(&[m.id()], Retention::Keep(LEASE)))
        .await?;
    let counts = store.status().await?;
    assert_eq!((counts.pending, counts.delivered), (0, 1), "{counts:?}");
    common::drop_schema(&store).await
}

#[tokio::test]
async fn a_delivery_that_never_settles_counts_its_attempt_and_goes_alone() -> anyhow::Result<()> {
    let store = common::fresh_store().await?;
    store.migrate().await?;
    let msgs: Vec<_> = (0..3).map(|n| outbox_testkit::msg("t", n)).collect();
    enqueue(&store, &msgs).await?;

    // Nothing counted while the batch is alive.
    let held = claim(&store, LEASE).await?.expect("a batch");
    assert_eq!(held.messages().len(), 3);
    assert_eq!(store.recover(3).await?, 0);

    // The relay "dies": its transaction ends without an outcome.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.recover(3).await? == 0 {
        assert!(
            Instant::now() < deadline,
            "the lost delivery was never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.recover(3).await?, 0, "counted twice");

    // Each message of the lost batch now goes alone, with its attempt counted.
    let alone = claim(&store, LEASE).await?.expect("a batch");
    assert_eq!(ids(alone.as_ref()), [msgs[0].id()]);
    assert_eq!(alone.messages()[0].attempts, 2);
    alone
        .settle(&Outcome::delivered(&[msgs[0].id()], Retention::Delete))
        .await?;
    let next = claim(&store, LEASE).await?.expect("a batch");
    assert_eq!(ids(next.as_ref()), [msgs[1].id()]);
    next.release().await?;
    assert_eq!(store.recover(3).await?, 0, "a release counted an attempt");
    common::drop_schema(&store).await
}

#[tokio::test]
async fn a_message_whose_deliveries_never_finish_goes_dead_at_max_attempts() -> anyhow::Result<()> {
    let store = common::fresh_store().await?;
    store.migrate().await?;
    let poison = outbox_testkit::msg("t", 1).key("k");
    enqueue(&store, std::slice::from_ref(&poison)).await?;
    for attempt in 1..=2 {
        drop(claim(&store, LEASE).await?.expect("a batch"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.recover(2).await? == 0 {
            assert!(Instant::now() < deadline, "attempt {attempt} never counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(claim(&store, LEASE).await?.is_none());
    let dead = store.dead_list(10).await?;
    assert_eq!((dead.len(), dead[0].attempts), (1, 2));
    let error = dead[0].last_error.as_deref().unwrap_or_default();
    assert!(error.contains("never finished"), "{error}");
    common::drop_schema(&store).await
}
