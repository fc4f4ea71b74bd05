//! CloudEvents 1.0 binary-mode attributes for transports that carry headers.
//!
//! The payload travels as the event data; the attributes go in headers: `ce-id` (the message id,
//! the deduplication key), `ce-type`, `ce-source`, `ce-time`, `ce-subject` (the key, when there
//! is one) and `ce-specversion`. The message's own headers (trace context such as `traceparent`
//! included) are passed on unchanged.

use outbox_core::Message;

/// The `ce-source` of events published by this relay unless configured otherwise.
pub const DEFAULT_SOURCE: &str = "outbox";

/// Header name and value pairs for `m`, in a stable order.
pub fn headers(m: &Message, source: &str) -> Vec<(String, String)> {
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
    for (name, value) in &m.headers {
        if !name.to_ascii_lowercase().starts_with("ce-") {
            h.push((name.clone(), value.clone()));
        }
    }
    h
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
            payload: b"{}".to_vec(),
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
        let h: std::collections::HashMap<_, _> = headers(&m, "shop").into_iter().collect();
        assert_eq!(h["ce-id"], m.id.to_string());
        assert_eq!(h["ce-type"], "order.created");
        assert_eq!(h["ce-source"], "shop");
        assert_eq!(h["ce-subject"], "o-1");
        assert_eq!(h["ce-specversion"], "1.0");
        assert_eq!(h["traceparent"], "00-abc-def-01");
        assert!(h["ce-time"].starts_with(&m.created_at.format("%Y-%m-%d").to_string()));
    }
}
