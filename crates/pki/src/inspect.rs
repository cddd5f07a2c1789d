//! Reading certificates and keys: PEM parsing, the names, serial and validity in a
//! certificate, whether a key belongs to a certificate and whether the CA signed one.

use rcgen::KeyPair;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::tls::provider;
use crate::PkiError;

/// What we read back out of a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub common_name: String,
    /// Lower-case hex, no separators, no leading zero bytes.
    pub serial: String,
    pub not_after: i64,
    pub issuer_cn: String,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let trimmed: &[u8] = {
        let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        &bytes[first..]
    };
    trimmed.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses the first certificate of a PEM text.
pub fn parse_cert(pem: &str, what: &'static str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::BadCertificate(what))
}

/// Parses every certificate of a PEM text (a chain); at least one.
pub fn parse_chain(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| PkiError::BadCertificate(what))?;
    if certs.is_empty() {
        return Err(PkiError::BadCertificate(what));
    }
    Ok(certs)
}

/// Parses a PEM private key and checks that it is a usable signing key.
pub fn parse_key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, PkiError> {
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::BadKey(what))?;
    provider()
        .key_provider
        .load_private_key(der.clone_key())
        .map_err(|_| PkiError::BadKey(what))?;
    Ok(der)
}

/// Reads name, serial and validity out of a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| PkiError::BadCertificate("certificate"))?;
    let cn_of = |name: &x509_parser::x509::X509Name<'_>| {
        name.iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    Ok(CertInfo {
        common_name: cn_of(cert.subject()),
        serial: hex(cert.raw_serial()),
        not_after: cert.validity().not_after.timestamp(),
        issuer_cn: cn_of(cert.issuer()),
    })
}

pub fn cert_info_pem(pem: &str, what: &'static str) -> Result<CertInfo, PkiError> {
    cert_info(parse_cert(pem, what)?.as_ref()).map_err(|_| PkiError::BadCertificate(what))
}

/// Checks that `key_pem` is the private key of `cert_pem`.
pub fn key_matches_cert(cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
    let der = parse_cert(cert_pem, "certificate")?;
    let key = KeyPair::from_pem(key_pem).map_err(|_| PkiError::BadKey("privateKey"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|_| PkiError::BadCertificate("certificate"))?;
    if cert.tbs_certificate.subject_pki.raw
        == rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
    {
        Ok(())
    } else {
        Err(PkiError::KeyMismatch)
    }
}

/// Checks that `cert_pem` was issued by the CA in `ca_pem` (signature and validity).
pub fn verify_signed_by(ca_pem: &str, cert_pem: &str) -> Result<(), PkiError> {
    let ca = parse_cert(ca_pem, "ca")?;
    let cert = parse_cert(cert_pem, "certificate")?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca.as_ref())
        .map_err(|_| PkiError::BadCertificate("ca"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| PkiError::BadCertificate("certificate"))?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| PkiError::NotSignedByCa)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_an_error() {
        assert!(parse_cert("hello", "ca").is_err());
        assert!(parse_key(
            "-----BEGIN PRIVATE KEY-----\nzz\n-----END PRIVATE KEY-----\n",
            "k"
        )
        .is_err());
        assert!(cert_info(b"garbage").is_err());
    }
}
