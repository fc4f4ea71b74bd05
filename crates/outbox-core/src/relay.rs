//! The relay: the seed's background worker. It claims pending messages in batches, hands them to
//! a [`Sink`], acks what was delivered, schedules retries for what was not, and sleeps (woken by
//! the store, with a polling fallback) when the outbox is empty.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant as StdInstant;

use futures::FutureExt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::claim::ClaimRequest;
use crate::deliver::{Deliverer, Outcomes};
use crate::instrument::{self, PerTopic};
use crate::message::Message;
use crate::ownership::{Assignment, Ownership};
use crate::retry::RetryPolicy;
use crate::sink::{Circuit, Sink};
use crate::source::{Batch, Outcome, Source, Unsettled};
use crate::store::{Retention, Store, StoreError, Waiter};

/// How a relay behaves. `Default` gives production settings; change what you need with the
/// builder methods, e.g. `RelayConfig::default().batch_size(500).lease(Duration::from_secs(60))`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Names this relay in leases, logs and `locked_by`. The relay appends a suffix unique to
    /// the process (see [`Relay::id`]), so replicas started from one shared configuration
    /// never share an id and cannot ack or release each other's claims.
    pub relay_id: String,
    /// Messages claimed per round trip.
    pub batch_size: usize,
    /// A claim stops adding messages before their payloads pass this many bytes (it always
    /// takes one), so that a batch of big messages cannot exhaust the relay's memory. The
    /// trade-off: big messages go out in smaller batches, costing more round trips.
    pub max_batch_bytes: usize,
    /// Batches being delivered at once: the next batch is claimed while the previous one is
    /// published and acked, which hides the sink's and the database's round trips.
    pub in_flight_batches: usize,
    /// How long a claim stays with this relay before others may take it over. A delivery gets
    /// four fifths of it ([`RelayConfig::delivery_deadline`]); past that it counts as a failed
    /// attempt, so a sink slower than the lease cannot make a message go round forever.
    pub lease: Duration,
    /// The polling fallback when no wake-up arrives; an idle relay queries about once per interval.
    pub poll_interval: Duration,
    /// When a failed message is tried again, and when it goes dead.
    pub retry: RetryPolicy,
    /// What an acked message leaves behind: deleted at once, or kept for a while.
    pub retention: Retention,
    /// How often kept, delivered messages past the retention window are removed.
    pub purge_interval: Duration,
    /// Rows removed per purge statement, so that cleanup never holds long locks.
    pub purge_batch: usize,
    /// On shutdown, how long the batch in hand may take to finish before it is released.
    pub shutdown_timeout: Duration,
    /// Stop as soon as a claim finds nothing deliverable (drain mode, for scripts and benches).
    pub exit_when_idle: bool,
    /// How often the relay checks which relays are alive and rebalances the partitions it
    /// owns (on stores with ownership); also how soon it takes over from a relay that died,
    /// and how soon a relay that joins gets its share from the others. On PostgreSQL a check
    /// is one read of `pg_locks` (about 1.5 ms with a thousand partitions held).
    pub rebalance_interval: Duration,
    /// How often the relay counts an attempt for deliveries that never finished (a relay that
    /// died while holding a claim).
    pub recover_interval: Duration,
}

impl RelayConfig {
    /// Sets [`RelayConfig::relay_id`].
    pub fn relay_id(mut self, relay_id: impl Into<String>) -> Self {
        self.relay_id = relay_id.into();
        self
    }

    /// Sets [`RelayConfig::batch_size`].
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Sets [`RelayConfig::max_batch_bytes`].
    pub fn max_batch_bytes(mut self, max_batch_bytes: usize) -> Self {
        self.max_batch_bytes = max_batch_bytes;
        self
    }

    /// Sets [`RelayConfig::in_flight_batches`].
    pub fn in_flight_batches(mut self, in_flight_batches: usize) -> Self {
        self.in_flight_batches = in_flight_batches;
        self
    }

