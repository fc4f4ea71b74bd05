//! The message model: what the writer enqueues ([`NewMessage`]) and what the relay claims
//! ([`Message`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::headers::{self, HeaderError};
use crate::partition::partition_for;

/// Content type of JSON payloads.
pub const JSON: &str = "application/json";

/// Limits that keep a bad caller from writing rows the relay or a broker cannot carry.
pub const MAX_TOPIC_LEN: usize = 255;

/// The default largest message a store accepts at enqueue (1 MiB, as most brokers): payload
/// plus header names and values. Stores take another with `with_max_message_size`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;

/// A message that is not stored yet. Build it, then hand it to a store's `enqueue` inside the
/// caller's transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub(crate) id: Uuid,
    pub(crate) topic: String,
    pub(crate) message_type: String,
    pub(crate) key: Option<String>,
    pub(crate) payload: Vec<u8>,
    pub(crate) content_type: String,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) delay: Option<Duration>,
    pub(crate) available_at: Option<DateTime<Utc>>,
}

/// Why a message could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageError {
    /// A required name (`topic`, `type`) is empty or only whitespace.
    #[error("{field} must not be empty")]
    Empty {
        /// The name that is empty.
        field: &'static str,
    },
    /// A name is longer than stores and brokers accept ([`MAX_TOPIC_LEN`] bytes).
    #[error("{field} is longer than {max} bytes")]
    TooLong {
        /// The name that is too long.
        field: &'static str,
        /// The limit, in bytes.
        max: usize,
    },
    /// The value given to [`NewMessage::json`] could not be serialised.
    #[error("payload is not valid JSON: {0}")]
    Json(String),
    /// A header is reserved by a transport or cannot be carried by one.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// Payload and headers together exceed the store's maximum message size.
    #[error("message is {size} bytes, over the limit of {max} bytes (payload and headers)")]
    TooLarge {
        /// The message's size: payload plus header names and values, in bytes.
        size: usize,
        /// The store's limit, in bytes.
        max: usize,
    },
}

impl NewMessage {
    /// A message with a JSON payload, already serialised.
    pub fn json<T: Serialize + ?Sized>(
        topic: impl Into<String>,
        message_type: impl Into<String>,
        payload: &T,
    ) -> Result<Self, MessageError> {
        let bytes = serde_json::to_vec(payload).map_err(|e| MessageError::Json(e.to_string()))?;
        Self::bytes(topic, message_type, JSON, bytes)
    }

    /// A message with an opaque payload and its content type.
    pub fn bytes(
        topic: impl Into<String>,
        message_type: impl Into<String>,
        content_type: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Result<Self, MessageError> {
        let topic = topic.into();
        let message_type = message_type.into();
        check_name("topic", &topic)?;
        check_name("type", &message_type)?;
        Ok(Self {
            id: Uuid::now_v7(),
            topic,
            message_type,
            key: None,
            payload: payload.into(),
            content_type: content_type.into(),
            headers: BTreeMap::new(),
            delay: None,
            available_at: None,
        })
    }

    /// The ordering key: messages with the same key are delivered in enqueue order, one at a
    /// time. It also picks the message's partition.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into()).filter(|k| !k.is_empty());
        self
    }

    /// Adds a header (trace context, correlation ids, …). Headers travel to the sink as is.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the W3C trace context (`traceparent`, and `tracestate` when there is one), for
    /// callers that trace without `tracing`'s OpenTelemetry layer. Enqueue checks the format.
    pub fn trace_context(mut self, traceparent: &str, tracestate: Option<&str>) -> Self {
        self.headers
            .insert(crate::trace::TRACEPARENT.into(), traceparent.into());
        match tracestate {
            Some(state) => {
                self.headers
                    .insert(crate::trace::TRACESTATE.into(), state.into());
            }
            None => {
                self.headers.remove(crate::trace::TRACESTATE);
            }
        }
        self
    }

    /// Replaces all headers.
    pub fn headers(mut self, headers: BTreeMap<String, String>) -> Self {
        self.headers = headers;
        self
    }

    /// Delivers no earlier than `delay` after the enqueueing transaction's clock reading.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Delivers no earlier than `at`.
    pub fn available_at(mut self, at: DateTime<Utc>) -> Self {
        self.available_at = Some(at);
        self
    }

    /// Overrides the generated UUIDv7, for callers that derive ids from their own data.
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// The message's id, a UUIDv7 unless [`NewMessage::with_id`] set one; consumers deduplicate
    /// redeliveries by it.
    pub fn id(&self) -> Uuid {
        self.id
    }
    /// The topic, which routing matches and brokers publish to.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The message type: what happened, for the consumer to dispatch on (`payment.created`, …).
    pub fn message_type(&self) -> &str {
        &self.message_type
    }
    /// The ordering key set with [`NewMessage::key`], if any.
    pub fn key_ref(&self) -> Option<&str> {
        self.key.as_deref()
    }
    /// The payload bytes as they will be stored and delivered.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
    /// The payload's content type (`application/json` for [`NewMessage::json`]).
    pub fn content_type(&self) -> &str {
        &self.content_type
    }
    /// The headers set so far, without the trace context that enqueue may still add.
    pub fn header_map(&self) -> &BTreeMap<String, String> {
        &self.headers
    }
    /// The absolute earliest delivery time, when one was set.
    pub fn absolute_available_at(&self) -> Option<DateTime<Utc>> {
        self.available_at
    }
    /// The delay after enqueue, when one was set.
    pub fn delay_duration(&self) -> Option<Duration> {
        self.delay
    }

