//! The hub process: certificate at start, the TLS accept loop, and the background jobs
//! (certificate renewal, revocation polling, liveness sweeping). Owns the shared [`Hub`]
//! state.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, Result};
use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use ztm_net::backoff::Backoff;
use ztm_net::now_ms;
use ztm_pki::rustls::ServerConfig;
use ztm_pki::{Revoked, ALPN_CONTROL, ALPN_REVERSE};
use ztm_proto::wire::{HANDSHAKE_TIMEOUT, REVOCATION_POLL};

use crate::ca_client::CaClient;
use crate::registry::{Registry, SessionId};

/// Most TLS handshakes in progress at once; more wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;
/// Most connections served at once.
const MAX_CONNECTIONS: usize = 50_000;
const SWEEP_INTERVAL: Duration = Duration::from_secs(2);

pub struct HubConfig {
    /// HOST:PORT of the CA.
    pub ca: String,
    pub ca_token: Option<String>,
    /// Addresses (HOST:PORT) agents reach this hub at.
    pub names: Vec<String>,
}

/// Who is on the other end of a TLS connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub user: String,
    pub serial: String,
    pub addr: SocketAddr,
}

/// The I/O handles of a registered session.
pub struct SessionIo {
    /// Cancelled to close the session's connections.
    pub kill: CancellationToken,
    /// Which control connection registered it.
    pub conn: u64,
    /// The reverse connection, once bound (`None` until the agent's hello arrives).
    pub reverse: watch::Sender<Option<h2::client::SendRequest<Bytes>>>,
}

impl SessionIo {
    pub fn new(kill: CancellationToken, conn: u64) -> SessionIo {
        SessionIo {
            kill,
            conn,
            reverse: watch::Sender::new(None),
        }
    }
}

pub struct Hub {
    pub name: String,
    registry: Mutex<Registry>,
    sessions: Mutex<HashMap<SessionId, SessionIo>>,
    pub revoked: Revoked,
    /// What the hub's tunnel relays hold for stalled next hops.
    pub stalls: ztm_net::relay::StallGuard,
}

impl Hub {
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn sessions(&self) -> MutexGuard<'_, HashMap<SessionId, SessionIo>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes a session's connections (if it still exists).
    pub fn kill_session(&self, session: SessionId) {
        if let Some(io) = self.sessions().remove(&session) {
            io.kill.cancel();
        }
    }

    /// The reverse-connection sender of an online endpoint. An agent dials its reverse
    /// connection right after registering, so a request that arrives in between waits for it
    /// (up to the handshake timeout) instead of failing.
    pub async fn reverse_of(&self, session: SessionId) -> Option<h2::client::SendRequest<Bytes>> {
        let mut bound = self.sessions().get(&session)?.reverse.subscribe();
        let ready = tokio::time::timeout(HANDSHAKE_TIMEOUT, bound.wait_for(Option::is_some));
        let sender = match ready.await {
            Ok(Ok(sender)) => sender.clone(),
            // Timed out, or the session ended (its sender was dropped).
            _ => None,
        };
        sender
    }

    fn sweep(&self) {
        let stale = self.registry().sweep(now_ms());
        for s in stale {
            tracing::info!("session {s} missed its heartbeats; closing it");
            self.kill_session(s);
        }
    }

    fn drop_revoked(&self) {
        let sessions = self
            .registry()
            .sessions_revoked(|serial| self.revoked.contains(serial));
        for s in sessions {
            tracing::info!("session {s} uses a revoked certificate; closing it");
            self.kill_session(s);
        }
    }
}

