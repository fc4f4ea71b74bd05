//! Log-based capture against a real PostgreSQL with `wal_level = logical`: a private cluster per
//! test (the shared server runs with `replica`, and other tests rely on it as it is).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_capture::{CaptureConfig, CaptureReport, CaptureState, WalRelay};
use outbox_core::{
    Delivery, Message, NewMessage, RelayConfig, RetryPolicy, Sink, SinkError, Store, async_trait,
};
use outbox_postgres::{EnqueueMode, PgConfig, PgStore};
use outbox_testkit::cluster::PgCluster;
use outbox_testkit::eventually;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(30);

/// Runs a test once with each way of writing for the stream: logical messages (message
/// capture) and rows of the outbox table (table capture).
macro_rules! both_ways {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn messages() -> anyhow::Result<()> {
                super::$name(outbox_postgres::EnqueueMode::WalMessage).await
            }
            #[tokio::test]
            async fn rows() -> anyhow::Result<()> {
                super::$name(outbox_postgres::EnqueueMode::CapturedRow).await
            }
        }
    )*};
}

both_ways!(
    committed_messages_arrive_in_commit_order_and_rolled_back_ones_never,
    a_failing_key_retries_from_the_table_and_its_newer_messages_wait_behind_it,
    a_relay_that_dies_before_confirming_is_replayed_by_the_next,
    a_sink_that_panics_fails_its_wave_and_the_relay_goes_on,
    a_delayed_message_waits_in_the_table_with_its_key_behind_it,
);

struct Db {
    cluster: PgCluster,
    url: String,
}

impl Db {
    fn start() -> anyhow::Result<Self> {
        let cluster = PgCluster::start_with(&["wal_level=logical", "max_wal_senders=10"])?;
        cluster.create_database("outbox")?;
        let url = cluster.url("outbox");
        Ok(Self { cluster, url })
    }

    async fn store(&self, mode: EnqueueMode) -> anyhow::Result<PgStore> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&self.url)
            .await?;
        let store = PgStore::with_config(pool, PgConfig::default())?.with_enqueue_mode(mode);
        store.migrate().await?;
        Ok(store)
    }
}

/// Records what it delivers; fails what `fail` says, as many times as it says.
#[derive(Clone, Default)]
struct Recording {
    seen: Arc<Mutex<Vec<Message>>>,
    /// Transient failures left per message type.
    fail: Arc<Mutex<HashMap<String, usize>>>,
    /// A message of this type makes the sink hang (until the test gives up on the relay).
    hang_on: Option<String>,
    hanging: Arc<AtomicBool>,
}

impl Recording {
    fn failing(kind: &str, times: usize) -> Self {
        let r = Self::default();
        r.fail.lock().unwrap().insert(kind.into(), times);
        r
    }
    fn messages(&self) -> Vec<Message> {
        self.seen.lock().unwrap().clone()
    }
    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    fn one(&self, m: &Message) -> Delivery {
        if m.message_type == "poison" {
            return Err(SinkError::permanent("rejected: poison"));
        }
        if let Some(left) = self.fail.lock().unwrap().get_mut(&m.message_type)
            && *left > 0
        {
            *left -= 1;
            return Err(SinkError::transient("receiver down"));
        }
        self.seen.lock().unwrap().push(m.clone());
        Ok(())
    }
}

#[async_trait]
impl Sink for Recording {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        if let Some(m) = batch.iter().find(|m| m.message_type == "panics")
            && self.fail.lock().unwrap().remove("panics").is_some()
        {
            panic!("the sink choked on {}", m.id);
        }
        if batch
            .iter()
            .any(|m| Some(&m.message_type) == self.hang_on.as_ref())
        {
            self.hanging.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        batch.iter().map(|m| self.one(m)).collect()
    }
    fn name(&self) -> &str {
        "recording"
    }
}

struct Running {
    stop: watch::Sender<bool>,
    state: watch::Receiver<CaptureState>,
    task: JoinHandle<anyhow::Result<CaptureReport>>,
}

