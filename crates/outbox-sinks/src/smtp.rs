//! SMTP: one email per message, for messages that should reach a person (receipts, alerts).
//!
//! ```text
//! smtp://[user:pass@]host[:port]?from=…&(to=…|to_field=…)[&tls=none|starttls|required]
//!        [&templates=DIR][&ca_file=PATH][&timeout_ms=N]
//! smtps://[user:pass@]host[:port]?from=…&(to=…|to_field=…)[&templates=DIR][&ca_file=PATH][&timeout_ms=N]
//! ```
//!
//! - `smtp://` connects in plain text (default port 587) and upgrades with STARTTLS:
//!   `tls=required` (the default) refuses to send over a server that does not offer it,
//!   `tls=none` never upgrades, and `tls=starttls` upgrades when offered; that last one, the
//!   default for `localhost` and loopback addresses, is refused for any other host because
//!   whoever strips the offer reads the mail. `smtps://` (default port 465)
//!   is TLS from the first byte. User and password come from the URL, percent-encoded; with
//!   credentials TLS is required (the default becomes `tls=required`, and `tls=none` or
//!   `tls=starttls` are refused) so that they never travel in clear.
//! - `from` is the sender mailbox (`noreply@shop.example` or `Shop <noreply@shop.example>`,
//!   percent-encoded). The recipient is either fixed (`to=ops@shop.example`) or read from each
//!   payload (`to_field=card_holder_email`, a top-level field, or a JSON pointer such as
//!   `to_field=/customer/email`).
//! - `templates=DIR` holds one template per message type: `DIR/<type>.txt` (for example
//!   `order.created.txt`), with `DIR/default.txt` for types that have none. The first line is
//!   `Subject: …`, the rest is the plain-text body (a blank line after the subject is skipped).
//!   Templates are [MiniJinja](https://docs.rs/minijinja) (Jinja2 syntax) rendered with the
//!   payload's fields at the top level; `id`, `type`, `key` and `topic` are the message's when
//!   the payload has no field of that name, and always available as `message.id`,
//!   `message.type`, `message.key` and `message.topic`; `payload` is the whole payload. Using
//!   an undefined value is an error (test optional fields with `{% if field %}`). The files
//!   are read once, when the sink is built; a block tag alone on its line leaves no blank line. Without `templates` every message gets the
//!   subject `<type>` and its payload as pretty-printed JSON for the body.
//! - `ca_file=PATH` adds a PEM CA to the trusted roots (the system's), for a server whose
//!   certificate a private CA signed. `timeout_ms` bounds each message's whole SMTP exchange
//!   (default 20000, below the relay's 30 s lease).
//!
//! Each email's `Message-ID` is `<{message id}@outbox>`, so a resent message is recognisable
//! as the same email, and the CloudEvents attributes travel as `ce-*` headers. The message's
//! own headers are not copied: arbitrary names could override `From`, `To` or `Bcc`.
//!
//! Outcomes: accepted by the server (250 after `DATA`) is delivered. A message that cannot
//! become an email (no template for its type and no default, a template that fails to render,
//! a missing or invalid recipient) is permanent, dead with that reason. A 5xx reply is
//! permanent, except the authentication replies (530, 534, 535, 538): those are the sink's
//! configuration, shared by every message, and are retried rather than kill the whole outbox.
//! 4xx replies, connection, TLS and timeout failures are transient; after a failure that got
//! no reply at all, the batch's remaining emails fail (transient) without being tried, so an
//! unreachable server costs one timeout per batch rather than one per email.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, Message as Email};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::{Error as SmtpError, PoolConfig};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use outbox_core::{Delivery, Message, Sink, SinkError};

use crate::{SinkUrl, SinkUrlError, cloudevents};

/// Emails of a batch in flight at once (each on its own pooled connection).
const CONCURRENCY: usize = 4;
/// The template for types that have none of their own.
const DEFAULT_TEMPLATE: &str = "default";
/// Authentication replies: the sink's credentials are wrong, not the message.
const AUTH_CODES: &[&str] = &["530", "534", "535", "538"];

/// How TLS is used on an `smtp://` connection; `smtps://` is always [`TlsMode::Implicit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsMode {
    None,
    Opportunistic,
    Required,
    Implicit,
}

/// Where each email goes.
#[derive(Debug, Clone)]
enum Recipient {
    Fixed(Mailbox),
    /// A JSON pointer into the payload.
    Field(String),
}

