//! The audit log end to end: a full run through a real server verifies; every kind of
//! tampering is detected with its reason and line; nothing secret is written; fail-closed
//! mode refuses replies it cannot audit; file anomalies and rotation are handled.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use keyvault::audit::chain::{canonical, checkpoint_message, entry_hash};
use keyvault_tests::pki::TestCa;
use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Reply, json, keyvault_bin};
use serde_json::{Map, Value};

const SECRET: &str = "audit-secret-value-9c3e27";
const PASSWORD: &str = "audit-admin-password-5d81";

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

/// `keyvault audit verify` as an operator runs it: (exit success, output line).
fn verify_cli(key: &Path, files: &[PathBuf], live: bool) -> (bool, String) {
    let mut cmd = std::process::Command::new(keyvault_bin());
    cmd.args(["audit", "verify", "--public-key"]).arg(key);
    if live {
        cmd.arg("--live");
    }
    let out = cmd.args(files).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p).unwrap().lines().map(str::to_owned).collect()
}

fn write_lines(p: &Path, lines: &[String]) {
    std::fs::write(p, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

/// Recompute `hash` (and `prev`) of lines[from..] as a writer of the whole file could,
/// re-signing checkpoints with `attacker` (who does not have the HSM key).
fn rechain(lines: &mut [String], from: usize, attacker: &ed25519_dalek::SigningKey) {
    use ed25519_dalek::Signer;
    let mut prev: [u8; 32] = if from == 0 {
        let h: Map<String, Value> = serde_json::from_str(&lines[0]).unwrap();
        hex::decode(h["genesis"].as_str().unwrap()).unwrap().try_into().unwrap()
    } else {
        let h: Map<String, Value> = serde_json::from_str(&lines[from - 1]).unwrap();
        hex::decode(h["hash"].as_str().unwrap()).unwrap().try_into().unwrap()
    };
    for line in lines.iter_mut().skip(from) {
        let mut obj: Map<String, Value> = serde_json::from_str(line).unwrap();
        obj.remove("hash");
        obj.insert("prev".into(), hex::encode(prev).into());
        if obj["type"] == "checkpoint" {
            obj.insert("head".into(), hex::encode(prev).into());
            let msg = checkpoint_message(&prev, obj["seq"].as_u64().unwrap(), obj["final"].as_bool().unwrap());
            let sig = attacker.sign(&msg);
            obj.insert("signature".into(), base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()).into());
        }
        // The writer's form: the canonical entry, `"hash"` appended as its last member.
        let hashed = String::from_utf8(canonical(&Value::Object(obj))).unwrap();
        let hash = entry_hash(&prev, hashed.as_bytes());
        *line = format!("{},\"hash\":\"{}\"}}", hashed.strip_suffix('}').unwrap(), hex::encode(hash));
        prev = hash;
    }
}

fn first_line_of_type(lines: &[String], kind: &str, after: usize) -> usize {
    lines.iter().enumerate().skip(after).find(|(_, l)| l.contains(&format!("\"type\":\"{kind}\""))).unwrap().0
}

async fn approle_token(s: &TestServer, role: &str) -> (String, String) {
    let c = s.client();
    let sid = c.post(&format!("auth/approle/role/{role}/secret-id"), Some(&s.root), json!({})).await.body["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = ok(c.post("auth", None, json!({"role": role, "secret_id": sid})).await, 200);
    (r.body["auth"]["client_token"].as_str().unwrap().to_owned(), sid)
}

#[tokio::test]
async fn a_full_run_verifies_and_every_tampering_is_detected() {
    let ca = TestCa::new("client CA");
    let unit = ca.leaf("unit", &["spiffe://corp/ns/a/sa/unit"], 7, false);
    let mut s = TestServer::start(ServerOptions {
        client_auth: "optional",
        client_ca_pem: Some(ca.pem()),
        audit_extra: "checkpoint_every = 7".into(),
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    // Admin set-up, a unit's start-up, reads and writes, failures of every kind.
    ok(
        c.put(
            "sys/policies/acl/app",
            &root,
            json!({"policy": "path \"secret/app/*\" { capabilities = [\"read\", \"create\", \"update\"] }"}),
        )
        .await,
        204,
    );
    ok(c.post("auth/approle/role/app", Some(&root), json!({"token_policies": ["app"]})).await, 204);
    ok(c.put("secret/app/db", &root, json!({"value": SECRET})).await, 200);
    let (t, sid) = approle_token(&s, "app").await;
    assert_eq!(ok(c.get("secret/app/db", &t).await, 200).body["data"]["value"], SECRET);
    ok(c.put("secret/app/other", &t, json!({"value": SECRET})).await, 200);
    ok(c.get("secret/other", &t).await, 403);
    ok(c.post("auth", None, json!({"role": "app", "secret_id": "f".repeat(64)})).await, 401);
    ok(c.get("secret/app/db", "forged.token.value").await, 401);
    ok(
        c.post("auth/userpass/users/admin", Some(&root), json!({"password": PASSWORD, "token_policies": ["app"]}))
            .await,
        204,
    );
    let admin = ok(c.post("auth/userpass/login/admin", None, json!({"password": PASSWORD})).await, 200);
    let admin_token = admin.body["auth"]["client_token"].as_str().unwrap().to_owned();
    ok(
        c.post(
            "auth/cert/role/unit",
            Some(&root),
            json!({"certificate_sha256": [unit.sha256_hex], "token_policies": ["app"]}),
        )
        .await,
        204,
    );
    let cu = s.client_with(&unit);
    let bound = ok(cu.post("auth/cert/login", None, json!({"name": "unit"})).await, 200);
    let bound_token = bound.body["auth"]["client_token"].as_str().unwrap().to_owned();
    ok(c.get("secret/app/db", &bound_token).await, 401);
    let kill = ok(c.post("sys/revoke-identity", Some(&root), json!({"role": "app"})).await, 200);
    assert!(kill.body["data"]["revoked_at"].is_u64());
    // The HMAC of a known token, to find its requests in the log.
    let h = ok(c.post("sys/audit-hash", Some(&root), json!({"input": t})).await, 200);
    let t_hmac = h.body["data"]["hash"].as_str().unwrap().to_owned();
    assert!(t_hmac.starts_with("hmac-sha256:"));
    s.stop();

    let key = s.export_audit_key();
    let log = s.audit_log();
    let (good, out) = verify_cli(&key, std::slice::from_ref(&log), false);
    assert!(good, "{out}");
    assert!(out.starts_with("ok entries="), "{out}");
    let text = std::fs::read_to_string(&log).unwrap();
    // What the run did is in the log...
    assert!(text.contains(&t_hmac), "the token's requests can be found by its HMAC");
    assert!(text.contains("\"reason\":\"invalid_credentials\""));
    assert!(text.contains("\"reason\":\"permission_denied\""));
    assert!(text.contains("\"reason\":\"certificate_required\""));
    assert!(text.contains("kill switch: revoked role app"));
    assert!(text.contains(&unit.sha256_hex), "the client certificate of a request is recorded");
    // ...and nothing secret: values, tokens, secret ids, passwords.
    for secret in [SECRET, PASSWORD, &t, &sid, &root, &admin_token, &bound_token] {
        assert!(!text.contains(secret), "a secret reached the audit log");
    }
    let checkpoints = text.matches("\"type\":\"checkpoint\"").count();
    assert!(checkpoints >= 3, "checkpoints every 7 entries and a final one: {checkpoints}");

    // Each tampering, on a copy, with the reason and line it must report.
    let original = lines(&log);
    let n = original.len();
    let attacker = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
    let request_line = first_line_of_type(&original, "request", 1);
    let mut cases: Vec<(&str, Vec<String>, &str, usize)> = Vec::new();
    let mut edited = original.clone();
    edited[request_line + 2] = edited[request_line + 2].replacen("\"status\":", "\"status\":1", 1);
    cases.push(("edit a field", edited, "entry_hash_mismatch", request_line + 3));
    // The same entry to serde, other bytes: a key given twice (a reader that keeps the
    // first of duplicates sees status 500), spaces.
    let mut duplicated = original.clone();
    duplicated[request_line + 2] =
        duplicated[request_line + 2].replacen("\"status\":", "\"status\":500,\"status\":", 1);
    cases.push(("give a key twice", duplicated, "entry_hash_mismatch", request_line + 3));
    let mut spaced = original.clone();
    spaced[request_line + 2] = spaced[request_line + 2].replacen(",", ", ", 1);
    cases.push(("add a space", spaced, "entry_hash_mismatch", request_line + 3));
    let mut deleted = original.clone();
    deleted.remove(request_line + 1);
    cases.push(("delete an entry", deleted, "previous_hash_mismatch", request_line + 2));
    let mut swapped = original.clone();
    swapped.swap(request_line + 1, request_line + 2);
    cases.push(("swap two entries", swapped, "previous_hash_mismatch", request_line + 2));
    let mut appended = original.clone();
    appended.push(original[request_line].clone());
    rechain(&mut appended, n, &attacker);
    cases.push(("append a forged entry", appended, "previous_hash_mismatch", n + 1));
    let mut forged_naive = original.clone();
    forged_naive.push(original[request_line].replace("\"status\":200", "\"status\":204"));
    cases.push(("append a copied entry", forged_naive, "previous_hash_mismatch", n + 1));
    let last_checkpoint = original.iter().rposition(|l| l.contains("\"type\":\"checkpoint\"")).unwrap();
    assert_eq!(last_checkpoint, n - 1, "a cleanly stopped log ends with its final checkpoint");
    let truncated = original[..n - 1].to_vec();
    cases.push(("truncate after the last checkpoint", truncated, "truncated_after_checkpoint", n));
    let mut rewritten = original.clone();
    rewritten[request_line] = rewritten[request_line].replace("\"outcome\":\"ok\"", "\"outcome\":\"denied\"");
    rechain(&mut rewritten, request_line, &attacker);
    let first_cp = first_line_of_type(&rewritten, "checkpoint", request_line);
    cases.push((
        "rewrite the whole chain without the HSM key",
        rewritten,
        "checkpoint_signature_invalid",
        first_cp + 1,
    ));
    cases.push(("drop the genesis header", original[1..].to_vec(), "missing_genesis", 1));
    let mut recounted = original.clone();
    recounted.remove(request_line + 1);
    rechain(&mut recounted, request_line + 1, &attacker);
    cases.push(("delete an entry and recompute the chain", recounted, "sequence_broken", request_line + 2));
    for (name, tampered, reason, line) in cases {
        let path = s.dir.path().join("tampered.log");
        write_lines(&path, &tampered);
        let (good, out) = verify_cli(&key, std::slice::from_ref(&path), false);
        assert!(!good, "{name}: verify said {out}");
        assert!(out.contains(&format!("reason={reason}")), "{name}: {out}");
        assert!(out.contains(&format!("line={line} ")), "{name}: expected line {line}: {out}");
    }
    // A cut in the middle of a line.
    let path = s.dir.path().join("torn.log");
    let bytes = std::fs::read(&log).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 20]).unwrap();
    let (good, out) = verify_cli(&key, &[path], false);
    assert!(!good && out.contains("reason=truncated_after_checkpoint"), "{out}");
    // Verification needs the right public key, not the one in the header.
    let other_key = s.dir.path().join("other.pub");
    std::fs::write(&other_key, base64::engine::general_purpose::STANDARD.encode(attacker.verifying_key().to_bytes()))
        .unwrap();
    let (good, out) = verify_cli(&other_key, std::slice::from_ref(&log), false);
    assert!(!good && out.contains("checkpoint_signature_invalid"), "{out}");
}

#[tokio::test]
async fn fail_closed_refuses_replies_it_cannot_audit() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    ok(c.put("secret/x", &s.root, json!({"value": SECRET})).await, 200);
    let audit_dir = s.audit_log().parent().unwrap().to_path_buf();
    // Make the log unwritable (even for root): the directory becomes a file.
    std::fs::remove_dir_all(&audit_dir).unwrap();
    std::fs::write(&audit_dir, b"not a directory").unwrap();
    let r = c.get("secret/x", &s.root).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(!r.body.to_string().contains(SECRET), "no secret without its audit entry");
    // A write is refused before it runs: the stored value does not change.
    assert_eq!(c.put("secret/x", &s.root, json!({"value": "new"})).await.status, 503);
    // Writable again: the server recovers by itself and records the gap.
    std::fs::remove_file(&audit_dir).unwrap();
    std::fs::create_dir(&audit_dir).unwrap();
    let mut back = None;
    for _ in 0..100 {
        let r = c.get("secret/x", &s.root).await;
        if r.status == 200 {
            back = Some(r);
            break;
        }
        assert_eq!(r.status, 503, "{r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(back.expect("the audit log recovers by itself").body["data"]["value"], SECRET);
    let text = std::fs::read_to_string(s.audit_log()).unwrap();
    assert!(text.contains("\"type\":\"gap\"") && text.contains("write_failed"), "{text}");
    assert!(s.log_text().contains("audit entry not written"));
}

#[tokio::test]
async fn a_deleted_truncated_or_replaced_log_is_noticed() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let log = s.audit_log();
    for (what, damage) in [
        ("deleted", Box::new(|p: &Path| std::fs::remove_file(p).unwrap()) as Box<dyn Fn(&Path)>),
        ("truncated", Box::new(|p: &Path| std::fs::File::options().write(true).open(p).unwrap().set_len(10).unwrap())),
        (
            "replaced",
            Box::new(|p: &Path| {
                std::fs::remove_file(p).unwrap();
                std::fs::write(p, b"").unwrap();
            }),
        ),
        (
            "appended_by_another_writer",
            Box::new(|p: &Path| {
                use std::io::Write;
                let mut f = std::fs::File::options().append(true).open(p).unwrap();
                f.write_all(b"{\"type\":\"request\",\"forged\":true}\n").unwrap();
            }),
        ),
    ] {
        ok(c.get("sys/health", &s.root).await, 200);
        damage(&log);
        ok(c.get("sys/health", &s.root).await, 200);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("\"type\":\"gap\"") && text.contains(&format!("\"reason\":\"{what}\"")),
            "{what}: {text}"
        );
        assert!(text.lines().next().unwrap().contains("\"continues\""), "{what}: the new file continues the chain");
    }
    assert!(s.log_text().contains("changed under the writer"));
    // The damaged files were set aside, not overwritten.
    let aside = std::fs::read_dir(log.parent().unwrap())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains("anomaly"))
        .count();
    assert_eq!(aside, 3, "the truncated, replaced and appended files are kept for inspection");
}