impl Running {
    async fn stop(self) -> anyhow::Result<CaptureReport> {
        self.stop.send_replace(true);
        self.task.await?
    }

    async fn reaches(&mut self, state: CaptureState) -> anyhow::Result<()> {
        tokio::time::timeout(WAIT, self.state.wait_for(|s| *s == state)).await??;
        Ok(())
    }
}

fn config() -> CaptureConfig {
    let retry = RetryPolicy::default()
        .max_attempts(4)
        .base_delay(Duration::from_millis(20))
        .max_delay(Duration::from_millis(40));
    CaptureConfig::default()
        .batch_size(100)
        .retry(retry)
        .standby_retry(Duration::from_millis(100))
        .relay(RelayConfig::default().poll_interval(Duration::from_millis(100)))
}

async fn run(db: &Db, sink: Recording) -> anyhow::Result<Running> {
    let store = db.store(EnqueueMode::Row).await?;
    let relay = WalRelay::new(&db.url, store, Arc::new(sink), config())?;
    let (stop, mut stopped) = watch::channel(false);
    let state = relay.state();
    let task = tokio::spawn(async move {
        let until = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        Ok(relay.run(until).await?)
    });
    Ok(Running { stop, state, task })
}

async fn emit(store: &PgStore, msgs: &[NewMessage]) -> anyhow::Result<()> {
    let mut tx = store.pool().begin().await?;
    store.outbox().enqueue_batch(&mut tx, msgs).await?;
    tx.commit().await?;
    Ok(())
}

fn msg(kind: &str, key: &str, n: usize) -> NewMessage {
    NewMessage::json("orders", kind, &serde_json::json!({ "n": n }))
        .expect("valid message")
        .key(key)
}

fn n_of(m: &Message) -> usize {
    m.json::<serde_json::Value>().expect("json")["n"]
        .as_u64()
        .expect("n") as usize
}

/// Per key, the `n` of each delivery in the order the sink got them.
fn per_key(msgs: &[Message]) -> BTreeMap<String, Vec<usize>> {
    let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for m in msgs {
        out.entry(m.key.clone().unwrap_or_default())
            .or_default()
            .push(n_of(m));
    }
    out
}

async fn rows(store: &PgStore, status: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM outbox_messages WHERE status = $1")
            .bind(status)
            .fetch_one(store.pool())
            .await?,
    )
}

