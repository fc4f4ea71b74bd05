//! `outbox bench`: what the outbox costs the writer, how fast the relay drains, how long an
//! event waits between commit and delivery, and the relay's memory; each figure next to the
//! raw-SQL limit measured in the same run on the same database, because only the ratio means
//! something on a shared machine.

mod capture;
mod chart;
mod db;
mod rss;
mod scenario;
mod topology;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::cli::ClaimArg;
use crate::config::StoreSettings;
pub use db::BenchDb;

/// Which parts of the benchmark run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Write,
    Drain,
    Latency,
    Brokers,
    /// The drain with 0 (unkeyed), 1,000, 10 and 1 keys on backlogs of the same size.
    Keys,
    /// The drain with 1, 2 and 4 relays at once, each with its own pool.
    Relays,
    /// The drain without, then with the relay's HTTP surface (metrics recorded, backlog
    /// refreshed, /metrics scraped every second).
    Surface,
    /// Log-based capture (PostgreSQL with wal_level = logical): the writer's cost of a logical
    /// message, the drain from the slot against the polling drain, and commit-to-sink latency.
    Capture,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub messages: usize,
    pub keys: usize,
    pub payload_bytes: usize,
    pub batch_size: usize,
    pub claim: ClaimArg,
    pub clients: usize,
    pub write_duration: Duration,
    pub rate: u32,
    pub latency_duration: Duration,
    pub poll_interval: Duration,
    pub sinks: Vec<String>,
    /// Relays that drain the backlog at once in the drain scenario.
    pub relays: usize,
    pub scenarios: Vec<Scenario>,
    pub out: Option<PathBuf>,
    pub json: bool,
    /// The database URL, for the replication connection of the capture scenario.
    pub database_url: String,
}

impl Options {
    fn runs(&self, s: Scenario) -> bool {
        self.scenarios.contains(&s)
    }
}

/// Every figure of one run. Scenarios that did not run leave their keys `null`.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub backend: String,
    pub version: String,
    pub cores: usize,
    pub messages: usize,
    pub keys: usize,
    pub payload_bytes: usize,
    pub batch_size: usize,
    /// `transaction` or `lease` on PostgreSQL; SQLite always leases.
    pub claim_mode: String,
    pub clients: usize,
    pub rate: u32,
    /// Relays at once in the drain scenario (`--relays`).
    pub relays: usize,
    pub write_alone_tx_per_s: Option<f64>,
    pub write_outbox_tx_per_s: Option<f64>,
    pub write_raw_row_tx_per_s: Option<f64>,
    pub write_ratio: Option<f64>,
    pub raw_write_ratio: Option<f64>,
    pub drain_per_s: Option<f64>,
    pub raw_drain_per_s: Option<f64>,
    pub drain_ratio: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
    pub polling_latency_p50_ms: Option<f64>,
    pub polling_latency_p99_ms: Option<f64>,
    pub polling_latency_max_ms: Option<f64>,
    pub relay_peak_rss_mib: Option<f64>,
    /// Drain rate per sink URL (`--sink`), same message count as the drain scenario.
    pub brokers: BTreeMap<String, f64>,
    /// Drain rate per key count (0: unkeyed), each on a fresh backlog of `messages`.
    pub keys_drain_per_s: BTreeMap<usize, f64>,
    /// The raw-SQL drain of the unkeyed backlog of the keys scenario.
    pub keys_raw_drain_per_s: Option<f64>,
    /// `10/1000`, `1/1000`, `1000/0` (keyed against unkeyed) and `0/raw`.
    pub keys_ratios: BTreeMap<String, f64>,
    /// Drain rate per number of relays running at once, each on a fresh backlog of `messages`.
    pub relays_drain_per_s: BTreeMap<usize, f64>,
    /// `2/1` and `4/1`.
    pub relays_ratios: BTreeMap<String, f64>,
    /// Log-based capture (scenario capture): writes with a logical message instead of a row,
    /// against the business insert alone and a plain second row, in the same rounds.
    pub capture_write_alone_tx_per_s: Option<f64>,
    pub capture_write_row_tx_per_s: Option<f64>,
    pub capture_write_raw_row_tx_per_s: Option<f64>,
    pub capture_write_tx_per_s: Option<f64>,
    /// Logical message / alone; the row enqueue / alone and the plain row / alone of the same
    /// rounds.
    pub capture_write_ratio: Option<f64>,
    pub capture_row_write_ratio: Option<f64>,
    pub capture_raw_write_ratio: Option<f64>,
    /// The same backlog drained by polling and from the slot, one after the other.
    pub capture_polling_drain_per_s: Option<f64>,
    pub capture_drain_per_s: Option<f64>,
    /// From the slot / polling.
    pub capture_drain_ratio: Option<f64>,
    pub capture_latency_p50_ms: Option<f64>,
    pub capture_latency_p99_ms: Option<f64>,
    pub capture_latency_max_ms: Option<f64>,
    /// Table capture: writes of a captured row, its ratio to the business insert alone (same
    /// rounds as above), the drain of the same backlog as rows from the slot and its ratio to
    /// the polling drain, and its latency.
    pub capture_table_write_tx_per_s: Option<f64>,
    pub capture_table_write_ratio: Option<f64>,
    pub capture_table_drain_per_s: Option<f64>,
    pub capture_table_drain_ratio: Option<f64>,
    pub capture_table_latency_p50_ms: Option<f64>,
    pub capture_table_latency_p99_ms: Option<f64>,
    pub capture_table_latency_max_ms: Option<f64>,
    /// The same backlog of logical messages split over two outboxes, drained from their two
    /// slots at once (a relay each), and its ratio to the drain from one slot.
    pub capture_two_slots_drain_per_s: Option<f64>,
    pub capture_two_slots_ratio: Option<f64>,
    /// Peak resident memory during the drain from the slot and the latency run.
    pub capture_peak_rss_mib: Option<f64>,
    /// The drain without the HTTP surface, then with it (scenario surface).
    pub surface_off_drain_per_s: Option<f64>,
    pub surface_on_drain_per_s: Option<f64>,
    /// On against off.
    pub surface_ratio: Option<f64>,
    /// Deliveries of a key's message after a later one of the same key, over every drain whose
    /// sink checked the order (keys, relays, and the drain with `--relays` above 1). Anything
    /// above 0 fails the run.
    pub order_violations: Option<u64>,
    #[serde(skip)]
    pub series: Series,
}