    /// The partition stored with the row, derived from the key (or the id when there is no
    /// key) so that scaling out later needs no data migration.
    pub fn partition(&self) -> i32 {
        partition_for(self.key.as_deref(), self.id)
    }

    /// The instant the message becomes deliverable, given the store's clock reading `now`.
    pub fn available_at_from(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let delayed = self
            .delay
            .and_then(|d| chrono::Duration::from_std(d).ok())
            .map(|d| now + d);
        match (self.available_at, delayed) {
            (Some(a), Some(b)) => a.max(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => now,
        }
    }

    /// The bytes the size limit counts: payload, header names and values.
    pub fn size(&self) -> usize {
        let headers: usize = self
            .stored_headers()
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum();
        self.payload.len() + headers
    }

    /// The headers as enqueue stores them: with feature `otel`, the current span's trace
    /// context is added when the caller set none (see [`crate::trace`]).
    pub fn stored_headers(&self) -> Cow<'_, BTreeMap<String, String>> {
        #[cfg(feature = "otel")]
        if let Some(cx) = crate::trace::current_unless_set(&self.headers) {
            let mut headers = self.headers.clone();
            headers.extend(cx);
            return Cow::Owned(headers);
        }
        Cow::Borrowed(&self.headers)
    }

    /// Checks what a store must refuse at enqueue: headers that are reserved or that some
    /// transport cannot carry (see [`crate::headers`]), and a size over `max_bytes`. Every
    /// store's enqueue calls it, so that nothing is stored that a sink would drop or choke on.
    pub fn check(&self, max_bytes: usize) -> Result<(), MessageError> {
        for (name, value) in self.stored_headers().iter() {
            headers::check(name, value)?;
        }
        let size = self.size();
        if size > max_bytes {
            return Err(MessageError::TooLarge {
                size,
                max: max_bytes,
            });
        }
        Ok(())
    }

    /// Headers as a JSON object, the storage form.
    pub fn headers_json(&self) -> String {
        serde_json::to_string(&self.stored_headers()).unwrap_or_else(|_| "{}".into())
    }
}

/// A message a store refused to enqueue, and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("outbox message {id} refused: {error}")]
pub struct Refused {
    /// The message the batch was refused at (the batch's first bad one).
    pub id: Uuid,
    /// What is wrong with it.
    pub error: MessageError,
}

/// Checks every message of a batch before anything is written, so that a batch goes in whole
/// or not at all; every store's enqueue calls it.
pub fn check_batch(msgs: &[NewMessage], max_bytes: usize) -> Result<(), Refused> {
    for m in msgs {
        m.check(max_bytes)
            .map_err(|error| Refused { id: m.id(), error })?;
    }
    Ok(())
}

fn check_name(field: &'static str, value: &str) -> Result<(), MessageError> {
    if value.trim().is_empty() {
        return Err(MessageError::Empty { field });
    }
    if value.len() > MAX_TOPIC_LEN {
        return Err(MessageError::TooLong {
            field,
            max: MAX_TOPIC_LEN,
        });
    }
    Ok(())
}

/// Where a stored message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for delivery (possibly delayed or backing off until `available_at`).
    Pending,
    /// Claimed by a relay under a lease; returns to `Pending` by itself if the lease expires.
    InFlight,
    /// Delivered and kept for the retention window.
    Delivered,
    /// Gave up: attempts exhausted or a permanent error. Kept until retried or purged.
    Dead,
}

impl Status {
    /// The name stores write and operator commands print: `pending`, `in_flight`, `delivered` or
    /// `dead`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::InFlight => "in_flight",
            Status::Delivered => "delivered",
            Status::Dead => "dead",
        }
    }

    /// The status named `s`, or `None` for a name this build does not know.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Status::Pending,
            "in_flight" => Status::InFlight,
            "delivered" => Status::Delivered,
            "dead" => Status::Dead,
            _ => return None,
        })
    }
}

/// A status read back that this build does not know: corrupt data or a schema of a newer
/// build. Stores report it as an error, never guess, since a guess of `pending` would put the
/// message back in delivery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown message status {0:?}")]
pub struct UnknownStatus(pub String);

