//! A gateway (axum) that accepts only requests signed by registered producers, checked by
//! KeyVault through the verify layer (concurrent checks batched within 1 ms).
//!
//! ```sh
//! KEYVAULT_ADDR=... KEYVAULT_CACERT=... ROLE_ID=... SECRET_ID=... \
//!     cargo run -p keyvault-client --example gateway
//! ```

use axum::routing::post;
use axum::{Extension, Router};
use keyvault_client::gateway::{GatewayConfig, Verified, VerifyLayer};
use keyvault_client::{Auth, ClientBuilder};

async fn telemetry(Extension(producer): Extension<Verified>, body: axum::body::Bytes) -> String {
    format!("accepted {} bytes from {} (key {:?})\n", body.len(), producer.identity, producer.key_id)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The gateway's own token needs `verify` on `gateway/verify`.
    let client = ClientBuilder::from_env()
        .auth(Auth::approle(std::env::var("ROLE_ID")?, std::env::var("SECRET_ID")?))
        .build()?;
    let app =
        Router::new().route("/telemetry", post(telemetry)).layer(VerifyLayer::new(client, GatewayConfig::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    axum::serve(listener, app).await?;
    Ok(())
}
