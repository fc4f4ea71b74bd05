//! Routing: messages go to the sinks whose pattern matches their type or topic, and a circuit
//! breaker keeps a sink that is down from being hammered or from holding back the others.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::join_all;
use outbox_core::{Circuit, Delivery, Message, Sink, SinkError, one_outcome_each};
use wildmatch::WildMatch;

/// One route: a pattern (`*` and `?` wildcards, as in `payment.*`) over the message type or
/// topic, and the sinks it delivers to.
pub struct Route {
    pattern: WildMatch,
    text: String,
    sinks: Vec<Arc<dyn Sink>>,
}

impl Route {
    /// A route from `pattern` (`*` and `?` wildcards, matched against the message type or the
    /// topic) to `sinks`, which all receive each matching message.
    pub fn new(pattern: &str, sinks: Vec<Arc<dyn Sink>>) -> Self {
        Self {
            pattern: WildMatch::new(pattern),
            text: pattern.to_owned(),
            sinks,
        }
    }

    fn matches(&self, m: &Message) -> bool {
        self.pattern.matches(&m.message_type) || self.pattern.matches(&m.topic)
    }
}

/// A sink and the indexes of the batch's messages it takes.
type Share = (Arc<dyn Sink>, Vec<usize>);

/// Delivers each message to the sinks of the first route that matches it, or of the default
/// route. A message is delivered when every one of its sinks took it; if one failed, it is
/// retried on all of them (at least once, as always). A message no route matches is dead at
/// once with that reason. Sinks run concurrently.
pub struct Router {
    routes: Vec<Route>,
    default: Option<Vec<Arc<dyn Sink>>>,
}

impl Router {
    /// A router trying `routes` in order; messages no route matches go to `default`, or are dead
    /// at once when there is none.
    pub fn new(routes: Vec<Route>, default: Option<Vec<Arc<dyn Sink>>>) -> Self {
        Self { routes, default }
    }

    fn sinks_for(&self, m: &Message) -> Option<&[Arc<dyn Sink>]> {
        self.routes
            .iter()
            .find(|r| r.matches(m))
            .map(|r| r.sinks.as_slice())
            .or(self.default.as_deref())
    }

    /// Every distinct sink with the indexes of the batch's messages it must take. A message
    /// starts without an outcome; only its sinks' reports can make it delivered.
    fn plan(&self, batch: &[Message]) -> (Vec<Share>, Vec<Option<Delivery>>) {
        let mut plan: Vec<Share> = Vec::new();
        let mut out = vec![None; batch.len()];
        for (i, m) in batch.iter().enumerate() {
            let Some(sinks) = self.sinks_for(m) else {
                out[i] = Some(Err(SinkError::permanent(format!(
                    "no route matches type {:?} or topic {:?}",
                    m.message_type, m.topic
                ))));
                continue;
            };
            for sink in sinks {
                match plan.iter_mut().find(|(s, _)| Arc::ptr_eq(s, sink)) {
                    Some((_, idx)) => idx.push(i),
                    None => plan.push((sink.clone(), vec![i])),
                }
            }
        }
        (plan, out)
    }

    /// Route patterns, for logs and `--check`.
    pub fn patterns(&self) -> Vec<&str> {
        self.routes.iter().map(|r| r.text.as_str()).collect()
    }
}

