//! Which message headers every transport can carry, and which belong to the transports.
//!
//! A message's headers travel next to the headers a sink sets itself (`Nats-Msg-Id`, the
//! webhook signature, the CloudEvents attributes, HTTP framing). A message header with one of
//! those names would replace or duplicate the sink's: a shared `Nats-Msg-Id` makes JetStream
//! drop the second message as a duplicate while the relay acks it. Such names are reserved and
//! refused at enqueue, and sinks drop them from rows stored before this check existed. A name
//! or value one transport cannot carry (a space or `:` in a NATS header name, CR or LF in an
//! HTTP header) is refused too, so that no message is accepted that some sink cannot send.

/// The longest header name accepted, in bytes.
pub const MAX_HEADER_NAME_LEN: usize = 128;

/// Reserved names, compared without regard to case.
const RESERVED: &[&str] = &[
    // HTTP framing and routing, set by the HTTP client of the webhook sink.
    "host",
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    // RabbitMQ reads these to route copies of a message to other queues or to delay it.
    "cc",
    "bcc",
    "x-death",
    "x-delay",
];

/// Reserved name prefixes: NATS server directives (`Nats-Msg-Id`, `Nats-Rollup`,
/// `Nats-Expected-*`), Standard Webhooks headers and CloudEvents attributes.
const RESERVED_PREFIXES: &[&str] = &["nats-", "webhook-", "ce-"];

/// Why a header cannot be enqueued.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderError {
    /// The name (given here) is one a transport sets itself; see the module docs.
    #[error("header {0:?} is reserved: the transports set it themselves")]
    Reserved(String),
    /// The header name is empty.
    #[error("header name must not be empty")]
    EmptyName,
    /// The name is longer than [`MAX_HEADER_NAME_LEN`] bytes.
    #[error("header name {0:?} is longer than {MAX_HEADER_NAME_LEN} bytes")]
    NameTooLong(String),
    /// The name holds a character outside the HTTP token set, which some transport cannot carry.
    #[error(
        "header name {name:?} contains {found:?}, which not every transport can carry \
         (use letters, digits and !#$%&'*+-.^_`|~)"
    )]
    BadName {
        /// The header name.
        name: String,
        /// The first character in it that is not allowed.
        found: char,
    },
    /// The value of the named header holds CR, LF or NUL, which would split an HTTP header.
    #[error("header {0:?} has a CR, LF or NUL in its value")]
    BadValue(String),
    /// A `traceparent` or `tracestate` value that does not follow W3C Trace Context.
    #[error("header {0:?} is not in the W3C Trace Context format")]
    BadTraceContext(String),
}

/// True for a name a transport sets itself (see the module docs).
pub fn is_reserved(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    RESERVED.contains(&lower.as_str()) || RESERVED_PREFIXES.iter().any(|p| lower.starts_with(p))
}

/// Checks that every transport can carry the header, whether or not it is reserved.
pub fn check_carriable(name: &str, value: &str) -> Result<(), HeaderError> {
    if name.is_empty() {
        return Err(HeaderError::EmptyName);
    }
    if name.len() > MAX_HEADER_NAME_LEN {
        return Err(HeaderError::NameTooLong(name.to_owned()));
    }
    if let Some(found) = name.chars().find(|&c| !is_token_char(c)) {
        return Err(HeaderError::BadName {
            name: name.to_owned(),
            found,
        });
    }
    if value.contains(['\r', '\n', '\0']) {
        return Err(HeaderError::BadValue(name.to_owned()));
    }
    Ok(())
}

/// Checks a header a writer wants to enqueue: carriable, not reserved, and a well-formed
/// `traceparent` / `tracestate` when it is one of them (see [`crate::trace`]).
pub fn check(name: &str, value: &str) -> Result<(), HeaderError> {
    check_carriable(name, value)?;
    if is_reserved(name) {
        return Err(HeaderError::Reserved(name.to_owned()));
    }
    crate::trace::check(name, value)
}

/// An HTTP token character (RFC 9110): also valid in NATS, AMQP, Kafka and MQTT header names.
fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_names_are_reserved_whatever_their_case() {
        for name in [
            "Nats-Msg-Id",
            "NATS-ROLLUP",
            "Nats-Expected-Last-Sequence",
            "Content-Type",
            "host",
            "webhook-signature",
            "ce-id",
            "CC",
        ] {
            assert_eq!(check(name, "x"), Err(HeaderError::Reserved(name.into())));
        }
        for name in ["x-tenant", "Idempotency-Key"] {
            assert_eq!(check(name, "x"), Ok(()), "{name}");
        }
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(check("traceparent", traceparent), Ok(()));
        assert_eq!(check("tracestate", "rojo=1"), Ok(()));
    }

    #[test]
    fn names_and_values_no_transport_can_carry_are_refused() {
        assert_eq!(check("", "x"), Err(HeaderError::EmptyName));
        assert!(matches!(
            check("bad name", "x"),
            Err(HeaderError::BadName { found: ' ', .. })
        ));
        assert!(matches!(
            check("a:b", "x"),
            Err(HeaderError::BadName { found: ':', .. })
        ));
        assert!(matches!(check("é", "x"), Err(HeaderError::BadName { .. })));
        assert!(matches!(
            check(&"a".repeat(129), "x"),
            Err(HeaderError::NameTooLong(_))
        ));
        for value in ["a\r\nBcc: x", "a\nb", "a\0b"] {
            assert_eq!(
                check("x-note", value),
                Err(HeaderError::BadValue("x-note".into()))
            );
        }
        assert_eq!(check("x-note", "café, tab\there"), Ok(()));
    }
}
