//! The relay's metrics, through the [`metrics`] facade: the application that runs a relay picks
//! the exporter (`outbox-server` installs Prometheus's), and without one every call is a no-op.
//!
//! The hot path stays cheap: outcomes are tallied per batch and each counter is touched once
//! per topic of a batch, not once per message. Only the commit→delivery lag is recorded per
//! message, into one histogram handle per topic of the batch.

use std::time::Duration;

use chrono::Utc;

use crate::message::Message;
use crate::relay::RelayState;

/// Counter of messages delivered and acked, labelled `topic` and `sink`.
pub const DELIVERED: &str = "outbox_messages_delivered_total";
/// Counter of failed deliveries, labelled `topic`, `sink` and `kind` (`transient` or
/// `permanent`).
pub const FAILED: &str = "outbox_messages_failed_total";
/// Counter of messages that became dead letters, labelled `topic` and `sink`.
pub const DEAD: &str = "outbox_messages_dead_total";
/// Counter of claimed messages given back without an attempt counted, labelled `topic` and
/// `sink`.
pub const RELEASED: &str = "outbox_messages_released_total";
/// Histogram of claim round trips, in seconds.
pub const CLAIM: &str = "outbox_claim_duration_seconds";
/// Histogram of one batch's delivery to the sink, in seconds, labelled `sink`.
pub const PUBLISH: &str = "outbox_publish_duration_seconds";
/// Histogram of recording a batch's outcomes in the store, in seconds.
pub const SETTLE: &str = "outbox_settle_duration_seconds";
/// Histogram of the time from a message's enqueue to its delivery, in seconds, labelled
/// `topic`.
pub const LAG: &str = "outbox_delivery_lag_seconds";
/// Gauge that is 1 for the relay's current state and 0 for the others, labelled `state`.
pub const STATE: &str = "outbox_relay_state";

/// Every state the gauge reports, so that a scrape sees each at 0 or 1.
const STATES: [RelayState; 5] = [
    RelayState::Starting,
    RelayState::Working,
    RelayState::Idle,
    RelayState::DatabaseDown,
    RelayState::Stopped,
];

/// Sets `outbox_relay_state{state}` to 1 for `now` and 0 for the others.
pub fn state(now: RelayState) {
    for s in STATES {
        let value = if s == now { 1.0 } else { 0.0 };
        metrics::gauge!(STATE, "state" => s.as_str()).set(value);
    }
}

/// Records one claim's duration into [`CLAIM`].
pub fn claim_took(d: Duration) {
    metrics::histogram!(CLAIM).record(d.as_secs_f64());
}

/// Records how long `sink` took to publish one batch, into [`PUBLISH`].
pub fn publish_took(sink: &str, d: Duration) {
    metrics::histogram!(PUBLISH, "sink" => sink.to_owned()).record(d.as_secs_f64());
}

/// Records how long recording one batch's outcomes took, into [`SETTLE`].
pub fn settle_took(d: Duration) {
    metrics::histogram!(SETTLE).record(d.as_secs_f64());
}

/// How many messages of each topic of one batch: a short list, as a batch rarely spans more
/// than a few topics.
#[derive(Debug, Default)]
pub struct PerTopic(Vec<(String, u64)>);

impl PerTopic {
    /// Counts one message of `topic`; returns the topic's index in this tally.
    pub fn add(&mut self, topic: &str) -> usize {
        match self.0.iter().position(|(t, _)| t == topic) {
            Some(i) => {
                self.0[i].1 += 1;
                i
            }
            None => {
                self.0.push((topic.to_owned(), 1));
                self.0.len() - 1
            }
        }
    }

    /// The tally of `msgs` by topic.
    pub fn of<'a>(msgs: impl IntoIterator<Item = &'a Message>) -> Self {
        let mut per = Self::default();
        for m in msgs {
            per.add(&m.topic);
        }
        per
    }

    /// True when nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds the counts to the counter `name`, labelled by topic, `sink` and `extra`.
    pub fn count(&self, name: &'static str, sink: &str, extra: &[(&'static str, &'static str)]) {
        for (topic, n) in &self.0 {
            let mut labels = vec![
                metrics::Label::new("topic", topic.clone()),
                metrics::Label::new("sink", sink.to_owned()),
            ];
            labels.extend(extra.iter().map(|&(k, v)| metrics::Label::new(k, v)));
            metrics::counter!(name, labels).increment(*n);
        }
    }
}

/// What one batch's outcomes come to, emitted once its outcome is recorded.
#[derive(Debug, Default)]
pub struct Tally {
    /// Messages the sink delivered.
    pub delivered: PerTopic,
    /// Failures worth retrying (they go back to pending unless out of attempts).
    pub transient: PerTopic,
    /// Failures the sink called permanent.
    pub permanent: PerTopic,
    /// Messages that became dead letters, from either kind of failure.
    pub dead: PerTopic,
    /// Messages given back without an attempt counted.
    pub released: PerTopic,
    /// Commit time of each delivered message, with its topic's index in `delivered`, for
    /// the lag (no string per message).
    pub committed: Vec<(usize, chrono::DateTime<Utc>)>,
}

impl Tally {
    /// Delivered messages, with their commit→delivery lag as of now.
    pub fn delivered(&self, sink: &str) {
        self.delivered.count(DELIVERED, sink, &[]);
        let now = Utc::now();
        let lags: Vec<metrics::Histogram> = self
            .delivered
            .0
            .iter()
            .map(|(topic, _)| metrics::histogram!(LAG, "topic" => topic.clone()))
            .collect();
        for (topic, at) in &self.committed {
            let lag = (now - *at).to_std().unwrap_or_default().as_secs_f64();
            lags[*topic].record(lag);
        }
    }

    /// Failed deliveries by kind, and those of them that went dead.
    pub fn failed(&self, sink: &str) {
        self.transient.count(FAILED, sink, &[("kind", "transient")]);
        self.permanent.count(FAILED, sink, &[("kind", "permanent")]);
        self.dead.count(DEAD, sink, &[]);
    }

    /// Emits the released messages to [`RELEASED`].
    pub fn released(&self, sink: &str) {
        self.released.count(RELEASED, sink, &[]);
    }
}
