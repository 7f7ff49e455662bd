//! The gateway side of the gateway contract: a [`tower::Layer`] that checks every incoming
//! signed request through `POST /v1/gateway/verify` before the handler sees it.
//!
//! A request passes with a [`Verified`] extension (the producer's identity and key id);
//! one that fails is answered here with the contract's status and reason (401, 403, 409,
//! 400 for malformed headers, 413 for a body over the limit, 503 when KeyVault cannot be
//! asked, or the checks under way already hold `max_pending_bytes`: fail closed). With batching on, concurrent checks wait at most the batch window
//! and go to KeyVault as one `{"batch": [...]}` call.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use keyvault_api::gateway::{
    BatchVerdicts, HEADER_CERT_SHA256, HEADER_IDENTITY, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP, MAX_BATCH,
    Timestamp, Verdict, VerifyBatch, VerifyItem,
};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::client::Client;
use crate::error::{Error, Result};

/// What the handler of a verified request learns (a request extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The producer (`X-KeyVault-Identity`).
    pub identity: String,
    /// The producer key that verified the signature (`transit:<key>:v<N>` for a transit
    /// key).
    pub key_id: Option<String>,
}

/// The SHA-256 (hex) of the client certificate of the connection a request came on. A
/// server that terminates TLS itself inserts it as a request extension; it then wins over
/// the `x-keyvault-cert-sha256` header (which only a TLS terminator in front may set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate(pub String);

/// How the layer checks.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Bodies larger than this are refused with 413 before any check (default 512 KiB: a
    /// check carries the body in base64, and KeyVault takes requests of at most 1 MiB).
    pub max_body: usize,
    /// `Some(w)`: concurrent checks wait at most `w` and go as one batch; `None`: one
    /// verify request per check.
    pub batch_window: Option<Duration>,
    /// At most this many items per batch (KeyVault takes up to 1000).
    pub max_batch: usize,
    /// Batches in flight at once.
    pub max_in_flight: usize,
    /// The memory the checks under way may hold at once, in bytes (default 64 MiB, and at
    /// least what one body of `max_body` needs): each takes room for its body, its base64
    /// and its JSON (7/3 of the body) as the body arrives, and a check that finds no room
    /// is answered 503 (`verifier_busy`) at once instead of waiting. A flood of large
    /// bodies is refused, not buffered.
    pub max_pending_bytes: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_body: 512 * 1024,
            batch_window: Some(Duration::from_millis(1)),
            max_batch: 256,
            max_in_flight: 2,
            max_pending_bytes: 64 * 1024 * 1024,
        }
    }
}

type Waiter = (VerifyItem, oneshot::Sender<Result<Verdict>>);

/// Asks KeyVault whether signed items are genuine; batches concurrent asks.
pub struct Verifier {
    client: Client,
    queue: Option<mpsc::Sender<Waiter>>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").field("batching", &self.queue.is_some()).finish()
    }
}

impl Verifier {
    /// Must be called within a tokio runtime when batching (it starts the batcher).
    pub fn new(client: Client, config: &GatewayConfig) -> Self {
        let queue = config.batch_window.map(|window| {
            let (tx, rx) = mpsc::channel(config.max_batch.clamp(1, MAX_BATCH) * config.max_in_flight.max(1) * 2);
            tokio::spawn(batcher(
                client.clone(),
                rx,
                window,
                config.max_batch.clamp(1, MAX_BATCH),
                config.max_in_flight.max(1),
            ));
            tx
        });
        Verifier { client, queue }
    }

    /// The verdict on one item.
    pub async fn verify(&self, item: VerifyItem) -> Result<Verdict> {
        match &self.queue {
            None => send_batch(&self.client, vec![item]).await?.pop().ok_or_else(|| Error::Decode("no verdict".into())),
            Some(q) => {
                let (tx, rx) = oneshot::channel();
                q.send((item, tx)).await.map_err(|_| Error::Transport("the batcher stopped".into()))?;
                rx.await.map_err(|_| Error::Transport("the batcher stopped".into()))?
            }
        }
    }
}

/// One `{"batch": [...]}` call: a verdict per item, in order.
async fn send_batch(client: &Client, items: Vec<VerifyItem>) -> Result<Vec<Verdict>> {
    let n = items.len();
    let v: BatchVerdicts = client.request_data("POST", "gateway/verify", Some(&VerifyBatch { batch: items })).await?;
    if v.batch_results.len() != n {
        return Err(Error::Decode(format!("{} verdicts for {n} items", v.batch_results.len())));
    }
    Ok(v.batch_results)
}

