//! One function per subcommand.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use outbox_admin::{Selection, ops};
use outbox_capture::{CaptureConfig, WalRelay};
use outbox_core::{
    DEFAULT_MAX_MESSAGE_BYTES, DeadFilter, NewMessage, Relay, RelayConfig, Sink, Store, StoreError,
};
use outbox_postgres::{EnqueueMode, PgStore};
use outbox_sinks::{Breaker, Route, Router};
use serde::Deserialize;
use tracing::{info, warn};

#[cfg(feature = "bench")]
use crate::cli::BenchArgs;
use crate::cli::{
    CaptureArg, CaptureCommand, Cli, Command, DeadCommand, EnqueueArgs, MigrateArgs, RelayArgs,
};
use crate::config::{
    FileConfig, RouteConfig, StoreSettings, relay_settings, sink_problems, store_settings,
};
use crate::store::{self, AnyStore};
use crate::telemetry::{Telemetry, init_logging};

pub async fn run(cli: Cli, telemetry: Option<&Telemetry>) -> anyhow::Result<ExitCode> {
    let file = FileConfig::load(cli.global.config.as_deref())?;
    let format = cli
        .global
        .log_format
        .or(file.log_format)
        .unwrap_or_default();
    init_logging(
        cli.global.log.as_deref().or(file.log.as_deref()),
        format,
        telemetry,
    );
    #[cfg(feature = "demo")]
    if let Command::Demo(args) = cli.command {
        let url = cli.global.database_url.or(file.database_url);
        let schema = cli.global.schema.or(file.schema);
        return crate::demo::run(url, schema, args)
            .await
            .map(|()| ExitCode::SUCCESS);
    }
    let settings = store_settings(&cli.global, &file)?;
    match cli.command {
        Command::Migrate(args) => migrate(&settings, args).await,
        Command::Enqueue(args) => enqueue(&settings, &file, args).await,
        Command::Relay(args) => relay(&settings, &file, args).await,
        Command::Status(f) => status(&settings, f.json).await,
        Command::Dead(cmd) => dead(&settings, cmd).await,
        Command::Capture(cmd) => capture(&settings, cmd).await,
        #[cfg(feature = "bench")]
        Command::Bench(args) => bench(&settings, args).await,
        #[cfg(feature = "demo")]
        Command::Demo(_) => unreachable!("handled above"),
    }
    .map(|()| ExitCode::SUCCESS)
}

/// Opens and migrates the store, for the commands that need the schema to exist.
async fn open_migrated(settings: &StoreSettings) -> anyhow::Result<AnyStore> {
    let store = store::open(settings, true).await?;
    store.store().migrate().await?;
    Ok(store)
}

async fn migrate(settings: &StoreSettings, args: MigrateArgs) -> anyhow::Result<()> {
    let store = open_migrated(settings).await?;
    if args.capture != Some(CaptureArg::Wal) {
        eprintln!("outbox schema is up to date");
        return Ok(());
    }
    let pg = postgres_only(&store, "--capture wal")?;
    let slot = args.slot.unwrap_or_else(|| pg.default_slot());
    pg.setup_capture(Some(&slot)).await?;
    eprintln!(
        "outbox schema is up to date; publication {} and replication slot {slot} are ready",
        pg.publication()
    );
    Ok(())
}

/// The PostgreSQL store, or an error saying that `what` needs one.
fn postgres_only<'a>(store: &'a AnyStore, what: &str) -> anyhow::Result<&'a PgStore> {
    match store {
        AnyStore::Postgres(pg) => Ok(pg),
        other => bail!(
            "{what} needs PostgreSQL; relays on {} poll the outbox table",
            other.backend().name()
        ),
    }
}

async fn capture(settings: &StoreSettings, cmd: CaptureCommand) -> anyhow::Result<()> {
    let store = store::open(settings, true).await?;
    let pg = postgres_only(&store, "outbox capture")?;
    match cmd {
        CaptureCommand::DropSlot { slot } => {
            let slot = slot.unwrap_or_else(|| pg.default_slot());
            if !pg.drop_slot(&slot).await? {
                bail!("no replication slot named {slot} in this database");
            }
            eprintln!("dropped replication slot {slot}");
        }
    }
    Ok(())
}