#[tokio::test]
async fn a_torn_last_line_is_cut_at_start_and_recorded() {
    let mut s = TestServer::start(ServerOptions::default());
    ok(s.client().put("secret/t", &s.root, json!({"value": "v"})).await, 200);
    s.stop();
    // A crash in the middle of a write leaves part of a line.
    {
        use std::io::Write;
        let mut f = std::fs::File::options().append(true).open(s.audit_log()).unwrap();
        f.write_all(b"{\"type\":\"request\",\"request_id\":\"cut-her").unwrap();
    }
    let key = s.export_audit_key();
    assert!(verify_cli(&key, &[s.audit_log()], false).1.contains("truncated_after_checkpoint"));
    s.restart();
    ok(s.client().get("secret/t", &s.root).await, 200);
    s.stop();
    let text = std::fs::read_to_string(s.audit_log()).unwrap();
    assert!(!text.contains("cut-her"), "the partial line is gone");
    assert!(text.contains("\"reason\":\"torn_write_recovered\""), "{text}");
    let (good, out) = verify_cli(&key, &[s.audit_log()], false);
    assert!(good && out.contains("gaps=1"), "{out}");
}

#[tokio::test]
async fn rotation_keeps_one_chain_across_files() {
    let mut s = TestServer::start(ServerOptions { audit_extra: "max_file_bytes = 4096".into(), ..Default::default() });
    let c = s.client();
    for i in 0..40 {
        ok(c.put(&format!("secret/r/{i}"), &s.root, json!({"value": "v"})).await, 200);
    }
    s.stop();
    let key = s.export_audit_key();
    let log = s.audit_log();
    let mut files: Vec<PathBuf> =
        (1..).map(|n| PathBuf::from(format!("{}.{n}", log.display()))).take_while(|p| p.exists()).collect();
    assert!(files.len() >= 3, "rotated into several files: {}", files.len());
    files.push(log.clone());
    let (good, out) = verify_cli(&key, &files, false);
    assert!(good, "{out}");
    // Files out of order, or one missing, break the chain.
    let mut reordered = files.clone();
    reordered.swap(1, 2);
    assert!(verify_cli(&key, &reordered, false).1.contains("previous_hash_mismatch"));
    let mut missing = files.clone();
    missing.remove(1);
    assert!(verify_cli(&key, &missing, false).1.contains("previous_hash_mismatch"));
}