/// The most bytes of items one batch carries, well under KeyVault's default request limit
/// (1 MiB): one large item must not make a whole batch 413, failing every check in it.
pub const MAX_BATCH_BYTES: usize = 512 * 1024;

/// About what an item adds to a batch's JSON.
fn item_bytes(item: &VerifyItem) -> usize {
    serde_json::to_vec(item).map(|v| v.len()).unwrap_or(usize::MAX / 2) + 1
}

async fn batcher(client: Client, mut rx: mpsc::Receiver<Waiter>, window: Duration, max: usize, in_flight: usize) {
    let slots = Arc::new(Semaphore::new(in_flight));
    // An item that did not fit the last batch: it opens the next one.
    let mut carried: Option<Waiter> = None;
    loop {
        // A free slot first: while every slot is busy, checks queue up and the next batch
        // takes them all (batches grow with the load instead of multiplying).
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let first = match carried.take() {
            Some(w) => w,
            None => match rx.recv().await {
                Some(w) => w,
                None => return,
            },
        };
        let mut bytes = item_bytes(&first.0);
        let mut waiters = vec![first];
        let deadline = tokio::time::Instant::now() + window;
        while waiters.len() < max && bytes < MAX_BATCH_BYTES {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(w)) => {
                    let size = item_bytes(&w.0);
                    if bytes + size > MAX_BATCH_BYTES {
                        carried = Some(w);
                        break;
                    }
                    bytes += size;
                    waiters.push(w);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let client = client.clone();
        tokio::spawn(async move {
            let (items, senders): (Vec<_>, Vec<_>) = waiters.into_iter().unzip();
            match send_batch(&client, items).await {
                Ok(verdicts) => {
                    for (s, v) in senders.into_iter().zip(verdicts) {
                        let _ = s.send(Ok(v));
                    }
                }
                Err(e) => {
                    let summary = e.to_string();
                    for s in senders {
                        let _ = s.send(Err(Error::Transport(summary.clone())));
                    }
                }
            }
            drop(permit);
        });
    }
}

/// The layer: wrap an axum `Router` (or any service of `http` requests) with it.
#[derive(Clone)]
pub struct VerifyLayer {
    verifier: Arc<Verifier>,
    max_body: usize,
    budget: Budget,
}

/// The room the checks under way hold, in KiB ([`GatewayConfig::max_pending_bytes`]).
#[derive(Debug, Clone)]
struct Budget(Arc<Semaphore>);

impl Budget {
    fn new(bytes: usize) -> Self {
        Budget(Arc::new(Semaphore::new((bytes / 1024).clamp(1, Semaphore::MAX_PERMITS))))
    }

    /// The room, in KiB, a check of a body of `body` bytes holds: the body, its base64
    /// (4/3) and the JSON around it.
    fn kib_for(body: usize) -> usize {
        (body.saturating_mul(7) / 3 / 1024).saturating_add(1)
    }

    /// `kib` more KiB of room. `None`: not now.
    fn take(&self, kib: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.0.clone().try_acquire_many_owned(u32::try_from(kib).unwrap_or(u32::MAX)).ok()
    }
}

/// Why a body read under a [`Budget`] stopped short.
enum Unread {
    TooLarge,
    NoRoom,
    Malformed,
}

/// Read `body` frame by frame, at most `limit` bytes, taking room in `budget` as it
/// arrives (never for bytes only declared); the body and the room it holds.
async fn read_body<B>(
    body: B,
    limit: usize,
    budget: &Budget,
) -> Result<(Bytes, tokio::sync::OwnedSemaphorePermit), Unread>
where
    B: http_body::Body<Data = Bytes>,
{
    let mut held = Budget::kib_for(0);
    let mut room = budget.take(held).ok_or(Unread::NoRoom)?;
    let mut body = std::pin::pin!(body);
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return Err(Unread::Malformed) };
        let Ok(data) = frame.into_data() else { continue };
        let len = buf.len() + data.len();
        if len > limit {
            return Err(Unread::TooLarge);
        }
        let needed = Budget::kib_for(len);
        if needed > held {
            room.merge(budget.take(needed - held).ok_or(Unread::NoRoom)?);
            held = needed;
        }
        buf.extend_from_slice(&data);
    }
    Ok((buf.freeze(), room))
}

