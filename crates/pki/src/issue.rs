//! Issuing certificates: the CA's own, user certificates with new keys, hub certificates for
//! the public keys hubs send, and how long each is valid.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber, SubjectPublicKeyInfo,
};

use crate::inspect::hex;
use crate::{PkiError, HUB_CN_PREFIX};

const CA_VALIDITY_DAYS: i64 = 365 * 20;
/// How long a user certificate is valid unless the CA is told otherwise.
pub const USER_VALIDITY: std::time::Duration = std::time::Duration::from_secs(5 * 365 * 24 * 3600);
/// How long a hub's certificate is valid unless the CA is told otherwise. Short, because a
/// revoked hub that is an agent's only hub can keep the news of its revocation from that
/// agent until its certificate expires (docs/security.md, "Hubs, the CA and revocation");
/// hubs renew theirs after two thirds of it.
pub const HUB_VALIDITY: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// A freshly created certificate and its key, both PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub serial: String,
}

fn now_minus_skew() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() - time::Duration::hours(1)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, so the hex form is stable.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn serial_hex(serial: &SerialNumber) -> String {
    hex(&serial.to_bytes())
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// Creates a new CA key and self-signed certificate (CN `ca`).
pub fn create_ca() -> Result<Issued, PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn("ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let serial = random_serial();
    params.serial_number = Some(serial.clone());
    params.not_before = now_minus_skew();
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        serial: serial_hex(&serial),
    })
}

/// A loaded CA able to sign user and hub certificates.
pub struct CaSigner {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl CaSigner {
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|_| PkiError::BadKey("CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|_| PkiError::BadCertificate("CA certificate"))?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_string(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// Issues a user certificate (CN = name, client authentication) with a new key, valid for
    /// [`USER_VALIDITY`].
    pub fn issue_user(&self, name: &str) -> Result<Issued, PkiError> {
        self.issue_user_for(name, USER_VALIDITY)
    }

    /// Issues a user certificate valid for `lifetime` (never longer than the CA's own).
    pub fn issue_user_for(
        &self,
        name: &str,
        lifetime: std::time::Duration,
    ) -> Result<Issued, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let lifetime = time::Duration::seconds(
            i64::try_from(lifetime.as_secs())
                .map_or(i64::MAX, |s| s.min(CA_VALIDITY_DAYS * 24 * 3600)),
        );
        let (cert_pem, serial) = self.sign(
            name,
            &key,
            &[],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            lifetime,
        )?;
        Ok(Issued {
            cert_pem,
            key_pem: key.serialize_pem(),
            serial,
        })
    }

    /// Signs a hub's public key: CN `hub/{name}`, server and client authentication, with the
    /// given host names or addresses as subject alternative names, valid for `lifetime`.
    pub fn sign_hub(
        &self,
        name: &str,
        public_key_pem: &str,
        sans: &[String],
        lifetime: std::time::Duration,
    ) -> Result<(String, String), PkiError> {
        // A hub certificate never outlives the CA's own.
        let lifetime = time::Duration::seconds(
            i64::try_from(lifetime.as_secs())
                .map_or(i64::MAX, |s| s.min(CA_VALIDITY_DAYS * 24 * 3600)),
        );
        let spki = SubjectPublicKeyInfo::from_pem(public_key_pem)
            .map_err(|_| PkiError::BadPublicKey("body"))?;
        self.sign(
            &format!("{HUB_CN_PREFIX}{name}"),
            &spki,
            sans,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            lifetime,
        )
    }

    pub(crate) fn sign(
        &self,
        cn: &str,
        public_key: &impl rcgen::PublicKeyData,
        sans: &[String],
        eku: Vec<ExtendedKeyUsagePurpose>,
        lifetime: time::Duration,
    ) -> Result<(String, String), PkiError> {
        let mut params = CertificateParams::new(sans.to_vec())?;
        params.distinguished_name = dn(cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = eku;
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        params.not_before = now_minus_skew();
        params.not_after = time::OffsetDateTime::now_utc() + lifetime;
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok((cert.pem(), serial_hex(&serial)))
    }
}

/// Generates a P-256 key pair; returns (private key PEM, public key PEM).
pub fn generate_key() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

/// How long before expiry a certificate counts as due for renewal.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::{cert_info_pem, key_matches_cert, verify_signed_by};

    #[test]
    fn issue_and_read_back_user() {
        let ca = create_ca().unwrap();
        let signer = CaSigner::load(&ca.cert_pem, &ca.key_pem).unwrap();
        let user = signer.issue_user("alice").unwrap();
        let info = cert_info_pem(&user.cert_pem, "c").unwrap();
        assert_eq!(info.common_name, "alice");
        assert_eq!(info.issuer_cn, "ca");
        assert_eq!(info.serial, user.serial);
        key_matches_cert(&user.cert_pem, &user.key_pem).unwrap();
        verify_signed_by(&ca.cert_pem, &user.cert_pem).unwrap();
        let other = create_ca().unwrap();
        assert!(matches!(
            verify_signed_by(&other.cert_pem, &user.cert_pem),
            Err(PkiError::NotSignedByCa)
        ));
        let bob = signer.issue_user("bob").unwrap();
        assert!(matches!(
            key_matches_cert(&user.cert_pem, &bob.key_pem),
            Err(PkiError::KeyMismatch)
        ));
        assert_ne!(user.serial, bob.serial);
    }

    #[test]
    fn hub_certificate_from_public_key() {
        let ca = create_ca().unwrap();
        let signer = CaSigner::load(&ca.cert_pem, &ca.key_pem).unwrap();
        let (key, public) = generate_key().unwrap();
        let (cert, serial) = signer
            .sign_hub(
                "h1",
                &public,
                &["localhost".into(), "127.0.0.1".into()],
                HUB_VALIDITY,
            )
            .unwrap();
        let info = cert_info_pem(&cert, "c").unwrap();
        assert_eq!(info.common_name, "hub/h1");
        assert_eq!(info.serial, serial);
        key_matches_cert(&cert, &key).unwrap();
        assert!(signer
            .sign_hub("h1", "not a key", &[], HUB_VALIDITY)
            .is_err());
    }
}
