//! The scenarios. Each fills the outbox it needs and leaves it empty.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_trait::async_trait;
use hdrhistogram::Histogram;
use outbox_core::{
    ClaimRequest, Delivery, Failure, Message, NewMessage, Ownership, PollingWaiter, Relay,
    RelayConfig, RelayReport, Retention, Sink, Source, StatusCounts, Store, StoreResult, Waiter,
};
use tokio::sync::{Notify, watch};
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
    if opts.runs(Scenario::Keys) {
        keys(db, opts, r).await?;
    }
    if opts.runs(Scenario::Relays) {
        relays(db, opts, r).await?;
    }
    if opts.runs(Scenario::Capture) {
        super::capture::capture(db, opts, r).await?;
    }
    // Last: it installs the metrics recorder, which stays for the rest of the process.
    if opts.runs(Scenario::Surface) {
        surface(db, opts, r).await?;
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
    let mut totals = [(0u64, 0f64); 4];
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

pub(super) async fn write_phase(
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
    let (rate, series) = if opts.relays > 1 {
        let drained = relays_drain(db, opts, opts.relays, "drain").await?;
        count_violations(r, drained.violations);
        (drained.rate, drained.series)
    } else {
        relay_drain(db, opts, Arc::new(outbox_sinks::NullSink), "drain").await?
    };
    r.relay_peak_rss_mib = rss::peak_mib();
    r.drain_per_s = Some(rate);
    r.raw_drain_per_s = Some(raw_rate);
    r.drain_ratio = Some(rate / raw_rate);
    r.series.drain = series;
    r.series.raw_drain = raw_series;
    Ok(())
}

pub(super) async fn prefill(db: &BenchDb, opts: &Options) -> anyhow::Result<()> {
    fill(opts, "prefill", |msgs| async move {
        db.enqueue_batch(&msgs).await
    })
    .await
}

/// Writes the backlog of `opts` a thousand messages per `write`, with a progress bar.
pub(super) async fn fill<F, Fut>(opts: &Options, what: &str, mut write: F) -> anyhow::Result<()>
where
    F: FnMut(Vec<NewMessage>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let bar = progress(opts.messages as u64, what);
    for start in (0..opts.messages).step_by(1000) {
        let end = (start + 1000).min(opts.messages);
        let msgs: Vec<NewMessage> = (start..end)
            .map(|i| message_sized(i, opts.keys, opts.payload_bytes))
            .collect();
        write(msgs).await?;
        bar.set_position(end as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

pub(super) type Progress = Vec<(f64, u64)>;

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
pub(super) async fn relay_drain(
    db: &BenchDb,
    opts: &Options,
    sink: Arc<dyn Sink>,
    what: &str,
) -> anyhow::Result<(f64, Progress)> {
    relay_drain_with(db, opts, sink, what, false).await
}

/// [`relay_drain`], with the relay's HTTP surface served and scraped when `served`.
async fn relay_drain_with(
    db: &BenchDb,
    opts: &Options,
    sink: Arc<dyn Sink>,
    what: &str,
    served: bool,
) -> anyhow::Result<(f64, Progress)> {
    let config = RelayConfig::default()
        .batch_size(opts.batch_size)
        .exit_when_idle(true);
    let relay = Relay::with_config(db.store(), sink, config);
    let _serving = match served {
        true => Some(Served::start(db, &relay).await?),
        false => None,
    };
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
                let n = stats.report().delivered;
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

// ---- 2a. the HTTP surface ----------------------------------------------------------------

/// The same drain without, then with the relay's HTTP surface as `--listen` serves it, plus a
/// scrape of `/metrics` every second: what health and metrics cost the relay. Without comes
/// first because the metrics recorder, once installed, stays for the process.
async fn surface(db: &BenchDb, opts: &Options, r: &mut Report) -> anyhow::Result<()> {
    prefill(db, opts).await?;
    let sink = Arc::new(outbox_sinks::NullSink);
    let (off, _) = relay_drain_with(db, opts, sink.clone(), "no HTTP", false).await?;
    db.clear().await?;
    prefill(db, opts).await?;
    let (on, _) = relay_drain_with(db, opts, sink, "--listen", true).await?;
    db.clear().await?;
    r.surface_off_drain_per_s = Some(off);
    r.surface_on_drain_per_s = Some(on);
    r.surface_ratio = Some(on / off);
    Ok(())
}

/// A relay's HTTP surface on a free port and a client scraping it every second, both
/// stopped when dropped.
struct Served {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    scraper: tokio::task::JoinHandle<()>,
}

impl Served {
    async fn start(db: &BenchDb, relay: &Relay) -> anyhow::Result<Self> {
        let surface = outbox_server::Surface::new()
            .store(db.store())
            .relay(relay.monitor());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            surface.serve(listener, outbox_server::ServerLimits::default(), async {
                let _ = stopped.await;
            }),
        );
        let scraper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Err(e) = scrape(addr).await {
                    tracing::warn!(error = %e, "scrape failed");
                }
            }
        });
        Ok(Self {
            stop: Some(stop),
            scraper,
        })
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.scraper.abort();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One `GET /metrics`, read to the end, as Prometheus would.
async fn scrape(addr: std::net::SocketAddr) -> std::io::Result<usize> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).await
}

// ---- 2b. key counts ----------------------------------------------------------------------

/// The key counts of the keys scenario, in the order they run: unkeyed, many, few, one hot key.
const KEY_COUNTS: [usize; 4] = [0, 1000, 10, 1];

/// The ratios it reports, numerator and denominator key counts.
const KEY_RATIOS: [(usize, usize); 3] = [(10, 1000), (1, 1000), (1000, 0)];

/// The drain of one backlog shape at each of [`KEY_COUNTS`], each on a fresh backlog of the
/// same size, and the raw-SQL drain of the unkeyed one: how much ordering by key costs, and
/// how much less a relay drains when few keys hold the whole backlog.
async fn keys(db: &BenchDb, opts: &Options, r: &mut Report) -> anyhow::Result<()> {
    let mut violations = 0;
    for keys in KEY_COUNTS {
        let shaped = Options {
            keys,
            ..opts.clone()
        };
        prefill(db, &shaped).await?;
        if keys == 0 {
            db.copy_to_raw().await?;
            r.keys_raw_drain_per_s = Some(raw_drain(db, &shaped).await?.0);
        } else {
            db.analyze().await?;
        }
        let check = Arc::new(OrderCheck::default());
        let sink = Arc::new(OrderSink(check.clone()));
        let what = format!("{keys} keys");
        let (rate, _) = relay_drain(db, &shaped, sink, &what).await?;
        violations += check.violations();
        r.keys_drain_per_s.insert(keys, rate);
        db.clear().await?;
    }
    for (a, b) in KEY_RATIOS {
        insert_ratio(&mut r.keys_ratios, &r.keys_drain_per_s, a, b);
    }
    if let (Some(unkeyed), Some(raw)) = (r.keys_drain_per_s.get(&0), r.keys_raw_drain_per_s) {
        r.keys_ratios.insert("0/raw".into(), unkeyed / raw);
    }
    count_violations(r, violations);
    Ok(())
}

/// Inserts `rates[a] / rates[b]` as `"a/b"`.
fn insert_ratio(
    ratios: &mut BTreeMap<String, f64>,
    rates: &BTreeMap<usize, f64>,
    a: usize,
    b: usize,
) {
    if let (Some(x), Some(y)) = (rates.get(&a), rates.get(&b)) {
        ratios.insert(format!("{a}/{b}"), x / y);
    }
}

pub(super) fn count_violations(r: &mut Report, n: u64) {
    r.order_violations = Some(r.order_violations.unwrap_or(0) + n);
}

// ---- 2c. several relays ------------------------------------------------------------------

/// The relay counts of the relays scenario.
const RELAY_COUNTS: [usize; 3] = [1, 2, 4];

/// The drain by 1, 2 and 4 relays at once, each on a fresh backlog of the same shape: whether
/// more relays drain faster, or only contend for the same head of the backlog.
async fn relays(db: &BenchDb, opts: &Options, r: &mut Report) -> anyhow::Result<()> {
    let mut violations = 0;
    for n in RELAY_COUNTS {
        prefill(db, opts).await?;
        db.analyze().await?;
        let what = format!("{n} relays");
        let drained = relays_drain(db, opts, n, &what).await?;
        violations += drained.violations;
        r.relays_drain_per_s.insert(n, drained.rate);
        db.clear().await?;
    }
    for n in RELAY_COUNTS.into_iter().filter(|n| *n > 1) {
        insert_ratio(&mut r.relays_ratios, &r.relays_drain_per_s, n, 1);
    }
    count_violations(r, violations);
    Ok(())
}

/// What a drain by several relays measured.
struct Drained {
    rate: f64,
    series: Progress,
    violations: u64,
}

/// How long the relays may deliver nothing before the drain is abandoned as stuck.
const STALL: Duration = Duration::from_secs(60);

/// Runs `relays` relays at once, each with a pool and a relay id of its own as in separate
/// processes, until their sinks together counted the whole backlog. Not in drain mode: with
/// several relays one may find nothing for itself while the others still deliver.
async fn relays_drain(
    db: &BenchDb,
    opts: &Options,
    relays: usize,
    what: &str,
) -> anyhow::Result<Drained> {
    let target = opts.messages as u64;
    let check = Arc::new(OrderCheck::default());
    let (abort, aborted) = watch::channel(false);
    let mut started_relays = Vec::with_capacity(relays);
    for i in 0..relays {
        started_relays.push(bench_relay(db, opts, i, check.clone()).await?);
    }
    let bar = progress(target, what);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for relay in started_relays {
        let (check, mut aborted) = (check.clone(), aborted.clone());
        tasks.spawn(relay.run(async move {
            tokio::select! {
                _ = check.reached(target) => {}
                _ = aborted.wait_for(|a| *a) => {}
            }
        }));
    }
    let series = follow(&mut tasks, &check, &abort, &bar, started).await?;
    let secs = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let delivered = check.delivered();
    if *aborted.borrow() || delivered < target {
        bail!("{what}: the relays delivered {delivered} of {target} messages, then stalled");
    }
    let left = db.store().status().await?;
    if left.pending + left.in_flight > 0 {
        bail!(
            "{what}: {} messages still pending after the sinks counted the backlog",
            left.pending + left.in_flight
        );
    }
    Ok(Drained {
        rate: delivered as f64 / secs,
        series,
        violations: check.violations(),
    })
}

/// One relay of a multi-relay drain, on its own pool, delivering to an order-checking sink.
async fn bench_relay(
    db: &BenchDb,
    opts: &Options,
    i: usize,
    check: Arc<OrderCheck>,
) -> anyhow::Result<Relay> {
    let config = RelayConfig::default()
        .relay_id(format!("bench-{}-{i}", std::process::id()))
        .batch_size(opts.batch_size);
    // One connection per batch in delivery, one for LISTEN, one to spare.
    let connections = config.in_flight_batches as u32 + 2;
    let store = db.separate_store(connections).await?;
    Ok(Relay::with_config(
        store,
        Arc::new(OrderSink(check)),
        config,
    ))
}

/// Samples the sinks' count until every relay stopped; aborts the relays once nothing was
/// delivered for [`STALL`]. Returns the progress.
async fn follow(
    tasks: &mut JoinSet<RelayReport>,
    check: &OrderCheck,
    abort: &watch::Sender<bool>,
    bar: &indicatif::ProgressBar,
    started: Instant,
) -> anyhow::Result<Progress> {
    let mut series = vec![(0.0, 0)];
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut moved = Instant::now();
    loop {
        tokio::select! {
            done = tasks.join_next() => match done {
                Some(report) => { report.context("relay task")?; }
                None => break,
            },
            _ = tick.tick() => {
                let n = check.delivered();
                if series.last().is_some_and(|(_, last)| *last != n) {
                    moved = Instant::now();
                }
                series.push((started.elapsed().as_secs_f64(), n));
                bar.set_position(n);
                if moved.elapsed() > STALL {
                    abort.send_replace(true);
                }
            }
        }
    }
    series.push((started.elapsed().as_secs_f64(), check.delivered()));
    Ok(series)
}

/// Per-key order as the sinks of one drain saw it, shared by all its relays.
#[derive(Default)]
pub(super) struct OrderCheck {
    /// The highest seq delivered per key.
    last_seq: Mutex<HashMap<String, i64>>,
    violations: AtomicU64,
    delivered: watch::Sender<u64>,
}

impl OrderCheck {
    fn record(&self, batch: &[Message]) {
        let mut late = 0;
        {
            let mut last = self.last_seq.lock().unwrap_or_else(|p| p.into_inner());
            for m in batch {
                let Some(key) = &m.key else { continue };
                match last.get_mut(key) {
                    Some(prev) if m.seq < *prev => late += 1,
                    Some(prev) => *prev = m.seq,
                    None => {
                        last.insert(key.clone(), m.seq);
                    }
                }
            }
        }
        self.violations.fetch_add(late, Ordering::Relaxed);
        self.delivered.send_modify(|n| *n += batch.len() as u64);
    }

    pub(super) fn delivered(&self) -> u64 {
        *self.delivered.borrow()
    }

    pub(super) fn violations(&self) -> u64 {
        self.violations.load(Ordering::Relaxed)
    }

    /// Completes once the sinks counted `n` deliveries.
    pub(super) async fn reached(&self, n: u64) {
        let _ = self.delivered.subscribe().wait_for(|c| *c >= n).await;
    }
}

/// A null sink that checks per-key order across every relay of a drain.
pub(super) struct OrderSink(pub(super) Arc<OrderCheck>);

#[async_trait]
impl Sink for OrderSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        self.0.record(batch);
        batch.iter().map(|_| Ok(())).collect()
    }

    fn name(&self) -> &str {
        "null"
    }
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

