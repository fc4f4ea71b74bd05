//! `--scenario capture`: log-based capture against polling, in one run on one database
//! (PostgreSQL with `wal_level = logical`).
//!
//! 1. **Write.** The business insert alone, with `enqueue` of a row, with a plain second row,
//!    with `enqueue` as a logical message and as a captured row (table capture), in rounds
//!    A B C D E E D C B A.
//! 2. **Latency.** Writers emit at the fixed rate while a relay streams from a slot created
//!    just before.
//! 3. **Drain.** The same backlog drained by the polling relay (rows, before the slot exists),
//!    then emitted as logical messages and drained from the slot, to a sink that checks
//!    per-key order.
//!
//! Steps 2 and 3 run once with logical messages (message capture), then once with captured
//! rows (table capture).
//!
//! 4. **Two slots.** Scaling past one slot: the same backlog of logical messages written
//!    alternately to two outboxes (table prefixes), each with its own slot, drained by one
//!    relay per slot at once, against the drain of step 3 from one slot.
//!
//! A relay that takes over a slot first decodes the WAL from the slot's restart point: after a
//! large drain that takes a second or more, during which new messages wait. The latency is
//! measured on a running stream, before the drain, as the polling latency is measured on a
//! running relay.
//!
//! The slot is dropped at the end, also when a step failed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use outbox_capture::{CaptureConfig, CaptureState, WalRelay};
use outbox_core::{RelayConfig, Sink, Store};
use outbox_postgres::EnqueueMode;
use tokio::sync::watch;

use super::db::{BenchDb, WriteMode};
use super::scenario::{
    ArrivalSink, OrderCheck, OrderSink, count_violations, fill, histogram, message_sized,
    paced_writers, prefill, relay_drain, write_phase,
};
use super::{Options, Report, progress, rss};

/// The benchmark's own slots, so that it never touches one a relay uses.
const SLOT: &str = "outbox_bench_slot";
const SECOND_SLOT: &str = "outbox_bench_slot_b";

pub async fn capture(db: &BenchDb, opts: &Options, r: &mut Report) -> anyhow::Result<()> {
    let pg = db.postgres()?;
    // Before anything is written: a server that cannot decode fails the scenario at once.
    pg.setup_capture(None).await?;
    writes(db, opts, r).await?;
    db.clear().await?;
    let polled = polling_drain(db, opts).await?;
    db.clear().await?;
    rss::reset_peak();
    // Each step on a slot of its own, made just before: a relay starting on a slot decodes
    // the WAL from the slot's restart point, which may still lie before the previous step's
    // whole backlog.
    let fresh = || async {
        pg.drop_slot(SLOT).await?;
        pg.setup_capture(Some(SLOT)).await
    };
    let measured = async {
        fresh().await?;
        let messages = streamed(db, opts, EnqueueMode::WalMessage).await?;
        db.clear().await?;
        fresh().await?;
        let rows = streamed(db, opts, EnqueueMode::CapturedRow).await?;
        db.clear().await?;
        fresh().await?;
        let two = two_slots(db, opts).await?;
        anyhow::Ok((messages, rows, two))
    }
    .await;
    let dropped = pg.drop_slot(SLOT).await;
    let dropped_second = pg.drop_slot(SECOND_SLOT).await;
    let (messages, rows, (two_rate, two_violations)) = measured?;
    dropped?;
    dropped_second?;
    r.capture_two_slots_drain_per_s = Some(two_rate);
    r.capture_two_slots_ratio = Some(two_rate / messages.drain);
    r.capture_peak_rss_mib = rss::peak_mib();
    r.capture_polling_drain_per_s = Some(polled);
    r.capture_drain_per_s = Some(messages.drain);
    r.capture_drain_ratio = Some(messages.drain / polled);
    [
        r.capture_latency_p50_ms,
        r.capture_latency_p99_ms,
        r.capture_latency_max_ms,
    ] = messages.latency.map(Some);
    r.capture_table_drain_per_s = Some(rows.drain);
    r.capture_table_drain_ratio = Some(rows.drain / polled);
    [
        r.capture_table_latency_p50_ms,
        r.capture_table_latency_p99_ms,
        r.capture_table_latency_max_ms,
    ] = rows.latency.map(Some);
    count_violations(r, messages.violations + rows.violations + two_violations);
    db.clear().await
}

