//! # outbox-testkit
//!
//! One conformance suite for every [`Store`]: each store crate implements [`Backend`] for its
//! real database and expands [`conformance_tests!`] in an integration test, so PostgreSQL and
//! SQLite (and later stores) are held to the same guarantees.

// Test support for the store crates' suites, never published (publish = false).
#![allow(missing_docs)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{
    ClaimRequest, HandlerSink, Message, NewMessage, Relay, RelayConfig, RelayState, Retention,
    RetryPolicy, SinkError, Status, Store,
};
use uuid::Uuid;

/// An open transaction of the store under test.
#[async_trait]
pub trait OpenTx: Send {
    async fn enqueue(&mut self, msgs: &[NewMessage]) -> anyhow::Result<()>;
    /// Records in the inbox that `consumer` processes `id`; false if it already did.
    async fn record(&mut self, consumer: &str, id: Uuid) -> anyhow::Result<bool>;
    async fn commit(self: Box<Self>) -> anyhow::Result<()>;
    async fn rollback(self: Box<Self>) -> anyhow::Result<()>;
}

/// A fresh, migrated outbox of its own (its own schema or file) for one test.
#[async_trait]
pub trait Fixture: Send + Sync {
    fn store(&self) -> Arc<dyn Store>;
    async fn begin(&self) -> anyhow::Result<Box<dyn OpenTx>>;
    /// Called after a commit, for stores whose relays are woken from the writer's process.
    fn committed(&self) {}
    /// Forgets inbox ids processed longer than `older_than` ago, at most `limit`.
    async fn purge_inbox(&self, older_than: Duration, limit: usize) -> anyhow::Result<u64>;
    /// Removes what the fixture created.
    async fn cleanup(&self) -> anyhow::Result<()>;
}

#[async_trait]
pub trait Backend: Send + Sync {
    async fn fixture(&self) -> anyhow::Result<Box<dyn Fixture>>;
}

/// Expands into one `#[tokio::test]` per conformance test, each with a fresh fixture from
/// `$backend` (an expression implementing [`Backend`]).
#[macro_export]
macro_rules! conformance_tests {
    ($backend:expr) => {
        $crate::conformance_tests!(@each $backend;
            commit_makes_message_deliverable,
            uncommitted_and_rolled_back_are_never_claimed,
            batch_keeps_enqueue_order,
            same_key_is_delivered_in_order_by_one_relay,
            four_relays_deliver_each_message_once,
            expired_lease_is_reclaimed_after_a_crash,
            late_outcome_of_a_lost_lease_is_ignored,
            transient_failures_back_off_then_go_dead,
            permanent_failure_is_dead_at_once,
            panicking_sink_fails_its_batch,
            any_error_text_is_recorded,
            replicas_sharing_a_configured_id_claim_under_distinct_ids,
            a_sink_that_miscounts_its_outcomes_acks_nothing,
            failing_key_does_not_block_other_keys,
            retried_head_behind_a_long_run_of_its_key_is_not_starved,
            dead_letters_can_be_retried_and_purged,
            retention_keeps_then_purges_delivered,
            delayed_message_waits,
            release_returns_messages_without_an_attempt,
            status_counts_each_state,
            backlog_counts_each_topic_and_state,
            shutdown_finishes_the_batches_in_hand,
            shutdown_timeout_releases_unfinished_messages,
            idle_relay_is_woken_by_a_commit,
            headers_and_payload_round_trip,
            trace_context_travels_from_the_enqueueing_span_through_the_publish_span,
            enqueue_refuses_reserved_headers_and_oversized_messages,
            a_claim_stops_at_its_byte_budget,
            migrate_is_idempotent,
            inbox_processes_each_message_once_per_consumer,
            inbox_record_rolls_back_with_the_effects,
            inbox_racing_redeliveries_process_once,
            hot_keys_go_out_in_runs_and_in_order,
            relays_joining_and_dying_keep_each_key_in_order,
            a_relay_joining_a_drain_takes_its_share_at_once,
            a_sink_slower_than_the_lease_counts_attempts_and_goes_dead,
            a_message_that_kills_its_relay_goes_dead_alone,
            dead_letters_are_filtered_and_paged,
            dead_letters_are_retried_and_purged_by_selection,
            relays_report_their_state_until_they_stop,
            paused_topics_are_not_claimed_until_resumed,
            resuming_a_topic_wakes_an_idle_relay,
        );
    };
    (@each $backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let fixture = $crate::Backend::fixture(&$backend).await.expect("fixture");
                $crate::tests::$name(fixture.as_ref()).await.expect(stringify!($name));
                fixture.cleanup().await.expect("cleanup");
            }
        )*
    };
}

/// Expands into the tests for stores whose writers run concurrently (PostgreSQL, MySQL): each
/// a `#[tokio::test]` with a fresh fixture from `$backend`, as [`conformance_tests!`] does.
#[macro_export]
macro_rules! concurrent_writer_tests {
    ($backend:expr) => {
        $crate::conformance_tests!(@each $backend;
            racing_writers_never_put_two_messages_of_a_key_in_delivery,
        );
    };
}

/// Header names and values that enqueue must accept or refuse exactly as
/// `outbox_core::headers::check` does, for the SQL-level enqueue of each store: reserved names
/// in every case, bad names, CR/LF, the name length limit, W3C trace context.
pub fn header_cases() -> Vec<(String, String)> {
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let cases = [
        ("x-tenant", "acme".to_owned()),
        ("Idempotency-Key", "42".to_owned()),
        ("Nats-Msg-Id", "1".to_owned()),
        ("NATS-ROLLUP", "all".to_owned()),
        ("content-type", "text/plain".to_owned()),
        ("Host", "evil".to_owned()),
        ("webhook-signature", "v1,x".to_owned()),
        ("ce-id", "1".to_owned()),
        ("CC", "queue".to_owned()),
        ("x-delay", "5".to_owned()),
        ("bad name", "x".to_owned()),
        ("colon:name", "x".to_owned()),
        ("", "x".to_owned()),
        (&"n".repeat(128), "x".to_owned()),
        (&"n".repeat(129), "x".to_owned()),
        ("x-split", "a\r\nInjected: yes".to_owned()),
        ("x-newline", "a\nb".to_owned()),
        ("traceparent", traceparent.to_owned()),
        (
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_owned(),
        ),
        (
            "traceparent",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        ),
        ("traceparent", format!("{traceparent}-extra")),
        (
            "traceparent",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra".to_owned(),
        ),
        ("traceparent", "not a trace".to_owned()),
        ("tracestate", "vendor=abc, other=def".to_owned()),
        ("tracestate", "novalue".to_owned()),
        ("tracestate", "a=b=c".to_owned()),
        ("tracestate", "x".repeat(513)),
    ];
    cases
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
}

