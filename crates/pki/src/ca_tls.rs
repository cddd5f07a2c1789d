//! TLS between hubs and the CA. The CA serves HTTPS with a certificate it signs itself: CN
//! [`CA_SERVER_CN`] (neither a user name nor a hub name), the server-auth usage only, and the
//! host names or addresses it is reached at. A hub trusts only the CA certificate it was given
//! (or whose fingerprint it was given) and, under it, only that certificate: a hub certificate
//! of the same CA, which a compromised hub holds for any address it likes, is not the CA.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use rcgen::{ExtendedKeyUsagePurpose, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::inspect::{cert_info, parse_cert};
use crate::issue::{CaSigner, Issued};
use crate::tls::provider;
use crate::trust::roots;
use crate::PkiError;

/// The common name of the CA's HTTPS certificate. It contains a `/`, which no user name may,
/// and does not start with `hub/`, so neither hubs (client certificates must be user
/// certificates) nor agents (servers must be hubs) accept it.
pub const CA_SERVER_CN: &str = "ca/server";
/// How long the CA's HTTPS certificate is valid; it is replaced after a third of it.
pub const CA_SERVER_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

/// The SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The SHA-256 fingerprint of a PEM certificate's DER, lower-case hex without separators.
pub fn fingerprint_pem(pem: &str, what: &'static str) -> Result<String, PkiError> {
    Ok(sha256_hex(parse_cert(pem, what)?.as_ref()))
}

/// Reads a SHA-256 fingerprint as people copy it: hex in either case, with or without `:`
/// between the bytes (as `openssl x509 -fingerprint -sha256` prints it), optionally after
/// `sha256:`. Lower-case hex without separators, or None if it is not 32 bytes of hex.
pub fn parse_fingerprint(text: &str) -> Option<String> {
    let text = text.trim();
    let text = text
        .strip_prefix("sha256:")
        .or_else(|| text.strip_prefix("SHA256:"))
        .unwrap_or(text);
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

impl CaSigner {
    /// Issues the CA's own HTTPS certificate with a new key: CN [`CA_SERVER_CN`], server
    /// authentication only, `sans` as subject alternative names.
    pub fn issue_ca_server(&self, sans: &[String]) -> Result<Issued, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let lifetime = time::Duration::seconds(CA_SERVER_VALIDITY.as_secs() as i64);
        let (cert_pem, serial) = self.sign(
            CA_SERVER_CN,
            &key,
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            lifetime,
        )?;
        Ok(Issued {
            cert_pem,
            key_pem: key.serialize_pem(),
            serial,
        })
    }
}

/// Hands out the CA's HTTPS certificate, issuing a new one (and key) when a third of the
/// current one's life has passed, so a CA that runs for months never serves an expired one.
struct CaServerCert {
    signer: Arc<CaSigner>,
    sans: Vec<String>,
    current: RwLock<(SystemTime, Arc<CertifiedKey>)>,
}

impl std::fmt::Debug for CaServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaServerCert")
            .field("sans", &self.sans)
            .finish()
    }
}

fn certified(signer: &CaSigner, sans: &[String]) -> Result<Arc<CertifiedKey>, PkiError> {
    let issued = signer.issue_ca_server(sans)?;
    let chain = vec![
        parse_cert(&issued.cert_pem, "CA server certificate")?,
        parse_cert(signer.cert_pem(), "CA certificate")?,
    ];
    let key: PrivateKeyDer<'static> = crate::parse_key(&issued.key_pem, "CA server key")?;
    Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider())?))
}

impl ResolvesServerCert for CaServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let (issued, key) = self.current.read().clone();
        let age = SystemTime::now()
            .duration_since(issued)
            .unwrap_or(Duration::ZERO);
        if age < CA_SERVER_VALIDITY / 3 {
            return Some(key);
        }
        // Renew; should that fail, the current one is still valid for a while.
        match certified(&self.signer, &self.sans) {
            Ok(fresh) => {
                *self.current.write() = (SystemTime::now(), fresh.clone());
                Some(fresh)
            }
            Err(_) => Some(key),
        }
    }
}

/// The CA's HTTPS server: TLS 1.3, its own certificate for `sans` (renewed while it runs),
/// no client certificates (callers authenticate with tokens, inside the TLS connection).
pub fn ca_server_config(signer: Arc<CaSigner>, sans: &[String]) -> Result<ServerConfig, PkiError> {
    let first = certified(&signer, sans)?;
    let resolver = CaServerCert {
        signer,
        sans: sans.to_vec(),
        current: RwLock::new((SystemTime::now(), first)),
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct NotCaServer(String);

impl std::fmt::Display for NotCaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "its certificate (CN {:?}) is not the CA's own server certificate",
            self.0
        )
    }
}

impl std::error::Error for NotCaServer {}

/// A hub's verifier of the CA's HTTPS certificate: issued by the pinned CA, valid for the
/// address dialled, and the CA's own (CN [`CA_SERVER_CN`], not a hub's).
#[derive(Debug)]
struct CaServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl ServerCertVerifier for CaServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        let info = cert_info(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if info.common_name != CA_SERVER_CN {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(NotCaServer(info.common_name))),
            )));
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

