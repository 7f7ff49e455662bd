//! What the HTTP adapters share: one way to build their client, one way to summarize a
//! transport failure.

use std::path::Path;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::BackendError;

/// The largest reply read from an upstream (a secret, a token, a page of a list). A
/// larger one is refused, not buffered: an upstream (or whoever sits between, for an
/// `http://` one) must not be able to grow the server's memory without bound.
pub(crate) const MAX_REPLY_BYTES: usize = 4 << 20;

/// The most names a list gathers across its pages.
pub(crate) const MAX_LIST_NAMES: usize = 100_000;

/// Read a reply's body into zeroizing memory, at most [`MAX_REPLY_BYTES`].
pub(crate) async fn read_limited(mut resp: reqwest::Response, what: &str) -> Result<Zeroizing<Vec<u8>>, BackendError> {
    // Not `Unavailable`: the upstream answered, and asking again gets the same answer. A
    // caller who can make a reply large (a folder it filled) must not be able to retry
    // it, nor count it towards the mount's circuit breaker, which every caller shares.
    let too_large = || BackendError::Invalid(format!("{what}: reply larger than {MAX_REPLY_BYTES} bytes"));
    if resp.content_length().is_some_and(|n| n > MAX_REPLY_BYTES as u64) {
        return Err(too_large());
    }
    let mut body = Zeroizing::new(Vec::new());
    while let Some(chunk) = resp.chunk().await.map_err(|e| transport_error(&e, what))? {
        if body.len() + chunk.len() > MAX_REPLY_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A client with bounded connect and request times, no redirects (a redirect could carry
/// a credential elsewhere), and, with `ca_file`, only those CA certificates trusted.
pub(crate) fn client(ca_file: Option<&Path>) -> Result<reqwest::Client, BackendError> {
    let invalid = BackendError::Invalid;
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none());
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|e| invalid(format!("ca_file {}: {e}", ca.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| invalid(format!("ca_file {}: {e}", ca.display())))?;
        if certs.is_empty() {
            return Err(invalid(format!("ca_file {}: no certificate", ca.display())));
        }
        builder = builder.tls_certs_only(certs);
    }
    builder.build().map_err(|e| invalid(format!("HTTP client: {e}")))
}

/// A transport failure, summarized (never with headers or bodies).
pub(crate) fn transport_error(e: &reqwest::Error, what: &str) -> BackendError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    BackendError::Unavailable(format!("{what}: {kind}"))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An upstream that answers every request with `head` and then `body_len` bytes.
    async fn upstream(head: &'static str, body_len: usize) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    if conn.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![b'x'; 64 * 1024];
                    let mut left = body_len;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        let framed = if head.contains("chunked") {
                            [format!("{n:x}\r\n").into_bytes(), chunk[..n].to_vec(), b"\r\n".to_vec()].concat()
                        } else {
                            chunk[..n].to_vec()
                        };
                        if conn.write_all(&framed).await.is_err() {
                            return;
                        }
                        left -= n;
                    }
                    if head.contains("chunked") {
                        let _ = conn.write_all(b"0\r\n\r\n").await;
                    }
                });
            }
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn replies_beyond_the_limit_are_refused_not_buffered() {
        let http = client(None).unwrap();
        let big = MAX_REPLY_BYTES + 1;
        // Declared too large: refused before reading.
        let url = upstream("HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", 1024).await;
        let e = read_limited(http.get(&url).send().await.unwrap(), "test").await.unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        // Of unknown length (chunked): cut off once over the limit.
        let url = upstream("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", big).await;
        let e = read_limited(http.get(&url).send().await.unwrap(), "test").await.unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        // Within the limit: read whole.
        let url = upstream("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", MAX_REPLY_BYTES).await;
        let body = read_limited(http.get(&url).send().await.unwrap(), "test").await.unwrap();
        assert_eq!(body.len(), MAX_REPLY_BYTES);
    }
}
