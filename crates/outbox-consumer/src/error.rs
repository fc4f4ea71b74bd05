/// Why a consumer could not start or stopped receiving. Failures of single messages are not
/// errors: they are retried or rejected and the consumer keeps going.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The broker could not be reached at start.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The broker's URL, credentials removed.
        url: String,
        /// The client's error, credentials removed.
        reason: String,
    },
    /// The broker refused to declare or subscribe what the consumer needs.
    #[error("cannot set up {what}: {reason}")]
    Setup {
        /// What could not be set up (`stream orders`, `queue payments`, …).
        what: String,
        /// The broker's or client's error, credentials removed.
        reason: String,
    },
    /// The stream of deliveries failed or ended while the consumer ran.
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
