//! The mesh CA's CRL, as the agent keeps it: every hub link asks its hub for it (at once after
//! registering, then waiting for a newer one, at least once a minute), the agent checks the
//! CA's signature itself, keeps the newest one of each mesh (shared by all the mesh's links, so
//! a hub is refused as soon as any other hub passes the news on), and stores it so that a
//! restart keeps it. Hubs the CRL lists are refused in the TLS handshake, and links to them
//! are closed (`session.rs`, which also follows the CRL on each link).

use ztm_pki::CrlSlot;

use crate::store::{MeshRecord, Store};

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
