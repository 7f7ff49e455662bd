//! The conformance suite: what every [`SecretBackend`] must do, run by the tests against
//! each adapter on a real upstream, and against KeyVault's own KV engines (seen through
//! the `hashicorp` adapter: KeyVault speaks Vault's API). Each check panics with what
//! went wrong.

use crate::{BackendError, SecretBackend, SecretData, Version};

fn fields(pairs: &[(&str, &str)]) -> SecretData {
    SecretData::from_fields(pairs.iter().copied())
}

/// Run every check under `prefix` (a folder no one else uses, e.g. a random name).
pub async fn run(b: &dyn SecretBackend, prefix: &str) {
    let caps = b.capabilities();
    let p = |name: &str| format!("{prefix}/{name}");

    // A missing secret is NotFound, not an error of another kind.
    let missing = b.read(&p("missing"), &Version::Latest).await;
    assert_eq!(missing, Err(BackendError::NotFound), "{}: reading a missing secret", b.kind());

    // Write, read back exactly (values with quotes, unicode, newlines).
    let first = fields(&[("password", "s3cr\"et\n\u{e9}\u{1f511}"), ("user", "app")]);
    let v1 = b.write(&p("db"), &first, None).await.unwrap_or_else(|e| panic!("{}: first write: {e}", b.kind()));
    let got =
        b.read(&p("db"), &Version::Latest).await.unwrap_or_else(|e| panic!("{}: read after write: {e}", b.kind()));
    assert_eq!(
        got.data.field("password").as_deref().map(String::as_str),
        Some("s3cr\"et\n\u{e9}\u{1f511}"),
        "{}: the value read back",
        b.kind()
    );
    assert_eq!(got.data.field("user").as_deref().map(String::as_str), Some("app"));
    if caps.versions {
        assert_eq!(got.version, v1, "{}: the version written is the version read", b.kind());
        assert!(v1.is_some(), "{}: a versioned backend names the version written", b.kind());
    }

    // A second write replaces it; a versioned backend keeps the first.
    let second = fields(&[("password", "two")]);
    let v2 = b.write(&p("db"), &second, None).await.unwrap_or_else(|e| panic!("{}: second write: {e}", b.kind()));
    let got = b.read(&p("db"), &Version::Latest).await.unwrap_or_else(|e| panic!("{}: read: {e}", b.kind()));
    assert_eq!(got.data.field("password").as_deref().map(String::as_str), Some("two"));
    assert_eq!(got.data.field("user"), None, "{}: a write replaces every field", b.kind());
    if caps.versions {
        let (v1, v2) = (v1.unwrap_or_default(), v2.unwrap_or_default());
        assert_eq!(v2, v1 + 1, "{}: versions count up", b.kind());
        let old =
            b.read(&p("db"), &Version::Number(v1)).await.unwrap_or_else(|e| panic!("{}: read v{v1}: {e}", b.kind()));
        assert_eq!(old.data.field("user").as_deref().map(String::as_str), Some("app"));
        assert_eq!(
            b.read(&p("db"), &Version::Number(v2 + 10)).await,
            Err(BackendError::NotFound),
            "a version never written"
        );
        // Check-and-set: a write expecting an older version loses.
        let lost = b.write(&p("db"), &fields(&[("password", "late")]), Some(v1)).await;
        assert!(matches!(lost, Err(BackendError::Conflict(_))), "{}: a stale check-and-set: {lost:?}", b.kind());
        let created = b.write(&p("db"), &fields(&[("password", "x")]), Some(0)).await;
        assert!(matches!(created, Err(BackendError::Conflict(_))), "{}: create-only on an existing secret", b.kind());
    } else {
        let r = b.read(&p("db"), &Version::Number(1)).await;
        assert!(
            matches!(r, Err(BackendError::Unsupported(_))),
            "{}: a version read on a backend without numbered versions says so: {r:?}",
            b.kind()
        );
    }

    // Listing: names and folders under the prefix.
    if caps.list {
        b.write(&p("folder/inner"), &fields(&[("k", "v")]), None)
            .await
            .unwrap_or_else(|e| panic!("{}: nested write: {e}", b.kind()));
        let mut names = b.list(prefix).await.unwrap_or_else(|e| panic!("{}: list: {e}", b.kind()));
        names.sort();
        assert_eq!(names, vec!["db".to_owned(), "folder/".to_owned()], "{}: list", b.kind());
        let inner = b.list(&p("folder")).await.unwrap_or_else(|e| panic!("{}: list folder: {e}", b.kind()));
        assert_eq!(inner, vec!["inner".to_owned()]);
        assert_eq!(b.list(&p("nothing-here")).await, Ok(Vec::new()), "{}: an empty folder", b.kind());
    }

    // Delete: the secret reads as missing after.
    if caps.deletes {
        b.delete(&p("db")).await.unwrap_or_else(|e| panic!("{}: delete: {e}", b.kind()));
        assert_eq!(
            b.read(&p("db"), &Version::Latest).await,
            Err(BackendError::NotFound),
            "{}: read after delete",
            b.kind()
        );
        b.delete(&p("never-written")).await.unwrap_or_else(|e| panic!("{}: deleting a missing secret: {e}", b.kind()));
        // Written again after a delete: readable again.
        b.write(&p("db"), &fields(&[("password", "again")]), None)
            .await
            .unwrap_or_else(|e| panic!("{}: a write after a delete: {e}", b.kind()));
        let got = b.read(&p("db"), &Version::Latest).await.unwrap_or_else(|e| panic!("{}: read: {e}", b.kind()));
        assert_eq!(got.data.field("password").as_deref().map(String::as_str), Some("again"));
    }
}
