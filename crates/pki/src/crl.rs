//! Certificate revocation lists: the CA signs one listing every serial it revoked (users and
//! hubs); hubs pass it on to agents, which check its signature themselves, keep the newest
//! one of each mesh and refuse hubs whose certificate it lists.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateRevocationListDer;
use tokio::sync::watch;

use crate::inspect::{hex, parse_cert};
use crate::issue::CaSigner;
use crate::PkiError;

/// A CRL of the mesh CA whose signature has been checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crl {
    der: Vec<u8>,
    /// The CRL number: it grows with every revocation at the CA.
    pub number: u64,
    /// When the CA made it (Unix seconds).
    pub this_update: i64,
    /// When the CA promises a newer one (Unix seconds).
    pub next_update: Option<i64>,
    serials: HashSet<String>,
}

impl Crl {
    /// Whether it lists `serial` (lower-case hex, as in [`crate::CertInfo`]).
    pub fn revokes(&self, serial: &str) -> bool {
        self.serials.contains(serial)
    }

    /// How many certificates it lists.
    pub fn len(&self) -> usize {
        self.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }

    /// The CRL as PEM, made from the signed bytes only (whatever text surrounded it when it
    /// was received is not kept).
    pub fn pem(&self) -> String {
        let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
        pem::encode_config(&pem::Pem::new("X509 CRL", self.der.clone()), config)
    }
}

fn bad(what: &'static str) -> PkiError {
    PkiError::BadCrl(what)
}

/// Parses a PEM CRL and checks that the CA in `ca_pem` signed it.
pub fn parse_crl(ca_pem: &str, crl_pem: &str) -> Result<Crl, PkiError> {
    let der = CertificateRevocationListDer::from_pem_slice(crl_pem.as_bytes())
        .map_err(|_| bad("the text is not a PEM CRL"))?;
    let ca = parse_cert(ca_pem, "ca")?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca.as_ref())
        .map_err(|_| PkiError::BadCertificate("ca"))?;
    let (rest, crl) =
        x509_parser::parse_x509_crl(der.as_ref()).map_err(|_| bad("the CRL cannot be parsed"))?;
    if !rest.is_empty() {
        return Err(bad("the CRL has bytes after its end"));
    }
    if crl.issuer().as_raw() != ca.subject().as_raw() {
        return Err(PkiError::NotSignedByCa);
    }
    crl.verify_signature(ca.public_key())
        .map_err(|_| PkiError::NotSignedByCa)?;
    let number = crl.crl_number().ok_or(bad("the CRL has no number"))?;
    let number = match number.to_u64_digits().as_slice() {
        [] => 0,
        [n] => *n,
        _ => return Err(bad("the CRL number is too large")),
    };
    let serials = crl
        .iter_revoked_certificates()
        .map(|r| hex(r.raw_serial()))
        .collect();
    Ok(Crl {
        der: der.as_ref().to_vec(),
        number,
        this_update: crl.last_update().timestamp(),
        next_update: crl.next_update().map(|t| t.timestamp()),
        serials,
    })
}

impl CaSigner {
    /// Signs a CRL numbered `number` listing `revoked` (serial as lower-case hex, revocation
    /// time in Unix seconds), valid for `validity` from now on.
    pub fn crl(
        &self,
        revoked: &[(String, i64)],
        number: u64,
        validity: std::time::Duration,
    ) -> Result<String, PkiError> {
        let now = time::OffsetDateTime::now_utc();
        let validity =
            time::Duration::seconds(i64::try_from(validity.as_secs()).unwrap_or(1).max(1));
        let revoked_certs = revoked
            .iter()
            .map(|(serial, at)| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&unhex(serial)?),
                    revocation_time: time::OffsetDateTime::from_unix_timestamp(*at).unwrap_or(now),
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + validity,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(self.issuer())?.pem()?)
    }
}

fn unhex(s: &str) -> Result<Vec<u8>, PkiError> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return Err(bad("a revoked serial is not hex"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
                .ok_or(bad("a revoked serial is not hex"))
        })
        .collect()
}

/// The newest CRL known, shared by everything that checks certificates against it (the
/// verifiers of one mesh's connections, a hub's CRL service) and watched by those that act on
/// a new one.
#[derive(Clone, Debug)]
pub struct CrlSlot {
    tx: Arc<watch::Sender<Option<Arc<Crl>>>>,
    waiters: Arc<AtomicUsize>,
}

impl Default for CrlSlot {
    fn default() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(None)),
            waiters: Arc::default(),
        }
    }
}

impl CrlSlot {
    pub fn current(&self) -> Option<Arc<Crl>> {
        self.tx.borrow().clone()
    }