/// A hub's TLS client for its CA, trusting only the CA certificate `ca_pem`.
pub fn ca_client_config(ca_pem: &str) -> Result<ClientConfig, PkiError> {
    let provider = provider();
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots(ca_pem)?),
        provider.clone(),
    )
    .build()
    .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CaServerVerifier { inner }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Accepts any server certificate: only for fetching the CA certificate from a CA known by
/// its fingerprint (what is fetched is checked against the fingerprint; nothing secret is
/// sent on such a connection).
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client that does not authenticate the server: for fetching a CA certificate whose
/// fingerprint is known, and nothing else.
pub fn unauthenticated_ca_client_config() -> Result<ClientConfig, PkiError> {
    let provider = provider();
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::tests::handshake_named;
    use crate::{
        agent_client_config, create_ca, generate_key, hub_server_config, Revoked, ALPN_CONTROL,
        HUB_VALIDITY,
    };

    fn new_ca() -> (Issued, Arc<CaSigner>) {
        let ca = create_ca().unwrap();
        let signer = Arc::new(CaSigner::load(&ca.cert_pem, &ca.key_pem).unwrap());
        (ca, signer)
    }

    #[test]
    fn fingerprints_are_read_as_people_copy_them() {
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&hex).as_deref(), Some(hex.as_str()));
        assert_eq!(parse_fingerprint(&colons).as_deref(), Some(hex.as_str()));
        assert_eq!(
            parse_fingerprint(&format!("sha256:{hex}\n")).as_deref(),
            Some(hex.as_str())
        );
        assert_eq!(parse_fingerprint(&hex[2..]), None);
        assert_eq!(parse_fingerprint(&"zz".repeat(32)), None);
        let (ca, _) = new_ca();
        assert_eq!(fingerprint_pem(&ca.cert_pem, "ca").unwrap().len(), 64);
    }

    #[test]
    fn hubs_accept_the_ca_server_certificate_only() {
        let (ca, signer) = new_ca();
        let sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let server = ca_server_config(signer.clone(), &sans).unwrap();
        let client = ca_client_config(&ca.cert_pem).unwrap();
        handshake_named(client.clone(), server.clone(), "127.0.0.1").unwrap();
        handshake_named(client.clone(), server.clone(), "localhost").unwrap();
        // Not for another name.
        assert!(handshake_named(client.clone(), server.clone(), "ca.example.com").is_err());
        // Another CA's client does not trust it.
        let (other, _) = new_ca();
        let stranger = ca_client_config(&other.cert_pem).unwrap();
        assert!(handshake_named(stranger, server, "127.0.0.1").is_err());

        // A hub certificate of the same CA, for the same address, is not the CA.
        let (key, public) = generate_key().unwrap();
        let (hub_cert, _) = signer
            .sign_hub("evil", &public, &sans, HUB_VALIDITY)
            .unwrap();
        let hub = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                crate::parse_chain(&hub_cert, "hub").unwrap(),
                crate::parse_key(&key, "hub key").unwrap(),
            )
            .unwrap();
        let err = handshake_named(client, hub, "127.0.0.1").unwrap_err();
        assert!(
            err.to_string().contains("NotCaServer(\"hub/evil\")"),
            "{err}"
        );
    }

    /// The CA's HTTPS certificate is neither a user's nor a hub's: agents do not take it for
    /// a hub, and hubs do not take it as a client certificate.
    #[test]
    fn the_ca_server_certificate_is_no_user_and_no_hub() {
        let (ca, signer) = new_ca();
        let issued = signer.issue_ca_server(&["127.0.0.1".into()]).unwrap();
        let info = crate::cert_info_pem(&issued.cert_pem, "c").unwrap();
        assert_eq!(info.common_name, CA_SERVER_CN);
        assert!(ztm_check_name_refuses(&info.common_name));

        // As a hub, to an agent.
        let user = signer.issue_user("alice").unwrap();
        let agent =
            agent_client_config(&ca.cert_pem, &user.cert_pem, &user.key_pem, ALPN_CONTROL).unwrap();
        let mut fake_hub = ca_server_config(signer.clone(), &["127.0.0.1".into()]).unwrap();
        fake_hub.alpn_protocols = vec![ALPN_CONTROL.to_vec()];
        assert!(handshake_named(agent, fake_hub, "127.0.0.1").is_err());

        // As a client, to a hub.
        let (hub_key, public) = generate_key().unwrap();
        let (hub_cert, _) = signer
            .sign_hub("h1", &public, &["127.0.0.1".into()], HUB_VALIDITY)
            .unwrap();
        let hub = hub_server_config(&ca.cert_pem, &hub_cert, &hub_key, Revoked::default()).unwrap();
        let as_user = agent_client_config(
            &ca.cert_pem,
            &issued.cert_pem,
            &issued.key_pem,
            ALPN_CONTROL,
        )
        .unwrap();
        assert!(handshake_named(as_user, hub, "127.0.0.1").is_err());
    }

    /// User names are letters, digits, `.`, `_`, `-`, `@` (crates/proto's rule, repeated here
    /// to keep this crate free of that dependency).
    fn ztm_check_name_refuses(name: &str) -> bool {
        !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
            && !name.starts_with(crate::HUB_CN_PREFIX)
    }
}