    /// Sets [`RelayConfig::lease`].
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets [`RelayConfig::poll_interval`].
    pub fn poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }

    /// Sets [`RelayConfig::retry`].
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets [`RelayConfig::retention`].
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Sets [`RelayConfig::purge_interval`].
    pub fn purge_interval(mut self, purge_interval: Duration) -> Self {
        self.purge_interval = purge_interval;
        self
    }

    /// Sets [`RelayConfig::purge_batch`].
    pub fn purge_batch(mut self, purge_batch: usize) -> Self {
        self.purge_batch = purge_batch;
        self
    }

    /// Sets [`RelayConfig::shutdown_timeout`].
    pub fn shutdown_timeout(mut self, shutdown_timeout: Duration) -> Self {
        self.shutdown_timeout = shutdown_timeout;
        self
    }

    /// Sets [`RelayConfig::exit_when_idle`].
    pub fn exit_when_idle(mut self, exit_when_idle: bool) -> Self {
        self.exit_when_idle = exit_when_idle;
        self
    }

    /// Sets [`RelayConfig::rebalance_interval`].
    pub fn rebalance_interval(mut self, rebalance_interval: Duration) -> Self {
        self.rebalance_interval = rebalance_interval;
        self
    }

    /// Sets [`RelayConfig::recover_interval`].
    pub fn recover_interval(mut self, recover_interval: Duration) -> Self {
        self.recover_interval = recover_interval;
        self
    }

    /// How long one batch may take in the sink before its unfinished messages count a failed
    /// attempt: four fifths of the lease, leaving the rest to record the outcome.
    pub fn delivery_deadline(&self) -> Duration {
        self.lease.saturating_sub(self.lease / 5)
    }

    /// How long the relay's loop may go without progress before it counts as wedged
    /// ([`RelayMonitor::is_live`]): the longest a healthy loop waits between two steps is a
    /// batch in the sink (under the lease), an idle poll, or the longest backoff while the
    /// database is down.
    pub fn stall_timeout(&self) -> Duration {
        self.lease + self.poll_interval + Health::MAX_BACKOFF
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            relay_id: "relay".into(),
            batch_size: 100,
            max_batch_bytes: 16 << 20,
            in_flight_batches: 2,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            retention: Retention::Delete,
            purge_interval: Duration::from_secs(60),
            purge_batch: 1000,
            shutdown_timeout: Duration::from_secs(10),
            exit_when_idle: false,
            rebalance_interval: Duration::from_millis(100),
            recover_interval: Duration::from_secs(1),
        }
    }
}

/// `name` with a suffix that differs between processes (even in containers, where every
/// relay may be pid 1) and between relays of one process.
fn unique_relay_id(name: &str) -> String {
    format!(
        "{name}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Live counters of a relay, readable while it runs ([`RelayStats::report`]); only the relay
/// counts.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub(crate) claimed: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead: AtomicU64,
    pub(crate) released: AtomicU64,
}

/// What a finished run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayReport {
    /// Messages claimed from the store.
    pub claimed: u64,
    /// Messages the sink took and the store acked.
    pub delivered: u64,
    /// Failed deliveries put back to pending, to be retried after their backoff.
    pub retried: u64,
    /// Messages that became dead letters (a permanent failure, or out of attempts).
    pub dead: u64,
    /// Claimed messages given back without counting an attempt: unfinished at the shutdown
    /// timeout, or held back behind an earlier failure of their key.
    pub released: u64,
}

impl RelayStats {
    /// The counts so far.
    pub fn report(&self) -> RelayReport {
        RelayReport {
            claimed: self.claimed.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead: self.dead.load(Ordering::Relaxed),
            released: self.released.load(Ordering::Relaxed),
        }
    }
}

/// What a relay is doing, observable through [`Relay::state`] (health checks, tests) and the
/// `outbox_relay_state` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayState {
    /// Created, or run but not yet claiming (recovering what a dead relay left unfinished).
    Starting,
    /// Claiming and delivering.
    Working,
    /// Asleep until a wake-up or the next poll.
    Idle,
    /// The database does not answer; backing off.
    DatabaseDown,
    /// Shut down: the loop returned and holds no claims.
    Stopped,
}

impl RelayState {
    /// The state as metrics and health checks name it: `working`, `database_down`, ….
    pub fn as_str(self) -> &'static str {
        match self {
            RelayState::Starting => "starting",
            RelayState::Working => "working",
            RelayState::Idle => "idle",
            RelayState::DatabaseDown => "database_down",
            RelayState::Stopped => "stopped",
        }
    }
}

/// A view of a running relay for health checks: its state, whether its loop still makes
/// progress, and its sink's circuits. Cheap to clone; taken with [`Relay::monitor`] before
/// the relay is run.
#[derive(Clone)]
pub struct RelayMonitor {
    shared: Arc<Shared>,
}

impl RelayMonitor {
    /// The relay's id (see [`Relay::id`]).
    pub fn id(&self) -> &str {
        &self.shared.config.relay_id
    }

    /// What the relay is doing now.
    pub fn state(&self) -> RelayState {
        *self.shared.state.borrow()
    }