impl fmt::Debug for VerifyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyLayer").field("verifier", &self.verifier).field("max_body", &self.max_body).finish()
    }
}

impl VerifyLayer {
    /// Within a tokio runtime (see [`Verifier::new`]).
    pub fn new(client: Client, config: GatewayConfig) -> Self {
        VerifyLayer {
            verifier: Arc::new(Verifier::new(client, &config)),
            max_body: config.max_body,
            budget: Budget::new(config.max_pending_bytes.max(Budget::kib_for(config.max_body).saturating_mul(1024))),
        }
    }
}

impl<S> tower::Layer<S> for VerifyLayer {
    type Service = VerifyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        VerifyService { inner, verifier: self.verifier.clone(), max_body: self.max_body, budget: self.budget.clone() }
    }
}

/// The service [`VerifyLayer`] makes.
#[derive(Clone)]
pub struct VerifyService<S> {
    inner: S,
    verifier: Arc<Verifier>,
    max_body: usize,
    budget: Budget,
}

impl<S> fmt::Debug for VerifyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyService").field("max_body", &self.max_body).finish_non_exhaustive()
    }
}

/// A header's one value. A header given twice counts as missing (400): a TLS terminator
/// that appends its `X-KeyVault-Cert-SHA256` instead of replacing the client's would
/// otherwise let the client's own value, first in line, stand for the certificate.
fn header(h: &HeaderMap, name: &str) -> Option<String> {
    let mut values = h.get_all(name).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok().map(str::to_owned)
}

/// A refusal in the contract's words: `{"valid": false, "reason": ...}`.
fn refuse<B: From<Bytes>>(status: u16, reason: &str) -> Response<B> {
    let body = serde_json::json!({ "valid": false, "reason": reason }).to_string();
    let mut r = Response::new(B::from(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::UNAUTHORIZED);
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

impl<S, B, RB> tower::Service<Request<B>> for VerifyService<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + From<Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    RB: From<Bytes> + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The clone is not ready; the instance that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (verifier, max_body, budget) = (self.verifier.clone(), self.max_body, self.budget.clone());
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let h = &parts.headers;
            // The headers first: a request without them is refused before its body is read.
            let cert = parts
                .extensions
                .get::<PeerCertificate>()
                .map(|p| p.0.clone())
                .or_else(|| header(h, HEADER_CERT_SHA256));
            let (identity, timestamp, nonce, signature) = (
                header(h, HEADER_IDENTITY),
                header(h, HEADER_TIMESTAMP),
                header(h, HEADER_NONCE),
                header(h, HEADER_SIGNATURE),
            );
            if identity.is_none() || cert.is_none() || timestamp.is_none() || nonce.is_none() || signature.is_none() {
                return Ok(refuse(400, "malformed_request"));
            }
            // Then room for the check, taken as the body arrives (never for bytes a client
            // only declares: an idle connection with a large `Content-Length` holds
            // nothing), up to the length it declares or `max_body`. No room: 503 at once.
            let declared =
                h.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
            let limit = match declared {
                Some(n) if n > max_body as u64 => return Ok(refuse(413, "body_too_large")),
                Some(n) => n as usize,
                None => max_body,
            };
            let (bytes, room) = match read_body(body, limit, &budget).await {
                Ok(read) => read,
                Err(Unread::TooLarge) => return Ok(refuse(413, "body_too_large")),
                Err(Unread::NoRoom) => {
                    tracing::debug!("gateway checks under way hold max_pending_bytes: refusing the request");
                    return Ok(refuse(503, "verifier_busy"));
                }
                Err(Unread::Malformed) => return Ok(refuse(400, "malformed_request")),
            };
            let item = VerifyItem {
                identity: identity.clone(),
                cert_sha256: cert,
                timestamp: timestamp.map(Timestamp::Text),
                nonce,
                signature,
                body: Some(STANDARD.encode(&bytes)),
            };
            let verdict = match verifier.verify(item).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "gateway check unavailable: refusing the request");
                    return Ok(refuse(503, "verifier_unavailable"));
                }
            };
            drop(room);
            if !verdict.valid {
                let reason = verdict.reason.as_deref().unwrap_or("rejected");
                return Ok(refuse(verdict.status.unwrap_or(401), reason));
            }
            parts.extensions.insert(Verified { identity: identity.unwrap_or_default(), key_id: verdict.key_id });
            inner.call(Request::from_parts(parts, B::from(bytes))).await
        })
    }
}
