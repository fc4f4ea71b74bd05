//! `--scenario capture`: log-based capture against polling, in one run on one database
//! (PostgreSQL with `wal_level = logical`).
//!
//! 1. **Write.** The business insert alone, with `enqueue` of a row, with a plain second row,
//!    and with `enqueue` as a logical message, in rounds A B C D D C B A.
//! 2. **Latency.** Writers emit at the fixed rate while a relay streams from a slot created
//!    just before.
//! 3. **Drain.** The same backlog drained by the polling relay (rows, before the slot exists),
//!    then emitted as logical messages and drained from the slot, to a sink that checks
//!    per-key order.
//!
//! A relay that takes over a slot first decodes the WAL from the slot's restart point: after a
//! large drain that takes a second or more, during which new messages wait. The latency is
//! measured on a running stream, before the drain, as the polling latency is measured on a
//! running relay.
//!
//! The slot is dropped at the end, also when a step failed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use outbox_capture::{CaptureConfig, CaptureState, WalRelay};
use outbox_core::{RelayConfig, Sink};
use tokio::sync::watch;

use super::db::{BenchDb, WriteMode};
use super::scenario::{
    ArrivalSink, OrderCheck, OrderSink, count_violations, fill, histogram, message_sized,
    paced_writers, prefill, relay_drain, write_phase,
};
use super::{Options, Report, progress, rss};

/// The benchmark's own slot, so that it never touches one a relay uses.
const SLOT: &str = "outbox_bench_slot";

pub async fn capture(db: &BenchDb, opts: &Options, r: &mut Report) -> anyhow::Result<()> {
    let pg = db.postgres()?;
    // Before anything is written: a server that cannot decode fails the scenario at once.
    pg.setup_capture(None).await?;
    writes(db, opts, r).await?;
    db.clear().await?;
    let polled = polling_drain(db, opts).await?;
    db.clear().await?;
    pg.setup_capture(Some(SLOT)).await?;
    let measured = streamed(db, opts, r).await;
    let dropped = pg.drop_slot(SLOT).await;
    let streamed_rate = measured?;
    dropped?;
    r.capture_polling_drain_per_s = Some(polled);
    r.capture_drain_per_s = Some(streamed_rate);
    r.capture_drain_ratio = Some(streamed_rate / polled);
    db.clear().await
}

async fn writes(db: &BenchDb, opts: &Options, r: &mut Report) -> anyhow::Result<()> {
    use WriteMode::*;
    let order = [
        Alone, Outbox, RawRow, WalMessage, WalMessage, RawRow, Outbox, Alone,
    ];
    let phase = opts.write_duration / 2;
    let bar = progress(order.len() as u64, "write");
    let mut totals = [(0u64, 0f64); 4];
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
    Ok(())
}

async fn polling_drain(db: &BenchDb, opts: &Options) -> anyhow::Result<f64> {
    prefill(db, opts).await?;
    db.analyze().await?;
    let (rate, _) = relay_drain(db, opts, Arc::new(outbox_sinks::NullSink), "polling").await?;
    Ok(rate)
}

/// The latency run on the fresh slot, then the drain from it; returns the drain rate.
async fn streamed(db: &BenchDb, opts: &Options, r: &mut Report) -> anyhow::Result<f64> {
    rss::reset_peak();
    latency(db, opts, r).await?;
    fill(
        opts,
        "emit",
        |msgs| async move { db.emit_batch(&msgs).await },
    )
    .await?;
    let check = Arc::new(OrderCheck::default());
    let started = Instant::now();
    let relay = Running::start(db, opts, Arc::new(OrderSink(check.clone())))?;
    let bar = progress(opts.messages as u64, "from WAL");
    let mut reached = std::pin::pin!(check.reached(opts.messages as u64));
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = &mut reached => break,
            _ = tick.tick() => bar.set_position(check.delivered()),
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!(
                "the relay streamed {} of {} messages in 10 minutes",
                check.delivered(),
                opts.messages
            );
        }
    }
    let rate = opts.messages as f64 / started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    relay.stop().await?;
    count_violations(r, check.violations());
    r.capture_peak_rss_mib = rss::peak_mib();
    Ok(rate)
}

async fn latency(db: &BenchDb, opts: &Options, r: &mut Report) -> anyhow::Result<()> {
    let sink = Arc::new(ArrivalSink::default());
    let mut relay = Running::start(db, opts, sink.clone())?;
    tokio::time::timeout(
        Duration::from_secs(30),
        relay.state.wait_for(|s| *s == CaptureState::Streaming),
    )
    .await
    .context("the relay did not start streaming within 30 s")??;
    // One message through first: the latency of a stream that runs, as the polling latency
    // is that of a relay already up.
    db.emit_batch(&[message_sized(0, opts.keys, opts.payload_bytes)])
        .await?;
    if sink.wait_for(1, Duration::from_secs(60)).await < 1 {
        bail!("capture: the first message did not arrive within 60 s");
    }
    let committed = paced_writers(db, opts, "latency", WriteMode::WalMessage).await;
    let expected = committed.as_ref().map_or(0, Vec::len) + 1;
    let arrived = sink.wait_for(expected, Duration::from_secs(60)).await;
    relay.stop().await?;
    let committed = committed?;
    if arrived < expected {
        bail!("capture: only {arrived} of {expected} messages reached the sink within 60 s");
    }
    let h = histogram(&sink.latencies(&committed))?;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    r.capture_latency_p50_ms = Some(ms(0.5));
    r.capture_latency_p99_ms = Some(ms(0.99));
    r.capture_latency_max_ms = Some(h.max() as f64 / 1000.0);
    Ok(())
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
    fn start(db: &BenchDb, opts: &Options, sink: Arc<dyn Sink>) -> anyhow::Result<Self> {
        let config = CaptureConfig::default()
            .slot(SLOT)
            .batch_size(opts.batch_size)
            .relay(RelayConfig::default().batch_size(opts.batch_size));
        let relay = WalRelay::new(&opts.database_url, db.postgres()?.clone(), sink, config)?;
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
