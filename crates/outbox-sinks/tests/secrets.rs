//! A sink's errors never carry the credentials of its URL: neither when it cannot be built or
//! connected (printed at start) nor when a delivery fails (stored as `last_error`, logged).

use std::collections::BTreeMap;

use chrono::Utc;
use outbox_core::{Message, Status};
use uuid::Uuid;

const SECRET: &str = "S3cretXYZ";

fn message() -> Message {
    Message {
        id: Uuid::now_v7(),
        seq: 1,
        topic: "orders".into(),
        message_type: "order.created".into(),
        key: Some("k".into()),
        partition: 0,
        payload: b"{\"to\":\"ana@example.com\"}".to_vec().into(),
        content_type: outbox_core::JSON.into(),
        headers: BTreeMap::new(),
        created_at: Utc::now(),
        available_at: Utc::now(),
        attempts: 1,
        last_error: None,
        status: Status::InFlight,
    }
}

async fn open_error(url: &str) -> String {
    match outbox_sinks::from_url(url).await {
        Ok(_) => panic!("{url} opened"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn connect_and_url_errors_hide_the_password() {
    let mut urls = vec![
        format!("nats://u:{SECRET}@127.0.0.1:1?bogus=1"),
        format!("mqtt://u:{SECRET}@127.0.0.1:1?bogus=1"),
        format!("smtp://u:{SECRET}@127.0.0.1:1?to=a@example.com"),
        format!("kafka://u:{SECRET}@127.0.0.1:1?bogus=1"),
        format!("gopher://u:{SECRET}@127.0.0.1:1"),
        format!("u:{SECRET}@127.0.0.1:1"),
    ];
    if cfg!(feature = "amqp") {
        urls.push(format!("amqp://u:{SECRET}@127.0.0.1:1/%2f"));
    }
    if cfg!(feature = "redis") {
        urls.push(format!("redis://:{SECRET}@127.0.0.1:1"));
        urls.push(format!("redis://u:{SECRET}@127.0.0.1:1?maxlen=x"));
    }
    for url in &urls {
        let text = open_error(url).await;
        assert!(!text.contains(SECRET), "{url}: {text}");
    }
    let text = outbox_sinks::check_url(&urls[0]).unwrap_err().to_string();
    assert!(!text.contains(SECRET), "{text}");
}

#[cfg(feature = "webhook")]
#[tokio::test]
async fn failed_webhook_posts_hide_the_password() {
    let sink = outbox_sinks::WebhookSink::new(
        &format!("http://u:{SECRET}@127.0.0.1:1/hook"),
        None,
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    let outcome = outbox_core::Sink::publish(&sink, &[message()]).await;
    let text = outcome[0].as_ref().unwrap_err().to_string();
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains(SECRET), "{text}");
}

#[cfg(feature = "smtp")]
#[tokio::test]
async fn failed_mail_hides_the_password() {
    let sink = outbox_sinks::from_url(&format!(
        "smtp://u:{SECRET}@127.0.0.1:1?from=outbox@example.com&to_field=to&tls=none&timeout_ms=2000"
    ))
    .await;
    // Credentials over plain text are refused: that refusal must not show them either.
    let sink = match sink {
        Ok(sink) => sink,
        Err(e) => {
            let text = e.to_string();
            assert!(!text.contains(SECRET), "{text}");
            return;
        }
    };
    let outcome = sink.publish(&[message()]).await;
    let text = outcome[0].as_ref().unwrap_err().to_string();
    assert!(!text.contains(SECRET), "{text}");
}