/// Writers racing on five keys. Each transaction emits its message first and only then takes
/// the key's counter under its row lock, so messages are written to the WAL in one order and
/// committed in another; the counter, kept with the message's id, is the commit order of the
/// key's writers. Every seventh transaction rolls back (with its counter).
async fn committed_messages_arrive_in_commit_order_and_rolled_back_ones_never(
    mode: EnqueueMode,
) -> anyhow::Result<()> {
    let db = Db::start()?;
    let writer = db.store(mode).await?;
    sqlx::raw_sql(
        "CREATE TABLE counters (key text PRIMARY KEY, n int NOT NULL); \
         CREATE TABLE placed (id uuid PRIMARY KEY, n int NOT NULL); \
         INSERT INTO counters SELECT 'k' || i, 0 FROM generate_series(0, 4) i",
    )
    .execute(writer.pool())
    .await?;
    let sink = Recording::default();
    let mut relay = run(&db, sink.clone()).await?;
    relay.reaches(CaptureState::Streaming).await?;

    let mut writers = Vec::new();
    for w in 0..4 {
        let store = writer.clone();
        writers.push(tokio::spawn(async move {
            let mut committed = 0;
            for i in 0..50usize {
                let key = format!("k{}", (i + w) % 5);
                let kind = if i % 7 == 3 { "rolled.back" } else { "placed" };
                let m = msg(kind, &key, w * 100 + i);
                let mut tx = store.pool().begin().await?;
                store.outbox().enqueue(&mut tx, &m).await?;
                let n: i32 =
                    sqlx::query_scalar("UPDATE counters SET n = n + 1 WHERE key = $1 RETURNING n")
                        .bind(&key)
                        .fetch_one(&mut *tx)
                        .await?;
                sqlx::query("INSERT INTO placed VALUES ($1, $2)")
                    .bind(m.id())
                    .bind(n)
                    .execute(&mut *tx)
                    .await?;
                if kind == "placed" {
                    tx.commit().await?;
                    committed += 1;
                } else {
                    tx.rollback().await?;
                }
            }
            anyhow::Ok(committed)
        }));
    }
    let mut committed = 0;
    for w in writers {
        committed += w.await??;
    }
    eventually("every committed message delivered", WAIT, || async {
        sink.count() >= committed
    })
    .await;
    let report = relay.stop().await?;

    let order: HashMap<uuid::Uuid, i32> = sqlx::query_as("SELECT id, n FROM placed")
        .fetch_all(writer.pool())
        .await?
        .into_iter()
        .collect();
    let seen = sink.messages();
    assert_eq!(seen.len(), committed, "each committed message once");
    assert!(seen.iter().all(|m| m.message_type == "placed"));
    let mut by_key: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for m in &seen {
        by_key
            .entry(m.key.clone().unwrap_or_default())
            .or_default()
            .push(order[&m.id]);
    }
    for (key, ns) in by_key {
        let expected: Vec<i32> = (1..=ns.len() as i32).collect();
        assert_eq!(
            ns, expected,
            "{key}: delivered in commit order, with no gap"
        );
    }
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    for m in &seen {
        let prev = last_seq.insert(m.key.clone().unwrap_or_default(), m.seq);
        assert!(
            prev.is_none_or(|p| p < m.seq),
            "seq follows commit order: {prev:?} then {m:?}"
        );
    }
    assert_eq!(report.delivered as usize, committed);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_messages")
        .fetch_one(writer.pool())
        .await?;
    assert_eq!(
        left, 0,
        "nothing left in the table: no row, or each row removed once delivered"
    );
    Ok(())
}

async fn a_failing_key_retries_from_the_table_and_its_newer_messages_wait_behind_it(
    mode: EnqueueMode,
) -> anyhow::Result<()> {
    let db = Db::start()?;
    let writer = db.store(mode).await?;
    let sink = Recording::failing("flaky", 2);
    let mut relay = run(&db, sink.clone()).await?;
    relay.reaches(CaptureState::Streaming).await?;

    emit(&writer, &[msg("flaky", "a", 1), msg("placed", "b", 1)]).await?;
    for n in 2..=5 {
        emit(&writer, &[msg("placed", "a", n), msg("placed", "b", n)]).await?;
    }
    emit(&writer, &[msg("poison", "c", 1), msg("placed", "c", 2)]).await?;
    eventually("both keys delivered whole", WAIT, || async {
        sink.count() >= 11
    })
    .await;
    eventually("the table drained", WAIT, || async {
        rows(&writer, "pending").await.unwrap_or(-1) == 0
    })
    .await;
    let report = relay.stop().await?;

    let by_key = per_key(&sink.messages());
    assert_eq!(
        by_key["a"],
        vec![1, 2, 3, 4, 5],
        "a's newer messages waited behind its retry"
    );
    assert_eq!(by_key["b"], vec![1, 2, 3, 4, 5], "b never waited for a");
    assert_eq!(by_key["c"], vec![2], "a dead letter does not hold its key");
    assert!(report.retried >= 1 && report.waiting >= 1, "{report:?}");
    assert_eq!(report.dead, 1, "{report:?}");
    let (status, error): (String, Option<String>) =
        sqlx::query_as("SELECT status, last_error FROM outbox_messages WHERE type = 'poison'")
            .fetch_one(writer.pool())
            .await?;
    assert_eq!(status, "dead");
    assert!(error.unwrap_or_default().contains("poison"));
    Ok(())
}

