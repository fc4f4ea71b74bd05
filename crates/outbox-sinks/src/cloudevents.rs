//! CloudEvents 1.0 binary-mode attributes for transports that carry headers.
//!
//! The payload travels as the event data; the attributes go in headers: `ce-id` (the message id,
//! the deduplication key), `ce-type`, `ce-source`, `ce-time`, `ce-subject` (the key, when there
//! is one) and `ce-specversion`. The message's own headers (trace context such as `traceparent`
//! included) are passed on after them, except those a transport sets itself (see
//! [`outbox_core::headers`]): enqueue refuses them, and a row stored before it did (or written
//! by hand) must not replace a sink's own headers, so they are dropped here.

use outbox_core::{Message, SinkError, headers};

/// The `ce-source` of events published by this relay unless configured otherwise.
pub const DEFAULT_SOURCE: &str = "outbox";

/// The CloudEvents attributes of `m`, in a stable order.
pub fn attributes(m: &Message, source: &str) -> Vec<(String, String)> {
    let mut h = vec![
        ("ce-specversion".to_owned(), "1.0".to_owned()),
        ("ce-id".to_owned(), m.id.to_string()),
        ("ce-type".to_owned(), m.message_type.clone()),
        ("ce-source".to_owned(), source.to_owned()),
        ("ce-time".to_owned(), m.created_at.to_rfc3339()),
    ];
    if let Some(key) = &m.key {
        h.push(("ce-subject".to_owned(), key.clone()));
    }
    h
}

/// The message's own headers that travel with it: reserved names are dropped, and a header
/// some transport cannot carry fails this message alone, permanently and by name (retrying
/// cannot change a stored header).
pub fn message_headers(m: &Message) -> Result<Vec<(&str, &str)>, SinkError> {
    let mut out = Vec::with_capacity(m.headers.len());
    for (name, value) in &m.headers {
        headers::check_carriable(name, value)
            .map_err(|e| SinkError::permanent(format!("cannot send message {}: {e}", m.id)))?;
        if headers::is_reserved(name) {
            tracing::debug!(id = %m.id, header = %name, "dropping a reserved message header");
            continue;
        }
        out.push((name.as_str(), value.as_str()));
    }
    Ok(out)
}

/// The attributes followed by the message's own headers (see [`message_headers`]).
pub fn headers(m: &Message, source: &str) -> Result<Vec<(String, String)>, SinkError> {
    let own = message_headers(m)?;
    let mut h = attributes(m, source);
    h.extend(own.into_iter().map(|(n, v)| (n.to_owned(), v.to_owned())));
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use outbox_core::Status;

    #[test]
    fn maps_the_message_to_binary_mode_attributes() {
        let m = Message {
            id: uuid::Uuid::now_v7(),
            seq: 1,
            topic: "orders".into(),
            message_type: "order.created".into(),
            key: Some("o-1".into()),
            partition: 0,
            payload: "{}".into(),
            content_type: outbox_core::JSON.into(),
            headers: [
                ("traceparent".to_string(), "00-abc-def-01".to_string()),
                ("ce-id".to_string(), "spoofed".to_string()),
            ]
            .into(),
            created_at: Utc::now(),
            available_at: Utc::now(),
            attempts: 1,
            last_error: None,
            status: Status::InFlight,
        };
        let all = headers(&m, "shop").unwrap();
        // Six attributes and traceparent: the spoofed ce-id is dropped, not sent twice.
        assert_eq!(all.len(), 7, "{all:?}");
        let h: std::collections::HashMap<_, _> = all.into_iter().collect();
        assert_eq!(h["ce-id"], m.id.to_string());
        assert_eq!(h["ce-type"], "order.created");
        assert_eq!(h["ce-source"], "shop");
        assert_eq!(h["ce-subject"], "o-1");
        assert_eq!(h["ce-specversion"], "1.0");
        assert_eq!(h["traceparent"], "00-abc-def-01");
        assert!(h["ce-time"].starts_with(&m.created_at.format("%Y-%m-%d").to_string()));
    }
}
