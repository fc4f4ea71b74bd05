//! Conformance tests of what breaks order and retries at the edges: hot keys, relays joining and
//! dying during a drain, a sink slower than the lease, and a message that kills its relay.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::ensure;
use outbox_core::{HandlerSink, Message, NewMessage, Relay, RelayConfig, RetryPolicy, Sink};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use crate::{Fixture, Recorder, drain_config, enqueue, msg};

type R = anyhow::Result<()>;

/// Watches every delivery of every relay: a key delivered by two sinks at once, and the order
/// in which each message was delivered for the first time.
#[derive(Clone, Default)]
pub struct OrderCheck {
    state: Arc<Mutex<OrderState>>,
    progress: Arc<Notify>,
}

/// Ends a delivery when dropped, whether it finished or its relay died.
struct Done<'a>(&'a OrderCheck, &'a Message);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.end(self.1);
    }
}

#[derive(Default)]
struct OrderState {
    busy: HashSet<String>,
    overlaps: Vec<String>,
    first: Vec<Uuid>,
    seen: HashSet<Uuid>,
}

impl OrderCheck {
    /// A sink that records into this check and yields while "delivering", so that a second
    /// delivery of the same key would overlap.
    pub fn sink(&self) -> Arc<dyn Sink> {
        self.sink_taking(Duration::ZERO).0
    }

    /// Like [`OrderCheck::sink`], taking `pause` a message (a yield when zero), with a count of
    /// what this sink delivered.
    fn sink_taking(&self, pause: Duration) -> (Arc<dyn Sink>, Arc<Mutex<usize>>) {
        let (check, count) = (self.clone(), Arc::new(Mutex::new(0)));
        let counted = count.clone();
        let sink = HandlerSink::new(move |m: Message| {
            let (check, counted) = (check.clone(), counted.clone());
            async move {
                check.begin(&m);
                // A relay that dies mid-delivery drops this future: the key is free again.
                let _done = Done(&check, &m);
                if pause.is_zero() {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(pause).await;
                }
                *counted.lock().unwrap() += 1;
                Ok(())
            }
        });
        (Arc::new(sink), count)
    }

    fn begin(&self, m: &Message) {
        let mut s = self.state.lock().unwrap();
        if let Some(k) = &m.key
            && !s.busy.insert(k.clone())
        {
            s.overlaps
                .push(format!("key {k} delivered twice at once (seq {})", m.seq));
        }
        if s.seen.insert(m.id) {
            s.first.push(m.id);
        }
    }

    fn end(&self, m: &Message) {
        if let Some(k) = &m.key {
            self.state.lock().unwrap().busy.remove(k);
        }
        self.progress.notify_waiters();
    }

    /// Distinct messages delivered so far.
    pub fn delivered(&self) -> usize {
        self.state.lock().unwrap().seen.len()
    }

    /// Waits until at least `n` distinct messages were delivered.
    pub async fn reached(&self, n: usize, within: Duration) -> R {
        let deadline = Instant::now() + within;
        while self.delivered() < n {
            let notified = self.progress.notified();
            if self.delivered() >= n {
                break;
            }
            ensure!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "only {} of {n} delivered within {within:?}",
                self.delivered()
            );
        }
        Ok(())
    }

    /// Everything in `all` was delivered, no key twice at once, and each key's first
    /// deliveries in enqueue order.
    pub fn verify(&self, all: &[NewMessage]) -> R {
        let s = self.state.lock().unwrap();
        ensure!(s.overlaps.is_empty(), "{:?}", s.overlaps);
        let position: HashMap<Uuid, usize> =
            s.first.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let missing = all
            .iter()
            .filter(|m| !position.contains_key(&m.id()))
            .count();
        ensure!(missing == 0, "{missing} of {} never delivered", all.len());
        let mut last: HashMap<&str, usize> = HashMap::new();
        for m in all {
            let Some(k) = m.key_ref() else { continue };
            let at = position[&m.id()];
            if let Some(before) = last.insert(k, at) {
                ensure!(
                    before < at,
                    "key {k}: a message went out before an older one"
                );
            }
        }
        Ok(())
    }
}

/// A relay running in a task until `stop` is notified, or aborted (a crash).
fn spawn_relay(
    f: &dyn Fixture,
    sink: Arc<dyn Sink>,
    config: RelayConfig,
) -> (JoinHandle<()>, Arc<Notify>) {
    let stop = Arc::new(Notify::new());
    let s = stop.clone();
    let relay = Relay::with_config(f.store(), sink, config);
    let handle = tokio::spawn(async move {
        relay.run(async move { s.notified().await }).await;
    });
    (handle, stop)
}

