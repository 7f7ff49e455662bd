//! The TLS listener: accept, handshake (rustls), serve HTTP/1.1 or HTTP/2 (ALPN) with
//! hyper, drain connections on shutdown.
//!
//! Everything a client controls is bounded in time and number (docs/threat-model.md):
//! the TLS handshake, reading request headers (HTTP/1.1: from the connection's start for
//! its first request, from the first byte of each later one; HTTP/2: its first request,
//! from the connection's start), an idle connection (no
//! request in flight and no bytes moving, both protocols), and reading a body (in the
//! extractor: `listener.body_timeout`); connections in all and per source address (an
//! IPv6 address by its /64). A connection over a limit is closed at once, before its handshake. Accept
//! errors (out of file descriptors) back off instead of spinning, and are logged at most
//! once a second.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::auth::limiter::source;
use crate::error::{Error, Result};
use crate::logical::Peer;
use crate::ratelog::RateLimitedLog;
use crate::tls::{ClientCert, ConnectionTrust, SharedTrust};

/// How long shutdown waits for open connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection being closed gracefully, with nothing in flight, is left to the
/// client to close before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// The transport's bounds (`[listener]` in the configuration).
#[derive(Debug, Clone)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_connections_per_address: 256,
        }
    }
}

impl Limits {
    /// The bounds `[listener]` sets.
    pub fn from_config(l: &crate::config::ListenerConfig) -> Self {
        Limits {
            handshake_timeout: l.handshake_timeout,
            header_timeout: l.header_timeout,
            idle_timeout: l.idle_timeout,
            max_connections: l.max_connections,
            max_connections_per_address: l.max_connections_per_address,
        }
    }
}

/// Bind the listener, with a clear error for an address in use.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            Error::Config(format!(
                "cannot listen on {addr}: the address is already in use (is another KeyVault running?)"
            ))
        } else {
            Error::Config(format!("cannot listen on {addr}: {e}"))
        }
    })
}

/// Raise the soft limit of open files to the hard limit, and make sure the connection
/// limit leaves room for everything else the process opens (storage, token, audit log).
/// Returns the connection limit to use.
pub fn fit_file_limit(max_connections: usize) -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (limit.current, limit.maximum)
        && cur < max
    {
        let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(max), maximum: Some(max) });
    }
    let available = getrlimit(Resource::Nofile).current.map(|n| n as usize).unwrap_or(usize::MAX);
    const RESERVED: usize = 256;
    let fitting = available.saturating_sub(RESERVED).max(16);
    if max_connections > fitting {
        tracing::warn!(
            max_connections,
            open_files_limit = available,
            using = fitting,
            "listener.max_connections exceeds what the open-file limit allows; lowering it (raise LimitNOFILE)"
        );
        fitting
    } else {
        max_connections
    }
}

/// Open connections, in all and per source.
#[derive(Debug, Default)]
struct Connections {
    total: AtomicUsize,
    per_source: Mutex<HashMap<[u8; 16], usize>>,
}

/// A connection's place in [`Connections`], released on drop.
struct ConnGuard {
    conns: Arc<Connections>,
    source: [u8; 16],
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.conns.total.fetch_sub(1, Ordering::SeqCst);
        crate::metrics::get().open_connections.dec();
        let mut map = self.conns.per_source.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.source);
            }
        }
    }
}

