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
use keyvault_tests::{Client, Reply, TokenFault, Value, json};

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

/// What the requests of [`one`] need: the AppRole role `app` and a secret id of it, the
/// transit key `k`, and `n` tokens (with their accessors) for the revocations to target,
/// one per revocation.
async fn set_up(c: &Client, root: &str, n: usize) -> (String, Vec<(String, String)>) {
    ok(c.post("auth/approle/role/app", Some(root), json!({})).await, 204);
    let sid = c.secret_id(root, "app").await;
    ok(c.post("transit/keys/k", Some(root), json!({})).await, 200);
    let mut victims = Vec::new();
    for _ in 0..n {
        let r = ok(c.post("auth", None, json!({"role": "app", "secret_id": sid})).await, 200);
        victims.push((
            r.body["auth"]["client_token"].as_str().unwrap().to_owned(),
            r.body["auth"]["accessor"].as_str().unwrap().to_owned(),
        ));
    }
    (sid, victims)
}

/// What the replies said, the log says: an answered request is logged with its status; a
/// refused one is not, nor is its intent, and nothing of it changed (checked with
/// `check`, a client of the server started again).
async fn replies_agree_with_the_log(
    check: &Client,
    root: &str,
    sent: &[Sent],
    requests: &HashMap<String, u64>,
    intents: &[String],
) {
    for r in sent {
        match r.status {
            200 | 204 => {
                assert_eq!(
                    requests.get(&r.id),
                    Some(&u64::from(r.status)),
                    "{:?} {} answered, not logged",
                    r.kind,
                    r.id
                )
            }
            503 => {
                assert!(!requests.contains_key(&r.id), "{:?} {}: refused but logged", r.kind, r.id);
                assert!(!intents.contains(&r.id), "{:?} {}: refused, yet its intent is in the log", r.kind, r.id);
                // Refused before it ran: nothing changed.
                match r.kind {
                    Kind::Write => {
                        ok(check.get(&r.subject, root).await, 404);
                    }
                    // Unless another revocation of the same token went through.
                    Kind::Revoke if !sent.iter().any(|o| o.subject == r.subject && o.status == 204) => {
                        ok(check.send("GET", "auth/token/lookup-self", Some(&r.subject), None).await, 200);
                    }
                    Kind::Revoke | Kind::Login | Kind::Encrypt => {}
                }
            }
            other => panic!("{:?} {}: {other}", r.kind, r.id),
        }
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
    let (sid, victims) = set_up(&c, &root, 150).await;

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
    replies_agree_with_the_log(&s.client(), &root, &sent, &requests, &intents).await;
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

/// The files of an audit log in chain order: those set aside as anomalies (named
/// `<log>.anomaly-<time>-<seq>`), by sequence number, then the active file.
fn audit_files(log: &std::path::Path) -> Vec<PathBuf> {
    let prefix = format!("{}.anomaly-", log.file_name().unwrap().to_string_lossy());
    let mut aside: Vec<(u64, PathBuf)> = std::fs::read_dir(log.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let seq = name.strip_prefix(&prefix)?.rsplit('-').next()?.parse().ok()?;
            Some((seq, p))
        })
        .collect();
    aside.sort();
    aside.into_iter().map(|(_, p)| p).chain([log.to_path_buf()]).collect()
}

/// Failed `fdatasync` calls of the audit log under concurrent requests: the fault layer
/// slows every sync (so that batches are large) and fails one sync at a time, 20 times,
/// while 16 clients write, log in, encrypt and revoke. Every reply agrees with the log:
/// an answered request is logged with its status; a refused one is not, nor is its
/// intent, and nothing of it changed. The log verifies with each failure as a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_syncs_under_concurrent_requests_lose_nothing_acknowledged() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    const INCIDENTS: usize = 20;

    let fault = TokenFault::audit_fsync();
    let mut s = TestServer::start(ServerOptions {
        env: vec![fault.env()],
        extra: "[auth.rate_limit]\nfailures_per_role_and_address = 100000\nfailures_per_address = 100000\n".into(),
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    let (sid, victims) = set_up(&c, &root, 200).await;
    let victims = Arc::new(victims);

    fault.set("slow 20");
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (c, root, sid, victims, stop) = (c.clone(), root.clone(), sid.clone(), victims.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut i = t;
            while !stop.load(Ordering::SeqCst) {
                let r = one(&c, &root, i, &sid, &victims[(i / 4) % victims.len()]).await;
                sent.push(r);
                i += 16;
            }
            sent
        }));
    }
    // Waits until the health report says `audit` is `state` with at least `failures`
    // failed writes.
    let health = |state: &'static str, failures: u64| {
        let c = c.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let h = c.send("GET", "sys/health", None, None).await.body;
                if h["audit"] == state && h["audit_failed_writes"].as_u64().unwrap() >= failures {
                    return;
                }
                assert!(Instant::now() < deadline, "waiting for audit {state} after {failures} failed writes: {h}");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    // Incidents, one after the other: one sync fails. The next incident begins once the
    // log has recovered from the last (its gap is written).
    for n in 1..=INCIDENTS as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        fault.set("error then slow 20");
        health("ok", n).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut sent = Vec::new();
    for t in tasks {
        sent.extend(t.await.unwrap());
    }
    fault.set("");
    health("ok", INCIDENTS as u64).await;
    for i in 0..8 {
        let r = one(&c, &root, i * 4 + 1, &sid, &victims[0]).await;
        assert_eq!((r.status / 100, r.degraded), (2, false), "after recovery");
    }
    s.stop();

    let files = audit_files(&s.audit_log());
    let (verified, report) = s.verify_audit_files(&files);
    assert!(verified, "{report}");
    let (requests, intents, gaps) = entries(&files);
    assert!(gaps >= INCIDENTS, "every failure is a gap in the log: {gaps}");
    let refused = sent.iter().filter(|r| r.status == 503).count();
    assert!(refused >= INCIDENTS, "{refused} refused");
    s.restart();
    replies_agree_with_the_log(&s.client(), &root, &sent, &requests, &intents).await;
}

