//! The real OpenBao agent against KeyVault: AppRole auto-auth with the secret id delivered
//! by response wrapping, templates rendered from `secret/` (KV version 1) and `kv/` (KV
//! version 2); and with a short token TTL, the agent renewing the token it holds.
//! `KEYVAULT_BAO_TARGET=openbao` runs both against an OpenBao dev server.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use keyvault_tests::bao::Target;

const POLICY: &str = r#"
path "secret/db" { capabilities = ["read"] }
path "kv/data/app/*" { capabilities = ["read"] }
"#;

#[track_caller]
fn bao(t: &Target, args: &[&str]) -> String {
    let out = t.run_as(args, Some(&t.root()));
    assert!(out.status.success(), "bao {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Policy, secrets, and an AppRole role `role` with the given token TTLs; writes the role
/// id and a wrapped secret id (what a deployer hands a unit) into `dir`. Returns the
/// wrapping token.
fn prepare(t: &Target, dir: &Path, role: &str, ttl: &str, max_ttl: &str) -> String {
    let policy = dir.join("app.hcl");
    std::fs::write(&policy, POLICY).unwrap();
    bao(t, &["policy", "write", "app", policy.to_str().unwrap()]);
    bao(t, &["kv", "put", "-mount=secret", "db", "password=agent-secret-1"]);
    bao(t, &["kv", "put", "-mount=kv", "app/config", "user=agent-user-2"]);
    let role_path = format!("auth/approle/role/{role}");
    bao(
        t,
        &["write", &role_path, "token_policies=app", &format!("token_ttl={ttl}"), &format!("token_max_ttl={max_ttl}")],
    );
    let role_id = bao(t, &["read", "-field=role_id", &format!("{role_path}/role-id")]);
    let wrapped = bao(t, &["write", "-wrap-ttl=5m", "-f", "-field=wrapping_token", &format!("{role_path}/secret-id")]);
    std::fs::write(dir.join("role_id"), role_id).unwrap();
    std::fs::write(dir.join("secret_id"), &wrapped).unwrap();
    wrapped
}

fn agent_config(t: &Target, dir: &Path, role: &str, exit_after_auth: bool) -> std::path::PathBuf {
    let ca = t.ca_file().map(|p| format!("  ca_cert = \"{}\"\n", p.display())).unwrap_or_default();
    let d = dir.display();
    let config = format!(
        r#"vault {{
  address = "{addr}"
{ca}}}
auto_auth {{
  method "approle" {{
    mount_path = "auth/approle"
    config = {{
      role_id_file_path = "{d}/role_id"
      secret_id_file_path = "{d}/secret_id"
      secret_id_response_wrapping_path = "auth/approle/role/{role}/secret-id"
      remove_secret_id_file_after_reading = false
    }}
  }}
  sink "file" {{
    config = {{ path = "{d}/sink" }}
  }}
}}
template {{
  contents = "{{{{ with secret \"secret/db\" }}}}{{{{ .Data.password }}}}{{{{ end }}}}"
  destination = "{d}/from-kv1"
}}
template {{
  contents = "{{{{ with secret \"kv/data/app/config\" }}}}{{{{ .Data.data.user }}}}{{{{ end }}}}"
  destination = "{d}/from-kv2"
}}
exit_after_auth = {exit_after_auth}
"#,
        addr = t.addr(),
    );
    let path = dir.join("agent.hcl");
    std::fs::write(&path, config).unwrap();
    path
}

fn spawn_agent(t: &Target, config: &Path, log: &Path) -> Child {
    t.command(None)
        .arg("agent")
        .arg(format!("-config={}", config.display()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(Stdio::from(std::fs::File::options().append(true).open(log).unwrap()))
        .spawn()
        .unwrap()
}

/// Poll `f` every 50 ms until it is true, for at most `within`.
fn wait_until(within: Duration, what: &str, log: &Path, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; agent log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_agent_logs_in_with_a_wrapped_secret_id_and_renders_templates() {
    let t = Target::start();
    let dir = tempfile::tempdir().unwrap();
    let wrapped = prepare(&t, dir.path(), "web", "10m", "1h");
    let config = agent_config(&t, dir.path(), "web", true);
    let log = dir.path().join("agent.log");
    let mut agent = spawn_agent(&t, &config, &log);
    let mut status = None;
    wait_until(Duration::from_secs(60), "the agent to exit after auth", &log, || {
        status = agent.try_wait().unwrap();
        status.is_some()
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.unwrap().success(), "agent failed:\n{text}");
    assert_eq!(std::fs::read_to_string(dir.path().join("from-kv1")).unwrap(), "agent-secret-1");
    assert_eq!(std::fs::read_to_string(dir.path().join("from-kv2")).unwrap(), "agent-user-2");
    // The agent unwrapped the secret id: the wrapping token is spent.
    let again = t.run_as(&["unwrap", &wrapped], Some(&t.root()));
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("wrapping token is not valid or does not exist"));
    // No warning or error from the agent (a version mismatch would be one).
    assert!(!text.contains("[WARN]") && !text.contains("[ERROR]"), "{text}");
    // The token the agent wrote works, and the secret is in no server log line.
    let sink = std::fs::read_to_string(dir.path().join("sink")).unwrap();
    let out = t.run_as(&["kv", "get", "-mount=secret", "-field=password", "db"], Some(&sink));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "agent-secret-1");
    assert!(!t.log_text().contains("agent-secret-1"));
}

#[test]
fn the_agent_renews_a_short_lived_token_and_keeps_using_it() {
    let t = Target::start();
    let dir = tempfile::tempdir().unwrap();
    prepare(&t, dir.path(), "short", "3s", "2m");
    let config = agent_config(&t, dir.path(), "short", false);
    let log = dir.path().join("agent.log");
    let mut agent = spawn_agent(&t, &config, &log);
    let sink = dir.path().join("sink");
    wait_until(Duration::from_secs(60), "the agent's token", &log, || {
        std::fs::read_to_string(&sink).is_ok_and(|s| !s.is_empty())
    });
    let first = std::fs::read_to_string(&sink).unwrap();
    let logged_in = Instant::now();
    // Well past the token's own 3 s: the agent renewed it (more than once) and still
    // holds the same token, which the server still accepts.
    wait_until(Duration::from_secs(60), "two renewals, 7 s after the login", &log, || {
        let renewals = std::fs::read_to_string(&log).unwrap_or_default().matches("renewed auth token").count();
        renewals >= 2 && logged_in.elapsed() > Duration::from_secs(7)
    });
    assert_eq!(std::fs::read_to_string(&sink).unwrap(), first, "the agent kept its token");
    let out = t.run_as(&["token", "lookup"], Some(&first));
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("renewable"));
    assert_eq!(std::fs::read_to_string(dir.path().join("from-kv2")).unwrap(), "agent-user-2");
}
