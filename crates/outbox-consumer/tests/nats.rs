//! The NATS JetStream consumer against the real server on 127.0.0.1:4222, with PostgreSQL and
//! SQLite inboxes. Messages are published by the relay's own NATS sink, so the wire format is
//! the real one.

#![cfg(feature = "nats")]

mod common;

use async_nats::HeaderMap;
use async_nats::jetstream;
use common::*;
use outbox_consumer::{Handler, NatsConfig, NatsConsumer};
use outbox_core::Message;

const URL: &str = "nats://127.0.0.1:4222";

/// Publishes `m` as a redelivery would look: the same `ce-id`, but no `Nats-Msg-Id`, so the
/// server's duplicate window does not drop it before the inbox sees it.
async fn republish(js: &jetstream::Context, subject: &str, m: &Message) {
    let mut h = HeaderMap::new();
    h.insert("ce-id", m.id.to_string().as_str());
    h.insert("ce-type", m.message_type.as_str());
    h.insert("ce-subject", m.key.as_deref().unwrap_or_default());
    js.publish_with_headers(subject.to_owned(), h, m.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
}

async fn exactly_once<S: TestDb>(store: S)
where
    Effects: Handler<S::Db>,
{
    let prefix = unique("c_");
    let subject = format!("{prefix}.orders");
    let config = NatsConfig::new(
        unique("C_"),
        vec![format!("{prefix}.>")],
        unique("durable_"),
    );
    let (processor, handler) = processor(store.clone(), "billing");
    let consumer = NatsConsumer::connect(URL, &config, processor)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(consumer.run(async move {
        let _ = stopped.await;
    }));

    let sink = outbox_sinks::from_url(&format!("{URL}?prefix={prefix}."))
        .await
        .unwrap();
    let mut sent = keyed("orders", 41);
    let last = sent.pop().unwrap();
    assert!(sink.publish(&sent).await.iter().all(Result::is_ok));
    let js = jetstream::new(async_nats::connect(URL).await.unwrap());
    for m in &sent[..10] {
        republish(&js, &subject, m).await;
    }
    // Unreadable: no id at all. It must be set aside without stopping the consumer.
    js.publish(subject.clone(), "{\"n\":-1}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(sink.publish(std::slice::from_ref(&last)).await[0].is_ok());
    sent.push(last);

    // Processing is sequential, so once the last message has its effect, every earlier
    // delivery (the duplicates and the unreadable one included) has been settled.
    let effects = wait_for_effects(&store, sent.len()).await;
    assert_eq!(effects.len(), sent.len());
    assert_once_in_order(&effects, &sent);
    assert_failed_once(&handler, &sent);

    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    assert_eq!(store.effects().await.len(), sent.len());
    // Everything settled, the unreadable message included (terminated, not left pending).
    let info = js
        .get_stream(&config.stream)
        .await
        .unwrap()
        .consumer_info(&config.durable)
        .await
        .unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
    js.delete_stream(&config.stream).await.unwrap();
    store.cleanup().await;
}

#[tokio::test]
async fn nats_messages_take_effect_exactly_once_in_order_on_postgres() {
    exactly_once(postgres().await).await;
}

#[tokio::test]
async fn nats_messages_take_effect_exactly_once_in_order_on_mysql() {
    exactly_once(mysql().await).await;
}

#[tokio::test]
async fn nats_messages_take_effect_exactly_once_in_order_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    exactly_once(sqlite(&dir).await).await;
}

/// The consumer handles each message in a `process` span whose parent is the context the
/// message arrived with, taken from the NATS headers the sink wrote.
#[tokio::test]
async fn the_process_span_continues_the_trace_the_message_arrived_with() {
    use opentelemetry::trace::SpanKind;
    use outbox_testkit::trace::{attribute, parse_traceparent, recorder, spans_of};
    recorder();
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir).await;
    let prefix = unique("c_");
    let config = NatsConfig::new(
        unique("C_"),
        vec![format!("{prefix}.>")],
        unique("durable_"),
    );
    let (processor, _) = processor(store.clone(), "billing");
    let consumer = NatsConsumer::connect(URL, &config, processor)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(consumer.run(async move {
        let _ = stopped.await;
    }));
    let sink = outbox_sinks::from_url(&format!("{URL}?prefix={prefix}."))
        .await
        .unwrap();
    let mut sent = keyed("orders", 1);
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    sent[0]
        .headers
        .insert("traceparent".into(), traceparent.into());
    assert!(sink.publish(&sent).await[0].is_ok());
    wait_for_effects(&store, 1).await;

    let (trace, parent) = parse_traceparent(traceparent).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let span = loop {
        // The destination is the subject, prefix included; the handler fails each message
        // once, so the handled one is the second process span.
        let name = format!("process {prefix}.orders");
        let spans: Vec<_> = spans_of(trace)
            .into_iter()
            .filter(|s| s.name == name)
            .collect();
        if let [failed, s] = &spans[..] {
            assert_eq!(
                attribute(failed, "error.type").as_deref(),
                Some("transient")
            );
            break s.clone();
        }
        assert!(std::time::Instant::now() < deadline, "no process span");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(span.parent_span_id, parent);
    assert!(span.parent_span_is_remote);
    assert_eq!(span.span_kind, SpanKind::Consumer);
    assert_eq!(
        attribute(&span, "messaging.message.id"),
        Some(sent[0].id.to_string())
    );
    assert_eq!(
        attribute(&span, "messaging.consumer.group.name").as_deref(),
        Some("billing")
    );

    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    let js = jetstream::new(async_nats::connect(URL).await.unwrap());
    js.delete_stream(&config.stream).await.unwrap();
    store.cleanup().await;
}