pub(super) fn histogram(latencies_ms: &[f64]) -> anyhow::Result<Histogram<u64>> {
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
    let config = RelayConfig::default()
        .batch_size(opts.batch_size)
        .poll_interval(opts.poll_interval);
    let relay = Relay::with_config(store, sink.clone(), config);
    let stop = Arc::new(Notify::new());
    let relay_task = {
        let stop = stop.clone();
        tokio::spawn(relay.run(async move { stop.notified().await }))
    };
    let committed = paced_writers(db, opts, what, WriteMode::Outbox).await;
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
pub(super) async fn paced_writers(
    db: &BenchDb,
    opts: &Options,
    what: &str,
    mode: WriteMode,
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
                db.write(mode, &msg).await?;
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
pub(super) struct ArrivalSink {
    arrivals: Mutex<Vec<(Uuid, Instant)>>,
    count: tokio::sync::watch::Sender<usize>,
}

impl ArrivalSink {
    pub(super) async fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        let mut rx = self.count.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n)).await;
        *rx.borrow()
    }

    pub(super) fn latencies(&self, committed: &[(Uuid, Instant)]) -> Vec<f64> {
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
    /// The inner store's own claims: only the wake-ups differ.
    fn source(self: Arc<Self>) -> Arc<dyn Source> {
        self.0.clone().source()
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
    async fn delivered_after_dead(&self, ids: Option<&[Uuid]>) -> StoreResult<Vec<(String, u64)>> {
        self.0.delivered_after_dead(ids).await
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

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(key: Option<&str>, seq: i64) -> Message {
        Message {
            id: Uuid::now_v7(),
            seq,
            topic: TOPIC.into(),
            message_type: "order.created".into(),
            key: key.map(str::to_owned),
            partition: 0,
            payload: "{}".into(),
            content_type: "application/json".into(),
            headers: Default::default(),
            created_at: chrono::Utc::now(),
            available_at: chrono::Utc::now(),
            attempts: 1,
            last_error: None,
            status: outbox_core::Status::InFlight,
        }
    }

    #[test]
    fn the_order_check_counts_a_message_delivered_after_a_later_one_of_its_key() {
        let check = OrderCheck::default();
        check.record(&[delivered(Some("a"), 1), delivered(Some("b"), 2)]);
        // Another relay's batch: b's next message, a redelivery of b's (not a violation), and
        // a message of a older than the one already delivered.
        check.record(&[delivered(Some("b"), 5), delivered(Some("b"), 5)]);
        check.record(&[delivered(Some("a"), 0), delivered(None, 0)]);
        assert_eq!(check.violations(), 1);
        assert_eq!(check.delivered(), 6);
    }
}
