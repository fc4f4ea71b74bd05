//! The SQLite store's own behaviour on real files: enqueue, claim, per-key order, leases,
//! failures, dead letters, retention, migrations and configuration.

mod common;

use std::time::Duration;

use futures::FutureExt;
use outbox_core::{Failure, NewMessage, Retention, Status, Store, StoreError};
use outbox_sqlite::{LATEST_VERSION, SqliteConfig, SqliteStore};
use uuid::Uuid;

type R = anyhow::Result<()>;

const LEASE: Duration = Duration::from_secs(30);
const HOUR: Duration = Duration::from_secs(3600);

fn msg(n: u64) -> NewMessage {
    NewMessage::json("orders", "order.created", &serde_json::json!({ "n": n })).unwrap()
}

async fn migrated() -> anyhow::Result<common::SqliteFile> {
    let f = common::fresh().await?;
    f.store.migrate().await?;
    Ok(f)
}

async fn enqueue(store: &SqliteStore, msgs: &[NewMessage]) -> R {
    let mut tx = store.pool().begin().await?;
    store.outbox().enqueue_batch(&mut tx, msgs).await?;
    tx.commit().await?;
    Ok(())
}

fn ids(msgs: &[outbox_core::Message]) -> Vec<Uuid> {
    msgs.iter().map(|m| m.id).collect()
}

async fn claim_ids(store: &SqliteStore, relay: &str) -> anyhow::Result<Vec<Uuid>> {
    Ok(ids(&store.claim(relay, 100, LEASE).await?))
}

#[tokio::test]
async fn committed_enqueue_is_claimable_with_its_fields() -> R {
    let f = migrated().await?;
    let m = msg(1).key("k-1").header("trace", "abc");
    let mut tx = f.store.pool().begin().await?;
    f.store.outbox().enqueue(&mut tx, &m).await?;
    tx.commit().await?;

    let got = f.store.claim("r", 10, LEASE).await?;
    assert_eq!(got.len(), 1);
    let c = &got[0];
    assert_eq!(c.id, m.id());
    assert_eq!(c.topic, "orders");
    assert_eq!(c.message_type, "order.created");
    assert_eq!(c.key.as_deref(), Some("k-1"));
    assert_eq!(c.partition, m.partition());
    assert_eq!(c.payload, m.payload());
    assert_eq!(c.content_type, outbox_core::JSON);
    assert_eq!(c.headers.get("trace").map(String::as_str), Some("abc"));
    assert_eq!(c.status, Status::InFlight);
    assert_eq!(c.attempts, 1);
    // The lease is recorded in available_at.
    assert!(c.available_at >= c.created_at + chrono::Duration::seconds(29));
    Ok(())
}

#[tokio::test]
async fn uncommitted_and_rolled_back_enqueues_are_invisible() -> R {
    let f = migrated().await?;
    let mut tx = f.store.pool().begin().await?;
    f.store.outbox().enqueue(&mut tx, &msg(1)).await?;
    // WAL lets this read run beside the open write transaction.
    assert_eq!(f.store.status().await?.pending, 0);
    tx.rollback().await?;
    assert!(claim_ids(&f.store, "r").await?.is_empty());
    assert_eq!(f.store.status().await?.pending, 0);
    Ok(())
}

#[tokio::test]
async fn batch_of_a_thousand_is_claimed_in_enqueue_order() -> R {
    let f = migrated().await?;
    let msgs: Vec<_> = (0..1000).map(msg).collect();
    enqueue(&f.store, &msgs).await?;
    let got = f.store.claim("r", 5000, LEASE).await?;
    assert_eq!(
        ids(&got),
        msgs.iter().map(NewMessage::id).collect::<Vec<_>>()
    );
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
    Ok(())
}

#[tokio::test]
async fn empty_batch_is_a_no_op() -> R {
    let f = migrated().await?;
    enqueue(&f.store, &[]).await?;
    assert_eq!(f.store.status().await?, Default::default());
    Ok(())
}