fn host_of(name: &str) -> &str {
    let host = match name.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => name,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The hub's name at the CA (`hub/{name}`), from its first public address.
fn hub_name(names: &[String], local: SocketAddr) -> String {
    let base = names
        .first()
        .cloned()
        .unwrap_or_else(|| format!("{}:{}", local.ip(), local.port()));
    let clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean.trim_start_matches(['.', '-']).to_string();
    if clean.is_empty() {
        "hub".to_string()
    } else {
        clean.chars().take(64).collect()
    }
}

/// A fresh key, certified by the CA: the TLS configuration using it, and when the certificate
/// expires (Unix seconds).
async fn certified(
    ca: &CaClient,
    name: &str,
    sans: &[String],
    revoked: &Revoked,
) -> Result<(Arc<ServerConfig>, i64)> {
    let (key_pem, public_pem) = ztm_pki::generate_key()?;
    let ca_pem = ca.ca_certificate().await?;
    let cert_pem = ca.sign_hub(name, &public_pem, sans).await?;
    let not_after = ztm_pki::cert_info_pem(&cert_pem, "hub certificate")?.not_after;
    let config = ztm_pki::hub_server_config(&ca_pem, &cert_pem, &key_pem, revoked.clone())?;
    Ok((Arc::new(config), not_after))
}

/// The start-up certificate and the revocations so far (and where their feed continues).
async fn obtain_tls(
    ca: &CaClient,
    name: &str,
    sans: &[String],
    revoked: &Revoked,
) -> Result<((Arc<ServerConfig>, i64), i64)> {
    let feed = ca.all_revocations(0).await?;
    for r in feed.revocations {
        revoked.insert(r.serial);
    }
    Ok((certified(ca, name, sans, revoked).await?, feed.last))
}

/// How long to wait before renewing a certificate that expires at `not_after`, at `now` (Unix
/// seconds): two thirds of its remaining life, at least a second.
pub fn renewal_delay(now: i64, not_after: i64) -> Duration {
    let left = u64::try_from(not_after.saturating_sub(now)).unwrap_or(0);
    Duration::from_secs((left / 3 * 2).max(1))
}

/// Runs the hub on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: HubConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let local = listener.local_addr()?;
    let name = hub_name(&config.names, local);
    let mut sans: Vec<String> = config
        .names
        .iter()
        .map(|n| host_of(n).to_string())
        .collect();
    if sans.is_empty() {
        sans = vec!["localhost".into(), "127.0.0.1".into()];
    }
    let ca = Arc::new(CaClient {
        addr: config.ca.clone(),
        token: config.ca_token.clone(),
    });
    let revoked = Revoked::default();
    let root = CancellationToken::new();
    tokio::pin!(shutdown);

    // Get a certificate, waiting for the CA if it is not up yet.
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    let ((acceptor, not_after), mut since) = loop {
        match obtain_tls(&ca, &name, &sans, &revoked).await {
            Ok(v) => break v,
            Err(e) => {
                tracing::warn!(
                    "cannot get a certificate from the CA at {}: {e:#}; retrying",
                    ca.addr
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = &mut shutdown => return Ok(()),
                }
            }
        }
    };
    let hub = Arc::new(Hub {
        name: format!("hub/{name}"),
        registry: Mutex::new(Registry::new()),
        sessions: Mutex::new(HashMap::new()),
        revoked: revoked.clone(),
        stalls: Default::default(),
    });
    tracing::info!(
        "hub {} listening on {local} (CA {}, names: {})",
        hub.name,
        ca.addr,
        sans.join(", ")
    );

    // Certificate renewal: new connections get the new certificate; open ones keep theirs.
    let (acceptor_tx, acceptor) = watch::channel(acceptor);
    {
        let (ca, name, sans) = (ca.clone(), name.clone(), sans.clone());
        let (revoked, root) = (revoked.clone(), root.clone());
        tokio::spawn(async move {
            let mut not_after = not_after;
            loop {
                let now = (now_ms() / 1000) as i64;
                tokio::select! {
                    _ = tokio::time::sleep(renewal_delay(now, not_after)) => {}
                    _ = root.cancelled() => return,
                }
                let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
                loop {
                    match certified(&ca, &name, &sans, &revoked).await {
                        Ok((renewed, until)) => {
                            acceptor_tx.send_replace(renewed);
                            not_after = until;
                            tracing::info!("renewed the hub certificate (valid until {until})");
                            break;
                        }
                        Err(e) => tracing::warn!(
                            "cannot renew the hub certificate at the CA at {}: {e:#}; retrying",
                            ca.addr
                        ),
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = root.cancelled() => return,
                    }
                }
            }
        });
    }
    // Revocations.
    {
        let hub = hub.clone();
        let ca = ca.clone();
        let root = root.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(REVOCATION_POLL) => {}
                    _ = root.cancelled() => return,
                }
                match ca.all_revocations(since).await {
                    Ok(feed) => {
                        failing = false;
                        for r in &feed.revocations {
                            tracing::info!(
                                "certificate of user {} (serial {}) revoked",
                                r.name,
                                r.serial
                            );
                            hub.revoked.insert(r.serial.clone());
                        }
                        since = feed.last;
                        if !feed.revocations.is_empty() {
                            hub.drop_revoked();
                        }
                    }
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!("cannot poll revocations from the CA: {e:#}");
                    }
                    Err(_) => {}
                }
            }
        });
    }
    // Liveness.
    {
        let hub = hub.clone();
        let root = root.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(SWEEP_INTERVAL) => hub.sweep(),
                    _ = root.cancelled() => return,
                }
            }
        });
    }

    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut next_conn: u64 = 0;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => break,
        };
        let (stream, addr) = match accepted {
            Ok(v) => v,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly rather than spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(conn_permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!("connection limit reached; refusing {addr}");
            continue;
        };
        next_conn += 1;
        let conn_id = next_conn;
        let hub = hub.clone();
        let acceptor = acceptor.borrow().clone();
        let handshakes = handshakes.clone();
        let kill = root.child_token();
        tokio::spawn(async move {
            let _conn_permit = conn_permit;
            if let Err(e) =
                serve_connection(hub, acceptor, handshakes, stream, addr, conn_id, kill).await
            {
                tracing::debug!("connection from {addr}: {e:#}");
            }
        });
    }
    root.cancel();
    tracing::info!("hub stopped");
    Ok(())
}

