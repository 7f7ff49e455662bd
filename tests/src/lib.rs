//! Shared set-up of the end-to-end tests: start real `keyvault` processes on free ports
//! with their own SoftHSM token directory, talk to them over real TLS.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub use serde_json::{Value, json};

pub mod azure_fake;
pub mod bao;
pub mod kube;
pub mod moto;
pub mod pki;
pub mod postgres;
pub mod server;
pub mod tmpfs;

/// The fault layer of the server's debug builds (vault/src/faults.rs): a file read before
/// every token call. Pass [`TokenFault::env`] to the server, then [`TokenFault::set`] a
/// fault (`"error"`, `"error unwrap_key"`, `"slow 500 encrypt_aes_gcm"`, ...; `""` for none).
pub struct TokenFault {
    _dir: tempfile::TempDir,
    path: PathBuf,
    var: &'static str,
}

impl TokenFault {
    #[allow(clippy::new_without_default)]
    pub fn new() -> TokenFault {
        Self::of("KEYVAULT_TEST_TOKEN_FAULT")
    }

    /// The same for the audit log's `fdatasync` calls (`"error"`, `"slow 20"`).
    pub fn audit_fsync() -> TokenFault {
        Self::of("KEYVAULT_TEST_AUDIT_FSYNC_FAULT")
    }

    fn of(var: &'static str) -> TokenFault {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("fault");
        std::fs::write(&path, "").expect("the fault file");
        TokenFault { _dir: dir, path, var }
    }

    /// The variable that points the server at the file.
    pub fn env(&self) -> (String, String) {
        (self.var.into(), self.path.display().to_string())
    }

    /// Set the fault: written aside and renamed over the file, so that the server never
    /// reads half of it.
    pub fn set(&self, mode: &str) {
        let aside = self.path.with_extension("new");
        std::fs::write(&aside, mode).expect("the fault file");
        std::fs::rename(&aside, &self.path).expect("the fault file");
    }
}