#[tokio::test]
async fn buffered_mode_and_restarts_keep_a_verifiable_chain() {
    let mut s = TestServer::start(ServerOptions {
        audit_extra: "mode = \"buffered\"\ncheckpoint_interval = \"1s\"".into(),
        ..Default::default()
    });
    let c = s.client();
    for i in 0..20 {
        ok(c.put(&format!("secret/b/{i}"), &s.root, json!({"value": "v"})).await, 200);
    }
    // A live log: entries after the last checkpoint are accepted only with --live. Wait
    // for the timed checkpoint that follows the writes (checkpoint_interval 1 s).
    let written = lines(&s.audit_log()).len();
    keyvault_tests::wait_for(Duration::from_secs(10), "a checkpoint after the writes", || {
        lines(&s.audit_log()).iter().skip(written.saturating_sub(1)).any(|l| l.contains("\"type\":\"checkpoint\""))
    })
    .await;
    let key = s.export_audit_key();
    let (good, out) = verify_cli(&key, &[s.audit_log()], true);
    assert!(good, "{out}");
    s.stop();
    let (good, out) = verify_cli(&key, &[s.audit_log()], false);
    assert!(good, "{out}");
    // Restart on the same log: a continuation header after the final checkpoint.
    let log_before = lines(&s.audit_log()).len();
    s.restart();
    ok(s.client().put("secret/b/after", &s.root, json!({"value": "v"})).await, 200);
    s.stop();
    let after = lines(&s.audit_log());
    assert!(after[log_before].contains("\"type\":\"header\"") && after[log_before].contains("\"continues\""));
    let (good, out) = verify_cli(&key, &[s.audit_log()], false);
    assert!(good, "{out}");
}

