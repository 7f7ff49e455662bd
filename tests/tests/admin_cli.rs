//! The admin CLI (`keyvault login|secret|transit|policy|role|token|operator`, built on the
//! Rust client) driving the README's flow against a real server: text for people,
//! `--format json` for scripts, non-zero exit with the server's message on failures, and
//! no token or secret where it should not be.

use std::path::Path;
use std::process::{Command, Output};

use keyvault_tests::server::{ServerOptions, TestServer};

const SECRET: &str = "cli-s3cret-value-5b1e";

struct Cli<'a> {
    s: &'a TestServer,
}

impl Cli<'_> {
    /// `keyvault <args>` with the server's address and CA in the environment, and `token`
    /// as `KEYVAULT_TOKEN` when given.
    fn run(&self, token: Option<&str>, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(keyvault_tests::keyvault_bin());
        cmd.args(args)
            .env("KEYVAULT_ADDR", &self.s.addr)
            .env("KEYVAULT_CACERT", &self.s.server_ca_file)
            .env_remove("KEYVAULT_TOKEN")
            .env_remove("VAULT_TOKEN");
        if let Some(t) = token {
            cmd.env("KEYVAULT_TOKEN", t);
        }
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        {
            use std::io::Write;
            let mut input = child.stdin.take().unwrap();
            if let Some(text) = stdin {
                input.write_all(text.as_bytes()).unwrap();
            }
        }
        child.wait_with_output().unwrap()
    }

    #[track_caller]
    fn ok(&self, token: Option<&str>, args: &[&str]) -> String {
        self.ok_in(token, args, None)
    }

    #[track_caller]
    fn ok_in(&self, token: Option<&str>, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(token, args, stdin);
        assert!(out.status.success(), "keyvault {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Fails, and says why on stderr.
    #[track_caller]
    fn fails(&self, token: Option<&str>, args: &[&str]) -> String {
        let out = self.run(token, args, None);
        assert!(!out.status.success(), "keyvault {args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
        assert!(out.stdout.is_empty(), "nothing on stdout on failure");
        String::from_utf8(out.stderr).unwrap()
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_flow_through_the_cli() {
    let s = TestServer::start(ServerOptions::default());
    let cli = Cli { s: &s };
    let root = Some(s.root.as_str());
    let dir = tempfile::tempdir().unwrap();
    let sid_file = dir.path().join("secret-id");

    // The admin's set-up.
    cli.ok_in(
        root,
        &["policy", "write", "web-read", "-"],
        Some("path \"secret/db/*\" { capabilities = [\"read\"] }\n"),
    );
    assert!(cli.ok(root, &["policy", "list"]).lines().any(|l| l == "web-read"));
    assert!(cli.ok(root, &["policy", "read", "web-read"]).contains("path \"secret/db/*\""));
    assert_eq!(
        cli.ok(
            root,
            &["role", "write", "approle", "web", "token_policies=web-read", "token_ttl=10m", "token_max_ttl=15m"]
        ),
        "written: auth/approle/role/web\n"
    );
    let role = json(&cli.ok(root, &["role", "read", "approle", "web", "--format", "json"]));
    assert_eq!(
        (role["token_policies"].clone(), role["token_ttl"].clone()),
        (serde_json::json!(["web-read"]), 600.into())
    );
    assert!(cli.ok(root, &["role", "read", "approle", "web"]).contains("token_ttl: 600\n"));
    let role_id = cli.ok(root, &["role", "role-id", "web"]).trim().to_owned();
    let sid = cli.ok(root, &["role", "secret-id", "web"]);
    std::fs::write(&sid_file, &sid).unwrap();
    // As the README: the value from stdin, not on the command line.
    cli.ok_in(root, &["secret", "put", "secret/db/password", "value=@-"], Some(SECRET));
    let file = dir.path().join("cert.pem");
    std::fs::write(&file, "-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n").unwrap();
    cli.ok(root, &["secret", "put", "secret/db/tls", &format!("cert=@{}", file.display()), "port=5432"]);

    // The unit.
    let token = cli
        .ok(
            None,
            &[
                "login",
                "--method",
                "approle",
                "--role-id",
                &role_id,
                "--secret-id-file",
                sid_file.to_str().unwrap(),
                "--token-only",
            ],
        )
        .trim()
        .to_owned();
    assert!(token.starts_with("eyJ"), "a JWT");
    let unit = Some(token.as_str());
    assert_eq!(cli.ok(unit, &["secret", "get", "secret/db/password", "--field", "value"]), format!("{SECRET}\n"));
    let tls = json(&cli.ok(unit, &["secret", "get", "secret/db/tls", "--format", "json"]));
    assert!(tls["data"]["cert"].as_str().unwrap().contains("not really") && tls["data"]["port"] == "5432");
    let lookup = cli.ok(unit, &["token", "lookup"]);
    assert!(lookup.contains("policies: [\"web-read\"]") && !lookup.contains(&token), "{lookup}");
    assert!(json(&cli.ok(unit, &["token", "lookup", "--format", "json"])).get("id").is_none());

    // Failures: non-zero, the server's message, nothing on stdout.
    let denied = cli.fails(unit, &["secret", "put", "secret/db/password", "value=overwritten"]);
    assert!(denied.contains("403") && denied.contains("permission denied"), "{denied}");
    let missing = cli.fails(root, &["secret", "get", "secret/db/nothing"]);
    assert!(missing.contains("404"), "{missing}");
    let bad_login =
        cli.fails(None, &["login", "--method", "approle", "--role-id", &role_id, "--secret-id-file", "/nonexistent"]);
    assert!(bad_login.contains("/nonexistent"), "{bad_login}");
    std::fs::write(&sid_file, "wrong-secret-id").unwrap();
    let wrong = cli.fails(
        None,
        &["login", "--method", "approle", "--role-id", &role_id, "--secret-id-file", sid_file.to_str().unwrap()],
    );
    assert!(wrong.contains("401") && wrong.contains("invalid credentials"), "{wrong}");
    let no_token = cli.fails(None, &["secret", "list", "secret/db"]);
    assert!(no_token.contains("401"), "{no_token}");
    let err = cli.fails(root, &["secret", "put", "secret/db/x", "novalue"]);
    assert!(err.contains("argument 1: key=value expected") && !err.contains("novalue"), "{err}");

    // Lists, deletes.
    assert_eq!(cli.ok(root, &["secret", "list", "secret/db"]), "password\ntls\n");
    assert_eq!(
        json(&cli.ok(root, &["secret", "list", "secret/db", "--format", "json"]))["keys"],
        serde_json::json!(["password", "tls"])
    );
    assert_eq!(cli.ok(root, &["secret", "delete", "secret/db/tls"]), "deleted: secret/db/tls\n");
    assert!(cli.fails(root, &["secret", "get", "secret/db/tls"]).contains("404"));
    cli.ok(root, &["secret", "put", "kv/app/config", "user=alice"]);
    assert_eq!(cli.ok(root, &["secret", "get", "kv/app/config", "--field", "user"]), "alice\n");

    // Transit.
    cli.ok(root, &["transit", "create-key", "app"]);
    cli.ok(root, &["transit", "create-key", "signer", "--type", "ed25519"]);
    let ct = cli.ok_in(root, &["transit", "encrypt", "app"], Some("attack at dawn")).trim().to_owned();
    assert!(ct.starts_with("vault:v1:"), "{ct}");
    assert_eq!(cli.ok(root, &["transit", "decrypt", "app", &ct]), "attack at dawn");
    assert_eq!(cli.ok(root, &["transit", "rotate", "app"]).trim(), "latest_version: 2");
    let sig = json(&cli.ok_in(root, &["transit", "sign", "signer", "--format", "json"], Some("msg")))["signature"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(cli.ok_in(root, &["transit", "verify", "signer", &sig], Some("msg")).trim(), "valid: true");
    assert_eq!(cli.ok_in(root, &["transit", "verify", "signer", &sig], Some("msG")).trim(), "valid: false");

    // Token renewal and revocation.
    assert!(cli.ok(unit, &["token", "renew"]).starts_with("renewed: "));
    assert_eq!(cli.ok(unit, &["token", "revoke"]), "revoked\n");
    assert!(cli.fails(unit, &["secret", "get", "secret/db/password"]).contains("401"));

    // A token file instead of the environment.
    let token_file = dir.path().join("root-token");
    std::fs::write(&token_file, &s.root).unwrap();
    assert!(
        cli.ok(None, &["secret", "list", "secret/db", "--token-file", token_file.to_str().unwrap()])
            .contains("password")
    );

    // Vault's variable names, when KeyVault's are not set.
    let out = Command::new(keyvault_tests::keyvault_bin())
        .args(["secret", "get", "secret/db/password", "--field", "value"])
        .env_remove("KEYVAULT_ADDR")
        .env_remove("KEYVAULT_CACERT")
        .env_remove("KEYVAULT_TOKEN")
        .env("VAULT_ADDR", &s.addr)
        .env("VAULT_CACERT", &s.server_ca_file)
        .env("VAULT_TOKEN", &s.root)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{SECRET}\n"), "{}", String::from_utf8_lossy(&out.stderr));
    // One family at a time, never a mix: Vault's token does not go to the server
    // KEYVAULT_ADDR names (nor KeyVault's token to the one VAULT_ADDR names). Each
    // command below has a token only in the other family: it is sent none and refused.
    let cmd = |set: &[(&str, &str)]| {
        let mut c = Command::new(keyvault_tests::keyvault_bin());
        c.args(["secret", "get", "secret/db/password", "--field", "value"]);
        for v in ["KEYVAULT_ADDR", "KEYVAULT_CACERT", "KEYVAULT_TOKEN", "VAULT_ADDR", "VAULT_CACERT", "VAULT_TOKEN"] {
            c.env_remove(v);
        }
        for (k, v) in set {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let ca = s.server_ca_file.to_str().unwrap();
    for set in [
        [("KEYVAULT_ADDR", s.addr.as_str()), ("KEYVAULT_CACERT", ca), ("VAULT_TOKEN", s.root.as_str())],
        [("VAULT_ADDR", s.addr.as_str()), ("VAULT_CACERT", ca), ("KEYVAULT_TOKEN", s.root.as_str())],
    ] {
        let out = cmd(&set);
        assert!(!out.status.success(), "{set:?}: {}", String::from_utf8_lossy(&out.stdout));
        assert!(!String::from_utf8_lossy(&out.stdout).contains(SECRET));
    }
    // The HSM PIN goes only to a server named for KeyVault.
    let out = Command::new(keyvault_tests::keyvault_bin())
        .args(["operator", "unseal", "--config", "/nonexistent/keyvault.toml"])
        .env_remove("KEYVAULT_ADDR")
        .env("VAULT_ADDR", &s.addr)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEYVAULT_ADDR"), "{}", String::from_utf8_lossy(&out.stderr));

    assert_no_secret_in(Path::new(&s.log), &[SECRET, &token, sid.trim()]);
}

fn assert_no_secret_in(log: &Path, secrets: &[&str]) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    for s in secrets {
        assert!(!text.contains(s), "the server log holds a secret ({} bytes of it)", s.len());
    }
}