/// Everything an SMTP sink URL says, checked without connecting.
pub(crate) struct Config {
    host: String,
    port: u16,
    credentials: Option<Credentials>,
    tls: TlsMode,
    ca: Option<Certificate>,
    from: Mailbox,
    to: Recipient,
    templates: Option<Templates>,
    timeout: Duration,
}

impl Config {
    pub(crate) fn parse(u: &SinkUrl<'_>) -> Result<Self, SinkUrlError> {
        let (userinfo, hostport) = match u.address().rsplit_once('@') {
            Some((user, host)) => (Some(user), host),
            None => (None, u.address()),
        };
        let implicit = u.scheme == "smtps";
        let (host, port) = host_port(hostport, if implicit { 465 } else { 587 })
            .map_err(|reason| u.invalid(reason))?;
        let credentials = userinfo.map(|info| {
            let (user, pass) = info.split_once(':').unwrap_or((info, ""));
            Credentials::new(decode(user), decode(pass))
        });
        let tls = tls_mode(u, implicit, credentials.is_some(), is_loopback(&host))?;
        Ok(Self {
            host,
            port,
            credentials,
            tls,
            ca: u
                .get("ca_file")
                .map(|p| read_ca(u, &decode(p)))
                .transpose()?,
            from: mailbox(u, "from")?.ok_or_else(|| u.invalid("needs from=SENDER".into()))?,
            to: recipient(u)?,
            templates: u
                .get("templates")
                .map(|dir| Templates::load(&decode(dir)).map_err(|e| u.invalid(e)))
                .transpose()?,
            timeout: Duration::from_millis(u.number("timeout_ms").unwrap_or(20_000)),
        })
    }
}

/// `host[:port]`, `[v6]` or `[v6]:port`.
fn host_port(s: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("unclosed [ in {s:?}"))?;
        (host, after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| format!("port {p:?} is not a number"))?,
        None => default_port,
    };
    Ok((host.to_owned(), port))
}

/// True for `localhost` and loopback addresses: a relay next to the process that sends on.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// TLS is required by default: opportunistic STARTTLS sends in clear as soon as a server, or
/// someone in the path, leaves the offer out. Only a local relay gets it, and `tls=none` is
/// the explicit way to send in clear.
fn tls_mode(
    u: &SinkUrl<'_>,
    implicit: bool,
    credentials: bool,
    local: bool,
) -> Result<TlsMode, SinkUrlError> {
    let mode = match (implicit, u.get("tls")) {
        (true, None | Some("required")) => TlsMode::Implicit,
        (true, Some(other)) => {
            return Err(u.invalid(format!(
                "tls={other} does not apply to smtps://, which is always TLS"
            )));
        }
        (false, None) if credentials || !local => TlsMode::Required,
        (false, None | Some("starttls")) => TlsMode::Opportunistic,
        (false, Some("required")) => TlsMode::Required,
        (false, Some("none")) => TlsMode::None,
        (false, Some(other)) => {
            return Err(u.invalid(format!(
                "tls {other:?} is not one of none, starttls, required"
            )));
        }
    };
    if mode == TlsMode::Opportunistic && !local {
        return Err(u.invalid(
            "tls=starttls sends in clear when the STARTTLS offer is stripped; use tls=required, \
             or tls=none to send in clear knowingly"
                .into(),
        ));
    }
    if credentials && matches!(mode, TlsMode::None | TlsMode::Opportunistic) {
        return Err(u.invalid(
            "credentials need tls=required (or smtps://): they must not travel in clear".into(),
        ));
    }
    Ok(mode)
}

fn read_ca(u: &SinkUrl<'_>, path: &str) -> Result<Certificate, SinkUrlError> {
    let pem = std::fs::read(path).map_err(|e| u.invalid(format!("ca_file {path}: {e}")))?;
    Certificate::from_pem(&pem).map_err(|e| u.invalid(format!("ca_file {path}: {e}")))
}

fn mailbox(u: &SinkUrl<'_>, option: &str) -> Result<Option<Mailbox>, SinkUrlError> {
    u.get(option)
        .map(|raw| {
            let text = decode(raw);
            text.parse::<Mailbox>()
                .map_err(|e| u.invalid(format!("{option} {text:?} is not a mailbox: {e}")))
        })
        .transpose()
}