impl std::str::FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::parse(s).ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// A stored message, as a relay claims it or an operator lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The id given at enqueue (a UUIDv7 unless the writer chose one); the same on every
    /// redelivery, so consumers deduplicate by it.
    pub id: Uuid,
    /// Position in the outbox: the per-key delivery order.
    pub seq: i64,
    /// The topic the writer gave; sinks and routes use it to pick a destination.
    pub topic: String,
    /// The message type: what happened, for the consumer to dispatch on.
    #[serde(rename = "type")]
    pub message_type: String,
    /// The ordering key: messages with the same key are delivered one at a time, in `seq` order.
    pub key: Option<String>,
    /// The partition (`0..PARTITIONS`) the key (or, without a key, the id) hashes to; relays
    /// lease partitions to share the outbox.
    pub partition: i32,
    /// Shared, not copied, when the message is cloned (a router hands it to several sinks).
    #[serde(with = "payload_serde")]
    pub payload: Bytes,
    /// The payload's content type, as given at enqueue.
    pub content_type: String,
    /// Headers as enqueued, trace context included when there was one.
    pub headers: BTreeMap<String, String>,
    /// When the message was enqueued.
    pub created_at: DateTime<Utc>,
    /// The earliest time the message may be claimed: after its delay or a failed attempt's
    /// backoff; while a lease holds it, when the lease expires.
    pub available_at: DateTime<Utc>,
    /// Delivery attempts so far, the current one included once claimed.
    pub attempts: i32,
    /// The error of the last failed attempt, as the store keeps it (see `storable_error`).
    pub last_error: Option<String>,
    /// Where the message is in its life.
    pub status: Status,
}

impl Message {
    /// The payload parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    /// The payload as a JSON value when it is JSON, else as a string (UTF-8, lossy).
    pub fn payload_value(&self) -> serde_json::Value {
        payload_value(&self.content_type, &self.payload)
    }
}

/// Decodes stored headers; a corrupt header column must not stop delivery of the payload.
pub fn parse_headers(raw: &str) -> BTreeMap<String, String> {
    serde_json::from_str(raw).unwrap_or_default()
}

pub(crate) fn payload_value(content_type: &str, payload: &[u8]) -> serde_json::Value {
    if content_type.starts_with(JSON)
        && let Ok(v) = serde_json::from_slice(payload)
    {
        return v;
    }
    serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
}

/// Messages serialise their payload as JSON when it is JSON, so listings stay readable.
mod payload_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match serde_json::from_slice::<serde_json::Value>(bytes) {
            Ok(v) => serde::Serialize::serialize(&v, s),
            Err(_) => s.serialize_str(&String::from_utf8_lossy(bytes)),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bytes::Bytes, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Ok(match v {
            serde_json::Value::String(s) => s.into_bytes().into(),
            other => serde_json::to_vec(&other)
                .map_err(serde::de::Error::custom)?
                .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_rejects_empty_topic_and_type() {
        assert_eq!(
            NewMessage::json("", "t", &1).unwrap_err(),
            MessageError::Empty { field: "topic" }
        );
        assert_eq!(
            NewMessage::json("t", " ", &1).unwrap_err(),
            MessageError::Empty { field: "type" }
        );
    }

    #[test]
    fn check_refuses_reserved_headers_and_oversized_messages_by_name() {
        let m = NewMessage::json("t", "e", &1)
            .unwrap()
            .header("Nats-Msg-Id", "x");
        let e = m.check(DEFAULT_MAX_MESSAGE_BYTES).unwrap_err();
        assert!(e.to_string().contains("Nats-Msg-Id"), "{e}");
        let m = NewMessage::bytes("t", "e", "x", vec![0u8; 100]).unwrap();
        assert_eq!(m.check(100), Ok(()));
        let m = m.header("x-a", "b");
        assert_eq!(
            m.check(100),
            Err(MessageError::TooLarge {
                size: 104,
                max: 100
            })
        );
        assert!(
            m.check(100)
                .unwrap_err()
                .to_string()
                .contains("limit of 100 bytes")
        );
    }

    #[test]
    fn ids_are_time_ordered_v7() {
        let a = NewMessage::json("t", "e", &1).unwrap();
        let b = NewMessage::json("t", "e", &1).unwrap();
        assert_eq!(a.id().get_version_num(), 7);
        assert!(a.id() < b.id());
    }

    #[test]
    fn same_key_same_partition() {
        let a = NewMessage::json("t", "e", &1).unwrap().key("order-1");
        let b = NewMessage::json("u", "f", &2).unwrap().key("order-1");
        assert_eq!(a.partition(), b.partition());
    }

    #[test]
    fn empty_key_means_no_key() {
        let a = NewMessage::json("t", "e", &1).unwrap().key("");
        assert_eq!(a.key_ref(), None);
    }

    #[test]
    fn delay_and_available_at_take_the_later() {
        let now = Utc::now();
        let later = now + chrono::Duration::seconds(60);
        let m = NewMessage::json("t", "e", &1)
            .unwrap()
            .delay(Duration::from_secs(10))
            .available_at(later);
        assert_eq!(m.available_at_from(now), later);
        let m = NewMessage::json("t", "e", &1)
            .unwrap()
            .delay(Duration::from_secs(10));
        assert_eq!(
            m.available_at_from(now),
            now + chrono::Duration::seconds(10)
        );
    }

    #[test]
    fn payload_value_decodes_json_and_falls_back_to_text() {
        assert_eq!(
            payload_value(JSON, b"{\"a\":1}"),
            serde_json::json!({"a": 1})
        );
        assert_eq!(payload_value("text/plain", b"hi"), serde_json::json!("hi"));
    }
}
