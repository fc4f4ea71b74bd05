//! `outbox bench`: what the outbox costs the writer, how fast the relay drains, how long an
//! event waits between commit and delivery, and the relay's memory; each figure next to the
//! raw-SQL limit measured in the same run on the same database, because only the ratio means
//! something on a shared machine.

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
    pub scenarios: Vec<Scenario>,
    pub out: Option<PathBuf>,
    pub json: bool,
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

/// The text summary printed without `--json`.
pub fn print_text(r: &Report) {
    println!("{}", chart::markdown(r));
}
