//! The scenarios. Each fills the outbox it needs and leaves it empty.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_trait::async_trait;
use hdrhistogram::Histogram;
use outbox_core::{
    ClaimRequest, Delivery, Failure, HeldBatch, Message, NewMessage, Ownership, PollingWaiter,
    Relay, RelayConfig, Retention, Sink, StatusCounts, Store, StoreResult, Waiter,
};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use uuid::Uuid;

use super::db::{BenchDb, WriteMode};
use super::{Options, Report, Scenario, progress, rss};

pub async fn run_all(db: &BenchDb, opts: &Options, r: &mut Report) -> anyhow::Result<()> {
    if opts.runs(Scenario::Write) {
        write_overhead(db, opts, r).await?;
        db.clear().await?;
    }
    let mut peak: Option<f64> = None;
    if opts.runs(Scenario::Drain) {
        drain(db, opts, r).await?;
        peak = max(peak, r.relay_peak_rss_mib);
        db.clear().await?;
    }
    if opts.runs(Scenario::Latency) {
        latency(db, opts, r).await?;
        peak = max(peak, r.relay_peak_rss_mib);
        db.clear().await?;
    }
    r.relay_peak_rss_mib = peak;
    if opts.runs(Scenario::Brokers) {
        for url in &opts.sinks {
            let rate = broker_drain(db, opts, url).await?;
            r.brokers.insert(url.clone(), rate);
            db.clear().await?;
        }
    }
    Ok(())
}

fn max(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// The topic of every benchmark message.
pub const TOPIC: &str = "orders";

/// A message like a payment event: about `payload_bytes` of JSON, one of `keys` keys.
pub fn message(i: usize, keys: usize) -> NewMessage {
    message_sized(i, keys, 200)
}

pub fn message_sized(i: usize, keys: usize, payload_bytes: usize) -> NewMessage {
    let key = (keys > 0).then(|| format!("customer-{}", i % keys));
    let mut body = serde_json::json!({
        "order_id": i, "customer": key, "amount": "12.50", "currency": "EUR", "pad": "",
    });
    let len = body.to_string().len();
    body["pad"] = "x".repeat(payload_bytes.saturating_sub(len)).into();
    let msg =
        NewMessage::json(TOPIC, "order.created", &body).expect("a JSON object always serialises");
    match key {
        Some(key) => msg.key(key),
        None => msg,
    }
}

// ---- 1. write overhead -------------------------------------------------------------------

/// Transactions per second of each write mode, measured in alternating rounds (A B C C B A) so
/// that drift in the machine's load weighs on every mode alike.
async fn write_overhead(db: &BenchDb, opts: &Options, r: &mut Report) -> anyhow::Result<()> {
    use WriteMode::*;
    let order = [Alone, Outbox, RawRow, RawRow, Outbox, Alone];
    let phase = opts.write_duration / 2;
    let bar = progress(order.len() as u64, "write");
    let mut totals = [(0u64, 0f64); 3];
    for mode in order {
        bar.set_message(format!("{mode:?}"));
        let (n, secs) = write_phase(db, mode, opts.clients, phase).await?;
        let slot = &mut totals[mode as usize];
        slot.0 += n;
        slot.1 += secs;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let rate = |m: WriteMode| totals[m as usize].0 as f64 / totals[m as usize].1.max(1e-9);
    r.write_alone_tx_per_s = Some(rate(Alone));
    r.write_outbox_tx_per_s = Some(rate(Outbox));
    r.write_raw_row_tx_per_s = Some(rate(RawRow));
    r.write_ratio = Some(rate(Outbox) / rate(Alone));
    r.raw_write_ratio = Some(rate(RawRow) / rate(Alone));
    Ok(())
}

async fn write_phase(
    db: &BenchDb,
    mode: WriteMode,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<(u64, f64)> {
    let started = Instant::now();
    let until = started + duration;
    let mut tasks = JoinSet::new();
    for client in 0..clients {
        let db = db.clone();
        tasks.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                let msg = message(client * 1_000_000 + n as usize, 1000);
                db.write(mode, &msg).await?;
                n += 1;
            }
            anyhow::Ok(n)
        });
    }
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        total += done.context("writer task")??;
    }
    Ok((total, started.elapsed().as_secs_f64()))
}