/// A message with a numbered JSON payload.
pub fn msg(topic: &str, n: u64) -> NewMessage {
    NewMessage::json(topic, "test.event", &serde_json::json!({ "n": n })).expect("valid message")
}

/// Enqueues `msgs` in one committed transaction.
pub async fn enqueue(f: &dyn Fixture, msgs: &[NewMessage]) -> anyhow::Result<()> {
    let mut tx = f.begin().await?;
    tx.enqueue(msgs).await?;
    tx.commit().await?;
    f.committed();
    Ok(())
}

/// Waits for `check` to hold, testing it every 50 ms; panics after `bound`, naming `what`.
pub async fn eventually<F, Fut>(what: &str, bound: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + bound;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {bound:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Records what a handler sink received, in order.
#[derive(Clone, Default)]
pub struct Recorder {
    seen: Arc<Mutex<Vec<Message>>>,
}

impl Recorder {
    pub fn push(&self, m: Message) {
        self.seen.lock().unwrap().push(m);
    }
    pub fn messages(&self) -> Vec<Message> {
        self.seen.lock().unwrap().clone()
    }
    pub fn ids(&self) -> Vec<Uuid> {
        self.messages().iter().map(|m| m.id).collect()
    }
}

/// Relay settings for tests: short timings, drain mode.
pub fn drain_config() -> RelayConfig {
    RelayConfig::default()
        .batch_size(50)
        .poll_interval(Duration::from_millis(50))
        .exit_when_idle(true)
        .retry(
            RetryPolicy::default()
                .max_attempts(3)
                .base_delay(Duration::ZERO)
                .max_delay(Duration::ZERO),
        )
}

/// Runs a drain-mode relay that records and acks everything.
pub async fn drain(store: Arc<dyn Store>, config: RelayConfig) -> Recorder {
    let rec = Recorder::default();
    let r = rec.clone();
    let sink = HandlerSink::new(move |m: Message| {
        let r = r.clone();
        async move {
            r.push(m);
            Ok(())
        }
    });
    Relay::with_config(store, Arc::new(sink), config)
        .run(futures::future::pending())
        .await;
    rec
}

mod admin;
pub mod cluster;
mod order;
pub mod proxy;
mod racing;
pub mod trace;

pub use order::OrderCheck;

pub mod tests {
    pub use crate::admin::{
        dead_letters_are_filtered_and_paged, dead_letters_are_retried_and_purged_by_selection,
        paused_topics_are_not_claimed_until_resumed, relays_report_their_state_until_they_stop,
        resuming_a_topic_wakes_an_idle_relay,
    };
    pub use crate::order::{
        a_message_that_kills_its_relay_goes_dead_alone,
        a_relay_joining_a_drain_takes_its_share_at_once,
        a_sink_slower_than_the_lease_counts_attempts_and_goes_dead,
        hot_keys_go_out_in_runs_and_in_order, relays_joining_and_dying_keep_each_key_in_order,
    };
    pub use crate::racing::racing_writers_never_put_two_messages_of_a_key_in_delivery;

    use super::*;
    use anyhow::ensure;

    type R = anyhow::Result<()>;
    const LEASE: Duration = Duration::from_secs(30);

    pub async fn commit_makes_message_deliverable(f: &dyn Fixture) -> R {
        let m = msg("orders", 1);
        enqueue(f, std::slice::from_ref(&m)).await?;
        let got = f.store().claim("r1", 10, LEASE).await?;
        ensure!(got.len() == 1 && got[0].id == m.id(), "claimed {got:?}");
        ensure!(got[0].attempts == 1 && got[0].status == Status::InFlight);
        ensure!(
            f.store().claim("r2", 10, LEASE).await?.is_empty(),
            "claimed twice"
        );
        ensure!(f.store().ack(&[m.id()], Retention::Delete).await? == 1);
        ensure!(f.store().status().await? == Default::default());
        Ok(())
    }

    pub async fn uncommitted_and_rolled_back_are_never_claimed(f: &dyn Fixture) -> R {
        let store = f.store();
        // A store with a single writer (SQLite) cannot claim while the writer's transaction is
        // open and reports an error after its busy timeout: that is not a claim either.
        let claims_nothing = |store: Arc<dyn Store>| async move {
            match store.claim("r", 10, LEASE).await {
                Ok(got) => got.is_empty(),
                Err(_) => true,
            }
        };
        let mut open = f.begin().await?;
        open.enqueue(&[msg("t", 1)]).await?;
        ensure!(store.status().await?.pending == 0, "saw an uncommitted row");
        ensure!(
            claims_nothing(store.clone()).await,
            "claimed an uncommitted row"
        );
        open.rollback().await?;
        ensure!(
            store.claim("r", 10, LEASE).await?.is_empty(),
            "saw a rolled-back row"
        );
        ensure!(store.status().await?.pending == 0);

        let mut open = f.begin().await?;
        let m = msg("t", 2);
        open.enqueue(std::slice::from_ref(&m)).await?;
        ensure!(
            claims_nothing(store.clone()).await,
            "claimed an uncommitted row"
        );
        open.commit().await?;
        let got = store.claim("r", 10, LEASE).await?;
        ensure!(got.len() == 1 && got[0].id == m.id());
        Ok(())
    }

    pub async fn batch_keeps_enqueue_order(f: &dyn Fixture) -> R {
        let msgs: Vec<_> = (0..500).map(|n| msg("t", n)).collect();
        enqueue(f, &msgs).await?;
        let got = f.store().claim("r", 1000, LEASE).await?;
        let want: Vec<_> = msgs.iter().map(NewMessage::id).collect();
        let ids: Vec<_> = got.iter().map(|m| m.id).collect();
        ensure!(ids == want, "batch order differs");
        ensure!(got.windows(2).all(|w| w[0].seq < w[1].seq));
        Ok(())
    }

    pub async fn same_key_is_delivered_in_order_by_one_relay(f: &dyn Fixture) -> R {
        // Interleaved keys, enqueued over several transactions.
        let mut all = Vec::new();
        for chunk in 0..5 {
            let msgs: Vec<_> = (0..60)
                .map(|i| msg("t", chunk * 100 + i).key(format!("k{}", i % 3)))
                .collect();
            enqueue(f, &msgs).await?;
            all.extend(msgs);
        }
        // The sink runs a batch concurrently: it must never hold two messages of one key.
        let rec = Recorder::default();
        let in_flight = Arc::new(Mutex::new(HashSet::new()));
        let overlaps = Arc::new(Mutex::new(0usize));
        let (r, busy, over) = (rec.clone(), in_flight.clone(), overlaps.clone());
        let sink = HandlerSink::new(move |m: Message| {
            let (r, busy, over) = (r.clone(), busy.clone(), over.clone());
            async move {
                let key = m.key.clone();
                if !busy.lock().unwrap().insert(key.clone()) {
                    *over.lock().unwrap() += 1;
                }
                r.push(m);
                tokio::task::yield_now().await;
                busy.lock().unwrap().remove(&key);
                Ok(())
            }
        });
        Relay::with_config(f.store(), Arc::new(sink), drain_config())
            .run(futures::future::pending())
            .await;
        ensure!(
            *overlaps.lock().unwrap() == 0,
            "two messages of one key were in flight at once"
        );
        ensure!(
            rec.ids().len() == all.len(),
            "delivered {} of {}",
            rec.ids().len(),
            all.len()
        );
        for key in ["k0", "k1", "k2"] {
            let want: Vec<_> = all
                .iter()
                .filter(|m| m.key_ref() == Some(key))
                .map(NewMessage::id)
                .collect();
            let got: Vec<_> = rec
                .messages()
                .iter()
                .filter(|m| m.key.as_deref() == Some(key))
                .map(|m| m.id)
                .collect();
            ensure!(got == want, "key {key} out of order");
        }
        Ok(())
    }

    pub async fn four_relays_deliver_each_message_once(f: &dyn Fixture) -> R {
        let msgs: Vec<_> = (0..2000)
            .map(|n| {
                let m = msg("t", n);
                if n % 4 == 0 {
                    m.key(format!("k{}", n % 40))
                } else {
                    m
                }
            })
            .collect();
        enqueue(f, &msgs).await?;
        let relays: Vec<_> = (0..4)
            .map(|i| {
                let config = drain_config().relay_id(format!("relay-{i}")).batch_size(25);
                tokio::spawn(drain(f.store(), config))
            })
            .collect();
        let mut counts: HashMap<Uuid, usize> = HashMap::new();
        let mut by_relay = Vec::new();
        for r in relays {
            let rec = r.await?;
            by_relay.push(rec.ids().len());
            for id in rec.ids() {
                *counts.entry(id).or_default() += 1;
            }
        }
        ensure!(
            counts.len() == msgs.len(),
            "delivered {} distinct of {}",
            counts.len(),
            msgs.len()
        );
        let dup = counts.values().filter(|&&c| c > 1).count();
        ensure!(dup == 0, "{dup} messages delivered more than once");
        ensure!(f.store().status().await?.pending == 0);
        Ok(())
    }

    pub async fn expired_lease_is_reclaimed_after_a_crash(f: &dyn Fixture) -> R {
        let m = msg("t", 1).key("k");
        let next = msg("t", 2).key("k");
        enqueue(f, &[m.clone(), next.clone()]).await?;
        // Relay "a" claims the key's run with a lease that is already over, then "crashes"
        // (never acks).
        let first = f.store().claim("a", 10, Duration::ZERO).await?;
        ensure!(first.len() == 2 && first[0].id == m.id() && first[1].id == next.id());
        let again = f.store().claim("b", 10, LEASE).await?;
        // A message whose delivery never ended goes alone.
        ensure!(
            again.len() == 1 && again[0].id == m.id(),
            "not reclaimed alone: {again:?}"
        );
        ensure!(again[0].attempts == 2);
        ensure!(
            f.store().claim("c", 10, LEASE).await?.is_empty(),
            "key order broken"
        );
        f.store().ack(&[m.id()], Retention::Delete).await?;
        let after = f.store().claim("c", 10, LEASE).await?;
        ensure!(after.len() == 1 && after[0].id == next.id());
        Ok(())
    }

    pub async fn late_outcome_of_a_lost_lease_is_ignored(f: &dyn Fixture) -> R {
        let m = msg("t", 1);
        enqueue(f, std::slice::from_ref(&m)).await?;
        f.store().claim("a", 10, Duration::ZERO).await?;
        f.store().claim("b", 10, LEASE).await?;
        // "a" wakes up and reports a failure for a message it no longer holds.
        let failure = outbox_core::Failure {
            id: m.id(),
            error: "late".into(),
            retry_in: None,
        };
        f.store().fail("a", &[failure]).await?;
        let s = f.store().status().await?;
        ensure!(
            s.in_flight == 1 && s.dead == 0,
            "lost lease overwrote the claim: {s:?}"
        );
        Ok(())
    }

    fn failing_sink(
        attempts: Arc<Mutex<HashMap<Uuid, i32>>>,
        error: SinkError,
    ) -> impl outbox_core::Sink {
        HandlerSink::new(move |m: Message| {
            let attempts = attempts.clone();
            let error = error.clone();
            async move {
                attempts.lock().unwrap().insert(m.id, m.attempts);
                Err(error)
            }
        })
    }

    pub async fn transient_failures_back_off_then_go_dead(f: &dyn Fixture) -> R {
        let m = msg("t", 1);
        enqueue(f, std::slice::from_ref(&m)).await?;
        // A long backoff: after the first failure the message waits, not claimable.
        let slow = drain_config().retry(
            RetryPolicy::default()
                .max_attempts(3)
                .base_delay(Duration::from_secs(3600))
                .max_delay(Duration::from_secs(3600)),
        );
        let attempts = Arc::new(Mutex::new(HashMap::new()));
        let sink = Arc::new(failing_sink(
            attempts.clone(),
            SinkError::transient("broker down"),
        ));
        let report = Relay::with_config(f.store(), sink.clone(), slow)
            .run(futures::future::pending())
            .await;
        ensure!(report.retried == 1 && report.dead == 0, "{report:?}");
        ensure!(
            f.store().claim("x", 10, LEASE).await?.is_empty(),
            "retried before its backoff"
        );
        let s = f.store().status().await?;
        ensure!(s.pending == 1, "{s:?}");

        // With no backoff it is retried until max_attempts, then dead with its error kept.
        let m2 = msg("t", 2);
        enqueue(f, std::slice::from_ref(&m2)).await?;
        let report = Relay::with_config(f.store(), sink, drain_config())
            .run(futures::future::pending())
            .await;
        ensure!(report.dead == 1 && report.retried == 2, "{report:?}");
        let dead = f.store().dead_list(10).await?;
        ensure!(dead.len() == 1 && dead[0].id == m2.id());
        ensure!(dead[0].attempts == 3 && dead[0].last_error.as_deref() == Some("broker down"));
        ensure!(dead[0].status == Status::Dead);
        Ok(())
    }

    pub async fn permanent_failure_is_dead_at_once(f: &dyn Fixture) -> R {
        let m = msg("t", 1);
        enqueue(f, std::slice::from_ref(&m)).await?;
        let attempts = Arc::new(Mutex::new(HashMap::new()));
        let sink = Arc::new(failing_sink(
            attempts,
            SinkError::permanent("schema mismatch"),
        ));
        let report = Relay::with_config(f.store(), sink, drain_config())
            .run(futures::future::pending())
            .await;
        ensure!(report.dead == 1 && report.retried == 0, "{report:?}");
        let dead = f.store().dead_list(10).await?;
        ensure!(dead[0].attempts == 1 && dead[0].last_error.as_deref() == Some("schema mismatch"));
        Ok(())
    }

    /// Sink errors are arbitrary text: a NUL byte (which PostgreSQL refuses in text) or a
    /// megabyte of body must not stop the failure from being recorded.
    pub async fn any_error_text_is_recorded(f: &dyn Fixture) -> R {
        let m = msg("t", 1);
        enqueue(f, std::slice::from_ref(&m)).await?;
        let error = format!("bad\0byte {}", "x".repeat(1 << 20));
        let sink = Arc::new(failing_sink(Arc::default(), SinkError::permanent(error)));
        let relay = Relay::with_config(f.store(), sink, drain_config());
        let report = tokio::time::timeout(
            Duration::from_secs(60),
            relay.run(futures::future::pending()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("the failure was never recorded"))?;
        ensure!(report.dead == 1, "{report:?}");
        let dead = f.store().dead_list(10).await?;
        let stored = dead[0].last_error.as_deref().unwrap_or_default();
        ensure!(
            stored.starts_with("bad\u{fffd}byte xxx"),
            "{:?}",
            &stored[..20.min(stored.len())]
        );
        ensure!(
            stored.len() <= outbox_core::MAX_ERROR_LEN,
            "{} bytes stored",
            stored.len()
        );
        Ok(())
    }

    /// A `relay_id` from a configuration shared by replicas must not make them one relay in
    /// the store's eyes: each would ack, release and renew the other's claims.
    pub async fn replicas_sharing_a_configured_id_claim_under_distinct_ids(f: &dyn Fixture) -> R {
        let config = drain_config().relay_id("orders");
        let ids: Vec<String> = (0..2)
            .map(|_| {
                let sink = HandlerSink::new(|_: Message| async { Ok(()) });
                Relay::with_config(f.store(), Arc::new(sink), config.clone())
            })
            .map(|relay| relay.id().to_owned())
            .collect();
        ensure!(ids[0] != ids[1], "two replicas claim as {:?}", ids[0]);
        ensure!(ids.iter().all(|id| id.starts_with("orders-")), "{ids:?}");
        Ok(())
    }

    pub async fn panicking_sink_fails_its_batch(f: &dyn Fixture) -> R {
        let m = msg("t", 1);
        enqueue(f, std::slice::from_ref(&m)).await?;
        let sink = HandlerSink::new(|m: Message| async move {
            if m.seq >= 0 {
                panic!("handler bug");
            }
            Ok(())
        });
        // Counted as failed attempts, so the relay neither loops nor waits for a lease.
        let report = Relay::with_config(f.store(), Arc::new(sink), drain_config())
            .run(futures::future::pending())
            .await;
        ensure!(report.dead == 1 && report.retried == 2, "{report:?}");
        let dead = f.store().dead_list(10).await?;
        ensure!(dead.len() == 1 && dead[0].id == m.id() && dead[0].attempts == 3);
        let error = dead[0].last_error.as_deref().unwrap_or_default();
        ensure!(error.contains("panicked"), "{error}");
        Ok(())
    }

    /// A sink must return one outcome per message; one that returns another count cannot be
    /// trusted on any of them, so nothing of its batch is acked on a guess.
    pub async fn a_sink_that_miscounts_its_outcomes_acks_nothing(f: &dyn Fixture) -> R {
        for more in [true, false] {
            let msgs: Vec<_> = (0..3).map(|n| msg("t", n)).collect();
            enqueue(f, &msgs).await?;
            let sink = MiscountingSink { more };
            let report = Relay::with_config(f.store(), Arc::new(sink), drain_config())
                .run(futures::future::pending())
                .await;
            ensure!(
                report.delivered == 0 && report.dead == 3,
                "more {more}: {report:?}"
            );
            let dead = f.store().dead_list(10).await?;
            let error = dead[0].last_error.as_deref().unwrap_or_default();
            ensure!(error.contains("outcomes for"), "{error}");
            f.store().dead_purge(None).await?;
        }
        Ok(())
    }

    /// Returns one outcome more than messages, or one fewer.
    struct MiscountingSink {
        more: bool,
    }

    #[async_trait]
    impl outbox_core::Sink for MiscountingSink {
        async fn publish(&self, batch: &[Message]) -> Vec<outbox_core::Delivery> {
            let n = if self.more {
                batch.len() + 1
            } else {
                batch.len().saturating_sub(1)
            };
            vec![Ok(()); n]
        }
        fn name(&self) -> &str {
            "miscounting"
        }
    }

    pub async fn failing_key_does_not_block_other_keys(f: &dyn Fixture) -> R {
        let poison = msg("t", 0).key("bad");
        let behind = msg("t", 1).key("bad");
        let others: Vec<_> = (2..22)
            .map(|n| msg("t", n).key(format!("good{n}")))
            .collect();
        let mut all = vec![poison.clone(), behind.clone()];
        all.extend(others.iter().cloned());
        enqueue(f, &all).await?;
        let rec = Recorder::default();
        let r = rec.clone();
        let poison_id = poison.id();
        let sink = HandlerSink::new(move |m: Message| {
            let r = r.clone();
            async move {
                if m.id == poison_id {
                    return Err(SinkError::transient("cannot deliver"));
                }
                r.push(m);
                Ok(())
            }
        });
        let config = drain_config().retry(
            RetryPolicy::default()
                .max_attempts(5)
                .base_delay(Duration::from_secs(3600))
                .max_delay(Duration::from_secs(3600)),
        );
        Relay::with_config(f.store(), Arc::new(sink), config)
            .run(futures::future::pending())
            .await;
        let delivered: HashSet<_> = rec.ids().into_iter().collect();
        ensure!(
            others.iter().all(|m| delivered.contains(&m.id())),
            "other keys were held back"
        );
        ensure!(
            !delivered.contains(&behind.id()),
            "a later message overtook its failing predecessor"
        );
        Ok(())
    }

    /// A retried message becomes due after every later message of its key, which all wait for
    /// it: a claim that looks only at the oldest deliverable rows sees nothing but those. The
    /// relay must still find the retried head, then deliver the key in order.
    pub async fn retried_head_behind_a_long_run_of_its_key_is_not_starved(f: &dyn Fixture) -> R {
        let run: Vec<_> = (0..40).map(|n| msg("t", n).key("k")).collect();
        let others: Vec<_> = (40..50).map(|n| msg("t", n)).collect();
        enqueue(f, &run).await?;
        enqueue(f, &others).await?;
        let total = run.len() + others.len();
        let head = run[0].id();
        let failed_once = Arc::new(Mutex::new(false));
        let rec = Recorder::default();
        let (r, failed) = (rec.clone(), failed_once.clone());
        let all_in = Arc::new(tokio::sync::Notify::new());
        let done = all_in.clone();
        let sink = HandlerSink::new(move |m: Message| {
            let (r, failed, done) = (r.clone(), failed.clone(), done.clone());
            async move {
                if m.id == head && !std::mem::replace(&mut *failed.lock().unwrap(), true) {
                    return Err(SinkError::transient("first attempt fails"));
                }
                r.push(m);
                if r.ids().len() == total {
                    done.notify_one();
                }
                Ok(())
            }
        });
        let config = drain_config()
            .batch_size(4)
            .exit_when_idle(false)
            .poll_interval(Duration::from_millis(20))
            .retry(
                RetryPolicy::default()
                    .max_attempts(5)
                    .base_delay(Duration::from_millis(50))
                    .max_delay(Duration::from_millis(50)),
            );
        let finished = tokio::time::timeout(
            Duration::from_secs(30),
            Relay::with_config(f.store(), Arc::new(sink), config)
                .run(async move { all_in.notified().await }),
        )
        .await;
        ensure!(finished.is_ok(), "delivered {} of {total}", rec.ids().len());
        let got: Vec<_> = rec
            .messages()
            .iter()
            .filter(|m| m.key.as_deref() == Some("k"))
            .map(|m| m.id)
            .collect();
        let want: Vec<_> = run.iter().map(NewMessage::id).collect();
        ensure!(got == want, "key k out of order");
        Ok(())
    }

    pub async fn dead_letters_can_be_retried_and_purged(f: &dyn Fixture) -> R {
        let msgs: Vec<_> = (0..3).map(|n| msg("t", n)).collect();
        enqueue(f, &msgs).await?;
        let store = f.store();
        let claimed = store.claim("r", 10, LEASE).await?;
        let failures: Vec<_> = claimed
            .iter()
            .map(|m| outbox_core::Failure {
                id: m.id,
                error: "boom".into(),
                retry_in: None,
            })
            .collect();
        store.fail("r", &failures).await?;
        ensure!(store.status().await?.dead == 3);
        ensure!(store.dead_retry(Some(&[msgs[0].id()])).await? == 1);
        let again = store.claim("r", 10, LEASE).await?;
        ensure!(again.len() == 1 && again[0].id == msgs[0].id() && again[0].attempts == 1);
        ensure!(
            store.dead_purge(Some(Duration::from_secs(3600))).await? == 0,
            "purged young dead letters"
        );
        ensure!(store.dead_purge(None).await? == 2);
        ensure!(store.dead_retry(None).await? == 0);
        let s = store.status().await?;
        ensure!(s.dead == 0 && s.in_flight == 1, "{s:?}");
        Ok(())
    }

    pub async fn retention_keeps_then_purges_delivered(f: &dyn Fixture) -> R {
        let msgs: Vec<_> = (0..5).map(|n| msg("t", n)).collect();
        enqueue(f, &msgs).await?;
        let config = drain_config().retention(Retention::Keep(Duration::from_secs(3600)));
        let rec = drain(f.store(), config).await;
        ensure!(rec.ids().len() == 5);
        let s = f.store().status().await?;
        ensure!(s.delivered == 5 && s.pending == 0, "{s:?}");
        ensure!(
            f.store()
                .purge_delivered(Duration::from_secs(3600), 10)
                .await?
                == 0,
            "purged inside the window"
        );
        ensure!(
            f.store().purge_delivered(Duration::ZERO, 2).await? == 2,
            "purge ignores its batch bound"
        );
        ensure!(f.store().purge_delivered(Duration::ZERO, 10).await? == 3);
        ensure!(f.store().status().await?.delivered == 0);
        Ok(())
    }

    pub async fn delayed_message_waits(f: &dyn Fixture) -> R {
        let later = msg("t", 1).delay(Duration::from_secs(3600));
        let now = msg("t", 2);
        enqueue(f, &[later, now.clone()]).await?;
        let got = f.store().claim("r", 10, LEASE).await?;
        ensure!(
            got.len() == 1 && got[0].id == now.id(),
            "delayed message was claimed early"
        );
        ensure!(f.store().status().await?.pending == 1);
        Ok(())
    }

    pub async fn release_returns_messages_without_an_attempt(f: &dyn Fixture) -> R {
        let m = msg("t", 1);
        enqueue(f, std::slice::from_ref(&m)).await?;
        f.store().claim("r", 10, LEASE).await?;
        f.store().release("other", &[m.id()]).await?;
        ensure!(
            f.store().status().await?.in_flight == 1,
            "released another relay's claim"
        );
        f.store().release("r", &[m.id()]).await?;
        let again = f.store().claim("r", 10, LEASE).await?;
        ensure!(again.len() == 1 && again[0].attempts == 1, "{again:?}");
        Ok(())
    }

    pub async fn status_counts_each_state(f: &dyn Fixture) -> R {
        let msgs: Vec<_> = (0..4).map(|n| msg("t", n)).collect();
        enqueue(f, &msgs).await?;
        let store = f.store();
        let s = store.status().await?;
        ensure!(
            s.pending == 4 && s.oldest_pending_age_seconds.is_some_and(|a| a >= 0.0),
            "{s:?}"
        );
        let c = store.claim("r", 3, LEASE).await?;
        store
            .ack(&[c[0].id], Retention::Keep(Duration::from_secs(60)))
            .await?;
        store
            .fail(
                "r",
                &[outbox_core::Failure {
                    id: c[1].id,
                    error: "x".into(),
                    retry_in: None,
                }],
            )
            .await?;
        let s = store.status().await?;
        ensure!(
            (s.pending, s.in_flight, s.delivered, s.dead) == (1, 1, 1, 1),
            "{s:?}"
        );
        Ok(())
    }

    /// The per-topic backlog of the metrics: the same counts as `status`, split by topic,
    /// and the age of each topic's own oldest pending message.
    pub async fn backlog_counts_each_topic_and_state(f: &dyn Fixture) -> R {
        let store = f.store();
        ensure!(store.backlog().await?.is_empty());
        enqueue(f, &[msg("a", 0), msg("a", 1), msg("a", 2)]).await?;
        // `b` is enqueued later, so its oldest pending message is no older than `a`'s.
        enqueue(f, &[msg("b", 0), msg("b", 1)]).await?;
        let c = store.claim("r", 2, LEASE).await?;
        ensure!(c.iter().all(|m| m.topic == "a"), "claimed out of order");
        store
            .ack(&[c[0].id], Retention::Keep(Duration::from_secs(60)))
            .await?;
        store
            .fail(
                "r",
                &[outbox_core::Failure {
                    id: c[1].id,
                    error: "x".into(),
                    retry_in: None,
                }],
            )
            .await?;
        let b = store.backlog().await?;
        ensure!(
            b.len() == 2 && b[0].topic == "a" && b[1].topic == "b",
            "{b:?}"
        );
        let counts = |t: &outbox_core::TopicBacklog| (t.pending, t.in_flight, t.delivered, t.dead);
        ensure!(counts(&b[0]) == (1, 0, 1, 1), "{b:?}");
        ensure!(counts(&b[1]) == (2, 0, 0, 0), "{b:?}");
        let (age_a, age_b) = (
            b[0].oldest_pending_age_seconds,
            b[1].oldest_pending_age_seconds,
        );
        ensure!(
            matches!((age_a, age_b), (Some(a), Some(b)) if b >= 0.0 && a >= b),
            "{b:?}"
        );
        // A topic with nothing pending has no oldest pending age, and the totals agree.
        store.claim("r", 10, LEASE).await?;
        let b = store.backlog().await?;
        ensure!(
            b.iter().all(|t| t.oldest_pending_age_seconds.is_none()),
            "{b:?}"
        );
        let s = store.status().await?;
        let sum = |f: fn(&outbox_core::TopicBacklog) -> i64| b.iter().map(f).sum::<i64>();
        ensure!(
            (s.pending, s.in_flight, s.delivered, s.dead)
                == (
                    sum(|t| t.pending),
                    sum(|t| t.in_flight),
                    sum(|t| t.delivered),
                    sum(|t| t.dead)
                ),
            "{s:?} {b:?}"
        );
        store.ping().await?;
        Ok(())
    }

    pub async fn shutdown_finishes_the_batches_in_hand(f: &dyn Fixture) -> R {
        let msgs: Vec<_> = (0..10).map(|n| msg("t", n)).collect();
        enqueue(f, &msgs).await?;
        let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (go_tx, go_rx) = tokio::sync::watch::channel(false);
        // Every message of the batch waits until shutdown has been requested, so the batch is
        // still in the sink's hands when the relay learns it must stop.
        let sink = HandlerSink::new(move |_m: Message| {
            let started = started_tx.clone();
            let mut go = go_rx.clone();
            async move {
                let _ = started.send(());
                let _ = go.wait_for(|g| *g).await;
                Ok(())
            }
        });
        let config = drain_config().exit_when_idle(false).batch_size(5);
        let report = Relay::with_config(f.store(), Arc::new(sink), config)
            .run(async move {
                started_rx.recv().await;
                let _ = go_tx.send(true);
            })
            .await;
        ensure!(
            report.delivered >= 5 && report.delivered == report.claimed && report.released == 0,
            "batches in hand were not finished: {report:?}"
        );
        let s = f.store().status().await?;
        ensure!(
            s.in_flight == 0 && s.pending == 10 - report.delivered as i64,
            "{s:?} after {report:?}"
        );
        Ok(())
    }

    pub async fn shutdown_timeout_releases_unfinished_messages(f: &dyn Fixture) -> R {
        let m = msg("t", 1);
        enqueue(f, std::slice::from_ref(&m)).await?;
        let (started_tx, started_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let sink = HandlerSink::new(move |_m: Message| {
            let started = started_tx.clone();
            async move {
                let _ = started.send(());
                std::future::pending::<outbox_core::Delivery>().await
            }
        });
        let config = drain_config()
            .exit_when_idle(false)
            .shutdown_timeout(Duration::from_millis(50));
        let mut started_rx = started_rx;
        let report = Relay::with_config(f.store(), Arc::new(sink), config)
            .run(async move {
                started_rx.recv().await;
            })
            .await;
        ensure!(report.released == 1 && report.delivered == 0, "{report:?}");
        let again = f.store().claim("r", 10, LEASE).await?;
        ensure!(
            again.len() == 1 && again[0].id == m.id() && again[0].attempts == 1,
            "{again:?}"
        );
        Ok(())
    }

    pub async fn idle_relay_is_woken_by_a_commit(f: &dyn Fixture) -> R {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Uuid>();
        let sink = HandlerSink::new(move |m: Message| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(m.id);
                Ok(())
            }
        });
        // Polling alone would take an hour: only a wake-up delivers within the test's bound.
        let config = drain_config()
            .exit_when_idle(false)
            .poll_interval(Duration::from_secs(3600));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let relay = Relay::with_config(f.store(), Arc::new(sink), config);
        let mut state = relay.state();
        let handle = tokio::spawn(relay.run(async move {
            let _ = stop_rx.await;
        }));
        for n in 0..3 {
            // Enqueue only once the relay sleeps, so the wake-up path is what delivers.
            state.wait_for(|s| *s == RelayState::Idle).await?;
            let m = msg("t", n);
            enqueue(f, std::slice::from_ref(&m)).await?;
            let got = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
            ensure!(
                got == Ok(Some(m.id())),
                "message {n} not delivered after commit: {got:?}"
            );
        }
        let _ = stop_tx.send(());
        handle.await?;
        Ok(())
    }

    pub async fn headers_and_payload_round_trip(f: &dyn Fixture) -> R {
        let json = NewMessage::json(
            "t",
            "e",
            &serde_json::json!({"amount": "10.50", "ok": true}),
        )?
        .key("k")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        let bytes = NewMessage::bytes(
            "t",
            "blob",
            "application/octet-stream",
            vec![0u8, 159, 146, 150],
        )?;
        enqueue(f, &[json.clone(), bytes.clone()]).await?;
        let got = f.store().claim("r", 10, LEASE).await?;
        ensure!(got.len() == 2);
        ensure!(got[0].headers == *json.header_map() && got[0].key.as_deref() == Some("k"));
        ensure!(
            got[0].json::<serde_json::Value>()?
                == serde_json::json!({"amount": "10.50", "ok": true})
        );
        ensure!(got[0].message_type == "e" && got[0].partition == json.partition());
        ensure!(
            got[1].payload == bytes.payload() && got[1].content_type == "application/octet-stream"
        );
        Ok(())
    }

    const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn got_header(seen: &[Message], id: Uuid, name: &str) -> bool {
        seen.iter()
            .any(|m| m.id == id && m.headers.contains_key(name))
    }

    /// A message enqueued inside a traced span records the context of the enqueue's `create`
    /// span (a child of the caller's), unless the caller set one; the relay publishes each message under a `publish` span, child of the
    /// stored context and following the messaging conventions, and the sink receives the
    /// publish span's context, not the stored one. A message stored without a context goes
    /// out without one.
    pub async fn trace_context_travels_from_the_enqueueing_span_through_the_publish_span(
        f: &dyn Fixture,
    ) -> R {
        use crate::trace::{attribute, ids, parse_traceparent, spans_of};
        use tracing::Instrument;
        crate::trace::recorder();
        let request = tracing::info_span!("POST /orders");
        let (trace, request_span) = ids(&request);
        ensure!(trace != opentelemetry::trace::TraceId::INVALID);
        let traced = msg("orders", 1);
        let explicit = msg("orders", 2).trace_context(TRACEPARENT, Some("rojo=00f067aa0ba902b7"));
        enqueue(f, &[traced.clone(), explicit.clone()])
            .instrument(request.clone())
            .await?;
        drop(request);
        // Enqueued outside any span: the relay does not start a trace for it.
        let untraced = msg("orders", 3);
        enqueue(f, std::slice::from_ref(&untraced)).await?;
        let seen = drain(f.store(), drain_config()).await.messages();
        ensure!(!got_header(&seen, untraced.id(), "traceparent"));
        let got = |id| seen.iter().find(|m| m.id == id).expect("delivered");
        let (t1, publish1) = parse_traceparent(&got(traced.id()).headers["traceparent"])
            .expect("the sink got a traceparent");
        ensure!(t1 == trace, "the enqueueing span's trace goes on");
        ensure!(
            publish1 != request_span,
            "the sink carries the publish span"
        );
        let stored = explicit.header_map();
        let (t2, publish2) = parse_traceparent(&got(explicit.id()).headers["traceparent"])
            .expect("the sink got a traceparent");
        let (explicit_trace, explicit_span) = parse_traceparent(&stored["traceparent"]).unwrap();
        ensure!(
            t2 == explicit_trace,
            "a caller's traceparent is kept at enqueue"
        );
        ensure!(got(explicit.id()).headers["tracestate"] == "rojo=00f067aa0ba902b7");

        eventually(
            "publish spans are exported",
            Duration::from_secs(10),
            || async {
                spans_of(trace)
                    .iter()
                    .any(|s| s.span_context.span_id() == publish1)
                    && spans_of(explicit_trace)
                        .iter()
                        .any(|s| s.span_context.span_id() == publish2)
            },
        )
        .await;
        let publish = |t, id| {
            spans_of(t)
                .into_iter()
                .find(|s| s.span_context.span_id() == id)
                .unwrap()
        };
        let create = spans_of(trace)
            .into_iter()
            .find(|s| s.name == "create orders")
            .expect("the enqueue has its span");
        ensure!(create.parent_span_id == request_span, "{create:?}");
        ensure!(create.span_kind == opentelemetry::trace::SpanKind::Producer);
        let p1 = publish(trace, publish1);
        ensure!(p1.parent_span_id == create.span_context.span_id(), "{p1:?}");
        ensure!(p1.name == "publish orders", "{}", p1.name);
        ensure!(p1.span_kind == opentelemetry::trace::SpanKind::Producer);
        ensure!(attribute(&p1, "messaging.destination.name").as_deref() == Some("orders"));
        ensure!(attribute(&p1, "messaging.operation").as_deref() == Some("publish"));
        ensure!(attribute(&p1, "messaging.system").as_deref() == Some("handler"));
        let id = traced.id().to_string();
        ensure!(attribute(&p1, "messaging.message.id").as_deref() == Some(id.as_str()));
        let p2 = publish(explicit_trace, publish2);
        ensure!(p2.parent_span_id == explicit_span, "{p2:?}");
        Ok(())
    }

    /// Headers a transport sets itself or cannot carry, and messages over the size limit, are
    /// refused by name at enqueue, alone and in a batch, and nothing of the batch is written.
    pub async fn enqueue_refuses_reserved_headers_and_oversized_messages(f: &dyn Fixture) -> R {
        let refused = |m: NewMessage, expect: &'static str| async move {
            for batch in [vec![m.clone()], vec![msg("t", 1), m]] {
                let mut tx = f.begin().await?;
                let result = tx.enqueue(&batch).await;
                tx.rollback().await?;
                let Err(e) = result else {
                    anyhow::bail!("enqueued a message that should be refused ({expect})");
                };
                let e = format!("{e:#}");
                ensure!(e.contains(expect), "{e:?} does not name {expect:?}");
            }
            anyhow::Ok(())
        };
        for name in [
            "Nats-Msg-Id",
            "nats-rollup",
            "Content-Type",
            "webhook-id",
            "ce-id",
            "Host",
        ] {
            refused(msg("t", 0).header(name, "x"), name).await?;
        }
        for name in ["bad name", "a:b", ""] {
            refused(msg("t", 0).header(name, "x"), "header").await?;
        }
        refused(msg("t", 0).header("x-note", "a\r\nBcc: x"), "x-note").await?;
        refused(
            msg("t", 0).header("traceparent", "00-x-y-01"),
            "traceparent",
        )
        .await?;
        refused(msg("t", 0).header("tracestate", "novalue"), "tracestate").await?;
        let big = NewMessage::bytes("t", "blob", "application/octet-stream", vec![0u8; 2 << 20])?;
        refused(big, "1048576").await?;
        let status = f.store().status().await?;
        ensure!(status.pending == 0, "{status:?}");
        // Ordinary headers still go through.
        enqueue(
            f,
            &[msg("t", 2)
                .header("traceparent", TRACEPARENT)
                .header("x-tenant", "a")],
        )
        .await?;
        Ok(())
    }

    /// A claim takes messages until their payloads would pass the byte budget (always at
    /// least one), so a batch of big messages stays bounded; a key's run is cut, in order.
    pub async fn a_claim_stops_at_its_byte_budget(f: &dyn Fixture) -> R {
        let big = |key: Option<&str>| -> anyhow::Result<NewMessage> {
            let m = NewMessage::bytes("t", "blob", "application/octet-stream", vec![7u8; 10_000])?;
            Ok(match key {
                Some(k) => m.key(k),
                None => m,
            })
        };
        let claim = |budget: usize| ClaimRequest {
            max_bytes: budget,
            ..ClaimRequest::new("r", 10, LEASE)
        };
        let store = f.store();
        let unkeyed = (0..4)
            .map(|_| big(None))
            .collect::<anyhow::Result<Vec<_>>>()?;
        enqueue(f, &unkeyed).await?;
        let got = store.claim_leased(&claim(25_000)).await?;
        let ids: Vec<_> = got.iter().map(|m| m.id).collect();
        ensure!(
            ids == [unkeyed[0].id(), unkeyed[1].id()],
            "{} claimed",
            got.len()
        );
        let one = store.claim_leased(&claim(5_000)).await?;
        ensure!(
            one.len() == 1,
            "a message bigger than the budget must still go alone"
        );
        let rest = store.claim_leased(&claim(usize::MAX)).await?;
        ensure!(rest.len() == 1);
        let done: Vec<_> = [got, one, rest].concat().iter().map(|m| m.id).collect();
        store.ack(&done, Retention::Delete).await?;

        let run = (0..5)
            .map(|_| big(Some("k")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        enqueue(f, &run).await?;
        let got = store.claim_leased(&claim(35_000)).await?;
        let ids: Vec<_> = got.iter().map(|m| m.id).collect();
        let first: Vec<_> = run[..3].iter().map(NewMessage::id).collect();
        ensure!(
            ids == first,
            "the run was not cut in order: {} claimed",
            got.len()
        );
        store.ack(&ids, Retention::Delete).await?;
        // The store's own source (held claims on PostgreSQL) keeps the same budget.
        let source = store.clone().source();
        let batch = source.claim(&claim(15_000)).await?;
        let batch = batch.ok_or_else(|| anyhow::anyhow!("{} claimed nothing", source.name()))?;
        ensure!(batch.messages().len() == 1 && batch.messages()[0].id == run[3].id());
        batch.release().await?;
        Ok(())
    }

    pub async fn inbox_processes_each_message_once_per_consumer(f: &dyn Fixture) -> R {
        let id = Uuid::now_v7();
        let mut tx = f.begin().await?;
        ensure!(
            tx.record("billing", id).await?,
            "first delivery not recorded"
        );
        tx.commit().await?;
        let mut tx = f.begin().await?;
        ensure!(
            !tx.record("billing", id).await?,
            "a redelivery was processed again"
        );
        ensure!(
            tx.record("shipping", id).await?,
            "consumers must not share their inbox"
        );
        tx.commit().await?;
        ensure!(
            f.purge_inbox(Duration::from_secs(3600), 10).await? == 0,
            "purged inside the window"
        );
        ensure!(f.purge_inbox(Duration::ZERO, 10).await? == 2);
        let mut tx = f.begin().await?;
        ensure!(tx.record("billing", id).await?, "a purged id is forgotten");
        tx.rollback().await?;
        Ok(())
    }

    pub async fn inbox_record_rolls_back_with_the_effects(f: &dyn Fixture) -> R {
        let id = Uuid::now_v7();
        let mut tx = f.begin().await?;
        ensure!(tx.record("billing", id).await?);
        tx.rollback().await?; // the effects failed: the redelivery must process it
        let mut tx = f.begin().await?;
        ensure!(
            tx.record("billing", id).await?,
            "a rolled-back record blocked the redelivery"
        );
        tx.commit().await?;
        Ok(())
    }

    pub async fn inbox_racing_redeliveries_process_once(f: &dyn Fixture) -> R {
        let id = Uuid::now_v7();
        let mut first = f.begin().await?;
        ensure!(first.record("billing", id).await?);
        // The second delivery starts while the first is still in its transaction.
        let mut second = f.begin().await?;
        let racing = async move {
            let r = second.record("billing", id).await;
            let _ = second.rollback().await;
            r
        };
        let (committed, second) = tokio::join!(first.commit(), racing);
        committed?;
        ensure!(!second?, "both deliveries were processed");
        Ok(())
    }

    pub async fn migrate_is_idempotent(f: &dyn Fixture) -> R {
        enqueue(f, &[msg("t", 1)]).await?;
        f.store().migrate().await?;
        f.store().migrate().await?;
        ensure!(f.store().status().await?.pending == 1);
        Ok(())
    }
}
