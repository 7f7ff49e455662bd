//! One error type for every call: the server's status and messages, or what went wrong
//! on the way. Never carries a token, a secret value or a request body.

/// What a call of this crate can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error status; `errors` are its messages.
    #[error("{status}: {}", .errors.join("; "))]
    #[allow(missing_docs)]
    Status { status: u16, errors: Vec<String> },
    /// No answer: the connection failed or timed out (after the retries allowed).
    #[error("cannot reach KeyVault: {0}")]
    Transport(String),
    /// An answer this client cannot read (not the expected JSON shape).
    #[error("unexpected reply: {0}")]
    Decode(String),
    /// The client's own configuration (address, CA, certificate, credentials file).
    #[error("configuration: {0}")]
    Config(String),
    /// A value or argument refused before anything was sent.
    #[error("invalid: {0}")]
    Invalid(String),
    /// `fetch_all`: the paths that could not be read, each with why.
    #[error("{} of the secrets could not be read: {}", .0.len(), .0.iter().map(|(p, e)| format!("{p} ({e})")).collect::<Vec<_>>().join(", "))]
    Fetch(Vec<(String, Error)>),
    /// A local cryptographic operation failed (envelope encryption or decryption).
    #[error("{0}")]
    Crypto(String),
    /// A token refused by offline verification, and why.
    #[error("token refused: {0}")]
    Token(crate::offline::Rejection),
}

impl Error {
    /// The server's status, when it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// A 404: the path holds nothing.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
}

/// The result of every call.
pub type Result<T, E = Error> = std::result::Result<T, E>;