#[tokio::test]
async fn a_key_goes_out_as_a_run_and_its_next_message_waits_for_the_first() -> R {
    let f = migrated().await?;
    let (a, b, other) = (msg(1).key("k"), msg(2).key("k"), msg(3).key("j"));
    enqueue(&f.store, &[a.clone(), b.clone(), other.clone()]).await?;

    // The run of "k" in waves: a with the other key's head, then b.
    assert_eq!(
        claim_ids(&f.store, "r1").await?,
        vec![a.id(), other.id(), b.id()]
    );
    assert!(claim_ids(&f.store, "r2").await?.is_empty());
    // b given back while a is still in flight: b waits for a.
    f.store.release("r1", &[b.id()]).await?;
    assert!(claim_ids(&f.store, "r2").await?.is_empty());
    assert_eq!(f.store.ack(&[a.id()], Retention::Delete).await?, 1);
    assert_eq!(claim_ids(&f.store, "r2").await?, vec![b.id()]);
    Ok(())
}

#[tokio::test]
async fn a_pending_retry_holds_back_its_key() -> R {
    let f = migrated().await?;
    let (a, b) = (msg(1).key("k"), msg(2).key("k"));
    enqueue(&f.store, &[a.clone(), b.clone()]).await?;
    assert_eq!(claim_ids(&f.store, "r").await?, vec![a.id(), b.id()]);
    let later = Failure {
        id: a.id(),
        error: "broker down".into(),
        retry_in: Some(HOUR),
    };
    f.store.fail("r", &[later]).await?;
    f.store.release("r", &[b.id()]).await?;
    assert!(claim_ids(&f.store, "r").await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn an_expired_lease_is_reclaimed_and_the_old_holder_loses_it() -> R {
    let f = migrated().await?;
    let m = msg(1).key("k");
    enqueue(&f.store, std::slice::from_ref(&m)).await?;

    let first = f.store.claim("a", 10, Duration::ZERO).await?;
    assert_eq!(ids(&first), vec![m.id()]);
    let second = f.store.claim("b", 10, LEASE).await?;
    assert_eq!(ids(&second), vec![m.id()]);
    assert_eq!(second[0].attempts, 2);

    // The old holder's late outcomes change nothing.
    let dead = Failure {
        id: m.id(),
        error: "late".into(),
        retry_in: None,
    };
    f.store.fail("a", &[dead]).await?;
    f.store.release("a", &[m.id()]).await?;
    let s = f.store.status().await?;
    assert_eq!((s.in_flight, s.dead, s.pending), (1, 0, 0));
    Ok(())
}

#[tokio::test]
async fn failure_with_a_delay_retries_and_without_one_is_dead() -> R {
    let f = migrated().await?;
    let (retry, dead) = (msg(1), msg(2));
    enqueue(&f.store, &[retry.clone(), dead.clone()]).await?;
    f.store.claim("r", 10, LEASE).await?;
    let failures = [
        Failure {
            id: retry.id(),
            error: "timeout".into(),
            retry_in: Some(Duration::ZERO),
        },
        Failure {
            id: dead.id(),
            error: "rejected".into(),
            retry_in: None,
        },
    ];
    f.store.fail("r", &failures).await?;

    let again = f.store.claim("r", 10, LEASE).await?;
    assert_eq!(ids(&again), vec![retry.id()]);
    assert_eq!(again[0].attempts, 2);
    assert_eq!(again[0].last_error.as_deref(), Some("timeout"));

    let dl = f.store.dead_list(10).await?;
    assert_eq!(ids(&dl), vec![dead.id()]);
    assert_eq!(dl[0].status, Status::Dead);
    assert_eq!(dl[0].last_error.as_deref(), Some("rejected"));
    assert_eq!(f.store.status().await?.dead, 1);
    Ok(())
}

#[tokio::test]
async fn release_gives_back_the_attempt() -> R {
    let f = migrated().await?;
    let m = msg(1);
    enqueue(&f.store, std::slice::from_ref(&m)).await?;
    f.store.claim("r", 10, LEASE).await?;
    f.store.release("r", &[m.id()]).await?;
    let got = f.store.claim("r", 10, LEASE).await?;
    assert_eq!(ids(&got), vec![m.id()]);
    assert_eq!(got[0].attempts, 1);
    Ok(())
}

async fn make_dead(store: &SqliteStore, msgs: &[NewMessage]) -> R {
    enqueue(store, msgs).await?;
    let claimed = store.claim("r", 100, LEASE).await?;
    let failures: Vec<_> = claimed
        .iter()
        .map(|m| Failure {
            id: m.id,
            error: "boom".into(),
            retry_in: None,
        })
        .collect();
    store.fail("r", &failures).await?;
    Ok(())
}

#[tokio::test]
async fn dead_letters_are_retried_with_a_fresh_count_and_wake_the_relay() -> R {
    let f = migrated().await?;
    let (a, b) = (msg(1), msg(2));
    make_dead(&f.store, &[a.clone(), b.clone()]).await?;
    let wake = f.store.notifier();

    assert_eq!(f.store.dead_retry(Some(&[a.id()])).await?, 1);
    assert!(wake.notified().now_or_never().is_some(), "no wake-up");
    let got = f.store.claim("r", 10, LEASE).await?;
    assert_eq!(ids(&got), vec![a.id()]);
    assert_eq!(got[0].attempts, 1);

    assert_eq!(f.store.dead_retry(None).await?, 1);
    assert_eq!(claim_ids(&f.store, "r").await?, vec![b.id()]);
    assert_eq!(f.store.dead_retry(None).await?, 0);
    Ok(())
}

#[tokio::test]
async fn dead_letters_are_purged_by_age_or_all() -> R {
    let f = migrated().await?;
    make_dead(&f.store, &[msg(1), msg(2)]).await?;
    assert_eq!(f.store.dead_purge(Some(HOUR)).await?, 0);
    assert_eq!(f.store.dead_purge(Some(Duration::ZERO)).await?, 2);
    make_dead(&f.store, &[msg(3)]).await?;
    assert_eq!(f.store.dead_purge(None).await?, 1);
    assert!(f.store.dead_list(10).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn kept_deliveries_are_purged_in_bounded_batches() -> R {
    let f = migrated().await?;
    let msgs: Vec<_> = (0..3).map(msg).collect();
    enqueue(&f.store, &msgs).await?;
    let claimed = claim_ids(&f.store, "r").await?;
    assert_eq!(f.store.ack(&claimed, Retention::Keep(HOUR)).await?, 3);
    // A second ack finds nothing in flight.
    assert_eq!(f.store.ack(&claimed, Retention::Keep(HOUR)).await?, 0);
    assert_eq!(f.store.status().await?.delivered, 3);

    assert_eq!(f.store.purge_delivered(HOUR, 10).await?, 0);
    assert_eq!(f.store.purge_delivered(Duration::ZERO, 2).await?, 2);
    assert_eq!(f.store.purge_delivered(Duration::ZERO, 10).await?, 1);
    Ok(())
}

#[tokio::test]
async fn delayed_messages_wait_and_count_as_pending() -> R {
    let f = migrated().await?;
    let past = chrono::Utc::now() - chrono::Duration::seconds(5);
    let (now, delayed, due) = (msg(1), msg(2).delay(HOUR), msg(3).available_at(past));
    enqueue(&f.store, &[now.clone(), delayed, due.clone()]).await?;
    assert_eq!(claim_ids(&f.store, "r").await?, vec![now.id(), due.id()]);
    let s = f.store.status().await?;
    assert_eq!((s.pending, s.in_flight), (1, 2));
    assert!(s.oldest_pending_age_seconds.is_some_and(|a| a >= 0.0));
    Ok(())
}

#[tokio::test]
async fn status_has_no_age_without_pending_messages() -> R {
    let f = migrated().await?;
    assert_eq!(f.store.status().await?.oldest_pending_age_seconds, None);
    Ok(())
}

async fn applied_versions(store: &SqliteStore) -> anyhow::Result<Vec<i64>> {
    Ok(
        sqlx::query_scalar("SELECT version FROM outbox_schema_migrations ORDER BY version")
            .fetch_all(store.pool())
            .await?,
    )
}

async fn has_index(store: &SqliteStore, name: &str) -> anyhow::Result<bool> {
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = ?1")
            .bind(name)
            .fetch_one(store.pool())
            .await?;
    Ok(n == 1)
}

#[tokio::test]
async fn migrating_twice_changes_nothing() -> R {
    let f = migrated().await?;
    enqueue(&f.store, &[msg(1)]).await?;
    f.store.migrate().await?;
    assert_eq!(
        applied_versions(&f.store).await?,
        (1..=LATEST_VERSION).collect::<Vec<_>>()
    );
    assert_eq!(f.store.status().await?.pending, 1);
    Ok(())
}

#[tokio::test]
async fn migrate_to_stops_at_the_version_asked_for() -> R {
    let f = common::fresh().await?;
    f.store.migrate_to(1).await?;
    assert_eq!(applied_versions(&f.store).await?, vec![1]);
    assert!(!has_index(&f.store, "outbox_messages_dead").await?);

    // This build's claim reads the paused topics of version 4, so the dead letter is written
    // the way version 1 stores one.
    enqueue(&f.store, &[msg(1)]).await?;
    sqlx::query("UPDATE outbox_messages SET status = 'dead', dead_at = 0, last_error = 'boom'")
        .execute(f.store.pool())
        .await?;
    f.store.migrate().await?;
    assert_eq!(
        applied_versions(&f.store).await?,
        (1..=LATEST_VERSION).collect::<Vec<_>>()
    );
    assert!(has_index(&f.store, "outbox_messages_dead").await?);
    assert_eq!(f.store.dead_list(10).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn invalid_prefixes_are_rejected_by_the_constructor() -> R {
    let f = common::fresh().await?;
    for bad in ["", "Outbox_", "1outbox", "out-box", "o x", "outbox;drop"] {
        let config = SqliteConfig::default().table_prefix(bad);
        let err = SqliteStore::with_config(f.store.pool().clone(), config).unwrap_err();
        assert!(matches!(err, StoreError::Config(_)), "{bad:?}: {err}");
    }
    for good in ["_", "app_outbox_", "o2_"] {
        let config = SqliteConfig::default().table_prefix(good);
        assert!(SqliteStore::with_config(f.store.pool().clone(), config).is_ok());
    }
    Ok(())
}

#[tokio::test]
async fn connect_creates_the_file_in_wal_mode() -> R {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("new.db");
    // The short `sqlite:PATH` form is accepted as well as `sqlite://PATH`.
    let store = SqliteStore::connect(&format!("sqlite:{}", path.display())).await?;
    store.migrate().await?;
    assert!(path.exists());
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(store.pool())
        .await?;
    assert_eq!(mode, "wal");
    store.pool().close().await;
    Ok(())
}

/// A status this build does not know (corrupt data, or a schema written by a newer build) is
/// an error naming it, never read back as `pending`, which would put the message in delivery.
#[tokio::test]
async fn an_unknown_status_read_back_is_an_error_not_pending() -> R {
    let f = migrated().await?;
    let m = msg(1);
    enqueue(&f.store, std::slice::from_ref(&m)).await?;
    let mut conn = f.store.pool().acquire().await?;
    // The table's CHECK keeps the status to the known ones: only corruption gets past it.
    sqlx::query("PRAGMA ignore_check_constraints = ON")
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE outbox_messages SET status = 'archived' WHERE id = ?1")
        .bind(m.id().to_string())
        .execute(&mut *conn)
        .await?;
    sqlx::query("PRAGMA ignore_check_constraints = OFF")
        .execute(&mut *conn)
        .await?;
    drop(conn);
    let read = f.store.get_message(m.id()).await;
    let e = read.expect_err("a message of unknown status was read back");
    assert!(e.to_string().contains("\"archived\""), "{e}");
    Ok(())
}
