//! Certificates and TLS for the mesh.
//!
//! Pure certificate logic (issuing, parsing, matching keys) plus the builders of the rustls
//! configurations every role uses: the hub's mutual-TLS server, the agent's client, and the
//! verifiers that encode the mesh's trust rules (only the mesh CA is trusted; only hub
//! certificates may act as servers; revoked serials are refused). [`crl`] holds the CA's
//! revocation lists, [`ca_tls`] the TLS between hubs and the CA.

pub mod ca_tls;
pub mod crl;

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber, SubjectPublicKeyInfo,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName as TlsDn,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

pub use ca_tls::{
    ca_client_config, ca_server_config, fingerprint_pem, parse_fingerprint, sha256_hex,
    unauthenticated_ca_client_config, CA_SERVER_CN,
};
pub use crl::{parse_crl, Crl, CrlSlot};
pub use rustls;

/// ALPN of the agent's control connection (agent is the HTTP/2 client).
pub const ALPN_CONTROL: &[u8] = b"h2";
/// ALPN of the agent's reverse connection (agent is the HTTP/2 server).
pub const ALPN_REVERSE: &[u8] = b"ztm-reverse";

/// Common name prefix that marks hub certificates. User names may never take it.
pub const HUB_CN_PREFIX: &str = "hub/";

const CA_VALIDITY_DAYS: i64 = 365 * 20;
/// How long a user certificate is valid unless the CA is told otherwise.
pub const USER_VALIDITY: std::time::Duration = std::time::Duration::from_secs(5 * 365 * 24 * 3600);
/// How long a hub's certificate is valid unless the CA is told otherwise. Short, because a
/// revoked hub that is an agent's only hub can keep the news of its revocation from that
/// agent until its certificate expires (docs/security.md ("Hubs, the CA and revocation")); hubs renew theirs after two
/// thirds of it.
pub const HUB_VALIDITY: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

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

/// A freshly created certificate and its key, both PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub serial: String,
}

/// What we read back out of a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub common_name: String,
    /// Lower-case hex, no separators, no leading zero bytes.
    pub serial: String,
    pub not_after: i64,
    pub issuer_cn: String,
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

pub(crate) fn hex(bytes: &[u8]) -> String {
    let trimmed: &[u8] = {
        let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        &bytes[first..]
    };
    trimmed.iter().map(|b| format!("{b:02x}")).collect()
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

/// What a hub knows of the CA's revocations: the serials (lower-case hex), shared between the
/// poller and the verifiers, and the CA's latest signed CRL, which the hub passes on to agents.
#[derive(Clone, Debug, Default)]
pub struct Revoked {
    serials: Arc<RwLock<HashSet<String>>>,
    crl: CrlSlot,
}

impl Revoked {
    pub fn insert(&self, serial: String) {
        if let Ok(mut set) = self.serials.write() {
            set.insert(serial);
        }
    }
    pub fn contains(&self, serial: &str) -> bool {
        self.serials
            .read()
            .map(|set| set.contains(serial))
            .unwrap_or(true)
    }
    pub fn len(&self) -> usize {
        self.serials.read().map(|set| set.len()).unwrap_or(0)
    }
    /// The CA's latest CRL, as the hub got it.
    pub fn crl(&self) -> &CrlSlot {
        &self.crl
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// aws-lc-rs for everything but the record cipher. Records are AES-128-GCM from ring first: on
/// CPUs with VAES and AVX2, ring seals 16 KiB records in about half the time aws-lc takes
/// (0.14-0.16 s/GB against 0.28-0.37 s/GB for aws-lc's AES-256-GCM, measured on the benchmark
/// machine), and every tunnel byte passes the cipher four times. The other TLS 1.3 suites stay as
/// fallbacks for peers that do not offer AES-128-GCM.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::{aws_lc_rs, ring};
    let mut p = aws_lc_rs::default_provider();
    p.cipher_suites = vec![
        ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

pub(crate) fn roots(ca_pem: &str) -> Result<RootCertStore, PkiError> {
    let mut store = RootCertStore::empty();
    store
        .add(parse_cert(ca_pem, "ca")?)
        .map_err(|_| PkiError::BadCertificate("ca"))?;
    Ok(store)
}

/// Client-certificate verifier: the mesh CA's chain rules plus the revocation list.
#[derive(Debug)]
struct MeshClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Revoked,
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
struct HubVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    crl: Option<CrlSlot>,
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

/// The hub's certificate, only for a client that offers ALPN. rustls completes a handshake
/// without ALPN even when the server has protocols; the hub refuses it there instead of
/// dropping it after the handshake. rustls then sends the alert `access_denied` (it sends
/// `no_application_protocol` only when the client offers protocols and none is the server's).
#[derive(Debug)]
struct AlpnRequired(Arc<dyn rustls::server::ResolvesServerCert>);

impl rustls::server::ResolvesServerCert for AlpnRequired {
    fn resolve(
        &self,
        client_hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let _offered = client_hello.alpn()?;
        self.0.resolve(client_hello)
    }
}

/// The hub's TLS server: TLS 1.3 only, client certificates of the mesh CA required,
/// revoked serials refused, ALPN for the control and the reverse connection (required).
pub fn hub_server_config(
    ca_pem: &str,
    chain_pem: &str,
    key_pem: &str,
    revoked: Revoked,
) -> Result<ServerConfig, PkiError> {
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
        .build()
        .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))?;
    let verifier = Arc::new(MeshClientVerifier { inner, revoked });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            parse_chain(chain_pem, "hub certificate")?,
            parse_key(key_pem, "hub key")?,
        )?;
    config.alpn_protocols = vec![ALPN_CONTROL.to_vec(), ALPN_REVERSE.to_vec()];
    config.cert_resolver = Arc::new(AlpnRequired(config.cert_resolver.clone()));
    config.send_tls13_tickets = 0;
    // Our cipher order, not the client's: agents built with other providers still get the
    // cheapest record cipher both sides have.
    config.ignore_client_order = true;
    // ztm-tls moves the records itself once rustls has finished the handshake.
    config.enable_secret_extraction = true;
    Ok(config)
}

/// The agent's TLS client for one mesh: its user certificate, the mesh CA as the only root,
/// hub certificates only. `alpn` selects the control or the reverse connection.
pub fn agent_client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    alpn: &[u8],
) -> Result<ClientConfig, PkiError> {
    client_config_with(provider(), ca_pem, cert_pem, key_pem, alpn, None)
}

