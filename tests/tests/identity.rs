//! Identity end to end over real mutual TLS: client CA and CRLs, certificate-bound tokens,
//! cert auth (pins, SANs, SPIFFE, direct requests), Kubernetes, bootstrap tokens, the
//! token lifecycle, the kill switch, brute-force limits, and TLS reloads under load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keyvault_tests::pki::{self, Issued, TestCa};
use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Client, Reply, json};

const SECRET: &str = "identity-secret-value-51e0";

struct World {
    s: TestServer,
    a: Issued,
    b: Issued,
    revoked: Issued,
    expired: Issued,
    foreign: Issued,
    selfsigned: Issued,
}

const SPIFFE_A: &str = "spiffe://corp/ns/payments/sa/api";

/// A server in `optional` mode with a client CA, a CRL, policies, roles and a secret.
async fn world(extra: &str) -> World {
    world_with(extra, false).await
}

async fn world_with(extra: &str, settable_clock: bool) -> World {
    let ca = TestCa::new("client CA");
    let other = TestCa::new("another CA");
    let a = ca.leaf("unit-a", &[SPIFFE_A], 10, false);
    let b = ca.leaf("unit-b", &["unit-b.corp"], 11, false);
    let revoked = ca.leaf("revoked", &[], 12, false);
    let expired = ca.expired("expired", 13);
    let foreign = other.leaf("foreign", &[], 14, false);
    let selfsigned = pki::self_signed("self");
    // Tests that fail logins on purpose get room; the rate-limit test sets its own.
    let extra = if extra.is_empty() {
        "[auth.rate_limit]\nfailures_per_role_and_address = 1000\nfailures_per_address = 1000\n"
    } else {
        extra
    };
    let s = TestServer::start(ServerOptions {
        client_auth: "optional",
        client_ca_pem: Some(ca.pem()),
        crl_pem: Some(ca.crl(&[12])),
        extra: extra.to_owned(),
        settable_clock,
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    ok(
        c.put(
            "sys/policies/acl/read-app",
            &root,
            json!({"policy": "path \"secret/app/*\" { capabilities = [\"read\"] }"}),
        )
        .await,
        204,
    );
    ok(c.put("secret/app/x", &root, json!({"value": SECRET})).await, 200);
    ok(
        c.post(
            "auth/cert/role/role-a",
            Some(&root),
            json!({"certificate_sha256": [a.sha256_hex], "token_policies": ["read-app"], "allow_direct": true}),
        )
        .await,
        204,
    );
    ok(
        c.post(
            "auth/cert/certs/role-b",
            Some(&root),
            json!({"allowed_dns_sans": ["unit-b.corp"], "token_policies": ["read-app"]}),
        )
        .await,
        204,
    );
    ok(
        c.post(
            "auth/cert/role/role-spiffe",
            Some(&root),
            json!({"allowed_uri_sans": ["spiffe://corp/ns/payments/*"], "token_policies": ["read-app"]}),
        )
        .await,
        204,
    );
    ok(c.post("auth/approle/role/app", Some(&root), json!({"token_policies": ["read-app"]})).await, 204);
    World { s, a, b, revoked, expired, foreign, selfsigned }
}

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

fn token(r: &Reply) -> String {
    assert_eq!(r.status, 200, "{r:?}");
    r.body["auth"]["client_token"].as_str().unwrap().to_owned()
}

async fn approle_token(c: &Client, root: &str, role: &str) -> String {
    let sid =
        c.post(&format!("auth/approle/role/{role}/secret-id"), Some(root), json!({})).await.body["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_owned();
    token(&c.post("auth", None, json!({"role": role, "secret_id": sid})).await)
}

#[tokio::test]
async fn every_credential_on_every_connection() {
    let w = world("").await;
    let root = w.s.root.clone();
    let none = w.s.client();
    let ca = w.s.client_with(&w.a);
    let cb = w.s.client_with(&w.b);

    let t_app = approle_token(&none, &root, "app").await;
    let t_a = token(&ca.post("auth/cert/login", None, json!({"name": "role-a"})).await);
    let t_b = token(&cb.post("auth/cert/login", None, json!({"name": "role-b"})).await);

    // (connection, credential, expected status of GET secret/app/x)
    let rows: Vec<(&str, &Client, Option<&str>, u16)> = vec![
        ("no cert", &none, None, 401),
        ("no cert", &none, Some(&t_app), 200),
        ("no cert", &none, Some(&t_a), 401),
        ("cert A", &ca, None, 200),
        ("cert A", &ca, Some(&t_app), 200),
        ("cert A", &ca, Some(&t_a), 200),
        ("cert A", &ca, Some(&t_b), 401),
        ("cert B", &cb, None, 401),
        ("cert B", &cb, Some(&t_app), 200),
        ("cert B", &cb, Some(&t_a), 401),
        ("cert B", &cb, Some(&t_b), 200),
    ];
    for (conn, client, cred, expected) in rows {
        let r = client.send("GET", "secret/app/x", cred, None).await;
        assert_eq!(r.status, expected, "{conn} with {}: {r:?}", if cred.is_none() { "no token" } else { "a token" });
        if expected == 200 {
            assert_eq!(r.body["data"]["value"], SECRET);
        }
    }
    // A stolen bound token replayed from a second client certificate is refused, and the
    // log says why.
    let r = cb.get("secret/app/x", &t_a).await;
    assert_eq!(r.status, 401);
    assert!(r.body["errors"][0].as_str().unwrap().contains("bound to a client certificate"));
    let log = w.s.log_text();
    assert!(log.contains("certificate_mismatch") && log.contains("certificate_required"), "the reasons are logged");

    // Certificates that must fail the handshake, whatever the credential, each with the
    // server's alert that says why.
    for (name, bad, why) in [
        ("revoked", &w.revoked, "CertificateRevoked"),
        ("expired", &w.expired, "CertificateExpired"),
        ("other CA", &w.foreign, "UnknownCA"),
        ("self-signed", &w.selfsigned, "UnknownCA"),
    ] {
        let c = w.s.client_with(bad);
        for cred in [None, Some(t_app.as_str()), Some(root.as_str())] {
            assert!(c.try_send("GET", "secret/app/x", cred, None).await.is_err(), "{name} certificate was accepted");
        }
        let alert = keyvault_tests::tls_alert(&w.s.addr, &w.s.server_ca_file, Some(&bad.identity_pem())).await;
        assert_eq!(alert.as_deref(), Some(why), "{name}");
        assert!(c.try_send("POST", "auth/cert/login", None, Some(b"{}".to_vec())).await.is_err(), "{name}");
    }

    // Cert login: which certificate may log in to which role.
    let login = |c: &Client, body: serde_json::Value| {
        let c = c.clone();
        async move { c.post("auth/cert/login", None, body).await.status }
    };
    assert_eq!(login(&none, json!({"name": "role-a"})).await, 401);
    assert_eq!(login(&ca, json!({"name": "role-a"})).await, 200);
    assert_eq!(login(&ca, json!({"name": "role-b"})).await, 401);
    assert_eq!(login(&cb, json!({"name": "role-a"})).await, 401);
    assert_eq!(login(&ca, json!({"name": "role-spiffe"})).await, 200, "SPIFFE ID prefix");
    assert_eq!(login(&cb, json!({"name": "role-spiffe"})).await, 401);
    assert_eq!(login(&ca, json!({})).await, 200, "the first matching role");
    // An unknown field is named in the reply's warnings (Vault's convention), not refused.
    let r = ca.post("auth/cert/login", None, json!({"name": "role-a", "x": 1})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["warnings"][0], "Endpoint ignored these unrecognized parameters: [x]", "{r:?}");
    // The short form finds the method from the role.
    let r = ca.post("auth", None, json!({"role": "role-a"})).await;
    assert_eq!(r.status, 200);
    assert!(r.body["auth"]["bound_certificate_x5t_s256"].is_string());
    // Tokens issued over mTLS by any method are bound; tokens issued without are not.
    let sid = none.post("auth/approle/role/app/secret-id", Some(&root), json!({})).await.body["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let bound_app = token(&ca.post("auth", None, json!({"role": "app", "secret_id": sid})).await);
    assert_eq!(none.get("secret/app/x", &bound_app).await.status, 401);
    assert_eq!(ca.get("secret/app/x", &bound_app).await.status, 200);

    // A role that requires binding refuses logins without a certificate.
    ok(
        none.post(
            "auth/approle/role/strict",
            Some(&root),
            json!({"token_policies": ["read-app"], "bind_certificate": true}),
        )
        .await,
        204,
    );
    let sid = none.post("auth/approle/role/strict/secret-id", Some(&root), json!({})).await.body["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(none.post("auth", None, json!({"role": "strict", "secret_id": sid})).await.status, 401);
    let t = token(&cb.post("auth", None, json!({"role": "strict", "secret_id": sid})).await);
    assert_eq!(cb.get("secret/app/x", &t).await.status, 200);
    assert_eq!(ca.get("secret/app/x", &t).await.status, 401);

    // Bad cert roles are refused.
    ok(none.post("auth/cert/role/empty", Some(&root), json!({"token_policies": ["x"]})).await, 400);
    ok(none.post("auth/cert/role/badpin", Some(&root), json!({"certificate_sha256": ["abc"]})).await, 400);
    // A Vault restriction KeyVault does not enforce is refused, not dropped with a warning
    // (the role would accept whom its author meant to shut out): organizational units,
    // CIDR bounds, a use count. The values tools send for "unset" pass, with a warning.
    for (field, value) in [
        ("allowed_organizational_units", json!(["eng"])),
        ("token_bound_cidrs", json!(["10.0.0.0/8"])),
        ("token_bound_cidrs", json!("10.0.0.0/8")),
        ("token_num_uses", json!(3)),
        ("ocsp_enabled", json!(true)),
    ] {
        let mut body = json!({"allowed_common_names": ["unit-a"]});
        body[field] = value;
        let r = none.post("auth/cert/certs/restricted", Some(&root), body).await;
        assert_eq!(r.status, 400, "{field}: {r:?}");
        assert!(r.body["errors"][0].as_str().unwrap().contains(field), "{r:?}");
    }
    ok(none.get("auth/cert/role/restricted", &root).await, 404);
    for (field, unset) in
        [("ocsp_enabled", json!(false)), ("token_bound_cidrs", json!([])), ("token_num_uses", json!(0))]
    {
        let mut body = json!({"allowed_common_names": ["unit-a"]});
        body[field] = unset;
        let r = ok(none.post("auth/cert/certs/unset", Some(&root), body).await, 200);
        assert!(r.body["warnings"][0].as_str().unwrap().contains(field), "{r:?}");
    }
    ok(none.send("DELETE", "auth/cert/role/unset", Some(&root), None).await, 204);
    // The CLI's text for "unset" passes too.
    for unset in ["false", "0", "0s", " FALSE "] {
        let body = json!({"allowed_common_names": ["unit-a"], "ocsp_enabled": unset, "token_num_uses": unset});
        ok(none.post("auth/cert/certs/unset", Some(&root), body).await, 200);
    }
    ok(none.send("DELETE", "auth/cert/role/unset", Some(&root), None).await, 204);
    // Vault's older names of the token TTLs, and a secret id's own bounds.
    ok(none.post("auth/approle/role/old-ttl", Some(&root), json!({"ttl": "1m"})).await, 400);
    ok(none.post("auth/approle/role/limited", Some(&root), json!({})).await, 204);
    for body in [json!({"num_uses": 1}), json!({"ttl": "60s"}), json!({"cidr_list": "10.0.0.0/8"})] {
        let r = none.post("auth/approle/role/limited/secret-id", Some(&root), body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {r:?}");
    }
    ok(none.post("auth/approle/role/limited/secret-id", Some(&root), json!({"num_uses": 0, "ttl": ""})).await, 200);
    for (path, body) in [
        ("auth/approle/role/cidr", json!({"secret_id_bound_cidrs": ["10.0.0.0/8"]})),
        ("auth/userpass/users/cidr", json!({"password": "a long passphrase", "token_bound_cidrs": ["10.0.0.0/8"]})),
    ] {
        ok(none.post(path, Some(&root), body).await, 400);
    }
    let r = none.get("auth/cert/certs/role-b", &root).await;
    assert_eq!(r.body["data"]["allowed_dns_sans"], json!(["unit-b.corp"]));
    assert_eq!(
        none.send("LIST", "auth/cert/role", Some(&root), None).await.body["data"]["keys"],
        json!(["role-a", "role-b", "role-spiffe"])
    );
}

#[tokio::test]
async fn required_mode_refuses_connections_without_a_certificate() {
    let ca = TestCa::new("client CA");
    let a = ca.leaf("unit-a", &[], 10, false);
    let s = TestServer::start(ServerOptions {
        client_auth: "required",
        client_ca_pem: Some(ca.pem()),
        ..Default::default()
    });
    assert!(s.client().try_send("GET", "sys/health", None, None).await.is_err());
    assert_eq!(
        keyvault_tests::tls_alert(&s.addr, &s.server_ca_file, None).await.as_deref(),
        Some("CertificateRequired")
    );
    assert_eq!(s.client_with(&a).send("GET", "sys/health", None, None).await.status, 200);
    assert_eq!(keyvault_tests::tls_alert(&s.addr, &s.server_ca_file, Some(&a.identity_pem())).await, None);
    let other = TestCa::new("other").leaf("x", &[], 1, false);
    assert!(s.client_with(&other).try_send("GET", "sys/health", None, None).await.is_err());
    assert_eq!(
        keyvault_tests::tls_alert(&s.addr, &s.server_ca_file, Some(&other.identity_pem())).await.as_deref(),
        Some("UnknownCA")
    );
}

/// The SHA-256 of the certificate a fresh TLS connection to the server presents.
async fn served_cert_sha256(s: &TestServer) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for c in keyvault::tls::load_certs(&s.server_ca_file).unwrap() {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(keyvault::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    keyvault::tls::ClientCert::from_der(&der).sha256_hex
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_reload_under_continuous_requests_loses_none() {
    let w = world("").await;
    let a = w.a.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok_count, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for fresh_connections in [false, true] {
        let (stop, ok_count, failures) = (stop.clone(), ok_count.clone(), failures.clone());
        let (addr, ca_file, a) = (w.s.addr.clone(), w.s.server_ca_file.clone(), a.clone());
        load.push(tokio::spawn(async move {
            let mut c = Client::with_identity(&addr, &ca_file, Some(&a.identity_pem()));
            while !stop.load(Ordering::Relaxed) {
                if fresh_connections {
                    c = Client::with_identity(&addr, &ca_file, Some(&a.identity_pem()));
                }
                match c.try_send("GET", "secret/app/x", None, None).await {
                    Ok(r) if r.status == 200 => ok_count.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("request failed during reload: {other:?}");
                        failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    let before = served_cert_sha256(&w.s).await;
    let served = |n: u64| {
        let ok_count = ok_count.clone();
        async move {
            let start = ok_count.load(Ordering::Relaxed);
            keyvault_tests::wait_for(Duration::from_secs(30), "requests to be served", || {
                ok_count.load(Ordering::Relaxed) >= start + n
            })
            .await;
        }
    };
    served(10).await;

    // A broken certificate file: the old configuration stays, and the log says why.
    let good_cert = std::fs::read(&w.s.cert_file).unwrap();
    std::fs::write(&w.s.cert_file, b"-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    w.s.sighup();
    keyvault_tests::wait_for(Duration::from_secs(10), "the failed reload", || {
        w.s.log_text().contains("TLS reload failed")
    })
    .await;
    assert_eq!(served_cert_sha256(&w.s).await, before);
    // Swap the good file back in one rename, so that no reload sees a half-written file.
    let tmp = w.s.dir.path().join("server.pem.tmp");
    std::fs::write(&tmp, good_cert).unwrap();
    std::fs::rename(&tmp, &w.s.cert_file).unwrap();

    // A new server certificate, picked up from the files changing (no signal).
    let new_server = w.s.server_ca.leaf("localhost", &["localhost", "127.0.0.1"], 2, true);
    std::fs::write(&w.s.key_file, &new_server.key_pem).unwrap();
    std::fs::write(&w.s.cert_file, &new_server.cert_pem).unwrap();
    let mut swapped = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if served_cert_sha256(&w.s).await == new_server.sha256_hex {
            swapped = true;
            break;
        }
    }
    assert!(swapped, "the new server certificate is served after the files changed");
    served(10).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no request failed across the reloads");
    assert!(ok_count.load(Ordering::Relaxed) > 20, "the load ran: {}", ok_count.load(Ordering::Relaxed));
    assert!(w.s.log_text().contains("TLS configuration reloaded"));
}

/// A connection outlives its client certificate's validity: the certificate is checked
/// at the handshake, and then its expiry on every request. A login and a token bound to it
/// work while it is valid; on the same connection after `notAfter`, both are 401 with
/// `certificate_expired` in the log (before, the connection, or a resumed session, went
/// on as if it were valid).
#[tokio::test]
async fn an_open_connection_is_refused_once_its_certificate_expires() {
    let ca = TestCa::new("client CA");
    let s = TestServer::start(ServerOptions {
        client_auth: "optional",
        client_ca_pem: Some(ca.pem()),
        ..Default::default()
    });
    let root = s.root.clone();
    let role = json!({"allowed_common_names": ["short-lived"], "token_policies": ["default"]});
    ok(s.client().post("auth/cert/role/short", Some(&root), role).await, 204);
    let short = ca.expiring("short-lived", 40, 4);
    let valid_until = std::time::SystemTime::now() + Duration::from_secs(4);
    let c = s.client_with(&short);
    let login = ok(c.post("auth/cert/login", None, json!({"name": "short"})).await, 200);
    let t = login.body["auth"]["client_token"].as_str().unwrap().to_owned();
    ok(c.get("auth/token/lookup-self", &t).await, 200);
    // Past notAfter (at one-second resolution), on the connection opened before it.
    while std::time::SystemTime::now() < valid_until + Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = c.send("GET", "auth/token/lookup-self", Some(&t), None).await;
    assert_eq!(r.status, 401, "{r:?}");
    let r = c.send("POST", "auth/cert/login", None, Some(json!({"name": "short"}).to_string().into_bytes())).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(s.log_text().contains("request on a connection whose certificate has expired"), "the reason is logged");
}

/// A CRL past its nextUpdate is still used (its revoked certificates are refused, the
/// others accepted: refusing every client because a publisher is late would stop the
/// fleet), and the server log says it is stale, naming the file.
#[tokio::test]
async fn a_stale_crl_is_used_and_reported() {
    let ca = TestCa::new("client CA");
    let (good, revoked) = (ca.leaf("unit-a", &[], 10, false), ca.leaf("unit-b", &[], 11, false));
    let stale = ca.crl_until(&[11], time::OffsetDateTime::now_utc() - time::Duration::days(1));
    let s = TestServer::start(ServerOptions {
        client_auth: "optional",
        client_ca_pem: Some(ca.pem()),
        crl_pem: Some(stale),
        ..Default::default()
    });
    assert_eq!(s.client_with(&good).send("GET", "sys/health", None, None).await.status, 200);
    assert!(s.client_with(&revoked).try_send("GET", "sys/health", None, None).await.is_err(), "revoked: refused");
    assert!(s.log_text().contains("a CRL is past its nextUpdate"), "{}", s.log_text());
}

/// Vault's `certificate` on a cert role: with two CAs trusted by the listener, a role
/// whose `certificate` is one CA accepts that CA's certificates with its names, not the
/// other CA's with the same names (before, the field was dropped with a warning and both
/// logged in); a role whose `certificate` is a leaf accepts that leaf only. A PEM that is
/// not a certificate is refused.
#[tokio::test]
async fn a_cert_role_with_a_certificate_accepts_only_what_that_ca_issued() {
    let (internal, partner) = (TestCa::new("internal CA"), TestCa::new("partner CA"));
    let ours = internal.leaf("web", &[], 50, false);
    let theirs = partner.leaf("web", &[], 51, false);
    let other_of_ours = internal.leaf("web", &[], 52, false);
    let s = TestServer::start(ServerOptions {
        client_auth: "optional",
        client_ca_pem: Some(format!("{}\n{}", internal.pem(), partner.pem())),
        ..Default::default()
    });
    let (c, root) = (s.client(), s.root.clone());
    let role = json!({"certificate": internal.pem(), "allowed_common_names": ["web"], "token_policies": ["default"]});
    ok(c.post("auth/cert/certs/web", Some(&root), role).await, 204);
    let shown = ok(c.get("auth/cert/certs/web", &root).await, 200);
    assert_eq!(shown.body["data"]["certificate"].as_str().unwrap(), internal.pem().trim());
    let login = |id: &Issued| {
        let c = s.client_with(id);
        async move { c.post("auth/cert/login", None, json!({"name": "web"})).await.status }
    };
    assert_eq!(login(&ours).await, 200);
    assert_eq!(login(&other_of_ours).await, 200);
    assert_eq!(login(&theirs).await, 401, "the partner CA's `web` is not the role's");
    // A leaf as `certificate`: that certificate only.
    let pinned = json!({"certificate": ours.cert_pem, "token_policies": ["default"]});
    ok(c.post("auth/cert/certs/web", Some(&root), pinned).await, 204);
    assert_eq!(login(&ours).await, 200);
    assert_eq!(login(&other_of_ours).await, 401);
    let bad = json!({"certificate": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"});
    ok(c.post("auth/cert/certs/bad", Some(&root), bad).await, 400);
}

#[tokio::test]
async fn a_crl_change_takes_effect_on_sighup_for_new_and_open_connections() {
    let ca = TestCa::new("client CA");
    let a = ca.leaf("unit-a", &[], 10, false);
    let b = ca.leaf("unit-b", &[], 11, false);
    let s = TestServer::start(ServerOptions {
        client_auth: "optional",
        client_ca_pem: Some(ca.pem()),
        crl_pem: Some(ca.crl(&[])),
        ..Default::default()
    });
    let root = s.root.clone();
    let none = s.client();
    ok(
        none.put(
            "sys/policies/acl/read-app",
            &root,
            json!({"policy": "path \"secret/app/*\" { capabilities = [\"read\"] }"}),
        )
        .await,
        204,
    );
    ok(none.put("secret/app/x", &root, json!({"value": SECRET})).await, 200);
    ok(
        none.post(
            "auth/cert/role/role-b",
            Some(&root),
            json!({"certificate_sha256": [b.sha256_hex], "token_policies": ["read-app"], "allow_direct": true}),
        )
        .await,
        204,
    );
    // B opens a keep-alive connection, logs in and reads over it.
    let cb = s.client_with(&b);
    let t_b = token(&cb.post("auth/cert/login", None, json!({"name": "role-b"})).await);
    ok(cb.get("secret/app/x", &t_b).await, 200);
    ok(cb.send("GET", "secret/app/x", None, None).await, 200);
    let reloads = s.log_text().matches("TLS configuration reloaded").count();
    std::fs::write(&s.crl_file, ca.crl(&[11])).unwrap();
    s.sighup();
    keyvault_tests::wait_for(Duration::from_secs(10), "the TLS reload", || {
        s.log_text().matches("TLS configuration reloaded").count() > reloads
    })
    .await;
    // New connections of B fail the handshake...
    assert!(s.client_with(&b).try_send("GET", "sys/health", None, None).await.is_err(), "B is revoked now");
    assert_eq!(
        keyvault_tests::tls_alert(&s.addr, &s.server_ca_file, Some(&b.identity_pem())).await.as_deref(),
        Some("CertificateRevoked")
    );
    // ...and the connection it opened before is refused too: bound token, direct request,
    // new login.
    let r = ok(cb.get("secret/app/x", &t_b).await, 401);
    assert_eq!(r.body["errors"][0], "the client certificate is revoked");
    ok(cb.send("GET", "secret/app/x", None, None).await, 401);
    ok(cb.post("auth/cert/login", None, json!({"name": "role-b"})).await, 401);
    assert_eq!(s.client_with(&a).send("GET", "sys/health", None, None).await.status, 200);
}

/// A CA removed from the client CA bundle ends its certificates' connections opened
/// before the reload too (kept alive, or HTTP/2), at their next request: not only new
/// handshakes. The other CA's connection goes on.
#[tokio::test]
async fn a_ca_removed_from_the_bundle_reaches_open_connections() {
    let (ours, partner) = (TestCa::new("our CA"), TestCa::new("partner CA"));
    let a = ours.leaf("unit-a", &[], 10, false);
    let p = partner.leaf("unit-p", &[], 20, false);
    let s = TestServer::start(ServerOptions {
        client_auth: "optional",
        client_ca_pem: Some(format!("{}{}", ours.pem(), partner.pem())),
        ..Default::default()
    });
    let root = s.root.clone();
    let none = s.client();
    for (name, id) in [("role-a", &a), ("role-p", &p)] {
        let role = json!({"certificate_sha256": [id.sha256_hex], "token_policies": ["default"], "allow_direct": true});
        ok(none.post(&format!("auth/cert/role/{name}"), Some(&root), role).await, 204);
    }
    // Each opens a keep-alive connection and logs in over it.
    let (ca, cp) = (s.client_with(&a), s.client_with(&p));
    let t_a = token(&ca.post("auth/cert/login", None, json!({"name": "role-a"})).await);
    let t_p = token(&cp.post("auth/cert/login", None, json!({"name": "role-p"})).await);
    ok(cp.get("auth/token/lookup-self", &t_p).await, 200);
    let reloads = s.log_text().matches("TLS configuration reloaded").count();
    std::fs::write(&s.client_ca_file, ours.pem()).unwrap();
    s.sighup();
    keyvault_tests::wait_for(Duration::from_secs(10), "the TLS reload", || {
        s.log_text().matches("TLS configuration reloaded").count() > reloads
    })
    .await;
    // A new connection of the partner's certificate fails the handshake...
    assert!(s.client_with(&p).try_send("GET", "sys/health", None, None).await.is_err(), "the partner CA is gone");
    // ...and the one it opened before is refused: bound token, direct request, new login.
    let r = ok(cp.get("auth/token/lookup-self", &t_p).await, 401);
    assert_eq!(r.body["errors"][0], "the client certificate is no longer trusted");
    ok(cp.send("GET", "auth/token/lookup-self", None, None).await, 401);
    ok(cp.post("auth/cert/login", None, json!({"name": "role-p"})).await, 401);
    // Our CA's connection, opened before the reload, and a new one, go on.
    ok(ca.get("auth/token/lookup-self", &t_a).await, 200);
    ok(s.client_with(&a).get("auth/token/lookup-self", &t_a).await, 200);
    // Back in the bundle: the partner's open connection stands again.
    let reloads = s.log_text().matches("TLS configuration reloaded").count();
    std::fs::write(&s.client_ca_file, format!("{}{}", ours.pem(), partner.pem())).unwrap();
    s.sighup();
    keyvault_tests::wait_for(Duration::from_secs(10), "the TLS reload", || {
        s.log_text().matches("TLS configuration reloaded").count() > reloads
    })
    .await;
    ok(cp.get("auth/token/lookup-self", &t_p).await, 200);
}

#[tokio::test]
async fn kubernetes_service_account_login() {
    use keyvault_tests::kube::*;
    const ISS: &str = "https://kubernetes.default.svc.cluster.local";
    let w = world("").await;
    let c = w.s.client();
    let root = w.s.root.clone();
    let signer = Signer::new("k1");
    ok(
        c.post(
            "auth/kubernetes/config",
            Some(&root),
            json!({"issuer": ISS, "public_keys": signer.public_pem(), "audiences": ["keyvault"]}),
        )
        .await,
        204,
    );
    ok(
        c.post(
            "auth/kubernetes/role/payments-api",
            Some(&root),
            json!({"bound_service_account_names": ["api"], "bound_service_account_namespaces": ["payments"], "token_policies": ["read-app"]}),
        )
        .await,
        204,
    );
    let login = |jwt: String| {
        let c = c.clone();
        async move { c.post("auth/kubernetes/login", None, json!({"role": "payments-api", "jwt": jwt})).await }
    };
    let good = login(signer.sign(&claims("payments", "api", "keyvault", ISS, 600))).await;
    let t = token(&good);
    assert_eq!(good.body["auth"]["policies"], json!(["read-app"]));
    assert_eq!(c.get("secret/app/x", &t).await.status, 200);

    let other_key = Signer::new("k1");
    let cases: Vec<(&str, String)> = vec![
        ("expired", signer.sign(&claims("payments", "api", "keyvault", ISS, -60))),
        ("wrong audience", signer.sign(&claims("payments", "api", "other", ISS, 600))),
        ("wrong namespace", signer.sign(&claims("billing", "api", "keyvault", ISS, 600))),
        ("wrong service account", signer.sign(&claims("payments", "web", "keyvault", ISS, 600))),
        ("wrong issuer", signer.sign(&claims("payments", "api", "keyvault", "https://evil", 600))),
        ("another key", other_key.sign(&claims("payments", "api", "keyvault", ISS, 600))),
        ("alg none", {
            use base64::Engine;
            let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            format!(
                "{}.{}.",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                b64(&claims("payments", "api", "keyvault", ISS, 600).to_string())
            )
        }),
        ("HS256 with the public key as secret", {
            let h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
            jsonwebtoken::encode(
                &h,
                &claims("payments", "api", "keyvault", ISS, 600),
                &jsonwebtoken::EncodingKey::from_secret(signer.public_pem().as_bytes()),
            )
            .unwrap()
        }),
        ("garbage", "abc.def.ghi".to_owned()),
    ];
    for (name, jwt) in cases {
        let r = login(jwt).await;
        assert_eq!(r.status, 401, "{name}: {r:?}");
    }
    // A role narrows the mount's audiences and never widens them: an audience the mount
    // does not list (the API server's default audience, say, which every pod's token
    // carries) is refused when the role is written, and when a role names an audience the
    // mount no longer lists, its logins are refused.
    let role_with = |audience: &str| {
        json!({"bound_service_account_names": ["api"], "bound_service_account_namespaces": ["payments"],
               "token_policies": ["read-app"], "audience": audience})
    };
    let r = ok(c.post("auth/kubernetes/role/wide", Some(&root), role_with(ISS)).await, 400);
    assert!(r.body["errors"][0].as_str().unwrap().contains("not one of the mount's audiences"), "{r:?}");
    let config_with = |audiences: serde_json::Value| json!({"issuer": ISS, "public_keys": signer.public_pem(), "audiences": audiences});
    ok(c.post("auth/kubernetes/config", Some(&root), config_with(json!(["keyvault", "extra"]))).await, 204);
    ok(c.post("auth/kubernetes/role/narrow", Some(&root), role_with("extra")).await, 204);
    let narrow = |jwt: String| {
        let c = c.clone();
        async move { c.post("auth/kubernetes/login", None, json!({"role": "narrow", "jwt": jwt})).await }
    };
    ok(narrow(signer.sign(&claims("payments", "api", "extra", ISS, 600))).await, 200);
    ok(narrow(signer.sign(&claims("payments", "api", "keyvault", ISS, 600))).await, 401);
    ok(c.post("auth/kubernetes/config", Some(&root), config_with(json!(["keyvault"]))).await, 204);
    ok(narrow(signer.sign(&claims("payments", "api", "extra", ISS, 600))).await, 401);
    ok(c.send("DELETE", "auth/kubernetes/role/narrow", Some(&root), None).await, 204);
    assert_eq!(c.post("auth/kubernetes/login", None, json!({"role": "payments-api"})).await.status, 400);
    assert_eq!(c.post("auth/kubernetes/login", None, json!({"role": "nope", "jwt": "x.y.z"})).await.status, 401);

    // Key rotation in the cluster: the admin posts the new JWKS; new tokens verify, old
    // ones not.
    let rotated = Signer::new("k2");
    let config = |keys: String| json!({"issuer": ISS, "public_keys": keys, "audiences": ["keyvault"]});
    ok(c.post("auth/kubernetes/config", Some(&root), config(rotated.jwks())).await, 204);
    token(&login(rotated.sign(&claims("payments", "api", "keyvault", ISS, 600))).await);
    assert_eq!(login(signer.sign(&claims("payments", "api", "keyvault", ISS, 600))).await.status, 401);
    // A broken document is refused and the last good keys stay.
    let r = ok(c.post("auth/kubernetes/config", Some(&root), config("not a key".into())).await, 400);
    assert!(!r.body.to_string().contains("not a key"), "errors never echo the input: {r:?}");
    token(&login(rotated.sign(&claims("payments", "api", "keyvault", ISS, 600))).await);
    // No request names a file on the server, and key documents are size-capped.
    for path in ["/dev/zero", "/etc/passwd", "/nonexistent"] {
        let r = c
            .post(
                "auth/kubernetes/config",
                Some(&root),
                json!({"issuer": ISS, "public_keys_file": path, "audiences": ["k"]}),
            )
            .await;
        assert_eq!(r.status, 400, "{path}: {r:?}");
        assert!(!r.body.to_string().contains("root:"), "{r:?}");
    }
    let huge = format!("{}{}", rotated.public_pem(), " ".repeat(70 * 1024));
    ok(c.post("auth/kubernetes/config", Some(&root), config(huge)).await, 400);
    assert_eq!(c.get("sys/health", &root).await.status, 200);
    // Roles need bounds.
    ok(c.post("auth/kubernetes/role/loose", Some(&root), json!({"bound_service_account_names": ["api"]})).await, 400);

    // 16 config writes at once, each with its own issuer and key: each is taken whole,
    // and the one left is one of them whole (never one write's issuer with another's
    // keys). Only its key, with its issuer, logs in.
    let signers: Vec<Signer> = (0..16).map(|_| Signer::new("k1")).collect();
    let writes = signers.iter().enumerate().map(|(i, signer)| {
        let (c, root) = (c.clone(), root.clone());
        let body =
            json!({"issuer": format!("{ISS}/{i}"), "public_keys": signer.public_pem(), "audiences": ["keyvault"]});
        async move { c.post("auth/kubernetes/config", Some(&root), body).await.status }
    });
    let statuses = futures_util::future::join_all(writes).await;
    assert!(statuses.iter().all(|st| *st == 204), "{statuses:?}");
    let config = ok(c.get("auth/kubernetes/config", &root).await, 200);
    let issuer = config.body["data"]["issuer"].as_str().unwrap().to_owned();
    let winner: usize = issuer.strip_prefix(&format!("{ISS}/")).unwrap().parse().unwrap();
    for (i, signer) in signers.iter().enumerate() {
        let r = login(signer.sign(&claims("payments", "api", "keyvault", &issuer, 600))).await;
        assert_eq!(r.status, if i == winner { 200 } else { 401 }, "signer {i} (config of {winner}): {r:?}");
    }
}

#[tokio::test]
async fn bootstrap_tokens_are_used_once_even_concurrently() {
    let mut w = world_with("", true).await;
    let c = w.s.client();
    let root = w.s.root.clone();
    let mint = || {
        let (c, root) = (c.clone(), root.clone());
        async move {
            let r = ok(
                c.post(
                    "auth/bootstrap/token",
                    Some(&root),
                    json!({"policies": ["read-app"], "ttl": "5m", "display_name": "vm-17"}),
                )
                .await,
                200,
            );
            r.body["data"]["bootstrap_token"].as_str().unwrap().to_owned()
        }
    };
    let b1 = mint().await;
    let t = token(&c.post("auth/bootstrap/login", None, json!({"token": b1})).await);
    assert_eq!(c.get("secret/app/x", &t).await.status, 200);
    assert_eq!(c.post("auth/bootstrap/login", None, json!({"token": b1})).await.status, 401, "second use");

    for _ in 0..5 {
        let b = mint().await;
        let (r1, r2) = tokio::join!(
            c.post("auth/bootstrap/login", None, json!({"token": b})),
            c.post("auth/bootstrap/login", None, json!({"token": b})),
        );
        let mut statuses = [r1.status, r2.status];
        statuses.sort();
        assert_eq!(statuses, [200, 401], "exactly one of two concurrent uses wins");
    }

    // Expiry.
    let r = ok(c.post("auth/bootstrap/token", Some(&root), json!({"policies": ["read-app"], "ttl": "1m"})).await, 200);
    let short = r.body["data"]["bootstrap_token"].as_str().unwrap().to_owned();
    w.s.advance_clock(61);
    assert_eq!(c.post("auth/bootstrap/login", None, json!({"token": short})).await.status, 401);

    // Nobody mints more than they have. A bootstrap token's login has no parent, so it
    // outlives the minter's token: minting needs `sudo`, as `create-orphan` does.
    let app = approle_token(&c, &root, "app").await;
    for (caps, status) in [("\"update\"", 403), ("\"update\", \"sudo\"", 200)] {
        ok(
            c.put(
                "sys/policies/acl/minter",
                &root,
                json!({"policy": format!("path \"auth/bootstrap/token\" {{ capabilities = [{caps}] }}")}),
            )
            .await,
            204,
        );
        ok(
            c.post("auth/approle/role/minter", Some(&root), json!({"token_policies": ["minter", "read-app"]})).await,
            204,
        );
        let minter = approle_token(&c, &root, "minter").await;
        ok(c.post("auth/bootstrap/token", Some(&minter), json!({"policies": ["read-app"]})).await, status);
    }
    let minter = approle_token(&c, &root, "minter").await;
    ok(c.post("auth/bootstrap/token", Some(&minter), json!({"policies": ["admin"]})).await, 403);
    ok(c.post("auth/bootstrap/token", Some(&app), json!({"policies": ["read-app"]})).await, 403);
    ok(c.post("auth/bootstrap/token", Some(&root), json!({"policies": ["root"]})).await, 400);
    ok(c.post("auth/bootstrap/token", Some(&root), json!({"ttl": "48h"})).await, 400);
}

#[tokio::test]
async fn token_lifecycle() {
    let w = world("").await;
    let c = w.s.client();
    let root = w.s.root.clone();
    ok(
        c.post(
            "auth/approle/role/short",
            Some(&root),
            json!({"token_policies": ["read-app"], "token_ttl": "60s", "token_max_ttl": "90s"}),
        )
        .await,
        204,
    );
    let t = approle_token(&c, &root, "short").await;

    let r = ok(c.get("auth/token/lookup-self", &t).await, 200);
    assert_eq!(r.body["data"]["policies"], json!(["read-app"]));
    assert_eq!(r.body["data"]["renewable"], true);
    // Vault's shape, which the CLI's `login` reads: the caller's own token as `id`, and
    // string-only metadata.
    assert_eq!(r.body["data"]["id"], t.as_str());
    assert_eq!(r.body["data"]["meta"], json!({"role_name": "short"}));
    assert_eq!(r.body["data"]["orphan"], true);
    assert_eq!(r.body["data"]["num_uses"], 0);
    assert_eq!(r.body["data"]["entity_id"], "");
    let accessor = r.body["data"]["accessor"].as_str().unwrap().to_owned();

    // Renew: the same token, valid longer, capped by the role's max TTL (Vault's clients
    // keep the token they hold).
    let r = ok(c.post("auth/token/renew-self", Some(&t), json!({"increment": "1h"})).await, 200);
    let renewed = r.body["auth"]["client_token"].as_str().unwrap().to_owned();
    assert_eq!(renewed, t);
    assert_eq!(r.body["auth"]["accessor"], accessor.as_str());
    let ttl = r.body["auth"]["lease_duration"].as_u64().unwrap();
    assert!((85..=90).contains(&ttl), "capped at token_max_ttl: {ttl}");
    assert_eq!(c.get("secret/app/x", &renewed).await.status, 200);
    let r = ok(c.post("auth/token/renew-self", Some(&t), json!({"bogus": 1})).await, 200);
    assert_eq!(r.body["warnings"][0], "Endpoint ignored these unrecognized parameters: [bogus]");

    // Revoke-self revokes the token, renewed or not.
    ok(c.post("auth/token/revoke-self", Some(&renewed), json!({})).await, 204);
    let r = c.get("secret/app/x", &t).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["errors"][0], "token revoked");

    // Admin revoke by accessor.
    let victim = approle_token(&c, &root, "app").await;
    let acc = c.get("auth/token/lookup-self", &victim).await.body["data"]["accessor"].as_str().unwrap().to_owned();
    let bystander = approle_token(&c, &root, "app").await;
    ok(c.post("auth/token/revoke-accessor", Some(&bystander), json!({"accessor": acc})).await, 403);
    ok(c.post("auth/token/revoke-accessor", Some(&root), json!({"accessor": acc})).await, 204);
    assert_eq!(c.get("secret/app/x", &victim).await.status, 401);
    assert_eq!(c.get("secret/app/x", &bystander).await.status, 200);
    ok(c.post("auth/token/revoke-accessor", Some(&root), json!({"accessor": "../x"})).await, 400);

    // A direct certificate request has no token to renew.
    let ca = w.s.client_with(&w.a);
    ok(ca.post("auth/token/renew-self", None, json!({})).await, 400);
    assert_eq!(
        ok(ca.send("GET", "auth/token/lookup-self", None, None).await, 200).body["data"]["type"],
        "direct-certificate"
    );
}

#[tokio::test]
async fn kill_switch_revokes_an_identity_everywhere_at_once() {
    let w = world("").await;
    let root = w.s.root.clone();
    let none = w.s.client();
    let ca = w.s.client_with(&w.a);
    let cb = w.s.client_with(&w.b);
    let t_app = approle_token(&none, &root, "app").await;
    let t_a = token(&ca.post("auth/cert/login", None, json!({"name": "role-a"})).await);
    let t_spiffe = token(&ca.post("auth/cert/login", None, json!({"name": "role-spiffe"})).await);
    let t_b = token(&cb.post("auth/cert/login", None, json!({"name": "role-b"})).await);

    // Only sudo may pull the switch.
    ok(none.post("sys/revoke-identity", Some(&t_app), json!({"role": "app"})).await, 403);
    ok(none.post("sys/revoke-identity", Some(&root), json!({"role": "app", "spiffe_id": "spiffe://x"})).await, 400);

    // A role: its tokens and its logins.
    let r = ok(none.post("sys/revoke-identity", Some(&root), json!({"role": "app"})).await, 200);
    assert!(r.body["data"]["revoked_at"].as_u64().is_some());
    let r = none.get("secret/app/x", &t_app).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["errors"][0], "identity revoked");
    let sid = none.post("auth/approle/role/app/secret-id", Some(&root), json!({})).await.body["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(none.post("auth", None, json!({"role": "app", "secret_id": sid})).await.status, 401);
    assert_eq!(cb.get("secret/app/x", &t_b).await.status, 200, "other identities are untouched");
    // Restored: logins work again, the old token stays dead.
    ok(none.post("sys/restore-identity", Some(&root), json!({"role": "app"})).await, 204);
    let fresh = token(&none.post("auth", None, json!({"role": "app", "secret_id": sid})).await);
    assert_eq!(none.get("secret/app/x", &fresh).await.status, 200);
    assert_eq!(none.get("secret/app/x", &t_app).await.status, 401);

    // A certificate: bound tokens, direct requests, cert logins, and its pin. A role
    // pinned to it that also names a SAN is removed with the pin, not widened to every
    // certificate with that SAN (B has it).
    ok(
        none.post(
            "auth/cert/role/role-a-dns",
            Some(&root),
            json!({"certificate_sha256": [w.a.sha256_hex], "allowed_dns_sans": ["unit-b.corp"], "token_policies": ["read-app"]}),
        )
        .await,
        204,
    );
    assert_eq!(cb.post("auth/cert/login", None, json!({"name": "role-a-dns"})).await.status, 401);
    ok(
        none.post("sys/revoke-identity", Some(&root), json!({"certificate_sha256": w.a.sha256_hex.to_uppercase()}))
            .await,
        200,
    );
    assert_eq!(none.get("auth/cert/role/role-a-dns", &root).await.status, 404, "removed with its only pin");
    assert_eq!(cb.post("auth/cert/login", None, json!({"name": "role-a-dns"})).await.status, 401);
    assert_eq!(ca.get("secret/app/x", &t_a).await.status, 401);
    assert_eq!(ca.send("GET", "secret/app/x", None, None).await.status, 401, "direct request");
    assert_eq!(ca.post("auth/cert/login", None, json!({"name": "role-spiffe"})).await.status, 401);
    assert_eq!(none.get("auth/cert/role/role-a", &root).await.status, 404, "the role pinned to it is gone");
    assert_eq!(cb.get("secret/app/x", &t_b).await.status, 200);

    // A SPIFFE ID, through the CLI.
    let out = std::process::Command::new(keyvault_tests::keyvault_bin())
        .args(["operator", "revoke-identity", "--address", &w.s.addr, "--ca-file"])
        .arg(&w.s.server_ca_file)
        .args(["--spiffe-id", SPIFFE_A])
        .env("KEYVAULT_TOKEN", &root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("SPIFFE ID spiffe://corp/ns/payments/sa/api"));
    // t_spiffe was issued to A (also revoked by fingerprint); check the SPIFFE record on its own.
    ok(none.post("sys/restore-identity", Some(&root), json!({"certificate_sha256": w.a.sha256_hex})).await, 204);
    assert_eq!(ca.get("secret/app/x", &t_spiffe).await.status, 401);
    assert_eq!(ca.post("auth/cert/login", None, json!({"name": "role-spiffe"})).await.status, 401);
    assert!(w.s.log_text().contains("identity revoked (kill switch)"));
}

/// A secret id belongs to the role it was made for, not to the role's name: one made
/// while the role is being deleted (or left behind by a delete that was cut short) never
/// logs in to a role made again under the same name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_ids_of_a_deleted_role_never_log_in_to_one_made_again_under_its_name() {
    let w = world("").await;
    let c = w.s.client();
    let root = w.s.root.clone();
    let role = json!({"token_policies": ["read-app"]});
    let mut old = Vec::new();
    for _ in 0..3 {
        ok(c.post("auth/approle/role/again", Some(&root), role.clone()).await, 204);
        // One made before the delete, then sixteen while it runs: each of those is made
        // (200) or finds the role gone, on its first look or on its look after storing
        // the id (404).
        let before = ok(c.post("auth/approle/role/again/secret-id", Some(&root), json!({})).await, 200);
        old.push(before.body["data"]["secret_id"].as_str().unwrap().to_owned());
        let mints = (0..16).map(|_| c.post("auth/approle/role/again/secret-id", Some(&root), json!({})));
        let (minted, deleted) = tokio::join!(
            futures_util::future::join_all(mints),
            c.send("DELETE", "auth/approle/role/again", Some(&root), None)
        );
        assert_eq!(deleted.status, 204, "{deleted:?}");
        assert!(minted.iter().all(|r| r.status == 200 || r.status == 404), "{minted:?}");
        old.extend(
            minted.iter().filter(|r| r.status == 200).map(|r| r.body["data"]["secret_id"].as_str().unwrap().to_owned()),
        );
    }
    ok(c.post("auth/approle/role/again", Some(&root), role).await, 204);
    assert!(!old.is_empty());
    for sid in &old {
        let r = c.post("auth", None, json!({"role": "again", "secret_id": sid})).await;
        assert_eq!(r.status, 401, "a secret id of a deleted role: {r:?}");
    }
    // The role made again works with its own.
    let sid =
        ok(c.post("auth/approle/role/again/secret-id", Some(&root), json!({})).await, 200).body["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_owned();
    token(&c.post("auth", None, json!({"role": "again", "secret_id": sid})).await);
}

#[tokio::test]
async fn failed_logins_are_rate_limited_per_role_and_address() {
    let w = world("[auth.rate_limit]\nfailures_per_role_and_address = 3\nfailures_per_address = 6\nwindow = \"60s\"\n")
        .await;
    let root = w.s.root.clone();
    let c = w.s.client();
    ok(c.post("auth/approle/role/batch", Some(&root), json!({"token_policies": ["read-app"]})).await, 204);
    let sid = c.post("auth/approle/role/app/secret-id", Some(&root), json!({})).await.body["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let wrong = json!({"role": "app", "secret_id": "0".repeat(64)});
    for _ in 0..3 {
        assert_eq!(c.post("auth", None, wrong.clone()).await.status, 401);
    }
    let r = c.post("auth", None, wrong.clone()).await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.headers.get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    // The right secret from the attacking address is refused too (no guessing while limited).
    assert_eq!(c.post("auth", None, json!({"role": "app", "secret_id": sid})).await.status, 429);
    // The legitimate unit from its own address is not locked out.
    let unit = Client::from_address(&w.s.addr, &w.s.server_ca_file, "127.0.0.2".parse().unwrap());
    token(&unit.post("auth", None, json!({"role": "app", "secret_id": sid})).await);
    // Another role from the attacking address: ordinary 401s until the per-address limit.
    let wrong_batch = json!({"role": "batch", "secret_id": "0".repeat(64)});
    for _ in 0..3 {
        assert_eq!(c.post("auth", None, wrong_batch.clone()).await.status, 401);
    }
    assert_eq!(c.post("auth", None, wrong_batch.clone()).await.status, 429, "per-address limit");
    assert_eq!(unit.post("auth", None, wrong_batch).await.status, 401);
}

/// A web page the user visits cannot act with the user's client certificate. A browser
/// sends a body without a `Content-Type` across sites without a preflight (an
/// `ArrayBuffer` body, `navigator.sendBeacon`), and presents the certificate: a direct
/// request (no token) that names a page's origin (`Origin`) or another site
/// (`Sec-Fetch-Site`) is refused 401 as one without a credential, and nothing is
/// changed. The same certificate without those headers (curl, a service) still works,
/// and a token still works from a page (a page cannot attach one across sites).
#[tokio::test]
async fn a_web_page_gets_nothing_from_a_client_certificate() {
    let w = world("").await;
    let root = w.s.root.clone();
    let c = w.s.client();
    let write_app = json!({"policy": "path \"secret/app/*\" { capabilities = [\"create\", \"update\", \"read\"] }"});
    ok(c.put("sys/policies/acl/write-app", &root, write_app).await, 204);
    let role = json!({"certificate_sha256": [w.a.sha256_hex], "token_policies": ["write-app"], "allow_direct": true});
    ok(c.post("auth/cert/role/role-a", Some(&root), role).await, 204);
    let ca = w.s.client_with(&w.a);
    let page_headers: [&[(&str, &str)]; 4] = [
        &[("Origin", "https://evil.example"), ("Sec-Fetch-Site", "cross-site"), ("Sec-Fetch-Mode", "no-cors")],
        &[("Origin", "null")],
        &[("Sec-Fetch-Site", "same-site")],
        &[("Sec-Fetch-Site", "cross-site")],
    ];
    for headers in page_headers {
        for (method, path) in [("POST", "secret/app/x"), ("PUT", "secret/app/csrf"), ("GET", "secret/app/x")] {
            let mut req = ca.http.request(method.parse().unwrap(), ca.url(path));
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            if method != "GET" {
                req = req.body(r#"{"value":"attacker"}"#.as_bytes().to_vec());
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status().as_u16(), 401, "{method} {path} with {headers:?}");
        }
    }
    assert_eq!(ok(c.get("secret/app/x", &root).await, 200).body["data"]["value"], SECRET);
    ok(c.get("secret/app/csrf", &root).await, 404);
    // The certificate alone, as a service sends it: a direct request still works, and so
    // does a request typed into the address bar (`Sec-Fetch-Site: none`).
    let r =
        ca.http.put(ca.url("secret/app/direct")).body(r#"{"value":"mine"}"#.as_bytes().to_vec()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = ca.http.get(ca.url("secret/app/direct")).header("Sec-Fetch-Site", "none").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // A token from a page is the page's own credential: not refused for the headers.
    let r = c.http.get(c.url("secret/app/x")).header("X-Vault-Token", &root).header("Origin", "https://a.example");
    assert_eq!(r.send().await.unwrap().status().as_u16(), 200);
}

/// A renewal asks the role or user that issued the token again, as Vault does: a token
/// of a user or role that was deleted, or whose policies were cut, is not renewed (400:
/// log in again), so an admin's delete ends such tokens at their current expiry instead
/// of their maximum lifetime. Nothing changed: renewed as before. A certificate login's
/// token is renewed over its certificate, which must still meet the role.
#[tokio::test]
async fn a_token_of_a_deleted_user_or_role_is_not_renewed() {
    let w = world("").await;
    let root = w.s.root.clone();
    let c = w.s.client();
    let user = json!({"password": "a long passphrase", "token_policies": ["read-app"], "token_max_ttl": "1h"});
    ok(c.post("auth/userpass/users/alice", Some(&root), user.clone()).await, 204);
    let login =
        || async { token(&c.post("auth/userpass/login/alice", None, json!({"password": "a long passphrase"})).await) };
    let t = login().await;
    ok(c.post("auth/token/renew-self", Some(&t), json!({"increment": "10m"})).await, 200);
    ok(c.send("DELETE", "auth/userpass/users/alice", Some(&root), None).await, 204);
    let r = ok(c.post("auth/token/renew-self", Some(&t), json!({"increment": "10m"})).await, 400);
    assert_eq!(r.body["errors"][0], "the role or user this token was issued by no longer exists; log in again");
    ok(c.post("auth/token/renew", Some(&root), json!({"token": t})).await, 400);
    // Made again with fewer policies: the old token is not renewed either; a new one is.
    let fewer = json!({"password": "a long passphrase", "token_policies": [], "token_max_ttl": "1h"});
    ok(c.post("auth/userpass/users/alice", Some(&root), fewer).await, 204);
    let r = ok(c.post("auth/token/renew-self", Some(&t), json!({})).await, 400);
    assert!(r.body["errors"][0].as_str().unwrap().contains("policies"), "{r:?}");
    let t2 = login().await;
    ok(c.post("auth/token/renew-self", Some(&t2), json!({})).await, 200);

    // AppRole: the same for a deleted role.
    let t_app = approle_token(&c, &root, "app").await;
    ok(c.post("auth/token/renew-self", Some(&t_app), json!({})).await, 200);
    ok(c.send("DELETE", "auth/approle/role/app", Some(&root), None).await, 204);
    ok(c.post("auth/token/renew-self", Some(&t_app), json!({})).await, 400);
    // A certificate role: its token is renewed by its holder only, over its certificate.
    let ca = w.s.client_with(&w.a);
    let t_a = token(&ca.post("auth/cert/login", None, json!({"name": "role-a"})).await);
    ok(ca.post("auth/token/renew-self", Some(&t_a), json!({})).await, 200);
    let r = ok(c.post("auth/token/renew", Some(&root), json!({"token": t_a})).await, 400);
    assert!(r.body["errors"][0].as_str().unwrap().contains("renewed by its holder"), "{r:?}");
    let cb = w.s.client_with(&w.b);
    ok(cb.post("auth/token/renew", Some(&t_a), json!({"token": t_a})).await, 401);
    // A role narrowed to exclude the certificate, its policies the same: not renewed (as
    // in Vault); renewed again once the role takes the certificate back.
    let role_a =
        |pins: Vec<&str>| json!({"certificate_sha256": pins, "token_policies": ["read-app"], "allow_direct": true});
    ok(c.post("auth/cert/role/role-a", Some(&root), role_a(vec![w.b.sha256_hex.as_str()])).await, 204);
    let r = ok(ca.post("auth/token/renew-self", Some(&t_a), json!({})).await, 400);
    assert!(r.body["errors"][0].as_str().unwrap().contains("no longer meets the role"), "{r:?}");
    ok(c.post("auth/cert/role/role-a", Some(&root), role_a(vec![w.a.sha256_hex.as_str()])).await, 204);
    ok(ca.post("auth/token/renew-self", Some(&t_a), json!({})).await, 200);
    // A role whose policies were cut.
    let cut = json!({"certificate_sha256": [w.a.sha256_hex], "token_policies": [], "allow_direct": true});
    ok(c.post("auth/cert/role/role-a", Some(&root), cut).await, 204);
    ok(ca.post("auth/token/renew-self", Some(&t_a), json!({})).await, 400);
}
