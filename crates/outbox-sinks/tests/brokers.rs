//! Each transport against its real server on this machine: NATS JetStream (127.0.0.1:4222),
//! Redis (127.0.0.1:6379) and a real HTTP receiver for webhooks.

use std::collections::BTreeMap;

use chrono::Utc;
use futures::FutureExt;
use outbox_core::{Message, Sink, Status};
use uuid::Uuid;

/// `n` messages over three keys, as a relay would hand them over.
/// The trace context every sink carries in its transport's own headers.
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const TRACESTATE: &str = "rojo=00f067aa0ba902b7";

fn batch(topic: &str, n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message {
            id: Uuid::now_v7(),
            seq: i as i64,
            topic: topic.into(),
            message_type: "order.created".into(),
            key: Some(format!("k{}", i % 3)),
            partition: 0,
            payload: format!("{{\"n\":{i}}}").into(),
            content_type: outbox_core::JSON.into(),
            headers: BTreeMap::from([
                ("traceparent".into(), TRACEPARENT.into()),
                ("tracestate".into(), TRACESTATE.into()),
            ]),
            created_at: Utc::now(),
            available_at: Utc::now(),
            attempts: 1,
            last_error: None,
            status: Status::InFlight,
        })
        .collect()
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", Uuid::now_v7().simple())
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_streams_receive_every_message_in_order_with_its_attributes() {
    use redis::AsyncCommands;
    let prefix = unique("t_") + ".";
    let url = format!("redis://127.0.0.1:6379/?prefix={prefix}&maxlen=10000");
    let sink = outbox_sinks::from_url(&url).await.unwrap();
    let msgs = batch("orders", 60);
    assert!(sink.publish(&msgs).await.iter().all(Result::is_ok));

    let client = redis::Client::open("redis://127.0.0.1:6379/").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stream = format!("{prefix}orders");
    let entries: redis::streams::StreamRangeReply = conn.xrange_all(&stream).await.unwrap();
    let field = |e: &redis::streams::StreamId, f: &str| -> String { e.get(f).unwrap() };
    let ids: Vec<String> = entries.ids.iter().map(|e| field(e, "id")).collect();
    let want: Vec<String> = msgs.iter().map(|m| m.id.to_string()).collect();
    assert_eq!(ids, want, "entries out of order or missing");
    let first = &entries.ids[0];
    assert_eq!(field(first, "type"), "order.created");
    assert_eq!(field(first, "key"), "k0");
    assert_eq!(field(first, "payload"), "{\"n\":0}");
    assert_eq!(field(first, "ce-id"), msgs[0].id.to_string());
    assert_eq!(field(first, "ce-specversion"), "1.0");
    assert!(field(first, "headers").contains("traceparent"));
    assert_eq!(field(first, "traceparent"), TRACEPARENT);
    assert_eq!(field(first, "tracestate"), TRACESTATE);
    let _: () = conn.del(&stream).await.unwrap();
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn a_refused_xadd_fails_only_its_own_message() {
    use redis::AsyncCommands;
    let prefix = unique("t_") + ".";
    let client = redis::Client::open("redis://127.0.0.1:6379/").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // A plain string where the "bad" topic's stream should be: XADD to it is refused.
    let _: () = conn
        .set(format!("{prefix}bad"), "not a stream")
        .await
        .unwrap();
    let sink = outbox_sinks::from_url(&format!("redis://127.0.0.1:6379/?prefix={prefix}"))
        .await
        .unwrap();
    let mut msgs = batch("good", 3);
    msgs[1].topic = "bad".into();
    let out = sink.publish(&msgs).await;
    assert!(out[0].is_ok() && out[2].is_ok(), "{out:?}");
    assert!(
        out[1]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("WRONGTYPE"),
        "{out:?}"
    );
    let _: () = conn
        .del(&[format!("{prefix}bad"), format!("{prefix}good")])
        .await
        .unwrap();
}

#[cfg(feature = "nats")]
#[tokio::test]
async fn nats_jetstream_stores_each_message_once_in_order() {
    use async_nats::jetstream;
    let prefix = unique("t");
    let client = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
    let js = jetstream::new(client);
    let name = prefix.clone();
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
    let sink = outbox_sinks::from_url(&format!("nats://127.0.0.1:4222?prefix={prefix}."))
        .await
        .unwrap();
    let msgs = batch("orders", 50);
    assert!(sink.publish(&msgs).await.iter().all(Result::is_ok));
    // A redelivery of the same batch (a relay crashed before its ack): the server drops it.
    assert!(sink.publish(&msgs).await.iter().all(Result::is_ok));
    let mut stream = stream;
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        50,
        "duplicates were stored"
    );
    for (i, m) in msgs.iter().enumerate() {
        let stored = stream.get_raw_message(i as u64 + 1).await.unwrap();
        assert_eq!(stored.subject.as_str(), format!("{prefix}.orders"));
        let h = &stored.headers;
        assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), m.id.to_string());
        assert_eq!(h.get("ce-type").unwrap().as_str(), "order.created");
        assert_eq!(
            h.get("ce-subject").unwrap().as_str(),
            m.key.as_deref().unwrap()
        );
        assert_eq!(h.get("traceparent").unwrap().as_str(), TRACEPARENT);
        assert_eq!(h.get("tracestate").unwrap().as_str(), TRACESTATE);
        assert_eq!(&stored.payload[..], &m.payload[..]);
    }
    js.delete_stream(&name).await.unwrap();
}

