//! The operators' capabilities of a [`Store`]: dead letters found by filter and page, retried
//! and purged by selection, relays' heartbeats, and topics paused and resumed.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::ensure;
use outbox_core::{DeadFilter, Failure, NewMessage, Relay, RelayState, Store};
use uuid::Uuid;

use crate::{Fixture, drain_config, enqueue, eventually, msg};

type R = anyhow::Result<()>;
const LEASE: Duration = Duration::from_secs(30);

/// Claims everything claimable and fails each message for good with `error(message)`.
async fn kill_all(store: &dyn Store, error: impl Fn(&outbox_core::Message) -> String) -> R {
    let claimed = store.claim("r", 100, LEASE).await?;
    let failures: Vec<_> = claimed
        .iter()
        .map(|m| Failure {
            id: m.id,
            error: error(m),
            retry_in: None,
        })
        .collect();
    store.fail("r", &failures).await?;
    Ok(())
}

fn typed(topic: &str, kind: &str, key: &str, n: u64) -> NewMessage {
    NewMessage::json(topic, kind, &serde_json::json!({ "n": n }))
        .expect("valid message")
        .key(key)
        .header("h", n.to_string())
}

fn ids(page: &[outbox_core::Message]) -> Vec<Uuid> {
    page.iter().map(|m| m.id).collect()
}

pub async fn dead_letters_are_filtered_and_paged(f: &dyn Fixture) -> R {
    // Six dead letters: two topics, two types, keys k0..k2, errors that differ in case.
    let msgs: Vec<_> = (0..6)
        .map(|n| {
            let topic = if n % 2 == 0 { "orders" } else { "mail" };
            let kind = if n < 3 { "created" } else { "paid" };
            typed(topic, kind, &format!("k{}", n % 3), n)
        })
        .collect();
    enqueue(f, &msgs).await?;
    let store = f.store();
    kill_all(store.as_ref(), |m| {
        let n = m.json::<serde_json::Value>().unwrap()["n"]
            .as_u64()
            .unwrap();
        if n % 3 == 0 {
            "HTTP 503 Service Unavailable".into()
        } else {
            "refused: 100% of 50_ chars".into()
        }
    })
    .await?;
    let all = store.dead_page(&DeadFilter::default(), None, 100).await?;
    let want: Vec<Uuid> = {
        let mut v: Vec<_> = msgs.iter().map(NewMessage::id).collect();
        v.sort();
        v
    };
    ensure!(
        ids(&all) == want,
        "unfiltered list is not every dead letter by id"
    );

    let by = |f: DeadFilter| {
        let store = store.clone();
        async move { store.dead_page(&f, None, 100).await.map(|p| ids(&p)) }
    };
    let topic = by(DeadFilter {
        topic: Some("orders".into()),
        ..DeadFilter::default()
    })
    .await?;
    ensure!(topic.len() == 3, "topic filter: {topic:?}");
    let kind_key = by(DeadFilter {
        message_type: Some("paid".into()),
        key: Some("k0".into()),
        ..DeadFilter::default()
    })
    .await?;
    ensure!(kind_key == [msgs[3].id()], "type+key filter: {kind_key:?}");
    let error = by(DeadFilter {
        error: Some("service unavailable".into()),
        ..DeadFilter::default()
    })
    .await?;
    ensure!(
        error.len() == 2,
        "error substring is case-insensitive: {error:?}"
    );
    // LIKE's wildcards in the filter are plain characters.
    let literal = by(DeadFilter {
        error: Some("100% of 50_".into()),
        ..DeadFilter::default()
    })
    .await?;
    ensure!(literal.len() == 4, "error with % and _: {literal:?}");
    let wildcard = by(DeadFilter {
        error: Some("1_0".into()),
        ..DeadFilter::default()
    })
    .await?;
    ensure!(wildcard.is_empty(), "_ matched as a wildcard: {wildcard:?}");
    let none = by(DeadFilter {
        older_than: Some(Duration::from_secs(3600)),
        ..DeadFilter::default()
    })
    .await?;
    ensure!(none.is_empty(), "young dead letters listed as old");

    // Keyset pages: each starts after the last id of the previous one, and together they are
    // the whole list once, even when a listed message is purged between pages.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.dead_page(&DeadFilter::default(), after, 4).await?;
        ensure!(page.len() <= 4);
        if page.is_empty() {
            break;
        }
        after = page.last().map(|m| m.id);
        if seen.is_empty() {
            store
                .dead_purge_where(&DeadFilter::ids(vec![page[3].id]))
                .await?;
        }
        seen.extend(ids(&page));
    }
    ensure!(seen == want, "pages: {seen:?}");

    let one = store.get_message(msgs[1].id()).await?;
    let one = one.ok_or_else(|| anyhow::anyhow!("dead letter not found by id"))?;
    ensure!(one.headers.get("h").map(String::as_str) == Some("1"));
    ensure!(one.payload_value() == serde_json::json!({ "n": 1 }));
    ensure!(one.status == outbox_core::Status::Dead);
    ensure!(store.get_message(Uuid::now_v7()).await?.is_none());
    Ok(())
}