async fn a_relay_that_dies_before_confirming_is_replayed_by_the_next(
    mode: EnqueueMode,
) -> anyhow::Result<()> {
    let db = Db::start()?;
    let writer = db.store(mode).await?;
    let first = Recording {
        hang_on: Some("hang".into()),
        ..Recording::default()
    };
    let mut relay = run(&db, first.clone()).await?;
    relay.reaches(CaptureState::Streaming).await?;
    for n in 1..=4 {
        emit(&writer, &[msg("placed", "a", n)]).await?;
    }
    eventually("the first four delivered", WAIT, || async {
        first.count() == 4
    })
    .await;
    emit(&writer, &[msg("hang", "a", 5)]).await?;
    for n in 6..=8 {
        emit(&writer, &[msg("placed", "a", n)]).await?;
    }
    // Wait until the relay is stuck in the sink with message 5, then kill it there.
    eventually("the relay is in the sink with message 5", WAIT, || async {
        first.hanging.load(Ordering::SeqCst)
    })
    .await;
    relay.task.abort();
    let _ = relay.task.await;

    let second = Recording::default();
    let next = run(&db, second.clone()).await?;
    eventually("5 to 8 delivered by the next relay", WAIT, || async {
        second.messages().iter().filter(|m| n_of(m) >= 5).count() >= 4
    })
    .await;
    next.stop().await?;
    let after: Vec<usize> = second
        .messages()
        .iter()
        .map(n_of)
        .filter(|&n| n >= 5)
        .collect();
    assert_eq!(
        after,
        vec![5, 6, 7, 8],
        "replayed from the confirmed position, in order"
    );
    assert!(
        first.messages().iter().all(|m| n_of(m) <= 4),
        "nothing after the hung message went out"
    );
    if mode == EnqueueMode::CapturedRow {
        // Rows of the first four were deleted once delivered: a replay that meets them again,
        // confirmed or not, does not send them twice.
        let again: Vec<usize> = second
            .messages()
            .iter()
            .map(n_of)
            .filter(|&n| n < 5)
            .collect();
        assert!(again.is_empty(), "delivered again: {again:?}");
    }
    drop(db.cluster);
    Ok(())
}

#[tokio::test]
async fn a_standby_takes_over_when_the_streaming_relay_dies() -> anyhow::Result<()> {
    let db = Db::start()?;
    let writer = db.store(EnqueueMode::WalMessage).await?;
    let first = Recording::default();
    let mut active = run(&db, first.clone()).await?;
    active.reaches(CaptureState::Streaming).await?;
    let second = Recording::default();
    let mut standby = run(&db, second.clone()).await?;
    standby.reaches(CaptureState::Standby).await?;

    emit(&writer, &[msg("placed", "a", 1)]).await?;
    eventually("the active relay delivered", WAIT, || async {
        first.count() == 1
    })
    .await;
    active.task.abort();
    let _ = active.task.await;
    standby.reaches(CaptureState::Streaming).await?;
    emit(&writer, &[msg("placed", "a", 2)]).await?;
    eventually("the standby took over", WAIT, || async {
        second.messages().iter().any(|m| n_of(m) == 2)
    })
    .await;
    let report = standby.stop().await?;
    assert_eq!(report.sessions, 1);
    assert_eq!(second.messages().iter().map(n_of).max(), Some(2));
    Ok(())
}

#[tokio::test]
async fn setup_says_what_to_change_when_wal_level_is_not_logical() -> anyhow::Result<()> {
    let cluster = PgCluster::start_new()?;
    cluster.create_database("outbox")?;
    let store = PgStore::connect(&cluster.url("outbox"), PgConfig::default()).await?;
    let err = store
        .setup_capture(Some("outbox_slot"))
        .await
        .expect_err("replica cannot decode");
    let text = err.to_string();
    assert!(
        text.contains("wal_level = logical") && text.contains("replica"),
        "{text}"
    );
    assert!(
        text.contains("ALTER SYSTEM SET wal_level = logical"),
        "{text}"
    );
    Ok(())
}

