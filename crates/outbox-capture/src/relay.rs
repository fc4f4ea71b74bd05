//! The relay that streams an outbox from a replication slot.

use std::collections::HashSet;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{Batch, Deliverer, Message, Relay, RelayConfig, RetryPolicy, Sink, StoreError};
use outbox_postgres::PgStore;
use outbox_postgres::capture::{Unfinished, WriteBack, decode};
use pgwire_replication::{
    FeedbackObserver, Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent,
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::CaptureError;
use crate::batch::LogBatch;
use crate::rows::Rows;

/// How a [`WalRelay`] runs. Build it with [`CaptureConfig::default`] and the builder methods.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CaptureConfig {
    /// The replication slot to stream from (default: the store's `{schema}_{prefix}slot`).
    /// Relays started with the same slot share it: one streams, the others wait as standbys.
    pub slot: Option<String>,
    /// Most messages handed to the sink at once.
    pub batch_size: usize,
    /// Backoff and attempts for messages that fail (the first attempt is the streamed one;
    /// the polling relay makes the others).
    pub retry: RetryPolicy,
    /// How long one batch may stay in the sink; what is still there then counts as a failed
    /// attempt and goes to the table, so a hung destination never stalls the slot.
    pub delivery_timeout: Duration,
    /// How often a standby tries to take the slot over.
    pub standby_retry: Duration,
    /// The polling relay that delivers what was written to the table (retries, delayed
    /// messages, keys queued behind them). Its retry policy is set to [`CaptureConfig::retry`].
    pub relay: RelayConfig,
    /// How often the slot's lag is read for the metrics and the health warning.
    pub lag_interval: Duration,
    /// WAL kept behind the slot's confirmed position, in bytes, above which the relay warns
    /// (in its log and in readiness) that the slot is falling behind.
    pub lag_warning: i64,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            slot: None,
            batch_size: 1000,
            retry: RetryPolicy::default(),
            delivery_timeout: Duration::from_secs(30),
            standby_retry: Duration::from_secs(1),
            relay: RelayConfig::default(),
            lag_interval: Duration::from_secs(5),
            lag_warning: 1 << 30,
        }
    }
}

impl CaptureConfig {
    /// Sets [`CaptureConfig::slot`].
    pub fn slot(mut self, slot: impl Into<String>) -> Self {
        self.slot = Some(slot.into());
        self
    }
    /// Sets [`CaptureConfig::batch_size`].
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }
    /// Sets [`CaptureConfig::retry`].
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
    /// Sets [`CaptureConfig::delivery_timeout`].
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }
    /// Sets [`CaptureConfig::standby_retry`].
    pub fn standby_retry(mut self, every: Duration) -> Self {
        self.standby_retry = every;
        self
    }
    /// Sets [`CaptureConfig::relay`].
    pub fn relay(mut self, relay: RelayConfig) -> Self {
        self.relay = relay;
        self
    }
    /// Sets [`CaptureConfig::lag_interval`].
    pub fn lag_interval(mut self, every: Duration) -> Self {
        self.lag_interval = every.max(Duration::from_millis(10));
        self
    }
    /// Sets [`CaptureConfig::lag_warning`].
    pub fn lag_warning(mut self, bytes: i64) -> Self {
        self.lag_warning = bytes;
        self
    }
}

/// Where a [`WalRelay`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CaptureState {
    /// Setting up, or connecting.
    Starting,
    /// Another relay streams from the slot; this one takes over when it goes.
    Standby,
    /// Streaming from the slot.
    Streaming,
    /// The connection was lost; connecting again.
    Reconnecting,
    /// Returned from [`WalRelay::run`].
    Stopped,
}

impl CaptureState {
    /// The state as logs and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureState::Starting => "starting",
            CaptureState::Standby => "standby",
            CaptureState::Streaming => "streaming",
            CaptureState::Reconnecting => "reconnecting",
            CaptureState::Stopped => "stopped",
        }
    }
}

/// Counters of a running [`WalRelay`], readable from other tasks.
#[derive(Debug)]
pub struct CaptureStats {
    streamed: AtomicU64,
    delivered: AtomicU64,
    waiting: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    replayed: AtomicU64,
    sessions: AtomicU64,
    /// The slot's lag at the last reading, in bytes; -1 before the first.
    lag: AtomicI64,
}