/// The `keyvault` binary under test: `KEYVAULT_BIN`, or the one cargo built next to this
/// test executable (`cargo test --workspace` builds it).
pub fn keyvault_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYVAULT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/keyvault
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("keyvault")).expect("target dir");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build -p keyvault` (or the README's test command) first",
        bin.display()
    );
    bin
}

/// A tool the README's test command installs: `$<env_var>` if set, else `name` on the
/// `PATH`; a clear message when it is missing.
pub fn installed_tool(name: &str, env_var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var) {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| panic!("`{name}` is not installed: run the README's test command, which installs it"))
}

/// libfaketime (the test command installs it): lets a test run a server on another clock.
pub fn faketime_lib() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists());
    found.expect("libfaketime is not installed: run the README's test command, which installs it")
}

/// A running `keyvault dev` with its own data directory.
pub struct DevServer {
    pub child: Child,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub addr: String,
    pub ca: PathBuf,
    pub root_token: String,
    pub log: PathBuf,
    pub stdout: Vec<String>,
    clock: Option<(PathBuf, i64)>,
}

impl DevServer {
    /// Start in a fresh temporary data directory.
    pub fn start() -> DevServer {
        let tmp = tempfile::Builder::new().prefix("keyvault-e2e-").tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let mut s = Self::start_in(&data_dir, 0);
        s._tmp = Some(tmp);
        s
    }

    /// Start in a fresh temporary data directory, on a clock the test sets
    /// ([`DevServer::advance_clock`]; libfaketime, monotonic time left alone).
    pub fn start_with_clock() -> DevServer {
        let tmp = tempfile::Builder::new().prefix("keyvault-e2e-").tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let clock = tmp.path().join("clock");
        std::fs::write(&clock, "+0s").unwrap();
        let mut s = Self::spawn(&data_dir, 0, Some(&clock));
        s._tmp = Some(tmp);
        s.clock = Some((clock, 0));
        s
    }

    /// Move the server's wall clock `secs` seconds on.
    pub fn advance_clock(&mut self, secs: i64) {
        let (file, offset) = self.clock.as_mut().expect("started with start_with_clock");
        *offset += secs;
        std::fs::write(file, format!("{:+}s", offset)).unwrap();
    }

    /// Start in `data_dir` (created if missing) with a given log file generation.
    pub fn start_in(data_dir: &Path, generation: u32) -> DevServer {
        Self::spawn(data_dir, generation, None)
    }

    fn spawn(data_dir: &Path, generation: u32, clock: Option<&Path>) -> DevServer {
        let log = data_dir.with_file_name(format!("keyvault-{generation}.log"));
        let log_file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(keyvault_bin());
        if let Some(f) = clock {
            cmd.env("LD_PRELOAD", faketime_lib())
                .env("FAKETIME_TIMESTAMP_FILE", f)
                .env("FAKETIME_NO_CACHE", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let mut child = cmd
            .args(["dev", "--address", "127.0.0.1:0", "--log", "debug", "--data-dir"])
            .arg(data_dir)
            .env_remove("SOFTHSM2_CONF")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let (mut addr, mut ca, mut root) = (None, None, None);
        while addr.is_none() || ca.is_none() || root.is_none() {
            let line = match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    panic!("keyvault dev did not start; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
                }
            };
            let field = |prefix: &str| {
                line.trim().strip_prefix(prefix).map(|r| r.split_whitespace().next().unwrap_or("").to_owned())
            };
            if let Some(v) = field("Address:") {
                addr = Some(v);
            }
            if let Some(v) = field("CA certificate:") {
                ca = Some(PathBuf::from(v));
            }
            if let Some(v) = field("Root token:") {
                root = Some(v);
            }
            lines.push(line);
        }
        // The rest of the banner (its last line is the direct-request example).
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
            let last = line.contains("the certificate is the credential");
            lines.push(line);
            if last {
                break;
            }
        }
        DevServer {
            child,
            data_dir: data_dir.to_path_buf(),
            _tmp: None,
            addr: addr.unwrap(),
            ca: ca.unwrap(),
            root_token: root.unwrap(),
            log,
            stdout: lines,
            clock: None,
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.addr, &self.ca)
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        assert!(Command::new("kill").arg(self.child.id().to_string()).status().unwrap().success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "keyvault dev exited with {status:?}");
    }

    /// Everything the server logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTPS client trusting exactly one CA.
#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
}

/// A reply: status and JSON body (Null when empty or not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Client {
    pub fn new(addr: &str, ca: &Path) -> Client {
        Self::with_identity(addr, ca, None)
    }

    /// A client that presents a client certificate (`cert || key` PEM) when given one.
    pub fn with_identity(addr: &str, ca: &Path, identity_pem: Option<&[u8]>) -> Client {
        let pem = std::fs::read(ca).unwrap();
        let cert = reqwest::Certificate::from_pem(&pem).unwrap();
        let mut b = reqwest::Client::builder().tls_certs_only([cert]);
        if let Some(id) = identity_pem {
            b = b.identity(reqwest::Identity::from_pem(id).unwrap());
        }
        Client { http: b.build().unwrap(), base: addr.trim_end_matches('/').to_owned() }
    }

    /// A client whose connections come from `local` (e.g. 127.0.0.2: another source address).
    pub fn from_address(addr: &str, ca: &Path, local: std::net::IpAddr) -> Client {
        let pem = std::fs::read(ca).unwrap();
        let cert = reqwest::Certificate::from_pem(&pem).unwrap();
        let http = reqwest::Client::builder().tls_certs_only([cert]).local_address(local).build().unwrap();
        Client { http, base: addr.trim_end_matches('/').to_owned() }
    }

    /// Like `send`, but a connection or TLS failure is returned instead of panicking.
    pub async fn try_send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, String> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        // A reply cut off in its body (the server killed after sending the headers) is a
        // failure too: the client never got the answer.
        let resp = req.send().await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(|e| format!("{e:?}"))?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Reply { status, body, headers })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/v1/{}", self.base, path.trim_start_matches('/'))
    }

    /// Send `method path` with an optional token (as `X-Vault-Token`) and raw body.
    pub async fn send(&self, method: &str, path: &str, token: Option<&str>, body: Option<Vec<u8>>) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        Self::reply(req.send().await.unwrap()).await
    }

    pub async fn reply(resp: reqwest::Response) -> Reply {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply { status, body, headers }
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.send("GET", path, Some(token), None).await
    }

    pub async fn put(&self, path: &str, token: &str, body: Value) -> Reply {
        self.send("PUT", path, Some(token), Some(body.to_string().into_bytes())).await
    }

    /// A new secret id of AppRole role `role` (minted with `token`; panics unless 200).
    pub async fn secret_id(&self, token: &str, role: &str) -> String {
        let r = self.post(&format!("auth/approle/role/{role}/secret-id"), Some(token), serde_json::json!({})).await;
        assert_eq!(r.status, 200, "minting a secret id of {role}: {r:?}");
        r.body["data"]["secret_id"].as_str().expect("a secret id").to_owned()
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Reply {
        self.send("POST", path, token, Some(body.to_string().into_bytes())).await
    }
}

/// Files under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(p);
            }
        }
    }
    hits
}

/// A TLS client trusting `ca`, presenting `identity` (`cert || key` PEM) if given: for
/// tests that speak TLS and HTTP by hand.
pub fn tls_connector(ca: &Path, identity: Option<&[u8]>) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in keyvault::tls::load_certs(ca).unwrap() {
        roots.add(cert).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(keyvault::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some(pem) => {
            let certs: Vec<_> =
                rustls::pki_types::CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().unwrap();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pem).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// A TLS connection to `addr` (`https://host:port`) trusting `ca`, from `local` if given:
