//! The mesh CA's CRL, as the agent keeps it: every hub link asks its hub for it (at once after
//! registering, then waiting for a newer one, at least once a minute), the agent checks the
//! CA's signature itself, keeps the newest one of each mesh (shared by all the mesh's links, so
//! a hub is refused as soon as any other hub passes the news on), and stores it so that a
//! restart keeps it. Hubs the CRL lists are refused in the TLS handshake, and links to them
//! are closed (`session.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use ztm_net::h2io;
use ztm_pki::CrlSlot;

use crate::mesh::MeshRuntime;
use crate::store::{MeshRecord, Store};

/// Each hub link asks for the CRL at least this often.
pub const CRL_INTERVAL: Duration = Duration::from_secs(60);
/// A hub answers `GET /api/crl?after=N` within 50 s; this is how long the agent waits.
const CRL_REQUEST_TIMEOUT: Duration = Duration::from_secs(70);
/// Largest CRL read (about 40 bytes per revoked certificate).
const MAX_CRL: usize = 16 << 20;

/// Puts the stored CRL of `record`'s mesh into `slot`, if the mesh's CA signed it; one of
/// another CA (the mesh was joined again with a new CA) is forgotten.
pub fn load(store: &Store, record: &MeshRecord, slot: &CrlSlot) {
    let pem = match store.crl(&record.name) {
        Ok(Some(pem)) => pem,
        Ok(None) => return,
        Err(e) => {
            tracing::error!("mesh {}: cannot read its CRL: {e}", record.name);
            return;
        }
    };
    match ztm_pki::parse_crl(&record.ca, &pem) {
        Ok(crl) => {
            slot.offer(crl);
        }
        Err(e) => {
            tracing::info!(
                "mesh {}: the stored CRL is not this CA's ({e}); forgetting it",
                record.name
            );
            if let Err(e) = store.delete_crl(&record.name) {
                tracing::error!("mesh {}: cannot forget its CRL: {e}", record.name);
            }
        }
    }
}

/// Offers a CRL that hub `from` sent: kept, and stored, if the mesh's CA signed it and it is
/// newer than the one held. Whether it was kept.
pub fn offer(rt: &MeshRuntime, pem: &str, from: &str) -> Result<bool, ztm_pki::PkiError> {
    let crl = ztm_pki::parse_crl(&rt.record.ca, pem)?;
    let (number, len, pem) = (crl.number, crl.len(), crl.pem());
    if !rt.crl.offer(crl) {
        return Ok(false);
    }
    tracing::info!(
        "mesh {}: CRL number {number} from hub {from} ({len} revoked certificates)",
        rt.name()
    );
    if let Err(e) = rt.store.put_crl(rt.name(), number, &pem) {
        tracing::error!("mesh {}: cannot store the CRL: {e}", rt.name());
    }
    Ok(true)
}

/// Follows the CRL on one hub link (its control connection `sender`) until the link ends.
pub async fn follow(rt: Arc<MeshRuntime>, from: String, sender: h2::client::SendRequest<Bytes>) {
    let mut told_bad = false;
    loop {
        let started = Instant::now();
        let path = match rt.crl.number() {
            Some(n) => format!("/api/crl?after={n}"),
            None => "/api/crl".to_string(),
        };
        let Ok(req) = h2io::build(Method::GET, &path).and_then(|b| Ok(b.body(())?)) else {
            return;
        };
        let mut newer = false;
        match h2io::request(&sender, req, Bytes::new(), MAX_CRL, CRL_REQUEST_TIMEOUT).await {
            Ok(a) if a.status == StatusCode::OK => {
                match offer(&rt, &String::from_utf8_lossy(&a.body), &from) {
                    Ok(kept) => newer = kept,
                    Err(e) if !told_bad => {
                        told_bad = true;
                        rt.event(
                            "error",
                            &format!("hub {from} sent a CRL that is not the mesh CA's: {e}"),
                        );
                    }
                    Err(_) => {}
                }
            }
            // Nothing newer (204), or the hub has none yet: ask again later.
            Ok(_) => {}
            // The connection is gone; the link notices and dials again.
            Err(e) => {
                tracing::debug!("mesh {}: CRL from hub {from}: {e:#}", rt.name());
                if sender.clone().ready().await.is_err() {
                    return;
                }
            }
        }
        // A long wait that ended without news, or a newer CRL: ask again at once. An answer
        // that came back quickly without one: not before a minute has passed.
        let waited = started.elapsed();
        if !newer && waited < CRL_INTERVAL / 2 {
            tokio::time::sleep(CRL_INTERVAL - waited).await;
        }
    }
}