/// A JetStream stream capturing `{prefix}.>`, and a sink publishing under that prefix.
#[cfg(feature = "nats")]
async fn nats_stream(
    prefix: &str,
) -> (
    async_nats::jetstream::Context,
    async_nats::jetstream::stream::Stream,
    std::sync::Arc<dyn Sink>,
) {
    use async_nats::jetstream;
    let client = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
    let js = jetstream::new(client);
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: prefix.to_owned(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
    let sink = outbox_sinks::from_url(&format!("nats://127.0.0.1:4222?prefix={prefix}."))
        .await
        .unwrap();
    (js, stream, sink)
}

/// Rows written before headers were checked at enqueue (or by hand): a message header named
/// like the sink's own deduplication header must not make JetStream drop the message.
#[cfg(feature = "nats")]
#[tokio::test]
async fn a_message_header_never_replaces_the_nats_msg_id() {
    let prefix = unique("t");
    let (js, mut stream, sink) = nats_stream(&prefix).await;
    let mut msgs = batch("orders", 2);
    for m in &mut msgs {
        m.headers.insert("Nats-Msg-Id".into(), "same".into());
    }
    let out = sink.publish(&msgs).await;
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        2,
        "JetStream dropped a message as a duplicate of another, and it was acked"
    );
    for (i, m) in msgs.iter().enumerate() {
        let stored = stream.get_raw_message(i as u64 + 1).await.unwrap();
        let ids: Vec<_> = stored
            .headers
            .get_all("Nats-Msg-Id")
            .map(|v| v.as_str().to_owned())
            .collect();
        assert_eq!(ids, [m.id.to_string()]);
    }
    js.delete_stream(&prefix).await.unwrap();
}

/// A header NATS cannot carry fails its own message, permanently and by name; the rest of the
/// batch is delivered.
#[cfg(feature = "nats")]
#[tokio::test]
async fn a_header_nats_cannot_carry_fails_only_its_message() {
    let prefix = unique("t");
    let (js, mut stream, sink) = nats_stream(&prefix).await;
    let mut msgs = batch("orders", 3);
    msgs[1].headers.insert("bad name".into(), "x".into());
    let out = std::panic::AssertUnwindSafe(sink.publish(&msgs))
        .catch_unwind()
        .await
        .expect("the sink panicked on a header name with a space");
    assert!(out[0].is_ok() && out[2].is_ok(), "{out:?}");
    let err = out[1].as_ref().unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(err.to_string().contains("bad name"), "{err}");
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
    js.delete_stream(&prefix).await.unwrap();
}

