//! Kafka (feature `kafka`, librdkafka): a consumer group member with auto-commit off.
//!
//! Each record is processed through the inbox; its offset is committed only after the inbox
//! transaction committed. A handler failure is retried in place with the retry delay, before
//! any later record is looked at, so order per partition holds (records of one key share a
//! partition). A record that can never be processed (no parsable id, or a permanent handler
//! error) is logged and skipped: its offset is committed. Stopping while a record is being
//! retried leaves its offset uncommitted, so the group delivers it again.
//!
//! Offsets are committed asynchronously: a commit lost in a crash only means a redelivery,
//! which the inbox recognises.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use rdkafka::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};

use crate::error::ConsumerError;
use crate::inbox::InboxStore;
use crate::process::{Handler, Outcome, Processor, log_outcome};
use crate::wire::Received;

/// Where and how to consume.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// `host:port[,host:port]`.
    pub bootstrap: String,
    /// The consumer group: members share the partitions, the group keeps the offsets.
    pub group_id: String,
    /// Topics as the relay names them (with its `?prefix=`, if any).
    pub topics: Vec<String>,
    /// Further librdkafka properties (security, session timeouts, `debug`…).
    pub properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// Members of the group `group_id` reading `topics` from the brokers at `bootstrap`, with
    /// no further properties.
    pub fn new(
        bootstrap: impl Into<String>,
        group_id: impl Into<String>,
        topics: Vec<String>,
    ) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            group_id: group_id.into(),
            topics,
            properties: BTreeMap::new(),
        }
    }

    /// Sets [`KafkaConfig::bootstrap`].
    pub fn bootstrap(mut self, bootstrap: impl Into<String>) -> Self {
        self.bootstrap = bootstrap.into();
        self
    }

    /// Sets [`KafkaConfig::group_id`].
    pub fn group_id(mut self, group_id: impl Into<String>) -> Self {
        self.group_id = group_id.into();
        self
    }

    /// Sets [`KafkaConfig::topics`].
    pub fn topics(mut self, topics: Vec<String>) -> Self {
        self.topics = topics;
        self
    }

    /// Sets [`KafkaConfig::properties`].
    pub fn properties(mut self, properties: BTreeMap<String, String>) -> Self {
        self.properties = properties;
        self
    }
}

/// A Kafka consumer group member that commits a record's offset only after its inbox
/// transaction committed (see the module docs). Made with [`KafkaConsumer::connect`], then
/// [`KafkaConsumer::run`].
pub struct KafkaConsumer<S: InboxStore, H> {
    processor: Arc<Processor<S, H>>,
    consumer: StreamConsumer,
}

impl<S: InboxStore, H: Handler<S::Db>> KafkaConsumer<S, H> {
    /// Joins the group and subscribes; a new group starts at the earliest offsets.
    pub fn connect(
        config: &KafkaConfig,
        processor: Processor<S, H>,
    ) -> Result<Self, ConsumerError> {
        let mut client = ClientConfig::new();
        for (name, value) in &config.properties {
            client.set(name, value);
        }
        let consumer: StreamConsumer = client
            .set("bootstrap.servers", &config.bootstrap)
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(|e| ConsumerError::connect(&config.bootstrap, e))?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| ConsumerError::setup(format!("subscription to {topics:?}"), e))?;
        Ok(Self {
            processor: Arc::new(processor),
            consumer,
        })
    }

    /// Receives and processes until `stop` completes; the record in hand is finished and its
    /// offset committed first (unless it is still failing).
    pub async fn run(self, stop: impl Future<Output = ()> + Send) -> Result<(), ConsumerError> {
        let mut purge = self.processor.purge_ticker();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return Ok(()),
                _ = purge.tick() => self.processor.purge_expired().await,
                next = self.consumer.recv() => match next {
                    // Broker hiccups: librdkafka reconnects by itself.
                    Err(e) => tracing::warn!("Kafka receive: {e}"),
                    Ok(record) => {
                        if !self.settle(&record, &mut stop).await {
                            return Ok(());
                        }
                    }
                },
            }
        }
    }

    /// Processes `record` until it is done or rejected and commits its offset; false when
    /// `stop` came first (the offset stays uncommitted).
    async fn settle(
        &self,
        record: &BorrowedMessage<'_>,
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> bool {
        let consumer = &self.processor.config().name;
        let mut received = received(record);
        loop {
            let outcome = match received.clone().into_message() {
                Err(e) => {
                    tracing::error!(
                        consumer,
                        topic = record.topic(),
                        offset = record.offset(),
                        "unreadable record skipped: {e}"
                    );
                    Outcome::Reject(e.to_string())
                }
                Ok(m) => {
                    let outcome = self.processor.process(&m).await;
                    log_outcome(consumer, &m, &outcome);
                    outcome
                }
            };
            let Outcome::Retry { after, .. } = outcome else {
                break;
            };
            tokio::select! {
                () = &mut *stop => return false,
                () = tokio::time::sleep(after) => received.attempt += 1,
            }
        }
        if let Err(e) = self.consumer.commit_message(record, CommitMode::Async) {
            tracing::warn!(consumer, "Kafka offset commit failed: {e}");
        }
        true
    }
}

fn received(record: &BorrowedMessage<'_>) -> Received {
    let headers = record
        .headers()
        .map(|h| {
            h.iter()
                .filter_map(|h| {
                    let value = std::str::from_utf8(h.value?).ok()?;
                    Some((h.key.to_owned(), value.to_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    Received {
        topic: record.topic().to_owned(),
        key: record
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned()),
        headers,
        payload: record.payload().unwrap_or_default().to_vec(),
        attempt: 1,
        seq: record.offset(),
        ..Received::default()
    }
}
