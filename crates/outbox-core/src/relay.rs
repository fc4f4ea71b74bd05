//! The relay: the seed's background worker. It claims pending messages in batches, hands them to
//! a [`Sink`], acks what was delivered, schedules retries for what was not, and sleeps (woken by
//! the store, with a polling fallback) when the outbox is empty.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::message::Message;
use crate::retry::RetryPolicy;
use crate::sink::{Delivery, Sink, SinkError};
use crate::store::{Failure, Retention, Store, StoreError, Waiter};

/// How a relay behaves. `Default` gives production settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Names this relay's leases; unique per running relay.
    pub relay_id: String,
    /// Messages claimed per round trip.
    pub batch_size: usize,
    /// How long a claim stays with this relay before others may take it over.
    pub lease: Duration,
    /// The polling fallback when no wake-up arrives; an idle relay queries about once per interval.
    pub poll_interval: Duration,
    pub retry: RetryPolicy,
    pub retention: Retention,
    /// How often kept, delivered messages past the retention window are removed.
    pub purge_interval: Duration,
    /// Rows removed per purge statement, so that cleanup never holds long locks.
    pub purge_batch: usize,
    /// On shutdown, how long the batch in hand may take to finish before it is released.
    pub shutdown_timeout: Duration,
    /// Stop as soon as a claim finds nothing deliverable (drain mode, for scripts and benches).
    pub exit_when_idle: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            relay_id: default_relay_id(),
            batch_size: 100,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            retention: Retention::Delete,
            purge_interval: Duration::from_secs(60),
            purge_batch: 1000,
            shutdown_timeout: Duration::from_secs(10),
            exit_when_idle: false,
        }
    }
}

/// A relay id that differs between processes and between relays of one process.
pub fn default_relay_id() -> String {
    format!("relay-{}-{:04x}", std::process::id(), rand::random::<u16>())
}

/// Live counters of a relay, readable while it runs.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub claimed: AtomicU64,
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    pub released: AtomicU64,
}

/// What a finished run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayReport {
    pub claimed: u64,
    pub delivered: u64,
    pub retried: u64,
    pub dead: u64,
    pub released: u64,
}

impl RelayStats {
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

/// What a relay is doing, observable through [`Relay::state`] (health checks, tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayState {
    Starting,
    /// Claiming and delivering.
    Working,
    /// Asleep until a wake-up or the next poll.
    Idle,
    /// The database does not answer; backing off.
    DatabaseDown,
    Stopped,
}

/// Delivers an outbox to a sink. See the crate docs for the guarantees.
pub struct Relay {
    store: Arc<dyn Store>,
    sink: Arc<dyn Sink>,
    config: RelayConfig,
    stats: Arc<RelayStats>,
    state: tokio::sync::watch::Sender<RelayState>,
}

type Shutdown<'a> = Pin<&'a mut (dyn Future<Output = ()> + Send)>;

impl Relay {
    pub fn new(store: Arc<dyn Store>, sink: Arc<dyn Sink>) -> Self {
        Self::with_config(store, sink, RelayConfig::default())
    }

    pub fn with_config(store: Arc<dyn Store>, sink: Arc<dyn Sink>, config: RelayConfig) -> Self {
        Self {
            store,
            sink,
            config,
            stats: Arc::default(),
            state: tokio::sync::watch::Sender::new(RelayState::Starting),
        }
    }

