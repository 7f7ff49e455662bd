//! Mounts served by AWS Secrets Manager (`type = "aws"`), against moto's server started
//! here: the conformance suite on the adapter; a unit reading JSON and plain-string
//! secrets through KeyVault, by stage and by version id; a missing secret; the upstream
//! down.

use keyvault_proxy_backends::aws::{Aws, AwsConfig};
use keyvault_proxy_backends::{SecretBackend, SecretData, Version};
use keyvault_tests::moto::Moto;
use keyvault_tests::server::{ServerOptions, TestServer, default_mounts_toml};
use keyvault_tests::{Reply, json};

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

fn config(moto: &Moto, key_file: &std::path::Path, prefix: &str) -> AwsConfig {
    AwsConfig {
        region: Some("us-east-1".into()),
        endpoint: Some(moto.endpoint.clone()),
        name_prefix: prefix.into(),
        access_key_id: Some("AKIDKEYVAULTTEST".into()),
        secret_access_key_file: Some(key_file.to_owned()),
        profile: None,
        role_arn: None,
        web_identity_token_file: None,
        sts_endpoint: None,
        recovery_window_days: 7,
        ca_file: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_adapter_passes_the_conformance_suite() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("aws-secret");
    std::fs::write(&key, "test-secret-access-key\n").unwrap();
    let aws = Aws::new(config(&moto, &key, "")).unwrap();
    keyvault_proxy_backends::conformance::run(&aws, "conf-aws").await;
    // With a name prefix, the mount sees only its part of the account.
    let scoped = Aws::new(config(&moto, &key, "team-a/")).unwrap();
    keyvault_proxy_backends::conformance::run(&scoped, "conf").await;
    assert_eq!(scoped.list("").await.unwrap(), vec!["conf/".to_owned()]);
}

/// moto, started, and a file with the access key's secret (the directory holds it).
fn moto_and_key() -> (Moto, tempfile::TempDir, std::path::PathBuf) {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("aws-secret");
    std::fs::write(&key, "test-secret-access-key").unwrap();
    (moto, dir, key)
}

/// A server whose mount `cloud/` is the moto account's `prod/` names (no cache, one try).
fn server_with_cloud(moto: &Moto, key: &std::path::Path) -> TestServer {
    let mounts = format!(
        "[[mounts]]\npath = \"cloud\"\ntype = \"aws\"\n[mounts.options]\nregion = \"us-east-1\"\nendpoint = \"{}\"\n\
         name_prefix = \"prod/\"\naccess_key_id = \"AKIDKEYVAULTTEST\"\nsecret_access_key_file = \"{}\"\n\
         [mounts.options.cache]\nttl = 0\n[mounts.options.resilience]\nattempts = 1\ntimeout = \"2s\"\n",
        moto.endpoint,
        key.display()
    );
    TestServer::start(ServerOptions { extra: format!("{}{mounts}", default_mounts_toml()), ..Default::default() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_reads_secrets_kept_in_aws_through_keyvault() {
    let (mut moto, _dir, key) = moto_and_key();
    // Secrets put there by another tool (the adapter, used here as a plain client).
    let aws = Aws::new(config(&moto, &key, "prod/")).unwrap();
    aws.write("db", &SecretData::from_fields([("username", "app"), ("password", "aws-pass-1")]), None).await.unwrap();
    let first = aws.read("db", &Version::Latest).await.unwrap().version_id.unwrap();
    aws.write("db", &SecretData::from_fields([("username", "app"), ("password", "aws-pass-2")]), None).await.unwrap();
    aws.write("plain", &SecretData::from_fields([("value", "just-a-string")]), None).await.unwrap();

    let s = server_with_cloud(&moto, &key);
    let c = s.client();
    let root = s.root.clone();
    let policy = "path \"cloud/*\" { capabilities = [\"read\", \"list\"] }";
    ok(c.put("sys/policies/acl/unit", &root, json!({ "policy": policy })).await, 204);
    let b = ok(c.post("auth/bootstrap/token", Some(&root), json!({"policies": ["unit"]})).await, 200);
    let bt = b.body["data"]["bootstrap_token"].as_str().unwrap().to_owned();
    let t = ok(c.post("auth/bootstrap/login", None, json!({ "token": bt })).await, 200).body["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_owned();

    // JSON secrets map to fields; plain strings to `value`.
    let r = ok(c.get("cloud/db", &t).await, 200);
    assert_eq!(r.body["data"], json!({"username": "app", "password": "aws-pass-2"}));
    assert_eq!(ok(c.get("cloud/plain", &t).await, 200).body["data"]["value"], "just-a-string");
    // Stages and version ids.
    let r = ok(c.get("cloud/db?version_stage=AWSPREVIOUS", &t).await, 200);
    assert_eq!(r.body["data"]["password"], "aws-pass-1");
    let r = ok(c.get(&format!("cloud/db?version_id={first}"), &t).await, 200);
    assert_eq!(r.body["data"]["password"], "aws-pass-1");
    ok(c.get("cloud/db?version=1", &t).await, 400);
    ok(c.get("cloud/db?version_id=a&version_stage=b", &t).await, 400);
    let l = ok(c.send("LIST", "cloud", Some(&t), None).await, 200);
    assert_eq!(l.body["data"]["keys"], json!(["db", "plain"]));
    ok(c.get("cloud/missing", &t).await, 404);
    // Policies hold: the unit cannot write.
    ok(c.put("cloud/db", &t, json!({"password": "x"})).await, 403);
    // Writes go through (a plain `value` stays a plain string in AWS).
    ok(c.put("cloud/new", &root, json!({"value": "written-through"})).await, 200);
    let v = aws.read("new", &Version::Latest).await.unwrap();
    assert_eq!(v.data.field("value").unwrap().as_str(), "written-through");

    // Down: 503 with a summary, never the credentials.
    moto.stop();
    let r = ok(c.get("cloud/db", &t).await, 503);
    let msg = r.body["errors"][0].as_str().unwrap();
    assert!(msg.starts_with("upstream unavailable: AWS GetSecretValue: cannot connect"), "{msg}");
    let log = s.log_text();
    for leaked in ["test-secret-access-key", "aws-pass-1", "aws-pass-2", "just-a-string"] {
        assert!(!log.contains(leaked) && !msg.contains(leaked), "{leaked} leaked");
    }
}

/// Web identity: no keys configured, a role and an identity token file; STS (moto's)
/// gives the keys, which sign the calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_identity_credentials_are_assumed_from_sts() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("web-identity-token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJrZXl2YXVsdCJ9.c2ln").unwrap();
    let mounts = format!(
        "[[mounts]]\npath = \"cloud\"\ntype = \"aws\"\n[mounts.options]\nregion = \"us-east-1\"\nendpoint = \"{e}\"\n\
         sts_endpoint = \"{e}\"\nrole_arn = \"arn:aws:iam::123456789012:role/keyvault\"\nweb_identity_token_file = \"{}\"\n",
        token.display(),
        e = moto.endpoint,
    );
    let s =
        TestServer::start(ServerOptions { extra: format!("{}{mounts}", default_mounts_toml()), ..Default::default() });
    let c = s.client();
    let root = s.root.clone();
    ok(c.put("cloud/by-web-identity", &root, json!({"value": "assumed"})).await, 200);
    assert_eq!(ok(c.get("cloud/by-web-identity", &root).await, 200).body["data"]["value"], "assumed");
    let log = s.log_text();
    assert!(log.contains("AWS credentials from web identity"), "{log}");
    assert!(!log.contains("eyJzdWIiOiJrZXl2YXVsdCJ9"), "the identity token is in the log");
}

/// A write to a secret deleted within its recovery window restores it first. A write AWS
/// would refuse (a value over its 65,536 bytes) is refused before that restore: before,
/// the restore stayed and the deleted (perhaps leaked) value was current again, though
/// the writer was told its write failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_does_not_bring_a_deleted_secret_back() {
    let (moto, _dir, key) = moto_and_key();
    let aws = Aws::new(config(&moto, &key, "")).unwrap();
    aws.write("gone", &SecretData::from_fields([("value", "leaked-credential")]), None).await.unwrap();
    aws.delete("gone").await.unwrap();
    let big = "x".repeat(70_000);
    let e = aws.write("gone", &SecretData::from_fields([("value", big.as_str())]), None).await.unwrap_err();
    assert!(e.to_string().contains("at most 65536 bytes"), "{e}");
    let r = aws.read("gone", &Version::Latest).await;
    assert!(
        r.is_err(),
        "the deleted secret is readable again: {:?}",
        r.map(|v| v.data.field("value").map(|f| f.as_str().len()))
    );
    // A write that fits restores it with the new value.
    aws.write("gone", &SecretData::from_fields([("value", "rotated")]), None).await.unwrap();
    assert_eq!(aws.read("gone", &Version::Latest).await.unwrap().data.field("value").unwrap().as_str(), "rotated");
}

/// `keyvault operator migrate` with the root token: success and its stdout, or failure
/// and its stderr.
fn migrate(s: &TestServer, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(keyvault_tests::keyvault_bin())
        .args(["operator", "migrate", "--address", &s.addr, "--ca-file"])
        .arg(&s.server_ca_file)
        .args(args)
        .env("KEYVAULT_TOKEN", &s.root)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
    if out.status.success() { Ok(text(&out.stdout)) } else { Err(text(&out.stderr)) }
}

/// What a migration must not copy: a destination secret that holds another value (someone
/// wrote it there; copying would put the older value back) is left alone and named, and
/// the run fails, unless `--overwrite`; a folder inside a mount is not a mount; an
/// upstream name with `..` in it (a valid AWS name) is not listed, so nothing is read or
/// written at the path it would resolve to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_leaves_alone_what_it_must_not_copy() {
    let (moto, _dir, key) = moto_and_key();
    let aws = Aws::new(config(&moto, &key, "prod/")).unwrap();
    aws.write("mig/ok", &SecretData::from_fields([("value", "from-aws")]), None).await.unwrap();
    aws.write("mig/../escape", &SecretData::from_fields([("value", "steered")]), None).await.unwrap();
    let s = server_with_cloud(&moto, &key);
    let (c, root) = (s.client(), s.root.clone());

    ok(c.put("secret/mig/a", &root, json!({"v": "old"})).await, 200);
    ok(c.put("secret/mig/b", &root, json!({"v": "b"})).await, 200);
    ok(c.put("kv/data/mig/a", &root, json!({"data": {"v": "newer"}})).await, 200);
    // Deleted at the destination (its latest version): not new there either.
    ok(c.put("secret/mig/c", &root, json!({"v": "c"})).await, 200);
    ok(c.put("kv/data/mig/c", &root, json!({"data": {"v": "deleted-there"}})).await, 200);
    ok(c.send("DELETE", "kv/data/mig/c", Some(&root), None).await, 204);
    let err = migrate(&s, &["--from", "secret", "--to", "kv", "--prefix", "mig"]).unwrap_err();
    assert!(
        err.contains(
            "2 secrets hold another value at kv and were left alone (--overwrite copies over them): mig/a, mig/c"
        ),
        "{err}"
    );
    ok(c.get("kv/data/mig/c", &root).await, 404);
    let v = |r: Reply| r.body["data"]["data"]["v"].clone();
    assert_eq!(v(ok(c.get("kv/data/mig/a", &root).await, 200)), "newer");
    assert_eq!(v(ok(c.get("kv/data/mig/b", &root).await, 200)), "b", "the rest is copied");
    let out = migrate(&s, &["--from", "secret", "--to", "kv", "--prefix", "mig", "--overwrite"]).unwrap();
    assert_eq!(out, "copied 2 secrets from secret to kv; 1 already equal");
    assert_eq!(v(ok(c.get("kv/data/mig/a", &root).await, 200)), "old");
    assert_eq!(v(ok(c.get("kv/data/mig/c", &root).await, 200)), "c");

    let err = migrate(&s, &["--from", "kv/mig", "--to", "secret"]).unwrap_err();
    assert!(err.contains("is inside the mount kv/"), "{err}");

    let l = ok(c.send("LIST", "cloud/mig", Some(&root), None).await, 200);
    assert_eq!(l.body["data"]["keys"], json!(["ok"]), "the `..` folder is not listed");
    let out = migrate(&s, &["--from", "cloud", "--to", "kv", "--prefix", "mig"]).unwrap();
    assert_eq!(out, "copied 1 secrets from cloud to kv; 0 already equal");
    assert_eq!(ok(c.get("kv/data/mig/ok", &root).await, 200).body["data"]["data"]["value"], "from-aws");
    ok(c.get("kv/data/escape", &root).await, 404);
    ok(c.get("kv/data/mig/escape", &root).await, 404);
}
