/// Why a consumer could not start or stopped receiving. Failures of single messages are not
/// errors: they are retried or rejected and the consumer keeps going.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("cannot set up {what}: {reason}")]
    Setup { what: String, reason: String },
    #[error("receiving failed: {0}")]
    Receive(String),
}

impl ConsumerError {
    pub(crate) fn setup(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        ConsumerError::Setup {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}
