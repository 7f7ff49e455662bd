//! The one place that maps errors to HTTP: status table, `{"errors": [...]}` body.
//! Client errors answer their precise message and are not logged as errors; server-side
//! failures answer a generic message and are logged (with the request id of the span).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keyvault_hsm::HsmError;

use crate::barrier::BarrierError;
use crate::error::Error;
use crate::store::StoreError;

/// The reason code of a failed request, for its audit entry.
#[derive(Debug, Clone, Copy)]
pub struct AuditReason(pub &'static str);

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

/// The status code of every error kind.
pub fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::InvalidRequest(_) => StatusCode::BAD_REQUEST,
        Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        Error::PermissionDenied => StatusCode::FORBIDDEN,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        Error::Conflict(_) => StatusCode::CONFLICT,
        Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Error::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        Error::Store(StoreError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Hsm(h) if h.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
        Error::Store(_) | Error::Hsm(_) | Error::Barrier(_) | Error::Config(_) | Error::Internal(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        // `Error` is non_exhaustive within the crate too: treat new kinds as server errors
        // until they are mapped here.
        #[allow(unreachable_patterns)]
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// What the client is told for a server-side failure.
fn public_message(e: &Error, status: StatusCode) -> String {
    match (e, status) {
        (Error::Store(_), StatusCode::SERVICE_UNAVAILABLE) => "storage is unavailable, retry later".into(),
        (Error::Hsm(_), StatusCode::SERVICE_UNAVAILABLE) => "the key store (HSM) is unavailable, retry later".into(),
        (Error::Barrier(BarrierError::Integrity), _) => "a stored record failed its integrity check".into(),
        (Error::Hsm(HsmError::KeyNotFound(label)), _) => format!("key {label} is missing from the HSM"),
        (Error::Unavailable(m), _) => m.clone(),
        (_, s) if s.is_server_error() => "internal error".into(),
        _ => e.to_string(),
    }
}

/// What a client is told about `e` (for per-item errors of batch replies).
pub fn client_message(e: &Error) -> String {
    public_message(e, status_of(e))
}

/// Requests that failed because a key KeyVault's state names is missing from the token
/// (reported by `/v1/sys/health`).
pub static MISSING_KEY_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(&self.0);
        if let Error::Hsm(HsmError::KeyNotFound(label)) = &self.0 {
            MISSING_KEY_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(key = %label, "a key named by KeyVault's state is missing from the HSM");
        }
        if status.is_server_error() {
            tracing::error!(error = %self.0, status = status.as_u16(), "request failed");
        } else if let Error::Unauthenticated(reason) = &self.0 {
            tracing::info!(reason = reason.code(), "unauthenticated request");
        }
        let body = Json(serde_json::json!({ "errors": [public_message(&self.0, status)] }));
        let mut resp = (status, body).into_response();
        resp.extensions_mut().insert(AuditReason(self.0.audit_code()));
        if let Error::TooManyRequests { retry_after_secs } = self.0 {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::AuthFailure;

    #[test]
    fn status_table() {
        assert_eq!(status_of(&Error::invalid("x")), StatusCode::BAD_REQUEST);
        assert_eq!(status_of(&Error::Unauthenticated(AuthFailure::Expired)), StatusCode::UNAUTHORIZED);
        assert_eq!(status_of(&Error::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(status_of(&Error::PayloadTooLarge { limit: 1 }), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(status_of(&Error::Store(StoreError::Unavailable("down".into()))), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status_of(&Error::Hsm(HsmError::PoolTimeout)), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status_of(&Error::Barrier(BarrierError::Integrity)), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(status_of(&Error::TooManyRequests { retry_after_secs: 3 }), StatusCode::TOO_MANY_REQUESTS);
        let missing = Error::Hsm(HsmError::KeyNotFound("keyvault/transit/k/v2".into()));
        assert_eq!(status_of(&missing), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(public_message(&missing, status_of(&missing)), "key keyvault/transit/k/v2 is missing from the HSM");
    }

    #[test]
    fn internal_details_stay_internal() {
        let e = Error::Internal("secret detail /var/lib/x".into());
        assert_eq!(public_message(&e, status_of(&e)), "internal error");
    }
}
