//! Each broker sink under a real relay (SQLite store) loses its server mid-run, through a TCP
//! proxy that cuts every connection and refuses new ones, then gets it back. While the network
//! is down nothing may go dead or missing; afterwards a real consumer on the real server sees
//! every message, first arrivals in per-key order, and the outbox ends empty.
//!
//! Duplicates: NATS JetStream drops them by `Nats-Msg-Id`, so its stream must hold each
//! message exactly once. Redis Streams, RabbitMQ and MQTT (QoS 1) deliver at least once: a
//! publish whose acknowledgement the cut swallowed is sent again, and consumers deduplicate by
//! message id, as these checks do.

mod common;

use outbox_testkit::eventually;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::Proxy;
use outbox_core::{NewMessage, Relay, RelayConfig, RetryPolicy, Sink, StatusCounts, Store};
use outbox_sqlite::SqliteStore;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Messages per run: half before the cut, half during it.
const N: usize = 60;
const KEYS: usize = 4;
const BOUND: Duration = Duration::from_secs(120);
/// How soon after the cut the sink must report failures: a sink that waits out a long timeout
/// per message (or hangs) holds its batch and the relay's lease instead of backing off.
const NOTICE: Duration = Duration::from_secs(15);

/// One message as the consumer saw it.
#[derive(Debug, Clone)]
struct Received {
    id: Uuid,
    key: String,
}

type Arrivals = mpsc::UnboundedReceiver<Received>;

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", Uuid::now_v7().simple())
}

struct Outbox {
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

impl Outbox {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("outbox.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        Self { store, _dir: dir }
    }

    /// Enqueues `n` keyed messages on `topic`, one transaction each, in key order.
    async fn enqueue(&self, topic: &str, from: usize, n: usize) -> Vec<(Uuid, String)> {
        let mut sent = Vec::with_capacity(n);
        for i in from..from + n {
            let key = format!("k{}", i % KEYS);
            let m = NewMessage::json(topic, "order.created", &serde_json::json!({"n": i}))
                .unwrap()
                .key(key.clone());
            let mut tx = self.store.pool().begin().await.unwrap();
            self.store.outbox().enqueue(&mut tx, &m).await.unwrap();
            tx.commit().await.unwrap();
            sent.push((m.id(), key));
        }
        self.store.notify();
        sent
    }

    async fn status(&self) -> StatusCounts {
        self.store.status().await.unwrap()
    }
}

fn relay_config() -> RelayConfig {
    RelayConfig::default()
        .batch_size(8)
        .poll_interval(Duration::from_millis(50))
        .lease(Duration::from_secs(20))
        // Only an outage fails deliveries here: none may run out of attempts.
        .retry(
            RetryPolicy::default()
                .max_attempts(100_000)
                .base_delay(Duration::from_millis(50))
                .max_delay(Duration::from_millis(500)),
        )
        .shutdown_timeout(Duration::from_secs(5))
}

/// Collects arrivals until `done` holds for the distinct ids seen.
async fn collect(arrivals: &mut Arrivals, seen: &mut Vec<Received>, want: usize, what: &str) {
    let distinct = |seen: &Vec<Received>| seen.iter().map(|r| r.id).collect::<HashSet<_>>().len();
    while distinct(seen) < want {
        let next = tokio::time::timeout(BOUND, arrivals.recv()).await;
        match next {
            Ok(Some(r)) => seen.push(r),
            Ok(None) => panic!("the consumer stopped ({what})"),
            Err(_) => panic!(
                "timed out: {what}: {} of {want} distinct ids received",
                distinct(seen)
            ),
        }
    }
}

/// Runs the outage scenario and returns every arrival, duplicates included.
async fn survive_an_outage(
    sink: Arc<dyn Sink>,
    proxy: &Proxy,
    topic: &str,
    mut arrivals: Arrivals,
) -> Vec<Received> {
    let outbox = Outbox::new().await;
    let mut sent = outbox.enqueue(topic, 0, N / 2).await;
    let relay = Relay::with_config(Arc::new(outbox.store.clone()), sink, relay_config());
    let stats = relay.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));

    let mut seen = Vec::new();
    collect(
        &mut arrivals,
        &mut seen,
        10,
        "the first messages before the cut",
    )
    .await;
    proxy.cut();
    let failed_before = stats.report().retried;
    sent.extend(outbox.enqueue(topic, N / 2, N / 2).await);
    // The sink must notice the outage and say so (a hung publish would never get here).
    eventually(
        "deliveries failing while the server is unreachable",
        NOTICE,
        || {
            let failed = stats.report().retried;
            async move { failed >= failed_before + 10 }
        },
    )
    .await;
    let during = outbox.status().await;
    let report = stats.report();
    assert_eq!(during.dead, 0, "dead during the outage: {during:?}");
    assert_eq!(report.dead, 0);
    assert_eq!(
        (during.pending + during.in_flight) as u64 + report.delivered,
        N as u64,
        "messages unaccounted for during the outage: {during:?}, {report:?}"
    );
    assert!(
        report.delivered < N as u64,
        "all delivered through a cut network"
    );
    proxy.restore();
    collect(
        &mut arrivals,
        &mut seen,
        N,
        "every message after the restore",
    )
    .await;
    eventually("the outbox to empty", BOUND, || async {
        let s = outbox.status().await;
        s.pending == 0 && s.in_flight == 0
    })
    .await;
    let _ = stop.send(());
    let report = running.await.unwrap();
    assert_eq!(report.dead, 0, "{report:?}");
    assert_eq!(report.delivered, N as u64, "{report:?}");
    let end = outbox.status().await;
    assert_eq!((end.pending, end.in_flight, end.dead), (0, 0, 0), "{end:?}");
    assert_per_key_order(&sent, &seen);
    seen
}

