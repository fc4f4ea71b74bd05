//! How every relay hands a batch to its sink, whatever the batch's [`crate::source`]: one
//! wave at a time, at most one message per key in each (so a sink may deliver a wave
//! concurrently), a key stopping at its first failure, the whole batch within one deadline,
//! and each failure judged by the [`RetryPolicy`] into a retry or a dead letter.

use std::borrow::Cow;
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::time::Instant;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::claim::waves;
use crate::instrument::{self, Tally};
use crate::message::Message;
use crate::retry::RetryPolicy;
use crate::sink::{Delivery, Sink, SinkError, one_outcome_each};
use crate::source::{Batch, Outcome};
use crate::store::{Failure, Retention};

/// How long a batch goes on from wave to wave before it checks that its claim is still held.
/// A claim lost with its session frees the rows at once, and after a database restart the
/// relays rejoin with their partitions reshuffled: another relay may then claim the same keys
/// while this one is still delivering them. Checking every wave would cost a hot key's run one
/// round trip per message; this bounds the overlap to a wave plus this interval, well under
/// what a restart and a new claim take.
const CLAIM_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// What became of each message of a batch: `None` when it was not delivered because an
/// earlier message of its key failed (it stays where it is, without an attempt counted).
pub type Outcomes = Vec<Option<Delivery>>;

/// Delivers batches to one sink under one retry policy and deadline.
#[derive(Clone)]
pub struct Deliverer {
    sink: Arc<dyn Sink>,
    retry: RetryPolicy,
    deadline: Duration,
}

/// A batch's outcomes, judged: what to record ([`Judged::outcome`]) and what to count.
#[derive(Debug, Default)]
pub struct Judged {
    /// Delivered.
    pub acks: Vec<Uuid>,
    /// Failed, each with its retry decision.
    pub failures: Vec<Failure>,
    /// Not handed to the sink: behind a failed message of their key.
    pub left: Vec<Uuid>,
    /// The metrics of all of it, per topic.
    pub tally: Tally,
    /// How many of the failures will be retried.
    pub retried: u64,
    /// How many of the failures are dead.
    pub dead: u64,
}

impl Judged {
    /// What to record, with `retention` for the delivered messages.
    pub fn outcome(&self, retention: Retention) -> Outcome<'_> {
        Outcome {
            acks: &self.acks,
            failures: &self.failures,
            left: &self.left,
            retention,
        }
    }
}

impl Deliverer {
    /// Delivers to `sink`, judging failures by `retry`; a batch gets `deadline` in the sink.
    pub fn new(sink: Arc<dyn Sink>, retry: RetryPolicy, deadline: Duration) -> Self {
        Self {
            sink,
            retry,
            deadline,
        }
    }

    /// The sink batches go to.
    pub fn sink(&self) -> &Arc<dyn Sink> {
        &self.sink
    }

