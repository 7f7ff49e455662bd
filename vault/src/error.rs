//! The domain error of the vault crate. `http::error` is the one place that turns it into
//! a status code and a reply.

use keyvault_hsm::HsmError;

use crate::barrier::BarrierError;
use crate::store::StoreError;

/// Why a caller is not authenticated. The reason goes to the audit log and the server log;
/// the caller sees only the generic message, so that probing learns nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthFailure {
    MissingToken,
    MalformedToken,
    BadSignature,
    Expired,
    UnknownSigningKey,
    InvalidCredentials,
    /// A certificate-bound token, or a role that requires binding, on a connection
    /// without a client certificate.
    CertificateRequired,
    /// A certificate-bound token on a connection with another client certificate.
    CertificateMismatch,
    /// The token was revoked.
    Revoked,
    /// The token's identity (role, certificate, SPIFFE ID) was revoked (kill switch).
    RevokedIdentity,
    /// The connection's client certificate was revoked (CRL) after the handshake.
    CertificateRevoked,
    /// Right credentials of a revoked identity at login: answered like wrong ones.
    LoginRevokedIdentity,
    /// Right credentials of a role that binds tokens to a certificate, at a login without
    /// one: answered like wrong ones.
    LoginCertificateRequired,
}

impl AuthFailure {
    /// A stable machine-readable code (audit log, metrics).
    pub fn code(self) -> &'static str {
        match self {
            AuthFailure::MissingToken => "missing_token",
            AuthFailure::MalformedToken => "malformed_token",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::Expired => "token_expired",
            AuthFailure::UnknownSigningKey => "unknown_signing_key",
            AuthFailure::InvalidCredentials => "invalid_credentials",
            AuthFailure::CertificateRequired => "certificate_required",
            AuthFailure::CertificateMismatch => "certificate_mismatch",
            AuthFailure::Revoked => "token_revoked",
            AuthFailure::RevokedIdentity | AuthFailure::LoginRevokedIdentity => "identity_revoked",
            AuthFailure::LoginCertificateRequired => "certificate_required",
            AuthFailure::CertificateRevoked => "certificate_revoked",
        }
    }

    /// What the caller is told.
    pub fn public_message(self) -> &'static str {
        match self {
            AuthFailure::MissingToken => "missing client token",
            AuthFailure::InvalidCredentials
            | AuthFailure::LoginRevokedIdentity
            | AuthFailure::LoginCertificateRequired => "invalid credentials",
            AuthFailure::Expired => "token expired",
            AuthFailure::CertificateRequired | AuthFailure::CertificateMismatch => {
                "the token is bound to a client certificate that this connection did not present"
            }
            AuthFailure::Revoked => "token revoked",
            AuthFailure::CertificateRevoked => "the client certificate is revoked",
            AuthFailure::RevokedIdentity => "identity revoked",
            _ => "invalid token",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is wrong; the message says how (400).
    #[error("{0}")]
    InvalidRequest(String),
    /// No valid identity (401).
    #[error("{}", .0.public_message())]
    Unauthenticated(AuthFailure),
    /// Valid identity, not allowed (403).
    #[error("permission denied")]
    PermissionDenied,
    /// (404)
    #[error("{0}")]
    NotFound(String),
    /// (405)
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// (413)
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// (415)
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Too many attempts (429).
    #[error("too many requests, retry after {retry_after_secs} s")]
    TooManyRequests { retry_after_secs: u64 },
    /// This replica cannot serve now (its clock is too far from the others'); the message
    /// is ours and safe to show (503).
    #[error("{0}")]
    Unavailable(String),
    /// The request took too long to arrive (408).
    #[error("{0}")]
    RequestTimeout(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Hsm(#[from] HsmError),
    #[error(transparent)]
    Barrier(#[from] BarrierError),
    /// Configuration that cannot work (start-up only).
    #[error("configuration: {0}")]
    Config(String),
    /// A bug or an impossible state; logged, answered generically.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidRequest(msg.into())
    }

    /// A stable code for the audit log's `reason`.
    pub fn audit_code(&self) -> &'static str {
        match self {
            Error::InvalidRequest(_) => "invalid_request",
            Error::Unauthenticated(f) => f.code(),
            Error::PermissionDenied => "permission_denied",
            Error::NotFound(_) => "not_found",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::Conflict(_) => "conflict",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::UnsupportedMediaType(_) => "unsupported_media_type",
            Error::TooManyRequests { .. } => "rate_limited",
            Error::Unavailable(_) => "unavailable",
            Error::RequestTimeout(_) => "request_timeout",
            Error::Store(_) => "storage_error",
            Error::Hsm(_) => "hsm_error",
            Error::Barrier(_) => "integrity_error",
            Error::Config(_) | Error::Internal(_) => "internal_error",
        }
    }
}