    /// Follows the relay's state while it runs.
    pub fn state(&self) -> tokio::sync::watch::Receiver<RelayState> {
        self.state.subscribe()
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` completes (or, in drain mode, until the outbox is empty). The batch
    /// in hand when `shutdown` fires is finished and acked within the shutdown timeout, else
    /// released; nothing is lost either way.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> RelayReport {
        let mut shutdown = pin!(shutdown);
        let mut run = Run {
            relay: &self,
            shutdown: shutdown.as_mut(),
            stopping: false,
            health: Health::default(),
        };
        info!(relay = %self.config.relay_id, sink = self.sink.name(), "relay started");
        run.main_loop().await;
        self.state.send_replace(RelayState::Stopped);
        let report = self.stats.report();
        info!(relay = %self.config.relay_id, delivered = report.delivered, dead = report.dead, "relay stopped");
        report
    }
}

/// The state of one `run`.
struct Run<'a> {
    relay: &'a Relay,
    shutdown: Shutdown<'a>,
    stopping: bool,
    health: Health,
}

impl Run<'_> {
    fn config(&self) -> &RelayConfig {
        &self.relay.config
    }

    fn down(&mut self, e: &StoreError) -> Duration {
        self.relay.state.send_replace(RelayState::DatabaseDown);
        self.health.down(e)
    }

    fn up(&mut self) {
        self.relay.state.send_replace(RelayState::Working);
        self.health.up();
    }

    /// True once shutdown was requested; polls the signal without waiting.
    fn should_stop(&mut self) -> bool {
        if !self.stopping && self.shutdown.as_mut().now_or_never().is_some() {
            self.stopping = true;
        }
        self.stopping
    }

    /// Sleeps, or returns early (true) when shutdown is requested.
    async fn sleep_or_stop(&mut self, d: Duration) -> bool {
        if self.stopping {
            return true;
        }
        tokio::select! {
            _ = self.shutdown.as_mut() => { self.stopping = true; true }
            _ = tokio::time::sleep(d) => false,
        }
    }

    async fn main_loop(&mut self) {
        let Some(mut waiter) = self.connect_waiter().await else {
            return;
        };
        let mut next_purge = Instant::now();
        while !self.should_stop() {
            self.purge_if_due(&mut next_purge).await;
            let cfg = self.config();
            let claimed = self
                .relay
                .store
                .claim(&cfg.relay_id, cfg.batch_size, cfg.lease)
                .await;
            match claimed {
                Err(e) => {
                    let pause = self.down(&e);
                    self.sleep_or_stop(pause).await;
                }
                Ok(batch) if batch.is_empty() => {
                    self.up();
                    if self.config().exit_when_idle || self.idle(waiter.as_mut()).await {
                        return;
                    }
                }
                Ok(batch) => {
                    self.up();
                    if let Err(e) = waiter.busy().await {
                        debug!(error = %e, "could not withdraw wake-up registration");
                    }
                    self.deliver(batch).await;
                }
            }
        }
    }

    async fn connect_waiter(&mut self) -> Option<Box<dyn Waiter>> {
        loop {
            match self.relay.store.waiter(&self.config().relay_id).await {
                Ok(w) => {
                    self.up();
                    return Some(w);
                }
                Err(e) => {
                    let pause = self.down(&e);
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
                let pause = self.down(&e);
                return self.sleep_or_stop(pause).await;
            }
        }
        self.relay.state.send_replace(RelayState::Idle);
        let poll = self.config().poll_interval;
        let woke = tokio::select! {
            _ = self.shutdown.as_mut() => { self.stopping = true; return true; }
            r = waiter.idle(poll) => r,
        };
        if let Err(e) = woke {
            let pause = self.down(&e);
            return self.sleep_or_stop(pause).await;
        }
        false
    }

    async fn deliver(&mut self, batch: Vec<Message>) {
        let stats = &self.relay.stats;
        stats
            .claimed
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let sink = self.relay.sink.clone();
        let mut publish = pin!(sink.publish(&batch));
        let outcomes = if self.stopping {
            None
        } else {
            tokio::select! {
                o = &mut publish => Some(o),
                _ = self.shutdown.as_mut() => { self.stopping = true; None }
            }
        };
        let outcomes = match outcomes {
            Some(o) => o,
            None => match tokio::time::timeout(self.config().shutdown_timeout, publish).await {
                Ok(o) => o,
                Err(_) => return self.release(&batch).await,
            },
        };
        self.settle(&batch, outcomes).await;
    }

    /// Acks delivered messages and records failures; retries store errors with backoff.
    async fn settle(&mut self, batch: &[Message], outcomes: Vec<Delivery>) {
        let (acks, failures) = self.classify(batch, outcomes);
        let retention = self.config().retention;
        if !acks.is_empty() {
            let store = self.relay.store.clone();
            if self
                .persist("ack", || store.ack(&acks, retention).map(|r| r.map(drop)))
                .await
            {
                self.relay
                    .stats
                    .delivered
                    .fetch_add(acks.len() as u64, Ordering::Relaxed);
            }
        }
        if !failures.is_empty() {
            let store = self.relay.store.clone();
            let relay_id = self.config().relay_id.clone();
            self.persist("fail", || store.fail(&relay_id, &failures))
                .await;
        }
    }

    fn classify(&self, batch: &[Message], outcomes: Vec<Delivery>) -> (Vec<Uuid>, Vec<Failure>) {
        let stats = &self.relay.stats;
        let mut outcomes = outcomes.into_iter();
        let mut acks = Vec::with_capacity(batch.len());
        let mut failures = Vec::new();
        for msg in batch {
            let outcome = outcomes
                .next()
                .unwrap_or_else(|| Err(SinkError::transient("sink returned no outcome")));
            match outcome {
                Ok(()) => acks.push(msg.id),
                Err(err) => {
                    let retry_in = self.config().retry.decide(msg.attempts, &err);
                    if retry_in.is_some() {
                        stats.retried.fetch_add(1, Ordering::Relaxed);
                        debug!(id = %msg.id, attempt = msg.attempts, error = %err, "delivery failed; will retry");
                    } else {
                        stats.dead.fetch_add(1, Ordering::Relaxed);
                        warn!(id = %msg.id, topic = %msg.topic, attempt = msg.attempts, error = %err, "message is dead");
                    }
                    failures.push(Failure {
                        id: msg.id,
                        error: err.to_string(),
                        retry_in,
                    });
                }
            }
        }
        (acks, failures)
    }

    /// Runs a store write until it succeeds. While stopping it gives up after a few tries: the
    /// leases then expire and the messages are delivered again, which is safe.
    async fn persist<F, Fut>(&mut self, what: &str, op: F) -> bool
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), StoreError>>,
    {
        let mut tries = 0;
        loop {
            match op().await {
                Ok(()) => {
                    self.up();
                    return true;
                }
                Err(e) => {
                    tries += 1;
                    let pause = self.down(&e);
                    if (self.stopping && tries >= 3) || tries >= 1000 {
                        warn!(op = what, error = %e, "giving up; the leases will expire and the messages be delivered again");
                        return false;
                    }
                    if self.stopping {
                        tokio::time::sleep(pause.min(Duration::from_millis(200))).await;
                    } else {
                        self.sleep_or_stop(pause).await;
                    }
                }
            }
        }
    }

    async fn release(&mut self, batch: &[Message]) {
        let ids: Vec<Uuid> = batch.iter().map(|m| m.id).collect();
        warn!(
            count = ids.len(),
            "shutdown timeout: releasing unfinished messages"
        );
        let store = self.relay.store.clone();
        let relay_id = self.config().relay_id.clone();
        if self
            .persist("release", || store.release(&relay_id, &ids))
            .await
        {
            self.relay
                .stats
                .released
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
        }
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
            match self.relay.store.purge_delivered(window, limit).await {
                Ok(n) if (n as usize) < limit => return,
                Ok(_) if self.should_stop() => return,
                Ok(_) => tokio::task::yield_now().await,
                Err(e) => {
                    self.down(&e);
                    return;
                }
            }
        }
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