/// One line of `enqueue --file`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    topic: String,
    #[serde(rename = "type")]
    message_type: String,
    key: Option<String>,
    payload: serde_json::Value,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

impl Line {
    fn into_message(self) -> anyhow::Result<NewMessage> {
        let mut m =
            NewMessage::json(self.topic, self.message_type, &self.payload)?.headers(self.headers);
        if let Some(key) = self.key {
            m = m.key(key);
        }
        Ok(m)
    }
}

/// How much longer than the message size limit a line may be: JSON escaping and the line's
/// other fields. A line past that is refused without being read whole.
const LINE_OVERHEAD: usize = 4;

/// Messages written per statement while a file streams into its transaction.
const CHUNK: usize = 500;

/// Reads `enqueue --file` input a chunk at a time, so memory is bounded by the chunk and the
/// line cap however large the file is. A bad line rejects the whole file: the caller writes
/// every chunk in one transaction and rolls it back on the first error.
struct LineReader<R> {
    reader: R,
    source: String,
    line: usize,
    max_message: usize,
    max_line: usize,
    buf: Vec<u8>,
}

impl<R: BufRead> LineReader<R> {
    fn new(reader: R, source: &str, max_message: usize) -> Self {
        Self {
            reader,
            source: source.to_owned(),
            line: 0,
            max_message,
            max_line: max_message.saturating_mul(LINE_OVERHEAD).max(64 * 1024),
            buf: Vec::new(),
        }
    }

    /// Up to `n` messages; an empty vector at the end of the input.
    fn next_chunk(&mut self, n: usize) -> anyhow::Result<Vec<NewMessage>> {
        let mut msgs = Vec::new();
        while msgs.len() < n {
            if !self.next_line()? {
                break;
            }
            let text = std::str::from_utf8(&self.buf).map_err(|_| self.error("is not UTF-8"))?;
            if text.trim().is_empty() {
                continue;
            }
            let parsed: Line =
                serde_json::from_str(text).map_err(|e| self.error(&e.to_string()))?;
            let m = parsed
                .into_message()
                .and_then(|m| Ok(m.check(self.max_message).map(|()| m)?))
                .map_err(|e| self.error(&format!("{e:#}")))?;
            msgs.push(m);
        }
        Ok(msgs)
    }

    /// Reads one line into `buf` without its line ending; false at the end of the input.
    fn next_line(&mut self) -> anyhow::Result<bool> {
        self.buf.clear();
        // One byte past the cap tells a line at the cap from a longer one without reading it.
        let cap = u64::try_from(self.max_line)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let read = std::io::Read::take(&mut self.reader, cap)
            .read_until(b'\n', &mut self.buf)
            .with_context(|| format!("reading {}", self.source))?;
        if read == 0 {
            return Ok(false);
        }
        self.line += 1;
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
        } else if self.buf.len() > self.max_line {
            let cap = self.max_line;
            return Err(self.error(&format!("is longer than {cap} bytes")));
        }
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        Ok(true)
    }

    fn error(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "{} line {}: {what}; nothing was enqueued",
            self.source,
            self.line
        )
    }
}

fn message_from_flags(args: EnqueueArgs, max_bytes: usize) -> anyhow::Result<NewMessage> {
    let payload: serde_json::Value = serde_json::from_str(args.payload.as_deref().unwrap_or(""))
        .context("--payload is not valid JSON")?;
    let mut m = NewMessage::json(
        args.topic.unwrap_or_default(),
        args.message_type.unwrap_or_default(),
        &payload,
    )?;
    if let Some(key) = args.key {
        m = m.key(key);
    }
    if let Some(delay) = args.delay {
        m = m.delay(delay);
    }
    for h in args.headers {
        let Some((name, value)) = h.split_once('=') else {
            bail!("--header {h:?} must be NAME=VALUE");
        };
        m = m.header(name.trim(), value);
    }
    m.check(max_bytes)?;
    Ok(m)
}