pub async fn dead_letters_are_retried_and_purged_by_selection(f: &dyn Fixture) -> R {
    let msgs: Vec<_> = (0..6)
        .map(|n| typed(if n < 4 { "a" } else { "b" }, "e", &format!("k{n}"), n))
        .collect();
    enqueue(f, &msgs).await?;
    let store = f.store();
    kill_all(store.as_ref(), |_| "boom".into()).await?;
    // A selection of ids: only dead ones count, an unknown id is ignored.
    let some = DeadFilter::ids(vec![msgs[0].id(), msgs[1].id(), Uuid::now_v7()]);
    ensure!(store.dead_retry_where(&some).await? == 2);
    let pending: HashSet<Uuid> = ids(&store.claim("r", 10, LEASE).await?)
        .into_iter()
        .collect();
    ensure!(
        pending == HashSet::from([msgs[0].id(), msgs[1].id()]),
        "{pending:?}"
    );
    // Everything matching a filter.
    let topic_b = DeadFilter {
        topic: Some("b".into()),
        ..DeadFilter::default()
    };
    ensure!(store.dead_retry_where(&topic_b).await? == 2);
    ensure!(store.status().await?.dead == 2);
    // Purge: older than an hour spares them, a topic picks them.
    let old = DeadFilter {
        older_than: Some(Duration::from_secs(3600)),
        ..DeadFilter::default()
    };
    ensure!(store.dead_purge_where(&old).await? == 0);
    let wrong = DeadFilter {
        topic: Some("b".into()),
        ..DeadFilter::default()
    };
    ensure!(
        store.dead_purge_where(&wrong).await? == 0,
        "purged pending messages"
    );
    ensure!(
        store
            .dead_purge_where(&DeadFilter::ids(vec![msgs[2].id()]))
            .await?
            == 1
    );
    ensure!(store.dead_purge_where(&DeadFilter::default()).await? == 1);
    let s = store.status().await?;
    ensure!(s.dead == 0 && s.pending == 2 && s.in_flight == 2, "{s:?}");
    Ok(())
}

