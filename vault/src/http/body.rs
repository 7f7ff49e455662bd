//! Request bodies: bounded in size (413), in time (408) and in bytes being received at
//! once; JSON only (415 for what a browser may send across sites).

use axum::body::Body;
use axum::extract::Request;
use axum::http::HeaderMap;
use std::sync::Arc;
use zeroize::Zeroizing;

use super::BodyLimits;
use super::error::ApiError;
use crate::error::Error;

/// Read a body of at most `limit` bytes: 413 at once for a declared length over it
/// (HTTP/1.1 and HTTP/2 alike), 408 if it does not arrive within the body timeout, 415
/// for a media type that a browser may send across sites without asking (see
/// [`check_content_type`]).
/// The body's bytes take room in `room` (the budget of authenticated callers, or the
/// anonymous one).
pub async fn read_body(
    req: Request,
    limits: &BodyLimits,
    limit: usize,
    room: &Arc<tokio::sync::Semaphore>,
) -> Result<Zeroizing<Vec<u8>>, ApiError> {
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
        let cap = limit.saturating_mul(4).min(16 * 1024 * 1024);
        tokio::spawn(drain(req.into_body(), cap, limits.timeout.min(std::time::Duration::from_secs(5))));
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let deadline = tokio::time::Instant::now() + limits.timeout;
    collect(req.into_body(), room, limit, deadline).await
}

/// Gather a body's bytes, taking room in the budget of bodies being received (permits of
/// 1 KiB) for the buffer as it grows, before it grows: what a request holds is what it
/// has sent, rounded up to at most twice that. A body announced but not sent (a declared
/// length, a chunked body that never comes, an HTTP/2 stream left open, every GET) holds
/// nothing, so clients that send nothing cannot take the budget from the others.
async fn collect(
    mut body: Body,
    budget: &Arc<tokio::sync::Semaphore>,
    limit: usize,
    deadline: tokio::time::Instant,
) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    use http_body_util::BodyExt;
    let mut buf = Zeroizing::new(Vec::new());
    let mut room: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut held_kib = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(ApiError::RequestTimeout),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(Error::invalid("could not read the request body").into()),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        let needed = buf.len() + data.len();
        if needed > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        if needed > buf.capacity() {
            let capacity = needed.max(buf.capacity() * 2).max(4096).min(limit);
            let want = capacity.div_ceil(1024);
            if want > held_kib {
                let more = u32::try_from(want - held_kib).unwrap_or(u32::MAX);
                match budget.clone().try_acquire_many_owned(more) {
                    Ok(permit) => match &mut room {
                        Some(held) => held.merge(permit),
                        None => room = Some(permit),
                    },
                    Err(_) => {
                        // Never wait while holding room: bodies that each held part and
                        // waited for more could hold each other up until their timeouts.
                        // Give it back, then wait for the whole of it at once.
                        drop(room.take());
                        let all = u32::try_from(want).unwrap_or(u32::MAX);
                        let acquire = budget.clone().acquire_many_owned(all);
                        match tokio::time::timeout_at(deadline, acquire).await {
                            Ok(Ok(permit)) => room = Some(permit),
                            _ => {
                                return Err(Error::Unavailable(
                                    "too many request bodies are being received; retry later".into(),
                                )
                                .into());
                            }
                        }
                    }
                }
                held_kib = want;
            }
            let more = capacity - buf.len();
            buf.reserve_exact(more);
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf)
}

/// A request refused before its body was read (its caller could not be authenticated):
/// what the client is still sending is read and dropped for a little while, as after a
/// 413, so that it sees the reply rather than a broken pipe. Nothing is kept.
pub fn discard(req: Request, limits: &BodyLimits) {
    let cap = limits.max.saturating_mul(4).min(16 * 1024 * 1024);
    tokio::spawn(drain(req.into_body(), cap, limits.timeout.min(std::time::Duration::from_secs(5))));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A body whose frames come from a channel, as the test sends them.
    fn channel_body() -> (tokio::sync::mpsc::UnboundedSender<Vec<u8>>, Body) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (Ok::<_, std::io::Error>(chunk), rx))
        });
        (tx, Body::from_stream(stream))
    }

    /// Two bodies that together need more than the budget, sent a frame of each in turn:
    /// both are read whole, one after the other. (Taking room while holding some, each
    /// held half the budget and waited for the other's half until both timed out.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bodies_that_together_exceed_the_budget_are_read_one_after_the_other() {
        let limits = BodyLimits::new(1 << 20, std::time::Duration::from_secs(5), 1 << 20);
        let deadline = tokio::time::Instant::now() + limits.timeout;
        let (tx_a, body_a) = channel_body();
        let (tx_b, body_b) = channel_body();
        let a = tokio::spawn({
            let limits = limits.clone();
            async move { collect(body_a, &limits.budget, 1 << 20, deadline).await.map(|b| b.len()) }
        });
        let b = tokio::spawn({
            let limits = limits.clone();
            async move { collect(body_b, &limits.budget, 1 << 20, deadline).await.map(|b| b.len()) }
        });
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..11 {
            tx_a.send(chunk.clone()).unwrap();
            tx_b.send(chunk.clone()).unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        drop((tx_a, tx_b));
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        assert_eq!((a.ok(), b.ok()), (Some(11 * 64 * 1024), Some(11 * 64 * 1024)));
        assert_eq!(limits.budget.available_permits(), 1024, "all room given back");
    }
}
