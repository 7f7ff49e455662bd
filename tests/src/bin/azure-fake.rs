//! The fake of Azure Key Vault's secrets API and Entra ID's token endpoint
//! (tests/src/azure_fake.rs) as a process, for `scripts/bench-proxy.sh`:
//!
//!     azure-fake <dir>
//!
//! writes `<dir>/azure.toml` (the `[mounts.options]` lines of an `azure` mount but the
//! vault URL, which is the same as `authority_host`) and `<dir>/client-secret`, then
//! serves until killed.

use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let Some(dir) = std::env::args_os().nth(1).map(std::path::PathBuf::from) else {
        eprintln!("usage: azure-fake <dir>");
        std::process::exit(2);
    };
    let fake = keyvault_tests::azure_fake::FakeAzure::start(Duration::from_secs(3600)).await;
    let secret = dir.join("client-secret");
    std::fs::write(&secret, &fake.client_secret).expect("writing the client secret");
    let options = format!(
        "vault_url = \"{url}\"\ntenant_id = \"{}\"\nclient_id = \"{}\"\nclient_secret_file = \"{}\"\nauthority_host = \"{url}\"\n",
        fake.tenant,
        fake.client_id,
        secret.display(),
        url = fake.url,
    );
    // Written last, in one rename: its presence means ready.
    let tmp = dir.join("azure.toml.tmp");
    std::fs::write(&tmp, options).expect("writing azure.toml");
    std::fs::rename(&tmp, dir.join("azure.toml")).expect("writing azure.toml");
    std::future::pending::<()>().await;
}
