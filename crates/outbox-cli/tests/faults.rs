//! Faults in the middle of a drain, against the real `outbox relay` binary: PostgreSQL stopped
//! and started again (fast and immediate shutdown), relays SIGKILLed, the destination gone.
//!
//! Each test runs a private PostgreSQL cluster (`outbox_testkit::cluster`), never the shared
//! one, and a webhook receiver of its own that it can take down. Every message carries its key
//! and its position in that key (`n`), so the receiver's log tells what was lost, what came twice
//! and whether a key ever skipped ahead.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use outbox_core::{NewMessage, Store};
use outbox_postgres::{PgConfig, PgStore};
use outbox_testkit::cluster::{PgCluster, StopMode};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

type R = anyhow::Result<()>;

/// One request the receiver answered (or was about to answer) with 204.
struct Got {
    key: String,
    n: u64,
    at: Instant,
}

/// A webhook destination on loopback that records every message it receives, and that can go
/// away: [`Receiver::down`] stops listening and closes its open connections, so the relay sees
/// refused connections until [`Receiver::up`] listens again on the same port.
#[derive(Clone)]
struct Receiver {
    inner: Arc<Inner>,
}

/// Everything received, in arrival order, and the distinct messages among it.
#[derive(Default)]
struct Log {
    got: Vec<Got>,
    seen: HashSet<(String, u64)>,
    /// Keys with a request being answered.
    busy: HashSet<String>,
    /// Requests that arrived while another of their key was being answered: two relays
    /// delivering one key at once.
    overlaps: Vec<String>,
}

impl Log {
    fn distinct(&self) -> usize {
        self.seen.len()
    }

    fn push(&mut self, got: Got) {
        if !self.busy.insert(got.key.clone()) {
            self.overlaps.push(format!(
                "{} #{} while another was in delivery",
                got.key, got.n
            ));
        }
        self.seen.insert((got.key.clone(), got.n));
        self.got.push(got);
    }
}

/// Ends a request's delivery when dropped: answered, failed, or cut by an outage.
struct Answering<'a>(&'a Inner, Option<String>);

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.1.take() {
            self.0.lock().busy.remove(&key);
        }
    }
}

struct Inner {
    port: u16,
    log: Mutex<Log>,
    progress: Notify,
    up: watch::Sender<bool>,
    /// How long each request takes to answer: a slow destination.
    delay: Duration,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Receiver {
    async fn start() -> anyhow::Result<Self> {
        Self::answering_after(Duration::ZERO).await
    }

    async fn answering_after(delay: Duration) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let inner = Arc::new(Inner {
            port: listener.local_addr()?.port(),
            log: Mutex::default(),
            progress: Notify::new(),
            up: watch::Sender::new(true),
            delay,
        });
        tokio::spawn(accept(inner.clone(), listener));
        Ok(Self { inner })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.inner.port)
    }

    fn down(&self) {
        self.inner.up.send_replace(false);
    }

    fn up(&self) {
        self.inner.up.send_replace(true);
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.inner.lock()
    }

    /// Waits until `done` holds for the log; fails after `within`.
    async fn wait(&self, what: &str, within: Duration, done: impl Fn(&Log) -> bool) -> R {
        let deadline = Instant::now() + within;
        loop {
            let progress = self.inner.progress.notified();
            if done(&self.log()) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            // Also wakes now and then, for conditions that depend on more than the log.
            let step = left.min(Duration::from_millis(200));
            ensure!(!left.is_zero(), "{what} within {within:?}");
            let _ = tokio::time::timeout(step, progress).await;
        }
    }

    /// Waits for the first delivery after `since`; returns how long it took.
    async fn next_after(&self, since: Instant, within: Duration) -> anyhow::Result<Duration> {
        self.wait("no delivery", within, |log| {
            log.got.last().is_some_and(|g| g.at >= since)
        })
        .await?;
        let log = self.log();
        let first = log.got.iter().find(|g| g.at >= since).map(|g| g.at);
        Ok(first.unwrap_or(since) - since)
    }
}

