//! An endpoint's id is derived from its user's name and a nonce (`ztm_proto::wire::endpoint_id`),
//! so hubs can tell that an id belongs to the user registering it: no other user can ever hold
//! it. This module decides when a mesh needs a new id: when it has none, when its id was chosen
//! before ids were derived, and when the certificate changed to another user.

use ztm_proto::wire::{endpoint_id, id_belongs_to, new_id_nonce};

use crate::store::MeshRecord;

/// Whether `record`'s endpoint id is derived from `user`.
pub fn is_bound(record: &MeshRecord, user: &str) -> bool {
    id_belongs_to(&record.endpoint_id, user, &record.id_nonce)
}

/// Gives `record` an endpoint id derived from `user` with a fresh nonce, unless its id already
/// is: the id it had, if it changed.
pub fn bind(record: &mut MeshRecord, user: &str) -> Option<String> {
    if is_bound(record, user) {
        return None;
    }
    let nonce = new_id_nonce();
    let old = std::mem::replace(&mut record.endpoint_id, endpoint_id(user, &nonce));
    record.id_nonce = nonce;
    Some(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, nonce: &str) -> MeshRecord {
        MeshRecord {
            name: "m".into(),
            ca: String::new(),
            cert: String::new(),
            key: String::new(),
            agent_name: "a".into(),
            endpoint_id: id.into(),
            id_nonce: nonce.into(),
            bootstraps: vec![],
        }
    }

    #[test]
    fn ids_are_derived_once_and_again_for_another_user() {
        let nonce = "0123456789abcdef0123456789abcdef";
        let alices = endpoint_id("alice", nonce);
        // (id, nonce, user, changes)
        for (id, n, user, changes) in [
            (alices.as_str(), nonce, "alice", false),
            // The certificate now belongs to bob: the id must be his.
            (alices.as_str(), nonce, "bob", true),
            // Chosen at random before ids were derived.
            ("0b1c2d3e-4f50-4617-8829-3a4b5c6d7e8f", "", "alice", true),
            // A new mesh has none yet.
            ("", "", "alice", true),
            // A nonce that does not give this id.
            (
                alices.as_str(),
                "00000000000000000000000000000000",
                "alice",
                true,
            ),
        ] {
            let mut r = record(id, n);
            let old = bind(&mut r, user);
            assert_eq!(old.is_some(), changes, "{id} {n} {user}");
            assert!(is_bound(&r, user), "{r:?}");
            if changes {
                assert_eq!(old.as_deref(), Some(id));
                assert_ne!(r.endpoint_id, id);
            } else {
                assert_eq!((r.endpoint_id.as_str(), r.id_nonce.as_str()), (id, n));
            }
        }
    }
}