    /// Time since the relay's loop last made progress (claimed, slept its poll, settled a
    /// batch, or retried a database that is down).
    pub fn since_progress(&self) -> Duration {
        let at = Duration::from_millis(self.shared.heartbeat.load(Ordering::Relaxed));
        self.shared.born.elapsed().saturating_sub(at)
    }

    /// Whether the relay runs and its loop made progress within
    /// [`RelayConfig::stall_timeout`]. A relay whose database is down is live: it is waiting,
    /// not wedged; so is one not started yet (its process may be waiting for the database
    /// to migrate it).
    pub fn is_live(&self) -> bool {
        match self.state() {
            RelayState::Stopped => false,
            RelayState::Starting => true,
            _ => self.since_progress() <= self.shared.config.stall_timeout(),
        }
    }

    /// The circuit breakers of the relay's sink.
    pub fn circuits(&self) -> Vec<Circuit> {
        self.shared.sink.circuits()
    }

    /// The name of the relay's sink, as the metrics label it.
    pub fn sink(&self) -> &str {
        self.shared.sink.name()
    }

    /// The relay's counts so far, as [`RelayStats::report`] gives them.
    pub fn report(&self) -> RelayReport {
        self.shared.stats.report()
    }
}

/// How often a relay reports its state to the store, for operators' list of live relays.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Delivers an outbox to a sink. See the crate docs for the guarantees.
pub struct Relay {
    shared: Arc<Shared>,
}

/// What the main loop and the delivery tasks share.
struct Shared {
    store: Arc<dyn Store>,
    /// How batches go to the sink.
    deliverer: Deliverer,
    /// Where batches come from: the store's own source unless the relay was given another.
    source: Arc<dyn Source>,
    sink: Arc<dyn Sink>,
    config: RelayConfig,
    stats: Arc<RelayStats>,
    state: watch::Sender<RelayState>,
    /// Milliseconds after `born` at which the loop last made progress (for liveness).
    heartbeat: AtomicU64,
    born: StdInstant,
    health: Mutex<Health>,
    /// Set once shutdown was requested.
    stop: watch::Sender<bool>,
    /// Keys and partitions with messages in delivery at this relay.
    in_flight: Mutex<InFlight>,
}

/// What this relay is delivering: a key in here gets nothing more claimed, and a partition in
/// here is not given up, until its batch is settled.
#[derive(Debug, Default)]
struct InFlight {
    keys: HashSet<String>,
    partitions: HashMap<i32, usize>,
}

impl InFlight {
    fn add(&mut self, batch: &[Message]) {
        for m in batch {
            if let Some(k) = &m.key {
                self.keys.insert(k.clone());
                *self.partitions.entry(m.partition).or_default() += 1;
            }
        }
    }

    fn release_keys(&mut self, batch: &[(Option<String>, i32)]) {
        for (key, _) in batch {
            if let Some(k) = key {
                self.keys.remove(k);
            }
        }
    }

    fn release_partitions(&mut self, batch: &[(Option<String>, i32)]) {
        for (key, partition) in batch {
            if key.is_none() {
                continue;
            }
            if let Some(n) = self.partitions.get_mut(partition) {
                *n -= 1;
                if *n == 0 {
                    self.partitions.remove(partition);
                }
            }
        }
    }
}

type Shutdown<'a> = Pin<&'a mut (dyn Future<Output = ()> + Send)>;

impl Relay {
    /// A relay with the default [`RelayConfig`].
    pub fn new(store: Arc<dyn Store>, sink: Arc<dyn Sink>) -> Self {
        Self::with_config(store, sink, RelayConfig::default())
    }

    /// A relay delivering from `store` to `sink`. The configured `relay_id` gets a suffix unique to
    /// this process and relay (see [`Relay::id`]), so several relays started with one name never
    /// share claims.
    pub fn with_config(store: Arc<dyn Store>, sink: Arc<dyn Sink>, config: RelayConfig) -> Self {
        let source = store.clone().source();
        Self::with_source(store, source, sink, config)
    }