async fn enqueue(
    settings: &StoreSettings,
    file: &FileConfig,
    args: EnqueueArgs,
) -> anyhow::Result<()> {
    let max = args
        .max_message_size
        .or(file.max_message_size)
        .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
    let ids = match &args.file {
        Some(path) if path.as_os_str() == "-" => {
            let reader = LineReader::new(std::io::stdin().lock(), "stdin", max);
            enqueue_lines(settings, reader, args.mode()).await?
        }
        Some(path) => {
            let f = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let source = path.display().to_string();
            let reader = LineReader::new(std::io::BufReader::new(f), &source, max);
            enqueue_lines(settings, reader, args.mode()).await?
        }
        None => {
            let mode = args.mode();
            let msg = message_from_flags(args, max)?;
            let store = writer(settings, mode).await?;
            store::enqueue_stream(&store, vec![msg], || Ok(Vec::new()), max).await?
        }
    };
    let mut out = std::io::stdout().lock();
    for id in &ids {
        writeln!(out, "{id}")?;
    }
    eprintln!("enqueued {} message(s)", ids.len());
    Ok(())
}

/// Streams the lines into one transaction; the ids are printed only once it committed.
async fn enqueue_lines(
    settings: &StoreSettings,
    mut reader: LineReader<impl BufRead>,
    mode: Option<(EnqueueMode, &str)>,
) -> anyhow::Result<Vec<uuid::Uuid>> {
    let first = reader.next_chunk(CHUNK)?;
    if first.is_empty() {
        bail!("{} holds no messages", reader.source);
    }
    let store = writer(settings, mode).await?;
    let max = reader.max_message;
    store::enqueue_stream(&store, first, || reader.next_chunk(CHUNK), max).await
}

/// The store `enqueue` writes through: rows, or with the flag of `mode`, logical messages
/// (`--wal-message`) or rows for table capture (`--captured-row`).
async fn writer(
    settings: &StoreSettings,
    mode: Option<(EnqueueMode, &str)>,
) -> anyhow::Result<AnyStore> {
    let store = open_migrated(settings).await?;
    let Some((mode, flag)) = mode else {
        return Ok(store);
    };
    let pg = postgres_only(&store, flag)?;
    Ok(AnyStore::Postgres(pg.clone().with_enqueue_mode(mode)))
}

async fn relay(settings: &StoreSettings, file: &FileConfig, args: RelayArgs) -> anyhow::Result<()> {
    if args.check {
        return check_relay(settings, file, &args).await;
    }
    let (sink_url, config) = relay_settings(&args, file)?;
    // The checks of --check, before anything is claimed: a route without sinks would
    // otherwise ack every message it matches.
    let problems = sink_problems(sink_url.as_deref(), &file.routes);
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    let sink = build_sink(sink_url.as_deref(), &file.routes).await?;
    if args.capture == Some(CaptureArg::Wal) {
        return relay_wal(settings, &args, sink, config).await;
    }
    let claim = args.claim.or(file.claim);
    let store = store::open_relay(settings, claim, config.in_flight_batches).await?;
    let store = store.store();
    let relay = Relay::with_config(store.clone(), sink, config);
    // Served from before the migration, so that probes see a database that is not up yet.
    let surface = match args.listen {
        Some(addr) => {
            let token = args.admin_token.clone();
            Some(serve_surface(addr, store.clone(), &relay, token).await?)
        }
        None => None,
    };
    if args.no_migrate {
        // Checked before any claim: on an old schema every claim would fail, and the relay
        // would report the database down forever.
        store.check_schema().await.context(
            "--no-migrate: the relay does not upgrade the schema; run `outbox migrate` first",
        )?;
    } else if !wait_for_migration(store.as_ref()).await? {
        return Ok(());
    }
    let report = relay.run(shutdown_signal()).await;
    if let Some(surface) = surface {
        surface.stop().await;
    }
    log_done(report.delivered, report.retried, report.dead);
    Ok(())
}

fn log_done(delivered: u64, retried: u64, dead: u64) {
    info!(delivered, retried, dead, "done");
}

