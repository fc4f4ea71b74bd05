//! Kafka (feature `kafka`, librdkafka): an idempotent producer with `acks=all`; the record key
//! is the message key, so one key stays in one partition and in order; the CloudEvents
//! attributes go in record headers. A batch is handed to librdkafka at once and its delivery
//! reports awaited together. While no broker answers, deliveries time out and are retried by
//! the relay.

use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{Delivery, Message, Sink, SinkError};
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::cloudevents;

/// Produces to Kafka with an idempotent, `acks=all` producer, one record per message keyed by
/// the message key (see the module docs); made with [`KafkaSink::new`] or from a `kafka://` URL.
pub struct KafkaSink {
    producer: FutureProducer,
    prefix: String,
}

impl KafkaSink {
    /// Produces to `bootstrap` (`host:port[,host:port]`); a delivery not acknowledged within
    /// `timeout` fails (transient) and is retried by the relay.
    pub fn new(bootstrap: &str, prefix: &str, timeout: Duration) -> Result<Self, KafkaError> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", timeout.as_millis().to_string())
            .create()?;
        Ok(Self {
            producer,
            prefix: prefix.to_owned(),
        })
    }

    fn headers(m: &Message) -> Result<OwnedHeaders, SinkError> {
        let headers = cloudevents::headers(m, cloudevents::DEFAULT_SOURCE)?
            .into_iter()
            .chain([("content-type".to_owned(), m.content_type.clone())])
            .fold(OwnedHeaders::new(), |h, (key, value)| {
                h.insert(Header {
                    key: &key,
                    value: Some(&value),
                })
            });
        Ok(headers)
    }
}

#[async_trait]
impl Sink for KafkaSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        let mut reports = Vec::with_capacity(batch.len());
        for m in batch {
            let headers = match Self::headers(m) {
                Ok(h) => h,
                Err(e) => {
                    reports.push(Err(e));
                    continue;
                }
            };
            let topic = format!("{}{}", self.prefix, m.topic);
            let mut record = FutureRecord::to(&topic)
                .payload(&m.payload[..])
                .headers(headers);
            if let Some(key) = &m.key {
                record = record.key(key.as_str());
            }
            reports.push(
                self.producer
                    .send_result(record)
                    .map_err(|(e, _)| SinkError::transient(format!("Kafka enqueue: {e}"))),
            );
        }
        let mut out = Vec::with_capacity(batch.len());
        for report in reports {
            out.push(match report {
                Err(e) => Err(e),
                Ok(future) => match future.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(SinkError::transient(format!("Kafka delivery: {e}"))),
                    Err(_) => Err(SinkError::transient("Kafka producer went away")),
                },
            });
        }
        out
    }

    fn name(&self) -> &str {
        "kafka"
    }
}