#[tokio::test]
async fn a_killed_server_leaves_a_log_that_verifies_after_restart() {
    let mut s = TestServer::start(ServerOptions::default());
    let c = s.client();
    for i in 0..5 {
        ok(c.put(&format!("secret/k/{i}"), &s.root, json!({"value": "v"})).await, 200);
    }
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let key = s.export_audit_key();
    // Without its final checkpoint the stopped log is incomplete...
    let (good, out) = verify_cli(&key, &[s.audit_log()], false);
    assert!(!good && out.contains("truncated_after_checkpoint"), "{out}");
    // ...and every acknowledged request is in it.
    let text = std::fs::read_to_string(s.audit_log()).unwrap();
    // (each write: its intent before it ran, its outcome after)
    assert_eq!(text.matches("\"operation\":\"PUT /v1/secret/{*path}\"").count(), 10);
    assert_eq!(text.matches("\"type\":\"intent\"").count(), 5);
    // After a restart and a clean stop, the chain continues and verifies (and says the
    // restarted server came up: its reopening event is in the log).
    s.restart();
    ok(s.client().send("GET", "sys/health", None, None).await, 200);
    s.stop();
    assert!(std::fs::read_to_string(s.audit_log()).unwrap().contains("audit_log_reopened"));
    let (good, out) = verify_cli(&key, &[s.audit_log()], false);
    assert!(good, "{out}");
}