    /// A relay delivering batches from `source` (see [`crate::source`]) to `sink`, with
    /// `store` for everything else: wake-ups, ownership, recovery, heartbeats, purges. For
    /// instance a PostgreSQL store's [`crate::Leased`] source instead of its held one.
    pub fn with_source(
        store: Arc<dyn Store>,
        source: Arc<dyn Source>,
        sink: Arc<dyn Sink>,
        config: RelayConfig,
    ) -> Self {
        let config = RelayConfig {
            relay_id: unique_relay_id(&config.relay_id),
            ..config
        };
        Self {
            shared: Arc::new(Shared {
                store,
                deliverer: Deliverer::new(
                    sink.clone(),
                    config.retry.clone(),
                    config.delivery_deadline(),
                ),
                source,
                sink,
                config,
                stats: Arc::default(),
                state: watch::Sender::new(RelayState::Starting),
                heartbeat: AtomicU64::new(0),
                born: StdInstant::now(),
                health: Mutex::default(),
                stop: watch::Sender::new(false),
                in_flight: Mutex::default(),
            }),
        }
    }

    /// The configuration the relay runs with, its `relay_id` already made unique.
    pub fn config(&self) -> &RelayConfig {
        &self.shared.config
    }

    /// The id this relay claims under: the configured `relay_id` and a per-process suffix.
    pub fn id(&self) -> &str {
        &self.shared.config.relay_id
    }

    /// Live counters, shared with the running relay, readable from other tasks.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.shared.stats.clone()
    }

    /// Follows the relay's state while it runs.
    pub fn state(&self) -> watch::Receiver<RelayState> {
        self.shared.state.subscribe()
    }

    /// A handle for health checks that outlives [`Relay::run`]'s taking of the relay.
    pub fn monitor(&self) -> RelayMonitor {
        RelayMonitor {
            shared: self.shared.clone(),
        }
    }

    /// Runs until `shutdown` completes (or, in drain mode, until the outbox is empty). Batches
    /// in hand when `shutdown` fires are finished and acked within the shutdown timeout, else
    /// released; nothing is lost either way.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> RelayReport {
        let shared = self.shared;
        let mut shutdown = pin!(shutdown);
        info!(relay = %shared.config.relay_id, sink = shared.sink.name(), "relay started");
        instrument::state(RelayState::Starting);
        let mut main = MainLoop {
            shared: shared.clone(),
            shutdown: shutdown.as_mut(),
            tasks: JoinSet::new(),
            pipeline: Pipeline::default(),
            ownership: None,
            assignment: Assignment::all(),
            next_rebalance: Instant::now(),
            ownership_lost: false,
        };
        // Deliveries that a dead relay left unfinished count their attempt before anything is
        // claimed, so a message that kills its relay cannot go round forever.
        recover(&shared).await;
        let _recovering = AbortOnDrop(tokio::spawn(recover_periodically(shared.clone())));
        let _heartbeat = AbortOnDrop(tokio::spawn(heartbeat_periodically(shared.clone())));
        main.run().await;
        main.finish().await;
        shared.set_state(RelayState::Stopped);
        // Stores ignore a heartbeat after `stopped`, so a late one of the task cannot revive it.
        drop(_heartbeat);
        heartbeat(&shared).await;
        let report = shared.stats.report();
        info!(relay = %shared.config.relay_id, delivered = report.delivered, dead = report.dead, "relay stopped");
        report
    }
}

impl Shared {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Records a step of the loop: the new state (metrics only on a change) and the progress.
    fn set_state(&self, now: RelayState) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.heartbeat.store(ms, Ordering::Relaxed);
        let changed = self.state.send_if_modified(|s| {
            let changed = *s != now;
            *s = now;
            changed
        });
        if changed {
            instrument::state(now);
        }
    }

    fn down(&self, e: &StoreError) -> Duration {
        self.set_state(RelayState::DatabaseDown);
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .down(e)
    }

    fn up(&self) {
        self.set_state(RelayState::Working);
        self.health.lock().unwrap_or_else(|p| p.into_inner()).up();
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Claims batches and hands each to a delivery task; sleeps when there is nothing to claim.
struct MainLoop<'a> {
    shared: Arc<Shared>,
    shutdown: Shutdown<'a>,
    tasks: JoinSet<()>,
    pipeline: Pipeline,
    /// This relay's membership, on stores with partition ownership.
    ownership: Option<Box<dyn Ownership>>,
    /// What it may claim, as of the last rebalance.
    assignment: Assignment,
    next_rebalance: Instant,
    /// The last rebalance failed (logged once until one succeeds).
    ownership_lost: bool,
}

/// Whether claiming ahead, while batches are in delivery, is worth it. When every key at the
/// head of the backlog is in flight (a few busy keys), such a claim finds nothing and only
/// costs the database; after each empty one the relay claims only between batches for twice
/// as many batches as before (up to 64), and resumes claiming ahead at the first success.
#[derive(Debug, Default)]
struct Pipeline {
    /// Full claims left before the next claim ahead.
    skip: u32,
    /// The pause after the last empty claim ahead.
    backoff: u32,
}

