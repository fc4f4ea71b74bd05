//! Webhooks: one signed HTTP POST per message, following Standard Webhooks.
//!
//! Headers: `webhook-id` (the message id: receivers deduplicate on it), `webhook-timestamp`
//! (Unix seconds) and `webhook-signature` (`v1,` + base64 HMAC-SHA256 of `id.timestamp.body`
//! under the `whsec_…` secret), plus the CloudEvents attributes. The body is the payload with
//! its content type. 2xx acks; 408, 429, 5xx, timeouts and connection errors are transient and
//! honour `Retry-After`; any other status is permanent (the receiver refuses this message).
//!
//! Redirects are never followed: a redirected POST becomes a body-less GET whose `200` would
//! ack a message nobody received. A 3xx is a transient failure naming its `Location`, so the
//! operator sees where the endpoint moved and fixes the URL before the messages go dead.
//! The message's own headers go out first and the sink's after them, replacing any namesake:
//! a message header can never stand in for `content-type`, `webhook-*` or `ce-*`.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::stream::{self, StreamExt};
use hmac::{Hmac, Mac};
use outbox_core::{Delivery, Message, Sink, SinkError};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use sha2::Sha256;

use crate::cloudevents;

/// Messages of a batch in flight at once.
const CONCURRENCY: usize = 16;

/// A webhook endpoint.
pub struct WebhookSink {
    http: reqwest::Client,
    url: String,
    /// The URL as errors show it, without credentials.
    shown: String,
    secret: Option<Vec<u8>>,
}

/// A secret that is not `whsec_` followed by base64.
#[derive(Debug, thiserror::Error)]
#[error("webhook secret must be whsec_ followed by base64 ({0})")]
pub struct BadSecret(String);

/// Decodes a `whsec_…` secret into the HMAC key.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, BadSecret> {
    let b64 = secret
        .strip_prefix("whsec_")
        .ok_or_else(|| BadSecret("missing the whsec_ prefix".into()))?;
    let key = B64.decode(b64).map_err(|e| BadSecret(e.to_string()))?;
    if key.len() < MIN_SECRET_BYTES {
        return Err(BadSecret(format!(
            "the key is {} bytes; Standard Webhooks asks for at least {MIN_SECRET_BYTES} bytes",
            key.len()
        )));
    }
    Ok(key)
}

/// The shortest key Standard Webhooks allows: a shorter one can be brute-forced.
const MIN_SECRET_BYTES: usize = 24;

/// The Standard Webhooks signature of one request.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

impl WebhookSink {
    /// Posts to `url`, signing with `secret` (`whsec_…`) when given.
    pub fn new(
        url: &str,
        secret: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, crate::SinkUrlError> {
        let bad = |reason: String| crate::SinkUrlError::Invalid {
            url: outbox_core::redact(url),
            reason: outbox_core::redact(&reason),
        };
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let secret = secret
            .map(decode_secret)
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        if secret.is_none() {
            // Receivers cannot tell these requests from forged ones.
            tracing::warn!(
                url = %outbox_core::redact(url),
                "webhook requests are unsigned; give the sink a whsec_ secret"
            );
        }
        Ok(Self {
            http,
            url: url.to_owned(),
            shown: outbox_core::redact(url),
            secret,
        })
    }

    /// The request headers: the message's own, then the sink's, which replace any namesake.
    fn headers(&self, m: &Message, id: &str, timestamp: i64) -> Result<HeaderMap, SinkError> {
        let mut map = HeaderMap::new();
        for (name, value) in cloudevents::message_headers(m)? {
            map.append(header_name(m, name)?, header_value(m, name, value)?);
        }
        let mut own = vec![
            ("content-type".to_owned(), m.content_type.clone()),
            ("webhook-id".to_owned(), id.to_owned()),
            ("webhook-timestamp".to_owned(), timestamp.to_string()),
        ];
        if let Some(key) = &self.secret {
            let signature = sign(key, id, timestamp, &m.payload);
            own.push(("webhook-signature".to_owned(), signature));
        }
        own.extend(cloudevents::attributes(m, cloudevents::DEFAULT_SOURCE));
        for (name, value) in &own {
            map.insert(header_name(m, name)?, header_value(m, name, value)?);
        }
        Ok(map)
    }

    async fn post(&self, m: &Message) -> Delivery {
        let id = m.id.to_string();
        let timestamp = chrono::Utc::now().timestamp();
        let headers = self.headers(m, &id, timestamp)?;
        let resp = self
            .http
            .post(&self.url)
            .headers(headers)
            .body(m.payload.clone())
            .send()
            .await
            .map_err(|e| {
                // reqwest's message quotes the URL with its query (which may hold a token).
                let e = outbox_core::redact(&e.to_string());
                SinkError::transient(format!("POST {}: {e}", self.shown))
            })?;
        classify(resp.status(), resp.headers())
    }
}

/// A header HTTP cannot carry fails its message alone, permanently: the row will not change.
fn header_name(m: &Message, name: &str) -> Result<HeaderName, SinkError> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|e| {
        SinkError::permanent(format!(
            "cannot send message {}: header {name:?}: {e}",
            m.id
        ))
    })
}