/// Like [`agent_client_config`], and hubs whose certificate the CRL in `crl` lists (at the time
/// of each handshake) are refused.
pub fn agent_client_config_with_crl(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    alpn: &[u8],
    crl: &CrlSlot,
) -> Result<ClientConfig, PkiError> {
    client_config_with(
        provider(),
        ca_pem,
        cert_pem,
        key_pem,
        alpn,
        Some(crl.clone()),
    )
}

fn client_config_with(
    provider: Arc<rustls::crypto::CryptoProvider>,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    alpn: &[u8],
    crl: Option<CrlSlot>,
) -> Result<ClientConfig, PkiError> {
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots(ca_pem)?),
        provider.clone(),
    )
    .build()
    .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(HubVerifier { inner, crl }))
        .with_client_auth_cert(
            parse_chain(cert_pem, "certificate")?,
            parse_key(key_pem, "privateKey")?,
        )?;
    config.alpn_protocols = vec![alpn.to_vec()];
    config.enable_secret_extraction = true;
    Ok(config)
}

/// How long before expiry a certificate counts as due for renewal.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Makes sure the file at `path`, which holds private keys, is readable by its owner only:
/// creates it so if it does not exist, and takes group and other permissions off an existing
/// one and its SQLite journal files (SQLite gives new journal files the database's
/// permissions).
#[cfg(unix)]
pub fn owner_only_file(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let with = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        std::path::PathBuf::from(name)
    };
    for file in [path.to_path_buf(), with("-wal"), with("-shm")] {
        let mode = match std::fs::metadata(&file) {
            Ok(m) => m.permissions().mode(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode & 0o700))?;
        }
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn owner_only_file(_path: &std::path::Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Runs a TLS handshake in memory between an agent's client config and a hub's server config.
    fn handshake(
        client: ClientConfig,
        server: ServerConfig,
    ) -> Result<(rustls::ClientConnection, rustls::ServerConnection), rustls::Error> {
        handshake_named(client, server, "127.0.0.1")
    }

    /// Runs a TLS handshake in memory, the client dialling `name`.
    pub(crate) fn handshake_named(
        client: ClientConfig,
        server: ServerConfig,
        name: &str,
    ) -> Result<(rustls::ClientConnection, rustls::ServerConnection), rustls::Error> {
        let name = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            s.read_tls(&mut wire.as_slice()).unwrap();
            s.process_new_packets()?;
            wire.clear();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            c.read_tls(&mut wire.as_slice()).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
        }
        assert!(
            !c.is_handshaking() && !s.is_handshaking(),
            "handshake stalled"
        );
        Ok((c, s))
    }

    #[test]
    fn tunnels_use_tls13_aes128_gcm_and_fall_back_for_other_clients() {
        let ca = create_ca().unwrap();
        let signer = CaSigner::load(&ca.cert_pem, &ca.key_pem).unwrap();
        let (hub_key, public) = generate_key().unwrap();
        let (hub_cert, _) = signer
            .sign_hub("h1", &public, &["127.0.0.1".into()], HUB_VALIDITY)
            .unwrap();
        let user = signer.issue_user("alice").unwrap();
        let server =
            || hub_server_config(&ca.cert_pem, &hub_cert, &hub_key, Revoked::default()).unwrap();
        let client =
            agent_client_config(&ca.cert_pem, &user.cert_pem, &user.key_pem, ALPN_CONTROL).unwrap();

        let (c, s) = handshake(client.clone(), server()).unwrap();
        for suite in [c.negotiated_cipher_suite(), s.negotiated_cipher_suite()] {
            assert_eq!(
                suite.map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
        }
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(s.alpn_protocol(), Some(ALPN_CONTROL));

        // A client that prefers other ciphers still gets AES-128 (the hub's order) ...
        let client_with = |p: rustls::crypto::CryptoProvider| {
            client_config_with(
                Arc::new(p),
                &ca.cert_pem,
                &user.cert_pem,
                &user.key_pem,
                ALPN_CONTROL,
                None,
            )
            .unwrap()
        };
        let mut p = (*provider()).clone();
        p.cipher_suites.reverse();
        let (c, _) = handshake(client_with(p), server()).unwrap();
        assert_eq!(
            c.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        // ... and one that offers only AES-256 is served with it.
        let only_256 = client_with(rustls::crypto::CryptoProvider {
            cipher_suites: vec![rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384],
            ..rustls::crypto::aws_lc_rs::default_provider()
        });
        let (c, _) = handshake(only_256, server()).unwrap();
        assert_eq!(
            c.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384)
        );
    }

    /// An agent with the mesh's CRL refuses a hub the CRL lists, in the handshake, from the
    /// moment the CRL arrives; other hubs are not affected.
    #[test]
    fn agents_refuse_hubs_the_crl_lists() {
        let ca = create_ca().unwrap();
        let signer = CaSigner::load(&ca.cert_pem, &ca.key_pem).unwrap();
        let hub = |name: &str| {
            let (key, public) = generate_key().unwrap();
            let (cert, serial) = signer
                .sign_hub(name, &public, &["127.0.0.1".into()], HUB_VALIDITY)
                .unwrap();
            (
                hub_server_config(&ca.cert_pem, &cert, &key, Revoked::default()).unwrap(),
                serial,
            )
        };
        let (h1, h1_serial) = hub("h1");
        let (h2, _) = hub("h2");
        let user = signer.issue_user("alice").unwrap();
        let slot = CrlSlot::default();
        let client = agent_client_config_with_crl(
            &ca.cert_pem,
            &user.cert_pem,
            &user.key_pem,
            ALPN_CONTROL,
            &slot,
        )
        .unwrap();
        handshake(client.clone(), h1.clone()).unwrap();
        let crl = signer
            .crl(&[(h1_serial, 0)], 1, std::time::Duration::from_secs(3600))
            .unwrap();
        assert!(slot.offer(parse_crl(&ca.cert_pem, &crl).unwrap()));
        let err = handshake(client.clone(), h1).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        );
        handshake(client, h2).unwrap();
    }

    #[test]
    fn clients_without_alpn_are_refused_in_the_handshake() {
        let ca = create_ca().unwrap();
        let signer = CaSigner::load(&ca.cert_pem, &ca.key_pem).unwrap();
        let (hub_key, public) = generate_key().unwrap();
        let (hub_cert, _) = signer
            .sign_hub("h1", &public, &["127.0.0.1".into()], HUB_VALIDITY)
            .unwrap();
        let user = signer.issue_user("alice").unwrap();
        let server =
            || hub_server_config(&ca.cert_pem, &hub_cert, &hub_key, Revoked::default()).unwrap();
        let client = |alpn: &[&[u8]]| {
            let mut c =
                agent_client_config(&ca.cert_pem, &user.cert_pem, &user.key_pem, ALPN_CONTROL)
                    .unwrap();
            c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
            c
        };
        for ok in [ALPN_CONTROL, ALPN_REVERSE] {
            let (_, s) = handshake(client(&[ok]), server()).unwrap();
            assert_eq!(s.alpn_protocol(), Some(ok));
        }
        // No ALPN: the server refuses the ClientHello, and the client hears access_denied.
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client(&[])), name).unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(server())).unwrap();
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        s.read_tls(&mut wire.as_slice()).unwrap();
        assert!(s.process_new_packets().is_err());
        wire.clear();
        s.write_tls(&mut wire).unwrap();
        c.read_tls(&mut wire.as_slice()).unwrap();
        assert_eq!(
            c.process_new_packets().err(),
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::AccessDenied
            ))
        );
        // Protocols of its own only: no_application_protocol.
        let refused = handshake(client(&[b"http/1.1"]), server()).err();
        assert_eq!(refused, Some(rustls::Error::NoApplicationProtocol));
    }

    #[test]
    fn revoked_set() {
        let r = Revoked::default();
        assert!(!r.contains("ab"));
        r.insert("ab".into());
        assert!(r.contains("ab"));
        assert_eq!(r.len(), 1);
    }
}
