//! The relay's statements on a real PostgreSQL (`OUTBOX_TEST_POSTGRES_URL`, default the local
//! `test` database): enqueue of one message and of a batch, a claim + ack round of 100
//! messages, leased and held in a transaction, and the held claim of one batch of 1,000 at
//! 10,000 and at 1,000,000 pending (one group, so that the two times compare). Each run uses
//! a schema of its own and drops it afterwards.

use std::future::Future;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use outbox_core::{ClaimRequest, NewMessage, Outcome, Retention, Store, partition_for};
use outbox_postgres::{PgConfig, PgStore};
use sqlx::postgres::PgPoolOptions;
use tokio::runtime::Runtime;

fn message(n: u64) -> NewMessage {
    NewMessage::json(
        "orders",
        "order.created",
        &serde_json::json!({"order_id": n, "amount": "12.50"}),
    )
    .expect("valid message")
    .key(format!("customer-{}", n % 1000))
}

async fn store() -> anyhow::Result<PgStore> {
    let url = std::env::var("OUTBOX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await?;
    let config = PgConfig::default().schema(format!("bench_{}", uuid::Uuid::now_v7().simple()));
    let store = PgStore::with_config(pool, config)?;
    store.migrate().await?;
    Ok(store)
}

async fn drop_schema(store: &PgStore) {
    let sql = format!("DROP SCHEMA {} CASCADE", store.config().schema);
    let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(store.pool())
        .await;
}

async fn enqueue(store: &PgStore, msgs: &[NewMessage]) -> Duration {
    let started = Instant::now();
    let mut tx = store.pool().begin().await.expect("begin");
    store
        .outbox()
        .enqueue_batch(&mut tx, msgs)
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    started.elapsed()
}

/// Times `iters` rounds of `round` (a claim and ack of 100), each on 100 fresh messages whose
/// enqueue is not timed.
async fn timed_rounds<F, Fut>(store: PgStore, iters: u64, round: F) -> Duration
where
    F: Fn(PgStore) -> Fut,
    Fut: Future<Output = usize>,
{
    let mut total = Duration::ZERO;
    for i in 0..iters {
        let msgs: Vec<_> = (0..100).map(|n| message(i * 100 + n)).collect();
        enqueue(&store, &msgs).await;
        let started = Instant::now();
        let claimed = round(store.clone()).await;
        total += started.elapsed();
        assert_eq!(claimed, 100, "claimed the whole batch");
    }
    total
}

async fn held_round(store: PgStore) -> usize {
    let held = store
        .claim_held(&ClaimRequest::new("bench", 100, Duration::from_secs(30)))
        .await
        .expect("claim")
        .expect("a batch");
    let ids: Vec<_> = held.messages().iter().map(|m| m.id).collect();
    held.settle(&Outcome::delivered(&ids, Retention::Delete))
        .await
        .expect("settle");
    ids.len()
}

async fn lease_round(store: PgStore) -> usize {
    let batch = store
        .claim("bench", 100, Duration::from_secs(30))
        .await
        .expect("claim");
    let ids: Vec<_> = batch.iter().map(|m| m.id).collect();
    store.ack(&ids, Retention::Delete).await.expect("ack");
    ids.len()
}

fn statements(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let store = match rt.block_on(store()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skipping the PostgreSQL benches: {e}");
            return;
        }
    };
    let mut group = c.benchmark_group("postgres");
    group.sample_size(20);
    group.bench_function("enqueue 1 in its own transaction", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let store = store.clone();
            async move {
                let mut total = Duration::ZERO;
                for n in 0..iters {
                    total += enqueue(&store, &[message(n)]).await;
                }
                total
            }
        })
    });
    group.bench_function("enqueue_batch 100", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let store = store.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let msgs: Vec<_> = (0..100).map(message).collect();
                    total += enqueue(&store, &msgs).await;
                }
                total
            }
        })
    });
    rt.block_on(
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {}.outbox_messages",
            store.config().schema
        )))
        .execute(store.pool()),
    )
    .expect("empty the outbox");
    group.bench_function("held claim 100 + settle 100", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| timed_rounds(store.clone(), iters, held_round))
    });
    group.bench_function("lease claim 100 + ack 100", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| timed_rounds(store.clone(), iters, lease_round))
    });
    group.finish();
    rt.block_on(drop_schema(&store));
}

/// Distinct keys of the backlog of the claim-by-backlog bench, as in `message`.
const KEYS: i64 = 1000;

/// Fills the outbox up to `pending` messages shaped like `message` in one INSERT … SELECT:
/// a million enqueues through the API would take minutes. Partitions come from
/// `partition_for` in Rust, one per key, so the rows are what `enqueue` would have written.
async fn fill_to(store: &PgStore, pending: i64) -> anyhow::Result<()> {
    let table = format!(
        "{}.{}messages",
        store.config().schema,
        store.config().table_prefix
    );
    let partitions: Vec<i32> = (0..KEYS)
        .map(|k| partition_for(Some(&format!("customer-{k}")), uuid::Uuid::nil()))
        .collect();
    let have: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(store.pool())
            .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {table} (id, topic, type, key, partition, payload, content_type) \
         SELECT gen_random_uuid(), 'orders', 'order.created', 'customer-' || (i % $3), \
                ($4::int4[])[i % $3 + 1], \
                convert_to(json_build_object('order_id', i, 'amount', '12.50')::text, 'UTF8'), \
                'application/json' \
         FROM generate_series($1::bigint, $2::bigint - 1) AS i"
    )))
    .bind(have)
    .bind(pending)
    .bind(KEYS)
    .bind(partitions)
    .execute(store.pool())
    .await?;
    let (key, partition): (String, i32) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT key, partition FROM {table} ORDER BY seq DESC LIMIT 1"
    )))
    .fetch_one(store.pool())
    .await?;
    anyhow::ensure!(
        partition == partition_for(Some(&key), uuid::Uuid::nil()),
        "{key} filled into partition {partition}"
    );
    // A queue table as autovacuum keeps it: visibility map set, statistics fresh.
    sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
        .execute(store.pool())
        .await?;
    Ok(())
}

/// Times `iters` held claims of one batch of 1,000; each is rolled back untimed, so the
/// backlog keeps its size.
async fn timed_claims(store: PgStore, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let started = Instant::now();
        let held = store
            .claim_held(&ClaimRequest::new("bench", 1000, Duration::from_secs(30)))
            .await
            .expect("claim")
            .expect("a batch");
        total += started.elapsed();
        assert_eq!(held.messages().len(), 1000, "one message of each key");
        held.release().await.expect("roll back");
    }
    total
}

/// The claim of the head of the backlog should not grow with the backlog behind it.
fn claim_by_backlog(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let store = match rt.block_on(store()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skipping the PostgreSQL benches: {e}");
            return;
        }
    };
    let mut group = c.benchmark_group("held claim 1000 of 1000 keys, by pending");
    group.sample_size(20);
    for pending in [10_000, 1_000_000] {
        rt.block_on(fill_to(&store, pending))
            .expect("fill the outbox");
        group.bench_with_input(BenchmarkId::from_parameter(pending), &pending, |b, _| {
            b.to_async(&rt)
                .iter_custom(|iters| timed_claims(store.clone(), iters))
        });
    }
    group.finish();
    rt.block_on(drop_schema(&store));
}

criterion_group!(benches, statements, claim_by_backlog);
criterion_main!(benches);
