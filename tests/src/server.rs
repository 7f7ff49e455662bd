//! A real install for the tests: `keyvault operator init` then `keyvault server` from a
//! configuration file, with a SoftHSM token of its own and certificates made by the test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use secrecy::ExposeSecret;

use crate::pki::{Issued, TestCa};
use crate::{Client, keyvault_bin};

/// Listener and extra configuration of a test server.
#[derive(Default, Clone)]
pub struct ServerOptions {
    /// `off`, `optional` or `required`.
    pub client_auth: &'static str,
    pub client_ca_pem: Option<String>,
    pub crl_pem: Option<String>,
    /// TOML appended to the configuration (whole sections).
    pub extra: String,
    /// Lines added to the `[audit]` section.
    pub audit_extra: String,
    /// The `[storage]` section (default: sled in the install's directory).
    pub storage: Option<String>,
    /// Share the SoftHSM token of another install (a replica) instead of creating one.
    pub token: Option<keyvault_hsm::Pkcs11Config>,
    /// Do not run `operator init` (a replica joining an initialized store).
    pub skip_init: bool,
    /// Lines added to the `[listener]` section.
    pub listener_extra: String,
    /// Lines added to the `[hsm]` section.
    pub hsm_extra: String,
    /// Environment of the server process (e.g. libfaketime for another clock).
    pub env: Vec<(String, String)>,
    /// Where the audit log goes (default: `audit/audit.log` in the install's directory).
    pub audit_path: Option<PathBuf>,
    /// Run the server on a clock the test sets ([`TestServer::advance_clock`]):
    /// libfaketime reading its offset from a file, re-read on every call (monotonic time
    /// is left alone, so timers and timeouts work).
    pub settable_clock: bool,
}

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub child: Child,
    pub port: u16,
    /// `https://localhost:<port>`
    pub addr: String,
    pub server_ca: TestCa,
    pub server_ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: PathBuf,
    pub crl_file: PathBuf,
    pub config_file: PathBuf,
    pub root: String,
    pub log: PathBuf,
    /// The SoftHSM token of this install (open it to look at its key objects).
    pub token: keyvault_hsm::Pkcs11Config,
    audit_path: PathBuf,
    env: Vec<(String, String)>,
    clock_file: Option<PathBuf>,
    clock_offset: i64,
}

/// Start `keyvault server` and wait for the line that says it listens (on the port the
/// OS gave it): ready means this process is listening, not that something is.
fn spawn_server(config_file: &std::path::Path, log: &std::path::Path, env: &[(String, String)]) -> (Child, u16) {
    let mut child = Command::new(keyvault_bin())
        .args(["server", "--config"])
        .arg(config_file)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::piped())
        .stderr(std::fs::OpenOptions::new().append(true).open(log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.strip_prefix("KeyVault listening on https://") {
                let _ = tx.send(addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()));
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Some(port)) => (child, port),
        _ => {
            let _ = child.kill();
            panic!("keyvault server did not start: {}", std::fs::read_to_string(log).unwrap_or_default());
        }
    }
}

