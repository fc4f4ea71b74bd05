//! A silent partition between a running relay and each broker: a proxy that stops forwarding
//! without closing anything (no FIN, no RST), in the middle of delivery, for longer than the
//! sink's timeouts, then heals. While frozen the sink must fail its batches with its own timeout
//! (not hang until the relay's delivery deadline), and no message may be marked delivered that
//! the broker does not hold: a reader on the real server, not behind the proxy, checks every
//! delivered row. After the heal everything arrives, at least once.

// Shared with the SMTP tests, which use all of it.
#[cfg(feature = "smtp")]
#[allow(dead_code)]
#[path = "common/smtp_server.rs"]
mod smtp_server;

use outbox_testkit::eventually;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{
    Message, NewMessage, Relay, RelayConfig, Retention, RetryPolicy, Sink, Status, Store,
};
use outbox_sqlite::SqliteStore;
use outbox_testkit::proxy::Proxy;
use tokio::time::Instant;
use uuid::Uuid;

const N: usize = 48;
/// As many keys as a batch holds, so that a wave hands the sink a full batch at once.
const KEYS: usize = 8;
/// Every sink here waits this long for its server, at most.
const SINK_TIMEOUT: Duration = Duration::from_millis(1000);
/// The relay's lease; a delivery gets four fifths of it, far more than the sink's timeout, so
/// a failure within [`NOTICE`] is the sink's own.
const LEASE: Duration = Duration::from_secs(20);
/// How soon after the freeze the sink must fail a batch.
const NOTICE: Duration = Duration::from_secs(6);
/// The freeze outlasts the sink's timeouts several times over. `OUTBOX_LONG=1` holds it for
/// 150 s, past the clients' own liveness checks (NATS pings every 60 s and gives up after two
/// unanswered, MQTT keeps alive every 30 s), so that they also reconnect through the partition.
fn freeze_for() -> Duration {
    if std::env::var_os("OUTBOX_LONG").is_some() {
        Duration::from_secs(150)
    } else {
        Duration::from_secs(8)
    }
}
const BOUND: Duration = Duration::from_secs(60);

/// The ids the broker holds, as a reader on the real server (not proxied) saw them.
#[derive(Clone, Default)]
struct AtBroker(Arc<Mutex<HashSet<Uuid>>>);

impl AtBroker {
    fn add(&self, id: Uuid) {
        self.0.lock().unwrap().insert(id);
    }
    fn ids(&self) -> HashSet<Uuid> {
        self.0.lock().unwrap().clone()
    }
}

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

    async fn enqueue(&self, topic: &str, from: usize, n: usize) {
        for i in from..from + n {
            let payload = serde_json::json!({"n": i, "email": "ops@shop.example"});
            let m = NewMessage::json(topic, "order.created", &payload)
                .unwrap()
                .key(format!("k{}", i % KEYS));
            let mut tx = self.store.pool().begin().await.unwrap();
            self.store.outbox().enqueue(&mut tx, &m).await.unwrap();
            tx.commit().await.unwrap();
        }
        self.store.notify();
    }

    /// The rows the relay marked delivered (kept, not deleted, for this check).
    async fn delivered(&self) -> HashSet<Uuid> {
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT id FROM outbox_messages WHERE status = 'delivered'")
                .fetch_all(self.store.pool())
                .await
                .unwrap();
        ids.iter().map(|id| id.parse().unwrap()).collect()
    }
}

fn relay_config() -> RelayConfig {
    RelayConfig::default()
        .batch_size(8)
        .poll_interval(Duration::from_millis(50))
        .lease(LEASE)
        .retention(Retention::Keep(Duration::from_secs(3600)))
        // Only the partition fails anything here: nothing may run out of attempts.
        .retry(
            RetryPolicy::default()
                .max_attempts(100_000)
                .base_delay(Duration::from_millis(50))
                .max_delay(Duration::from_millis(500)),
        )
        .shutdown_timeout(Duration::from_secs(5))
}

