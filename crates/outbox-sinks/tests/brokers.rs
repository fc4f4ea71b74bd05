//! Each transport against its real server on this machine: NATS JetStream (127.0.0.1:4222),
//! Redis (127.0.0.1:6379) and a real HTTP receiver for webhooks.

use std::collections::BTreeMap;

use chrono::Utc;
use outbox_core::{Message, Sink, Status};
use uuid::Uuid;

/// `n` messages over three keys, as a relay would hand them over.
fn batch(topic: &str, n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message {
            id: Uuid::now_v7(),
            seq: i as i64,
            topic: topic.into(),
            message_type: "order.created".into(),
            key: Some(format!("k{}", i % 3)),
            partition: 0,
            payload: format!("{{\"n\":{i}}}").into_bytes(),
            content_type: outbox_core::JSON.into(),
            headers: BTreeMap::from([(
                "traceparent".into(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            )]),
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
        assert!(h.get("traceparent").is_some());
        assert_eq!(&stored.payload[..], &m.payload[..]);
    }
    js.delete_stream(&name).await.unwrap();
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
            assert!(headers.contains_key("traceparent"));
        }
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
            assert!(header("traceparent").starts_with("00-"));
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