fn recipient(u: &SinkUrl<'_>) -> Result<Recipient, SinkUrlError> {
    match (mailbox(u, "to")?, u.get("to_field")) {
        (Some(to), None) => Ok(Recipient::Fixed(to)),
        (None, Some(field)) => {
            let field = decode(field);
            Ok(Recipient::Field(if field.starts_with('/') {
                field
            } else {
                format!("/{}", field.replace('~', "~0").replace('/', "~1"))
            }))
        }
        (Some(_), Some(_)) => Err(u.invalid("takes to= or to_field=, not both".into())),
        (None, None) => Err(
            u.invalid("needs a recipient: to=ADDRESS or to_field=FIELD (a payload field)".into())
        ),
    }
}

/// Percent-decodes a URL part; `+` stays `+`, as addresses use it.
fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The templates of a directory, compiled.
struct Templates {
    env: Environment<'static>,
    types: Vec<String>,
}

impl Templates {
    fn load(dir: &str) -> Result<Self, String> {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("templates {dir}: {e}"))?;
        let mut templates = Self {
            env: text_environment()?,
            types: Vec::new(),
        };
        for entry in entries {
            let path = entry.map_err(|e| format!("templates {dir}: {e}"))?.path();
            let kind = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".txt"));
            if let Some(kind) = kind {
                templates
                    .add(kind, &path)
                    .map_err(|e| format!("template {}: {e}", path.display()))?;
            }
        }
        Ok(templates)
    }

    /// Compiles the subject and body of the template for message type `kind`.
    fn add(&mut self, kind: &str, path: &std::path::Path) -> Result<(), String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let (subject, body) = split_template(&text)
            .ok_or_else(|| "the first line must be \"Subject: …\"".to_owned())?;
        for (part, source) in [("subject", subject), ("body", body)] {
            self.env
                .add_template_owned(format!("{kind}.{part}"), source.to_owned())
                .map_err(|e| e.to_string())?;
        }
        self.types.push(kind.to_owned());
        Ok(())
    }

    /// Subject and body for `m`, or why it has none.
    fn render(&self, m: &Message, context: &serde_json::Value) -> Result<(String, String), String> {
        let kind = [m.message_type.as_str(), DEFAULT_TEMPLATE]
            .into_iter()
            .find(|k| self.types.iter().any(|t| t == k))
            .ok_or_else(|| {
                format!(
                    "no email template for type {:?} and no {DEFAULT_TEMPLATE}.txt",
                    m.message_type
                )
            })?;
        let ctx = minijinja::Value::from(minijinja::value::Serde(context));
        let part = |name: &str| {
            let name = format!("{kind}.{name}");
            self.env
                .get_template(&name)
                .and_then(|t| t.render(&ctx))
                .map_err(|e| format!("template {kind}.txt: {e}"))
        };
        Ok((part("subject")?, part("body")?))
    }
}

/// A MiniJinja environment for plain-text email: no HTML escaping, undefined values are
/// errors except in tests (`{% if field %}`), and a block tag on its own line leaves no blank
/// line behind.
fn text_environment() -> Result<Environment<'static>, String> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(true)
        .build()
        .map_err(|e| e.to_string())?;
    env.set_syntax(syntax);
    Ok(env)
}

/// `Subject: …` on the first line, then the body (one blank line after the subject skipped).
fn split_template(text: &str) -> Option<(&str, &str)> {
    let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
    let subject = first
        .trim_end_matches('\r')
        .strip_prefix("Subject:")?
        .trim();
    let body = rest
        .strip_prefix("\r\n")
        .or_else(|| rest.strip_prefix('\n'))
        .unwrap_or(rest);
    Some((subject, body))
}

/// What templates see: the payload's fields, then the message's attributes where the payload
/// has no field of that name.
fn context(m: &Message) -> serde_json::Value {
    let payload = m.payload_value();
    let message = serde_json::json!({
        "id": m.id.to_string(),
        "type": m.message_type,
        "key": m.key,
        "topic": m.topic,
    });
    let mut ctx = match &payload {
        serde_json::Value::Object(fields) => fields.clone(),
        _ => serde_json::Map::new(),
    };
    if let serde_json::Value::Object(attrs) = &message {
        for (name, value) in attrs {
            ctx.entry(name.clone()).or_insert_with(|| value.clone());
        }
    }
    ctx.insert("message".into(), message);
    ctx.insert("payload".into(), payload);
    serde_json::Value::Object(ctx)
}

