//! The one place that maps errors to HTTP: the status table and the `{"errors": [...]}`
//! body. The domain's errors say what went wrong; the transport's own (a method, a body
//! too large or too slow, a media type) are here. Client errors answer their precise
//! message and are not logged as errors; server-side failures answer a generic message
//! and are logged (with the request id of the span).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keyvault_hsm::HsmError;

use crate::error::Error;
use crate::store::StoreError;

/// The reason code of a failed request, for its audit entry.
#[derive(Debug, Clone, Copy)]
pub struct AuditReason(pub &'static str);

/// An error on its way to the client.
#[derive(Debug)]
pub enum ApiError {
    /// From the service.
    Domain(Error),
    /// An HTTP method that is no operation (405).
    MethodNotAllowed,
    /// (413)
    PayloadTooLarge { limit: usize },
    /// (415)
    UnsupportedMediaType(String),
    /// The body did not arrive in time (408).
    RequestTimeout,
    /// Refused before the request ran at all (sealed, not authenticated, no room for its
    /// body): nothing was done, and a 503 of this kind carries `Retry-After`, which tells
    /// a client that sending the same request again is safe, writes included.
    NotStarted(Error),
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError::Domain(e)
    }
}

/// The status code of every domain error.
pub fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::InvalidRequest(_) => StatusCode::BAD_REQUEST,
        Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        Error::PermissionDenied => StatusCode::FORBIDDEN,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::UnsupportedOperation => StatusCode::METHOD_NOT_ALLOWED,
        Error::Conflict(_) => StatusCode::CONFLICT,
        Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Store(StoreError::Unavailable(_) | StoreError::ClaimLost(_)) => StatusCode::SERVICE_UNAVAILABLE,
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

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Domain(e) | ApiError::NotStarted(e) => status_of(e),
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::Domain(e) | ApiError::NotStarted(e) => e.client_message(),
            ApiError::MethodNotAllowed => "method not allowed".into(),
            ApiError::PayloadTooLarge { limit } => format!("request body is larger than the limit of {limit} bytes"),
            ApiError::UnsupportedMediaType(m) => m.clone(),
            ApiError::RequestTimeout => "the request body did not arrive in time".into(),
        }
    }

    fn audit_code(&self) -> &'static str {
        match self {
            ApiError::Domain(e) | ApiError::NotStarted(e) => e.audit_code(),
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::RequestTimeout => "request_timeout",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (not_started, this) = match self {
            ApiError::NotStarted(e) => (true, ApiError::Domain(e)),
            other => (false, other),
        };
        let mut resp = this.response();
        if not_started && resp.status() == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1u32));
        }
        resp
    }
}

impl ApiError {
    fn response(self) -> Response {
        let status = self.status();
        if let ApiError::Domain(e) = &self {
            // A key on several objects even after a re-initialisation is as good as missing
            // (which one holds it is unknown) until an operator settles it.
            if let Error::Hsm(h @ (HsmError::KeyNotFound(label) | HsmError::DuplicateLabel(label))) = e {
                crate::error::MISSING_KEY_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(key = %label, error = %h, "a key named by KeyVault's state is missing from the HSM or on several objects in it");
            }
            if status.is_server_error() {
                tracing::error!(error = %e, status = status.as_u16(), "request failed");
            } else if let Error::Unauthenticated(reason) = e {
                tracing::info!(reason = reason.code(), "unauthenticated request");
            }
        }
        let body = keyvault_api::ErrorBody { errors: vec![self.message()] };
        let mut resp = (status, axum::Json(body)).into_response();
        resp.extensions_mut().insert(AuditReason(self.audit_code()));
        if let ApiError::Domain(Error::RateLimited { retry_after_secs }) = self {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::barrier::BarrierError;
    use crate::error::AuthFailure;

    #[test]
    fn status_table() {
        assert_eq!(status_of(&Error::invalid("x")), StatusCode::BAD_REQUEST);
        assert_eq!(status_of(&Error::Unauthenticated(AuthFailure::Expired)), StatusCode::UNAUTHORIZED);
        assert_eq!(status_of(&Error::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(status_of(&Error::UnsupportedOperation), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(ApiError::PayloadTooLarge { limit: 1 }.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(status_of(&Error::Store(StoreError::Unavailable("down".into()))), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status_of(&Error::Store(StoreError::ClaimLost("claims/x".into()))), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status_of(&Error::Hsm(HsmError::PoolTimeout)), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status_of(&Error::Barrier(BarrierError::Integrity)), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(status_of(&Error::RateLimited { retry_after_secs: 3 }), StatusCode::TOO_MANY_REQUESTS);
        let missing = Error::Hsm(HsmError::KeyNotFound("keyvault/transit/k/v2".into()));
        assert_eq!(status_of(&missing), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(missing.client_message(), "key keyvault/transit/k/v2 is missing from the HSM");
    }

    #[test]
    fn internal_details_stay_internal() {
        let e = Error::Internal("secret detail /var/lib/x".into());
        assert_eq!(e.client_message(), "internal error");
    }
}