/// What one way of writing for the stream measured.
struct Streamed {
    drain: f64,
    /// p50, p99 and max, in milliseconds.
    latency: [f64; 3],
    violations: u64,
}

async fn writes(db: &BenchDb, opts: &Options, r: &mut Report) -> anyhow::Result<()> {
    use WriteMode::*;
    let order = [
        Alone,
        Outbox,
        RawRow,
        WalMessage,
        CapturedRow,
        CapturedRow,
        WalMessage,
        RawRow,
        Outbox,
        Alone,
    ];
    let phase = opts.write_duration / 2;
    let bar = progress(order.len() as u64, "write");
    let mut totals = [(0u64, 0f64); 5];
    for mode in order {
        bar.set_message(format!("{mode:?}"));
        let (n, secs) = write_phase(db, mode, opts.clients, phase).await?;
        totals[mode as usize].0 += n;
        totals[mode as usize].1 += secs;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let rate = |m: WriteMode| totals[m as usize].0 as f64 / totals[m as usize].1.max(1e-9);
    let alone = rate(Alone);
    r.capture_write_alone_tx_per_s = Some(alone);
    r.capture_write_row_tx_per_s = Some(rate(Outbox));
    r.capture_write_raw_row_tx_per_s = Some(rate(RawRow));
    r.capture_write_tx_per_s = Some(rate(WalMessage));
    r.capture_write_ratio = Some(rate(WalMessage) / alone);
    r.capture_row_write_ratio = Some(rate(Outbox) / alone);
    r.capture_raw_write_ratio = Some(rate(RawRow) / alone);
    r.capture_table_write_tx_per_s = Some(rate(CapturedRow));
    r.capture_table_write_ratio = Some(rate(CapturedRow) / alone);
    Ok(())
}

async fn polling_drain(db: &BenchDb, opts: &Options) -> anyhow::Result<f64> {
    prefill(db, opts).await?;
    db.analyze().await?;
    let (rate, _) = relay_drain(db, opts, Arc::new(outbox_sinks::NullSink), "polling").await?;
    Ok(rate)
}

/// The latency run on the slot, then the drain from it, with messages written as `mode` says.
async fn streamed(db: &BenchDb, opts: &Options, mode: EnqueueMode) -> anyhow::Result<Streamed> {
    let latency = latency(db, opts, mode).await?;
    fill(opts, "emit", |msgs| async move {
        db.emit_batch(&msgs, mode).await
    })
    .await?;
    let pg = db.postgres()?;
    let (rate, violations) = drain_slots(opts, &[(pg, SLOT, opts.messages as u64)]).await?;
    Ok(Streamed {
        drain: rate,
        latency,
        violations,
    })
}

/// The backlog written alternately to this outbox and a second one (its table prefix + `b_`),
/// then drained from both slots at once, a relay each.
async fn two_slots(db: &BenchDb, opts: &Options) -> anyhow::Result<(f64, u64)> {
    let first = db.postgres()?;
    let mut config = first.config().clone();
    config.table_prefix = format!("{}b_", config.table_prefix);
    let second = outbox_postgres::PgStore::with_config(first.pool().clone(), config)?;
    second.migrate().await?;
    second.drop_slot(SECOND_SLOT).await?;
    second.setup_capture(Some(SECOND_SLOT)).await?;
    // A failed run before this one may have left messages behind.
    let (schema, table) = second.table();
    sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {schema}.{table}")))
        .execute(second.pool())
        .await?;
    let stores = [first.clone(), second.clone()];
    let counts = [AtomicU64::new(0), AtomicU64::new(0)];
    let turn = AtomicU64::new(0);
    fill(opts, "emit to two outboxes", |msgs| {
        let i = (turn.fetch_add(1, Ordering::Relaxed) % 2) as usize;
        counts[i].fetch_add(msgs.len() as u64, Ordering::Relaxed);
        let store = stores[i].clone();
        async move {
            let mut tx = store.pool().begin().await?;
            let writer = store
                .outbox()
                .clone()
                .with_enqueue_mode(EnqueueMode::WalMessage);
            writer.enqueue_batch(&mut tx, &msgs).await?;
            tx.commit().await?;
            Ok(())
        }
    })
    .await?;
    let [a, b] = counts.map(AtomicU64::into_inner);
    drain_slots(opts, &[(first, SLOT, a), (&second, SECOND_SLOT, b)]).await
}

/// Starts a relay on each slot at once, with a sink that checks per-key order, and waits until
/// each has delivered its count: the messages per second of all of them together, and the
/// order violations.
async fn drain_slots(
    opts: &Options,
    slots: &[(&outbox_postgres::PgStore, &str, u64)],
) -> anyhow::Result<(f64, u64)> {
    let total: u64 = slots.iter().map(|(_, _, n)| n).sum();
    let checks: Vec<Arc<OrderCheck>> = slots.iter().map(|_| Arc::default()).collect();
    let started = Instant::now();
    let mut relays = Vec::new();
    for ((store, slot, _), check) in slots.iter().zip(&checks) {
        let sink = Arc::new(OrderSink(check.clone()));
        relays.push(Running::start(store, slot, opts, sink)?);
    }
    let bar = progress(total, "from WAL");
    let delivered = || checks.iter().map(|c| c.delivered()).sum::<u64>();
    let all = async {
        for ((_, _, n), check) in slots.iter().zip(&checks) {
            check.reached(*n).await;
        }
    };
    let mut reached = std::pin::pin!(all);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = &mut reached => break,
            _ = tick.tick() => bar.set_position(delivered()),
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!(
                "the relays streamed {} of {total} messages in 10 minutes",
                delivered()
            );
        }
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    for relay in relays {
        relay.stop().await?;
    }
    Ok((rate, checks.iter().map(|c| c.violations()).sum()))
}