#[async_trait]
impl Sink for Router {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        let (plan, mut out) = self.plan(batch);
        let sends = plan.iter().map(|(sink, idx)| async move {
            // Cheap: a message's payload is shared between its copies, not copied.
            let part: Vec<Message> = idx.iter().map(|&i| batch[i].clone()).collect();
            one_outcome_each(sink.name(), part.len(), sink.publish(&part).await)
        });
        for ((_, idx), results) in plan.iter().zip(join_all(sends).await) {
            for (&i, r) in idx.iter().zip(results) {
                // The first error of a message's sinks is the one it keeps.
                if !matches!(out[i], Some(Err(_))) {
                    out[i] = Some(r);
                }
            }
        }
        // A message that no sink reported on (a route without sinks) was delivered nowhere.
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(SinkError::permanent("its route has no sinks"))))
            .collect()
    }

    fn name(&self) -> &str {
        "router"
    }

    /// The circuits of every distinct sink, each once even when several routes share it.
    fn circuits(&self) -> Vec<Circuit> {
        let mut seen: Vec<&Arc<dyn Sink>> = Vec::new();
        let all = self.routes.iter().flat_map(|r| &r.sinks);
        for sink in all.chain(self.default.iter().flatten()) {
            if !seen.iter().any(|s| Arc::ptr_eq(s, sink)) {
                seen.push(sink);
            }
        }
        seen.iter().flat_map(|s| s.circuits()).collect()
    }
}

/// Wraps a sink: after `threshold` batches in a row failed entirely, the sink is not called for
/// `cooldown`; its messages fail at once as transient (the relay backs them off), then one
/// batch probes it.
pub struct Breaker<S> {
    inner: S,
    threshold: u32,
    cooldown: Duration,
    state: Mutex<(u32, Option<Instant>)>,
}

impl<S: Sink> Breaker<S> {
    /// Wraps `inner`: `threshold` batches in a row that fail entirely (at least 1) open the
    /// breaker for `cooldown`.
    pub fn new(inner: S, threshold: u32, cooldown: Duration) -> Self {
        Self {
            inner,
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new((0, None)),
        }
    }

    fn open(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.1.is_some_and(|until| Instant::now() < until)
    }

    fn record(&self, all_failed: bool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if all_failed {
            state.0 += 1;
            if state.0 >= self.threshold {
                if state.1.is_none() {
                    tracing::warn!(sink = self.inner.name(), "sink keeps failing; pausing it");
                }
                state.1 = Some(Instant::now() + self.cooldown);
            }
        } else {
            if state.1.is_some() {
                tracing::info!(sink = self.inner.name(), "sink answers again");
            }
            *state = (0, None);
        }
    }
}

