//! A silent partition between a running relay and PostgreSQL: a proxy that stops forwarding
//! without closing anything, for longer than every timeout the relay has, then heals. The
//! database itself keeps running (and is checked directly throughout).

mod common;

use outbox_testkit::eventually;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{
    HandlerSink, Message, NewMessage, Relay, RelayConfig, RelayState, RetryPolicy, Store,
};
use outbox_postgres::{ClaimMode, PgStore};
use outbox_testkit::proxy::Proxy;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::time::Instant;
use uuid::Uuid;

const KEYS: usize = 8;
/// Messages enqueued before the freeze, and again during it.
const HALF: usize = 120;
/// The relay's lease: the database ends a held claim's session after it, and a delivery gets
/// four fifths of it.
const LEASE: Duration = Duration::from_secs(3);
/// How long one database operation of the relay may wait for an answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the relay may take to notice that its database stopped answering.
const NOTICE: Duration = Duration::from_secs(8);
/// The freeze outlasts every timeout: the relay's queries, the pool's acquire, the lease (and
/// with it the database's idle-in-transaction timeout of held claims).
const FREEZE: Duration = Duration::from_secs(10);
/// How soon after the heal the relay must deliver everything.
const RECOVERY: Duration = Duration::from_secs(30);

/// Enqueues `n` keyed messages from `from` on, ten per transaction, directly (not proxied).
async fn enqueue(store: &PgStore, from: usize, n: usize) -> anyhow::Result<Vec<(Uuid, String)>> {
    let mut sent = Vec::with_capacity(n);
    let all: Vec<usize> = (from..from + n).collect();
    for chunk in all.chunks(10) {
        let msgs: Vec<NewMessage> = chunk
            .iter()
            .map(|&i| outbox_testkit::msg("orders", i as u64).key(format!("k{}", i % KEYS)))
            .collect();
        let mut tx = store.pool().begin().await?;
        store.outbox().enqueue_batch(&mut tx, &msgs).await?;
        tx.commit().await?;
        sent.extend(
            msgs.iter()
                .map(|m| (m.id(), m.key_ref().unwrap().to_owned())),
        );
    }
    Ok(sent)
}

fn relay_config() -> RelayConfig {
    RelayConfig::default()
        .batch_size(10)
        .poll_interval(Duration::from_millis(50))
        .lease(LEASE)
        // Only the partition fails anything here: nothing may run out of attempts.
        .retry(
            RetryPolicy::default()
                .max_attempts(1000)
                .base_delay(Duration::from_millis(20))
                .max_delay(Duration::from_millis(200)),
        )
        .rebalance_interval(Duration::from_millis(200))
        .recover_interval(Duration::from_millis(500))
        .shutdown_timeout(Duration::from_secs(2))
}

/// Per key, the ids in order of first arrival are the ids in enqueue order, all there.
fn assert_per_key_order(sent: &[(Uuid, String)], seen: &[(Uuid, String)]) {
    let mut want: HashMap<&str, Vec<Uuid>> = HashMap::new();
    for (id, key) in sent {
        want.entry(key).or_default().push(*id);
    }
    let mut first = HashSet::new();
    let mut got: HashMap<&str, Vec<Uuid>> = HashMap::new();
    for (id, key) in seen {
        if first.insert(*id) {
            got.entry(key).or_default().push(*id);
        }
    }
    for (key, ids) in &want {
        assert_eq!(
            got.get(key),
            Some(ids),
            "key {key}: out of order or missing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_survives_a_silent_partition_from_its_database() -> anyhow::Result<()> {
    survive_a_partition(ClaimMode::Transaction).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leasing_relay_survives_a_silent_partition_from_its_database() -> anyhow::Result<()> {
    survive_a_partition(ClaimMode::Lease).await
}

async fn survive_a_partition(mode: ClaimMode) -> anyhow::Result<()> {
    let direct = common::fresh_store().await?;
    direct.migrate().await?;
    let options = PgConnectOptions::from_str(&common::url())?;
    let proxy = Proxy::start(&format!("{}:{}", options.get_host(), options.get_port())).await?;
    let pool = PgPoolOptions::new()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy_with(options.port(proxy.port()));
    let via_proxy = PgStore::with_config(pool, direct.config().clone())?
        .with_query_timeout(QUERY_TIMEOUT)
        .with_claim_mode(mode);

    let seen: Arc<Mutex<Vec<(Uuid, String)>>> = Arc::default();
    let record = seen.clone();
    let sink = HandlerSink::new(move |m: Message| {
        let record = record.clone();
        async move {
            // Slow enough that the freeze lands in the middle of the drain.
            tokio::time::sleep(Duration::from_millis(5)).await;
            record
                .lock()
                .unwrap()
                .push((m.id, m.key.unwrap_or_default()));
            Ok(())
        }
    });
    let distinct = || {
        seen.lock()
            .unwrap()
            .iter()
            .map(|(id, _)| *id)
            .collect::<HashSet<_>>()
            .len()
    };

    let mut sent = enqueue(&direct, 0, HALF).await?;
    let relay = Relay::with_config(Arc::new(via_proxy), Arc::new(sink), relay_config());
    let stats = relay.stats();
    let mut state = relay.state();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    eventually("the first deliveries", RECOVERY, || async {
        distinct() >= 20
    })
    .await;

    proxy.freeze();
    let frozen_at = Instant::now();
    sent.extend(enqueue(&direct, HALF, HALF).await?);
    // The relay must say that its database is gone rather than wait on it forever.
    let noticed = tokio::time::timeout(NOTICE, state.wait_for(|s| *s == RelayState::DatabaseDown))
        .await
        .is_ok();
    assert!(
        noticed,
        "the relay did not notice within {NOTICE:?} that its database stopped answering \
         (state {:?}, {} of {} delivered)",
        *state.borrow(),
        distinct(),
        2 * HALF
    );
    tokio::time::sleep_until(frozen_at + FREEZE).await;
    let during = direct.status().await?;
    assert_eq!(during.dead, 0, "dead during the partition: {during:?}");

    proxy.heal();
    let healed_at = Instant::now();
    eventually(
        "every message delivered after the heal",
        RECOVERY,
        || async { distinct() == 2 * HALF },
    )
    .await;
    eventually("the outbox to empty after the heal", RECOVERY, || async {
        let s = direct.status().await.unwrap();
        s.pending == 0 && s.in_flight == 0
    })
    .await;
    let recovered_in = healed_at.elapsed();
    let end = direct.status().await?;
    assert_eq!((end.pending, end.in_flight, end.dead), (0, 0, 0), "{end:?}");
    assert_per_key_order(&sent, &seen.lock().unwrap());
    let _ = stop.send(());
    let report = tokio::time::timeout(RECOVERY, running).await??;
    assert_eq!(report.dead, 0, "{report:?}");
    eprintln!(
        "database partition ({mode:?}): {} arrivals for {} messages, all delivered {recovered_in:?} after \
         the heal, {:?}",
        seen.lock().unwrap().len(),
        2 * HALF,
        stats.report()
    );
    common::drop_schema(&direct).await
}
