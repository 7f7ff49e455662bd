//! The domain error of the vault crate: what went wrong, in the domain's words. The
//! transport (`http::error`) is the one place that turns it into a status code.

use keyvault_hsm::HsmError;

use crate::store::StoreError;

/// Why a sealed record could not be opened (see [`crate::barrier`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum BarrierError {
    #[error("record is malformed: {0}")]
    Malformed(&'static str),
    #[error("record failed authentication (tampered, or copied from another path or version)")]
    Integrity,
    #[error("record needs master key v{0}, which this keyring does not have")]
    UnknownKeyVersion(u32),
}

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
    /// The connection's client certificate is no longer verified by the reloaded client
    /// CA bundle (its CA was removed).
    CertificateUntrusted,
    /// The connection's client certificate expired after the handshake (a long-lived or
    /// resumed connection).
    CertificateExpired,
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
            AuthFailure::CertificateUntrusted => "certificate_untrusted",
            AuthFailure::CertificateExpired => "certificate_expired",
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
            AuthFailure::CertificateUntrusted => "the client certificate is no longer trusted",
            AuthFailure::CertificateExpired => "the client certificate has expired",
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
    /// Nothing there.
    #[error("{0}")]
    NotFound(String),
    /// The path exists but does not support the operation (a write to a read-only path).
    #[error("unsupported operation")]
    UnsupportedOperation,
    /// The request conflicts with the current state (a concurrent change won).
    #[error("{0}")]
    Conflict(String),
    /// Too many failed attempts; retry later.
    #[error("too many requests, retry after {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// This replica cannot serve now (its clock is too far from the others', too many
    /// bodies in flight); the message is ours and safe to show.
    #[error("{0}")]
    Unavailable(String),
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

    /// Whether this is a failure on the server's side (storage, the HSM, a record's
    /// integrity, a bug) rather than a refusal of the request.
    pub fn is_server_side(&self) -> bool {
        matches!(
            self,
            Error::Store(_)
                | Error::Hsm(_)
                | Error::Barrier(_)
                | Error::Config(_)
                | Error::Internal(_)
                | Error::Unavailable(_)
        )
    }

    /// What a client is told: the precise message for a refusal; for a server-side
    /// failure, what it may know (storage or HSM unavailable, a damaged record, a missing
    /// key) and never internal details.
    pub fn client_message(&self) -> String {
        match self {
            Error::Store(StoreError::Unavailable(_)) => "storage is unavailable, retry later".into(),
            Error::Store(StoreError::ClaimLost(_)) => {
                "the operation was stopped: its claim could not be kept (a stall or a storage outage), retry".into()
            }
            Error::Hsm(HsmError::Sealed) => "KeyVault is sealed".into(),
            Error::Hsm(h) if h.is_unavailable() => "the key store (HSM) is unavailable, retry later".into(),
            Error::Barrier(BarrierError::Integrity) => "a stored record failed its integrity check".into(),
            Error::Hsm(HsmError::KeyNotFound(label)) => format!("key {label} is missing from the HSM"),
            Error::Hsm(HsmError::DuplicateLabel(label)) => format!("key {label} is on several objects in the HSM"),
            Error::Unavailable(m) => m.clone(),
            e if e.is_server_side() => "internal error".into(),
            e => e.to_string(),
        }
    }

    /// A stable code for the audit log's `reason`.
    pub fn audit_code(&self) -> &'static str {
        match self {
            Error::InvalidRequest(_) => "invalid_request",
            Error::Unauthenticated(f) => f.code(),
            Error::PermissionDenied => "permission_denied",
            Error::NotFound(_) => "not_found",
            Error::UnsupportedOperation => "method_not_allowed",
            Error::Conflict(_) => "conflict",
            Error::RateLimited { .. } => "rate_limited",
            Error::Unavailable(_) => "unavailable",
            Error::Store(_) => "storage_error",
            Error::Hsm(_) => "hsm_error",
            Error::Barrier(_) => "integrity_error",
            Error::Config(_) | Error::Internal(_) => "internal_error",
        }
    }
}

/// Requests that failed because a key KeyVault's state names is missing from the token, or
/// is on several objects in it (reported by `/v1/sys/health`).
pub static MISSING_KEY_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