/// Every row marked delivered is at the broker. Nothing passes the frozen proxy, so a row
/// acked without the broker's confirmation stays missing; the grace only covers the reader.
async fn assert_acked_are_at_the_broker(outbox: &Outbox, broker: &AtBroker, when: &str) {
    let acked = outbox.delivered().await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let at = broker.ids();
        let missing = acked.difference(&at).count();
        if missing == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{when}: {missing} of {} messages marked delivered are not at the broker",
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A batch of messages of as many keys, as the relay hands a sink in one wave.
fn wave(topic: &str) -> Vec<Message> {
    (0..KEYS)
        .map(|i| {
            let payload = serde_json::json!({"n": i, "email": "ops@shop.example"});
            Message {
                id: Uuid::now_v7(),
                seq: i as i64,
                topic: topic.into(),
                message_type: "order.created".into(),
                key: Some(format!("wave{i}")),
                partition: 0,
                payload: serde_json::to_vec(&payload).unwrap().into(),
                content_type: outbox_core::JSON.into(),
                headers: Default::default(),
                created_at: chrono::Utc::now(),
                available_at: chrono::Utc::now(),
                attempts: 1,
                last_error: None,
                status: Status::InFlight,
            }
        })
        .collect()
}

/// Through a frozen network a whole wave fails within about one sink timeout: not one
/// timeout per message, which would outlive the relay's delivery deadline on a full batch.
async fn assert_a_frozen_wave_fails_in_time(sink: &dyn Sink, proxy: &Proxy, topic: &str) {
    let batch = wave(topic);
    let bound = SINK_TIMEOUT * 2 + Duration::from_secs(1);
    proxy.freeze();
    let started = Instant::now();
    let outcomes = tokio::time::timeout(Duration::from_secs(60), sink.publish(&batch))
        .await
        .expect("the sink hung on a frozen network for a minute");
    let took = started.elapsed();
    proxy.heal();
    assert_eq!(outcomes.len(), batch.len());
    let ok = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(ok, 0, "{ok} messages acked through a frozen network");
    assert!(
        took <= bound,
        "a wave of {} took {took:?} to fail through a frozen network (timeout {SINK_TIMEOUT:?}): {:?}",
        batch.len(),
        outcomes[0]
    );
}

async fn survive_a_partition(sink: Arc<dyn Sink>, proxy: &Proxy, topic: &str, broker: AtBroker) {
    assert_a_frozen_wave_fails_in_time(sink.as_ref(), proxy, topic).await;
    let outbox = Outbox::new().await;
    outbox.enqueue(topic, 0, N / 2).await;
    let relay = Relay::with_config(Arc::new(outbox.store.clone()), sink, relay_config());
    let stats = relay.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    eventually("the first deliveries", BOUND, || async {
        outbox.delivered().await.len() >= 5
    })
    .await;

    proxy.freeze();
    let frozen_at = Instant::now();
    let failed_before = stats.report().retried;
    outbox.enqueue(topic, N / 2, N / 2).await;
    let noticed = tokio::time::timeout(NOTICE, async {
        while stats.report().retried == failed_before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        noticed.is_ok(),
        "no delivery failed within {NOTICE:?} of the freeze: the sink waits on its frozen \
         server instead of timing out after {SINK_TIMEOUT:?} ({:?})",
        stats.report()
    );
    assert_acked_are_at_the_broker(&outbox, &broker, "during the partition").await;
    tokio::time::sleep_until(frozen_at + freeze_for()).await;
    assert_acked_are_at_the_broker(&outbox, &broker, "at the end of the partition").await;
    let during = outbox.store.status().await.unwrap();
    assert_eq!(during.dead, 0, "dead during the partition: {during:?}");
    assert!(
        during.delivered < N as i64,
        "all delivered through a frozen network"
    );

    proxy.heal();
    let healed_at = Instant::now();
    eventually("every message delivered after the heal", BOUND, || async {
        outbox.delivered().await.len() == N
    })
    .await;
    let recovered_in = healed_at.elapsed();
    assert_acked_are_at_the_broker(&outbox, &broker, "after the heal").await;
    let _ = stop.send(());
    let report = running.await.unwrap();
    let end = outbox.store.status().await.unwrap();
    assert_eq!((end.pending, end.in_flight, end.dead), (0, 0, 0), "{end:?}");
    assert_eq!(report.dead, 0, "{report:?}");
    eprintln!(
        "{}: all delivered {recovered_in:?} after the heal; {report:?}",
        proxy.addr()
    );
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_acks_nothing_unconfirmed_through_a_silent_partition() {
    use async_nats::jetstream;
    use futures::StreamExt;

    let prefix = unique("partition");
    let js = jetstream::new(async_nats::connect("nats://127.0.0.1:4222").await.unwrap());
    let stream = js
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
    let broker = AtBroker::default();
    let seen = broker.clone();
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            let id = m.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id"));
            seen.add(id.unwrap().as_str().parse().unwrap());
            let _ = m.ack().await;
        }
    });

    let proxy = Proxy::start("127.0.0.1:4222").await.unwrap();
    let url = format!(
        "nats://{}?prefix={prefix}.&timeout_ms={}",
        proxy.addr(),
        SINK_TIMEOUT.as_millis()
    );
    let sink = outbox_sinks::from_url(&url).await.unwrap();
    survive_a_partition(sink, &proxy, "orders", broker).await;
    js.delete_stream(&prefix).await.unwrap();
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_acks_nothing_unconfirmed_through_a_silent_partition() {
    let prefix = unique("partition_") + ".";
    let stream = format!("{prefix}orders");
    let client = redis::Client::open("redis://127.0.0.1:6379/").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let broker = AtBroker::default();
    let seen = broker.clone();
    let (mut reader, read_from) = (conn.clone(), stream.clone());
    let reading = tokio::spawn(async move {
        let mut last = "0-0".to_owned();
        loop {
            let read: redis::RedisResult<redis::streams::StreamReadReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(100)
                .arg("STREAMS")
                .arg(&read_from)
                .arg(&last)
                .query_async(&mut reader)
                .await;
            // A slow reply on a loaded machine is no reason to stop reading.
            let Ok(reply) = read else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let entries: Vec<_> = reply.keys.into_iter().flat_map(|k| k.ids).collect();
            if entries.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for e in entries {
                seen.add(e.get::<String>("id").unwrap().parse().unwrap());
                last = e.id;
            }
        }
    });

    let proxy = Proxy::start("127.0.0.1:6379").await.unwrap();
    let url = format!(
        "redis://{}/?prefix={prefix}&timeout_ms={}",
        proxy.addr(),
        SINK_TIMEOUT.as_millis()
    );
    let sink = outbox_sinks::from_url(&url).await.unwrap();
    survive_a_partition(sink, &proxy, "orders", broker).await;
    reading.abort();
    let _: () = redis::AsyncCommands::del(&mut conn, &stream).await.unwrap();
}

#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_acks_nothing_unconfirmed_through_a_silent_partition() {
    use futures::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{Connection, ConnectionProperties};

    let exchange = unique("partition_");
    let queue = unique("partition_q_");
    let proxy = Proxy::start("127.0.0.1:5672").await.unwrap();
    let url = format!(
        "amqp://guest:guest@{}/%2f?exchange={exchange}&timeout_ms={}",
        proxy.addr(),
        SINK_TIMEOUT.as_millis()
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
    let (q, x) = (queue.as_str(), exchange.as_str());
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        q.into(),
        x.into(),
        "orders".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut deliveries = ch
        .basic_consume(
            q.into(),
            "partition-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let broker = AtBroker::default();
    let seen = broker.clone();
    tokio::spawn(async move {
        while let Some(Ok(d)) = deliveries.next().await {
            let id = d.properties.message_id().as_ref().unwrap().as_str();
            seen.add(id.parse().unwrap());
            let _ = d.ack(BasicAckOptions::default()).await;
        }
    });

    survive_a_partition(sink, &proxy, "orders", broker).await;
    ch.queue_delete(q.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    ch.exchange_delete(x.into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
}

#[cfg(feature = "mqtt")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_acks_nothing_unconfirmed_through_a_silent_partition() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    let prefix = unique("partition_") + "/";
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
    let broker = AtBroker::default();
    let seen = broker.clone();
    tokio::spawn(async move {
        let _keep = sub;
        while let Ok(event) = events.poll().await {
            let Event::Incoming(Packet::Publish(p)) = event else {
                continue;
            };
            let props = p.properties.unwrap_or_default();
            if let Some((_, id)) = props.user_properties.iter().find(|(k, _)| k == "ce-id") {
                seen.add(id.parse().unwrap());
            }
        }
    });

    let proxy = Proxy::start("127.0.0.1:1883").await.unwrap();
    let url = format!(
        "mqtt://{}?prefix={prefix}&client_id={}&timeout_ms={}",
        proxy.addr(),
        unique("outbox"),
        SINK_TIMEOUT.as_millis()
    );
    let sink = outbox_sinks::from_url(&url).await.unwrap();
    survive_a_partition(sink, &proxy, "orders", broker).await;
}

#[cfg(feature = "webhook")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_acks_nothing_unconfirmed_through_a_silent_partition() {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;

    let broker = AtBroker::default();
    async fn receive(State(seen): State<AtBroker>, headers: HeaderMap) -> StatusCode {
        let id = headers.get("webhook-id").and_then(|v| v.to_str().ok());
        match id.and_then(|id| id.parse().ok()) {
            Some(id) => {
                seen.add(id);
                StatusCode::NO_CONTENT
            }
            None => StatusCode::BAD_REQUEST,
        }
    }
    let app = axum::Router::new()
        .route("/hook", post(receive))
        .with_state(broker.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let proxy = Proxy::start(&server).await.unwrap();
    let url = format!("http://{}/hook", proxy.addr());
    let sink = outbox_sinks::WebhookSink::new(&url, None, SINK_TIMEOUT).unwrap();
    survive_a_partition(Arc::new(sink), &proxy, "orders", broker).await;
}

#[cfg(feature = "smtp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_acks_nothing_unconfirmed_through_a_silent_partition() {
    use smtp_server::{Security, SmtpServer};

    let server = SmtpServer::start(Security::Plain).await;
    let broker = AtBroker::default();
    let seen = broker.clone();
    let mails = server.mails.clone();
    let reading = tokio::spawn(async move {
        loop {
            for mail in mails.lock().unwrap().iter() {
                let id = mail.header("Message-ID").unwrap_or_default();
                let id = id.trim_start_matches('<').split('@').next().unwrap_or("");
                seen.add(id.parse().unwrap());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    let proxy = Proxy::start(&server.addr.to_string()).await.unwrap();
    let url = format!(
        "smtp://{}?tls=none&from=noreply@shop.example&to_field=/email&timeout_ms={}",
        proxy.addr(),
        SINK_TIMEOUT.as_millis()
    );
    let sink = outbox_sinks::from_url(&url).await.unwrap();
    survive_a_partition(sink, &proxy, "orders", broker).await;
    reading.abort();
}
