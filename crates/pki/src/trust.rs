//! The mesh's trust rules, as rustls verifiers: only the mesh CA is trusted, only hub
//! certificates may act as servers, and revoked serials are refused (the hub's set from the
//! CA's feed, the agent's from the mesh's CRL).

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName as TlsDn, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::crl::CrlSlot;
use crate::inspect::{cert_info, parse_cert};
use crate::{PkiError, HUB_CN_PREFIX};

/// What a hub knows of the CA's revocations: the serials (lower-case hex), shared between the
/// poller and the verifiers, and the CA's latest signed CRL, which the hub passes on to agents.
#[derive(Clone, Debug, Default)]
pub struct Revoked {
    serials: Arc<RwLock<HashSet<String>>>,
    crl: CrlSlot,
}

impl Revoked {
    pub fn insert(&self, serial: String) {
        self.serials.write().insert(serial);
    }
    pub fn contains(&self, serial: &str) -> bool {
        self.serials.read().contains(serial)
    }
    pub fn len(&self) -> usize {
        self.serials.read().len()
    }
    /// The CA's latest CRL, as the hub got it.
    pub fn crl(&self) -> &CrlSlot {
        &self.crl
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The mesh CA as the only root.
pub(crate) fn roots(ca_pem: &str) -> Result<RootCertStore, PkiError> {
    let mut store = RootCertStore::empty();
    store
        .add(parse_cert(ca_pem, "ca")?)
        .map_err(|_| PkiError::BadCertificate("ca"))?;
    Ok(store)
}

/// Client-certificate verifier: the mesh CA's chain rules plus the revocation list.
#[derive(Debug)]
pub(crate) struct MeshClientVerifier {
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
    pub(crate) revoked: Revoked,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[TlsDn] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let info = cert_info(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.revoked.contains(&info.serial) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server verifier for agents: the hub must present a certificate of the mesh CA with the
/// server-auth usage and a `hub/` name, not listed in the mesh's latest CRL. Host names are
/// not checked: the CA only gives hub names to hubs, so any hub of the mesh is a valid peer
/// whatever address it was reached at.
#[derive(Debug)]
pub(crate) struct HubVerifier {
    pub(crate) inner: Arc<rustls::client::WebPkiServerVerifier>,
    pub(crate) crl: Option<CrlSlot>,
}

impl ServerCertVerifier for HubVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let info = cert_info(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if !info.common_name.starts_with(HUB_CN_PREFIX) {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        if self.crl.as_ref().is_some_and(|c| c.revokes(&info.serial)) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_set() {
        let r = Revoked::default();
        assert!(!r.contains("ab"));
        r.insert("ab".into());
        assert!(r.contains("ab"));
        assert_eq!(r.len(), 1);
    }
}