/// Sends one email per message over SMTP (see the module docs for the URL, TLS and
/// templates); made from an `smtp://` or `smtps://` URL.
pub struct SmtpSink {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Recipient,
    templates: Option<Templates>,
    timeout: Duration,
    server: String,
}

impl SmtpSink {
    /// Builds the sink an `smtp://` or `smtps://` URL describes. Nothing connects until the
    /// first email: a server that is down shows up as transient failures, retried.
    pub(crate) fn new(config: Config) -> Result<Self, String> {
        let tls = tls(config.tls, &config.host, config.ca)?;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host)
            .port(config.port)
            .tls(tls)
            .timeout(Some(config.timeout))
            .pool_config(PoolConfig::new().max_size(CONCURRENCY as u32));
        if let Some(credentials) = config.credentials {
            builder = builder.credentials(credentials);
        }
        Ok(Self {
            transport: builder.build(),
            from: config.from,
            to: config.to,
            templates: config.templates,
            timeout: config.timeout,
            server: format!("{}:{}", config.host, config.port),
        })
    }

    /// The email for `m`, or why it cannot be one (permanent: retrying cannot help).
    fn email(&self, m: &Message) -> Result<Email, String> {
        let to = match &self.to {
            Recipient::Fixed(to) => to.clone(),
            Recipient::Field(pointer) => recipient_from(m, pointer)?,
        };
        let (subject, body) = match &self.templates {
            Some(templates) => templates.render(m, &context(m))?,
            None => (m.message_type.clone(), default_body(m)),
        };
        let mut builder = Email::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject.replace(['\r', '\n'], " "))
            .message_id(Some(format!("<{}@outbox>", m.id)))
            .header(ContentType::TEXT_PLAIN);
        for (name, value) in cloudevents::attributes(m, cloudevents::DEFAULT_SOURCE) {
            if let Ok(name) = HeaderName::new_from_ascii(name) {
                builder = builder.raw_header(HeaderValue::new(name, value));
            }
        }
        builder.body(body).map_err(|e| format!("email: {e}"))
    }

    /// Sends one email unless an earlier one of the batch found the server unreachable.
    async fn send(&self, m: &Message, unreachable: &AtomicBool) -> Delivery {
        let email = self.email(m).map_err(SinkError::permanent)?;
        if unreachable.load(Ordering::Relaxed) {
            return Err(SinkError::transient(format!(
                "SMTP {}: not tried, the server was unreachable for this batch",
                self.server
            )));
        }
        let sent = tokio::time::timeout(self.timeout, self.transport.send(email)).await;
        let failure = match sent {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if e.status().is_some() => return Err(classify(&e, &self.server)),
            Ok(Err(e)) => format!("SMTP {}: {e}", self.server),
            Err(_) => format!("SMTP {}: no answer within {:?}", self.server, self.timeout),
        };
        // No reply at all (connection, TLS, timeout): the rest of the batch would wait the
        // same way, one timeout after another, and outlive the relay's lease.
        unreachable.store(true, Ordering::Relaxed);
        Err(SinkError::transient(failure))
    }
}

/// lettre's TLS setting for `mode`, verifying the server as `host` against the system roots
/// plus `ca`.
fn tls(mode: TlsMode, host: &str, ca: Option<Certificate>) -> Result<Tls, String> {
    if mode == TlsMode::None {
        return Ok(Tls::None);
    }
    let mut params = TlsParameters::builder(host.to_owned());
    if let Some(ca) = ca {
        params = params.add_root_certificate(ca);
    }
    let params = params.build_rustls().map_err(|e| format!("TLS: {e}"))?;
    Ok(match mode {
        TlsMode::Opportunistic => Tls::Opportunistic(params),
        TlsMode::Required => Tls::Required(params),
        _ => Tls::Wrapper(params),
    })
}

fn recipient_from(m: &Message, pointer: &str) -> Result<Mailbox, String> {
    let payload = m.payload_value();
    let value = payload
        .pointer(pointer)
        .ok_or_else(|| format!("no recipient: the payload has no {pointer}"))?;
    let text = value
        .as_str()
        .ok_or_else(|| format!("recipient {pointer} is not a string: {value}"))?;
    text.parse()
        .map_err(|e| format!("recipient {text:?} at {pointer} is not an address: {e}"))
}