impl TestServer {
    pub fn start(opts: ServerOptions) -> TestServer {
        let dir = tempfile::Builder::new().prefix("keyvault-srv-").tempdir().unwrap();
        let d = dir.path();
        let token = opts.token.clone().unwrap_or_else(keyvault_hsm::softhsm::testing::token_config);
        let token_for_later = token.clone();
        let pin_file = d.join("hsm-pin");
        std::fs::write(&pin_file, token.pin.expose_secret()).unwrap();
        std::fs::set_permissions(&pin_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let server_ca = TestCa::new("test server CA");
        let server = server_ca.leaf("localhost", &["localhost", "127.0.0.1"], 1, true);
        let (server_ca_file, cert_file, key_file) =
            (d.join("server-ca.pem"), d.join("server.pem"), d.join("server-key.pem"));
        std::fs::write(&server_ca_file, server_ca.pem()).unwrap();
        std::fs::write(&cert_file, &server.cert_pem).unwrap();
        std::fs::write(&key_file, &server.key_pem).unwrap();
        let (client_ca_file, crl_file) = (d.join("client-ca.pem"), d.join("crl.pem"));
        let mut listener_extra =
            format!("client_auth = \"{}\"\n", if opts.client_auth.is_empty() { "off" } else { opts.client_auth });
        listener_extra += &opts.listener_extra;
        listener_extra.push('\n');
        if let Some(ca) = &opts.client_ca_pem {
            std::fs::write(&client_ca_file, ca).unwrap();
            listener_extra += &format!("client_ca_file = \"{}\"\n", client_ca_file.display());
        }
        if let Some(crl) = &opts.crl_pem {
            std::fs::write(&crl_file, crl).unwrap();
            listener_extra += &format!("crl_files = [\"{}\"]\n", crl_file.display());
        }
        let config = format!(
            "[listener]\naddress = \"127.0.0.1:0\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n{listener_extra}\n\
             {}\n\n\
             [hsm]\nmodule = \"{}\"\ntoken_label = \"{}\"\npin_file = \"{}\"\n{}\n\n\
             [log]\nlevel = \"debug\"\n\n[audit]\npath = \"{}\"\n{}\n\n{}\n",
            cert_file.display(),
            key_file.display(),
            opts.storage
                .clone()
                .unwrap_or_else(|| format!("[storage]\ntype = \"sled\"\npath = \"{}\"", d.join("storage").display())),
            token.module.display(),
            token.token_label,
            pin_file.display(),
            opts.hsm_extra,
            opts.audit_path.clone().unwrap_or_else(|| d.join("audit").join("audit.log")).display(),
            opts.audit_extra,
            opts.extra,
        );
        let config_file = d.join("keyvault.toml");
        std::fs::write(&config_file, config).unwrap();
        let root = if opts.skip_init {
            let out = Command::new(keyvault_bin())
                .args(["operator", "root-token", "--config"])
                .arg(&config_file)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "root-token failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        } else {
            let init =
                Command::new(keyvault_bin()).args(["operator", "init", "--config"]).arg(&config_file).output().unwrap();
            assert!(init.status.success(), "init failed ({}): {}", init.status, String::from_utf8_lossy(&init.stderr));
            let stdout = String::from_utf8_lossy(&init.stdout);
            stdout.lines().find_map(|l| l.split("Root token").nth(1)).unwrap().rsplit(' ').next().unwrap().to_owned()
        };
        let log = d.join("server.log");
        let audit_path = opts.audit_path.clone().unwrap_or_else(|| d.join("audit").join("audit.log"));
        let mut env = opts.env.clone();
        let clock_file = opts.settable_clock.then(|| d.join("clock"));
        if let Some(f) = &clock_file {
            std::fs::write(f, "+0s").unwrap();
            env.push(("LD_PRELOAD".into(), crate::faketime_lib().display().to_string()));
            env.push(("FAKETIME_TIMESTAMP_FILE".into(), f.display().to_string()));
            env.push(("FAKETIME_NO_CACHE".into(), "1".into()));
            env.push(("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()));
        }
        std::fs::File::create(&log).unwrap();
        let (child, port) = spawn_server(&config_file, &log, &env);
        TestServer {
            dir,
            child,
            port,
            addr: format!("https://localhost:{port}"),
            server_ca,
            server_ca_file,
            cert_file,
            key_file,
            client_ca_file,
            crl_file,
            config_file,
            root,
            log,
            token: token_for_later,
            audit_path,
            env,
            clock_file,
            clock_offset: 0,
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.addr, &self.server_ca_file)
    }

    /// A client presenting `id` as its certificate.
    pub fn client_with(&self, id: &Issued) -> Client {
        Client::with_identity(&self.addr, &self.server_ca_file, Some(&id.identity_pem()))
    }

    /// The audit log file.
    pub fn audit_log(&self) -> PathBuf {
        self.audit_path.clone()
    }

    /// SIGTERM and wait: a clean stop (the audit log gets its final checkpoint).
    pub fn stop(&mut self) {
        assert!(Command::new("kill").arg(self.child.id().to_string()).status().unwrap().success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "keyvault server exited with {status:?}: {}", self.log_text());
    }

    /// `keyvault audit export-key` into a file; returns its path.
    pub fn export_audit_key(&self) -> PathBuf {
        let out = Command::new(keyvault_bin())
            .args(["audit", "export-key", "--config"])
            .arg(&self.config_file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let path = self.dir.path().join("audit-key.pub");
        std::fs::write(&path, &out.stdout).unwrap();
        path
    }

    /// `keyvault audit verify` over this server's audit log, as an operator runs it after
    /// a stop: (passed, its report line).
    pub fn verify_audit_log(&self) -> (bool, String) {
        self.verify_audit_files(&[self.audit_log()])
    }

    /// `keyvault audit verify` over these files of this server's log, in chain order.
    pub fn verify_audit_files(&self, files: &[PathBuf]) -> (bool, String) {
        let key = self.export_audit_key();
        let out = Command::new(keyvault_bin())
            .args(["audit", "verify", "--public-key"])
            .arg(&key)
            .args(files)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Start the server again (after `stop` or a kill), with the same configuration. It
    /// listens on a new port: make clients after this (`client()`).
    pub fn restart(&mut self) {
        let (child, port) = spawn_server(&self.config_file, &self.log, &self.env);
        self.child = child;
        self.port = port;
        self.addr = format!("https://localhost:{port}");
    }

    /// Kill the server (`SIGKILL`) and start it again on the same port, so that clients
    /// made before keep working once it is back.
    pub fn restart_same_port(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.config_file).unwrap();
        let fixed = text.replacen("address = \"127.0.0.1:0\"", &format!("address = \"127.0.0.1:{}\"", self.port), 1);
        std::fs::write(&self.config_file, fixed).unwrap();
        let (child, port) = spawn_server(&self.config_file, &self.log, &self.env);
        assert_eq!(port, self.port);
        self.child = child;
    }

    /// Move the server's wall clock `secs` seconds on (needs `settable_clock`).
    pub fn advance_clock(&mut self, secs: i64) {
        let f = self.clock_file.as_ref().expect("the server was started with settable_clock");
        self.clock_offset += secs;
        std::fs::write(f, format!("{:+}s", self.clock_offset)).unwrap();
    }

    /// The labels of the key objects in the token that start with `prefix`.
    pub fn token_keys(&self, prefix: &str) -> Vec<String> {
        let store = keyvault_hsm::Pkcs11KeyStore::open(&self.token).unwrap();
        use keyvault_hsm::KeyStore;
        store.list(prefix).unwrap().into_iter().map(|l| l.as_str().to_owned()).collect()
    }

    /// The directory SoftHSM keeps this server's token in (to take the token away).
    pub fn token_directory(&self) -> PathBuf {
        let label = self.token.token_label.as_bytes();
        let dirs: Vec<_> = std::fs::read_dir(keyvault_hsm::softhsm::testing::token_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| std::fs::read(p.join("token.object")).is_ok_and(|b| b.windows(label.len()).any(|w| w == label)))
            .collect();
        assert_eq!(dirs.len(), 1, "the server's token directory: {dirs:?}");
        dirs.into_iter().next().unwrap()
    }

    pub fn sighup(&self) {
        assert!(Command::new("kill").args(["-HUP", &self.child.id().to_string()]).status().unwrap().success());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `[[mounts]]` entries of the default configuration, as TOML: a test that adds a
/// mount appends its own after these (a configuration that names mounts names them all).
pub fn default_mounts_toml() -> String {
    keyvault::config::default_mounts()
        .iter()
        .map(|m| format!("[[mounts]]\npath = \"{}\"\ntype = \"{}\"\n", m.path, m.kind))
        .collect()
}

/// Two replicas sharing a throwaway PostgreSQL database and one SoftHSM token.
pub struct Cluster {
    pub pg: crate::postgres::TestPostgres,
    pub url: String,
    pub a: TestServer,
    pub b: TestServer,
}

impl Cluster {
    /// A database `name` in a new PostgreSQL cluster; replica `a` initializes it, `b`
    /// joins it. `env` is given to both servers.
    pub fn start(name: &str, env: Vec<(String, String)>) -> Cluster {
        let pg = crate::postgres::TestPostgres::start();
        let url = pg.database(name);
        let storage = format!("[storage]\ntype = \"postgres\"\nurl = \"{url}\"\npool_size = 8");
        let a =
            TestServer::start(ServerOptions { storage: Some(storage.clone()), env: env.clone(), ..Default::default() });
        // The second replica: same database, same token (started after the first:
        // SoftHSMv2 issue 757), no init.
        let b = TestServer::start(ServerOptions {
            storage: Some(storage),
            token: Some(a.token.clone()),
            skip_init: true,
            env,
            ..Default::default()
        });
        Cluster { pg, url, a, b }
    }
}
