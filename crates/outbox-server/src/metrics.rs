//! `/metrics`: the process-wide Prometheus recorder, the backlog timer, and what is read at
//! scrape time.
//!
//! A scrape never touches the database. The backlog (counts by topic and status, and the age
//! of each topic's oldest pending message) comes from one query per
//! [`Surface::backlog_interval`](crate::Surface::backlog_interval), whatever the number of
//! scrapers; a scrape reads the gauges that query left, the relays' counters, their
//! circuits, and the process's own figures from `/proc`.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use outbox_core::{RelayMonitor, Store, instrument};

/// Gauge of messages in the outbox, labelled `topic` and `status`; a topic that empties is
/// set to 0 rather than dropped.
pub const BACKLOG: &str = "outbox_backlog_messages";
/// Gauge of the age of each topic's oldest pending message, in seconds (0 when none),
/// labelled `topic`.
pub const OLDEST_PENDING: &str = "outbox_oldest_pending_age_seconds";
/// Gauge that is 1 when the last backlog query succeeded, else 0.
pub const DATABASE_UP: &str = "outbox_database_up";
/// Gauge of how long the last backlog query took, in seconds.
pub const REFRESH_DURATION: &str = "outbox_backlog_refresh_duration_seconds";
/// Counter of backlog queries that failed or timed out.
pub const REFRESH_ERRORS: &str = "outbox_backlog_refresh_errors_total";
/// Gauge that is 1 while a sink's circuit breaker is open, labelled `sink`.
pub const CIRCUIT_OPEN: &str = "outbox_sink_circuit_open";
/// Gauge of the batches in a row that failed entirely at a sink, labelled `sink`.
pub const FAILURE_STREAK: &str = "outbox_sink_failure_streak";
/// Gauge of the seconds since the relay's loop last made progress; a value that keeps
/// growing means a stuck relay.
pub const SINCE_PROGRESS: &str = "outbox_relay_since_progress_seconds";

/// Histogram buckets of every `_seconds` histogram: from a millisecond (a claim on an idle
/// database) to ten minutes (a commit→delivery lag behind a backlog or an outage).
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 600.0,
];

/// The process-wide Prometheus recorder, installed on first use and shared by every server
/// of the process. If another recorder was installed first, this one still renders, but only
/// what is recorded into it directly (nothing, through the `metrics` macros).
pub fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .expect("the bucket list is not empty");
            let handle = match builder.install_recorder() {
                Ok(handle) => handle,
                Err(e) => {
                    tracing::warn!(error = %e, "a metrics recorder was already installed");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            };
            describe();
            process().describe();
            handle
        })
        .clone()
}

fn process() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        instrument::DELIVERED,
        "Messages delivered and acked, by topic and sink"
    );
    describe_counter!(
        instrument::FAILED,
        "Failed deliveries, by topic, sink and kind (transient or permanent)"
    );
    describe_counter!(
        instrument::DEAD,
        "Messages that went dead, by topic and sink"
    );
    describe_counter!(
        instrument::RELEASED,
        "Messages given back undelivered without an attempt counted, by topic and sink"
    );
    describe_histogram!(instrument::CLAIM, Unit::Seconds, "Time to claim one batch");
    describe_histogram!(
        instrument::PUBLISH,
        Unit::Seconds,
        "Time the sink took for one wave of a batch"
    );
    describe_histogram!(
        instrument::SETTLE,
        Unit::Seconds,
        "Time to record one batch's outcome"
    );
    describe_histogram!(
        instrument::LAG,
        Unit::Seconds,
        "Time from a message's commit to its ack, by topic"
    );
    describe_gauge!(
        instrument::STATE,
        "1 for the relay's current state (starting, working, idle, database_down, stopped)"
    );
    describe_gauge!(BACKLOG, "Messages in the outbox, by topic and status");
    describe_gauge!(
        OLDEST_PENDING,
        Unit::Seconds,
        "Age of the oldest pending message, by topic (0 when none)"
    );
    describe_gauge!(
        DATABASE_UP,
        "1 when the last backlog query succeeded, else 0"
    );
    describe_gauge!(
        REFRESH_DURATION,
        Unit::Seconds,
        "Time the last backlog query took"
    );
    describe_counter!(REFRESH_ERRORS, "Backlog queries that failed");
    describe_gauge!(CIRCUIT_OPEN, "1 while the sink's circuit breaker is open");
    describe_gauge!(
        FAILURE_STREAK,
        "Batches in a row that failed entirely at the sink"
    );
    describe_gauge!(
        SINCE_PROGRESS,
        Unit::Seconds,
        "Time since the relay's loop last made progress"
    );
}

