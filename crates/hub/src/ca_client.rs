//! The hub's view of the CA: its certificate at start, revocations while running.

use std::time::Duration;

use anyhow::{bail, Result};
use bytes::Bytes;
use ztm_net::http1;
use ztm_proto::model::RevocationFeed;

const CA_TIMEOUT: Duration = Duration::from_secs(10);
/// Most pages of revocations read in one go (the CA's pages hold 1,000).
const MAX_PAGES: usize = 10_000;

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

    /// Every revocation after `since`: the CA answers a page at a time, so this asks again
    /// until a page comes back empty (a hub must know them all before it accepts anyone).
    pub async fn all_revocations(&self, since: i64) -> Result<RevocationFeed> {
        let mut all = RevocationFeed {
            last: since,
            revocations: Vec::new(),
        };
        for _ in 0..MAX_PAGES {
            let page = self.revocations(all.last).await?;
            if page.revocations.is_empty() || page.last <= all.last {
                return Ok(all);
            }
            all.last = page.last;
            all.revocations.extend(page.revocations);
        }
        bail!("the CA's revocation feed did not end after {MAX_PAGES} pages")
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;

    use super::*;

    /// A CA with more revocations than fit in one page of its feed: the hub must get them
    /// all, or certificates revoked after the first thousand would be let in.
    #[tokio::test]
    async fn reads_every_page_of_the_revocation_feed() {
        let dir = std::env::temp_dir().join(format!(
            "ztm-hub-feed-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = ztm_ca::CaStore::open(&dir.join("ca.db")).unwrap();
        let mut revoked = Vec::new();
        for i in 0..1_005 {
            let name = format!("u{i}");
            store.create_user(&name).unwrap();
            revoked.push(store.revoke(&name).unwrap());
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = listener.local_addr().unwrap();
        let state = Arc::new(ztm_ca::CaState {
            store,
            token: None,
            listen,
        });
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, ztm_ca::router(state)).await;
        });
        let ca = CaClient {
            addr: listen.to_string(),
            token: None,
        };

        let feed = ca.all_revocations(0).await.unwrap();
        let serials = |v: &[ztm_proto::model::Revocation]| -> HashSet<String> {
            v.iter().map(|r| r.serial.clone()).collect()
        };
        assert_eq!(feed.revocations.len(), revoked.len());
        assert_eq!(serials(&feed.revocations), serials(&revoked));
        assert_eq!(Some(feed.last), revoked.last().map(|r| r.seq));
        // Continuing from the middle gets the rest, and from the end nothing.
        let mid = revoked[499].seq;
        let rest = ca.all_revocations(mid).await.unwrap();
        assert_eq!(serials(&rest.revocations), serials(&revoked[500..]));
        let none = ca.all_revocations(feed.last).await.unwrap();
        assert!(none.revocations.is_empty());
        assert_eq!(none.last, feed.last);

        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