impl Default for CaptureStats {
    fn default() -> Self {
        Self {
            streamed: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            lag: AtomicI64::new(-1),
        }
    }
}

/// What a [`WalRelay`] did, as [`CaptureStats::report`] reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CaptureReport {
    /// Messages read from the slot (a replay counts them again).
    pub streamed: u64,
    /// Messages the sink took straight from the stream.
    pub delivered: u64,
    /// Messages written to the table unattempted: delayed, or queued behind their key.
    pub waiting: u64,
    /// Messages whose streamed attempt failed, written to the table for a retry.
    pub retried: u64,
    /// Messages that failed for good on their streamed attempt: dead letters at once.
    pub dead: u64,
    /// Captured rows a replay met that a relay before had already delivered: not sent again.
    pub replayed: u64,
    /// Times this relay took the slot (1 for a relay that streamed throughout).
    pub sessions: u64,
}

impl CaptureStats {
    /// The counts so far.
    pub fn report(&self) -> CaptureReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CaptureReport {
            streamed: get(&self.streamed),
            delivered: get(&self.delivered),
            waiting: get(&self.waiting),
            retried: get(&self.retried),
            dead: get(&self.dead),
            replayed: get(&self.replayed),
            sessions: get(&self.sessions),
        }
    }

    /// WAL the slot keeps behind its confirmed position, at the last reading (every
    /// [`CaptureConfig::lag_interval`]); `None` before the first reading.
    pub fn slot_lag_bytes(&self) -> Option<i64> {
        Some(self.lag.load(Ordering::Relaxed)).filter(|&l| l >= 0)
    }

    fn add(c: &AtomicU64, n: usize) {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a settled batch of `total` messages of which `rows` went to the table.
    pub(crate) fn count(&self, total: usize, rows: &[(&Message, WriteBack)]) {
        let of = |f: fn(&WriteBack) -> bool| rows.iter().filter(|(_, w)| f(w)).count();
        let counts = [
            (&self.delivered, "delivered", total - rows.len()),
            (
                &self.waiting,
                "waiting",
                of(|w| matches!(w, WriteBack::Waiting)),
            ),
            (
                &self.retried,
                "retried",
                of(|w| matches!(w, WriteBack::Retry { .. } | WriteBack::Interrupted { .. })),
            ),
            (
                &self.dead,
                "dead",
                of(|w| matches!(w, WriteBack::Dead { .. })),
            ),
        ];
        for (counter, outcome, n) in counts {
            Self::add(counter, n);
            metrics::counter!(CAPTURED, "outcome" => outcome).increment(n as u64);
        }
    }
}

/// Delivers an outbox from a replication slot; see the crate docs for the guarantees.
pub struct WalRelay {
    store: PgStore,
    sink: Arc<dyn Sink>,
    /// How a batch goes to the sink: as the polling relay's do.
    deliverer: Deliverer,
    slot: String,
    poller: Relay,
    target: ReplicationConfig,
    config: CaptureConfig,
    stats: Arc<CaptureStats>,
    state: watch::Sender<CaptureState>,
}

type Shutdown<'a> = Pin<&'a mut (dyn Future<Output = ()> + Send)>;

/// How a session with the slot ended.
enum SessionEnd {
    Shutdown,
    Standby,
}

/// Why a session ended early; the relay connects again.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("replication: {0}")]
    Wire(#[from] PgWireError),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("the server ended the replication stream")]
    Ended,
}

impl WalRelay {
    /// A relay streaming `store`'s outbox from the server `url` names (the URL the store
    /// connects with) to `sink`.
    pub fn new(
        url: &str,
        store: PgStore,
        sink: Arc<dyn Sink>,
        config: CaptureConfig,
    ) -> Result<Self, CaptureError> {
        let poller = Relay::with_config(
            Arc::new(store.clone()),
            sink.clone(),
            config.relay.clone().retry(config.retry.clone()),
        );
        Ok(Self {
            target: crate::target::from_url(url)?,
            slot: config.slot.clone().unwrap_or_else(|| store.default_slot()),
            deliverer: Deliverer::new(sink.clone(), config.retry.clone(), config.delivery_timeout),
            store,
            sink,
            poller,
            config,
            stats: Arc::default(),
            state: watch::Sender::new(CaptureState::Starting),
        })
    }

    /// Live counters, shared with the running relay.
    pub fn stats(&self) -> Arc<CaptureStats> {
        self.stats.clone()
    }