/// for tests that speak HTTP by hand (slow clients, partial requests).
pub async fn tls_connect(
    addr: &str,
    ca: &Path,
    local: Option<std::net::IpAddr>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let hostport = addr.trim_start_matches("https://");
    let port: u16 = hostport.rsplit(':').next().unwrap().parse().unwrap();
    let connector = tls_connector(ca, None);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(l) = local {
        socket.bind((l, 0).into()).unwrap();
    }
    let tcp = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// A TLS connection to `addr` that negotiated HTTP/2 by ALPN (the test speaks it by hand).
pub async fn tls_connect_h2(addr: &str, ca: &Path) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in keyvault::tls::load_certs(ca).unwrap() {
        roots.add(cert).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(keyvault::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()), "the server offers h2");
    stream
}

/// Read from `stream` until the server closes it (or `within` passes); returns what was
/// read and whether it closed in time.
pub async fn read_until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin), within: Duration) -> (Vec<u8>, bool) {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let closed = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (out, closed)
}

/// The resident memory of a process, in bytes.
/// A random number from the OS.
/// The sum of the samples of metric `name` in a Prometheus text scrape whose labels
/// contain every one of `labels` (e.g. `op="get"`).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    u64::from_le_bytes(b)
}

pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Wait (polling, up to `within`) until `f` is true.
pub async fn wait_for(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Poll `sys/rotate/status` until no rotation runs (up to two minutes); its `data`.
pub async fn wait_rotation_idle(c: &Client, root: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let r = c.get("sys/rotate/status", root).await;
        assert_eq!(r.status, 200, "{r:?}");
        if r.body["data"]["state"] == "idle" {
            return r.body["data"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "the rotation did not finish: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Send a request line exactly as given (no client-side path normalization, which every
/// HTTP client applies to `..`), over TLS; returns the status code.
pub async fn raw_status(addr: &str, ca: &Path, method: &str, raw_path: &str, token: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hostport = addr.trim_start_matches("https://");
    let connector = tls_connector(ca, None);
    let tcp = tokio::net::TcpStream::connect(hostport).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let req = format!(
        "{method} {raw_path} HTTP/1.1\r\nHost: localhost\r\nX-Vault-Token: {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf).await;
    let head = String::from_utf8_lossy(&buf);
    head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The TLS alert the server answers a client certificate with: connect presenting
/// `identity` (`cert || key` PEM, or none), send a request, and read; the server's fatal
/// alert (e.g. `CertificateRevoked`, `CertificateExpired`, `UnknownCA`,
/// `CertificateRequired`) is what the read fails with. `None` if the server answered.
pub async fn tls_alert(addr: &str, ca: &Path, identity: Option<&[u8]>) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hostport = addr.trim_start_matches("https://");
    let port: u16 = hostport.rsplit(':').next().unwrap().parse().unwrap();
    let connector = tls_connector(ca, identity);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = match connector.connect(name, tcp).await {
        Ok(t) => t,
        Err(e) => return Some(alert_name(&e.to_string())),
    };
    let req = "GET /v1/sys/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if let Err(e) = tls.write_all(req.as_bytes()).await {
        return Some(alert_name(&e.to_string()));
    }
    let mut buf = Vec::new();
    match tls.read_to_end(&mut buf).await {
        Ok(_) if buf.starts_with(b"HTTP/1.1") => None,
        Ok(_) => Some("connection closed without an alert".into()),
        Err(e) => Some(alert_name(&e.to_string())),
    }
}

fn alert_name(e: &str) -> String {
    e.split("received fatal alert: ").nth(1).map(str::to_owned).unwrap_or_else(|| e.to_owned())
}