/// Per key, the ids in order of first arrival are the ids in enqueue order, all there.
fn assert_per_key_order(sent: &[(Uuid, String)], seen: &[Received]) {
    let mut want: HashMap<&str, Vec<Uuid>> = HashMap::new();
    for (id, key) in sent {
        want.entry(key).or_default().push(*id);
    }
    let mut first = HashSet::new();
    let mut got: HashMap<&str, Vec<Uuid>> = HashMap::new();
    for r in seen {
        if first.insert(r.id) {
            got.entry(&r.key).or_default().push(r.id);
        }
    }
    assert_eq!(got.len(), KEYS, "keys seen: {:?}", got.keys());
    for (key, ids) in &want {
        assert_eq!(
            got.get(key),
            Some(ids),
            "key {key}: out of order or missing"
        );
    }
}

fn duplicates(seen: &[Received]) -> usize {
    seen.len() - seen.iter().map(|r| r.id).collect::<HashSet<_>>().len()
}

/// Only a message in flight when the network was cut may arrive twice (its first send got
/// through, its acknowledgement did not), and per-key order allows one in flight per key.
fn assert_few_duplicates(transport: &str, seen: &[Received]) {
    let n = duplicates(seen);
    eprintln!("{transport}: {n} duplicate arrivals");
    assert!(n <= KEYS, "{transport}: {n} duplicates for one cut");
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jetstream_survives_an_outage_exactly_once() {
    use async_nats::jetstream;
    use futures::StreamExt;

    let prefix = unique("outage");
    let js = jetstream::new(async_nats::connect("nats://127.0.0.1:4222").await.unwrap());
    let mut stream = js
        .create_stream(jetstream::stream::Config {
            name: prefix.clone(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let (tx, arrivals) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            let header = |name: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default()
            };
            let id = header("Nats-Msg-Id").parse().unwrap();
            let _ = tx.send(Received {
                id,
                key: header("ce-subject"),
            });
            let _ = m.ack().await;
        }
    });

    let proxy = Proxy::start("127.0.0.1:4222").await;
    let url = format!("nats://127.0.0.1:{}?prefix={prefix}.", proxy.port);
    let sink = outbox_sinks::from_url(&url).await.unwrap();
    let seen = survive_an_outage(sink, &proxy, "orders", arrivals).await;
    assert_eq!(duplicates(&seen), 0, "the stream kept a duplicate");
    assert_eq!(stream.info().await.unwrap().state.messages, N as u64);
    js.delete_stream(&prefix).await.unwrap();
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_survive_an_outage_at_least_once() {
    let prefix = unique("outage_") + ".";
    let stream = format!("{prefix}orders");
    let client = redis::Client::open("redis://127.0.0.1:6379/").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (tx, arrivals) = mpsc::unbounded_channel();
    let mut reader = conn.clone();
    let read_from = stream.clone();
    tokio::spawn(async move {
        let mut last = "0-0".to_owned();
        while !tx.is_closed() {
            let reply: redis::streams::StreamReadReply = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(100)
                .arg("STREAMS")
                .arg(&read_from)
                .arg(&last)
                .query_async(&mut reader)
                .await
                .unwrap();
            let entries: Vec<_> = reply.keys.into_iter().flat_map(|k| k.ids).collect();
            if entries.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for e in entries {
                let field = |f: &str| e.get::<String>(f).unwrap_or_default();
                let _ = tx.send(Received {
                    id: field("id").parse().unwrap(),
                    key: field("key"),
                });
                last = e.id;
            }
        }
    });

    let proxy = Proxy::start("127.0.0.1:6379").await;
    let url = format!("redis://127.0.0.1:{}/?prefix={prefix}", proxy.port);
    let sink = outbox_sinks::from_url(&url).await.unwrap();
    let seen = survive_an_outage(sink, &proxy, "orders", arrivals).await;
    assert_few_duplicates("redis", &seen);
    let _: () = redis::AsyncCommands::del(&mut conn, &stream).await.unwrap();
}

#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_survives_an_outage_at_least_once() {
    use futures::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{Connection, ConnectionProperties};

    let exchange = unique("outage_");
    let queue = unique("outage_q_");
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let url = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f?exchange={exchange}",
        proxy.port
    );
    // Connecting declares the exchange, which the queue binds to before anything is sent.
    let sink = outbox_sinks::from_url(&url).await.unwrap();
    let conn = Connection::connect(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "orders".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut deliveries = ch
        .basic_consume(
            queue.as_str().into(),
            "outage-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (tx, arrivals) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(d)) = deliveries.next().await {
            let props = &d.properties;
            let id = props
                .message_id()
                .as_ref()
                .unwrap()
                .as_str()
                .parse()
                .unwrap();
            let key = match props
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("ce-subject"))
            {
                Some(AMQPValue::LongString(s)) => s.to_string(),
                _ => String::new(),
            };
            let _ = tx.send(Received { id, key });
            let _ = d.ack(BasicAckOptions::default()).await;
        }
    });

    let seen = survive_an_outage(sink, &proxy, "orders", arrivals).await;
    assert_few_duplicates("amqp", &seen);
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
}

#[cfg(feature = "mqtt")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_survives_an_outage_at_least_once() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    let prefix = unique("outage_") + "/";
    let (sub, mut events) =
        AsyncClient::new(MqttOptions::new(unique("sub"), "127.0.0.1", 1883), 1000);
    sub.subscribe(format!("{prefix}#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.unwrap() {
            break;
        }
    }
    let (tx, arrivals) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _keep = sub;
        while let Ok(event) = events.poll().await {
            let Event::Incoming(Packet::Publish(p)) = event else {
                continue;
            };
            let props = p.properties.unwrap_or_default();
            let prop = |name: &str| {
                props
                    .user_properties
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let _ = tx.send(Received {
                id: prop("ce-id").parse().unwrap(),
                key: prop("ce-subject"),
            });
        }
    });

    let proxy = Proxy::start("127.0.0.1:1883").await;
    let url = format!(
        "mqtt://127.0.0.1:{}?prefix={prefix}&client_id={}",
        proxy.port,
        unique("outbox")
    );
    let sink = outbox_sinks::from_url(&url).await.unwrap();
    let seen = survive_an_outage(sink, &proxy, "orders", arrivals).await;
    assert_few_duplicates("mqtt", &seen);
}
