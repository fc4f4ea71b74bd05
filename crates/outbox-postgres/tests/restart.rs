//! A database restart ends the session of every held claim, and with it the row locks that kept
//! other relays off its keys, while the relays themselves may still be in the sink with those
//! messages. Runs on a private cluster, which it restarts.

use std::time::Duration;

use outbox_core::{Batch, ClaimRequest, Message, NewMessage, Store};
use outbox_postgres::{PgConfig, PgStore};
use outbox_testkit::cluster::{PgCluster, StopMode};
use sqlx::postgres::PgPoolOptions;

const LEASE: Duration = Duration::from_secs(3);
/// Longer than any of these tests waits: what they see happens before a fence could expire.
const LONG_LEASE: Duration = Duration::from_secs(120);

async fn store_on(pg: &PgCluster) -> anyhow::Result<PgStore> {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&pg.url("outbox"))
        .await?;
    Ok(PgStore::with_config(pool, PgConfig::default())?)
}

async fn enqueue(store: &PgStore, msgs: &[NewMessage]) -> anyhow::Result<()> {
    let mut tx = store.pool().begin().await?;
    store.outbox().enqueue_batch(&mut tx, msgs).await?;
    tx.commit().await?;
    Ok(())
}

/// A claim by another relay, retried while the pool still hands out connections that died with
/// the restart.
async fn claim(store: &PgStore) -> anyhow::Result<Option<Box<dyn Batch>>> {
    claim_for(store, LEASE).await
}

async fn claim_for(store: &PgStore, lease: Duration) -> anyhow::Result<Option<Box<dyn Batch>>> {
    let req = ClaimRequest::new("b", 10, lease);
    let mut tries = 0;
    loop {
        match store.claim_held(&req).await {
            Ok(batch) => return Ok(batch),
            Err(e) if tries < 20 => {
                tries += 1;
                eprintln!("claim after the restart failed ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Claims (as relay "b", with `lease`) until a batch holds key `k`, for at most `bound`.
async fn claim_key(
    store: &PgStore,
    lease: Duration,
    bound: Duration,
    never: &str,
) -> anyhow::Result<Box<dyn Batch>> {
    let until = tokio::time::Instant::now() + bound;
    loop {
        let batch = claim_for(store, lease).await?;
        if keys(&batch).iter().any(|k| k == "k") {
            return Ok(batch.expect("a batch holding k"));
        }
        anyhow::ensure!(tokio::time::Instant::now() < until, "{never}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A private cluster restarted while relay "a" held key k's run of three, claimed for `lease`.
async fn restart_with_k_in_delivery(
    lease: Duration,
) -> anyhow::Result<(PgCluster, PgStore, Vec<NewMessage>, Box<dyn Batch>)> {
    let pg = PgCluster::start_new()?;
    pg.create_database("outbox")?;
    let store = store_on(&pg).await?;
    store.migrate().await?;
    let run: Vec<NewMessage> = (0..3)
        .map(|n| outbox_testkit::msg("t", n).key("k"))
        .collect();
    enqueue(&store, &run).await?;
    let in_delivery = store
        .claim_held(&ClaimRequest::new("a", 10, lease))
        .await?
        .expect("k's run");
    assert_eq!(in_delivery.messages().len(), 3);
    pg.restart(StopMode::Fast)?;
    Ok((pg, store, run, in_delivery))
}

fn keys(batch: &Option<Box<dyn Batch>>) -> Vec<String> {
    batch.as_ref().map_or(Vec::new(), |b| {
        b.messages()
            .iter()
            .map(|m: &Message| m.key.clone().unwrap_or_default())
            .collect()
    })
}

#[tokio::test]
async fn after_a_restart_a_key_whose_delivery_may_still_run_is_not_claimed_until_its_lease_ends()
-> anyhow::Result<()> {
    // Relay "a" is in the sink with k's run when the database restarts.
    let (_pg, store, run, in_delivery) = restart_with_k_in_delivery(LEASE).await?;

    // Another key, enqueued after the restart, goes out at once; k does not, even after the
    // relays' periodic recovery ran, since relay "a" may still be delivering it.
    let other = outbox_testkit::msg("t", 9).key("other");
    let mut tries = 0;
    while let Err(e) = enqueue(&store, std::slice::from_ref(&other)).await {
        tries += 1;
        anyhow::ensure!(tries < 20, "enqueue after the restart: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.recover(5).await?;
    let first = claim(&store).await?;
    assert_eq!(
        keys(&first),
        ["other"],
        "right after the restart a relay claimed messages of a key another relay may still be delivering"
    );
    drop(first);

    // Once relay "a"'s deadline has passed, k's run is claimable again, from its first message.
    let again = claim_key(
        &store,
        LEASE,
        4 * LEASE,
        "k's run was never claimable again",
    )
    .await?;
    let first_of_k = again
        .messages()
        .iter()
        .find(|m| m.key.as_deref() == Some("k"));
    assert_eq!(first_of_k.map(|m| m.id), Some(run[0].id()));
    drop(in_delivery);
    Ok(())
}

#[tokio::test]
async fn after_a_restart_a_key_is_claimable_as_soon_as_its_relay_gives_up_its_batch()
-> anyhow::Result<()> {
    let (_pg, store, run, in_delivery) = restart_with_k_in_delivery(LONG_LEASE).await?;
    assert!(
        keys(&claim_for(&store, LONG_LEASE).await?).is_empty(),
        "k was claimed while relay a may still be delivering it"
    );

    // Relay "a" is done with the batch: recording its outcome fails (its session is gone),
    // and with that it gives up the fence, long before its lease would have ended it.
    assert!(
        in_delivery
            .settle(&outbox_core::Outcome::delivered(
                &[],
                outbox_core::Retention::Delete
            ))
            .await
            .is_err(),
        "an outcome was recorded on a session that died with the restart"
    );
    let again = claim_key(
        &store,
        LONG_LEASE,
        LONG_LEASE / 4,
        "k stayed fenced after its relay gave up the batch",
    )
    .await?;
    assert_eq!(again.messages()[0].id, run[0].id());
    // The attempt of a batch whose database failed is not counted against its messages.
    assert_eq!(again.messages()[0].attempts, 1);
    Ok(())
}
