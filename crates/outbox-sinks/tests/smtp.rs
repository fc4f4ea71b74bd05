//! The SMTP sink against a real SMTP server on a loopback port (plain, STARTTLS with a private
//! CA, implicit TLS), with templates read from a real directory.
#![cfg(feature = "smtp")]

mod common;
#[path = "common/smtp_server.rs"]
mod smtp_server;

use std::collections::BTreeMap;

use chrono::Utc;
use outbox_core::{Message, SinkError, Status};
use outbox_sinks::SinkUrlError;
use smtp_server::{Security, SmtpServer, pki};
use uuid::Uuid;

fn message(message_type: &str, payload: serde_json::Value) -> Message {
    Message {
        id: Uuid::now_v7(),
        seq: 1,
        topic: "orders".into(),
        message_type: message_type.into(),
        key: Some("o-1".into()),
        partition: 0,
        payload: serde_json::to_vec(&payload).unwrap().into(),
        content_type: outbox_core::JSON.into(),
        headers: BTreeMap::new(),
        created_at: Utc::now(),
        available_at: Utc::now(),
        attempts: 1,
        last_error: None,
        status: Status::InFlight,
    }
}

/// A templates directory holding `files` (name, contents).
fn templates(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

const ORDER_TEMPLATE: &str = "Subject: Order {{ order }} confirmed\n\
    \n\
    Hello {{ customer.name }},\n\
    {% if note %}\n\
    Note: {{ note }}\n\
    {% endif %}\n\
    your order {{ order }} is confirmed (ref {{ message.id }}, {{ type }}).\n";

async fn sink(url: &str) -> std::sync::Arc<dyn outbox_core::Sink> {
    outbox_sinks::from_url(url)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn permanent(out: &outbox_core::Delivery) -> String {
    match out {
        Err(SinkError::Permanent(why)) => why.clone(),
        other => panic!("expected a permanent error, got {other:?}"),
    }
}

fn transient(out: &outbox_core::Delivery) -> String {
    match out {
        Err(SinkError::Transient { message, .. }) => message.clone(),
        other => panic!("expected a transient error, got {other:?}"),
    }
}

#[tokio::test]
async fn each_message_becomes_one_templated_email_to_its_recipient() {
    let server = SmtpServer::start(Security::Plain).await;
    let dir = templates(&[
        ("order.confirmed.txt", ORDER_TEMPLATE),
        (
            "default.txt",
            "Subject: [{{ type }}] {{ key }}\n{{ payload | tojson }}\n",
        ),
    ]);
    let url = format!(
        "smtp://{}?tls=none&from=Shop%20%3Cnoreply@shop.example%3E&to_field=/customer/email&templates={}",
        server.addr,
        dir.path().display()
    );
    let sink = sink(&url).await;
    let mut batch: Vec<Message> = (0..6)
        .map(|i| {
            message(
                "order.confirmed",
                serde_json::json!({
                    "order": i,
                    "customer": {"name": format!("Ada {i}"), "email": format!("ada+{i}@example.org")},
                    "note": if i == 0 { serde_json::json!("gift wrap") } else { serde_json::Value::Null },
                }),
            )
        })
        .collect();
    batch.push(message(
        "order.shipped",
        serde_json::json!({"customer": {"email": "bob@example.org"}}),
    ));

    let out = sink.publish(&batch).await;
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    let mails = server.mails();
    assert_eq!(mails.len(), batch.len());
    for (i, m) in batch[..6].iter().enumerate() {
        let mail = mails
            .iter()
            .find(|mail| mail.header("Message-ID") == Some(format!("<{}@outbox>", m.id)))
            .unwrap_or_else(|| panic!("no email for message {i}"));
        assert_eq!(mail.to, vec![format!("ada+{i}@example.org")]);
        assert_eq!(mail.from, "noreply@shop.example");
        assert!(!mail.tls);
        assert_eq!(mail.header("Subject"), Some(format!("Order {i} confirmed")));
        assert_eq!(mail.header("ce-id"), Some(m.id.to_string()));
        assert_eq!(mail.header("ce-type").as_deref(), Some("order.confirmed"));
        assert_eq!(mail.header("ce-subject").as_deref(), Some("o-1"));
        let from = mail.header("From").unwrap();
        assert!(
            from.contains("Shop") && from.contains("<noreply@shop.example>"),
            "{from}"
        );
        let note = if i == 0 { "Note: gift wrap\r\n" } else { "" };
        let want = format!(
            "Hello Ada {i},\r\n{note}your order {i} is confirmed (ref {}, order.confirmed).\r\n",
            m.id
        );
        assert_eq!(mail.body(), want);
    }
    let shipped = mails
        .iter()
        .find(|mail| mail.to == ["bob@example.org"])
        .expect("the default template's email");
    assert_eq!(
        shipped.header("Subject").as_deref(),
        Some("[order.shipped] o-1")
    );
    assert!(
        shipped.body().contains("bob@example.org"),
        "{}",
        shipped.body()
    );
}

#[tokio::test]
async fn without_templates_the_body_is_the_payload_and_the_recipient_fixed() {
    let server = SmtpServer::start(Security::Plain).await;
    let url = format!(
        "smtp://{}?tls=none&from=noreply@shop.example&to=ops@shop.example",
        server.addr
    );
    let m = message("payment.failed", serde_json::json!({"amount": 12}));
    assert_eq!(
        sink(&url).await.publish(std::slice::from_ref(&m)).await,
        vec![Ok(())]
    );
    let mails = server.mails();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].to, ["ops@shop.example"]);
    assert_eq!(
        mails[0].header("Subject").as_deref(),
        Some("payment.failed")
    );
    assert_eq!(mails[0].body(), "{\r\n  \"amount\": 12\r\n}\r\n");
}

