//! A token that disappears under a running process. Its own test binary (process):

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]
//! SoftHSM stays broken for that token directory for the rest of the process.

use keyvault_hsm::softhsm::testing;
use keyvault_hsm::{KeyKind, KeyLabel, KeyStore};

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn a_token_that_goes_away_gives_unavailable_errors_not_panics() {
    let t = testing::token();
    let kek = KeyLabel::new("keyvault/master/v1").unwrap();
    t.store.generate(&kek, KeyKind::Aes256).unwrap();
    let wrapped = t.store.wrap_key(&kek, &[3u8; 32], b"").unwrap();
    // Find this token's directory (its token.object names the label).
    let label = t.config.token_label.as_bytes();
    let dirs: Vec<_> = std::fs::read_dir(testing::token_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::read(p.join("token.object")).is_ok_and(|b| b.windows(label.len()).any(|w| w == label)))
        .collect();
    assert_eq!(dirs.len(), 1, "found this test's token directory");
    let backup = tempfile::tempdir().unwrap();
    copy_dir(&dirs[0], backup.path());
    std::fs::remove_dir_all(&dirs[0]).unwrap();
    // The store's session copy of the key lives in the module, not in the directory: it
    // may serve until the store checks its original again (`COPY_RECHECK`), then no more.
    std::thread::sleep(keyvault_hsm::COPY_RECHECK + std::time::Duration::from_millis(100));

    let err = t.store.unwrap_key(&kek, &wrapped, b"").unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    let err = t.store.wrap_key(&kek, &[3u8; 32], b"").unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    let err = t.store.sign_ed25519(&KeyLabel::new("keyvault/token-signing/v1").unwrap(), b"m").unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");

    // Every later call keeps failing as unavailable (503 at the HTTP layer), never a panic:
    // SoftHSM 2.6 does not take back a token directory restored under a running process
    // (it refuses the login of the fresh session), so this process stays on "unavailable"
    // until it restarts. (Finding a key again by its label once a token or an object is
    // back is shown in `keys_are_found_by_label_after_reopen`.)
    copy_dir(backup.path(), &dirs[0]);
    for _ in 0..3 {
        let err = t.store.unwrap_key(&kek, &wrapped, b"").unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
    }
}