pub async fn relays_report_their_state_until_they_stop(f: &dyn Fixture) -> R {
    let store = f.store();
    let config = drain_config().exit_when_idle(false).relay_id("watched");
    let relay = Relay::with_config(
        store.clone(),
        std::sync::Arc::new(outbox_core::HandlerSink::new(|_| async { Ok(()) })),
        config,
    );
    let id = relay.id().to_owned();
    let mut state = relay.state();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async {
        let _ = stopped.await;
    }));
    state.wait_for(|s| *s == RelayState::Idle).await?;
    let seen = |want: &'static str| {
        let (store, id) = (store.clone(), id.clone());
        async move {
            store
                .relays(Duration::from_secs(60))
                .await
                .is_ok_and(|r| r.iter().any(|r| r.id == id && r.state == want))
        }
    };
    eventually("relay listed as idle", Duration::from_secs(10), || {
        seen("idle")
    })
    .await;
    let listed = store.relays(Duration::from_secs(60)).await?;
    let me = listed.iter().find(|r| r.id == id).expect("listed");
    ensure!(me.age_seconds < 30.0, "{me:?}");
    let _ = stop.send(());
    running.await?;
    ensure!(
        seen("stopped").await,
        "a stopped relay is not shown as stopped"
    );
    Ok(())
}

pub async fn paused_topics_are_not_claimed_until_resumed(f: &dyn Fixture) -> R {
    let store = f.store();
    ensure!(store.pause_topic("held").await?, "pause reported no change");
    ensure!(!store.pause_topic("held").await?, "paused twice");
    ensure!(store.paused_topics().await? == ["held"]);
    let k1_paused = msg("held", 1).key("k1");
    let k1_open = msg("open", 2).key("k1");
    let unkeyed_paused = msg("held", 3);
    let unkeyed_open = msg("open", 4);
    let k2_open = msg("open", 5).key("k2");
    let k2_paused = msg("held", 6).key("k2");
    let k2_after = msg("open", 7).key("k2");
    let all = [
        &k1_paused,
        &k1_open,
        &unkeyed_paused,
        &unkeyed_open,
        &k2_open,
        &k2_paused,
        &k2_after,
    ];
    enqueue(f, &all.map(Clone::clone)).await?;
    let got = ids(&store.claim("r", 50, LEASE).await?);
    // k1 waits behind its paused head; k2's run stops before its paused message.
    ensure!(
        got == [unkeyed_open.id(), k2_open.id()],
        "claimed while paused: {got:?}"
    );
    store.ack(&got, outbox_core::Retention::Delete).await?;
    ensure!(
        store.claim("r", 50, LEASE).await?.is_empty(),
        "paused topic claimed"
    );
    ensure!(!store.resume_topic("other").await?);
    ensure!(store.resume_topic("held").await?);
    ensure!(store.paused_topics().await?.is_empty());
    let got: HashSet<Uuid> = ids(&store.claim("r", 50, LEASE).await?)
        .into_iter()
        .collect();
    let want: HashSet<Uuid> = [&k1_paused, &k1_open, &unkeyed_paused, &k2_paused, &k2_after]
        .iter()
        .map(|m| m.id())
        .collect();
    ensure!(got == want, "after resume: {got:?}");
    Ok(())
}

pub async fn resuming_a_topic_wakes_an_idle_relay(f: &dyn Fixture) -> R {
    let store = f.store();
    store.pause_topic("held").await?;
    enqueue(f, &[msg("held", 1)]).await?;
    let rec = crate::Recorder::default();
    let r = rec.clone();
    let sink = outbox_core::HandlerSink::new(move |m| {
        let r = r.clone();
        async move {
            r.push(m);
            Ok(())
        }
    });
    let config = drain_config()
        .exit_when_idle(false)
        // Only a wake-up can deliver within the test's bound.
        .poll_interval(Duration::from_secs(600));
    let relay = Relay::with_config(store.clone(), std::sync::Arc::new(sink), config);
    let mut state = relay.state();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async {
        let _ = stopped.await;
    }));
    state.wait_for(|s| *s == RelayState::Idle).await?;
    ensure!(rec.ids().is_empty(), "delivered a paused message");
    store.resume_topic("held").await?;
    eventually("resumed message delivered", Duration::from_secs(20), || {
        let n = rec.ids().len();
        async move { n == 1 }
    })
    .await;
    let _ = stop.send(());
    running.await?;
    Ok(())
}