async fn serve_connection(
    hub: Arc<Hub>,
    acceptor: Arc<ServerConfig>,
    handshakes: Arc<Semaphore>,
    stream: TcpStream,
    addr: SocketAddr,
    conn_id: u64,
    kill: CancellationToken,
) -> Result<()> {
    let _ = stream.set_nodelay(true);
    let tls = {
        let _permit = handshakes.acquire().await?;
        tokio::time::timeout(HANDSHAKE_TIMEOUT, ztm_tls::accept(acceptor, stream))
            .await
            .map_err(|_| anyhow!("TLS handshake timed out"))??
    };
    let cert = tls
        .peer_certificates()
        .first()
        .ok_or_else(|| anyhow!("no client certificate"))?;
    let info = ztm_pki::cert_info(cert.as_ref())?;
    let alpn = tls.alpn_protocol().map(|a| a.to_vec());
    let peer = Peer {
        user: info.common_name,
        serial: info.serial,
        addr,
    };
    match alpn.as_deref() {
        Some(a) if a == ALPN_CONTROL => crate::control::serve(hub, tls, peer, conn_id, kill).await,
        Some(a) if a == ALPN_REVERSE => crate::reverse::serve(hub, tls, peer, kill).await,
        _ => Err(anyhow!("no known ALPN protocol")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_hosts() {
        assert_eq!(host_of("127.0.0.1:8888"), "127.0.0.1");
        assert_eq!(host_of("[::1]:8888"), "::1");
        assert_eq!(host_of("hub.example.com"), "hub.example.com");
        let local: SocketAddr = "127.0.0.1:8888".parse().unwrap();
        assert_eq!(
            hub_name(&["hub.example.com:8888".into()], local),
            "hub.example.com-8888"
        );
        assert_eq!(hub_name(&[], local), "127.0.0.1-8888");
    }

    #[test]
    fn certificates_are_renewed_after_two_thirds_of_their_remaining_life() {
        assert_eq!(renewal_delay(1_000, 1_030), Duration::from_secs(20));
        let year = 365 * 24 * 3600;
        assert_eq!(
            renewal_delay(0, year),
            Duration::from_secs(year as u64 / 3 * 2)
        );
        // Expired or about to: at once (a second from now), never a busy loop.
        assert_eq!(renewal_delay(2_000, 1_000), Duration::from_secs(1));
        assert_eq!(renewal_delay(1_000, 1_001), Duration::from_secs(1));
    }
}
