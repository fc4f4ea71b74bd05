//! E-mail to the card holder: over SMTP when configured, otherwise as `.eml` files in a folder,
//! so the embedded demo needs no mail server.

use std::path::PathBuf;

use lettre::message::{Mailbox, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use outbox_core::SinkError;
use uuid::Uuid;

use crate::db::PaymentEvent;

/// Where the worker sends the e-mail about a finished payment.
pub enum Mailer {
    /// Writes `{payment_id}-{type}.eml`; a redelivery rewrites the same file.
    Folder(PathBuf),
    /// Sends over SMTP, in plain text (the demo does not do TLS).
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
}

impl Mailer {
    /// A mailer over SMTP when `smtp_url` (`smtp://host:port`) is given, else writing into
    /// `folder`, created when missing.
    pub fn new(smtp_url: Option<&str>, folder: PathBuf) -> anyhow::Result<Self> {
        Ok(match smtp_url {
            Some(url) => Self::Smtp(smtp_transport(url)?),
            None => {
                std::fs::create_dir_all(&folder)?;
                Self::Folder(folder)
            }
        })
    }

    /// Sends the e-mail for a `payment.paid` or `payment.rejected` event. The outbox message id
    /// becomes the Message-ID, so a receiver can drop a duplicate delivery.
    pub async fn send(
        &self,
        kind: &str,
        event: &PaymentEvent,
        message_id: Uuid,
    ) -> Result<(), SinkError> {
        let email = compose(kind, event, message_id)?;
        match self {
            Self::Folder(dir) => {
                let path = dir.join(format!("{}-{kind}.eml", event.payment_id));
                let tmp = path.with_extension("eml.tmp");
                let write = async {
                    tokio::fs::write(&tmp, email.formatted()).await?;
                    tokio::fs::rename(&tmp, &path).await
                };
                write.await.map_err(|e| {
                    SinkError::transient(format!("writing {}: {e}", path.display()))
                })?;
                tracing::info!(to = %event.card_holder_email, file = %path.display(), "e-mail written");
                Ok(())
            }
            Self::Smtp(transport) => transport
                .send(email)
                .await
                .map(drop)
                .map_err(|e| SinkError::transient(format!("SMTP: {e}"))),
        }
    }
}

/// `smtp://host[:port]`, plain SMTP (a local relay or a test server).
fn smtp_transport(url: &str) -> anyhow::Result<AsyncSmtpTransport<Tokio1Executor>> {
    let Some(rest) = url.strip_prefix("smtp://") else {
        anyhow::bail!(
            "--smtp-url must look like smtp://host:port (TLS is not supported by the demo)"
        );
    };
    let (host, port) = match rest.trim_end_matches('/').rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse()
                .map_err(|_| anyhow::anyhow!("bad SMTP port in {:?}", outbox_core::redact(url)))?,
        ),
        None => (rest.trim_end_matches('/'), 25),
    };
    Ok(
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .build(),
    )
}

fn compose(kind: &str, e: &PaymentEvent, message_id: Uuid) -> Result<lettre::Message, SinkError> {
    let to = format!(
        "{} <{}>",
        e.card_holder_name.replace(['<', '>', '"'], ""),
        e.card_holder_email
    )
    .parse::<Mailbox>()
    .map_err(|err| SinkError::permanent(format!("bad recipient: {err}")))?;
    let (subject, body) = match kind {
        "payment.paid" => (
            format!("Payment of {} {} received", e.amount, e.currency),
            format!(
                "Hello {},\n\nyour payment {} of {} {} was charged (charge {}).\n\nThank you.\n",
                e.card_holder_name,
                e.payment_id,
                e.amount,
                e.currency,
                e.charge_id.as_deref().unwrap_or("-")
            ),
        ),
        _ => (
            format!("Payment of {} {} declined", e.amount, e.currency),
            format!(
                "Hello {},\n\nyour payment {} of {} {} was declined ({}). Nothing was charged.\n",
                e.card_holder_name,
                e.payment_id,
                e.amount,
                e.currency,
                e.reason.as_deref().unwrap_or("declined")
            ),
        ),
    };
    lettre::Message::builder()
        .from(
            "Payments <payments@outbox.invalid>"
                .parse()
                .expect("static address"),
        )
        .to(to)
        .subject(subject)
        .message_id(Some(format!("<{message_id}@outbox.invalid>")))
        .header(ContentType::TEXT_PLAIN)
        .body(body)
        .map_err(|err| SinkError::permanent(format!("cannot build e-mail: {err}")))
}
