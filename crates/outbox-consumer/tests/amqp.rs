//! The RabbitMQ consumer against the real broker on 127.0.0.1:5672, with PostgreSQL and SQLite
//! inboxes. Messages are published by the relay's own AMQP sink, so the wire format is the
//! real one.

#![cfg(feature = "amqp")]

mod common;

use common::*;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use outbox_consumer::{AmqpConfig, AmqpConsumer, Handler};

const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A fanout dead-letter exchange `dlx` and the queue that collects what it receives.
async fn dead_letter_queue(ch: &Channel, dlx: &str) -> String {
    ch.exchange_declare(
        dlx.into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let queue = format!("{dlx}.dead");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        dlx.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    queue
}

async fn exactly_once<S: TestDb>(store: S)
where
    Effects: Handler<S::Db>,
{
    let mut config = AmqpConfig::new(unique("q_"), "orders");
    config.exchange = unique("x_");
    config.dead_letter_exchange = Some(unique("dlx_"));
    let conn = Connection::connect(URI, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let dead_letters =
        dead_letter_queue(&ch, config.dead_letter_exchange.as_deref().unwrap()).await;
    let (processor, handler) = processor(store.clone(), "billing");
    let consumer = AmqpConsumer::connect(URI, &config, processor)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(consumer.run(async move {
        let _ = stopped.await;
    }));

    let sink = outbox_sinks::from_url(&format!("{URI}?exchange={}", config.exchange))
        .await
        .unwrap();
    let mut sent = keyed("orders", 41);
    let last = sent.pop().unwrap();
    assert!(sink.publish(&sent).await.iter().all(Result::is_ok));
    // The relay publishes again what it could not ack: the same ids, a second time.
    assert!(sink.publish(&sent[..10]).await.iter().all(Result::is_ok));
    // Unreadable: no id at all. It must be set aside without stopping the consumer.
    ch.basic_publish(
        config.exchange.as_str().into(),
        "orders".into(),
        BasicPublishOptions::default(),
        b"{\"n\":-1}",
        BasicProperties::default(),
    )
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
    let left = ch
        .queue_delete(config.queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(left, 0, "messages left unsettled in the queue");
    let dead = ch
        .basic_get(dead_letters.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("the unreadable message in the dead-letter queue");
    assert_eq!(dead.delivery.data, b"{\"n\":-1}");
    let more = ch
        .queue_delete(dead_letters.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(more, 0, "only the unreadable message is dead");
    for exchange in [
        &config.exchange,
        config.dead_letter_exchange.as_ref().unwrap(),
    ] {
        ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
    }
    store.cleanup().await;
}

#[tokio::test]
async fn amqp_messages_take_effect_exactly_once_in_order_on_postgres() {
    exactly_once(postgres().await).await;
}

#[tokio::test]
async fn amqp_messages_take_effect_exactly_once_in_order_on_mysql() {
    exactly_once(mysql().await).await;
}

#[tokio::test]
async fn amqp_messages_take_effect_exactly_once_in_order_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    exactly_once(sqlite(&dir).await).await;
}

#[tokio::test]
async fn a_connect_error_hides_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let (processor, _) = processor(sqlite(&dir).await, "billing");
    let config = AmqpConfig::new(unique("q_"), "orders");
    let uri = "amqp://u:S3cretXYZ@127.0.0.1:1/%2f";
    let Err(e) = AmqpConsumer::connect(uri, &config, processor).await else {
        panic!("connected to a closed port");
    };
    let text = e.to_string();
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("S3cretXYZ"), "{text}");
}