impl Connections {
    fn admit(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Option<ConnGuard> {
        let source = source(ip);
        let mut map = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
        if self.total.load(Ordering::SeqCst) >= limits.max_connections {
            return None;
        }
        let n = map.entry(source).or_insert(0);
        if *n >= limits.max_connections_per_address {
            return None;
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::SeqCst);
        crate::metrics::get().open_connections.inc();
        Some(ConnGuard { conns: self.clone(), source })
    }
}

static ACCEPT_FAILED: RateLimitedLog = RateLimitedLog::new();
static OVER_LIMIT: RateLimitedLog = RateLimitedLog::new();

/// What the watchdog of one connection reads: milliseconds since the connection started.
struct Clock {
    started: Instant,
    /// Whether bytes moving count as activity (HTTP/1.1, whose request heads have a
    /// timeout of their own). On HTTP/2 only requests do: a client's PINGs (which the
    /// server answers) or a HEADERS frame trickled in never completing would otherwise
    /// hold a connection for ever.
    bytes_are_activity: bool,
    /// When bytes last moved on HTTP/1.1, or a request started or ended (for the idle
    /// timeout).
    last: AtomicU64,
    /// When the head of the request being received began (+1; 0: none is), for the
    /// header timeout: set by the first bytes read while no request is in flight (or at
    /// the start of an HTTP/1.1 connection), cleared when the request reaches the
    /// service. hyper's own header timer is not used: it also runs while a keep-alive
    /// connection waits for its next request, so it closed idle connections after the
    /// header timeout instead of the idle timeout, without a reply, racing clients that
    /// were about to reuse them.
    head: AtomicU64,
    /// Whether a request has reached the service: an HTTP/2 connection that sends none
    /// within the header timeout is closed (it would hold a connection slot for the whole
    /// idle timeout otherwise, a connection cap filled by handshakes alone).
    served: std::sync::atomic::AtomicBool,
}

impl Clock {
    fn new(http1: bool) -> Clock {
        Clock {
            started: Instant::now(),
            bytes_are_activity: http1,
            last: AtomicU64::new(0),
            head: AtomicU64::new(0),
            served: Default::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
    }
}

/// A stream that notes when bytes move and when a request's head starts to arrive.
struct ActivityIo<T> {
    inner: T,
    clock: Arc<Clock>,
    in_flight: Arc<AtomicUsize>,
}

impl<T> ActivityIo<T> {
    fn touch(&self) {
        if self.clock.bytes_are_activity {
            self.clock.touch();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                let now = self.clock.now_ms() + 1;
                let _ = self.clock.head.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts a request in flight on its connection until its handler returns.
struct InFlight(Arc<AtomicUsize>, Arc<Clock>);

impl InFlight {
    /// A request reached the service: its head is complete.
    fn new(counter: &Arc<AtomicUsize>, clock: &Arc<Clock>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        clock.head.store(0, Ordering::SeqCst);
        clock.served.store(true, Ordering::SeqCst);
        clock.touch();
        InFlight(counter.clone(), clock.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.1.touch();
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serve `app` over TLS on `listener` until `shutdown` completes. The TLS configuration
/// is read from `tls` for every new connection, so it can be swapped at run time.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ArcSwap<ServerConfig>>,
    trust: SharedTrust,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The header timeout is the watchdog's (below), not hyper's.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(None);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(128);
    let conns: Arc<Connections> = Arc::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut backoff = Duration::from_millis(10);
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff = Duration::from_millis(10);
                    a
                }
                Err(e) => {
                    // EMFILE and friends: back off (up to a second) instead of spinning.
                    ACCEPT_FAILED.warn("accept failed; backing off", &e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(guard) = conns.admit(remote.ip(), &limits) else {
            OVER_LIMIT.warn("connection refused: too many connections (in all or from this address)", &remote);
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        // The trust's generation before the configuration (see [`ConnectionTrust::new`]).
        let generation = trust.load().generation;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
        let app = app.clone();
        let builder = builder.clone();
        let limits = limits.clone();
        let trust = trust.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let stream = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            tracing::debug!(%remote, "connection accepted");
            let chain: Vec<_> = stream
                .get_ref()
                .1
                .peer_certificates()
                .unwrap_or_default()
                .iter()
                .map(|c| c.clone().into_owned())
                .collect();
            let client_cert = chain.first().map(|der| Arc::new(ClientCert::from_der(der)));
            let info = Peer { remote, client_cert, trust: Some(ConnectionTrust::new(trust, generation, chain)) };
            // HTTP/2 (by ALPN) has no request head to time: its streams are bounded by
            // the idle timeout and the body timeout.
            let http1 = stream.get_ref().1.alpn_protocol() != Some(b"h2".as_slice());
            let in_flight: Arc<AtomicUsize> = Arc::default();
            let counter = in_flight.clone();
            let clock = Arc::new(Clock::new(http1));
            if http1 {
                // The first request's head is due from the start.
                clock.head.store(1, Ordering::SeqCst);
            }
            let request_clock = clock.clone();
            let svc = app
                .map_request(move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(info.clone());
                    req.map(axum::body::Body::new)
                })
                .map_future(move |fut| {
                    let guard = InFlight::new(&counter, &request_clock);
                    async move {
                        let r = fut.await;
                        drop(guard);
                        r
                    }
                });
            let io = ActivityIo { inner: stream, clock: clock.clone(), in_flight: in_flight.clone() };
            // The protocol ALPN chose, and only it: the timeouts above assume it (left
            // to itself, the builder serves HTTP/1.1 on a connection that negotiated h2).
            let builder = if http1 { builder.http1_only() } else { builder.http2_only() };
            let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
            tokio::pin!(conn);
            let mut tick =
                tokio::time::interval(Duration::from_millis(250).min(limits.idle_timeout).min(limits.header_timeout));
            // Since when a graceful close is under way: an HTTP/2 client may keep the
            // connection after GOAWAY; once nothing is in flight it gets a moment, then
            // the connection is dropped.
            let mut closing: Option<Instant> = None;
            loop {
                tokio::select! {
                    // The connection first: bytes already received are read before the
                    // timeouts are looked at (a busy runtime must not cut off a request
                    // that did arrive in time).
                    biased;
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(%remote, error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = tick.tick() => {
                        let quiet = in_flight.load(Ordering::SeqCst) == 0;
                        match closing {
                            Some(since) => {
                                if quiet && since.elapsed() >= CLOSE_GRACE {
                                    break;
                                }
                            }
                            None => {
                                let now = clock.now_ms();
                                let idle_ms = now.saturating_sub(clock.last.load(Ordering::Relaxed));
                                let head = clock.head.load(Ordering::SeqCst);
                                let head_ms = if head == 0 { 0 } else { now.saturating_sub(head - 1) };
                                let why = if !quiet {
                                    None
                                } else if http1 && head != 0 && head_ms >= limits.header_timeout.as_millis() as u64 {
                                    Some("closing a connection whose request headers did not arrive in time")
                                } else if !http1
                                    && !clock.served.load(Ordering::SeqCst)
                                    && now >= limits.header_timeout.as_millis() as u64
                                {
                                    Some("closing an HTTP/2 connection that sent no request in time")
                                } else if idle_ms >= limits.idle_timeout.as_millis() as u64 {
                                    Some("closing an idle connection")
                                } else {
                                    None
                                };
                                if let Some(why) = why {
                                    tracing::debug!(%remote, "{why}");
                                    conn.as_mut().graceful_shutdown();
                                    closing = Some(Instant::now());
                                }
                            }
                        }
                    }
                    _ = stop.changed(), if closing.is_none() => {
                        conn.as_mut().graceful_shutdown();
                        closing = Some(Instant::now());
                    }
                }
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: draining open connections");
    let _ = stop_tx.send(true);
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while conns.total.load(Ordering::SeqCst) > 0 {
        if Instant::now() >= deadline {
            tracing::warn!("connections still open after {DRAIN_TIMEOUT:?}; closing them");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Completes on SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled: call it before announcing that the server listens,
/// so that a SIGTERM sent right after the announcement is a graceful stop (it killed the
/// process outright before, without the audit log's final checkpoint).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                one.recv().await;
            }
            (Err(_), Err(_)) => std::future::pending::<()>().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_in_all_and_per_source() {
        let conns: Arc<Connections> = Arc::default();
        let limits = Limits { max_connections: 3, max_connections_per_address: 2, ..Default::default() };
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let g1 = conns.admit(a, &limits).unwrap();
        let _g2 = conns.admit(a, &limits).unwrap();
        assert!(conns.admit(a, &limits).is_none(), "per address");
        let _g3 = conns.admit(b, &limits).unwrap();
        assert!(conns.admit(b, &limits).is_none(), "in all");
        drop(g1);
        let _g4 = conns.admit(a, &limits).unwrap();
        // Addresses of one IPv6 /64 are one source.
        let v6 = Limits { max_connections_per_address: 1, ..limits };
        let conns: Arc<Connections> = Arc::default();
        let _x = conns.admit("2001:db8::1".parse().unwrap(), &v6).unwrap();
        assert!(conns.admit("2001:db8::2".parse().unwrap(), &v6).is_none());
    }
}
