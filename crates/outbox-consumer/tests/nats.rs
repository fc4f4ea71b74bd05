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
async fn nats_messages_take_effect_exactly_once_in_order_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    exactly_once(sqlite(&dir).await).await;
}
