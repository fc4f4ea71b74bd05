//! From a broker message back to an [`outbox_core::Message`]: the inverse of what the sinks of
//! `outbox-sinks` put on the wire (CloudEvents binary mode plus the message's own headers).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use outbox_core::{JSON, Message, Status, partition_for};
use uuid::Uuid;

/// Why a received message cannot be handed to a handler. Such a message is never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Neither the transport's id field nor the `ce-id` header carries an id.
    #[error("no message id (Nats-Msg-Id, message_id or ce-id)")]
    MissingId,
    /// The id found (given here) is not a UUID, so it cannot be the outbox's message id.
    #[error("message id {0:?} is not a UUID")]
    BadId(String),
    /// Neither `ce-type` nor the transport's type field names the message type.
    #[error("no message type (ce-type or the AMQP type property)")]
    MissingType,
}

/// What a transport received, before it is checked.
#[derive(Debug, Default, Clone)]
pub struct Received {
    /// The transport's own id field, when it has one (`Nats-Msg-Id`, AMQP `message_id`).
    pub id: Option<String>,
    /// The subject, routing key or topic the message arrived on.
    pub topic: String,
    /// The transport's own type field, when it has one (AMQP `type`).
    pub message_type: Option<String>,
    /// The record key (Kafka), when the transport has one.
    pub key: Option<String>,
    /// The transport's content type, when it carries one.
    pub content_type: Option<String>,
    /// Every header or property the transport delivered, CloudEvents attributes included.
    pub headers: BTreeMap<String, String>,
    /// The message body as received.
    pub payload: Vec<u8>,
    /// Delivery attempts so far, this one included, as far as the transport counts them.
    pub attempt: i32,
    /// The transport's position of the message (stream sequence, offset).
    pub seq: i64,
}

/// Headers that describe the transport or the envelope rather than the message.
fn is_envelope(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("ce-") || lower.starts_with("nats-") || lower == "content-type"
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The message as the relay claimed it, as far as the wire carries it.
    pub fn into_message(self) -> Result<Message, WireError> {
        let raw_id = self
            .id
            .as_deref()
            .filter(|s| !s.is_empty())
            .or_else(|| self.header("ce-id"))
            .ok_or(WireError::MissingId)?;
        let id = Uuid::parse_str(raw_id).map_err(|_| WireError::BadId(raw_id.to_owned()))?;
        let message_type = self
            .header("ce-type")
            .map(str::to_owned)
            .or_else(|| self.message_type.clone())
            .filter(|t| !t.is_empty())
            .ok_or(WireError::MissingType)?;
        let key = self
            .key
            .clone()
            .or_else(|| self.header("ce-subject").map(str::to_owned));
        let content_type = self
            .content_type
            .clone()
            .or_else(|| self.header("content-type").map(str::to_owned))
            .unwrap_or_else(|| JSON.to_owned());
        let created_at = self
            .header("ce-time")
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map_or_else(Utc::now, |t| t.with_timezone(&Utc));
        let headers = self
            .headers
            .into_iter()
            .filter(|(k, _)| !is_envelope(k))
            .collect();
        Ok(Message {
            id,
            seq: self.seq,
            partition: partition_for(key.as_deref(), id),
            topic: self.topic,
            message_type,
            key,
            payload: self.payload.into(),
            content_type,
            headers,
            created_at,
            available_at: created_at,
            attempts: self.attempt.max(1),
            last_error: None,
            status: Status::InFlight,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(headers: &[(&str, &str)]) -> Received {
        Received {
            topic: "payments".into(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            payload: b"{}".to_vec(),
            attempt: 2,
            ..Received::default()
        }
    }

    #[test]
    fn cloudevents_headers_become_the_message() {
        let id = Uuid::now_v7();
        let m = received(&[
            ("ce-id", &id.to_string()),
            ("ce-type", "payment.created"),
            ("ce-subject", "p-1"),
            ("ce-time", "2026-01-02T03:04:05Z"),
            ("Nats-Msg-Id", &id.to_string()),
            ("traceparent", "00-abc-def-01"),
        ])
        .into_message()
        .unwrap();
        assert_eq!(m.id, id);
        assert_eq!(m.message_type, "payment.created");
        assert_eq!(m.key.as_deref(), Some("p-1"));
        assert_eq!(m.attempts, 2);
        assert_eq!(m.created_at.to_rfc3339(), "2026-01-02T03:04:05+00:00");
        assert_eq!(m.headers.keys().collect::<Vec<_>>(), ["traceparent"]);
    }

    #[test]
    fn the_transport_id_wins_and_bad_ids_are_errors_not_panics() {
        let id = Uuid::now_v7();
        let mut r = received(&[("ce-id", "other"), ("ce-type", "t")]);
        r.id = Some(id.to_string());
        assert_eq!(r.into_message().unwrap().id, id);
        assert_eq!(
            received(&[("ce-id", "42"), ("ce-type", "t")]).into_message(),
            Err(WireError::BadId("42".into()))
        );
        assert_eq!(
            received(&[("ce-type", "t")]).into_message(),
            Err(WireError::MissingId)
        );
        assert_eq!(
            received(&[("ce-id", &id.to_string())]).into_message(),
            Err(WireError::MissingType)
        );
    }
}
