//! A real SMTP server on a loopback port, speaking enough of RFC 5321 for a client: EHLO,
//! STARTTLS (RFC 3207) or TLS from the first byte, AUTH PLAIN, MAIL, RCPT, DATA, RSET, NOOP,
//! QUIT. It records each accepted email. Recipients choose the reply to their RCPT: a local
//! part `busy` gets `451` (try later), `nobody` gets `550` (no such user), anything else `250`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// One email the server accepted.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    /// Headers and body, dot-unstuffed, CRLF line ends.
    pub data: String,
    /// Whether the session was encrypted when the email arrived.
    pub tls: bool,
    /// `user:password` from AUTH PLAIN, when the client authenticated.
    pub auth: Option<String>,
}

impl Mail {
    /// A header's value (unfolded), by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next().unwrap_or("");
        let mut found: Option<String> = None;
        for line in head.split("\r\n") {
            if line.starts_with([' ', '\t']) {
                if let Some(v) = found.as_mut() {
                    v.push_str(line.trim_start());
                }
                continue;
            }
            if found.is_some() {
                break;
            }
            if let Some((n, v)) = line.split_once(':')
                && n.eq_ignore_ascii_case(name)
            {
                found = Some(v.trim().to_owned());
            }
        }
        found
    }

    /// The body, decoded from quoted-printable when sent so, without the line end that
    /// precedes the end-of-data dot.
    pub fn body(&self) -> String {
        let raw = self.data.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let raw = raw.strip_suffix("\r\n").unwrap_or(raw);
        let qp = self
            .header("Content-Transfer-Encoding")
            .is_some_and(|e| e.eq_ignore_ascii_case("quoted-printable"));
        if qp {
            quoted_printable(raw)
        } else {
            raw.to_owned()
        }
    }
}

/// RFC 2045 quoted-printable: `=XX` bytes and `=` soft line breaks.
fn quoted_printable(text: &str) -> String {
    let bytes = text.replace("=\r\n", "").into_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(b) if bytes[i] == b'=' => {
                out.push(b);
                i += 3;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How the server treats TLS.
#[derive(Clone)]
pub enum Security {
    /// Never offers STARTTLS.
    Plain,
    /// Offers STARTTLS with this certificate.
    StartTls(TlsAcceptor),
    /// TLS from the first byte (port 465 style).
    Implicit(TlsAcceptor),
}

pub struct SmtpServer {
    pub addr: SocketAddr,
    pub mails: Arc<Mutex<Vec<Mail>>>,
}

impl SmtpServer {
    pub async fn start(security: Security) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mails: Arc<Mutex<Vec<Mail>>> = Arc::default();
        let recorded = mails.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve(tcp, security.clone(), recorded.clone()));
            }
        });
        Self { addr, mails }
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap().clone()
    }
}

/// A CA and a server certificate it signed for `localhost` and `127.0.0.1`.
pub struct TestPki {
    pub ca_pem: String,
    pub acceptor: TlsAcceptor,
}

pub fn pki() -> TestPki {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "outbox test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let chain: Vec<CertificateDer<'static>> = vec![leaf.der().clone()];
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    TestPki {
        ca_pem: ca.pem(),
        acceptor: TlsAcceptor::from(Arc::new(config)),
    }
}

type Mails = Arc<Mutex<Vec<Mail>>>;

async fn serve(tcp: TcpStream, security: Security, mails: Mails) {
    match security {
        Security::Implicit(acceptor) => {
            if let Ok(tls) = acceptor.accept(tcp).await {
                session(tls, true, false, true, &mails).await;
            }
        }
        Security::Plain => {
            session(tcp, false, false, true, &mails).await;
        }
        Security::StartTls(acceptor) => {
            if let Some(tcp) = session(tcp, false, true, true, &mails).await
                && let Ok(tls) = acceptor.accept(tcp).await
            {
                session(tls, true, false, false, &mails).await;
            }
        }
    }
}

#[derive(Default)]
struct Transaction {
    from: Option<String>,
    to: Vec<String>,
}

