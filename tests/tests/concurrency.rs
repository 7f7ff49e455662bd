//! A randomized concurrent workload on two replicas over PostgreSQL: clients on either
//! replica mix secret writes, reads and deletes, policy and role changes, logins and token
//! revocations, transit encryptions and key rotations, and master key rotations, for a
//! bounded time (`KEYVAULT_WORKLOAD_SECONDS`, default 20). Then the invariants: every
//! acknowledged write reads back with its value on both replicas (and every acknowledged
//! delete is gone), every acknowledged ciphertext decrypts, revoked tokens are refused,
//! every key version the state names is in the token, both audit chains verify, and no
//! request got a 5xx other than the documented 503.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyvault_tests::server::Cluster;
use keyvault_tests::{Client, Reply, json, random_u64, wait_rotation_idle};

#[derive(Default)]
struct Record {
    /// path -> Some(value) after an acknowledged write, None after an acknowledged delete.
    secrets: HashMap<String, Option<String>>,
    ciphertexts: Vec<(String, String, String)>,
    revoked: Vec<String>,
    statuses: BTreeMap<(String, u16), u64>,
    operations: u64,
    /// The replies of requests that got a 5xx other than 503, to show.
    failures: Vec<String>,
}

fn note(rec: &Mutex<Record>, op: &str, r: &Reply) {
    let mut g = rec.lock().unwrap();
    *g.statuses.entry((op.to_owned(), r.status)).or_insert(0) += 1;
    if r.status >= 500 && r.status != 503 {
        g.failures.push(format!("{op}: {} {}", r.status, r.body));
    }
    g.operations += 1;
}

async fn login(c: &Client, role: &str, sid: &str) -> Option<String> {
    let r = c.post("auth/approle/login", None, json!({"role_id": role, "secret_id": sid})).await;
    (r.status == 200).then(|| r.body["auth"]["client_token"].as_str().unwrap().to_owned())
}

