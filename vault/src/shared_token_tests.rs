//! Two processes sharing one SoftHSM token, as replicas do: a key one process has just
//! made is used at once, even when SoftHSM shows it twice (docs/architecture.md: a lookup
//! that finds a label on several objects re-initialises the module and looks again).
//!
//! The test runs two children of this test binary, started at once: one makes and destroys
//! keys in a loop (the other replica), the other makes keys and uses each at once through
//! the metered key store, with two threads looking keys up meanwhile (what makes SoftHSM
//! index the token directory while a key is being made). Each reads its own child's
//! output.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyvault_hsm::{HsmError, KeyKind, KeyLabel, KeyStore, PinSource, Pkcs11Config, Pkcs11KeyStore};

const TOKEN: &str = "KEYVAULT_TEST_SHARED_TOKEN";
const PIN_FILE: &str = "KEYVAULT_TEST_SHARED_PIN_FILE";
const SECS: &str = "KEYVAULT_TEST_SHARED_SECS";

fn label(s: &str) -> KeyLabel {
    KeyLabel::new(s).unwrap()
}

/// The token the parent made, opened in a child; `None` when run on its own.
fn child_store() -> Option<(Arc<Pkcs11KeyStore>, Instant)> {
    let (Ok(token), Ok(pin_file), Ok(secs)) = (std::env::var(TOKEN), std::env::var(PIN_FILE), std::env::var(SECS))
    else {
        return None;
    };
    let pin = PinSource::File(pin_file.into()).read().unwrap();
    let module = keyvault_hsm::softhsm::find_module().unwrap();
    let mut config = Pkcs11Config::new(module, token, pin);
    // The child process opens this one token only, as the server does.
    config.alone_in_process = true;
    let store = Pkcs11KeyStore::open(&config).unwrap();
    Some((store, Instant::now() + Duration::from_secs(secs.parse().unwrap())))
}

#[test]
#[ignore = "a helper that the test below runs in a child process"]
fn child_churns_keys() {
    let Some((store, until)) = child_store() else { return };
    let mut n = 0u64;
    while Instant::now() < until {
        let l = label(&format!("keyvault/churn/v{n}"));
        // SoftHSM now and then fails a generation while the other process writes the
        // token directory; the other replica would answer that request 500 and go on.
        if store.generate(&l, KeyKind::Aes256Gcm).is_ok() {
            let _ = store.destroy(&l);
        }
        n += 1;
    }
    println!("churned {n} keys");
}

/// A child's output, waiting at most a minute for it to end (each runs for seconds).
fn output_of(child: std::process::Child) -> std::process::Output {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("a child process did not end within a minute").unwrap()
}