/// A login records an audit intent only when it consumes something (a use of a limited
/// secret id, a bootstrap token); one that changes nothing waits for one entry, its own.
/// Consumed or not, every login has its request entry, and the log verifies.
#[tokio::test]
async fn a_login_records_an_intent_only_when_it_consumes_a_use() {
    let mut s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    ok(c.post("auth/approle/role/free", Some(&root), json!({})).await, 204);
    ok(c.post("auth/approle/role/twice", Some(&root), json!({"secret_id_num_uses": 2})).await, 204);
    let sid = |role: &'static str| {
        let (c, root) = (c.clone(), root.clone());
        async move {
            let r = ok(c.post(&format!("auth/approle/role/{role}/secret-id"), Some(&root), json!({})).await, 200);
            r.body["data"]["secret_id"].as_str().unwrap().to_owned()
        }
    };
    let (free, twice) = (sid("free").await, sid("twice").await);
    let login = |path: &'static str, role: &'static str, secret: String, status: u16| {
        let c = c.clone();
        async move {
            let r = ok(c.post(path, None, json!({"role": role, "secret_id": secret})).await, status);
            r.headers["x-request-id"].to_str().unwrap().to_owned()
        }
    };
    let unconsumed =
        [login("auth", "free", free.clone(), 200).await, login("auth/approle/login", "free", free.clone(), 200).await];
    let consumed = [
        login("auth", "twice", twice.clone(), 200).await,
        login("auth/approle/login", "twice", twice.clone(), 200).await,
    ];
    // Used up: refused, and nothing was consumed.
    let refused = login("auth", "twice", twice.clone(), 401).await;
    // A bootstrap token is consumed by its login (an intent, before the request entry);
    // presented again, or unknown, it consumes nothing.
    let minted = ok(c.post("auth/bootstrap/token", Some(&root), json!({"policies": ["default"]})).await, 200);
    let bootstrap = minted.body["data"]["bootstrap_token"].as_str().unwrap().to_owned();
    let boot = |token: String, status: u16| {
        let c = c.clone();
        async move {
            let r = ok(c.post("auth/bootstrap/login", None, json!({"token": token})).await, status);
            r.headers["x-request-id"].to_str().unwrap().to_owned()
        }
    };
    let boot_consumed = boot(bootstrap.clone(), 200).await;
    let boot_refused = [boot(bootstrap.clone(), 401).await, boot("kvb.unknown".into(), 401).await];
    s.stop();

    let log = std::fs::read_to_string(s.audit_log()).unwrap();
    let entries: Vec<Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let count = |kind: &str, id: &str| entries.iter().filter(|e| e["type"] == kind && e["request_id"] == id).count();
    for id in unconsumed.iter().chain([&refused]).chain(&boot_refused) {
        assert_eq!((count("intent", id), count("request", id)), (0, 1), "login {id}");
    }
    let seq = |kind: &str, id: &str| {
        entries.iter().find(|e| e["type"] == kind && e["request_id"] == id).and_then(|e| e["seq"].as_u64()).unwrap()
    };
    for id in consumed.iter().chain([&boot_consumed]) {
        assert_eq!((count("intent", id), count("request", id)), (1, 1), "login {id}");
        assert!(seq("intent", id) < seq("request", id), "login {id}: its intent comes first");
    }
    let (good, out) = s.verify_audit_log();
    assert!(good, "{out}");
}