impl Pipeline {
    const MAX_BACKOFF: u32 = 64;

    fn paused(&self) -> bool {
        self.skip > 0
    }

    fn record(&mut self, found: bool) {
        if found {
            self.backoff = 0;
        } else {
            self.backoff = (self.backoff * 2).clamp(1, Self::MAX_BACKOFF);
            self.skip = self.backoff;
        }
    }

    fn full_claim(&mut self) {
        self.skip = self.skip.saturating_sub(1);
    }
}

impl MainLoop<'_> {
    /// How often a relay rebalances while partitions are being handed over to or from it.
    const HANDOVER_INTERVAL: Duration = Duration::from_millis(20);

    fn config(&self) -> &RelayConfig {
        &self.shared.config
    }

    /// True once shutdown was requested; polls the signal without waiting.
    fn stop_requested(&mut self) -> bool {
        if !self.shared.stopping() && self.shutdown.as_mut().now_or_never().is_some() {
            self.shared.stop.send_replace(true);
        }
        self.shared.stopping()
    }

    /// Sleeps, or returns early (true) when shutdown is requested.
    async fn sleep_or_stop(&mut self, d: Duration) -> bool {
        if self.shared.stopping() {
            return true;
        }
        tokio::select! {
            _ = self.shutdown.as_mut() => { self.shared.stop.send_replace(true); true }
            _ = tokio::time::sleep(d) => false,
        }
    }

    /// Waits for one delivery task to end, or for shutdown.
    async fn wait_for_a_task(&mut self) {
        tokio::select! {
            Some(done) = self.tasks.join_next() => report_panic(done),
            _ = self.shutdown.as_mut(), if !self.shared.stopping() => {
                self.shared.stop.send_replace(true);
            }
        }
    }

    async fn run(&mut self) {
        let Some(mut waiter) = self.connect_waiter().await else {
            return;
        };
        if !self.join_owners().await {
            return;
        }
        let mut next_purge = Instant::now();
        while !self.stop_requested() {
            let more = !self.tasks.is_empty();
            if self.tasks.len() >= self.config().in_flight_batches.max(1)
                || (more && self.pipeline.paused())
            {
                self.wait_for_a_task().await;
                continue;
            }
            self.purge_if_due(&mut next_purge).await;
            self.rebalance_if_due().await;
            let started = Instant::now();
            let claimed = claim(&self.shared, more, &self.assignment).await;
            instrument::claim_took(started.elapsed());
            if more {
                self.pipeline.record(matches!(claimed, Ok(Some(_))));
            } else {
                self.pipeline.full_claim();
            }
            match claimed {
                Err(e) => {
                    let pause = self.shared.down(&e);
                    self.sleep_or_stop(pause).await;
                }
                Ok(None) => {
                    self.shared.up();
                    // Batches still in delivery may free later messages of their keys.
                    if !self.tasks.is_empty() {
                        self.wait_for_a_task().await;
                    } else if self.config().exit_when_idle {
                        if self.drained().await {
                            return;
                        }
                    } else if self.idle(waiter.as_mut()).await {
                        return;
                    }
                }
                Ok(Some(batch)) => {
                    self.shared.up();
                    let n = batch.messages().len() as u64;
                    self.shared.stats.claimed.fetch_add(n, Ordering::Relaxed);
                    self.shared.in_flight().add(batch.messages());
                    self.tasks.spawn(deliver(self.shared.clone(), batch));
                    if let Err(e) = waiter.busy().await {
                        debug!(error = %e, "could not withdraw wake-up registration");
                    }
                }
            }
        }
    }

    /// Joins the relays sharing the outbox, on stores with ownership; false on shutdown.
    async fn join_owners(&mut self) -> bool {
        loop {
            match self.shared.store.ownership(&self.config().relay_id).await {
                Ok(None) => return true,
                Ok(Some(o)) => {
                    self.ownership = Some(o);
                    self.assignment = Assignment::none();
                    return true;
                }
                Err(e) => {
                    let pause = self.shared.down(&e);
                    if self.sleep_or_stop(pause).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Takes the partitions of this relay's share that are free, and gives up those outside
    /// it that have nothing in flight here.
    async fn rebalance_if_due(&mut self) {
        let Some(ownership) = self.ownership.as_mut() else {
            return;
        };
        if Instant::now() < self.next_rebalance {
            return;
        }
        let busy: HashSet<i32> = self.shared.in_flight().partitions.keys().copied().collect();
        self.assignment = match ownership.rebalance(&|p| busy.contains(&p)).await {
            Ok(a) => {
                if std::mem::take(&mut self.ownership_lost) {
                    info!("partition ownership back");
                }
                a
            }
            Err(e) => {
                // Once per loss, not once per failed rebalance while the database is away.
                if !std::mem::replace(&mut self.ownership_lost, true) {
                    warn!(error = %e, "lost partition ownership; claiming unkeyed messages only until it is back");
                }
                Assignment::none()
            }
        };
        let interval = self.shared.config.rebalance_interval;
        let next = if self.assignment.settled {
            interval
        } else {
            interval.min(Self::HANDOVER_INTERVAL)
        };
        self.next_rebalance = Instant::now() + next;
    }

    /// Drain mode, after a claim found nothing and nothing is in flight: true when the outbox
    /// holds nothing for this relay, i.e. every partition has a live owner (another relay
    /// drains its own). Otherwise it waits for the next rebalance.
    async fn drained(&mut self) -> bool {
        if self.ownership.is_none() || self.assignment.complete {
            return true;
        }
        let wait = self
            .next_rebalance
            .saturating_duration_since(Instant::now());
        self.sleep_or_stop(wait).await
    }

    /// Lets every delivery task finish (each bounded by the shutdown timeout).
    async fn finish(&mut self) {
        self.shared.stop.send_replace(true);
        while let Some(done) = self.tasks.join_next().await {
            report_panic(done);
        }
    }

    async fn connect_waiter(&mut self) -> Option<Box<dyn Waiter>> {
        loop {
            match self.shared.store.waiter(&self.config().relay_id).await {
                Ok(w) => {
                    self.shared.up();
                    return Some(w);
                }
                Err(e) => {
                    let pause = self.shared.down(&e);
                    if self.sleep_or_stop(pause).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Waits for work; true when shutdown was requested meanwhile.
    async fn idle(&mut self, waiter: &mut dyn Waiter) -> bool {
        match waiter.prepare().await {
            Ok(true) => return false,
            Ok(false) => {}
            Err(e) => {
                let pause = self.shared.down(&e);
                return self.sleep_or_stop(pause).await;
            }
        }
        self.shared.set_state(RelayState::Idle);
        let poll = self.idle_for();
        let woke = tokio::select! {
            _ = self.shutdown.as_mut() => { self.shared.stop.send_replace(true); return true; }
            r = waiter.idle(poll) => r,
        };
        if let Err(e) = woke {
            let pause = self.shared.down(&e);
            return self.sleep_or_stop(pause).await;
        }
        false
    }

    /// The poll interval, or less while partitions are being handed over to this relay: a
    /// backlog that was already there sends no wake-up, and a relay that joins while others
    /// drain would otherwise sit out a whole poll interval before claiming its share.
    fn idle_for(&self) -> Duration {
        let poll = self.config().poll_interval;
        if self.ownership.is_none() || self.assignment.settled {
            return poll;
        }
        let rebalance = self
            .next_rebalance
            .saturating_duration_since(Instant::now());
        poll.min(rebalance)
    }

    async fn purge_if_due(&mut self, next: &mut Instant) {
        let Retention::Keep(window) = self.config().retention else {
            return;
        };
        if Instant::now() < *next {
            return;
        }
        *next = Instant::now() + self.config().purge_interval;
        let limit = self.config().purge_batch.max(1);
        loop {
            match self.shared.store.purge_delivered(window, limit).await {
                Ok(n) if (n as usize) < limit => return,
                Ok(_) if self.stop_requested() => return,
                Ok(_) => tokio::task::yield_now().await,
                Err(e) => {
                    self.shared.down(&e);
                    return;
                }
            }
        }
    }
}

/// A sink that panics loses nothing: its messages stay in flight until their lease expires.
fn report_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        warn!(error = %e, "a delivery task failed; its messages will be delivered again after their lease");
    }
}

/// Claims the next batch from the relay's source. With batches still in delivery the store
/// may look at the head of the backlog only.
async fn claim(
    shared: &Shared,
    more: bool,
    assignment: &Assignment,
) -> Result<Option<Box<dyn Batch>>, StoreError> {
    let cfg = &shared.config;
    let busy = shared.in_flight().keys.clone();
    let req = ClaimRequest {
        relay: &cfg.relay_id,
        limit: cfg.batch_size,
        lease: cfg.lease,
        ahead: more,
        partitions: assignment.claimable.as_deref(),
        busy_keys: Some(&busy),
        max_bytes: cfg.max_batch_bytes,
    };
    shared.source.claim(&req).await
}

/// Publishes one batch and records the outcome. Once shutdown is requested the publish gets
/// the shutdown timeout to finish; after that the batch is released.
async fn deliver(shared: Arc<Shared>, batch: Box<dyn Batch>) {
    let slots: Vec<(Option<String>, i32)> = batch
        .messages()
        .iter()
        .map(|m| (m.key.clone(), m.partition))
        .collect();
    let outcomes = {
        let mut stop = shared.stop.subscribe();
        let mut publish = pin!(shared.deliverer.deliver(batch.as_ref()));
        let outcomes = tokio::select! {
            o = &mut publish => Some(o),
            _ = stop.wait_for(|s| *s) => None,
        };
        match outcomes {
            Some(o) => Some(o),
            None => tokio::time::timeout(shared.config.shutdown_timeout, publish)
                .await
                .ok(),
        }
    };
    // The sink is done with these keys: a message of theirs claimed from now on is delivered
    // after them. Their partitions stay busy until the outcome is recorded.
    shared.in_flight().release_keys(&slots);
    match outcomes {
        Some(outcomes) => settle(&shared, batch, outcomes).await,
        None => give_back(&shared, batch).await,
    }
    shared.in_flight().release_partitions(&slots);
}

/// Records a batch's outcome and counts it. A batch whose outcome could not be recorded is
/// delivered again, so nothing of it is counted as done.
async fn settle(shared: &Shared, batch: Box<dyn Batch>, outcomes: Outcomes) {
    let judged = shared.deliverer.judge(batch.messages(), outcomes);
    let started = Instant::now();
    let recorded = record(shared, batch, &judged.outcome(shared.config.retention)).await;
    instrument::settle_took(started.elapsed());
    if !recorded {
        return;
    }
    let stats = &shared.stats;
    let count = |n: usize| n as u64;
    stats
        .delivered
        .fetch_add(count(judged.acks.len()), Ordering::Relaxed);
    stats
        .released
        .fetch_add(count(judged.left.len()), Ordering::Relaxed);
    stats.retried.fetch_add(judged.retried, Ordering::Relaxed);
    stats.dead.fetch_add(judged.dead, Ordering::Relaxed);
    let sink = shared.sink.name();
    judged.tally.delivered(sink);
    judged.tally.failed(sink);
    judged.tally.released(sink);
}

/// Records an outcome, trying again as long as the batch's source allows (a lease still holds
/// the batch) and the database may come back. While stopping it gives up after a few tries:
/// the leases then expire and the messages are delivered again, which is safe.
async fn record(shared: &Shared, mut batch: Box<dyn Batch>, outcome: &Outcome<'_>) -> bool {
    let mut stop = shared.stop.subscribe();
    for tries in 1.. {
        let Unsettled { error, retry } = match batch.settle(outcome).await {
            Ok(()) => {
                shared.up();
                return true;
            }
            Err(unsettled) => unsettled,
        };
        let pause = shared.down(&error);
        let count = outcome.acks.len() + outcome.failures.len();
        let Some(again) = retry else {
            warn!(error = %error, count, "could not record the outcome; the messages will be delivered again");
            return false;
        };
        if (shared.stopping() && tries >= 3) || tries >= 1000 {
            warn!(error = %error, count, "giving up; the leases will expire and the messages be delivered again");
            return false;
        }
        if shared.stopping() {
            tokio::time::sleep(pause.min(Duration::from_millis(200))).await;
        } else {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        }
        batch = again;
    }
    false
}

/// Shutdown came and the sink did not finish within the shutdown timeout: the batch goes back
/// without an attempt counted. If that fails, the lease expires or the session is gone, and
/// the messages are delivered again either way.
async fn give_back(shared: &Shared, batch: Box<dyn Batch>) {
    let n = batch.messages().len() as u64;
    warn!(count = n, "shutdown timeout: releasing unfinished messages");
    let topics = PerTopic::of(batch.messages());
    match batch.release().await {
        Ok(()) => {
            shared.stats.released.fetch_add(n, Ordering::Relaxed);
            topics.count(instrument::RELEASED, shared.sink.name(), &[]);
        }
        Err(e) => debug!(error = %e, "could not release the batch"),
    }
}

/// Counts the attempts of deliveries that never finished; logs what it found.
async fn recover(shared: &Shared) {
    match shared.store.recover(shared.config.retry.max_attempts).await {
        Ok(0) => {}
        Ok(n) => warn!(
            count = n,
            "counted an attempt for messages whose delivery never finished (a relay died or lost its session)"
        ),
        Err(e) => debug!(error = %e, "could not look for unfinished deliveries"),
    }
}

/// Stops a background task when the relay's future ends or is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn recover_periodically(shared: Arc<Shared>) {
    let mut stop = shared.stop.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(shared.config.recover_interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        recover(&shared).await;
    }
}

/// Reports the relay's state at once, when it changes, and every [`HEARTBEAT_INTERVAL`].
/// The state is set on every claim, so only a change of value writes early: a busy relay
/// costs the database one small write per interval.
async fn heartbeat_periodically(shared: Arc<Shared>) {
    let mut state = shared.state.subscribe();
    loop {
        let reported = *state.borrow_and_update();
        heartbeat(&shared).await;
        let now = tokio::time::Instant::now();
        let (next, earliest) = (now + HEARTBEAT_INTERVAL, now + Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => break,
                changed = state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if *state.borrow_and_update() != reported {
                        // A relay flapping between idle and working reports once a second.
                        tokio::time::sleep_until(earliest).await;
                        break;
                    }
                }
            }
        }
    }
}

/// One heartbeat. A failure only costs the operator's view (the database is down, which the
/// claim reports), so it is logged at debug level and never retried.
async fn heartbeat(shared: &Shared) {
    let state = *shared.state.borrow();
    if let Err(e) = shared
        .store
        .heartbeat(&shared.config.relay_id, state.as_str())
        .await
    {
        debug!(error = %e, "heartbeat not recorded");
    }
}

/// Database health as the relay sees it: logs once per change of state, not once per failure,
/// and computes the backoff while the database is unavailable.
#[derive(Debug, Default)]
struct Health {
    failures: u32,
}

impl Health {
    const MAX_BACKOFF: Duration = Duration::from_secs(15);

    fn down(&mut self, e: &StoreError) -> Duration {
        if self.failures == 0 {
            warn!(error = %e, "database unavailable; backing off until it answers again");
        }
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.min(8) - 1;
        (Duration::from_millis(100) * (1 << exp)).min(Self::MAX_BACKOFF)
    }

    fn up(&mut self) {
        if self.failures > 0 {
            info!(failures = self.failures, "database available again");
            self.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Pipeline, RelayConfig, Retention, RetryPolicy};

    #[test]
    fn builder_methods_set_what_they_name_and_leave_the_rest() {
        let base = RelayConfig::default();
        let config = RelayConfig::default()
            .batch_size(7)
            .lease(Duration::from_secs(3))
            .relay_id("billing")
            .retention(Retention::Keep(Duration::from_secs(60)))
            .retry(RetryPolicy::default().max_attempts(2));
        assert_eq!(config.batch_size, 7);
        assert_eq!(config.lease, Duration::from_secs(3));
        assert_eq!(config.relay_id, "billing");
        assert_eq!(config.retention, Retention::Keep(Duration::from_secs(60)));
        assert_eq!(config.retry.max_attempts, 2);
        assert_eq!(config.max_batch_bytes, base.max_batch_bytes);
        assert_eq!(config.in_flight_batches, base.in_flight_batches);
        assert_eq!(config.poll_interval, base.poll_interval);
        assert_eq!(config.purge_interval, base.purge_interval);
        assert_eq!(config.purge_batch, base.purge_batch);
        assert_eq!(config.shutdown_timeout, base.shutdown_timeout);
        assert_eq!(config.exit_when_idle, base.exit_when_idle);
        assert_eq!(config.rebalance_interval, base.rebalance_interval);
        assert_eq!(config.recover_interval, base.recover_interval);
        // The deadline follows the lease it was derived from.
        assert_eq!(config.delivery_deadline(), Duration::from_millis(2400));
    }

    #[test]
    fn empty_claims_ahead_pause_pipelining_for_longer_each_time() {
        let mut p = Pipeline::default();
        assert!(!p.paused());
        let mut pauses = Vec::new();
        for _ in 0..8 {
            p.record(false);
            let mut n = 0;
            while p.paused() {
                p.full_claim();
                n += 1;
            }
            pauses.push(n);
        }
        assert_eq!(pauses, [1, 2, 4, 8, 16, 32, 64, 64]);
        // One claim ahead that finds work resumes pipelining at once, and resets the pause.
        p.record(true);
        assert!(!p.paused());
        p.record(false);
        assert!(p.paused());
        p.full_claim();
        assert!(!p.paused());
    }
}