/// `outbox relay --capture wal`: streams the slot, with a polling relay for the table's
/// retries alongside.
async fn relay_wal(
    settings: &StoreSettings,
    args: &RelayArgs,
    sink: Arc<dyn Sink>,
    config: RelayConfig,
) -> anyhow::Result<()> {
    if config.exit_when_idle {
        bail!("--exit-when-idle does not apply to --capture wal: a slot has no end to drain to");
    }
    let store = store::open_relay(settings, args.claim, config.in_flight_batches).await?;
    let pg = postgres_only(&store, "--capture wal")?.clone();
    if args.no_migrate {
        pg.check_schema().await.context(
            "--no-migrate: the relay does not upgrade the schema; run `outbox migrate` first",
        )?;
    } else if !wait_for_migration(&pg).await? {
        return Ok(());
    }
    let mut capture = CaptureConfig::default()
        .batch_size(config.batch_size)
        .retry(config.retry.clone())
        .relay(config);
    if let Some(slot) = &args.slot {
        capture = capture.slot(slot.clone());
    }
    let relay = WalRelay::new(&settings.database_url, pg.clone(), sink, capture)?;
    let surface = match args.listen {
        Some(addr) => {
            let store: Arc<dyn Store> = Arc::new(pg);
            let token = args.admin_token.clone();
            let warnings = relay.warnings();
            Some(serve_surface_with(addr, store, relay.poller(), token, warnings).await?)
        }
        None => None,
    };
    let report = relay.run(shutdown_signal()).await;
    if let Some(surface) = surface {
        surface.stop().await;
    }
    let report = report?;
    log_done(report.delivered, report.retried, report.dead);
    Ok(())
}

/// The relay's HTTP surface, served until [`Serving::stop`].
struct Serving {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Serving {
    async fn stop(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "the HTTP server failed"),
            Err(e) => warn!(error = %e, "the HTTP server panicked"),
        }
    }
}

/// Binds `addr`, prints the base URL (first, for scripts), and serves health, metrics, the
/// admin API and the dashboard. Without a token the admin API is only served on loopback.
async fn serve_surface(
    addr: std::net::SocketAddr,
    store: Arc<dyn Store>,
    relay: &Relay,
    admin_token: Option<String>,
) -> anyhow::Result<Serving> {
    serve_surface_with(addr, store, relay, admin_token, Vec::new).await
}