fn live(relay_id: &str) -> RelayConfig {
    drain_config()
        .relay_id(relay_id)
        .exit_when_idle(false)
        .batch_size(25)
        .lease(Duration::from_secs(2))
        .poll_interval(Duration::from_millis(20))
        .rebalance_interval(Duration::from_millis(50))
        .recover_interval(Duration::from_millis(50))
}

/// Waits for `check` to hold, testing it every 20 ms.
async fn eventually<F, Fut>(within: Duration, what: &str, check: F) -> R
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + within;
    while !check().await? {
        ensure!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub async fn hot_keys_go_out_in_runs_and_in_order(f: &dyn Fixture) -> R {
    // 500 messages on one key, two on each of ten others.
    let mut all: Vec<_> = (0..500u64).map(|n| msg("t", n).key("hot")).collect();
    for n in 0..20u64 {
        all.insert(
            n as usize * 20,
            msg("t", 1000 + n).key(format!("k{}", n % 10)),
        );
    }
    enqueue(f, &all).await?;
    // One claim moves a run of the hot key, not one message of it, next to the other keys.
    let claimed = f
        .store()
        .claim("probe", 100, Duration::from_secs(30))
        .await?;
    let hot: Vec<i64> = claimed
        .iter()
        .filter(|m| m.key.as_deref() == Some("hot"))
        .map(|m| m.seq)
        .collect();
    ensure!(
        claimed.len() == 100,
        "a claim of 100 took {}",
        claimed.len()
    );
    ensure!(
        hot.len() >= 70,
        "a claim of 100 took {} hot messages",
        hot.len()
    );
    ensure!(
        hot.windows(2).all(|w| w[0] < w[1]),
        "the run is out of order"
    );
    let ids: Vec<Uuid> = claimed.iter().map(|m| m.id).collect();
    f.store().release("probe", &ids).await?;
    let check = OrderCheck::default();
    let config = drain_config().batch_size(100);
    Relay::with_config(f.store(), check.sink(), config)
        .run(futures::future::pending())
        .await;
    check.verify(&all)?;
    ensure!(f.store().status().await?.pending == 0);
    Ok(())
}

pub async fn relays_joining_and_dying_keep_each_key_in_order(f: &dyn Fixture) -> R {
    let all: Vec<_> = (0..1500u64)
        .map(|n| match n % 5 {
            0 => msg("t", n),
            _ => msg("t", n).key(format!("k{}", n % 30)),
        })
        .collect();
    enqueue(f, &all).await?;
    let check = OrderCheck::default();
    let within = Duration::from_secs(60);
    let (a, _) = spawn_relay(f, check.sink(), live("a"));
    check.reached(200, within).await?;
    let (b, stop_b) = spawn_relay(f, check.sink(), live("b"));
    let (c, stop_c) = spawn_relay(f, check.sink(), live("c"));
    check.reached(600, within).await?;
    // "a" dies in the middle of its deliveries: its claims come back to the others.
    a.abort();
    let _ = a.await;
    check.reached(1000, within).await?;
    stop_c.notify_one();
    c.await?;
    let (d, stop_d) = spawn_relay(f, check.sink(), live("d"));
    check.reached(all.len(), within).await?;
    // What "a" delivered but never acked is still pending: the live relays deliver it again
    // (a duplicate, after its attempt is counted) before they stop.
    let store = f.store();
    eventually(within, "the outbox did not empty", || {
        let store = store.clone();
        async move { Ok(store.status().await?.pending == 0) }
    })
    .await?;
    for (relay, stop) in [(b, stop_b), (d, stop_d)] {
        stop.notify_one();
        relay.await?;
    }
    check.verify(&all)
}

pub async fn a_sink_slower_than_the_lease_counts_attempts_and_goes_dead(f: &dyn Fixture) -> R {
    let m = msg("t", 1).key("k");
    enqueue(f, std::slice::from_ref(&m)).await?;
    let calls = Arc::new(Mutex::new(0));
    let c = calls.clone();
    let sink = HandlerSink::new(move |_m: Message| {
        let c = c.clone();
        async move {
            *c.lock().unwrap() += 1;
            std::future::pending::<outbox_core::Delivery>().await
        }
    });
    let config = live("slow").lease(Duration::from_millis(600));
    let (relay, stop) = spawn_relay(f, Arc::new(sink), config);
    let store = f.store();
    eventually(
        Duration::from_secs(30),
        "the message did not go dead",
        || {
            let store = store.clone();
            async move { Ok(!store.dead_list(10).await?.is_empty()) }
        },
    )
    .await?;
    stop.notify_one();
    relay.await?;
    let dead = f.store().dead_list(10).await?;
    ensure!(dead.len() == 1 && dead[0].attempts == 3, "{dead:?}");
    let error = dead[0].last_error.as_deref().unwrap_or_default();
    ensure!(error.contains("did not finish"), "{error}");
    ensure!(
        *calls.lock().unwrap() == 3,
        "sink called {} times",
        calls.lock().unwrap()
    );
    Ok(())
}

pub async fn a_message_that_kills_its_relay_goes_dead_alone(f: &dyn Fixture) -> R {
    let mut all: Vec<_> = (0..20u64).map(|n| msg("t", n)).collect();
    let poison = msg("t", 99).key("p");
    all.insert(10, poison.clone());
    enqueue(f, &all).await?;
    let innocents: HashSet<Uuid> = all
        .iter()
        .map(NewMessage::id)
        .filter(|id| *id != poison.id())
        .collect();
    let rec = Recorder::default();
    let max_attempts = 3;
    let mut crashes = 0;
    for _ in 0..10 {
        let hit = Arc::new(Notify::new());
        let (r, h, poison_id) = (rec.clone(), hit.clone(), poison.id());
        let sink = HandlerSink::new(move |m: Message| {
            let (r, h) = (r.clone(), h.clone());
            async move {
                if m.id == poison_id {
                    // The process "dies" here: the test aborts the relay mid-delivery.
                    h.notify_one();
                    return std::future::pending().await;
                }
                r.push(m);
                Ok(())
            }
        });
        let config = live("victim").retry(
            RetryPolicy::default()
                .max_attempts(max_attempts)
                .base_delay(Duration::ZERO)
                .max_delay(Duration::ZERO),
        );
        let (relay, stop) = spawn_relay(f, Arc::new(sink), config);
        let store = f.store();
        let done = async {
            eventually(Duration::from_secs(30), "no crash and no end", || {
                let (store, rec) = (store.clone(), rec.clone());
                let innocents = &innocents;
                async move {
                    let got: HashSet<Uuid> = rec.ids().into_iter().collect();
                    Ok(innocents.is_subset(&got) && !store.dead_list(10).await?.is_empty())
                }
            })
            .await
        };
        tokio::select! {
            _ = hit.notified() => {
                relay.abort();
                let _ = relay.await;
                crashes += 1;
            }
            finished = done => {
                finished?;
                stop.notify_one();
                relay.await?;
                break;
            }
        }
    }
    let dead = f.store().dead_list(10).await?;
    ensure!(
        dead.len() == 1 && dead[0].id == poison.id(),
        "dead after {crashes} crashes: {dead:?}"
    );
    // Each crash counts once; a crash may come before the previous one was counted when the
    // dead relay's transaction ends late (an aborted task's connection rolls back lazily, where
    // a killed process's ends at once), hence one more at most.
    ensure!(
        (max_attempts..=max_attempts + 1).contains(&crashes),
        "{crashes} crashes for max_attempts {max_attempts}"
    );
    let got: HashSet<Uuid> = rec.ids().into_iter().collect();
    ensure!(innocents.is_subset(&got), "innocent messages were lost");
    Ok(())
}

/// A relay started while another drains a backlog that was there before either of them (so no
/// commit wakes it) takes its share of the keys as soon as the first one gives it up: it does
/// not sit out its poll interval, and the first relay learns of it within its rebalance
/// interval. Both poll only once a minute here.
pub async fn a_relay_joining_a_drain_takes_its_share_at_once(f: &dyn Fixture) -> R {
    let all: Vec<_> = (0..1000u64)
        .map(|n| msg("t", n).key(format!("k{}", n % 200)))
        .collect();
    enqueue(f, &all).await?;
    let check = OrderCheck::default();
    let config = |id: &str| {
        live(id)
            .batch_size(10)
            .poll_interval(Duration::from_secs(60))
            .rebalance_interval(RelayConfig::default().rebalance_interval)
    };
    let pause = Duration::from_millis(2);
    let (a_sink, _) = check.sink_taking(pause);
    let (a, stop_a) = spawn_relay(f, a_sink, config("a"));
    check.reached(20, Duration::from_secs(30)).await?;
    let (b_sink, by_b) = check.sink_taking(pause);
    let (b, stop_b) = spawn_relay(f, b_sink, config("b"));
    // "a" alone needs about a hundred batches of ten for the rest, each at least 2 ms in its
    // sink and a claim and a commit: ample time to learn of "b" (within 100 ms).
    check.reached(all.len(), Duration::from_secs(30)).await?;
    for (relay, stop) in [(a, stop_a), (b, stop_b)] {
        stop.notify_one();
        relay.await?;
    }
    check.verify(&all)?;
    let by_b = *by_b.lock().unwrap();
    ensure!(by_b > 0, "the relay that joined delivered nothing");
    Ok(())
}
