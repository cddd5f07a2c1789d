//! The rustls configurations of the mesh's connections: the hub's mutual-TLS server and the
//! agent's client, on one crypto provider with the record cipher first that tunnels use.

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};

use crate::crl::CrlSlot;
use crate::inspect::{parse_chain, parse_key};
use crate::trust::{roots, HubVerifier, MeshClientVerifier, Revoked};
use crate::PkiError;

/// ALPN of the agent's control connection (agent is the HTTP/2 client).
pub const ALPN_CONTROL: &[u8] = b"h2";
/// ALPN of a control connection that carries lines (registration, heartbeats, publishing, the
/// CRL) until the agent first needs HTTP/2, which it then starts (PROTOCOL.md, "Control
/// connection on demand"). Agents offer it before [`ALPN_CONTROL`], which hubs that do not know
/// it choose.
pub const ALPN_CONTROL_ON_DEMAND: &[u8] = b"ztm-control-on-demand";
/// ALPN of the agent's reverse connection (agent is the HTTP/2 server).
pub const ALPN_REVERSE: &[u8] = b"ztm-reverse";
/// ALPN of a reverse connection whose HTTP/2 the hub starts when it first needs it; until then
/// it carries nothing (PROTOCOL.md, "Reverse connection"). Agents offer it before
/// [`ALPN_REVERSE`], which hubs that do not know it choose.
pub const ALPN_REVERSE_ON_DEMAND: &[u8] = b"ztm-reverse-on-demand";

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
    config.alpn_protocols = vec![
        ALPN_CONTROL_ON_DEMAND.to_vec(),
        ALPN_CONTROL.to_vec(),
        ALPN_REVERSE_ON_DEMAND.to_vec(),
        ALPN_REVERSE.to_vec(),
    ];
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crl::parse_crl;
    use crate::issue::{create_ca, generate_key, CaSigner, HUB_VALIDITY};
    use rustls::CertificateError;

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
        for ok in [
            ALPN_CONTROL,
            ALPN_CONTROL_ON_DEMAND,
            ALPN_REVERSE,
            ALPN_REVERSE_ON_DEMAND,
        ] {
            let (_, s) = handshake(client(&[ok]), server()).unwrap();
            assert_eq!(s.alpn_protocol(), Some(ok));
        }
        // An agent that offers both reverse protocols gets the one started on demand.
        let (_, s) = handshake(client(&[ALPN_REVERSE_ON_DEMAND, ALPN_REVERSE]), server()).unwrap();
        assert_eq!(s.alpn_protocol(), Some(ALPN_REVERSE_ON_DEMAND));
        // So does one that offers both control protocols.
        let (_, s) = handshake(client(&[ALPN_CONTROL_ON_DEMAND, ALPN_CONTROL]), server()).unwrap();
        assert_eq!(s.alpn_protocol(), Some(ALPN_CONTROL_ON_DEMAND));
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
}
