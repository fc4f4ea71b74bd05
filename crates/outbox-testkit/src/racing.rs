//! Writers of one key whose commits land out of `seq` order while a relay delivers the key:
//! for stores whose writers run concurrently (not SQLite, which has one writer at a time).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{HandlerSink, Message, Relay, Sink, Store};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout};
use uuid::Uuid;

use crate::{Fixture, drain_config, msg};

/// Generous bound for anything the test waits for.
const DEADLINE: Duration = Duration::from_secs(30);

/// Which messages are in a sink's hands, per key, across relays; and every overlap seen.
#[derive(Default)]
struct Tracker {
    /// key -> (relay, message id) of the deliveries under way.
    in_delivery: HashMap<String, Vec<(&'static str, Uuid)>>,
    /// One line per delivery that started while its key already had one under way.
    overlaps: Vec<String>,
    /// (relay, message id) of each finished delivery, in the order they finished.
    delivered: Vec<(&'static str, Uuid)>,
}

/// The gate a sink holds one message on: its id, where to say it is in delivery, and the
/// signal that lets it finish.
type Gate = (Uuid, mpsc::UnboundedSender<Uuid>, watch::Receiver<bool>);

/// A handler sink for `relay` that records every delivery in `tracker` and, with a gate,
/// holds the gated message until the gate opens.
fn tracking_sink(
    relay: &'static str,
    tracker: Arc<Mutex<Tracker>>,
    gate: Option<Gate>,
) -> Arc<dyn Sink> {
    Arc::new(HandlerSink::new(move |m: Message| {
        let tracker = tracker.clone();
        let gate = gate.clone();
        async move {
            let key = m.key.clone().unwrap_or_default();
            {
                let mut t = tracker.lock().unwrap();
                let busy = t.in_delivery.entry(key.clone()).or_default();
                if !busy.is_empty() {
                    let line = format!(
                        "{relay} started {} of key {key:?} while {busy:?} was in delivery",
                        m.id
                    );
                    t.overlaps.push(line);
                }
                t.in_delivery
                    .entry(key.clone())
                    .or_default()
                    .push((relay, m.id));
            }
            if let Some((held, started, mut open)) = gate
                && held == m.id
            {
                let _ = started.send(m.id);
                let _ = open.wait_for(|o| *o).await;
            }
            let mut t = tracker.lock().unwrap();
            if let Some(busy) = t.in_delivery.get_mut(&key) {
                busy.retain(|(_, id)| *id != m.id);
            }
            t.delivered.push((relay, m.id));
            Ok(())
        }
    }))
}

/// Waits until nothing is pending or in flight, within the deadline; false if it never happens.
async fn drained(store: &dyn Store) -> anyhow::Result<bool> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = store.status().await?;
        if s.pending == 0 && s.in_flight == 0 {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writer 1 enqueues A (the lower `seq`) and stays open; writer 2 enqueues B with the same key
/// and commits. Relay 1 takes B (A is invisible) and holds it in its sink. Then writer 1
/// commits: A is now the key's oldest message while B is still in delivery. A second relay must
/// not deliver A until B is done, and the key must go out in commit order, B then A.
pub async fn racing_writers_never_put_two_messages_of_a_key_in_delivery(
    f: &dyn Fixture,
) -> anyhow::Result<()> {
    let store = f.store();
    let a = msg("t", 1).key("k");
    let b = msg("t", 2).key("k");

    let mut writer1 = f.begin().await?;
    writer1.enqueue(std::slice::from_ref(&a)).await?;
    let mut writer2 = f.begin().await?;
    writer2.enqueue(std::slice::from_ref(&b)).await?;
    writer2.commit().await?;
    f.committed();

    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let (open_tx, open_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    // One batch in delivery at a time: while B is held, relay 1 claims nothing more itself.
    let config1 = drain_config()
        .relay_id("r1")
        .exit_when_idle(false)
        .in_flight_batches(1);
    let sink1 = tracking_sink("r1", tracker.clone(), Some((b.id(), started_tx, open_rx)));
    let relay1 = Relay::with_config(store.clone(), sink1, config1);
    let relay1 = tokio::spawn(relay1.run(async move {
        let _ = stop_rx.await;
    }));

    let held = timeout(DEADLINE, started_rx.recv()).await;
    assert_eq!(
        held.ok().flatten(),
        Some(b.id()),
        "relay 1 did not take B into delivery"
    );
    writer1.commit().await?;
    f.committed();

    // Relay 2 drains while B is still held in relay 1's sink.
    let config2 = drain_config().relay_id("r2");
    let sink2 = tracking_sink("r2", tracker.clone(), None);
    let relay2 = Relay::with_config(store.clone(), sink2, config2);
    let relay2_done = timeout(DEADLINE, relay2.run(futures::future::pending()))
        .await
        .is_ok();

    // B may finish now; relay 1 then delivers A.
    let _ = open_tx.send(true);
    let all_delivered = drained(store.as_ref()).await?;
    let _ = stop_tx.send(());
    let relay1_stopped = timeout(DEADLINE, relay1).await.is_ok();

    let t = tracker.lock().unwrap();
    assert!(relay2_done, "relay 2 did not drain within {DEADLINE:?}");
    assert!(
        t.overlaps.is_empty(),
        "two messages of key \"k\" in delivery at once (A = {}, B = {}): {:?}",
        a.id(),
        b.id(),
        t.overlaps
    );
    assert!(
        all_delivered,
        "the outbox did not drain within {DEADLINE:?}"
    );
    assert!(relay1_stopped, "relay 1 did not stop");
    let order: Vec<Uuid> = t.delivered.iter().map(|(_, id)| *id).collect();
    assert_eq!(
        order,
        [b.id(), a.id()],
        "key \"k\" must be delivered once each, in commit order B then A: {:?}",
        t.delivered
    );
    Ok(())
}