#[tokio::test]
async fn required_starttls_never_sends_in_clear_to_a_server_without_it() {
    let server = SmtpServer::start(Security::Plain).await;
    let url = format!(
        "smtp://{}?tls=required&from=noreply@shop.example&to=ops@shop.example",
        server.addr
    );
    let out = sink(&url)
        .await
        .publish(&[message("t", serde_json::json!({}))])
        .await;
    let why = transient(&out[0]);
    assert!(why.to_lowercase().contains("starttls"), "{why}");
    assert!(server.mails().is_empty(), "sent in clear");
}

#[tokio::test]
async fn starttls_with_a_private_ca_carries_the_credentials_encrypted() {
    let pki = pki();
    let server = SmtpServer::start(Security::StartTls(pki.acceptor.clone())).await;
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &pki.ca_pem).unwrap();
    let base = format!(
        "smtp://mailer:p%40ss%3Aword@{}?from=noreply@shop.example&to=ops@shop.example",
        server.addr
    );
    // The server's certificate is signed by a CA nobody trusts yet: nothing is sent.
    let out = sink(&base)
        .await
        .publish(&[message("t", serde_json::json!({}))])
        .await;
    transient(&out[0]);
    assert!(server.mails().is_empty());

    let url = format!("{base}&ca_file={}", ca.path().display());
    let out = sink(&url)
        .await
        .publish(&[message("t", serde_json::json!({}))])
        .await;
    assert_eq!(out, vec![Ok(())]);
    let mails = server.mails();
    assert_eq!(mails.len(), 1);
    assert!(mails[0].tls, "sent before the upgrade");
    assert_eq!(mails[0].auth.as_deref(), Some("mailer:p@ss:word"));
}

#[tokio::test]
async fn smtps_is_tls_from_the_first_byte() {
    let pki = pki();
    let server = SmtpServer::start(Security::Implicit(pki.acceptor.clone())).await;
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &pki.ca_pem).unwrap();
    let url = format!(
        "smtps://localhost:{}?from=noreply@shop.example&to=ops@shop.example&ca_file={}",
        server.addr.port(),
        ca.path().display()
    );
    let out = sink(&url)
        .await
        .publish(&[message("t", serde_json::json!({}))])
        .await;
    assert_eq!(out, vec![Ok(())]);
    assert!(server.mails()[0].tls);
}

#[tokio::test]
async fn each_message_gets_its_own_outcome() {
    let server = SmtpServer::start(Security::Plain).await;
    let dir = templates(&[("order.confirmed.txt", ORDER_TEMPLATE)]);
    let url = format!(
        "smtp://{}?tls=none&from=noreply@shop.example&to_field=email&templates={}",
        server.addr,
        dir.path().display()
    );
    let good = |email: &str| {
        message(
            "order.confirmed",
            serde_json::json!({"email": email, "order": 1, "customer": {"name": "Ada"}}),
        )
    };
    let batch = vec![
        good("ada@example.org"),
        good("busy@example.org"),
        good("nobody@example.org"),
        message(
            "order.unknown",
            serde_json::json!({"email": "x@example.org"}),
        ),
        message(
            "order.confirmed",
            serde_json::json!({"order": 1, "customer": {"name": "Ada"}}),
        ),
        good("not an address"),
        message(
            "order.confirmed",
            serde_json::json!({"email": "y@example.org", "order": 1}),
        ),
        good("grace@example.org"),
    ];
    let out = sink(&url).await.publish(&batch).await;
    assert_eq!(out.len(), batch.len());
    assert_eq!(out[0], Ok(()));
    assert!(transient(&out[1]).contains("451"), "{:?}", out[1]);
    assert!(permanent(&out[2]).contains("550"), "{:?}", out[2]);
    let why = permanent(&out[3]);
    assert!(
        why.contains("no email template for type \"order.unknown\""),
        "{why}"
    );
    assert!(permanent(&out[4]).contains("no recipient"), "{:?}", out[4]);
    assert!(
        permanent(&out[5]).contains("not an address"),
        "{:?}",
        out[5]
    );
    assert!(
        permanent(&out[6]).contains("order.confirmed.txt"),
        "{:?}",
        out[6]
    );
    assert_eq!(out[7], Ok(()));
    let mut to: Vec<_> = server.mails().into_iter().flat_map(|m| m.to).collect();
    to.sort();
    assert_eq!(to, ["ada@example.org", "grace@example.org"]);
}

