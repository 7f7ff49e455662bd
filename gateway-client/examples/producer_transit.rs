//! A producer signing its requests through KeyVault's transit engine: the Ed25519 key is
//! generated and kept in the HSM (the producer is registered with `transit_key`).
//!
//! ```sh
//! KEYVAULT_ADDR=... KEYVAULT_CACERT=... KEYVAULT_CLIENT_CERT=... KEYVAULT_CLIENT_KEY=... \
//! CERT_SHA256=<hex of the client certificate> GATEWAY=http://127.0.0.1:8080/telemetry \
//!     cargo run -p keyvault-client --example producer_transit
//! ```

use keyvault_client::producer::Signer;
use keyvault_client::{Auth, ClientBuilder};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Logs in with its client certificate; its token needs `sign` on transit/keys/sensor-1.
    let client = ClientBuilder::from_env().auth(Auth::cert(Some("sensor-1"))).build()?;
    let signer = Signer::transit("sensor-1", std::env::var("CERT_SHA256")?, client, "sensor-1");
    let body = br#"{"tenant_id":"t-1","operator_id":"op-001","campaign_id":"c-1","reading":21.5,"signed_metadata":{"tenant_id":"t-1","operator_id":"op-001","campaign_id":"c-1"}}"#;
    let http = reqwest::Client::new();
    let request = signer.sign_reqwest(http.post(std::env::var("GATEWAY")?), body.to_vec()).await?;
    let reply = request.send().await?;
    println!("{}: {}", reply.status(), reply.text().await?);
    Ok(())
}
