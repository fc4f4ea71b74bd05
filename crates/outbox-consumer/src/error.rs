/// Why a consumer could not start or stopped receiving. Failures of single messages are not
/// errors: they are retried or rejected and the consumer keeps going.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("cannot set up {what}: {reason}")]
    Setup { what: String, reason: String },
    #[error("receiving failed: {0}")]
    Receive(String),
}

impl ConsumerError {
    /// The broker at `url` could not be reached. The URL and the client's message (which
    /// may quote it) lose their credentials: this error is printed and logged.
    pub(crate) fn connect(url: &str, reason: impl std::fmt::Display) -> Self {
        ConsumerError::Connect {
            url: outbox_core::redact(url),
            reason: outbox_core::redact(&reason.to_string()),
        }
    }

    pub(crate) fn setup(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        ConsumerError::Setup {
            what: what.into(),
            reason: outbox_core::redact(&reason.to_string()),
        }
    }
}
