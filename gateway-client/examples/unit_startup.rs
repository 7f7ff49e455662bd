//! A unit fetching its database password at start-up over mutual TLS.
//!
//! ```sh
//! KEYVAULT_ADDR=https://keyvault.internal:8200 KEYVAULT_CACERT=/etc/keyvault/ca.pem \
//! KEYVAULT_CLIENT_CERT=/etc/unit/cert.pem KEYVAULT_CLIENT_KEY=/etc/unit/key.pem \
//! ROLE_ID=... SECRET_ID_FILE=/run/secrets/secret-id \
//!     cargo run -p keyvault-client --example unit_startup
//! ```

use keyvault_client::{Auth, ClientBuilder, ExposeSecret};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let role_id = std::env::var("ROLE_ID")?;
    let secret_id_file = std::env::var("SECRET_ID_FILE")?;
    // Address, CA and client certificate from the environment, as Vault's tools read them.
    let client = ClientBuilder::from_env().auth(Auth::approle_file(role_id, secret_id_file)).build()?;
    // Everything the unit needs, at once: all of it, or an error naming what failed.
    let [db_password, api_key] = <[_; 2]>::try_from(client.fetch_all(&["secret/app/db", "kv/app/api-key"]).await?)
        .map_err(|_| "two values expected")?;
    println!("fetched {} and {} bytes", db_password.expose_secret().len(), api_key.expose_secret().len());
    Ok(())
}