fn default_body(m: &Message) -> String {
    let payload = m.payload_value();
    let mut body = serde_json::to_string_pretty(&payload).unwrap_or_else(|_| payload.to_string());
    body.push('\n');
    body
}

fn classify(e: &SmtpError, server: &str) -> SinkError {
    let message = format!("SMTP {server}: {e}");
    match e.status().map(|c| c.to_string()) {
        Some(code) if e.is_permanent() && !AUTH_CODES.contains(&code.as_str()) => {
            SinkError::permanent(message)
        }
        _ => SinkError::transient(message),
    }
}

#[async_trait]
impl Sink for SmtpSink {
    async fn publish(&self, batch: &[Message]) -> Vec<Delivery> {
        let unreachable = AtomicBool::new(false);
        let sends: Vec<_> = batch.iter().map(|m| self.send(m, &unreachable)).collect();
        stream::iter(sends).buffered(CONCURRENCY).collect().await
    }

    fn name(&self) -> &str {
        "smtp"
    }
}

/// The sink for a parsed `smtp://` or `smtps://` URL.
pub(crate) fn from_url(u: &SinkUrl<'_>) -> Result<SmtpSink, SinkUrlError> {
    SmtpSink::new(Config::parse(u)?).map_err(|e| u.invalid(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_of(url: &str) -> Result<TlsMode, SinkUrlError> {
        let u = SinkUrl::parse(url).unwrap();
        Config::parse(&u).map(|c| c.tls)
    }

    #[test]
    fn tls_is_required_unless_the_server_is_local_or_the_url_opts_out() {
        let q = "?from=a@example.org&to=b@example.org";
        assert_eq!(
            tls_of(&format!("smtp://mail.example.org{q}")).unwrap(),
            TlsMode::Required
        );
        assert_eq!(
            tls_of(&format!("smtp://10.0.0.5:25{q}")).unwrap(),
            TlsMode::Required
        );
        for local in ["localhost", "127.0.0.1:2525", "[::1]:2525"] {
            let mode = tls_of(&format!("smtp://{local}{q}")).unwrap();
            assert_eq!(mode, TlsMode::Opportunistic, "{local}");
        }
        let plain = tls_of(&format!("smtp://mail.example.org{q}&tls=none"));
        assert_eq!(plain.unwrap(), TlsMode::None);
        // Opportunistic STARTTLS sends in clear when someone in the path strips the offer.
        let err = tls_of(&format!("smtp://mail.example.org{q}&tls=starttls")).unwrap_err();
        assert!(err.to_string().contains("tls=required"), "{err}");
    }

    #[test]
    fn hosts_ports_and_ipv6() {
        assert_eq!(host_port("mail", 587), Ok(("mail".into(), 587)));
        assert_eq!(host_port("mail:25", 587), Ok(("mail".into(), 25)));
        assert_eq!(host_port("[::1]:2525", 587), Ok(("::1".into(), 2525)));
        assert_eq!(host_port("[::1]", 465), Ok(("::1".into(), 465)));
        assert!(host_port(":25", 587).is_err());
        assert!(host_port("mail:x", 587).is_err());
    }

    #[test]
    fn templates_start_with_a_subject_line() {
        assert_eq!(
            split_template("Subject: Hi {{ name }}\n\nBody\n"),
            Some(("Hi {{ name }}", "Body\n"))
        );
        assert_eq!(split_template("Subject: x\r\nBody"), Some(("x", "Body")));
        assert_eq!(split_template("Hello\nBody"), None);
    }

    #[test]
    fn payload_fields_win_and_message_attributes_stay_reachable() {
        let m = Message {
            id: uuid::Uuid::now_v7(),
            seq: 1,
            topic: "orders".into(),
            message_type: "order.created".into(),
            key: Some("o-1".into()),
            partition: 0,
            payload: br#"{"id": 42, "name": "Ada"}"#.to_vec().into(),
            content_type: outbox_core::JSON.into(),
            headers: Default::default(),
            created_at: chrono::Utc::now(),
            available_at: chrono::Utc::now(),
            attempts: 1,
            last_error: None,
            status: outbox_core::Status::InFlight,
        };
        let ctx = context(&m);
        assert_eq!(ctx["id"], 42);
        assert_eq!(ctx["type"], "order.created");
        assert_eq!(ctx["message"]["id"], m.id.to_string());
        assert_eq!(ctx["payload"]["name"], "Ada");
    }
}