/// Accepts connections while up; when down, drops the listener (connections are refused) until
/// up again.
async fn accept(inner: Arc<Inner>, first: TcpListener) {
    let mut up = inner.up.subscribe();
    let mut listener = Some(first);
    loop {
        let l = match listener.take() {
            Some(l) => l,
            None => {
                if up.wait_for(|u| *u).await.is_err() {
                    return;
                }
                match TcpListener::bind(("127.0.0.1", inner.port)).await {
                    Ok(l) => l,
                    Err(_) => {
                        // The old socket may linger for a moment.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
            }
        };
        loop {
            tokio::select! {
                accepted = l.accept() => {
                    if let Ok((stream, _)) = accepted {
                        tokio::spawn(serve(inner.clone(), stream));
                    }
                }
                _ = up.wait_for(|u| !*u) => break,
            }
        }
    }
}

/// Serves one keep-alive connection until its peer closes it or the receiver goes down.
async fn serve(inner: Arc<Inner>, stream: TcpStream) {
    let mut up = inner.up.subscribe();
    tokio::select! {
        _ = requests(&inner, stream) => {}
        _ = up.wait_for(|u| !*u) => {}
    }
}

async fn requests(inner: &Inner, stream: TcpStream) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).await? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.trim().eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await?;
        let payload: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let mut answering = Answering(inner, None);
        if let (Some(key), Some(n)) = (payload["key"].as_str(), payload["n"].as_u64()) {
            let got = Got {
                key: key.to_owned(),
                n,
                at: Instant::now(),
            };
            inner.lock().push(got);
            answering.1 = Some(key.to_owned());
            inner.progress.notify_waiters();
        }
        if !inner.delay.is_zero() {
            tokio::time::sleep(inner.delay).await;
        }
        // The delivery ends before its answer leaves: once the answer is out, the relay may send
        // the key's next message on another connection, whose task could otherwise mark the key
        // busy before this one got round to clearing it.
        drop(answering);
        writer
            .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
            .await?;
    }
}

/// Enqueues messages round-robin over `keys` keys, numbering each key's messages from 0.
struct Writer {
    store: PgStore,
    next: Vec<u64>,
    written: usize,
}

impl Writer {
    async fn connect(url: &str, keys: usize) -> anyhow::Result<Self> {
        let store = PgStore::connect(url, PgConfig::default()).await?;
        store.migrate().await?;
        Ok(Self {
            store,
            next: vec![0; keys],
            written: 0,
        })
    }

    /// Writes `count` messages, a thousand per transaction.
    async fn write(&mut self, count: usize) -> R {
        let mut left = count;
        while left > 0 {
            let chunk = left.min(1000);
            let mut msgs = Vec::with_capacity(chunk);
            for _ in 0..chunk {
                let k = self.written % self.next.len();
                let n = self.next[k];
                let key = format!("k{k}");
                let payload = serde_json::json!({ "key": key, "n": n });
                msgs.push(NewMessage::json("faults", "fault.test", &payload)?.key(key));
                self.next[k] += 1;
                self.written += 1;
            }
            let mut tx = self.store.pool().begin().await?;
            self.store.outbox().enqueue_batch(&mut tx, &msgs).await?;
            tx.commit().await?;
            left -= chunk;
        }
        Ok(())
    }