/// A relay stuck in its sink confirms nothing: the slot's lag grows, and the relay reports it
/// in its counters, in its warnings (readiness lists them) and in the `outbox_capture` gauge.
#[tokio::test]
async fn a_slot_falling_behind_is_reported_with_its_lag() -> anyhow::Result<()> {
    let db = Db::start()?;
    let writer = db.store(EnqueueMode::WalMessage).await?;
    let sink = Recording {
        hang_on: Some("hang".into()),
        ..Recording::default()
    };
    let store = db.store(EnqueueMode::Row).await?;
    let relay = WalRelay::new(
        &db.url,
        store.clone(),
        Arc::new(sink.clone()),
        config()
            .lag_interval(Duration::from_millis(50))
            .lag_warning(1024),
    )?;
    let (stats, warnings) = (relay.stats(), relay.warnings());
    assert!(
        warnings().is_empty(),
        "nothing to warn about before the start"
    );
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(relay.run(async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    eventually("the slot exists", WAIT, || async {
        store.slots().await.is_ok_and(|s| s.len() == 1)
    })
    .await;
    emit(&writer, &[msg("hang", "a", 1)]).await?;
    let filler: Vec<NewMessage> = (0..50).map(|n| msg("placed", "b", n)).collect();
    emit(&writer, &filler).await?;
    eventually("the lag is read past the warning", WAIT, || async {
        stats.slot_lag_bytes().is_some_and(|l| l > 1024)
    })
    .await;
    let text = warnings().join("; ");
    assert!(
        text.contains("public_outbox_slot") && text.contains("bytes of WAL"),
        "{text}"
    );
    let slots = store.slots().await?;
    assert!(slots[0].active && slots[0].lag_bytes > 1024, "{slots:?}");
    stop.send_replace(true);
    task.abort();
    Ok(())
}

async fn a_sink_that_panics_fails_its_wave_and_the_relay_goes_on(
    mode: EnqueueMode,
) -> anyhow::Result<()> {
    let db = Db::start()?;
    let writer = db.store(mode).await?;
    let sink = Recording::failing("panics", 1);
    let mut relay = run(&db, sink.clone()).await?;
    relay.reaches(CaptureState::Streaming).await?;
    emit(&writer, &[msg("panics", "a", 1), msg("placed", "b", 1)]).await?;
    emit(&writer, &[msg("placed", "a", 2)]).await?;
    eventually("all three delivered", WAIT, || async { sink.count() >= 3 }).await;
    let report = relay.stop().await?;
    let by_key = per_key(&sink.messages());
    assert_eq!(
        by_key["a"],
        vec![1, 2],
        "the key waited behind the retried wave"
    );
    assert_eq!(by_key["b"], vec![1]);
    assert!(report.retried >= 1, "{report:?}");
    Ok(())
}

/// A delayed message cannot go out from the stream: it waits in the table until it is due, and
/// its key's newer messages wait behind it.
async fn a_delayed_message_waits_in_the_table_with_its_key_behind_it(
    mode: EnqueueMode,
) -> anyhow::Result<()> {
    let db = Db::start()?;
    let writer = db.store(mode).await?;
    let sink = Recording::default();
    let mut relay = run(&db, sink.clone()).await?;
    relay.reaches(CaptureState::Streaming).await?;
    let delayed = msg("placed", "a", 1).delay(Duration::from_millis(500));
    emit(&writer, &[delayed, msg("placed", "b", 1)]).await?;
    emit(&writer, &[msg("placed", "a", 2)]).await?;
    eventually("b delivered", WAIT, || async { sink.count() >= 1 }).await;
    let early = sink.messages();
    assert!(
        early.iter().all(|m| m.key.as_deref() != Some("a")),
        "nothing of a before its delay: {early:?}"
    );
    eventually("a delivered after its delay", WAIT, || async {
        sink.count() >= 3
    })
    .await;
    let report = relay.stop().await?;
    let delivered = sink.messages();
    let a: Vec<&Message> = delivered
        .iter()
        .filter(|m| m.key.as_deref() == Some("a"))
        .collect();
    assert_eq!(a.iter().map(|m| n_of(m)).collect::<Vec<_>>(), vec![1, 2]);
    assert!(a[0].available_at >= a[0].created_at + chrono::Duration::milliseconds(500));
    assert_eq!(report.waiting, 2, "{report:?}");
    Ok(())
}

/// One outbox, rows written for the polling relay and rows written for the stream: each is
/// delivered once, by its own path, and a kept delivered row stays as `delivered`. Rows
/// written for the stream before its slot existed go to the polling relay.
#[tokio::test]
async fn polled_rows_and_captured_rows_share_a_table_and_each_goes_out_once() -> anyhow::Result<()>
{
    let db = Db::start()?;
    let polled = db.store(EnqueueMode::Row).await?;
    let captured = db.store(EnqueueMode::CapturedRow).await?;
    emit(
        &captured,
        &[msg("placed", "early", 1), msg("placed", "early", 2)],
    )
    .await?;
    let sink = Recording::default();
    let store = db.store(EnqueueMode::Row).await?;
    let keep = outbox_core::Retention::Keep(Duration::from_secs(3600));
    let cfg = config().relay(
        RelayConfig::default()
            .poll_interval(Duration::from_millis(100))
            .retention(keep),
    );
    let relay = WalRelay::new(&db.url, store, Arc::new(sink.clone()), cfg)?;
    let (stats, mut state) = (relay.stats(), relay.state());
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(relay.run(async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    tokio::time::timeout(WAIT, state.wait_for(|s| *s == CaptureState::Streaming)).await??;
    for n in 1..=10 {
        emit(&captured, &[msg("placed", "streamed", n)]).await?;
        emit(&polled, &[msg("placed", "polled", n)]).await?;
    }
    emit(&captured, &[msg("placed", "early", 3)]).await?;
    eventually("all delivered", WAIT, || async { sink.count() >= 23 }).await;
    eventually("every row settled", WAIT, || async {
        rows(&polled, "delivered").await.unwrap_or(0) == 23
    })
    .await;
    stop.send_replace(true);
    task.await??;
    let by_key = per_key(&sink.messages());
    assert_eq!(by_key["streamed"], (1..=10).collect::<Vec<_>>());
    assert_eq!(by_key["polled"], (1..=10).collect::<Vec<_>>());
    assert_eq!(by_key["early"], vec![1, 2, 3], "the early rows went first");
    assert_eq!(sink.count(), 23, "each message once");
    let report = stats.report();
    assert_eq!(
        report.streamed, 11,
        "the stream read only rows written for it: {report:?}"
    );
    assert_eq!(report.delivered + report.waiting, 11, "{report:?}");
    assert_eq!(rows(&polled, "captured").await?, 0);
    Ok(())
}

/// Relays started together all prepare the same publication and slot; none of them may fail on
/// the others' catalog updates (PostgreSQL answers concurrent ALTER PUBLICATIONs with "tuple
/// concurrently updated").
#[tokio::test]
async fn relays_starting_at_once_all_set_up_capture() -> anyhow::Result<()> {
    let db = Db::start()?;
    let mut stores = Vec::new();
    for _ in 0..8 {
        stores.push(db.store(EnqueueMode::CapturedRow).await?);
    }
    for round in 0..5 {
        let slot = format!("together_{round}");
        let setups = stores.iter().map(|s| s.setup_capture(Some(&slot)));
        for (i, result) in futures::future::join_all(setups)
            .await
            .into_iter()
            .enumerate()
        {
            result.map_err(|e| anyhow::anyhow!("round {round}, relay {i}: {e}"))?;
        }
        // The next round starts from a publication of the message-only kind an earlier version
        // created, which every relay then widens at once.
        let publication = stores[0].publication();
        for sql in [
            format!("DROP PUBLICATION {publication}"),
            format!("CREATE PUBLICATION {publication}"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(stores[0].pool())
                .await?;
        }
    }
    Ok(())
}