#[cfg(feature = "nats")]
#[tokio::test]
async fn a_subject_no_stream_captures_is_an_error_not_a_loss() {
    let prefix = unique("nostream");
    let sink = outbox_sinks::from_url(&format!("nats://127.0.0.1:4222?prefix={prefix}."))
        .await
        .unwrap();
    let out = sink.publish(&batch("orders", 2)).await;
    for o in out {
        let e = o.unwrap_err();
        assert!(!e.is_permanent());
        assert!(
            e.to_string().contains("no JetStream stream captures"),
            "{e}"
        );
    }
}

#[cfg(feature = "webhook")]
mod webhook {
    use super::*;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use std::sync::{Arc, Mutex};

    type Seen = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

    async fn receiver() -> (String, Seen) {
        let seen: Seen = Arc::default();
        let record = |answer: (StatusCode, &'static str)| {
            move |State(seen): State<Seen>, headers: HeaderMap, body: axum::body::Bytes| async move {
                seen.lock().unwrap().push((headers, body.to_vec()));
                (answer.0, [("retry-after", answer.1)])
            }
        };
        let app = axum::Router::new()
            .route("/ok", post(record((StatusCode::NO_CONTENT, "0"))))
            .route(
                "/busy",
                post(record((StatusCode::SERVICE_UNAVAILABLE, "7"))),
            )
            .route("/gone", post(record((StatusCode::GONE, "0"))))
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (base, seen)
    }

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    /// A receiver whose `/moved` answers 302 towards `/target`, which would answer 200 to
    /// anything (the body-less GET a redirected POST becomes included).
    async fn redirecting_receiver() -> (String, Arc<Mutex<Vec<String>>>) {
        use axum::routing::any;
        let hits: Arc<Mutex<Vec<String>>> = Arc::default();
        let h = hits.clone();
        let app = axum::Router::new()
            .route(
                "/moved",
                post(|| async { (StatusCode::FOUND, [("location", "/target")]) }),
            )
            .route(
                "/target",
                any(move |method: axum::http::Method| {
                    let h = h.clone();
                    async move {
                        h.lock().unwrap().push(method.to_string());
                        StatusCode::OK
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (base, hits)
    }

    #[tokio::test]
    async fn a_redirect_is_a_failure_naming_its_location_never_an_ack() {
        let (base, hits) = redirecting_receiver().await;
        let sink = outbox_sinks::WebhookSink::new(
            &format!("{base}/moved"),
            None,
            std::time::Duration::from_secs(5),
        )
        .unwrap();
        let out = sink.publish(&batch("orders", 1)).await;
        let err = out[0].as_ref().expect_err("a 302 was acked");
        assert!(err.to_string().contains("/target"), "{err}");
        assert!(
            hits.lock().unwrap().is_empty(),
            "the redirect was followed: {:?}",
            hits.lock().unwrap()
        );
    }

    #[tokio::test]
    async fn signed_posts_verify_on_the_receiving_side() {
        let (base, seen) = receiver().await;
        let sink = outbox_sinks::WebhookSink::new(
            &format!("{base}/ok"),
            Some(SECRET),
            std::time::Duration::from_secs(5),
        )
        .unwrap();
        let msgs = batch("orders", 5);
        assert!(sink.publish(&msgs).await.iter().all(Result::is_ok));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 5);
        let key = outbox_sinks::decode_secret(SECRET).unwrap();
        for (headers, body) in seen.iter() {
            let h = |n: &str| headers.get(n).unwrap().to_str().unwrap().to_owned();
            let id = h("webhook-id");
            let ts: i64 = h("webhook-timestamp").parse().unwrap();
            assert!((Utc::now().timestamp() - ts).abs() < 60);
            assert_eq!(
                h("webhook-signature"),
                outbox_sinks::sign(&key, &id, ts, body)
            );
            let m = msgs
                .iter()
                .find(|m| m.id.to_string() == id)
                .expect("a sent id");
            assert_eq!(body, &m.payload);
            assert_eq!(h("ce-id"), id);
            assert_eq!(h("content-type"), "application/json");
            assert_eq!(h("traceparent"), TRACEPARENT);
            assert_eq!(h("tracestate"), TRACESTATE);
        }
    }

    /// Rows written before headers were checked at enqueue (or by hand) must not replace the
    /// headers the sink sets: the receiver sees one value of each, the sink's.
    #[tokio::test]
    async fn message_headers_never_replace_the_webhook_headers() {
        let (base, seen) = receiver().await;
        let sink = outbox_sinks::WebhookSink::new(
            &format!("{base}/ok"),
            Some(SECRET),
            std::time::Duration::from_secs(5),
        )
        .unwrap();
        let mut msgs = batch("orders", 1);
        for name in [
            "Content-Type",
            "webhook-id",
            "Webhook-Signature",
            "ce-id",
            "Host",
        ] {
            msgs[0].headers.insert(name.into(), "spoofed".into());
        }
        let out = sink.publish(&msgs).await;
        assert!(out[0].is_ok(), "{out:?}");
        let seen = seen.lock().unwrap();
        let (headers, _) = &seen[0];
        let all = |n: &str| -> Vec<String> {
            headers
                .get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(all("content-type"), ["application/json"]);
        assert_eq!(all("webhook-id"), [msgs[0].id.to_string()]);
        assert_eq!(all("ce-id"), [msgs[0].id.to_string()]);
        assert_eq!(all("webhook-signature").len(), 1);
        assert!(!all("host")[0].contains("spoofed"), "{:?}", all("host"));
    }

    #[tokio::test]
    async fn refusals_are_permanent_and_overload_is_retried_later() {
        let (base, _) = receiver().await;
        let timeout = std::time::Duration::from_secs(5);
        let gone = outbox_sinks::WebhookSink::new(&format!("{base}/gone"), None, timeout).unwrap();
        assert!(
            gone.publish(&batch("t", 1)).await[0]
                .as_ref()
                .unwrap_err()
                .is_permanent()
        );
        let busy = outbox_sinks::WebhookSink::new(&format!("{base}/busy"), None, timeout).unwrap();
        match &busy.publish(&batch("t", 1)).await[0] {
            Err(outbox_core::SinkError::Transient { retry_after, .. }) => {
                assert_eq!(*retry_after, Some(std::time::Duration::from_secs(7)))
            }
            other => panic!("{other:?}"),
        }
        let down = outbox_sinks::WebhookSink::new("http://127.0.0.1:1/", None, timeout).unwrap();
        assert!(
            !down.publish(&batch("t", 1)).await[0]
                .as_ref()
                .unwrap_err()
                .is_permanent()
        );
    }
}

#[cfg(feature = "amqp")]
mod amqp {
    use super::*;
    use lapin::options::{
        BasicAckOptions, BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{Connection, ConnectionProperties};

    const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

    #[tokio::test]
    async fn rabbitmq_receives_persistent_confirmed_messages_in_order() {
        let exchange = unique("t_");
        let sink = outbox_sinks::from_url(&format!("{URI}?exchange={exchange}"))
            .await
            .unwrap();
        let conn = Connection::connect(URI, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let queue = unique("q_");
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

        let msgs = batch("orders", 30);
        assert!(sink.publish(&msgs).await.iter().all(Result::is_ok));
        for m in &msgs {
            let got = ch
                .basic_get(queue.as_str().into(), BasicGetOptions::default())
                .await
                .unwrap()
                .expect("a message");
            let props = &got.delivery.properties;
            assert_eq!(
                props.message_id().as_ref().unwrap().as_str(),
                m.id.to_string()
            );
            assert_eq!(props.kind().as_ref().unwrap().as_str(), "order.created");
            assert_eq!(*props.delivery_mode(), Some(2));
            let headers = props.headers().as_ref().unwrap();
            let header = |name: &str| match headers.inner().get(name) {
                Some(AMQPValue::LongString(s)) => s.to_string(),
                other => panic!("{name}: {other:?}"),
            };
            assert_eq!(header("ce-id"), m.id.to_string());
            assert_eq!(header("ce-subject"), m.key.clone().unwrap());
            assert_eq!(header("traceparent"), TRACEPARENT);
            assert_eq!(header("tracestate"), TRACESTATE);
            assert_eq!(got.delivery.data, m.payload);
            got.delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_unroutable_message_is_an_error_not_a_drop() {
        let exchange = unique("t_");
        let sink = outbox_sinks::from_url(&format!("{URI}?exchange={exchange}"))
            .await
            .unwrap();
        let out = sink.publish(&batch("nobody.listens", 2)).await;
        for o in out {
            let e = o.unwrap_err();
            assert!(!e.is_permanent());
            assert!(e.to_string().contains("unroutable"), "{e}");
        }
        let conn = Connection::connect(URI, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
    }
}

#[cfg(feature = "mqtt")]
mod mqtt {
    use super::*;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    #[tokio::test]
    async fn mosquitto_receives_every_message_in_order_with_its_attributes() {
        let prefix = unique("t_") + "/";
        // A real subscriber, subscribed before anything is published.
        let (sub, mut events) =
            AsyncClient::new(MqttOptions::new(unique("sub"), "127.0.0.1", 1883), 100);
        sub.subscribe(format!("{prefix}#"), QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.unwrap() {
                break;
            }
        }
        let sink = outbox_sinks::from_url(&format!("mqtt://127.0.0.1:1883?prefix={prefix}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let msgs = batch("orders", 25);
        let out = sink.publish(&msgs).await;
        assert!(out.iter().all(Result::is_ok), "{out:?}");
        let mut received = Vec::new();
        while received.len() < msgs.len() {
            let event = tokio::time::timeout(std::time::Duration::from_secs(30), events.poll())
                .await
                .unwrap()
                .unwrap();
            if let Event::Incoming(Packet::Publish(p)) = event {
                received.push(p);
            }
        }
        for (m, p) in msgs.iter().zip(&received) {
            assert_eq!(
                std::str::from_utf8(&p.topic).unwrap(),
                format!("{prefix}orders")
            );
            assert_eq!(&p.payload[..], &m.payload[..]);
            let props = p.properties.as_ref().unwrap();
            let ce_id = props
                .user_properties
                .iter()
                .find(|(k, _)| k == "ce-id")
                .map(|(_, v)| v.clone());
            assert_eq!(
                ce_id,
                Some(m.id.to_string()),
                "out of order or missing ce-id"
            );
            assert_eq!(props.content_type.as_deref(), Some("application/json"));
            let property = |name: &str| {
                props
                    .user_properties
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
            };
            assert_eq!(property("traceparent"), Some(TRACEPARENT));
            assert_eq!(property("tracestate"), Some(TRACESTATE));
        }
    }
}

/// Kafka has no server on this machine: librdkafka's mock cluster speaks the real protocol.
#[cfg(feature = "kafka")]
mod kafka {
    use super::*;
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message as _};
    use rdkafka::mocking::MockCluster;
    use std::collections::HashMap;
    use std::time::Duration;

    #[tokio::test]
    async fn the_mock_cluster_receives_keyed_messages_in_order_and_survives_an_outage() {
        let cluster = MockCluster::new(3).unwrap();
        cluster.create_topic("orders", 3, 1).unwrap();
        let bootstrap = cluster.bootstrap_servers();
        let sink = outbox_sinks::from_url(&format!("kafka://{bootstrap}?timeout_ms=3000"))
            .await
            .unwrap();
        let first = batch("orders", 30);
        assert!(sink.publish(&first).await.iter().all(Result::is_ok));

        // Every broker down: deliveries fail as transient errors, nothing is acked.
        for id in 1..=3 {
            cluster.broker_down(id).unwrap();
        }
        let during = batch("orders", 3);
        let out = sink.publish(&during).await;
        assert!(
            out.iter()
                .all(|o| o.as_ref().is_err_and(|e| !e.is_permanent())),
            "{out:?}"
        );
        for id in 1..=3 {
            cluster.broker_up(id).unwrap();
        }
        // The relay retries them with backoff: they go out once the cluster is back.
        let mut tries = 0;
        loop {
            let out = sink.publish(&during).await;
            if out.iter().all(Result::is_ok) {
                break;
            }
            tries += 1;
            assert!(
                tries < 20,
                "still failing after the cluster came back: {out:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "outbox-test")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        consumer.subscribe(&["orders"]).unwrap();
        let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
        // A delivery that timed out may still have landed: count distinct ids, not records.
        let mut distinct = std::collections::HashSet::new();
        while distinct.len() < first.len() + during.len() {
            let m = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
                .await
                .unwrap()
                .unwrap();
            let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
            let headers = m.headers().unwrap();
            let ce_id = headers
                .iter()
                .find(|h| h.key == "ce-id")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8(v.to_vec()).unwrap());
            let ce_id = ce_id.expect("ce-id header");
            let traceparent = headers
                .iter()
                .find(|h| h.key == "traceparent")
                .and_then(|h| h.value);
            assert_eq!(traceparent, Some(TRACEPARENT.as_bytes()));
            distinct.insert(ce_id.clone());
            by_key.entry(key).or_default().push(ce_id);
        }
        for (key, ids) in by_key {
            let want: Vec<String> = first
                .iter()
                .chain(&during)
                .filter(|m| m.key.as_deref() == Some(key.as_str()))
                .map(|m| m.id.to_string())
                .collect();
            let mut got = ids.clone();
            got.dedup(); // a timed-out delivery may have landed before the retry
            assert_eq!(got, want, "key {key} out of order or incomplete");
        }
    }

    /// A broker that stops answering without closing (its replies held back for longer than
    /// the sink's timeout) is the closest the mock cluster comes to a silent partition: the
    /// sink must fail the batch within its timeout, ack nothing, and deliver it after the heal.
    #[tokio::test]
    async fn kafka_acks_nothing_unconfirmed_through_a_silent_broker() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("silent", 1, 1).unwrap();
        let bootstrap = cluster.bootstrap_servers();
        let sink = outbox_sinks::from_url(&format!("kafka://{bootstrap}?timeout_ms=1000"))
            .await
            .unwrap();
        // The first delivery also fetches metadata, which may take longer than the timeout.
        let warm = batch("silent", 3);
        let mut tries = 0;
        while !sink.publish(&warm).await.iter().all(Result::is_ok) {
            tries += 1;
            assert!(tries < 20, "the mock cluster never took a message");
        }

        cluster
            .broker_round_trip_time(1, Duration::from_secs(5))
            .unwrap();
        let held = batch("silent", 6);
        let started = std::time::Instant::now();
        let out = sink.publish(&held).await;
        let took = started.elapsed();
        assert!(
            out.iter()
                .all(|o| o.as_ref().is_err_and(|e| !e.is_permanent())),
            "acked while the broker was silent: {out:?}"
        );
        assert!(took < Duration::from_secs(4), "the sink hung for {took:?}");

        cluster.broker_round_trip_time(1, Duration::ZERO).unwrap();
        let mut tries = 0;
        while !sink.publish(&held).await.iter().all(Result::is_ok) {
            tries += 1;
            assert!(tries < 40, "still failing after the heal");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