/// What the charts draw.
#[derive(Debug, Default)]
pub struct Series {
    /// (seconds since start, messages drained) for the relay and for the raw SQL loop.
    pub drain: Vec<(f64, u64)>,
    pub raw_drain: Vec<(f64, u64)>,
    /// Commit-to-sink latencies in milliseconds, with wake-ups and with polling only.
    pub latency: Vec<f64>,
    pub polling_latency: Vec<f64>,
}

pub async fn run(settings: &StoreSettings, opts: Options) -> anyhow::Result<Report> {
    let db = BenchDb::open(settings, opts.clients, opts.claim).await?;
    db.prepare().await?;
    let mut report = Report {
        backend: db.backend().into(),
        version: env!("CARGO_PKG_VERSION").into(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        messages: opts.messages,
        keys: opts.keys,
        payload_bytes: opts.payload_bytes,
        batch_size: opts.batch_size,
        claim_mode: db.claim_mode().into(),
        clients: opts.clients,
        rate: opts.rate,
        relays: opts.relays,
        ..Report::default()
    };
    let outcome = scenario::run_all(&db, &opts, &mut report).await;
    let cleaned = db.cleanup().await;
    outcome?;
    cleaned?;
    if let Some(dir) = &opts.out {
        chart::write_results(dir, &report)?;
    }
    Ok(report)
}

/// A progress bar on a terminal; nothing when stderr is a pipe or a file.
fn progress(len: u64, what: &str) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    let style = ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(what.to_owned());
    bar
}

/// Fails a run whose sinks saw a key's messages out of order, after its report was printed:
/// the figures of a relay that breaks the ordering guarantee mean nothing.
pub fn check(r: &Report) -> anyhow::Result<()> {
    match r.order_violations {
        Some(n) if n > 0 => anyhow::bail!(
            "{n} messages were delivered after a later message of their key (order_violations)"
        ),
        _ => Ok(()),
    }
}

/// The text summary printed without `--json`.
pub fn print_text(r: &Report) {
    println!("{}", chart::markdown(r));
}