    /// Waits until nothing is pending or in flight.
    async fn drained(&self, within: Duration) -> R {
        let deadline = Instant::now() + within;
        loop {
            let s = self.store.status().await?;
            if s.pending == 0 && s.in_flight == 0 {
                ensure!(s.dead == 0, "{} messages went dead", s.dead);
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the outbox did not drain within {within:?}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What the receiver got, against what was written.
#[derive(Debug, Default)]
struct Verdict {
    distinct: usize,
    duplicates: usize,
    lost: usize,
    /// Deliveries that went out before an older message of their key had been delivered.
    skipped_ahead: Vec<String>,
    /// Deliveries of a key while another delivery of it was unanswered (two relays at once).
    overlaps: Vec<String>,
}

impl Verdict {
    /// Nothing lost and no key skipped ahead. Deliveries of a key while another was still
    /// unanswered are reported, not refused: a relay SIGKILLed in the middle of a request
    /// leaves it at the destination, which may still be answering it when another relay
    /// delivers the key again.
    fn check(&self) -> R {
        ensure!(self.lost == 0, "{} messages lost", self.lost);
        ensure!(
            self.skipped_ahead.is_empty(),
            "keys skipped ahead: {:?}",
            &self.skipped_ahead[..self.skipped_ahead.len().min(10)]
        );
        if !self.overlaps.is_empty() {
            println!(
                "{} deliveries of a key that another relay was delivering: {:?}",
                self.overlaps.len(),
                &self.overlaps[..self.overlaps.len().min(5)]
            );
        }
        Ok(())
    }

    /// As `check`, and no key was ever in delivery at two relays at once.
    fn check_one_at_a_time(&self) -> R {
        self.check()?;
        ensure!(
            self.overlaps.is_empty(),
            "{} deliveries of a key that another relay was delivering: {:?}",
            self.overlaps.len(),
            &self.overlaps[..self.overlaps.len().min(5)]
        );
        Ok(())
    }
}

/// Walks the receiver's log in arrival order. Duplicates are allowed (at least once: a relay
/// killed after the sink and before the ack sends its batch again, so a key may repeat a run
/// it already sent); what must never happen is a message arriving before every older message
/// of its key has arrived at least once.
fn verdict(log: &Log, written: &[u64]) -> Verdict {
    let mut next: HashMap<&str, u64> = HashMap::new();
    let mut v = Verdict {
        overlaps: log.overlaps.clone(),
        ..Verdict::default()
    };
    for g in &log.got {
        let expected = next.entry(&g.key).or_default();
        if g.n < *expected {
            v.duplicates += 1;
        } else if g.n == *expected {
            *expected += 1;
            v.distinct += 1;
        } else {
            v.skipped_ahead
                .push(format!("{} #{} arrived before #{}", g.key, g.n, *expected));
        }
    }
    v.lost = written
        .iter()
        .enumerate()
        .map(|(k, &count)| {
            count.saturating_sub(next.get(format!("k{k}").as_str()).copied().unwrap_or(0))
        })
        .sum::<u64>() as usize;
    v
}

/// `outbox relay` processes on one database and one sink, restarted as a supervisor would.
/// Whatever happens to the test, they die with it: SIGKILLed on drop, and by the kernel (the
/// parent-death signal) if the test process itself is killed.
struct Relays {
    database_url: String,
    sink: String,
    args: Vec<String>,
    dir: tempfile::TempDir,
    procs: Vec<Child>,
    started: usize,
}

impl Relays {
    fn new(database_url: &str, sink: &str, args: &[&str]) -> anyhow::Result<Self> {
        Ok(Self {
            database_url: database_url.to_owned(),
            sink: sink.to_owned(),
            args: args.iter().map(|s| s.to_string()).collect(),
            dir: tempfile::tempdir()?,
            procs: Vec::new(),
            started: 0,
        })
    }

    fn log_path(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("relay-{n}.log"))
    }

    fn spawn(&mut self) -> anyhow::Result<Child> {
        let log = std::fs::File::create(self.log_path(self.started))?;
        self.started += 1;
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(env!("CARGO_BIN_EXE_outbox"))
            .args(["relay", "--sink", &self.sink])
            .args(&self.args)
            .env("OUTBOX_DATABASE_URL", &self.database_url)
            // OUTBOX_TEST_RELAY_LOG=debug,… shows more of the relays' logs on a failure.
            .env(
                "OUTBOX_LOG",
                std::env::var("OUTBOX_TEST_RELAY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("OUTBOX_SCHEMA")
            .env_remove("OUTBOX_SINK")
            .env_remove("OUTBOX_WEBHOOK_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start outbox relay (needs setpriv from util-linux)")?;
        Ok(child)
    }

    /// Starts one more relay.
    fn start(&mut self) -> R {
        let child = self.spawn()?;
        self.procs.push(child);
        Ok(())
    }

    /// SIGKILLs relay `i` and starts a new one in its place.
    fn kill_and_restart(&mut self, i: usize) -> R {
        let old = &mut self.procs[i];
        old.kill()?;
        old.wait()?;
        self.procs[i] = self.spawn()?;
        Ok(())
    }

    /// Fails if a relay exited by itself: it should survive every fault here.
    fn all_running(&mut self) -> R {
        for i in 0..self.procs.len() {
            if let Some(status) = self.procs[i].try_wait()? {
                anyhow::bail!("a relay exited by itself ({status}): {}", self.logs());
            }
        }
        Ok(())
    }

    /// The last lines of every relay's log, for failure messages.
    fn logs(&self) -> String {
        (0..self.started)
            .map(|n| {
                let text = std::fs::read_to_string(self.log_path(n)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                format!(
                    "--- relay {n}\n{}",
                    lines[lines.len().saturating_sub(15)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for child in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs blocking cluster operations without stalling the runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A private cluster with an `outbox` database.
fn cluster() -> anyhow::Result<(PgCluster, String)> {
    let pg = PgCluster::start_new()?;
    pg.create_database("outbox")?;
    let url = pg.url("outbox");
    Ok((pg, url))
}

fn relay_log_on_failure(relays: &Relays, pg: &PgCluster, r: R) -> R {
    r.with_context(|| format!("{}\n--- postgres\n{}", relays.logs(), pg.log_tail()))
}

/// Commits one message after the relay has been idle for a while, and returns how long it took
/// to arrive: the relay must be woken by the commit, as before the restart, not find it at its
/// next poll. After a few idle seconds the relay's settling polls are seconds apart, and its
/// poll interval is far above the bound, so only the wake-up arrives in time.
async fn wakes_after_idle(rx: &Receiver, writer: &mut Writer) -> anyhow::Result<Duration> {
    // Settling polls come 5, 10, 20 … ms apart: after 6 s idle the next one is over 4 s away,
    // so a bound of 2 s tells a wake-up from a poll with room for a loaded machine.
    const IDLE: Duration = Duration::from_secs(6);
    const WAKE: Duration = Duration::from_secs(2);
    tokio::time::sleep(IDLE).await;
    let before = rx.log().distinct();
    let committed = Instant::now();
    writer.write(1).await?;
    rx.wait("the commit after idling", Duration::from_secs(30), |log| {
        log.distinct() > before
    })
    .await?;
    let took = committed.elapsed();
    ensure!(
        took <= WAKE,
        "a commit reached the idle relay after {took:?} (bound {WAKE:?}): not woken"
    );
    Ok(took)
}

/// A relay drains a backlog on many keys; PostgreSQL stops (`mode`) in the middle and starts
/// again. Nothing may be lost, no key may skip ahead, and the relay must deliver again soon
/// after the database is back, by itself.
async fn restart_mid_drain(mode: StopMode) -> R {
    const MESSAGES: usize = 10_000;
    const KEYS: usize = 500;
    /// How soon after the database accepts connections again the relay must deliver.
    const RECOVERY: Duration = Duration::from_secs(15);

    let (pg, url) = blocking(cluster)?;
    let rx = Receiver::start().await?;
    let mut writer = Writer::connect(&url, KEYS).await?;
    writer.write(MESSAGES).await?;
    let mut relays = Relays::new(&url, &rx.url(), &["--poll-interval", "30s"])?;
    relays.start()?;
    let began = Instant::now();
    let run = async {
        rx.wait("the drain did not start", Duration::from_secs(60), |log| {
            log.distinct() >= MESSAGES / 10
        })
        .await?;
        blocking(|| pg.stop(mode))?;
        let at_stop = rx.log().distinct();
        ensure!(
            at_stop < MESSAGES,
            "the backlog was drained before the database stopped; the test proves nothing"
        );
        blocking(|| pg.start())?;
        let back = Instant::now();
        let recovery = rx.next_after(back, Duration::from_secs(60)).await?;
        relays.all_running()?;
        ensure!(
            recovery <= RECOVERY,
            "the relay delivered again {recovery:?} after the database was back (bound {RECOVERY:?})"
        );
        rx.wait("not everything arrived", Duration::from_secs(180), |log| {
            log.distinct() >= MESSAGES
        })
        .await?;
        writer.drained(Duration::from_secs(60)).await?;
        let woken = wakes_after_idle(&rx, &mut writer).await?;
        let v = verdict(&rx.log(), &writer.next);
        println!(
            "restart ({mode:?}) at {at_stop} of {MESSAGES}: relay back {recovery:?} after the \
             database; {} delivered, {} duplicates, {} lost, in {:?}; idle, woken in {woken:?}",
            v.distinct,
            v.duplicates,
            v.lost,
            began.elapsed()
        );
        v.check()
    };
    let result = run.await;
    relay_log_on_failure(&relays, &pg, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fast_restart_mid_drain_loses_nothing_and_keeps_key_order() -> R {
    restart_mid_drain(StopMode::Fast).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_mid_drain_loses_nothing_and_keeps_key_order() -> R {
    restart_mid_drain(StopMode::Immediate).await
}

/// The soak's size: scaled down by default so that it runs in about a minute;
/// `OUTBOX_SOAK=1` runs the full one.
struct Soak {
    messages: usize,
    keys: usize,
    kills: usize,
    outage: Duration,
}

impl Soak {
    fn from_env() -> Self {
        if std::env::var("OUTBOX_SOAK").is_ok_and(|v| v == "1") {
            Self {
                messages: 100_000,
                keys: 1_000,
                kills: 20,
                outage: Duration::from_secs(30),
            }
        } else {
            Self {
                messages: 10_000,
                keys: 1_000,
                kills: 5,
                outage: Duration::from_secs(3),
            }
        }
    }

    /// The faults, each due once this many distinct messages have arrived: kills spread over
    /// the run, the database restart and the outage between them.
    fn schedule(&self) -> Vec<(usize, Fault)> {
        let at = |share: f64| (self.messages as f64 * share) as usize;
        let mut faults: Vec<(usize, Fault)> = (0..self.kills)
            .map(|i| {
                let share = 0.05 + 0.85 * i as f64 / (self.kills.max(2) - 1) as f64;
                (at(share), Fault::Kill(i % 2))
            })
            .collect();
        faults.push((at(0.35), Fault::RestartDatabase));
        faults.push((at(0.6), Fault::Outage));
        faults.sort_by_key(|(at, _)| *at);
        faults
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL relay 0 or 1, and start a new one in its place.
    Kill(usize),
    /// PostgreSQL crashes (immediate shutdown) and starts again.
    RestartDatabase,
    /// The destination stops listening for the outage's length.
    Outage,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_two_relays_through_kills_a_database_restart_and_an_outage_lose_nothing() -> R {
    const RECOVERY: Duration = Duration::from_secs(15);
    let soak = Soak::from_env();
    let (pg, url) = blocking(cluster)?;
    let rx = Receiver::start().await?;
    let mut writer = Writer::connect(&url, soak.keys).await?;
    // Transient failures retry quickly and never run out during the outage.
    let args = [
        "--retry-base",
        "100ms",
        "--retry-max",
        "1s",
        "--max-attempts",
        "100000",
    ];
    let mut relays = Relays::new(&url, &rx.url(), &args)?;
    let began = Instant::now();
    let run = async {
        // The writer keeps a backlog ahead of the relays rather than writing everything first,
        // so that faults also fall between commits and their wake-ups.
        let backlog = (soak.messages / 5).max(2_000);
        writer.write(backlog.min(soak.messages)).await?;
        relays.start()?;
        relays.start()?;
        let mut faults = soak.schedule().into_iter().peekable();
        let mut outage_ends: Option<Instant> = None;
        let mut recoveries: Vec<(&str, Duration)> = Vec::new();
        let deadline = Instant::now()
            + Duration::from_secs(60)
            + soak.outage * 2
            + Duration::from_millis(soak.messages as u64 * 20);
        loop {
            let distinct = rx.log().distinct();
            if distinct >= soak.messages {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{distinct} of {} arrived within the soak's time",
                soak.messages
            );
            relays.all_running()?;
            if writer.written < soak.messages && writer.written - distinct < backlog {
                writer
                    .write(1_000.min(soak.messages - writer.written))
                    .await?;
            }
            if let Some(ends) = outage_ends
                && Instant::now() >= ends
            {
                outage_ends = None;
                rx.up();
                let back = Instant::now();
                recoveries.push(("destination", rx.next_after(back, RECOVERY * 2).await?));
            }
            while outage_ends.is_none()
                && let Some((_, fault)) = faults.next_if(|(at, _)| distinct >= *at)
            {
                match fault {
                    Fault::Kill(i) => relays.kill_and_restart(i)?,
                    Fault::RestartDatabase => {
                        blocking(|| pg.restart(StopMode::Immediate))?;
                        let back = Instant::now();
                        recoveries.push(("database", rx.next_after(back, RECOVERY * 2).await?));
                    }
                    Fault::Outage => {
                        rx.down();
                        outage_ends = Some(Instant::now() + soak.outage);
                    }
                }
            }
            let progress = rx.inner.progress.notified();
            let _ = tokio::time::timeout(Duration::from_millis(100), progress).await;
        }
        ensure!(
            faults.next().is_none() && outage_ends.is_none(),
            "the drain ended before every fault happened"
        );
        writer.drained(Duration::from_secs(60)).await?;
        let v = verdict(&rx.log(), &writer.next);
        println!(
            "soak: {} messages on {} keys, 2 relays, {} SIGKILLs, a PostgreSQL crash and a {:?} \
             outage of the destination: {} delivered, {} duplicates, {} lost, {} out of order, \
             {} of a key already in delivery; back after {recoveries:?}; {:?}",
            soak.messages,
            soak.keys,
            soak.kills,
            soak.outage,
            v.distinct,
            v.duplicates,
            v.lost,
            v.skipped_ahead.len(),
            v.overlaps.len(),
            began.elapsed()
        );
        v.check()?;
        for (what, took) in &recoveries {
            ensure!(
                *took <= RECOVERY,
                "the relays delivered again {took:?} after the {what} was back (bound {RECOVERY:?})"
            );
        }
        Ok(())
    };
    let result = run.await;
    relay_log_on_failure(&relays, &pg, result)
}

/// Two relays share few keys and a slow destination, so that each batch is still in delivery
/// for seconds; PostgreSQL restarts under them. Every claim dies with its session while the
/// relays are still in the sink: the keys of those batches stay fenced until their relay's
/// delivery deadline has passed, so that no key is ever delivered by two relays at once, and
/// nothing is lost or skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_a_slow_destination_never_share_a_key_across_a_database_restart() -> R {
    const KEYS: usize = 8;
    const MESSAGES: usize = KEYS * 50;
    let (pg, url) = blocking(cluster)?;
    let rx = Receiver::answering_after(Duration::from_millis(100)).await?;
    let mut writer = Writer::connect(&url, KEYS).await?;
    writer.write(MESSAGES).await?;
    let mut relays = Relays::new(&url, &rx.url(), &[])?;
    let run = async {
        relays.start()?;
        relays.start()?;
        rx.wait("the drain did not start", Duration::from_secs(60), |log| {
            log.distinct() >= MESSAGES / 5
        })
        .await?;
        blocking(|| pg.restart(StopMode::Fast))?;
        rx.wait("not everything arrived", Duration::from_secs(120), |log| {
            log.distinct() >= MESSAGES
        })
        .await?;
        writer.drained(Duration::from_secs(60)).await?;
        relays.all_running()?;
        let v = verdict(&rx.log(), &writer.next);
        println!(
            "two relays, slow destination, restart: {} delivered, {} duplicates, {} lost, {} \
             deliveries of a key already in delivery",
            v.distinct,
            v.duplicates,
            v.lost,
            v.overlaps.len()
        );
        v.check_one_at_a_time()
    };
    let result = run.await;
    relay_log_on_failure(&relays, &pg, result)
}

/// `outbox relay --capture wal`, two of them on one slot (one streams, one stands by), SIGKILLed
/// eight times in the middle of the stream, and PostgreSQL crashed and restarted half-way,
/// while writers keep emitting logical messages:
/// nothing is lost, and every key arrives in commit order (each key's writers commit its `n`
/// in order). A kill between the sink and the slot's confirmation replays from the last
/// confirmed position, so duplicates are allowed; skipping ahead is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_capture_relays_sigkilled_and_a_database_crash_lose_nothing_and_keep_commit_order() -> R
{
    capture_through_kills(outbox_postgres::EnqueueMode::WalMessage).await
}

/// The same with table capture: writers insert rows that only the stream delivers, and the
/// relay removes each row once delivered, so the table is empty at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_capture_relays_sigkilled_and_a_database_crash_lose_nothing_and_keep_commit_order()
-> R {
    capture_through_kills(outbox_postgres::EnqueueMode::CapturedRow).await
}

async fn capture_through_kills(mode: outbox_postgres::EnqueueMode) -> R {
    const MESSAGES: usize = 10_000;
    const KEYS: usize = 50;
    const KILLS: usize = 8;
    let (pg, url) = blocking(|| {
        let pg = PgCluster::start_with(&["wal_level=logical", "max_wal_senders=10"])?;
        pg.create_database("outbox")?;
        let url = pg.url("outbox");
        anyhow::Ok((pg, url))
    })?;
    let rx = Receiver::start().await?;
    let mut writer = Writer::connect(&url, KEYS).await?;
    writer.store = writer.store.clone().with_enqueue_mode(mode);
    let mut relays = Relays::new(
        &url,
        &rx.url(),
        &["--capture", "wal", "--batch-size", "200"],
    )?;
    let began = Instant::now();
    let run = async {
        relays.start()?;
        relays.start()?;
        // Both relays are up (one streams, one waits) before the first message.
        rx.wait("no relay streams", Duration::from_secs(30), |_| {
            std::fs::read_to_string(relays.log_path(0))
                .unwrap_or_default()
                .contains("streaming")
                || std::fs::read_to_string(relays.log_path(1))
                    .unwrap_or_default()
                    .contains("streaming")
        })
        .await?;
        let (mut kills, mut restarted) = (0, false);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let distinct = rx.log().distinct();
            if distinct >= MESSAGES {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{distinct} of {MESSAGES} arrived in time"
            );
            relays.all_running()?;
            if writer.written < MESSAGES && writer.written - distinct < 2_000 {
                writer.write(500.min(MESSAGES - writer.written)).await?;
            }
            if kills < KILLS && distinct >= (kills + 1) * MESSAGES / (KILLS + 2) {
                relays.kill_and_restart(kills % 2)?;
                kills += 1;
                if kills == KILLS / 2 {
                    // Every session ends, the streaming one's with it: the relays connect
                    // again and replay from the confirmed position.
                    blocking(|| pg.restart(StopMode::Immediate))?;
                    restarted = true;
                }
            }
            let progress = rx.inner.progress.notified();
            let _ = tokio::time::timeout(Duration::from_millis(100), progress).await;
        }
        ensure!(
            kills == KILLS && restarted,
            "the stream ended after {kills} kills"
        );
        writer.drained(Duration::from_secs(60)).await?;
        let status = Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(["status", "--json"])
            .env("OUTBOX_DATABASE_URL", &url)
            .output()?;
        let status: serde_json::Value = serde_json::from_slice(&status.stdout)?;
        let slot = &status["slots"][0];
        ensure!(
            slot["name"] == "public_outbox_slot" && slot["active"] == true,
            "status shows the streaming slot: {status}"
        );
        ensure!(slot["lag_bytes"].as_i64().is_some(), "{status}");
        let v = verdict(&rx.log(), &writer.next);
        println!(
            "{mode:?} capture: {MESSAGES} messages on {KEYS} keys, 2 relays on one slot, {KILLS} \
             SIGKILLs and a database crash: {} delivered, {} duplicates, {} lost, {} out of order; {:?}",
            v.distinct,
            v.duplicates,
            v.lost,
            v.skipped_ahead.len(),
            began.elapsed()
        );
        // A replay meets captured rows that a killed relay delivered and deleted, and skips
        // them; logical messages leave nothing to look up and go out again.
        ensure!(
            mode != outbox_postgres::EnqueueMode::CapturedRow || v.duplicates < MESSAGES / 4,
            "table capture sent {} duplicates: replays sent delivered rows again",
            v.duplicates
        );
        if let Some(first) = v.skipped_ahead.first() {
            // The arrivals of the first key that skipped ahead, to see where its order broke.
            let key = first.split(' ').next().unwrap_or_default().to_owned();
            let seq: Vec<u64> = rx
                .log()
                .got
                .iter()
                .filter(|g| g.key == key)
                .map(|g| g.n)
                .collect();
            println!("arrivals of {key}: {seq:?}");
        }
        v.check()
    };
    let result = run.await;
    relay_log_on_failure(&relays, &pg, result)
}