async fn latency(db: &BenchDb, opts: &Options, mode: EnqueueMode) -> anyhow::Result<[f64; 3]> {
    let sink = Arc::new(ArrivalSink::default());
    let mut relay = Running::start(db.postgres()?, SLOT, opts, sink.clone())?;
    tokio::time::timeout(
        Duration::from_secs(30),
        relay.state.wait_for(|s| *s == CaptureState::Streaming),
    )
    .await
    .context("the relay did not start streaming within 30 s")??;
    // One message through first: the latency of a stream that runs, as the polling latency
    // is that of a relay already up.
    db.emit_batch(&[message_sized(0, opts.keys, opts.payload_bytes)], mode)
        .await?;
    if sink.wait_for(1, Duration::from_secs(60)).await < 1 {
        bail!("capture: the first message did not arrive within 60 s");
    }
    let writes = match mode {
        EnqueueMode::CapturedRow => WriteMode::CapturedRow,
        _ => WriteMode::WalMessage,
    };
    let committed = paced_writers(db, opts, "latency", writes).await;
    let expected = committed.as_ref().map_or(0, Vec::len) + 1;
    let arrived = sink.wait_for(expected, Duration::from_secs(60)).await;
    relay.stop().await?;
    let committed = committed?;
    if arrived < expected {
        bail!("capture: only {arrived} of {expected} messages reached the sink within 60 s");
    }
    let h = histogram(&sink.latencies(&committed))?;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok([ms(0.5), ms(0.99), h.max() as f64 / 1000.0])
}

/// A relay streaming from the benchmark's slot until [`Running::stop`].
struct Running {
    stop: watch::Sender<bool>,
    state: watch::Receiver<CaptureState>,
    task: tokio::task::JoinHandle<
        Result<outbox_capture::CaptureReport, outbox_capture::CaptureError>,
    >,
}

impl Running {
    fn start(
        store: &outbox_postgres::PgStore,
        slot: &str,
        opts: &Options,
        sink: Arc<dyn Sink>,
    ) -> anyhow::Result<Self> {
        let config = CaptureConfig::default()
            .slot(slot)
            .batch_size(opts.batch_size)
            .relay(RelayConfig::default().batch_size(opts.batch_size));
        let relay = WalRelay::new(&opts.database_url, store.clone(), sink, config)?;
        let (stop, mut stopped) = watch::channel(false);
        let state = relay.state();
        let task = tokio::spawn(relay.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        Ok(Self { stop, state, task })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.send_replace(true);
        self.task.await.context("capture relay task")??;
        Ok(())
    }
}