    /// Follows the relay's state while it runs.
    pub fn state(&self) -> watch::Receiver<CaptureState> {
        self.state.subscribe()
    }

    /// The polling relay for the table that runs alongside: its monitor and counters are what
    /// health checks, metrics and the admin API follow.
    pub fn poller(&self) -> &Relay {
        &self.poller
    }

    /// What an operator should know now (a slot falling behind, a lost stream), for
    /// readiness bodies; empty when all is well.
    pub fn warnings(&self) -> impl Fn() -> Vec<String> + Send + Sync + 'static {
        let stats = self.stats.clone();
        let state = self.state.subscribe();
        let (slot, limit) = (self.slot(), self.config.lag_warning);
        move || {
            let mut out = Vec::new();
            if let Some(lag) = stats.slot_lag_bytes().filter(|&l| l > limit) {
                out.push(lag_warning(&slot, lag));
            }
            if *state.borrow() == CaptureState::Reconnecting {
                out.push(format!(
                    "lost the replication stream of slot {slot}; connecting again"
                ));
            }
            out
        }
    }

    /// The slot this relay streams from.
    pub fn slot(&self) -> String {
        self.slot.clone()
    }

    /// Sets up the publication and slot when missing, then streams (or waits as a standby)
    /// until `shutdown` completes. The polling relay for the table runs alongside and stops
    /// with it. Fails only when capture cannot work at all (`wal_level`, rights, the URL).
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<CaptureReport, CaptureError> {
        let slot = self.slot();
        self.store
            .setup_capture(Some(&slot))
            .await
            .map_err(CaptureError::Setup)?;
        let (stop, stopped) = watch::channel(false);
        let poller = std::mem::replace(
            &mut self.poller,
            Relay::new(Arc::new(self.store.clone()), self.sink.clone()),
        );
        let until = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let polling = tokio::spawn(poller.run(until(stopped.clone())));
        let lag = tokio::spawn(watch_lag(
            self.store.clone(),
            slot.clone(),
            self.stats.clone(),
            (self.config.lag_interval, self.config.lag_warning),
            until(stopped),
        ));
        let shutdown = pin!(shutdown);
        let mut shutdown: Shutdown<'_> = shutdown;
        let result = self.stream(&slot, &mut shutdown).await;
        stop.send_replace(true);
        if let Err(e) = polling.await {
            warn!(error = %e, "the polling relay of the table failed");
        }
        let _ = lag.await;
        self.state.send_replace(CaptureState::Stopped);
        result.map(|()| self.stats.report())
    }

    async fn stream(&self, slot: &str, shutdown: &mut Shutdown<'_>) -> Result<(), CaptureError> {
        loop {
            let pause = match self.session(slot, shutdown).await {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Ok(SessionEnd::Standby) => {
                    self.state.send_replace(CaptureState::Standby);
                    self.config.standby_retry
                }
                Err(SessionError::Wire(e)) if e.is_auth() => {
                    return Err(CaptureError::Replication(e.to_string()));
                }
                Err(e) => {
                    warn!(error = %e, "lost the replication stream; connecting again");
                    self.state.send_replace(CaptureState::Reconnecting);
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = shutdown.as_mut() => return Ok(()),
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    fn session_config(&self, slot: &str) -> ReplicationConfig {
        let mut cfg = self.target.clone();
        cfg.slot = slot.to_owned();
        cfg.publication = self.store.publication().into();
        // Rows come in their types' send formats (see `rows`).
        cfg.with_binary(true)
            .with_status_interval(Duration::from_millis(200))
            .with_application_name("outbox relay --capture wal")
            // Only so that `feedback_pending_since` tells when the last position reached the
            // server (see `close`).
            .with_feedback_observer(FeedbackObserver::new(|_| {}))
    }

    async fn session(
        &self,
        slot: &str,
        shutdown: &mut Shutdown<'_>,
    ) -> Result<SessionEnd, SessionError> {
        let mut client = ReplicationClient::connect(self.session_config(slot)).await?;
        let started = tokio::select! {
            _ = shutdown.as_mut() => return Ok(SessionEnd::Shutdown),
            s = client.wait_started() => s,
        };
        match started {
            Err(PgWireError::Server(m)) if slot_in_use(&m) => return Ok(SessionEnd::Standby),
            other => other?,
        }
        if self.state.send_replace(CaptureState::Streaming) != CaptureState::Streaming {
            info!(slot, "streaming the outbox from the replication slot");
        }
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        let (schema, table) = self.store.table();
        let mut stream = Stream::new(self.store.wal_prefix(), Rows::new(&schema, &table));
        stream.unfinished = self.store.capture_unfinished(slot).await?;
        loop {
            let event = if stream.ready.is_empty() {
                tokio::select! {
                    _ = shutdown.as_mut() => {
                        if close(&mut client).await
                            && let Err(e) = self.store.capture_finished(slot).await
                        {
                            warn!(error = %e, "could not clear the record of the last batch");
                        }
                        return Ok(SessionEnd::Shutdown);
                    }
                    e = client.recv() => e,
                }
            } else {
                // More events already here join the batch; otherwise it goes now.
                match tokio::time::timeout(Duration::ZERO, client.recv()).await {
                    Ok(e) => e,
                    Err(_) => {
                        self.flush(&client, &mut stream).await?;
                        continue;
                    }
                }
            };
            let Some(event) = event? else {
                return Err(SessionError::Ended);
            };
            tracing::trace!(?event, "replication event");
            if let Some(lsn) = stream.take(event, &self.stats) {
                tracing::debug!(%lsn, "confirmed while idle");
                client.update_applied_lsn(lsn);
            }
            if stream.ready.len() >= self.config.batch_size {
                self.flush(&client, &mut stream).await?;
            }
        }
    }

    /// Settles the oldest batch of committed messages, then confirms the slot up to the last
    /// transaction the batch finished.
    async fn flush(
        &self,
        client: &ReplicationClient,
        stream: &mut Stream,
    ) -> Result<(), SessionError> {
        // Events already read stay in the client's buffer after its connection is gone, and
        // then the slot is free: another relay may be replaying the same messages from the
        // confirmed position. Delivering them here as well would put a key's messages in
        // delivery twice and out of order, so a lost stream ends the session first.
        if !client.is_running() {
            return Err(SessionError::Ended);
        }
        let n = stream.ready.len().min(self.config.batch_size);
        let batch: Vec<Captured> = stream.ready.drain(..n).collect();
        let confirm = confirm_point(&batch, stream.ready.first());
        let started = std::time::Instant::now();
        self.settle(&batch, &stream.unfinished).await?;
        tracing::debug!(messages = n, took = ?started.elapsed(), "settled a batch");
        if let Some(lsn) = confirm {
            tracing::debug!(%lsn, "confirmed a settled batch");
            client.update_applied_lsn(lsn);
        }
        Ok(())
    }

    /// Delivers what can go now, as every relay delivers a batch (a key at a time in waves,
    /// stopping a key at its first failure, within the delivery timeout), and writes the rest
    /// to the table in one statement.
    async fn settle(
        &self,
        batch: &[Captured],
        unfinished: &Unfinished,
    ) -> Result<(), SessionError> {
        let gone = self.replayed_and_gone(batch, unfinished).await?;
        let batch: Vec<&Captured> = batch
            .iter()
            .filter(|c| !gone.contains(&c.message.id))
            .collect();
        let keys: Vec<String> = batch
            .iter()
            .filter_map(|c| c.message.key.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut stopped = self.store.keys_waiting(&keys).await?;
        let now = Utc::now();
        let mut log = LogBatch::new(self.store.clone(), self.stats.clone());
        for c in &batch {
            let m = &c.message;
            let decided = if unfinished.ids.contains(&m.id) {
                Some(self.interrupted())
            } else if m.available_at > now || m.key.as_ref().is_some_and(|k| stopped.contains(k)) {
                Some(WriteBack::Waiting)
            } else {
                None
            };
            if decided.is_some() {
                stopped.extend(m.key.clone());
            }
            log.push(m, c.row, decided);
        }
        if !log.messages().is_empty() {
            let ids: Vec<uuid::Uuid> = log.messages().iter().map(|m| m.id).collect();
            let end = batch.last().map_or(0, |c| c.end.as_u64());
            self.store.capture_started(&self.slot, &ids, end).await?;
        }
        let outcomes = self.deliverer.deliver(&log).await;
        let judged = self.deliverer.judge(log.messages(), outcomes);
        Box::new(log)
            .settle(&judged.outcome(self.config.relay.retention))
            .await
            .map_err(|u| SessionError::Store(u.error))
    }

    /// Captured rows of a replay, up to where the previous relay got, that are no longer in
    /// the table as captured: delivered (or handed over) before, so not sent again. Logical
    /// messages leave nothing to look up, and are sent again.
    async fn replayed_and_gone(
        &self,
        batch: &[Captured],
        unfinished: &Unfinished,
    ) -> Result<HashSet<uuid::Uuid>, SessionError> {
        let Some(through) = unfinished.through else {
            return Ok(HashSet::new());
        };
        let replayed: Vec<uuid::Uuid> = batch
            .iter()
            .filter(|c| c.row && c.end.as_u64() <= through)
            .map(|c| c.message.id)
            .collect();
        if replayed.is_empty() {
            return Ok(HashSet::new());
        }
        let left = self.store.captured_left(&replayed).await?;
        let gone: HashSet<uuid::Uuid> = replayed
            .into_iter()
            .filter(|id| !left.contains(id))
            .collect();
        CaptureStats::add(&self.stats.replayed, gone.len());
        Ok(gone)
    }

    /// A replayed message whose streamed delivery never ended: one attempt counted.
    fn interrupted(&self) -> WriteBack {
        let error = format!(
            "delivery never finished: the relay streaming slot {} stopped (crash, kill) before \
             recording an outcome",
            self.slot
        );
        if self.config.retry.max_attempts <= 1 {
            return WriteBack::Dead { error };
        }
        let delay = self.config.retry.backoff(1);
        WriteBack::Interrupted {
            at: Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default(),
            error,
        }
    }
}

fn lag_warning(slot: &str, lag: i64) -> String {
    format!(
        "replication slot {slot} keeps {lag} bytes of WAL behind its relay's confirmed position"
    )
}

/// Reads the slot's lag every `interval` into the stats and the `outbox_capture_slot_lag_bytes`
/// gauge, and logs a warning each time it rises past `limit`.
async fn watch_lag(
    store: PgStore,
    slot: String,
    stats: Arc<CaptureStats>,
    (interval, limit): (Duration, i64),
    stop: impl Future<Output = ()>,
) {
    let mut stop = pin!(stop);
    let mut warned = false;
    loop {
        match store.slots().await {
            Ok(slots) => {
                if let Some(s) = slots.iter().find(|s| s.name == slot) {
                    stats.lag.store(s.lag_bytes, Ordering::Relaxed);
                    metrics::gauge!(SLOT_LAG, "slot" => slot.clone()).set(s.lag_bytes as f64);
                    if s.lag_bytes > limit && !std::mem::replace(&mut warned, true) {
                        warn!("{}", lag_warning(&slot, s.lag_bytes));
                    }
                    warned &= s.lag_bytes > limit;
                }
            }
            Err(e) => tracing::debug!(error = %e, "reading the slot's lag failed"),
        }
        tokio::select! {
            _ = stop.as_mut() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Gauge: WAL bytes a slot keeps behind its confirmed position.
pub const SLOT_LAG: &str = "outbox_capture_slot_lag_bytes";
/// Counter: captured messages by what became of their streamed attempt
/// (`delivered`, `waiting`, `retried`, `dead`).
pub const CAPTURED: &str = "outbox_capture_messages_total";

/// A committed message and the end of its transaction in the WAL.
struct Captured {
    message: Message,
    end: Lsn,
    /// Read from an insert into the outbox table (table capture): the row is removed once
    /// settled. Otherwise a logical message, which has no row.
    row: bool,
}

/// What the session has read and not yet settled.
struct Stream {
    prefix: String,
    /// Messages of the transaction being read, until its commit, and whether each is a row.
    open: Vec<(Message, bool)>,
    /// The outbox table's inserts (table capture).
    rows: Rows,
    in_transaction: bool,
    committed_at: DateTime<Utc>,
    /// Committed messages, in commit order.
    ready: Vec<Captured>,
    /// The batch the previous relay on the slot had in its sink when it stopped: replayed,
    /// these messages count the attempt that never ended instead of going out straight away.
    unfinished: Unfinished,
}

impl Stream {
    fn new(prefix: String, rows: Rows) -> Self {
        Self {
            prefix,
            open: Vec::new(),
            rows,
            in_transaction: false,
            committed_at: Utc::now(),
            ready: Vec::new(),
            unfinished: Unfinished::default(),
        }
    }

    /// Takes one event in; returns a position to confirm when nothing before it is unsettled.
    fn take(&mut self, event: ReplicationEvent, stats: &CaptureStats) -> Option<Lsn> {
        match event {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => {
                self.in_transaction = true;
                self.committed_at = pg_time(commit_time_micros);
                None
            }
            ReplicationEvent::Message {
                prefix,
                content,
                lsn,
                transactional,
            } if prefix == self.prefix => {
                let at = if transactional {
                    self.committed_at
                } else {
                    Utc::now()
                };
                match decode(&content, lsn.as_u64(), at) {
                    Ok(m) => {
                        stats.streamed.fetch_add(1, Ordering::Relaxed);
                        self.open.push((m, false));
                    }
                    Err(e) => warn!(error = %e, %lsn, "skipping a logical message of this outbox"),
                }
                None
            }
            ReplicationEvent::XLogData {
                data, wal_start, ..
            } => {
                match self.rows.take(data) {
                    Ok(Some(m)) => {
                        stats.streamed.fetch_add(1, Ordering::Relaxed);
                        self.open.push((m, true));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(error = %e, lsn = %wal_start, "skipping a change of the outbox table")
                    }
                }
                None
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.in_transaction = false;
                let idle = self.ready.is_empty() && self.open.is_empty();
                // The commit's position is the message's place in the order a key gets: the
                // records of overlapping transactions interleave in the WAL, their commits
                // do not. A transaction's messages share it and keep their order.
                let seq = i64::try_from(end_lsn.as_u64()).unwrap_or(i64::MAX);
                self.ready
                    .extend(self.open.drain(..).map(|(mut message, row)| {
                        message.seq = seq;
                        Captured {
                            message,
                            end: end_lsn,
                            row,
                        }
                    }));
                idle.then_some(end_lsn)
            }
            ReplicationEvent::KeepAlive { wal_end, .. }
                if self.ready.is_empty() && !self.in_transaction =>
            {
                Some(wal_end)
            }
            _ => None,
        }
    }
}

/// The position to confirm once `batch` is settled: the end of its last transaction, unless
/// that transaction goes on in `next` (then the end of the one before, if any).
fn confirm_point(batch: &[Captured], next: Option<&Captured>) -> Option<Lsn> {
    let last = batch.last()?.end;
    if next.is_none_or(|n| n.end != last) {
        return Some(last);
    }
    batch.iter().rev().map(|c| c.end).find(|&e| e != last)
}

/// Ends a session once the server has the last confirmed position (at most a second or so),
/// so that the next relay does not replay what this one already settled; true when it does.
async fn close(client: &mut ReplicationClient) -> bool {
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    while client.feedback_pending_since().is_some() && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let confirmed = client.feedback_pending_since().is_none();
    let _ = client.shutdown().await;
    confirmed
}

/// PostgreSQL's timestamps count microseconds from 2000-01-01.
pub(crate) fn pg_time(micros: i64) -> DateTime<Utc> {
    const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
    DateTime::from_timestamp_micros(PG_EPOCH_MICROS.saturating_add(micros)).unwrap_or_else(Utc::now)
}

/// Another session streams from the slot (SQLSTATE 55006, object in use).
fn slot_in_use(message: &str) -> bool {
    message.contains("55006") || message.contains("is active for PID")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captured(end: u64) -> Captured {
        let new = outbox_core::NewMessage::bytes("t", "e", "text/plain", b"x".to_vec()).unwrap();
        Captured {
            message: decode(&outbox_postgres::capture::encode(&new), end, Utc::now()).unwrap(),
            end: Lsn::from_u64(end),
            row: false,
        }
    }

    #[test]
    fn a_batch_confirms_only_the_transactions_it_finished() {
        let b = [captured(10), captured(20), captured(20)];
        assert_eq!(confirm_point(&b, None), Some(Lsn::from_u64(20)));
        assert_eq!(
            confirm_point(&b, Some(&captured(30))),
            Some(Lsn::from_u64(20))
        );
        assert_eq!(
            confirm_point(&b, Some(&captured(20))),
            Some(Lsn::from_u64(10))
        );
        assert_eq!(confirm_point(&b[1..], Some(&captured(20))), None);
    }

    #[test]
    fn postgres_time_counts_from_2000() {
        assert_eq!(pg_time(0).to_rfc3339(), "2000-01-01T00:00:00+00:00");
    }
}