#[async_trait]
impl<S: Sink> Sink for Breaker<S> {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        if self.open() {
            let err = SinkError::transient(format!(
                "{} sink paused after repeated failures",
                self.inner.name()
            ));
            return vec![Err(err); batch.len()];
        }
        let out = self.inner.publish(batch).await;
        self.record(!out.is_empty() && out.iter().all(Result::is_err));
        out
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn circuits(&self) -> Vec<Circuit> {
        let (failures, _) = *self.state.lock().unwrap_or_else(|p| p.into_inner());
        vec![Circuit {
            sink: self.inner.name().to_owned(),
            open: self.open(),
            failures,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use outbox_core::{HandlerSink, Status};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn msg(topic: &str, kind: &str) -> Message {
        Message {
            id: uuid::Uuid::now_v7(),
            seq: 0,
            topic: topic.into(),
            message_type: kind.into(),
            key: None,
            partition: 0,
            payload: "{}".into(),
            content_type: outbox_core::JSON.into(),
            headers: Default::default(),
            created_at: Utc::now(),
            available_at: Utc::now(),
            attempts: 1,
            last_error: None,
            status: Status::InFlight,
        }
    }

    fn recording(
        name: &'static str,
        log: Arc<Mutex<Vec<(String, &'static str)>>>,
        fail: bool,
    ) -> Arc<dyn Sink> {
        Arc::new(HandlerSink::new(move |m: Message| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push((m.message_type.clone(), name));
                if fail {
                    Err(SinkError::transient("down"))
                } else {
                    Ok(())
                }
            }
        }))
    }

    #[tokio::test]
    async fn messages_follow_the_first_matching_route_or_the_default() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (a, b, c) = (
            recording("a", log.clone(), false),
            recording("b", log.clone(), false),
            recording("c", log.clone(), false),
        );
        let router = Router::new(
            vec![
                Route::new("payment.*", vec![a.clone(), b]),
                Route::new("orders", vec![a]),
            ],
            Some(vec![c]),
        );
        let out = router
            .publish(&[
                msg("x", "payment.paid"),
                msg("orders", "order.created"),
                msg("y", "user.joined"),
            ])
            .await;
        assert!(out.iter().all(Result::is_ok), "{out:?}");
        let mut got = log.lock().unwrap().clone();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("order.created".into(), "a"),
                ("payment.paid".into(), "a"),
                ("payment.paid".into(), "b"),
                ("user.joined".into(), "c"),
            ]
        );
    }

    #[tokio::test]
    async fn unrouted_messages_are_dead_and_a_failing_sink_fails_only_its_messages() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let router = Router::new(
            vec![
                Route::new("good.*", vec![recording("ok", log.clone(), false)]),
                Route::new("bad.*", vec![recording("down", log, true)]),
            ],
            None,
        );
        let out = router
            .publish(&[msg("t", "good.1"), msg("t", "bad.1"), msg("t", "other")])
            .await;
        assert!(out[0].is_ok());
        assert!(!out[1].as_ref().unwrap_err().is_permanent());
        let e = out[2].as_ref().unwrap_err();
        assert!(
            e.is_permanent() && e.to_string().contains("no route matches"),
            "{e}"
        );
    }

    /// A sink that breaks its contract by returning `n` outcomes whatever the batch.
    struct Returns(usize);

    #[async_trait]
    impl Sink for Returns {
        async fn publish(&self, _batch: &[Message]) -> Vec<Delivery> {
            vec![Ok(()); self.0]
        }
        fn name(&self) -> &str {
            "miscounting"
        }
    }

    #[tokio::test]
    async fn an_outcome_a_sink_never_returned_is_a_failure_never_an_ack() {
        for n in [0, 1, 3] {
            let router = Router::new(vec![Route::new("*", vec![Arc::new(Returns(n))])], None);
            let out = router.publish(&[msg("t", "a"), msg("t", "b")]).await;
            assert!(
                out.iter().all(Result::is_err),
                "{n} outcomes for 2 messages acked some: {out:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_route_without_sinks_acks_nothing() {
        let router = Router::new(vec![Route::new("*", Vec::new())], None);
        let out = router.publish(&[msg("t", "a")]).await;
        assert!(out[0].is_err(), "{out:?}");
    }

    #[tokio::test]
    async fn a_breaker_stops_calling_a_sink_that_keeps_failing() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let failing = HandlerSink::new(move |_m: Message| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err(SinkError::transient("refused")) }
        });
        let breaker = Breaker::new(failing, 2, Duration::from_secs(3600));
        for _ in 0..5 {
            breaker.publish(&[msg("t", "e")]).await;
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the open breaker still called the sink"
        );
        let out = breaker.publish(&[msg("t", "e")]).await;
        assert!(out[0].as_ref().unwrap_err().to_string().contains("paused"));
    }

    #[tokio::test]
    async fn a_router_reports_each_of_its_breakers_once() {
        let failing = HandlerSink::new(|_m: Message| async { Err(SinkError::transient("no")) });
        let fine = HandlerSink::new(|_m: Message| async { Ok(()) });
        let bad: Arc<dyn Sink> = Arc::new(Breaker::new(failing, 1, Duration::from_secs(3600)));
        let good: Arc<dyn Sink> = Arc::new(Breaker::new(fine, 1, Duration::from_secs(3600)));
        let router = Router::new(
            vec![
                Route::new("a", vec![bad.clone()]),
                Route::new("b", vec![bad.clone(), good.clone()]),
            ],
            Some(vec![good]),
        );
        router.publish(&[msg("a", "a")]).await;
        let circuits = router.circuits();
        assert_eq!(circuits.len(), 2, "{circuits:?}");
        assert!(
            circuits[0].open && circuits[0].failures == 1,
            "{circuits:?}"
        );
        assert!(
            !circuits[1].open && circuits[1].failures == 0,
            "{circuits:?}"
        );
    }
}
