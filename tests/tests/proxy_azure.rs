//! Mounts served by Azure Key Vault (`type = "azure"`), against a fake of its secrets API
//! and of Entra ID's token endpoint (tests/src/azure_fake.rs: no emulator exists; the fake
//! follows Microsoft's API reference and checks what it is sent). The conformance suite
//! on the adapter, a unit reading through KeyVault, versions by id, paging, the token
//! refreshed before it expires.

use std::time::Duration;

use keyvault_proxy_backends::azure::{Azure, AzureConfig};
use keyvault_proxy_backends::{SecretBackend, Version};
use keyvault_tests::azure_fake::FakeAzure;
use keyvault_tests::server::{ServerOptions, TestServer, default_mounts_toml};
use keyvault_tests::{Reply, json};

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

fn config(fake: &FakeAzure, secret_file: &std::path::Path) -> AzureConfig {
    AzureConfig {
        vault_url: fake.url.clone(),
        tenant_id: fake.tenant.clone(),
        client_id: fake.client_id.clone(),
        client_secret_file: Some(secret_file.to_owned()),
        client_certificate_file: None,
        client_key_file: None,
        authority_host: fake.url.clone(),
        ca_file: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_adapter_passes_the_conformance_suite_against_the_fake() {
    let fake = FakeAzure::start(Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, format!("{}\n", fake.client_secret)).unwrap();
    let azure = Azure::new(config(&fake, &secret)).unwrap();
    keyvault_proxy_backends::conformance::run(&azure, "conf-azure").await;
    let seen = fake.seen();
    assert_eq!(seen.tokens_issued, 1, "one token, cached");
    assert_eq!((seen.refused, seen.bad_version), (0, 0), "every request had a live token and api-version 7.4");
    // A wrong client secret: the token endpoint refuses, the adapter says so.
    std::fs::write(&secret, "wrong").unwrap();
    let e = Azure::new(config(&fake, &secret)).unwrap().read("x", &Version::Latest).await.unwrap_err();
    assert!(e.to_string().contains("invalid_client"), "{e}");
    assert!(!e.to_string().contains(&fake.client_secret));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_reads_secrets_kept_in_azure_through_keyvault() {
    // Tokens live 5 s: the adapter takes a new one a fifth of that (1 s) before each
    // expires, room enough for a read sent just before on a loaded machine.
    let (fake, _dir, secret) = fake_with_secret_file(Duration::from_secs(5)).await;
    fake.put("db--password", "azure-pass-1");
    fake.put("db--password", "azure-pass-2");
    fake.put("db--config", r#"{"host": "db.internal", "port": "5432"}"#);
    for i in 0..5 {
        fake.put(&format!("app{i}"), "x");
    }
    let s = server_with_azure_mount(&fake, &secret);
    let c = s.client();
    let root = s.root.clone();
    let r = ok(c.get("az/db/password", &root).await, 200);
    assert_eq!(r.body["data"]["value"], "azure-pass-2");
    // A new version through KeyVault; the older one by its Key Vault version id.
    let id2 = r.body["metadata"]["version_id"].as_str().unwrap().to_owned();
    ok(c.put("az/db/password", &root, json!({"value": "azure-pass-3"})).await, 200);
    assert_eq!(ok(c.get("az/db/password", &root).await, 200).body["data"]["value"], "azure-pass-3");
    let r = ok(c.get(&format!("az/db/password?version_id={id2}"), &root).await, 200);
    assert_eq!(r.body["data"]["value"], "azure-pass-2");
    ok(c.get("az/db/password?version_id=0000000000", &root).await, 404);
    let r = ok(c.get("az/db/config", &root).await, 200);
    assert_eq!(r.body["data"], json!({"host": "db.internal", "port": "5432"}));
    // Listing follows nextLink (two per page in the fake) and splits names on `--`.
    let l = ok(c.send("LIST", "az", Some(&root), None).await, 200);
    assert_eq!(l.body["data"]["keys"], json!(["app0", "app1", "app2", "app3", "app4", "db/"]));
    let l = ok(c.send("LIST", "az/db", Some(&root), None).await, 200);
    assert_eq!(l.body["data"]["keys"], json!(["config", "password"]));
    assert!(fake.seen().pages_served >= 8, "{:?}", fake.seen());
    // Writes go through; a path Key Vault cannot name is a 400.
    ok(c.put("az/new/one", &root, json!({"value": "written"})).await, 200);
    assert_eq!(ok(c.get("az/new/one", &root).await, 200).body["data"]["value"], "written");
    ok(c.put("az/bad_name", &root, json!({"value": "x"})).await, 400);
    ok(c.get("az/missing", &root).await, 404);
    ok(c.get("az/db/password?version=2", &root).await, 400);

    // Reads keep working across token lifetimes: a new token is taken before each
    // expires (reads polled until two more were issued), and the fake refused none.
    let first = fake.seen().tokens_issued;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while fake.seen().tokens_issued < first + 2 {
        assert!(std::time::Instant::now() < deadline, "no new token: {:?}", fake.seen());
        assert_eq!(ok(c.get("az/db/password", &root).await, 200).body["data"]["value"], "azure-pass-3");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = fake.seen();
    assert!(seen.tokens_issued >= first + 2, "{seen:?}");
    assert_eq!(seen.refused, 0, "no request went with an expired token: {seen:?}");
    assert!(!s.log_text().contains(&fake.client_secret));
}

/// The fake (its tokens living `token_life`), and its client secret in a file of a new
/// directory (kept while the directory is).
async fn fake_with_secret_file(token_life: Duration) -> (FakeAzure, tempfile::TempDir, std::path::PathBuf) {
    let fake = FakeAzure::start(token_life).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, &fake.client_secret).unwrap();
    (fake, dir, secret)
}

/// A server with the mount `az/` on the fake, by client secret (in `secret_file`), no cache.
fn server_with_azure_mount(fake: &FakeAzure, secret_file: &std::path::Path) -> TestServer {
    let mounts = format!(
        "[[mounts]]\npath = \"az\"\ntype = \"azure\"\n[mounts.options]\nvault_url = \"{url}\"\ntenant_id = \"{}\"\n\
         client_id = \"{}\"\nclient_secret_file = \"{}\"\nauthority_host = \"{url}\"\n[mounts.options.cache]\nttl = 0\n",
        fake.tenant,
        fake.client_id,
        secret_file.display(),
        url = fake.url,
    );
    TestServer::start(ServerOptions { extra: format!("{}{mounts}", default_mounts_toml()), ..Default::default() })
}

/// Key Vault's names are case-insensitive, KeyVault's paths and policies are not: a path
/// in another case would name the same secret past a policy written for its lower-case
/// path. Such paths are refused (400) for reads and writes; listings give the one
/// spelling a path may have (lower case), which reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_in_another_case_does_not_pass_a_policy_on_azure_names() {
    let (fake, _dir, secret) = fake_with_secret_file(Duration::from_secs(300)).await;
    fake.put("prod--db", "prod-password");
    fake.put("Made-Elsewhere--Key", "made-elsewhere");
    let s = server_with_azure_mount(&fake, &secret);
    let c = s.client();
    let root = s.root.clone();
    let policy = "path \"az/*\" { capabilities = [\"read\", \"create\", \"update\"] }\n\
                  path \"az/prod/*\" { capabilities = [\"deny\"] }\n";
    ok(c.put("sys/policies/acl/az-not-prod", &root, json!({"policy": policy})).await, 204);
    let t = ok(c.post("auth/token/create", Some(&root), json!({"policies": ["az-not-prod"]})).await, 200).body["auth"]
        ["client_token"]
        .as_str()
        .unwrap()
        .to_owned();
    ok(c.get("az/prod/db", &t).await, 403);
    for path in ["az/PROD/db", "az/Prod/db", "az/pRod/DB"] {
        let r = ok(c.get(path, &t).await, 400);
        assert!(!r.body.to_string().contains("prod-password"), "{r:?}");
        assert!(r.body["errors"][0].as_str().unwrap().contains("case-insensitive"), "{r:?}");
        ok(c.put(path, &t, json!({"value": "overwritten"})).await, 400);
    }
    assert_eq!(ok(c.get("az/prod/db", &root).await, 200).body["data"]["value"], "prod-password");
    // A secret made elsewhere with capitals lists in lower case, and reads so.
    let l = ok(c.send("LIST", "az", Some(&root), None).await, 200);
    assert_eq!(l.body["data"]["keys"], json!(["made-elsewhere/", "prod/"]));
    let l = ok(c.send("LIST", "az/made-elsewhere", Some(&root), None).await, 200);
    assert_eq!(l.body["data"]["keys"], json!(["key"]));
    assert_eq!(ok(c.get("az/made-elsewhere/key", &t).await, 200).body["data"]["value"], "made-elsewhere");
}

/// A write (PUT or POST) is a create or an update by whether the secret exists, which
/// the server asks the upstream. A caller who may do neither is refused before that: it
/// cannot make the server read upstream secrets with its credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_who_may_not_write_makes_no_upstream_read() {
    let (fake, _dir, secret) = fake_with_secret_file(Duration::from_secs(300)).await;
    fake.put("db", "upstream-value");
    let s = server_with_azure_mount(&fake, &secret);
    let c = s.client();
    let root = s.root.clone();
    ok(
        c.put("sys/policies/acl/az-create", &root, json!({"policy": "path \"az/*\" { capabilities = [\"create\"] }"}))
            .await,
        204,
    );
    ok(
        c.put("sys/policies/acl/az-read", &root, json!({"policy": "path \"az/*\" { capabilities = [\"read\"] }"}))
            .await,
        204,
    );
    let token = |policies: serde_json::Value| {
        let (c, root) = (c.clone(), root.clone());
        async move {
            ok(c.post("auth/token/create", Some(&root), json!({ "policies": policies })).await, 200).body["auth"]
                ["client_token"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let (none, reader, creator) =
        (token(json!(["default"])).await, token(json!(["az-read"])).await, token(json!(["az-create"])).await);
    let reads = fake.seen().secret_reads;
    for t in [&none, &reader] {
        for method in ["PUT", "POST"] {
            let r = c.send(method, "az/db", Some(t), Some(json!({"value": "x"}).to_string().into_bytes())).await;
            assert_eq!(r.status, 403, "{r:?}");
        }
    }
    assert_eq!(fake.seen().secret_reads, reads, "no upstream read for callers who may not write");
    // One who may create is asked about: the secret exists, so this is an update (403).
    // A new one is refused too: Azure has no "create only if absent", so a secret made
    // between the check and the write would be overwritten by a caller who may only
    // create. Nothing is written upstream.
    ok(c.send("PUT", "az/db", Some(&creator), Some(json!({"value": "x"}).to_string().into_bytes())).await, 403);
    assert!(fake.seen().secret_reads > reads);
    ok(c.send("PUT", "az/fresh", Some(&creator), Some(json!({"value": "new"}).to_string().into_bytes())).await, 403);
    ok(c.get("az/fresh", &root).await, 404);
    // One who may only update, the same (no check-and-set on Azure): an update of a secret
    // deleted meanwhile would bring it back. One who holds both writes.
    ok(
        c.put("sys/policies/acl/az-update", &root, json!({"policy": "path \"az/*\" { capabilities = [\"update\"] }"}))
            .await,
        204,
    );
    let updater = token(json!(["az-update"])).await;
    ok(c.send("PUT", "az/db", Some(&updater), Some(json!({"value": "x"}).to_string().into_bytes())).await, 403);
    let both = token(json!(["az-create", "az-update"])).await;
    ok(c.send("PUT", "az/fresh", Some(&both), Some(json!({"value": "new"}).to_string().into_bytes())).await, 200);
    assert_eq!(ok(c.get("az/db", &root).await, 200).body["data"]["value"], "upstream-value");
}

/// A certificate credential: the token request carries a client assertion signed with the
/// certificate's key; a key the application does not know is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_credential_signs_a_client_assertion() {
    use base64::Engine;
    use sha2::Digest;
    let fake = FakeAzure::start(Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["keyvault-app".to_owned()]).unwrap().self_signed(&key).unwrap();
    let (cert_file, key_file) = (dir.path().join("app.pem"), dir.path().join("app-key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let thumbprint = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(cert.der()));
    let with_cert = |cert: &std::path::Path, key: &std::path::Path| AzureConfig {
        client_secret_file: None,
        client_certificate_file: Some(cert.to_owned()),
        client_key_file: Some(key.to_owned()),
        ..config(&fake, dir.path())
    };
    // Not registered yet: refused.
    let azure = Azure::new(with_cert(&cert_file, &key_file)).unwrap();
    let e = azure.read("x", &Version::Latest).await.unwrap_err();
    assert!(e.to_string().contains("invalid_client"), "{e}");
    fake.register_certificate(&key.public_key_pem(), &thumbprint);
    fake.put("from-cert", "it-works");
    let v = azure.read("from-cert", &Version::Latest).await.unwrap();
    assert_eq!(v.data.field("value").unwrap().as_str(), "it-works");
    // Another key with the registered certificate's name: its signature fails.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let other_key = dir.path().join("other-key.pem");
    std::fs::write(&other_key, other.serialize_pem()).unwrap();
    let e =
        Azure::new(with_cert(&cert_file, &other_key)).unwrap().read("from-cert", &Version::Latest).await.unwrap_err();
    assert!(e.to_string().contains("invalid_client"), "{e}");
}

/// A write to a soft-deleted secret recovers it first. A write Key Vault would refuse (a
/// value over its 25 KB) is refused before that recovery: before, the recovery stayed
/// and the deleted (perhaps leaked) value was current again, though the writer was told
/// its write failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_does_not_bring_a_deleted_secret_back() {
    let (fake, _dir, secret) = fake_with_secret_file(Duration::from_secs(3600)).await;
    let azure = Azure::new(config(&fake, &secret)).unwrap();
    let old = keyvault_proxy_backends::SecretData::from_fields([("value", "leaked-credential")]);
    azure.write("gone", &old, None).await.unwrap();
    azure.delete("gone").await.unwrap();
    let big = keyvault_proxy_backends::SecretData::from_fields([("value", "x".repeat(30_000).as_str())]);
    let e = azure.write("gone", &big, None).await.unwrap_err();
    assert!(e.to_string().contains("at most 25600 bytes"), "{e}");
    let r = azure.read("gone", &Version::Latest).await;
    assert!(matches!(r, Err(keyvault_proxy_backends::BackendError::NotFound)), "{r:?}");
    // A write that fits recovers it with the new value.
    let new = keyvault_proxy_backends::SecretData::from_fields([("value", "rotated")]);
    azure.write("gone", &new, None).await.unwrap();
    let v = azure.read("gone", &Version::Latest).await.unwrap();
    assert_eq!(v.data.field("value").unwrap().as_str(), "rotated");
}
