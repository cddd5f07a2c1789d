//! The hub's view of the CA: its certificate at start, revocations while running.

use std::time::Duration;

use anyhow::{bail, Result};
use bytes::Bytes;
use ztm_net::http1;
use ztm_proto::model::RevocationFeed;

const CA_TIMEOUT: Duration = Duration::from_secs(10);

pub struct CaClient {
    pub addr: String,
    pub token: Option<String>,
}

impl CaClient {
    async fn call(&self, method: &str, path: &str, body: Bytes) -> Result<Bytes> {
        let reply = http1::request(
            &self.addr,
            method,
            path,
            self.token.as_deref(),
            Some("text/plain"),
            body,
            CA_TIMEOUT,
        )
        .await?;
        if reply.status != 200 {
            bail!(
                "CA at {} answered {} to {method} {path}: {}",
                self.addr,
                reply.status,
                reply.text().trim()
            );
        }
        Ok(reply.body)
    }

    pub async fn ca_certificate(&self) -> Result<String> {
        let body = self
            .call("GET", "/api/certificates/ca", Bytes::new())
            .await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Has the CA sign `public_key_pem` for hub `name` with the given SANs.
    pub async fn sign_hub(
        &self,
        name: &str,
        public_key_pem: &str,
        sans: &[String],
    ) -> Result<String> {
        let path = format!("/api/sign/hub/{name}?names={}", sans.join(","));
        let body = self
            .call("POST", &path, Bytes::from(public_key_pem.to_string()))
            .await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    pub async fn revocations(&self, since: i64) -> Result<RevocationFeed> {
        let body = self
            .call(
                "GET",
                &format!("/api/revocations?since={since}"),
                Bytes::new(),
            )
            .await?;
        Ok(serde_json::from_slice(&body)?)
    }
}
