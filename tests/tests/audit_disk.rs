//! The audit log on a disk that fills up: a 2 MiB tmpfs made by the test, filled while
//! writes, logins, transit operations and revocations go on, then freed. For every
//! request the reply and the log agree; `keyvault audit verify` passes with the failure
//! recorded as a gap; the writer backs off (one anomaly file at most, a few log lines per
//! second) and recovers by itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::tmpfs::Tmpfs;
use keyvault_tests::{Client, Reply, Value, json};

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    Login,
    Encrypt,
    Revoke,
}

struct Sent {
    kind: Kind,
    id: String,
    status: u16,
    degraded: bool,
    /// The secret written or the token whose accessor was revoked.
    subject: String,
}

async fn one(c: &Client, root: &str, i: usize, sid: &str, victim: &(String, String)) -> Sent {
    let kind = [Kind::Write, Kind::Login, Kind::Encrypt, Kind::Revoke][i % 4];
    let (r, subject) = match kind {
        Kind::Write => {
            let path = format!("secret/df/{i}");
            (c.put(&path, root, json!({"value": format!("v{i}")})).await, path)
        }
        Kind::Login => (c.post("auth", None, json!({"role": "app", "secret_id": sid})).await, String::new()),
        Kind::Encrypt => (c.post("transit/encrypt/k", Some(root), json!({"plaintext": "aGk="})).await, String::new()),
        Kind::Revoke => {
            (c.post("auth/token/revoke-accessor", Some(root), json!({"accessor": victim.1})).await, victim.0.clone())
        }
    };
    Sent {
        kind,
        id: r.headers.get("x-request-id").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default(),
        status: r.status,
        degraded: r.headers.get("x-keyvault-audit").is_some(),
        subject,
    }
}

/// The request entries and intents of a log, by request id.
fn entries(files: &[PathBuf]) -> (HashMap<String, u64>, Vec<String>, usize) {
    let mut requests = HashMap::new();
    let mut intents = Vec::new();
    let mut gaps = 0;
    for f in files {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let id = v["request_id"].as_str().unwrap_or_default().to_owned();
            match v["type"].as_str() {
                Some("request") => {
                    requests.insert(id, v["status"].as_u64().unwrap());
                }
                Some("intent") => intents.push(id),
                Some("gap") => {
                    assert_eq!(v["reason"], "write_failed", "{v}");
                    gaps += 1;
                }
                _ => {}
            }
        }
    }
    (requests, intents, gaps)
}

async fn disk_fills_and_frees(mode: &str) {
    let fs = Tmpfs::new("2m");
    let mut s = TestServer::start(ServerOptions {
        audit_path: Some(fs.path().join("audit").join("audit.log")),
        audit_extra: format!("mode = \"{mode}\""),
        extra: "[auth.rate_limit]\nfailures_per_role_and_address = 100000\nfailures_per_address = 100000\n".into(),
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    ok(c.post("auth/approle/role/app", Some(&root), json!({})).await, 204);
    let sid =
        ok(c.post("auth/approle/role/app/secret-id", Some(&root), json!({})).await, 200).body["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_owned();
    ok(c.post("transit/keys/k", Some(&root), json!({})).await, 200);
    // Tokens whose accessors the revocations target, one per revocation.
    let mut victims = Vec::new();
    for _ in 0..150 {
        let r = ok(c.post("auth", None, json!({"role": "app", "secret_id": sid})).await, 200);
        victims.push((
            r.body["auth"]["client_token"].as_str().unwrap().to_owned(),
            r.body["auth"]["accessor"].as_str().unwrap().to_owned(),
        ));
    }

    let filler = fs.fill();
    let started = Instant::now();
    let mut sent = Vec::new();
    let mut refused = 0;
    let mut degraded = 0;
    for i in 0..600 {
        let r = one(&c, &root, i, &sid, &victims[(i / 4) % victims.len()]).await;
        refused += usize::from(r.status == 503);
        degraded += usize::from(r.degraded);
        sent.push(r);
        if refused >= 20 || degraded >= 20 {
            break;
        }
    }
    assert!(refused + degraded >= 20, "the disk filled: {refused} refused, {degraded} degraded");
    let failing_for = started.elapsed();
    std::fs::remove_file(&filler).unwrap();
    // Recovery by itself: health says so, and the next requests are ordinary.
    let mut recovered = false;
    for _ in 0..200 {
        let h = c.send("GET", "sys/health", None, None).await;
        if h.body["audit"] == "ok" {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "the audit log recovers when space returns");
    for i in 600..620 {
        let r = one(&c, &root, i, &sid, &victims[0]).await;
        assert_eq!((r.status / 100, r.degraded), (2, false), "after recovery");
    }
    s.stop();

    // What the replies said, the log says.
    let (verified, report) = s.verify_audit_log();
    assert!(verified, "{report}");
    let (requests, intents, gaps) = entries(&[s.audit_log()]);
    assert!(gaps >= 1 && report.contains("gaps="), "the failure is a verifiable gap: {report}");
    s.restart();
    let check = s.client();
    for r in &sent {
        match r.status {
            200 | 204 => {
                assert_eq!(
                    requests.get(&r.id),
                    Some(&u64::from(r.status)),
                    "{:?} {} answered but not logged",
                    r.kind,
                    r.id
                );
            }
            503 => {
                assert_eq!(mode, "fail_closed", "buffered mode queues instead of refusing");
                assert!(!requests.contains_key(&r.id), "{:?} {}: refused but logged", r.kind, r.id);
                assert!(!intents.contains(&r.id), "{:?} {}: refused, yet its intent is in the log", r.kind, r.id);
                // Refused before it ran: nothing changed.
                match r.kind {
                    Kind::Write => ok(check.get(&r.subject, &root).await, 404),
                    Kind::Revoke => {
                        let later =
                            sent.iter().any(|o| o.kind == Kind::Revoke && o.subject == r.subject && o.status == 204);
                        if !later {
                            ok(check.send("GET", "auth/token/lookup-self", Some(&r.subject), None).await, 200)
                        } else {
                            continue;
                        }
                    }
                    _ => continue,
                };
            }
            other => panic!("{:?} {}: {other}", r.kind, r.id),
        }
    }
    if mode == "buffered" {
        assert!(degraded >= 20, "buffered replies say when their entry is not on disk yet");
        assert_eq!(refused, 0);
    }
    // Backing off: no flood of anomaly files or log lines.
    let anomalies = std::fs::read_dir(s.audit_log().parent().unwrap())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains("anomaly"))
        .count();
    assert!(anomalies <= 1, "{anomalies} anomaly files");
    let lines = s.log_text().matches("writing the audit log failed").count() as u64;
    assert!(lines <= failing_for.as_secs() + 5, "{lines} log lines in {failing_for:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_on_a_full_disk_refuses_before_changing_anything() {
    disk_fills_and_frees("fail_closed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_on_a_full_disk_keeps_every_entry_and_says_so() {
    disk_fills_and_frees("buffered").await;
}