fn header_value(m: &Message, name: &str, value: &str) -> Result<HeaderValue, SinkError> {
    HeaderValue::from_str(value).map_err(|e| {
        SinkError::permanent(format!(
            "cannot send message {}: value of header {name:?}: {e}",
            m.id
        ))
    })
}

fn classify(status: reqwest::StatusCode, headers: &HeaderMap) -> Delivery {
    if status.is_success() {
        return Ok(());
    }
    if status.is_redirection() {
        let location = headers
            .get(reqwest::header::LOCATION)
            .map(|v| outbox_core::redact(&String::from_utf8_lossy(v.as_bytes())))
            .unwrap_or_else(|| "nowhere (no Location header)".into());
        return Err(SinkError::transient(format!(
            "webhook answered {status} redirecting to {location}; redirects are not followed, \
             point the sink at the new URL"
        )));
    }
    let message = format!("webhook answered {status}");
    let transient = status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429;
    if !transient {
        return Err(SinkError::permanent(message));
    }
    let retry_after = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    Err(SinkError::Transient {
        message,
        retry_after,
    })
}

#[async_trait]
impl Sink for WebhookSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        let posts: Vec<_> = batch.iter().map(|m| self.post(m)).collect();
        stream::iter(posts).buffered(CONCURRENCY).collect().await
    }

    fn name(&self) -> &str {
        "webhook"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks specification.
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn statuses_are_transient_or_permanent() {
        let none = HeaderMap::new();
        assert!(classify(reqwest::StatusCode::NO_CONTENT, &none).is_ok());
        assert!(
            classify(reqwest::StatusCode::GONE, &none)
                .unwrap_err()
                .is_permanent()
        );
        assert!(
            classify(reqwest::StatusCode::BAD_REQUEST, &none)
                .unwrap_err()
                .is_permanent()
        );
        let mut h = HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        let err = classify(reqwest::StatusCode::TOO_MANY_REQUESTS, &h).unwrap_err();
        assert_eq!(
            err,
            SinkError::Transient {
                message: "webhook answered 429 Too Many Requests".into(),
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert!(
            !classify(reqwest::StatusCode::SERVICE_UNAVAILABLE, &none)
                .unwrap_err()
                .is_permanent()
        );
    }

    #[test]
    fn secrets_must_be_whsec_base64() {
        assert!(decode_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(decode_secret("whsec_not base64!").is_err());
    }

    #[test]
    fn secrets_shorter_than_the_standard_minimum_are_refused() {
        for short in ["whsec_", &format!("whsec_{}", B64.encode([7u8; 23]))] {
            let err = decode_secret(short).expect_err(short).to_string();
            assert!(err.contains("24 bytes"), "{err}");
        }
        assert_eq!(
            decode_secret(&format!("whsec_{}", B64.encode([7u8; 24])))
                .unwrap()
                .len(),
            24
        );
    }
}
