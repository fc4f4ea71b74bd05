//! E-mail delivery: the `.eml` folder, and SMTP against a minimal SMTP listener run by the test
//! (just enough of RFC 5321 to accept one message; no mail server runs on this machine).

use outbox_payments::db::PaymentEvent;
use outbox_payments::mail::Mailer;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

fn event() -> PaymentEvent {
    PaymentEvent {
        payment_id: uuid::Uuid::now_v7(),
        amount: "12.30".into(),
        currency: "EUR".into(),
        token_card: "tok".into(),
        card_holder_email: "ana@example.com".into(),
        card_holder_name: "Ana".into(),
        reason: None,
        charge_id: Some("ch_1".into()),
    }
}

/// Accepts one SMTP session and returns the message data it received.
async fn smtp_listener() -> (u16, tokio::task::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let (read, mut write) = socket.into_split();
        let mut lines = BufReader::new(read).lines();
        write.write_all(b"220 test ESMTP\r\n").await.unwrap();
        let mut data = String::new();
        let mut in_data = false;
        while let Some(line) = lines.next_line().await.unwrap() {
            if in_data {
                if line == "." {
                    in_data = false;
                    write.write_all(b"250 queued\r\n").await.unwrap();
                } else {
                    data.push_str(&line);
                    data.push('\n');
                }
                continue;
            }
            let verb = line
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            let reply: &[u8] = match verb.as_str() {
                "EHLO" | "HELO" => b"250 test\r\n",
                "DATA" => {
                    in_data = true;
                    b"354 go on\r\n"
                }
                "QUIT" => {
                    write.write_all(b"221 bye\r\n").await.unwrap();
                    break;
                }
                _ => b"250 ok\r\n",
            };
            write.write_all(reply).await.unwrap();
        }
        data
    });
    (port, handle)
}

#[tokio::test]
async fn paid_mail_goes_out_over_smtp_with_the_message_id() {
    let (port, received) = smtp_listener().await;
    let dir = tempfile::tempdir().unwrap();
    let mailer = Mailer::new(Some(&format!("smtp://127.0.0.1:{port}")), dir.path().into()).unwrap();
    let e = event();
    let id = uuid::Uuid::now_v7();
    mailer.send("payment.paid", &e, id).await.unwrap();
    drop(mailer);
    let data = received.await.unwrap();
    assert!(data.contains("To: Ana <ana@example.com>"), "{data}");
    assert!(
        data.contains("Subject: Payment of 12.30 EUR received"),
        "{data}"
    );
    assert!(
        data.contains(&format!("Message-ID: <{id}@outbox.invalid>")),
        "{data}"
    );
    assert!(data.contains(&e.payment_id.to_string()), "{data}");
}

#[tokio::test]
async fn without_smtp_mail_is_an_eml_file_rewritten_on_redelivery() {
    let dir = tempfile::tempdir().unwrap();
    let mailer = Mailer::new(None, dir.path().join("mail")).unwrap();
    let mut e = event();
    e.reason = Some("do_not_honor".into());
    let id = uuid::Uuid::now_v7();
    mailer.send("payment.rejected", &e, id).await.unwrap();
    mailer.send("payment.rejected", &e, id).await.unwrap();
    let files: Vec<_> = std::fs::read_dir(dir.path().join("mail"))
        .unwrap()
        .map(|f| f.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    // The body is quoted-printable: undo its soft line breaks.
    let text = std::fs::read_to_string(&files[0])
        .unwrap()
        .replace("=\r\n", "")
        .replace("=\n", "");
    assert!(text.contains("declined (do_not_honor)"), "{text}");
}

#[tokio::test]
async fn an_unparseable_recipient_is_a_permanent_error() {
    let dir = tempfile::tempdir().unwrap();
    let mailer = Mailer::new(None, dir.path().into()).unwrap();
    let mut e = event();
    e.card_holder_email = "not an address".into();
    let err = mailer
        .send("payment.paid", &e, uuid::Uuid::now_v7())
        .await
        .unwrap_err();
    assert!(err.is_permanent(), "{err}");
}