/// Buffered mode on a disk whose syncs all fail, its buffer full: a write whose intent
/// got in has made its change, and its outcome entry waits beside the full queue until
/// the disk is back, instead of being dropped. Its reply is never "nothing was changed".
/// (Before, such an outcome found the queue full: 503 saying nothing was changed for a
/// write that was made, and the log kept its intent without an outcome.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_outcomes_are_never_dropped_for_want_of_room() {
    let fault = TokenFault::audit_fsync();
    let mut s = TestServer::start(ServerOptions {
        env: vec![fault.env()],
        audit_extra: "mode = \"buffered\"\nbuffer_entries = 4".into(),
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    fault.set("error");
    let none = (String::new(), String::new());
    let sent = futures_util::future::join_all((0..48).map(|i| one(&c, &root, i * 4, "", &none))).await;
    let made = sent.iter().filter(|r| r.status == 200).count();
    assert!(made > 0 && made < sent.len(), "some writes got in, the rest were refused: {made}");
    fault.set("");
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.send("GET", "sys/health", None, None).await.body["audit"] != "ok" {
        assert!(Instant::now() < deadline, "the audit log recovers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.stop();
    let files = audit_files(&s.audit_log());
    // Syncs failed for as long as the requests ran: one file set aside at most (a file
    // no write ever reached is made again, not set aside: before, one per retry).
    let aside = files.iter().filter(|f| f.to_string_lossy().contains(".anomaly-")).count();
    assert!(aside <= 1, "{files:?}");
    let (verified, report) = s.verify_audit_files(&files);
    assert!(verified, "{report}");
    let (requests, intents, _) = entries(&files);
    for id in &intents {
        assert!(requests.contains_key(id), "intent {id} has no outcome in the log");
    }
    // The checks after the restart read with an ordinary buffer: four entries is too
    // few for them on a loaded machine (a read refused for want of room, seen once).
    let config = std::fs::read_to_string(&s.config_file).unwrap();
    assert!(config.contains("buffer_entries = 4"), "{config}");
    std::fs::write(&s.config_file, config.replace("buffer_entries = 4", "buffer_entries = 4096")).unwrap();
    s.restart();
    replies_agree_with_the_log(&s.client(), &root, &sent, &requests, &intents).await;
}