    /// Hands a batch to the sink one wave at a time (at most one message per key each, so a sink
    /// may deliver a wave concurrently), stopping a key at its first failure. The whole batch has
    /// the delivery deadline: what is still in the sink then fails, and later waves wait. A batch
    /// whose claim was lost stops: the rest is left, undelivered, to whoever claims it next.
    pub async fn deliver(&self, claimed: &dyn Batch) -> Outcomes {
        let batch = claimed.messages();
        let deadline = Instant::now() + self.deadline;
        let mut confirmed = Instant::now();
        let mut out: Outcomes = vec![None; batch.len()];
        let mut stopped: HashSet<&str> = HashSet::new();
        self.give_up_on_unfinished(batch, &mut out, &mut stopped);
        for wave in waves(batch) {
            let todo: Vec<usize> = wave
                .clone()
                .filter(|&i| out[i].is_none())
                .filter(|&i| batch[i].key.as_deref().is_none_or(|k| !stopped.contains(k)))
                .collect();
            if todo.is_empty() {
                continue;
            }
            if confirmed.elapsed() >= CLAIM_CHECK_INTERVAL {
                let held = tokio::time::timeout_at(deadline, claimed.is_held()).await;
                if held != Ok(true) {
                    warn!(
                        left = out.iter().filter(|o| o.is_none()).count(),
                        "the claim was lost with its database session; leaving the rest of the batch"
                    );
                    break;
                }
                confirmed = Instant::now();
            }
            let msgs: Cow<'_, [Message]> = if todo.len() == wave.len() {
                Cow::Borrowed(&batch[wave])
            } else {
                Cow::Owned(todo.iter().map(|&i| batch[i].clone()).collect())
            };
            let Ok(outcomes) = tokio::time::timeout_at(deadline, self.publish(&msgs)).await else {
                let err = SinkError::transient(format!(
                    "delivery did not finish within {:?} (four fifths of the lease)",
                    self.deadline
                ));
                for i in todo {
                    out[i] = Some(Err(err.clone()));
                }
                break;
            };
            for (i, o) in todo.into_iter().zip(outcomes) {
                if o.is_err()
                    && let Some(k) = batch[i].key.as_deref()
                {
                    stopped.insert(k);
                }
                out[i] = Some(o);
            }
        }
        out
    }

    /// A leased message reclaimed more than `max_attempts` times never recorded an outcome (its
    /// relays died or lost the lease each time): it goes dead without another delivery.
    fn give_up_on_unfinished<'a>(
        &self,
        batch: &'a [Message],
        out: &mut Outcomes,
        stopped: &mut HashSet<&'a str>,
    ) {
        let max = self.retry.max_attempts;
        for (i, m) in batch.iter().enumerate() {
            if m.attempts > max {
                out[i] = Some(Err(SinkError::permanent(format!(
                    "gave up after {} deliveries that never recorded an outcome (relay crash, kill or lost lease)",
                    m.attempts - 1
                ))));
                if let Some(k) = m.key.as_deref() {
                    stopped.insert(k);
                }
            }
        }
    }

    /// Hands a wave to the sink. A sink that panics fails the wave instead of taking the
    /// relay's task down, so its messages back off and reach `max_attempts` like any failure
    /// rather than being redelivered in a tight loop.
    /// Each message is published under its own span (feature `otel`), whose context the sink
    /// carries instead of the one stored at enqueue: see [`crate::trace`].
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        let started = Instant::now();
        let traced = crate::trace::Publish::start(self.sink.name(), batch);
        let outcomes = AssertUnwindSafe(self.sink.publish(traced.batch(batch)))
            .catch_unwind()
            .await;
        instrument::publish_took(self.sink.name(), started.elapsed());
        let outcomes = match outcomes {
            Ok(outcomes) => one_outcome_each(self.sink.name(), batch.len(), outcomes),
            Err(_) => {
                let err = SinkError::transient(format!("sink {} panicked", self.sink.name()));
                vec![Err(err); batch.len()]
            }
        };
        traced.finish(&outcomes);
        outcomes
    }

    /// Splits a batch's outcomes into acks, failures (each with its retry decision) and messages
    /// left behind by a failed key, with the tally of the metrics. Each message's `attempts` is
    /// the number of this delivery.
    pub fn judge(&self, batch: &[Message], outcomes: Outcomes) -> Judged {
        let mut acks = Vec::with_capacity(batch.len());
        let mut failures = Vec::new();
        let mut left = Vec::new();
        let mut tally = Tally::default();
        let (mut retried, mut dead) = (0, 0);
        for (msg, outcome) in batch.iter().zip(outcomes) {
            let err = match outcome {
                Some(Ok(())) => {
                    acks.push(msg.id);
                    let topic = tally.delivered.add(&msg.topic);
                    tally.committed.push((topic, msg.created_at));
                    continue;
                }
                None => {
                    left.push(msg.id);
                    tally.released.add(&msg.topic);
                    continue;
                }
                Some(Err(err)) => err,
            };
            if err.is_permanent() {
                tally.permanent.add(&msg.topic);
            } else {
                tally.transient.add(&msg.topic);
            }
            let retry_in = self.retry.decide(msg.attempts, &err);
            // Sink errors often quote the URL they failed on; the stored error is readable by
            // anyone who can list dead messages, so it never keeps a credential.
            let error = crate::redact(&err.to_string());
            if retry_in.is_some() {
                retried += 1;
                debug!(id = %msg.id, attempt = msg.attempts, %error, "delivery failed; will retry");
            } else {
                dead += 1;
                tally.dead.add(&msg.topic);
                warn!(id = %msg.id, topic = %msg.topic, attempt = msg.attempts, %error, "message is dead");
            }
            failures.push(Failure {
                id: msg.id,
                error,
                retry_in,
            });
        }
        Judged {
            acks,
            failures,
            left,
            tally,
            retried,
            dead,
        }
    }
}