/// The figures read at scrape time (no database), then the rendered text.
pub(crate) fn render(handle: &PrometheusHandle, relays: &[RelayMonitor]) -> String {
    process().collect();
    for r in relays {
        metrics::gauge!(SINCE_PROGRESS).set(r.since_progress().as_secs_f64());
        for c in r.circuits() {
            let open = if c.open { 1.0 } else { 0.0 };
            metrics::gauge!(CIRCUIT_OPEN, "sink" => c.sink.clone()).set(open);
            metrics::gauge!(FAILURE_STREAK, "sink" => c.sink).set(f64::from(c.failures));
        }
    }
    handle.render()
}

/// A backlog query that takes longer than this counts as a database that does not answer.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);

const STATUSES: [&str; 4] = ["pending", "in_flight", "delivered", "dead"];

/// Refreshes the backlog gauges from one query. Topics that emptied out since the last
/// refresh are set to 0 rather than left at their last value.
pub(crate) struct BacklogGauges {
    store: Arc<dyn Store>,
    topics: BTreeSet<String>,
}

impl BacklogGauges {
    pub fn new(store: Arc<dyn Store>) -> Self {
        // Exported from the start, so that `rate()` and `increase()` see the first error.
        metrics::counter!(REFRESH_ERRORS).absolute(0);
        Self {
            store,
            topics: BTreeSet::new(),
        }
    }

    pub async fn refresh(&mut self) {
        let started = Instant::now();
        let result = tokio::time::timeout(REFRESH_TIMEOUT, self.store.backlog()).await;
        metrics::gauge!(REFRESH_DURATION).set(started.elapsed().as_secs_f64());
        let rows = match result {
            Ok(Ok(rows)) => rows,
            Err(_) => {
                tracing::debug!("backlog query timed out");
                metrics::counter!(REFRESH_ERRORS).increment(1);
                metrics::gauge!(DATABASE_UP).set(0.0);
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "backlog query failed");
                metrics::counter!(REFRESH_ERRORS).increment(1);
                metrics::gauge!(DATABASE_UP).set(0.0);
                return;
            }
        };
        metrics::gauge!(DATABASE_UP).set(1.0);
        let mut gone = std::mem::take(&mut self.topics);
        for t in rows {
            gone.remove(&t.topic);
            let counts = [t.pending, t.in_flight, t.delivered, t.dead];
            for (status, n) in STATUSES.into_iter().zip(counts) {
                metrics::gauge!(BACKLOG, "topic" => t.topic.clone(), "status" => status)
                    .set(n as f64);
            }
            let age = t.oldest_pending_age_seconds.unwrap_or(0.0);
            metrics::gauge!(OLDEST_PENDING, "topic" => t.topic.clone()).set(age);
            self.topics.insert(t.topic);
        }
        for topic in gone {
            for status in STATUSES {
                metrics::gauge!(BACKLOG, "topic" => topic.clone(), "status" => status).set(0.0);
            }
            metrics::gauge!(OLDEST_PENDING, "topic" => topic).set(0.0);
        }
    }
}

/// Refreshes the backlog every `interval` and drains the recorder's histogram buffers (which
/// otherwise grow until the next scrape), until `stop`.
pub(crate) async fn keep_up(
    handle: PrometheusHandle,
    mut backlog: Option<BacklogGauges>,
    interval: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = tick.tick() => {}
        }
        if let Some(b) = backlog.as_mut() {
            b.refresh().await;
        }
        handle.run_upkeep();
    }
}