#[test]
#[ignore = "a helper that the test below runs in a child process"]
fn child_uses_fresh_keys() {
    let Some((pkcs11, until)) = child_store() else { return };
    // The key store's warnings (retried generations, re-initialisations), for the parent
    // to count.
    let _ = tracing_subscriber::fmt().with_writer(std::io::stdout).with_ansi(false).try_init();
    let raw: Arc<dyn KeyStore> = pkcs11.clone();
    let keys = Arc::new(crate::metrics::MeteredKeyStore::new(raw.clone()));
    // The key the lookers look up; its generation may fail under the other process's
    // writes like any other (then again: each call cleans up after itself).
    let master = label("keyvault/master/v1");
    let made = (0..8).any(|_| matches!(keys.generate(&master, KeyKind::Aes256), Ok(()) | Err(HsmError::KeyExists(_))));
    assert!(made, "the lookers' key could not be made in 8 tries");
    let lookers: Vec<_> = (0..2)
        .map(|_| {
            let keys = keys.clone();
            std::thread::spawn(move || {
                let m = label("keyvault/master/v1");
                while Instant::now() < until {
                    keys.exists(&m).unwrap();
                }
            })
        })
        .collect();
    let (mut used, mut shown_twice, mut not_shown, mut generation_failed) = (0u64, 0u64, 0u64, 0u64);
    let mut adopted = 0u64;
    while Instant::now() < until {
        let l = label(&format!("keyvault/fresh/v{}", used + generation_failed));
        match keys.generate(&l, KeyKind::Aes256Gcm) {
            Ok(()) => {}
            // Made, then shown twice: looked at again after a re-initialisation, it is one
            // whole key, which the caller (holding the label's claim) adopts.
            Err(HsmError::KeyExists(_)) => adopted += 1,
            Err(e) => {
                println!("generation failed: {e}");
                generation_failed += 1;
                continue;
            }
        }
        // The store itself (inside the token gate, as every call is): does SoftHSM show
        // the new key once?
        let direct = {
            let _inside = crate::token_gate::enter();
            raw.encrypt_aes_gcm(&l, b"x", b"")
        };
        match direct {
            Ok(_) => {}
            Err(HsmError::DuplicateLabel(_)) => shown_twice += 1,
            Err(HsmError::KeyNotFound(_)) => not_shown += 1,
            Err(e) => panic!("{l}: {e}"),
        }
        // Through the metered store the key is used, shown twice or not.
        let ct = keys.encrypt_aes_gcm(&l, b"fresh", b"aad").unwrap_or_else(|e| panic!("{l}: {e}"));
        assert_eq!(keys.decrypt_aes_gcm(&l, &ct, b"aad").unwrap().as_slice(), b"fresh");
        used += 1;
    }
    for h in lookers {
        h.join().unwrap();
    }
    assert!(used > 0, "no fresh key was made and used in the run");
    // No object under a label made here is left unprotected (a key SoftHSM stored with
    // CKA_SENSITIVE false is destroyed when generated): each is a sensitive, unextractable
    // token object, or this process's sensitive session copy of one.
    let _inside = crate::token_gate::enter();
    for n in 0..used + generation_failed {
        for o in pkcs11.protection(&label(&format!("keyvault/fresh/v{n}"))).unwrap() {
            assert!(o.sensitive && !o.extractable && o.wrap_refused, "keyvault/fresh/v{n}: {o:?}");
        }
    }
    println!(
        "used {used} fresh keys ({shown_twice} shown twice and {not_shown} not shown by the token at first, {adopted} adopted after a second look), {generation_failed} generations failed"
    );
}

#[test]
fn a_key_made_while_another_process_changes_the_token_is_used_at_once() {
    use secrecy::ExposeSecret;
    let token = keyvault_hsm::softhsm::testing::token_config();
    let dir = tempfile::tempdir().unwrap();
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, token.pin.expose_secret()).unwrap();
    std::fs::set_permissions(&pin_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let child = |name: &str| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(TOKEN, &token.token_label)
            .env(PIN_FILE, &pin_file)
            .env(SECS, "4")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Both start at once: SoftHSM does not always find a token when two processes
    // initialise at the same moment, which `alone_in_process` makes good.
    let churn = child("shared_token_tests::child_churns_keys");
    let user = child("shared_token_tests::child_uses_fresh_keys");
    let (user, churn) = (output_of(user), output_of(churn));
    let text = |o: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    };
    let (user_out, churn_out) = (text(&user), text(&churn));
    assert!(churn.status.success() && churn_out.contains("1 passed"), "churn: {churn_out}");
    assert!(user.status.success() && user_out.contains("1 passed"), "user: {user_out}");
    let summary = |out: &str, word: &str| {
        let line = out.lines().find(|l| l.contains(word)).unwrap_or_default();
        line.rsplit("... ").next().unwrap_or_default().to_owned()
    };
    let count = |what: &str| user_out.matches(what).count();
    println!(
        "{}; {}; in the user: {} generations failed and retried, {} keys stored wrongly and made again, {} re-initialisations",
        summary(&user_out, "used "),
        summary(&churn_out, "churned"),
        count("key generation failed; cleaning up"),
        count("did not store the new key as it was made"),
        count("PKCS#11 module re-initialised"),
    );
}
