//! Certificates and TLS for the mesh.
//!
//! [`issue`] creates certificates (the CA's, users', hubs'), [`inspect`] reads them back,
//! [`trust`] holds the mesh's trust rules as rustls verifiers (only the mesh CA is trusted;
//! only hub certificates may act as servers; revoked serials are refused), [`tls`] the rustls
//! configurations every role uses (the hub's mutual-TLS server, the agent's client), [`crl`]
//! the CA's revocation lists, [`ca_tls`] the TLS between hubs and the CA, and [`files`] the
//! permissions of files that hold keys. Everything public is re-exported here.

pub mod ca_tls;
pub mod crl;
pub mod files;
pub mod inspect;
pub mod issue;
pub mod tls;
pub mod trust;

pub use ca_tls::{
    ca_client_config, ca_server_config, fingerprint_pem, parse_fingerprint, sha256_hex,
    unauthenticated_ca_client_config, CA_SERVER_CN,
};
pub use crl::{parse_crl, Crl, CrlSlot};
pub use files::owner_only_file;
pub use inspect::{
    cert_info, cert_info_pem, key_matches_cert, parse_cert, parse_chain, parse_key,
    verify_signed_by, CertInfo,
};
pub use issue::{
    create_ca, generate_key, CaSigner, Issued, HUB_VALIDITY, RENEW_BEFORE, USER_VALIDITY,
};
pub use rustls;
pub use tls::{
    agent_client_config, agent_client_config_with_crl, hub_server_config, ALPN_CONTROL,
    ALPN_CONTROL_ON_DEMAND, ALPN_REVERSE, ALPN_REVERSE_ON_DEMAND,
};
pub use trust::Revoked;

/// Common name prefix that marks hub certificates. User names may never take it.
pub const HUB_CN_PREFIX: &str = "hub/";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0} is not a valid PEM certificate")]
    BadCertificate(&'static str),
    #[error("{0} is not a valid PEM private key")]
    BadKey(&'static str),
    #[error("{0} is not a valid PEM public key")]
    BadPublicKey(&'static str),
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    #[error("the certificate is not signed by the mesh CA")]
    NotSignedByCa,
    #[error("bad CRL: {0}")]
    BadCrl(&'static str),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
}
