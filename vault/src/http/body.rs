//! Request bodies: bounded in size (413), in time (408) and in bytes being received at
//! once; JSON only (415 for what a browser may send across sites).

use axum::body::Body;
use axum::extract::Request;
use axum::http::HeaderMap;
use zeroize::Zeroizing;

use super::BodyLimits;
use super::error::ApiError;
use crate::error::Error;

/// Read a body of at most `limit` bytes: 413 at once for a declared length over it
/// (HTTP/1.1 and HTTP/2 alike), 408 if it does not arrive within the body timeout, 415
/// for a media type that a browser may send across sites without asking (see
/// [`check_content_type`]).
pub async fn read_body(req: Request, limits: &BodyLimits, limit: usize) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    check_content_type(req.headers())?;
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        // Answer 413 at once, and read (and drop) what the client is still sending for a
        // little while: an HTTP/1.1 client that is still writing its body when the
        // connection closes sees a broken pipe instead of the reply.
        let body = req.into_body();
        let cap = limit.saturating_mul(4).min(16 * 1024 * 1024);
        tokio::spawn(drain(body, cap, limits.timeout.min(std::time::Duration::from_secs(5))));
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let deadline = tokio::time::Instant::now() + limits.timeout;
    // Room in the budget of bodies being received: the declared length, or the limit.
    let want = declared.map(|n| n as usize).unwrap_or(limit).div_ceil(1024).max(1);
    let want = u32::try_from(want).unwrap_or(u32::MAX);
    let _room = match tokio::time::timeout_at(deadline, limits.budget.clone().acquire_many_owned(want)).await {
        Ok(Ok(permit)) => permit,
        _ => {
            return Err(Error::Unavailable("too many request bodies are being received; retry later".into()).into());
        }
    };
    let body: Body = req.into_body();
    let read = tokio::time::timeout_at(deadline, axum::body::to_bytes(body, limit)).await;
    let bytes = match read {
        Err(_) => return Err(ApiError::RequestTimeout),
        Ok(r) => r.map_err(|e| {
            let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            if too_large {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::from(Error::invalid("could not read the request body"))
            }
        })?,
    };
    // Takes the allocation without copying when this is the only reference.
    Ok(Zeroizing::new(Vec::from(bytes)))
}

/// Read and discard up to `cap` bytes of a body within `within`.
async fn drain(body: Body, cap: usize, within: std::time::Duration) {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut seen = 0usize;
    let _ = tokio::time::timeout(within, async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(d) = frame.data_ref() {
                seen += d.len();
            }
            if seen > cap {
                break;
            }
        }
    })
    .await;
}

/// Request bodies are JSON. A `Content-Type` that a web page can send to another site
/// without the browser asking first (`text/plain`, form and multipart bodies) is refused
/// with 415: with certificate-authenticated requests that need no token, it would let a
/// page the user visits act with the user's client certificate. Anything else that is not
/// JSON is refused as well. No `Content-Type` at all is accepted, as Vault does: the Go
/// client of the `vault`/`bao` tools sends none, and a browser cannot send a body without
/// one across sites without a preflight.
pub fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(v) = headers.get(axum::http::header::CONTENT_TYPE) else { return Ok(()) };
    let v = v.to_str().map_err(|_| ApiError::UnsupportedMediaType("invalid Content-Type".into()))?;
    let essence = v.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let json = essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"));
    if json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "request bodies are JSON: send Content-Type: application/json (not {essence:?})"
        )))
    }
}