/// A request whose client goes away after its intent was written still gets an outcome
/// entry, `cancelled` with status 499 (its change may or may not have been made): the
/// log then shows no unfinished intent, and the writer keeps no room reserved for it. The
/// request is held in the token (`slow 3000 generate`) while its client hangs up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_hangs_up_after_its_intent_gets_a_cancelled_outcome() {
    use tokio::io::AsyncWriteExt;
    let fault = keyvault_tests::TokenFault::new();
    let s = TestServer::start(ServerOptions { env: vec![fault.env()], ..Default::default() });
    fault.set("slow 3000 generate");
    let mut stream = keyvault_tests::tls_connect(&s.addr, &s.server_ca_file, None).await;
    let body = "{}";
    let head = format!(
        "POST /v1/transit/keys/dropped HTTP/1.1\r\nhost: localhost\r\nx-vault-token: {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        s.root,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    keyvault_tests::wait_for(Duration::from_secs(10), "the intent on disk", || {
        lines(&s.audit_log()).iter().any(|l| l.contains("\"type\":\"intent\"") && l.contains("transit/keys/dropped"))
    })
    .await;
    drop(stream);
    keyvault_tests::wait_for(Duration::from_secs(10), "the cancelled outcome", || {
        lines(&s.audit_log()).iter().any(|l| l.contains("\"outcome\":\"cancelled\""))
    })
    .await;
    let log = lines(&s.audit_log());
    let cancelled = log.iter().find(|l| l.contains("\"outcome\":\"cancelled\"")).unwrap();
    let entry: Value = serde_json::from_str(cancelled).unwrap();
    assert_eq!((entry["type"].as_str(), entry["status"].as_u64()), (Some("request"), Some(499)), "{entry}");
    assert_eq!(entry["operation"], "POST /v1/transit/keys/{name}", "{entry}");
    fault.set("");
    let (good, out) = verify_cli(&s.export_audit_key(), &[s.audit_log()], true);
    assert!(good && out.contains("unfinished_intents=0"), "{out}");
}
