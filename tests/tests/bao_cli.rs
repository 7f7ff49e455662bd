//! The real OpenBao CLI against KeyVault over TLS, unchanged: one table of commands, each
//! with its exit status and what its output must say. `KEYVAULT_BAO_TARGET=openbao` runs
//! the same table against an OpenBao dev server: every row passes there too (that is how
//! the expectations were checked; see docs/testing.md).

use std::collections::HashMap;

use keyvault_tests::bao::Target;

/// One command of the table.
struct Row {
    /// Arguments separated by spaces; `{name}` is a value saved by an earlier row.
    cmd: &'static str,
    /// The exit status: 0 success, 2 the server refused (the CLI's convention).
    exit: i32,
    /// Each must appear in stdout and stderr together, white space runs counted as one
    /// space (the CLI aligns its tables); `a || b`: either.
    says: &'static [&'static str],
    /// Save stdout (trimmed) under this name (with `-field=...` it is one value).
    save: Option<&'static str>,
}

const fn row(cmd: &'static str, exit: i32, says: &'static [&'static str]) -> Row {
    Row { cmd, exit, says, save: None }
}

const fn save(cmd: &'static str, name: &'static str) -> Row {
    Row { cmd, exit: 0, says: &[], save: Some(name) }
}

const POLICY: &str = r#"
path "secret/*" { capabilities = ["read", "list"] }
path "kv/data/app/*" { capabilities = ["read"] }
path "kv/metadata/*" { capabilities = ["read", "list"] }
"#;

const TABLE: &[Row] = &[
    // Status and login.
    row("status", 0, &["Initialized true", "Sealed false", "Total Shares 1"]),
    row("login {root}", 0, &["Success! You are now authenticated", "token_policies [\"root\"]"]),
    row("token lookup", 0, &["policies [root]", "orphan true"]),
    row("token capabilities secret/db", 0, &["root"]),
    row("token renew", 2, &["lease is not renewable"]),
    // Policies.
    row("policy write app {policy_file}", 0, &["Success! Uploaded policy: app"]),
    row("policy read app", 0, &["path \"kv/data/app/*\" { capabilities = [\"read\"] }"]),
    row("policy list", 0, &["app", "root"]),
    // Tokens made by a token: lookup (also by accessor), capabilities, renew, revoke.
    save("token create -policy=app -ttl=10m -field=token", "child"),
    save("token lookup -field=accessor {child}", "child_accessor"),
    row("token lookup -accessor {child_accessor}", 0, &["orphan false", "ttl 9m || ttl 10m", "app"]),
    row("token capabilities {child} secret/db", 0, &["list, read"]),
    row("token capabilities {child} transit/keys/k1", 0, &["deny"]),
    row("token renew -increment=30m {child}", 0, &["token_duration 30m", "token_renewable true"]),
    // (30m in the second of the renewal, 29m59s after it)
    row("token lookup {child}", 0, &["ttl 29m || ttl 30m"]),
    row("token revoke {child}", 0, &["Success! Revoked token (if it existed)"]),
    row("token lookup {child}", 2, &["Error looking up token"]),
    // KV version 1 at secret/.
    row("kv put -mount=secret db password=s3cret", 0, &[]),
    row("kv get -mount=secret db", 0, &["password s3cret"]),
    row("kv get -mount=secret -field=password db", 0, &["s3cret"]),
    row("kv put secret/db password=two", 0, &[]),
    row("kv get -field=password secret/db", 0, &["two"]),
    row("kv list -mount=secret", 0, &["Keys ---- db"]),
    row("kv delete -mount=secret db", 0, &["Success! Data deleted (if it existed) at: secret/db"]),
    row("kv get -mount=secret db", 2, &["No value found at secret/db"]),
    // Deleting what is not there succeeds, as in Vault.
    row("kv delete -mount=secret db", 0, &["Success! Data deleted (if it existed) at: secret/db"]),
    row("kv delete -mount=secret never-written", 0, &["Success! Data deleted (if it existed)"]),
    // KV version 2 at kv/: versions, patch, metadata, check-and-set, soft delete.
    row("kv put -mount=kv app/config user=u1", 0, &["version 1"]),
    row("kv put -mount=kv app/config user=u2", 0, &["version 2"]),
    row("kv get -mount=kv -version=1 -field=user app/config", 0, &["u1"]),
    row("kv get -mount=kv -field=user app/config", 0, &["u2"]),
    row("kv patch -mount=kv app/config extra=x", 0, &["version 3"]),
    row("kv get -mount=kv app/config", 0, &["version 3", "extra x", "user u2"]),
    row("kv metadata get -mount=kv app/config", 0, &["current_version 3", "cas_required false"]),
    row(
        "kv put -mount=kv -cas=1 app/config user=u3",
        2,
        &["check-and-set parameter did not match the current version"],
    ),
    row("kv delete -mount=kv app/config", 0, &["Success! Data deleted (if it existed) at: kv/data/app/config"]),
    row("kv get -mount=kv -field=user app/config", 2, &["No data found at kv/data/app/config"]),
    row("kv undelete -mount=kv -versions=3 app/config", 0, &["Success! Data written to: kv/undelete/app/config"]),
    row("kv get -mount=kv -field=extra app/config", 0, &["x"]),
    row("kv list -mount=kv app", 0, &["Keys ---- config"]),
    row(
        "kv metadata delete -mount=kv app/config",
        0,
        &["Success! Data deleted (if it existed) at: kv/metadata/app/config"],
    ),
    row("kv get -mount=kv app/config", 2, &["No value found at kv/data/app/config"]),
    // AppRole: a role, its secret id (also wrapped), a login.
    row(
        "write auth/approle/role/web token_policies=app token_ttl=10m",
        0,
        &["Success! Data written to: auth/approle/role/web"],
    ),
    save("read -field=role_id auth/approle/role/web/role-id", "role_id"),
    save("write -f -field=secret_id auth/approle/role/web/secret-id", "secret_id"),
    row("write auth/approle/login role_id={role_id} secret_id={secret_id}", 0, &["token_policies", "\"app\""]),
    save("write -wrap-ttl=5m -f -field=wrapping_token auth/approle/role/web/secret-id", "wrapped_secret_id"),
    save("unwrap -field=secret_id {wrapped_secret_id}", "unwrapped_secret_id"),
    row("write auth/approle/login role_id={role_id} secret_id={unwrapped_secret_id}", 0, &["token_policies"]),
    row("unwrap {wrapped_secret_id}", 2, &["wrapping token is not valid or does not exist"]),
    // Vault's tidy of secret ids: started in the background, answered with a warning.
    row("write -f auth/approle/tidy/secret-id", 0, &["Tidy operation"]),
    // Transit.
    row("write -f transit/keys/k1", 0, &["type aes256-gcm96", "latest_version 1"]),
    save("write -field=ciphertext transit/encrypt/k1 plaintext=aGVsbG8=", "ciphertext"),
    row("write -field=plaintext transit/decrypt/k1 ciphertext={ciphertext}", 0, &["aGVsbG8="]),
    row("write -f transit/keys/k1/rotate", 0, &["latest_version 2"]),
    row("write -field=ciphertext transit/encrypt/k1 plaintext=aGVsbG8=", 0, &["vault:v2:"]),
    row("write -field=plaintext transit/decrypt/k1 ciphertext={ciphertext}", 0, &["aGVsbG8="]),
    row("write transit/keys/sk type=ed25519", 0, &["type ed25519", "supports_signing true"]),
    save("write -field=signature transit/sign/sk input=aGVsbG8=", "signature"),
    row("write -field=valid transit/verify/sk input=aGVsbG8= signature={signature}", 0, &["true"]),
    row("write -field=valid transit/verify/sk input=aGVsbG9v signature={signature}", 0, &["false"]),
    // What is mounted.
    row("secrets list", 0, &["kv/ kv", "secret/ kv", "transit/ transit"]),
    row("auth list", 0, &["approle/ approle", "token/ token"]),
    // Response wrapping of a read: one unwrap, then the token is spent.
    row("kv put -mount=secret db password=wrapped-secret", 0, &[]),
    save("read -wrap-ttl=5m -field=wrapping_token secret/db", "wrapping_token"),
    row("unwrap {wrapping_token}", 0, &["password wrapped-secret"]),
    row("unwrap {wrapping_token}", 2, &["wrapping token is not valid or does not exist"]),
    // Emergency seal and unseal.
    row("operator seal", 0, &["Success! Vault is sealed."]),
    row("status", 2, &["Sealed true"]),
    row("kv get -mount=secret db", 2, &["is sealed"]),
    row("operator unseal {unseal_key}", 0, &["Sealed false"]),
    row("status", 0, &["Sealed false"]),
    row("kv get -mount=secret -field=password db", 0, &["wrapped-secret"]),
    // A token of its own: login, lookup, renew, capabilities, revoke -self.
    save("token create -policy=app -ttl=10m -field=token", "mine"),
    row("login {mine}", 0, &["Success! You are now authenticated"]),
    row("token lookup", 0, &["app", "orphan false"]),
    row("token renew", 0, &["token_renewable true"]),
    row("token capabilities secret/db", 0, &["list, read"]),
    row("kv get -mount=secret -field=password db", 0, &["wrapped-secret"]),
    row("kv put -mount=secret db password=nope", 2, &["permission denied"]),
    row("token revoke -self", 0, &["Success! Revoked token (if it existed)"]),
    row("token lookup", 2, &[]),
    row("login {root}", 0, &["Success!"]),
    row("policy delete app", 0, &["Success! Deleted policy: app"]),
    row("policy delete app", 0, &["Success! Deleted policy: app"]),
];

/// White space runs as one space.
fn squeeze(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn fill(cmd: &str, vars: &HashMap<&str, String>) -> Vec<String> {
    cmd.split(' ')
        .map(|arg| {
            let mut a = arg.to_owned();
            for (k, v) in vars {
                a = a.replace(&format!("{{{k}}}"), v);
            }
            assert!(!a.contains('{') || a.contains('"'), "unknown variable in {arg}");
            a
        })
        .collect()
}

#[test]
fn the_bao_cli_works_unchanged() {
    let t = Target::start();
    let policy_file = t.home.path().join("app.hcl");
    std::fs::write(&policy_file, POLICY).unwrap();
    let mut vars: HashMap<&str, String> = HashMap::new();
    vars.insert("root", t.root());
    vars.insert("unseal_key", t.unseal_key());
    vars.insert("policy_file", policy_file.display().to_string());

    let mut failures = Vec::new();
    for (i, r) in TABLE.iter().enumerate() {
        let args = fill(r.cmd, &vars);
        let out = t.command(None).args(&args).stdin(std::process::Stdio::null()).output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let said = squeeze(&format!("{stdout}\n{stderr}"));
        let code = out.status.code().unwrap_or(-1);
        let missing: Vec<&&str> =
            r.says.iter().filter(|s| !s.split(" || ").any(|alt| said.contains(&squeeze(alt)))).collect();
        if code != r.exit || !missing.is_empty() {
            failures.push(format!(
                "row {i}: bao {}\n  exit {code} (want {}), missing {missing:?}\n  stdout: {stdout}\n  stderr: {stderr}",
                r.cmd, r.exit
            ));
            // A value later rows need is missing: the rest would fail for that reason.
            if r.save.is_some() {
                break;
            }
            continue;
        }
        if let Some(name) = r.save {
            let value = stdout.trim().to_owned();
            assert!(!value.is_empty(), "row {i}: bao {} printed nothing to save", r.cmd);
            vars.insert(name, value);
        }
    }
    assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), TABLE.len(), failures.join("\n"));

    // The values the table used are in no log line of the server.
    let log = t.log_text();
    for name in ["secret_id", "unwrapped_secret_id", "unseal_key", "mine"] {
        assert!(!log.contains(vars[name].as_str()), "{name} is in the server log");
    }
    for value in ["s3cret", "wrapped-secret"] {
        assert!(!log.contains(value), "{value} is in the server log");
    }
}
