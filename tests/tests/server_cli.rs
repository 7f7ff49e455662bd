//! `keyvault server` and `keyvault operator` as an operator meets them: a real install
//! from a configuration file, and clear errors (never a panic) for the usual mistakes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use keyvault_hsm::softhsm::testing;
use keyvault_tests::pki::TestCa;
use keyvault_tests::{Client, json, keyvault_bin};
use secrecy::ExposeSecret;

/// The server's TLS files.
struct Pki {
    ca_cert: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

struct Install {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    pki: Pki,
    module: PathBuf,
    label: String,
    pin_file: PathBuf,
}

fn install() -> Install {
    let tmp = tempfile::Builder::new().prefix("keyvault-server-").tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    // A fresh SoftHSM token in this test process's token directory; SOFTHSM2_CONF is set
    // in this process and inherited by the keyvault processes it starts.
    let token = testing::token_config();
    let pin_file = dir.join("hsm-pin");
    std::fs::write(&pin_file, token.pin.expose_secret()).unwrap();
    std::fs::set_permissions(&pin_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let ca = TestCa::new("KeyVault test CA");
    let server = ca.leaf("localhost", &["localhost", "127.0.0.1"], 1, true);
    let pki = Pki {
        ca_cert: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
    };
    std::fs::write(&pki.ca_cert, ca.pem()).unwrap();
    std::fs::write(&pki.server_cert, &server.cert_pem).unwrap();
    std::fs::write(&pki.server_key, &server.key_pem).unwrap();
    Install { _tmp: tmp, dir, pki, module: token.module.clone(), label: token.token_label.clone(), pin_file }
}

impl Install {
    fn config(&self, address: &str, module: &Path, pin_file: &Path) -> PathBuf {
        let text = format!(
            r#"
[listener]
address = "{address}"
tls_cert_file = "{cert}"
tls_key_file = "{key}"

[storage]
type = "sled"
path = "{storage}"

[hsm]
module = "{module}"
token_label = "{label}"
pin_file = "{pin}"

[log]
level = "debug"

[audit]
path = "{audit}"
"#,
            cert = self.pki.server_cert.display(),
            key = self.pki.server_key.display(),
            storage = self.dir.join("storage").display(),
            module = module.display(),
            label = self.label,
            pin = pin_file.display(),
            audit = self.dir.join("audit.log").display(),
        );
        let path = self.dir.join(format!("keyvault-{}.toml", text.len()));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn good_config(&self, address: &str) -> PathBuf {
        self.config(address, &self.module, &self.pin_file)
    }
}

fn keyvault(args: &[&str]) -> Output {
    let out = Command::new(keyvault_bin()).args(args).stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "keyvault panicked: {stderr}");
    out
}

fn fails_with(args: &[&str], needle: &str) {
    let out = keyvault(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains(needle), "{args:?}: expected {needle:?} in:\n{stderr}");
}

#[test]
fn clear_errors_for_operator_mistakes() {
    let i = install();
    let cfg = i.good_config("127.0.0.1:0");
    let cfg_s = cfg.to_str().unwrap();

    fails_with(
        &["server", "--config", "/nonexistent/keyvault.toml"],
        "cannot read config file /nonexistent/keyvault.toml",
    );
    let bad = i.dir.join("bad.toml");
    std::fs::write(&bad, "[listener]\naddress = 12\n").unwrap();
    fails_with(&["server", "--config", bad.to_str().unwrap()], "configuration");

    let missing_module = i.config("127.0.0.1:0", Path::new("/nonexistent/libpkcs11.so"), &i.pin_file);
    fails_with(
        &["server", "--config", missing_module.to_str().unwrap()],
        "cannot load PKCS#11 module /nonexistent/libpkcs11.so",
    );

    let wrong_pin = i.dir.join("wrong-pin");
    std::fs::write(&wrong_pin, "0000000000000000").unwrap();
    let wrong = i.config("127.0.0.1:0", &i.module, &wrong_pin);
    let out = keyvault(&["server", "--config", wrong.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a wrong PIN stops the server");
    assert!(stderr.contains("the token refused the user PIN"), "{stderr}");
    assert!(!stderr.contains("0000000000000000"), "the PIN is never printed");

    let no_pin = i.config("127.0.0.1:0", &i.module, Path::new("/nonexistent/pin"));
    fails_with(&["server", "--config", no_pin.to_str().unwrap()], "cannot read PIN file /nonexistent/pin");

    fails_with(&["server", "--config", cfg_s], "not initialized: run `keyvault operator init");

    // Port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = i.good_config(&taken.local_addr().unwrap().to_string());
    let init = keyvault(&["operator", "init", "--config", busy.to_str().unwrap()]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    fails_with(&["server", "--config", busy.to_str().unwrap()], "already in use");

    // Initializing twice is refused.
    fails_with(&["operator", "init", "--config", cfg_s], "already initialized");

    // Credentials never on the command line (other users read it in /proc): a dev
    // PostgreSQL URL with a password is refused before anything is made, without repeating
    // it; the bench takes a secret id from a file only.
    let dev_dir = i.dir.join("dev-refused");
    let url = "postgres://keyvault:hunter2-on-argv@localhost/postgres";
    fails_with(&["dev", "--data-dir", dev_dir.to_str().unwrap(), "--postgres", url], "holds a password");
    assert!(!String::from_utf8_lossy(&keyvault(&["dev", "--postgres", url]).stderr).contains("hunter2-on-argv"));
    assert!(!dev_dir.exists(), "nothing was made");
    let out = keyvault(&["bench", "--secret-id", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--secret-id-file"), "clap suggests the file option");
}

#[tokio::test]
async fn operator_init_then_server_serves_over_tls() {
    let i = install();
    let cfg = i.good_config("127.0.0.1:0");
    let out = keyvault(&["operator", "init", "--config", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let root =
        stdout.lines().find_map(|l| l.split("Root token").nth(1)).unwrap().rsplit(' ').next().unwrap().to_owned();

    let log = std::fs::File::create(i.dir.join("server.log")).unwrap();
    let mut child = Command::new(keyvault_bin())
        .args(["server", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    // The server says where it listens (port 0: the OS chose).
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut first).unwrap();
    let port: u16 = first
        .trim()
        .strip_prefix("KeyVault listening on https://127.0.0.1:")
        .unwrap_or_else(|| {
            panic!("{first:?}: {}", std::fs::read_to_string(i.dir.join("server.log")).unwrap_or_default())
        })
        .parse()
        .unwrap();
    let c = Client::new(&format!("https://localhost:{port}"), &i.pki.ca_cert);
    assert_eq!(c.http.get(c.url("sys/health")).send().await.unwrap().status().as_u16(), 200);
    let r = c.put("secret/app/config", &root, json!({"value": "from-a-real-install"})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(c.get("secret/app/config", &root).await.body["data"]["value"], "from-a-real-install");

    // TLS 1.2 and 1.3 with AEAD suites; nothing older, nothing with CBC.
    let s_client = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-CAfile", i.pki.ca_cert.to_str().unwrap()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("openssl is installed by the test set-up");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let tls13 = s_client(&["-tls1_3"]);
    assert!(tls13.contains("Cipher is TLS_") && tls13.contains("Verify return code: 0 (ok)"), "{tls13}");
    let tls12 = s_client(&["-tls1_2"]);
    assert!(tls12.contains("Cipher is ECDHE-") && (tls12.contains("GCM") || tls12.contains("CHACHA20")), "{tls12}");
    // The server itself refuses these (its handshake_failure alert, 40), rather than the
    // connection failing for some other reason.
    for old in [["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"], ["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"]] {
        let out = s_client(&old);
        assert!(out.contains("SSL alert number 40") && out.contains("Cipher is (NONE)"), "{old:?}: {out}");
    }
    let cbc = s_client(&["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384"]);
    assert!(cbc.contains("SSL alert number 40") && cbc.contains("Cipher is (NONE)"), "CBC: {cbc}");

    // SIGTERM: graceful shutdown, exit 0.
    Command::new("kill").arg(child.id().to_string()).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(i.dir.join("server.log")).unwrap();
    assert!(!log.contains(&root));
    assert!(!log.contains("from-a-real-install"));
}