    /// The number of the CRL held, if any.
    pub fn number(&self) -> Option<u64> {
        self.tx.borrow().as_ref().map(|c| c.number)
    }

    /// Keeps `crl` if it is newer than the one held (a higher number); whether it was kept.
    /// An older or equal one changes nothing, so a replayed CRL cannot undo a revocation.
    pub fn offer(&self, crl: Crl) -> bool {
        let crl = Arc::new(crl);
        self.tx.send_if_modified(|held| match held {
            Some(h) if h.number >= crl.number => false,
            _ => {
                *held = Some(crl);
                true
            }
        })
    }

    /// Whether the CRL held lists `serial`.
    pub fn revokes(&self, serial: &str) -> bool {
        self.tx.borrow().as_ref().is_some_and(|c| c.revokes(serial))
    }

    /// A receiver that wakes on every newer CRL.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Crl>>> {
        self.tx.subscribe()
    }

    /// A place among at most `max` waiters for a newer CRL, or None when all are taken.
    pub fn waiter(&self, max: usize) -> Option<Waiter> {
        let taken = self
            .waiters
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        taken.ok().map(|_| Waiter(self.waiters.clone()))
    }
}

/// A taken place among a [`CrlSlot`]'s waiters; given back when dropped.
pub struct Waiter(Arc<AtomicUsize>);

impl Drop for Waiter {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create_ca;

    #[test]
    fn signed_crls_are_read_back_and_others_refused() {
        let ca = create_ca().unwrap();
        let signer = CaSigner::load(&ca.cert_pem, &ca.key_pem).unwrap();
        let alice = signer.issue_user("alice").unwrap();
        let pem = signer
            .crl(
                &[(alice.serial.clone(), 1_700_000_000)],
                7,
                std::time::Duration::from_secs(86_400),
            )
            .unwrap();
        let crl = parse_crl(&ca.cert_pem, &pem).unwrap();
        assert_eq!(crl.number, 7);
        assert!(crl.revokes(&alice.serial));
        assert_eq!(crl.len(), 1);
        assert!(crl.next_update.unwrap() > crl.this_update);
        // Re-encoded from the signed bytes, it reads back the same.
        assert_eq!(parse_crl(&ca.cert_pem, &crl.pem()).unwrap(), crl);
        let empty = signer
            .crl(&[], 0, std::time::Duration::from_secs(60))
            .unwrap();
        assert!(parse_crl(&ca.cert_pem, &empty).unwrap().is_empty());

        // Another CA's CRL, or a changed one, is refused.
        let other = create_ca().unwrap();
        assert!(matches!(
            parse_crl(&other.cert_pem, &pem),
            Err(PkiError::NotSignedByCa)
        ));
        let other_signer = CaSigner::load(&other.cert_pem, &other.key_pem).unwrap();
        let forged = other_signer
            .crl(&[], 99, std::time::Duration::from_secs(60))
            .unwrap();
        assert!(parse_crl(&ca.cert_pem, &forged).is_err());
        let mut der = crl.der.clone();
        let last = der.len() - 40;
        der[last] ^= 1;
        let tampered = pem::encode(&pem::Pem::new("X509 CRL", der));
        assert!(parse_crl(&ca.cert_pem, &tampered).is_err());
        assert!(parse_crl(&ca.cert_pem, "hello").is_err());
    }

    #[test]
    fn the_slot_keeps_the_newest() {
        let ca = create_ca().unwrap();
        let signer = CaSigner::load(&ca.cert_pem, &ca.key_pem).unwrap();
        let day = std::time::Duration::from_secs(86_400);
        let crl = |n: u64, serials: &[&str]| {
            let list: Vec<(String, i64)> = serials.iter().map(|s| (s.to_string(), 0)).collect();
            parse_crl(&ca.cert_pem, &signer.crl(&list, n, day).unwrap()).unwrap()
        };
        let slot = CrlSlot::default();
        let mut rx = slot.subscribe();
        assert!(!slot.revokes("01"));
        assert!(slot.offer(crl(2, &["01"])));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert!(slot.revokes("01"));
        // Older and equal numbers are ignored: a replayed CRL undoes nothing.
        assert!(!slot.offer(crl(1, &[])));
        assert!(!slot.offer(crl(2, &[])));
        assert!(!rx.has_changed().unwrap());
        assert!(slot.revokes("01"));
        assert!(slot.offer(crl(3, &["01", "02"])));
        assert_eq!(slot.number(), Some(3));
        assert!(slot.revokes("02"));

        let w1 = slot.waiter(2).unwrap();
        let _w2 = slot.waiter(2).unwrap();
        assert!(slot.waiter(2).is_none());
        drop(w1);
        assert!(slot.waiter(2).is_some());
    }
}