/// One client: its own key space for secrets (so "the last acknowledged write" is well
/// defined), shared transit keys, policies and roles that others change too.
async fn client(id: u64, clients: [Client; 2], root: String, rec: Arc<Mutex<Record>>, until: Instant) {
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let c = &clients[(random_u64() % 2) as usize];
        let dice = random_u64() % 100;
        let path = format!("secret/load/{id}/{}", random_u64() % 20);
        match dice {
            0..=34 => {
                let value = format!("v-{id}-{n}-{:x}", random_u64());
                let r = c.put(&path, &root, json!({"value": value})).await;
                note(&rec, "write", &r);
                if r.status == 200 {
                    rec.lock().unwrap().secrets.insert(path, Some(value));
                }
            }
            35..=59 => {
                let r = c.get(&path, &root).await;
                note(&rec, "read", &r);
                // Read-your-writes across replicas: the last acknowledged state.
                let expected = rec.lock().unwrap().secrets.get(&path).cloned();
                match (r.status, expected) {
                    (200, Some(Some(v))) => assert_eq!(r.body["data"]["value"], v.as_str(), "{path}"),
                    (404, Some(None) | None) => {}
                    (503, _) => {}
                    (s, e) => panic!("{path}: read {s}, expected {e:?}: {r:?}"),
                }
            }
            60..=66 => {
                let r = c.send("DELETE", &path, Some(&root), None).await;
                note(&rec, "delete", &r);
                if r.status == 204 {
                    rec.lock().unwrap().secrets.insert(path, None);
                }
            }
            67..=71 => {
                let caps = ["read", "list", "create", "update", "deny"][(random_u64() % 5) as usize];
                let policy = format!("path \"secret/load/*\" {{ capabilities = [\"{caps}\"] }}");
                let r = c.put(&format!("sys/policies/acl/p{}", id % 3), &root, json!({"policy": policy})).await;
                note(&rec, "policy", &r);
            }
            72..=76 => {
                let role = format!("r{}", id % 3);
                let r = c
                    .post(
                        &format!("auth/approle/role/{role}"),
                        Some(&root),
                        json!({"token_policies": [format!("p{}", id % 3)], "token_ttl": "5m"}),
                    )
                    .await;
                note(&rec, "role", &r);
            }
            77..=83 => {
                // Log in with a role another client may be changing; read; revoke.
                let role = format!("r{}", random_u64() % 3);
                let rid = c.get(&format!("auth/approle/role/{role}/role-id"), &root).await;
                note(&rec, "role-id", &rid);
                if rid.status != 200 {
                    continue;
                }
                let role_id = rid.body["data"]["role_id"].as_str().unwrap().to_owned();
                let sid = c.post(&format!("auth/approle/role/{role}/secret-id"), Some(&root), json!({})).await;
                note(&rec, "secret-id", &sid);
                if sid.status != 200 {
                    continue;
                }
                let sid = sid.body["data"]["secret_id"].as_str().unwrap().to_owned();
                let Some(token) = login(c, &role_id, &sid).await else { continue };
                let r = clients[(random_u64() % 2) as usize].get(&path, &token).await;
                note(&rec, "read-as-role", &r);
                assert!(matches!(r.status, 200 | 403 | 404 | 503), "{r:?}");
                let r = c.post("auth/token/revoke-self", Some(&token), json!({})).await;
                note(&rec, "revoke", &r);
                if r.status == 204 {
                    rec.lock().unwrap().revoked.push(token);
                }
            }
            84..=93 => {
                // Transit on either replica: a key version one replica has just made is
                // used by the other at once (it re-initialises its view of the shared
                // token when the key is not found: docs/architecture.md).
                let key = format!("k{}", random_u64() % 2);
                let plaintext = STANDARD.encode(format!("p-{id}-{n}"));
                let r = c.post(&format!("transit/encrypt/{key}"), Some(&root), json!({"plaintext": plaintext})).await;
                note(&rec, "encrypt", &r);
                if r.status == 200 {
                    let ct = r.body["data"]["ciphertext"].as_str().unwrap().to_owned();
                    rec.lock().unwrap().ciphertexts.push((key, ct, plaintext));
                }
            }
            94..=98 => {
                let r = c.post(&format!("transit/keys/k{}/rotate", random_u64() % 2), Some(&root), json!({})).await;
                note(&rec, "transit-rotate", &r);
            }
            _ => {
                let r = c.post("sys/rotate", Some(&root), json!({})).await;
                note(&rec, "master-rotate", &r);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_randomized_workload_on_two_replicas_keeps_every_invariant() {
    let seconds: u64 = std::env::var("KEYVAULT_WORKLOAD_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let mut cl = Cluster::start("workload", Vec::new());
    let root = cl.a.root.clone();
    let (ca, cb) = (cl.a.client(), cl.b.client());
    for k in ["k0", "k1"] {
        assert_eq!(ca.post(&format!("transit/keys/{k}"), Some(&root), json!({})).await.status, 200);
    }
    for i in 0..3 {
        let policy = "path \"secret/load/*\" { capabilities = [\"read\"] }";
        assert_eq!(ca.put(&format!("sys/policies/acl/p{i}"), &root, json!({"policy": policy})).await.status, 204);
        let r = ca
            .post(&format!("auth/approle/role/r{i}"), Some(&root), json!({"token_policies": [format!("p{i}")]}))
            .await;
        assert_eq!(r.status, 204);
    }
    let rec = Arc::new(Mutex::new(Record::default()));
    let until = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> =
        (0..8).map(|id| tokio::spawn(client(id, [ca.clone(), cb.clone()], root.clone(), rec.clone(), until))).collect();
    for t in tasks {
        t.await.unwrap();
    }
    let rec = std::mem::take(&mut *rec.lock().unwrap());

    // No 5xx but the documented 503 ("retry later"); count what each operation got. A
    // 500's body says only "internal error": the replicas' logs say what it was.
    let server_errors = || {
        [("a", &cl.a), ("b", &cl.b)]
            .iter()
            .flat_map(|(name, s)| {
                s.log_text()
                    .lines()
                    .filter(|l| l.contains("ERROR") || l.contains("internal error"))
                    .map(|l| format!("replica {name}: {l}"))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    for ((op, status), n) in &rec.statuses {
        assert!(
            *status < 500 || *status == 503,
            "{op} answered {status} {n} times: {:?}; {:?}\nserver errors:\n{}",
            rec.statuses,
            rec.failures,
            server_errors()
        );
    }
    let unavailable: u64 = rec.statuses.iter().filter(|((_, s), _)| *s == 503).map(|(_, n)| n).sum();
    assert!(unavailable * 100 <= rec.operations, "{unavailable} of {} requests were 503", rec.operations);

    // Every acknowledged write (or delete) holds, on both replicas.
    let mut checks = 0u64;
    for c in [&ca, &cb] {
        for (path, value) in &rec.secrets {
            let r = c.get(path, &root).await;
            match value {
                Some(v) => assert_eq!((r.status, r.body["data"]["value"].as_str()), (200, Some(v.as_str())), "{path}"),
                None => assert_eq!(r.status, 404, "{path} was deleted: {r:?}"),
            }
            checks += 1;
        }
        for (key, ct, pt) in &rec.ciphertexts {
            let r = c.post(&format!("transit/decrypt/{key}"), Some(&root), json!({"ciphertext": ct})).await;
            assert_eq!(
                (r.status, r.body["data"]["plaintext"].as_str()),
                (200, Some(pt.as_str())),
                "{key} {ct}\nserver errors:\n{}",
                server_errors()
            );
            checks += 1;
        }
        for t in &rec.revoked {
            assert_eq!(c.get("auth/token/lookup-self", t).await.status, 401, "a revoked token is accepted");
            checks += 1;
        }
    }
    // Rotations finish; every key version the state names is in the token.
    let status = wait_rotation_idle(&ca, &root).await;
    let objects = cl.a.token_keys("keyvault/");
    for v in status["versions_in_use"].as_array().unwrap().iter().chain([&status["active_version"]]) {
        let label = format!("keyvault/master/v{}", v.as_u64().unwrap());
        assert!(objects.contains(&label), "{label} is missing: {objects:?}");
        checks += 1;
    }
    for k in ["k0", "k1"] {
        let key = ca.get(&format!("transit/keys/{k}"), &root).await;
        let latest = key.body["data"]["latest_version"].as_u64().unwrap();
        for v in 1..=latest {
            let label = format!("keyvault/transit/{k}/v{v}");
            assert!(objects.contains(&label), "{label} is missing: {objects:?}");
            checks += 1;
        }
    }
    // Both audit chains verify after a clean stop.
    for s in [&mut cl.a, &mut cl.b] {
        s.stop();
        let (verified, report) = s.verify_audit_log();
        assert!(verified, "{report}");
        checks += 1;
    }
    // How often a replica had to look at the shared token afresh, and SoftHSM's spurious
    // generation failures (both handled; counted to show they happened).
    let logs = cl.a.log_text() + &cl.b.log_text();
    let (reinits, regenerated) = (
        logs.matches("PKCS#11 module re-initialised").count(),
        logs.matches("key generation failed; cleaning up").count()
            + logs.matches("did not store the new key as it was made").count(),
    );
    println!(
        "{} operations in {seconds} s on two replicas ({} secrets, {} ciphertexts, {} revoked tokens); {checks} invariant checks; {reinits} token re-initialisations, {regenerated} key generations retried; statuses {:?}",
        rec.operations,
        rec.secrets.len(),
        rec.ciphertexts.len(),
        rec.revoked.len(),
        rec.statuses
    );
}