/// Runs one session over `stream`; returns the stream when the client asked for STARTTLS.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    tls: bool,
    offer_starttls: bool,
    greet: bool,
    mails: &Mails,
) -> Option<S> {
    let mut io = BufReader::new(stream);
    if greet {
        reply(&mut io, "220 localhost ESMTP test").await?;
    }
    let mut tx = Transaction::default();
    let mut auth = None;
    loop {
        let line = read_line(&mut io).await?;
        let upper = line.to_ascii_uppercase();
        let verb = upper.split(' ').next().unwrap_or("");
        match verb {
            "EHLO" | "HELO" => {
                let mut ext = vec!["250-localhost", "250-8BITMIME"];
                if offer_starttls {
                    ext.push("250-STARTTLS");
                }
                if tls {
                    ext.push("250-AUTH PLAIN");
                }
                ext.push("250 SMTPUTF8");
                reply(&mut io, &ext.join("\r\n")).await?;
            }
            "STARTTLS" if offer_starttls => {
                reply(&mut io, "220 2.0.0 go ahead").await?;
                return Some(io.into_inner());
            }
            "AUTH" if tls => {
                auth = Some(plain_auth(&mut io, &line).await?);
                reply(&mut io, "235 2.7.0 authenticated").await?;
            }
            "MAIL" => {
                tx = Transaction {
                    from: Some(address(&line)),
                    to: Vec::new(),
                };
                reply(&mut io, "250 2.1.0 ok").await?;
            }
            "RCPT" => {
                let to = address(&line);
                let answer = match to.split('@').next() {
                    Some("busy") => "451 4.2.1 mailbox busy, try later",
                    Some("nobody") => "550 5.1.1 no such user",
                    _ => {
                        tx.to.push(to);
                        "250 2.1.5 ok"
                    }
                };
                reply(&mut io, answer).await?;
            }
            "DATA" if !tx.to.is_empty() => {
                reply(&mut io, "354 end with .").await?;
                let data = read_data(&mut io).await?;
                let from = tx.from.take().unwrap_or_default();
                let to = std::mem::take(&mut tx.to);
                mails.lock().unwrap().push(Mail {
                    from,
                    to,
                    data,
                    tls,
                    auth: auth.clone(),
                });
                reply(&mut io, "250 2.0.0 queued").await?;
            }
            "RSET" => {
                tx = Transaction::default();
                reply(&mut io, "250 2.0.0 ok").await?;
            }
            "NOOP" => reply(&mut io, "250 2.0.0 ok").await?,
            "QUIT" => {
                reply(&mut io, "221 2.0.0 bye").await?;
                return None;
            }
            _ => reply(&mut io, "502 5.5.1 not here").await?,
        }
    }
}

async fn reply<S: AsyncRead + AsyncWrite + Unpin>(io: &mut BufReader<S>, text: &str) -> Option<()> {
    let w = io.get_mut();
    w.write_all(format!("{text}\r\n").as_bytes()).await.ok()?;
    w.flush().await.ok()
}

async fn read_line<S: AsyncRead + Unpin>(io: &mut BufReader<S>) -> Option<String> {
    let mut line = String::new();
    match io.read_line(&mut line).await {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim_end_matches(['\r', '\n']).to_owned()),
    }
}

async fn read_data<S: AsyncRead + Unpin>(io: &mut BufReader<S>) -> Option<String> {
    let mut data = String::new();
    loop {
        let line = read_line(io).await?;
        if line == "." {
            return Some(data);
        }
        data.push_str(line.strip_prefix('.').unwrap_or(&line));
        data.push_str("\r\n");
    }
}

/// `AUTH PLAIN <b64>` or `AUTH PLAIN` then the credentials on the next line.
async fn plain_auth<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    line: &str,
) -> Option<String> {
    let encoded = match line.split(' ').nth(2) {
        Some(initial) => initial.to_owned(),
        None => {
            reply(io, "334 ").await?;
            read_line(io).await?
        }
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let parts: Vec<_> = raw.split(|b| *b == 0).collect();
    let [_, user, pass] = parts.as_slice() else {
        return None;
    };
    Some(format!(
        "{}:{}",
        String::from_utf8_lossy(user),
        String::from_utf8_lossy(pass)
    ))
}

/// The address in `MAIL FROM:<a@b> …` or `RCPT TO:<a@b>`.
fn address(line: &str) -> String {
    line.split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map_or_else(String::new, |(a, _)| a.to_owned())
}