// ---- 2. drain ----------------------------------------------------------------------------

async fn drain(db: &BenchDb, opts: &Options, r: &mut Report) -> anyhow::Result<()> {
    prefill(db, opts).await?;
    db.copy_to_raw().await?;
    let (raw_rate, raw_series) = raw_drain(db, opts).await?;
    rss::reset_peak();
    let (rate, series) = relay_drain(db, opts, Arc::new(outbox_sinks::NullSink), "drain").await?;
    r.relay_peak_rss_mib = rss::peak_mib();
    r.drain_per_s = Some(rate);
    r.raw_drain_per_s = Some(raw_rate);
    r.drain_ratio = Some(rate / raw_rate);
    r.series.drain = series;
    r.series.raw_drain = raw_series;
    Ok(())
}

async fn prefill(db: &BenchDb, opts: &Options) -> anyhow::Result<()> {
    let bar = progress(opts.messages as u64, "prefill");
    for start in (0..opts.messages).step_by(1000) {
        let end = (start + 1000).min(opts.messages);
        let msgs: Vec<NewMessage> = (start..end)
            .map(|i| message_sized(i, opts.keys, opts.payload_bytes))
            .collect();
        db.enqueue_batch(&msgs).await?;
        bar.set_position(end as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

type Progress = Vec<(f64, u64)>;

async fn raw_drain(db: &BenchDb, opts: &Options) -> anyhow::Result<(f64, Progress)> {
    let bar = progress(opts.messages as u64, "raw SQL");
    let started = Instant::now();
    let (mut total, mut series) = (0u64, vec![(0.0, 0)]);
    loop {
        let n = db.raw_drain_batch(opts.batch_size).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
        series.push((started.elapsed().as_secs_f64(), total));
        bar.set_position(total);
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    if total != opts.messages as u64 {
        bail!(
            "the raw drain took {total} rows, expected {}",
            opts.messages
        );
    }
    Ok((total as f64 / secs, series))
}

/// Runs a relay until the outbox is empty; returns messages per second and its progress.
async fn relay_drain(
    db: &BenchDb,
    opts: &Options,
    sink: Arc<dyn Sink>,
    what: &str,
) -> anyhow::Result<(f64, Progress)> {
    let config = RelayConfig {
        batch_size: opts.batch_size,
        exit_when_idle: true,
        ..RelayConfig::default()
    };
    let relay = Relay::with_config(db.store(), sink, config);
    let stats = relay.stats();
    let bar = progress(opts.messages as u64, what);
    let started = Instant::now();
    let mut run = std::pin::pin!(relay.run(std::future::pending()));
    let mut series = vec![(0.0, 0)];
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let report = loop {
        tokio::select! {
            report = &mut run => break report,
            _ = tick.tick() => {
                let n = stats.delivered.load(Ordering::Relaxed);
                series.push((started.elapsed().as_secs_f64(), n));
                bar.set_position(n);
            }
        }
    };
    let secs = started.elapsed().as_secs_f64();
    series.push((secs, report.delivered));
    bar.finish_and_clear();
    if report.delivered != opts.messages as u64 {
        bail!(
            "the relay delivered {} of {} messages ({} dead, {} retried)",
            report.delivered,
            opts.messages,
            report.dead,
            report.retried
        );
    }
    Ok((report.delivered as f64 / secs, series))
}

// ---- 3. latency --------------------------------------------------------------------------

async fn latency(db: &BenchDb, opts: &Options, r: &mut Report) -> anyhow::Result<()> {
    rss::reset_peak();
    let woken = latency_run(db, opts, db.store(), "latency").await?;
    r.relay_peak_rss_mib = rss::peak_mib();
    db.clear().await?;
    let polling: Arc<dyn Store> = Arc::new(PollingOnly(db.store()));
    let polled = latency_run(db, opts, polling, "polling").await?;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let (h, p) = (histogram(&woken)?, histogram(&polled)?);
    r.latency_p50_ms = Some(ms(&h, 0.5));
    r.latency_p99_ms = Some(ms(&h, 0.99));
    r.latency_max_ms = Some(h.max() as f64 / 1000.0);
    r.polling_latency_p50_ms = Some(ms(&p, 0.5));
    r.polling_latency_p99_ms = Some(ms(&p, 0.99));
    r.polling_latency_max_ms = Some(p.max() as f64 / 1000.0);
    r.series.latency = woken;
    r.series.polling_latency = polled;
    Ok(())
}

fn histogram(latencies_ms: &[f64]) -> anyhow::Result<Histogram<u64>> {
    let mut h = Histogram::<u64>::new(3)?;
    for ms in latencies_ms {
        h.record((ms * 1000.0).round() as u64)?;
    }
    Ok(h)
}

/// Writers commit one message per transaction at `rate` in total while a relay delivers to a
/// sink that notes when each message arrives. Returns each message's commit-to-sink latency
/// in milliseconds, from the moment its writer saw the commit succeed.
async fn latency_run(
    db: &BenchDb,
    opts: &Options,
    store: Arc<dyn Store>,
    what: &str,
) -> anyhow::Result<Vec<f64>> {
    let sink = Arc::new(ArrivalSink::default());
    let config = RelayConfig {
        batch_size: opts.batch_size,
        poll_interval: opts.poll_interval,
        ..RelayConfig::default()
    };
    let relay = Relay::with_config(store, sink.clone(), config);
    let stop = Arc::new(Notify::new());
    let relay_task = {
        let stop = stop.clone();
        tokio::spawn(relay.run(async move { stop.notified().await }))
    };
    let committed = paced_writers(db, opts, what).await;
    let expected = committed.as_ref().map_or(0, Vec::len);
    let arrived = sink.wait_for(expected, Duration::from_secs(60)).await;
    stop.notify_one();
    relay_task.await.context("relay task")?;
    let committed = committed?;
    if arrived < expected {
        bail!("{what}: only {arrived} of {expected} messages reached the sink within 60 s");
    }
    Ok(sink.latencies(&committed))
}

/// `clients` writers, each at `rate / clients` transactions per second, for the duration.
async fn paced_writers(
    db: &BenchDb,
    opts: &Options,
    what: &str,
) -> anyhow::Result<Vec<(Uuid, Instant)>> {
    let clients = opts.clients.max(1);
    let period = Duration::from_secs_f64(clients as f64 / f64::from(opts.rate.max(1)));
    let until = Instant::now() + opts.latency_duration;
    let total = (opts.latency_duration.as_secs_f64() * f64::from(opts.rate)) as u64;
    let bar = progress(total, what);
    let mut tasks = JoinSet::new();
    for client in 0..clients {
        let (db, bar) = (db.clone(), bar.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut committed = Vec::new();
            let mut n = client * 1_000_000;
            while Instant::now() < until {
                tick.tick().await;
                let msg = message(n, 1000);
                db.write(WriteMode::Outbox, &msg).await?;
                committed.push((msg.id(), Instant::now()));
                bar.inc(1);
                n += 1;
            }
            anyhow::Ok(committed)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.context("writer task")??);
    }
    bar.finish_and_clear();
    Ok(all)
}

/// Notes when each message reaches it.
#[derive(Default)]
struct ArrivalSink {
    arrivals: Mutex<Vec<(Uuid, Instant)>>,
    count: tokio::sync::watch::Sender<usize>,
}

impl ArrivalSink {
    async fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        let mut rx = self.count.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n)).await;
        *rx.borrow()
    }

    fn latencies(&self, committed: &[(Uuid, Instant)]) -> Vec<f64> {
        let arrivals = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
        let first: std::collections::HashMap<Uuid, Instant> =
            arrivals.iter().rev().map(|(id, t)| (*id, *t)).collect();
        committed
            .iter()
            .filter_map(|(id, at)| first.get(id).map(|t| t.saturating_duration_since(*at)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect()
    }
}

#[async_trait]
impl Sink for ArrivalSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        let now = Instant::now();
        let n = {
            let mut arrivals = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
            arrivals.extend(batch.iter().map(|m| (m.id, now)));
            arrivals.len()
        };
        self.count.send_replace(n);
        batch.iter().map(|_| Ok(())).collect()
    }

    fn name(&self) -> &str {
        "arrivals"
    }
}

/// The store with its wake-ups taken away: the relay finds new messages only by polling.
struct PollingOnly(Arc<dyn Store>);

#[async_trait]
impl Store for PollingOnly {
    async fn migrate(&self) -> StoreResult<()> {
        self.0.migrate().await
    }
    async fn claim_leased(&self, req: &ClaimRequest<'_>) -> StoreResult<Vec<Message>> {
        self.0.claim_leased(req).await
    }
    fn holds_claims(&self) -> bool {
        self.0.holds_claims()
    }
    async fn claim_held(&self, req: &ClaimRequest<'_>) -> StoreResult<Option<Box<dyn HeldBatch>>> {
        self.0.claim_held(req).await
    }
    async fn ownership(&self, relay: &str) -> StoreResult<Option<Box<dyn Ownership>>> {
        self.0.ownership(relay).await
    }
    async fn recover(&self, max_attempts: i32) -> StoreResult<u64> {
        self.0.recover(max_attempts).await
    }
    async fn ack(&self, ids: &[Uuid], retention: Retention) -> StoreResult<u64> {
        self.0.ack(ids, retention).await
    }
    async fn fail(&self, relay: &str, failures: &[Failure]) -> StoreResult<()> {
        self.0.fail(relay, failures).await
    }
    async fn release(&self, relay: &str, ids: &[Uuid]) -> StoreResult<()> {
        self.0.release(relay, ids).await
    }
    async fn purge_delivered(&self, older_than: Duration, limit: usize) -> StoreResult<u64> {
        self.0.purge_delivered(older_than, limit).await
    }
    async fn status(&self) -> StoreResult<StatusCounts> {
        self.0.status().await
    }
    async fn dead_list(&self, limit: usize) -> StoreResult<Vec<Message>> {
        self.0.dead_list(limit).await
    }
    async fn dead_retry(&self, ids: Option<&[Uuid]>) -> StoreResult<u64> {
        self.0.dead_retry(ids).await
    }
    async fn dead_purge(&self, older_than: Option<Duration>) -> StoreResult<u64> {
        self.0.dead_purge(older_than).await
    }
    async fn waiter(&self, _relay: &str) -> StoreResult<Box<dyn Waiter>> {
        Ok(Box::new(PollingWaiter::new(Arc::new(Notify::new()))))
    }
}

// ---- 5. brokers --------------------------------------------------------------------------

/// The drain scenario's backlog, delivered to a real sink. `kafka://mock` stands for
/// librdkafka's in-process mock cluster (3 brokers), for machines without a Kafka server.
async fn broker_drain(db: &BenchDb, opts: &Options, url: &str) -> anyhow::Result<f64> {
    #[cfg(feature = "kafka")]
    if let Some(options) = url.strip_prefix("kafka://mock") {
        let cluster = rdkafka::mocking::MockCluster::new(3).context("kafka mock cluster")?;
        cluster
            .create_topic(TOPIC, 12, 1)
            .context("kafka mock cluster topic")?;
        let real = format!("kafka://{}{options}", cluster.bootstrap_servers());
        return drain_to(db, opts, &real, url).await;
    }
    drain_to(db, opts, url, url).await
}

async fn drain_to(db: &BenchDb, opts: &Options, url: &str, shown: &str) -> anyhow::Result<f64> {
    let topology = super::topology::prepare(url, TOPIC).await?;
    let drained = async {
        let sink = outbox_sinks::from_url(url).await?;
        prefill(db, opts).await?;
        relay_drain(db, opts, sink, shown).await
    }
    .await;
    topology.remove().await?;
    Ok(drained?.0)
}