/// As [`serve_surface`], with what readiness lists as warnings.
async fn serve_surface_with(
    addr: std::net::SocketAddr,
    store: Arc<dyn Store>,
    relay: &Relay,
    admin_token: Option<String>,
    warnings: impl Fn() -> Vec<String> + Send + Sync + 'static,
) -> anyhow::Result<Serving> {
    outbox_admin::check_exposure(addr, admin_token.as_deref())?;
    let admin = outbox_admin::AdminState::new(store.clone())
        .with_token(admin_token)
        .with_relay_stats(relay.stats());
    let surface = outbox_server::Surface::new()
        .store(store)
        .relay(relay.monitor())
        .warnings(warnings)
        .with(axum::Router::new().nest_service("/admin", outbox_admin::router(admin)));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let mut local = listener.local_addr()?;
    if local.ip().is_unspecified() {
        local.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    println!(
        "listening on http://{local}  (/health/live, /health/ready, /metrics, dashboard at /admin/)"
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let limits = outbox_server::ServerLimits {
        shutdown_timeout: relay.config().shutdown_timeout,
        ..outbox_server::ServerLimits::default()
    };
    let task = tokio::spawn(surface.serve(listener, limits, async {
        let _ = stopped.await;
    }));
    Ok(Serving { stop, task })
}

/// Reports every problem of the relay's configuration at once; connects to nothing.
async fn check_relay(
    settings: &StoreSettings,
    file: &FileConfig,
    args: &RelayArgs,
) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    let sink = args.sink.clone().or(file.sink.clone());
    problems.extend(sink_problems(sink.as_deref(), &file.routes));
    if let Err(e) = relay_settings(args, file)
        && !e.to_string().starts_with("no sink")
    {
        problems.push(format!("{e:#}"));
    }
    if let Err(e) = store::open_relay(settings, args.claim.or(file.claim), 2).await {
        problems.push(format!("{e:#}"));
    }
    if problems.is_empty() {
        println!("configuration is valid");
        return Ok(());
    }
    for p in &problems {
        eprintln!("problem: {}", outbox_core::redact(p));
    }
    bail!("{} problem(s) in the configuration", problems.len())
}

/// The sink of `--sink`, or a router over `[[routes]]` (with `--sink` as the default route).
/// Each distinct URL is one sink behind a circuit breaker, shared by the routes that name it.
async fn build_sink(
    default: Option<&str>,
    routes: &[RouteConfig],
) -> anyhow::Result<Arc<dyn Sink>> {
    if routes.is_empty() {
        let url = default.context("no sink configured")?;
        return Ok(outbox_sinks::from_url(url).await?);
    }
    let mut opened: Vec<(String, Arc<dyn Sink>)> = Vec::new();
    let mut open = async |url: &str| -> anyhow::Result<Arc<dyn Sink>> {
        if let Some((_, s)) = opened.iter().find(|(u, _)| u == url) {
            return Ok(s.clone());
        }
        let inner = outbox_sinks::from_url(url)
            .await
            .with_context(|| format!("sink {url}"))?;
        let sink: Arc<dyn Sink> = Arc::new(Breaker::new(inner, 3, Duration::from_secs(5)));
        opened.push((url.to_owned(), sink.clone()));
        Ok(sink)
    };
    let mut built = Vec::new();
    for r in routes {
        let mut sinks = Vec::new();
        for url in &r.sinks {
            sinks.push(open(url).await?);
        }
        built.push(Route::new(&r.pattern, sinks));
    }
    let default = match default {
        Some(url) => Some(vec![open(url).await?]),
        None => None,
    };
    Ok(Arc::new(Router::new(built, default)))
}

/// Migrates at start, waiting for a database that is not up yet; false if told to stop first.
async fn wait_for_migration(store: &dyn Store) -> anyhow::Result<bool> {
    let mut pause = Duration::from_millis(200);
    let mut warned = false;
    let mut stop = std::pin::pin!(shutdown_signal());
    loop {
        match store.migrate().await {
            Ok(()) => return Ok(true),
            Err(e @ StoreError::Database(_)) => {
                if !warned {
                    warn!(error = %e, "database unavailable; waiting for it");
                    warned = true;
                }
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = &mut stop => return Ok(false),
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    info!("shutting down");
}

async fn status(settings: &StoreSettings, json: bool) -> anyhow::Result<()> {
    let any = open_migrated(settings).await?;
    let s = ops::status(any.store().as_ref()).await?;
    let slots = match &any {
        AnyStore::Postgres(pg) => pg.slots().await?,
        _ => Vec::new(),
    };
    if json {
        let mut value = serde_json::to_value(&s)?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("slots".into(), serde_json::to_value(&slots)?);
        }
        println!("{value}");
    } else {
        print!("{}", ops::status_text(&s));
        for slot in &slots {
            let state = if slot.active { "streaming" } else { "no relay" };
            println!(
                "slot {}: {state}, {} bytes of WAL kept behind its relay",
                slot.name, slot.lag_bytes
            );
        }
    }
    Ok(())
}

async fn dead(settings: &StoreSettings, cmd: DeadCommand) -> anyhow::Result<()> {
    let store = open_migrated(settings).await?.store();
    match cmd {
        DeadCommand::List {
            json,
            limit,
            topic,
            message_type,
            key,
            error,
            after,
        } => {
            let filter = DeadFilter {
                topic,
                message_type,
                key,
                error,
                ..DeadFilter::default()
            };
            let dead = dead_entries(store.as_ref(), &filter, after, limit).await?;
            if json.json {
                println!("{}", serde_json::to_string(&dead)?);
            } else if dead.is_empty() {
                println!("no dead messages");
            } else {
                for m in &dead {
                    println!("{}", m.line());
                }
            }
        }
        DeadCommand::Retry { ids, all } => {
            let selection = if all {
                Selection::All
            } else {
                Selection::Ids(ids)
            };
            let r = ops::dead_retry(store.as_ref(), &selection).await?;
            for note in &r.notes {
                eprintln!("{note}");
            }
            if let Some(problem) = r.incomplete() {
                bail!("{problem}");
            }
            println!("{} message(s) pending again", r.retried);
        }
        DeadCommand::Purge { older_than } => {
            let selection = match older_than {
                Some(d) => Selection::Matching(DeadFilter {
                    older_than: Some(d),
                    ..DeadFilter::default()
                }),
                None => Selection::All,
            };
            let n = ops::dead_purge(store.as_ref(), &selection).await?;
            println!("{n} dead message(s) deleted");
        }
    }
    Ok(())
}

/// Up to `limit` dead letters, read a page at a time.
async fn dead_entries(
    store: &dyn Store,
    filter: &DeadFilter,
    mut after: Option<uuid::Uuid>,
    limit: usize,
) -> anyhow::Result<Vec<ops::DeadEntry>> {
    let mut out = Vec::new();
    while out.len() < limit {
        let want = (limit - out.len()).min(ops::MAX_PAGE);
        let page = ops::dead_list(store, filter, after, want).await?;
        out.extend(page.items);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    Ok(out)
}

/// Runs the benchmark scenarios; see [`crate::bench`].
#[cfg(feature = "bench")]
async fn bench(settings: &StoreSettings, args: BenchArgs) -> anyhow::Result<()> {
    for url in &args.sinks {
        outbox_sinks::check_url(url)?;
    }
    if args.messages == 0
        || args.batch_size == 0
        || args.clients == 0
        || args.rate == 0
        || args.relays == 0
    {
        bail!("--messages, --batch-size, --clients, --rate and --relays must be at least 1");
    }
    let opts = crate::bench::Options {
        messages: args.messages,
        keys: args.keys,
        payload_bytes: args.payload_bytes,
        batch_size: args.batch_size,
        claim: args.claim,
        clients: args.clients,
        write_duration: args.duration,
        rate: args.rate,
        latency_duration: args.latency_duration,
        poll_interval: args.poll_interval,
        sinks: args.sinks,
        relays: args.relays,
        scenarios: args.scenario,
        out: (!args.no_files).then_some(args.out),
        json: args.json,
        database_url: settings.database_url.clone(),
    };
    let json = opts.json;
    let report = crate::bench::run(settings, opts).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        crate::bench::print_text(&report);
    }
    crate::bench::check(&report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_line_rejects_the_file_and_names_the_line() {
        let input =
            "{\"topic\":\"t\",\"type\":\"e\",\"payload\":{}}\n\n{\"topic\":\"t\",\"payload\":1}\n";
        let err = LineReader::new(input.as_bytes(), "events.jsonl", DEFAULT_MAX_MESSAGE_BYTES)
            .next_chunk(CHUNK)
            .unwrap_err()
            .to_string();
        assert!(err.contains("events.jsonl line 3"), "{err}");
        assert!(err.contains("type"), "{err}");
    }

    #[test]
    fn lines_become_messages_with_keys_and_headers() {
        let input = "{\"topic\":\"t\",\"type\":\"e\",\"key\":\"k\",\"payload\":{\"a\":1},\"headers\":{\"h\":\"v\"}}\n";
        let msgs = LineReader::new(input.as_bytes(), "stdin", DEFAULT_MAX_MESSAGE_BYTES)
            .next_chunk(CHUNK)
            .unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].key_ref(), Some("k"));
        assert_eq!(msgs[0].header_map().get("h").map(String::as_str), Some("v"));
        assert_eq!(msgs[0].payload(), b"{\"a\":1}");
    }

    #[test]
    fn input_is_read_a_chunk_at_a_time() {
        let input = "{\"topic\":\"t\",\"type\":\"e\",\"payload\":1}\r\n".repeat(5);
        let mut reader = LineReader::new(input.as_bytes(), "stdin", DEFAULT_MAX_MESSAGE_BYTES);
        let sizes: Vec<usize> = (0..4)
            .map(|_| reader.next_chunk(2).unwrap().len())
            .collect();
        assert_eq!(sizes, [2, 2, 1, 0]);
    }

    #[test]
    fn a_line_over_the_cap_is_refused_without_reading_it_whole() {
        let ok = "{\"topic\":\"t\",\"type\":\"e\",\"payload\":1}";
        let long = format!(
            "{{\"topic\":\"t\",\"type\":\"e\",\"payload\":\"{}\"}}",
            "x".repeat(100)
        );
        let input = format!("{ok}\n{long}\n{ok}\n");
        let mut reader = LineReader::new(input.as_bytes(), "f.jsonl", DEFAULT_MAX_MESSAGE_BYTES);
        reader.max_line = ok.len();
        let err = reader.next_chunk(10).unwrap_err().to_string();
        assert!(err.contains("f.jsonl line 2"), "{err}");
        assert!(
            err.contains(&format!("longer than {} bytes", ok.len())),
            "{err}"
        );
        assert_eq!(reader.buf.len(), ok.len() + 1, "read past the cap");
    }
}