#[tokio::test]
async fn a_server_that_is_down_is_a_transient_failure() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!(
        "smtp://127.0.0.1:{port}?tls=none&from=a@example.org&to=b@example.org&timeout_ms=5000"
    );
    let out = sink(&url)
        .await
        .publish(&[message("t", serde_json::json!({}))])
        .await;
    transient(&out[0]);
}

#[tokio::test]
async fn a_server_that_never_answers_costs_one_timeout_per_batch() {
    // Accepts connections and holds them without a greeting, as a hung server does.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (held_tx, mut held) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let _ = held_tx.send(socket);
        }
    });
    let url = format!("smtp://{addr}?tls=none&from=a@example.org&to=b@example.org&timeout_ms=300");
    let batch: Vec<_> = (0..12)
        .map(|_| message("t", serde_json::json!({})))
        .collect();
    let out = sink(&url).await.publish(&batch).await;
    assert_eq!(out.len(), batch.len());
    for o in &out {
        transient(o);
    }
    let mut connections = Vec::new();
    while let Ok(socket) = held.try_recv() {
        connections.push(socket);
    }
    assert!(
        connections.len() <= 4,
        "{} connections: every email waited out its own timeout",
        connections.len()
    );
}

#[tokio::test]
async fn pooled_connections_lost_in_an_outage_are_replaced() {
    let server = SmtpServer::start(Security::Plain).await;
    let proxy = common::Proxy::start(&server.addr.to_string()).await;
    let url = format!(
        "smtp://127.0.0.1:{}?tls=none&from=a@example.org&to=b@example.org&timeout_ms=5000",
        proxy.port
    );
    let sink = sink(&url).await;
    let one = [message("t", serde_json::json!({}))];
    let send = || sink.publish(&one);
    assert_eq!(send().await, vec![Ok(())]);
    proxy.cut();
    transient(&send().await[0]);
    proxy.restore();
    assert_eq!(
        send().await,
        vec![Ok(())],
        "the dead pooled connection was reused"
    );
    assert_eq!(server.mails().len(), 2);
}

fn invalid(url: &str) -> String {
    match outbox_sinks::check_url(url) {
        Err(SinkUrlError::Invalid { reason, .. }) => reason,
        other => panic!("{url}: expected Invalid, got {other:?}"),
    }
}

#[test]
fn check_url_validates_options_and_files_without_connecting() {
    let ok = "smtp://127.0.0.1:1?from=a@example.org&to=b@example.org";
    assert_eq!(outbox_sinks::check_url(ok), Ok(()));
    assert!(invalid(&format!("{ok}&colour=red")).contains("unknown option \"colour\""));
    assert!(invalid("smtp://h?to=b@example.org").contains("from="));
    assert!(invalid("smtp://h?from=a@example.org").contains("recipient"));
    assert!(invalid(&format!("{ok}&to_field=email")).contains("not both"));
    assert!(invalid(&format!("{ok}&tls=maybe")).contains("none, starttls, required"));
    assert!(invalid("smtps://h?from=a@example.org&to=b@example.org&tls=none").contains("smtps"));
    assert!(invalid("smtp://u:p@h?from=a@example.org&to=b@example.org&tls=none").contains("clear"));
    assert!(invalid("smtp://h?from=not-an-address&to=b@example.org").contains("mailbox"));
    assert!(invalid(&format!("{ok}&timeout_ms=soon")).contains("whole number"));
    assert!(invalid(&format!("{ok}&templates=/nonexistent/outbox")).contains("templates"));
    assert!(invalid(&format!("{ok}&ca_file=/nonexistent/ca.pem")).contains("ca_file"));
    let bad = templates(&[("order.txt", "Subject: {{ unclosed\nbody\n")]);
    let why = invalid(&format!("{ok}&templates={}", bad.path().display()));
    assert!(why.contains("order.txt"), "{why}");
    let headless = templates(&[("order.txt", "Hello\n")]);
    let why = invalid(&format!("{ok}&templates={}", headless.path().display()));
    assert!(why.contains("Subject"), "{why}");
    // Credentials default to required STARTTLS rather than being refused.
    assert_eq!(
        outbox_sinks::check_url("smtp://u:p@h?from=a@example.org&to=b@example.org"),
        Ok(())
    );
}
