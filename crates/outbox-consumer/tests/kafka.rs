//! The Kafka consumer against librdkafka's mock cluster (the real protocol, in process), with
//! PostgreSQL and SQLite inboxes. Records carry the relay's wire format: key = message key,
//! CloudEvents headers from `outbox_sinks::cloudevents`.

#![cfg(feature = "kafka")]

mod common;

use std::time::Duration;

use common::*;
use outbox_consumer::{Handler, KafkaConfig, KafkaConsumer};
use outbox_core::Message;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};

async fn produce(producer: &FutureProducer, topic: &str, m: &Message) {
    let headers = outbox_sinks::cloudevents::headers(m, "outbox")
        .unwrap()
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key: &key,
                value: Some(&value),
            })
        });
    let record = FutureRecord::to(topic)
        .key(m.key.as_deref().unwrap_or_default())
        .payload(&m.payload[..])
        .headers(headers);
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// Runs a consumer of `group` until the effects hold `count` rows, then stops it gracefully.
async fn consume_until<S: TestDb>(
    store: &S,
    config: &KafkaConfig,
    count: usize,
) -> (Vec<Effect>, std::sync::Arc<Effects>)
where
    Effects: Handler<S::Db>,
{
    let (processor, handler) = processor(store.clone(), "billing");
    let consumer = KafkaConsumer::connect(config, processor).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(consumer.run(async move {
        let _ = stopped.await;
    }));
    let effects = wait_for_effects(store, count).await;
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    (effects, handler)
}

async fn exactly_once<S: TestDb>(store: S)
where
    Effects: Handler<S::Db>,
{
    let cluster = MockCluster::new(1).unwrap();
    let topic = unique("orders_");
    cluster.create_topic(&topic, 3, 1).unwrap();
    let config = KafkaConfig::new(
        cluster.bootstrap_servers(),
        unique("group_"),
        vec![topic.clone()],
    )
    // The mock cluster's coordinator lets a rebalance run for the session timeout before it
    // admits the next member: keep it short so the restart below is quick.
    .properties([("session.timeout.ms".to_owned(), "6000".to_owned())].into());
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap)
        .create()
        .unwrap();

    let mut sent = keyed(&topic, 45);
    let later = sent.split_off(42);
    // The last message of each key (one per partition) comes after the duplicates and the
    // unreadable record: once all three have their effect, everything before was settled.
    let last = sent.split_off(39);
    for m in &sent {
        produce(&producer, &topic, m).await;
    }
    for m in &sent[..10] {
        produce(&producer, &topic, m).await; // redelivered by the relay: the same ids
    }
    for key in ["k0", "k1", "k2"] {
        let record = FutureRecord::to(&topic).key(key).payload("{\"n\":-1}");
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
    for m in &last {
        produce(&producer, &topic, m).await;
    }
    sent.extend(last);
    let (effects, handler) = consume_until(&store, &config, sent.len()).await;
    assert_eq!(effects.len(), sent.len());
    assert_once_in_order(&effects, &sent);
    assert_failed_once(&handler, &sent);

    // A new member of the group after a graceful stop resumes where the first one left off:
    // whatever it receives again changes nothing, the new messages take effect once.
    for m in &later {
        produce(&producer, &topic, m).await;
    }
    sent.extend(later);
    let (effects, _) = consume_until(&store, &config, sent.len()).await;
    assert_eq!(effects.len(), sent.len());
    assert_once_in_order(&effects, &sent);
    store.cleanup().await;
}

#[tokio::test]
async fn kafka_records_take_effect_exactly_once_in_order_on_postgres() {
    exactly_once(postgres().await).await;
}

#[tokio::test]
async fn kafka_records_take_effect_exactly_once_in_order_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    exactly_once(sqlite(&dir).await).await;
}
