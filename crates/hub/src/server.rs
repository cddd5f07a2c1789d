//! The hub process: certificate at start, the TLS accept loop, and the background jobs
//! (certificate renewal, revocation polling, liveness sweeping). The accept loop owns the
//! listening socket and what strangers may hold before they are authenticated; [`Hub`] owns
//! the shared state.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use ztm_net::backoff::Backoff;
use ztm_net::now_ms;
use ztm_pki::rustls::ServerConfig;
use ztm_pki::{
    Revoked, ALPN_CONTROL, ALPN_CONTROL_ON_DEMAND, ALPN_REVERSE, ALPN_REVERSE_ON_DEMAND,
};
use ztm_proto::addr::HostPort;
use ztm_proto::wire::{HANDSHAKE_TIMEOUT, REVOCATION_POLL};

use crate::ca_client::{CaClient, CaPin, NotPinned};
use crate::closer::{Closer, FAREWELL_TIMEOUT};
use crate::limits::{
    source_key, Counter, FileBudget, Limits, Refused, CLIENT_HELLO_TIMEOUT, FILE_RESERVE,
};
use crate::metrics::Handshake;
pub use crate::metrics_api::MetricsListen;
use crate::state::Tls;
pub use crate::state::{Hub, Peer};

const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
/// The CA's CRL is fetched again after a revocation, and at least this often (the CA signs a
/// fresh one hourly, valid for a day).
const CRL_REFRESH: Duration = Duration::from_secs(3600);
/// How long a hub may go without fresh revocations before it refuses new sessions, unless the
/// operator says otherwise.
pub const DEFAULT_REVOCATION_MAX_AGE: Duration = Duration::from_secs(120);

pub struct HubConfig {
    /// The CA: `https://HOST:PORT`, or `HOST:PORT` / `http://HOST:PORT` (loopback only).
    pub ca: String,
    /// The CA's admin token or this hub's hub token.
    pub ca_token: Option<String>,
    /// The CA certificate or its fingerprint; required for a CA that is not on loopback.
    pub ca_pin: Option<CaPin>,
    /// This hub's name at the CA (`hub/{id}`); by default made from its first address.
    pub id: Option<String>,
    /// Addresses (HOST:PORT) agents reach this hub at.
    pub names: Vec<String>,
    pub limits: Limits,
    /// Past this age of the last successful revocation poll, new sessions are refused.
    pub revocation_max_age: Duration,
    /// Where to serve `GET /metrics` (Prometheus), if anywhere.
    pub metrics: Option<MetricsListen>,
}

impl HubConfig {
    pub fn new(ca: &str, names: Vec<String>) -> Self {
        Self {
            ca: ca.to_string(),
            ca_token: None,
            ca_pin: None,
            id: None,
            names,
            limits: Limits::default(),
            revocation_max_age: DEFAULT_REVOCATION_MAX_AGE,
            metrics: None,
        }
    }
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

/// Fetches the CA's CRL into `revoked` (what agents get from this hub); false if that failed.
async fn refresh_crl(ca: &CaClient, revoked: &Revoked) -> bool {
    match ca.crl().await {
        Ok(crl) => {
            let (number, len) = (crl.number, crl.len());
            if revoked.crl().offer(crl) {
                tracing::info!("CRL number {number} from the CA ({len} revoked certificates)");
            }
            true
        }
        Err(e) => {
            tracing::warn!("cannot get the CRL from the CA at {}: {e:#}", ca.addr);
            false
        }
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

/// Raises this process's open-file limit to its hard limit (each connection is a file):
/// how many it may hold, if known.
fn raise_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!("cannot raise the open-file limit: {e}");
            None
        }
    }
}

/// Logs a repeated warning at most once per period, with how many were not logged.
struct Throttled {
    period: Duration,
    last: Option<Instant>,
    skipped: u64,
}

impl Throttled {
    fn new(period: Duration) -> Self {
        Self {
            period,
            last: None,
            skipped: 0,
        }
    }

    /// Whether to log now, and how many were skipped since the last one logged.
    fn tick(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < self.period)
        {
            self.skipped += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.skipped))
    }
}

/// Runs the hub on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: HubConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    // Before anything connects anywhere: the CA must be one the hub can authenticate.
    let ca = Arc::new(CaClient::new(
        &config.ca,
        config.ca_token.clone(),
        config.ca_pin.clone(),
    )?);
    if let Some(id) = &config.id {
        ztm_proto::names::check_name(id).map_err(|e| anyhow!("bad hub id {id:?}: {e}"))?;
    }
    let files = raise_file_limit();
    let local = listener.local_addr()?;
    let name = config
        .id
        .clone()
        .unwrap_or_else(|| hub_name(&config.names, local));
    let mut sans: Vec<String> = config
        .names
        .iter()
        .map(|n| HostPort::host_of(n).to_string())
        .collect();
    if sans.is_empty() {
        sans = vec!["localhost".into(), "127.0.0.1".into()];
    }
    let revoked = Revoked::default();
    let root = CancellationToken::new();
    tokio::pin!(shutdown);

    // Get a certificate, waiting for the CA if it is not up yet.
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    let ((acceptor, not_after), mut since) = loop {
        match obtain_tls(&ca, &name, &sans, &revoked).await {
            Ok(v) => break v,
            Err(e) if e.downcast_ref::<NotPinned>().is_some() => {
                tracing::error!("{e:#}; the hub does not start with it, and tries again");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = &mut shutdown => return Ok(()),
                }
            }
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
    let limits = config.limits.clone();
    let metrics = Arc::new(
        crate::metrics::Metrics::new().map_err(|e| anyhow!("setting up the metrics: {e}"))?,
    );
    let hub = Arc::new(Hub::new(
        format!("hub/{name}"),
        limits.clone(),
        revoked.clone(),
        config.revocation_max_age,
        metrics,
    ));
    if let Some(listen) = config.metrics {
        let addr = listen.listener.local_addr()?;
        crate::metrics_api::spawn(hub.clone(), listen, root.clone())?;
        tracing::info!("hub metrics on http://{addr}/metrics");
    }
    let budget = FileBudget::of(files, &limits);
    tracing::info!(
        "hub {} listening on {local} (CA {}, names: {}); open-file limit {}",
        hub.name,
        ca.addr,
        sans.join(", "),
        files.map_or("unknown".to_string(), |n| format!(
            "{n}: {} connections, about {} endpoints",
            budget.connections,
            budget.connections / 2
        ))
    );
    if budget.connections < 64 {
        tracing::warn!(
            "the open-file limit leaves room for {} connections ({FILE_RESERVE} files are kept \
             for the hub itself): raise it (ulimit -n, LimitNOFILE=)",
            budget.connections
        );
    }

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
    // Revocations: every poll sweeps every connection against the whole set, so a connection
    // opened before a revocation and used only after it is found too. The CA's CRL, which
    // agents get from the hub, is fetched again after each revocation.
    let mut crl_at = refresh_crl(&ca, &revoked).await.then(Instant::now);
    {
        let hub = hub.clone();
        let ca = ca.clone();
        let root = root.clone();
        let own = format!("hub/{name}");
        tokio::spawn(async move {
            let mut failing = false;
            let mut stale_logged = false;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(REVOCATION_POLL) => {}
                    _ = root.cancelled() => return,
                }
                match ca.all_revocations(since).await {
                    Ok(feed) => {
                        if failing {
                            tracing::info!("the CA answers again; revocations are up to date");
                        }
                        failing = false;
                        stale_logged = false;
                        hub.revocations.polled(now_ms());
                        hub.metrics.revocations(feed.revocations.len() as u64);
                        for r in &feed.revocations {
                            if r.name == own {
                                tracing::error!(
                                    "this hub's certificate (serial {}) has been revoked at the \
                                     CA: agents refuse it",
                                    r.serial
                                );
                            } else {
                                tracing::info!(
                                    "certificate {} (serial {}) revoked",
                                    r.name,
                                    r.serial
                                );
                            }
                            hub.revoked.insert(r.serial.clone());
                        }
                        since = feed.last;
                        let due = crl_at.is_none_or(|at| at.elapsed() >= CRL_REFRESH);
                        if (!feed.revocations.is_empty() || due)
                            && refresh_crl(&ca, &hub.revoked).await
                        {
                            crl_at = Some(Instant::now());
                        }
                    }
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!("cannot poll revocations from the CA: {e:#}");
                    }
                    Err(_) => {}
                }
                let closed = hub.drop_revoked();
                if closed > 0 {
                    tracing::info!("closed {closed} connections that use revoked certificates");
                }
                if !hub.revocations.fresh(now_ms()) && !stale_logged {
                    stale_logged = true;
                    tracing::error!(
                        "no revocations from the CA for over {:?}: refusing new sessions until \
                         it answers (a certificate revoked meanwhile could not be refused)",
                        hub.revocations.max_age
                    );
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

    let handshakes = Arc::new(Semaphore::new(limits.handshakes));
    let strangers: Counter<IpAddr> =
        Counter::new(limits.unauthenticated_per_source, budget.unauthenticated);
    // Every connection holds a permit while it lives: the hub never runs out of files (its
    // CA polls and certificate renewals need some), and a connection over the limit is
    // closed at once rather than left waiting in the kernel's queue.
    let open = Arc::new(Semaphore::new(
        budget.connections.min(Semaphore::MAX_PERMITS),
    ));
    let mut full_log = Throttled::new(Duration::from_secs(10));
    let mut refused_log = Throttled::new(Duration::from_secs(10));
    let mut accept_log = Throttled::new(Duration::from_secs(10));
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
                if let Some(skipped) = accept_log.tick() {
                    tracing::warn!("accept failed: {e} ({skipped} more not logged)");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(file) = open.clone().try_acquire_owned() else {
            drop(stream);
            hub.metrics.refused_full();
            if let Some(skipped) = full_log.tick() {
                tracing::warn!(
                    "refused a connection from {addr}: the hub holds {} connections, all its \
                     open-file limit allows; {skipped} more refused since the last warning",
                    budget.connections
                );
            }
            continue;
        };
        let slot = match strangers.try_take(source_key(addr.ip())) {
            Ok(slot) => slot,
            Err(why) => {
                if let Some(skipped) = refused_log.tick() {
                    let why = match why {
                        Refused::Key(n) => format!("{n} from that address"),
                        Refused::Total(n) => format!("{n} in all"),
                    };
                    tracing::warn!(
                        "refused a connection from {addr}: as many connections as allowed are \
                         still handshaking ({why}); {skipped} more refused since the last warning"
                    );
                }
                continue;
            }
        };
        next_conn += 1;
        let conn_id = next_conn;
        let hub = hub.clone();
        let acceptor = acceptor.borrow().clone();
        let handshakes = handshakes.clone();
        let kill = Closer::child_of(&root);
        // The user is known once the handshake is done (`serve_connection` records it).
        let span = tracing::info_span!("connection", from = %addr, user = tracing::field::Empty);
        let task = async move {
            let _file = file;
            if let Err(e) =
                serve_connection(hub, acceptor, handshakes, slot, stream, addr, conn_id, kill).await
            {
                tracing::debug!("connection from {addr}: {e:#}");
            }
        };
        tokio::spawn(task.instrument(span));
    }
    root.cancel();
    // Every connection says why it closes (GOAWAY "hub shutting down") before the process ends.
    let deadline = Instant::now() + FAREWELL_TIMEOUT;
    while hub.connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!("hub stopped");
    Ok(())
}

/// Waits for the first bytes of a ClientHello; false if the connection closed first.
async fn client_hello_arrives(stream: &TcpStream) -> Result<bool> {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(CLIENT_HELLO_TIMEOUT, stream.peek(&mut byte)).await {
        Ok(Ok(0)) => Ok(false),
        Ok(Ok(_)) => Ok(true),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(anyhow!(
            "no TLS ClientHello within {CLIENT_HELLO_TIMEOUT:?}"
        )),
    }
}

/// One connection, from its first byte to its end. Each phase is a future of its own on the
/// heap, sized for that phase alone: the task that holds an idle endpoint's connection for
/// hours keeps only what serving needs, not the handshake's state beside it (a future holds
/// room for every variable it has across an await; one per connection, two per endpoint).
#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    hub: Arc<Hub>,
    acceptor: Arc<ServerConfig>,
    handshakes: Arc<Semaphore>,
    stranger: crate::limits::Slot<IpAddr>,
    stream: TcpStream,
    addr: SocketAddr,
    conn_id: u64,
    kill: Closer,
) -> Result<()> {
    let handshake = Box::pin(handshake(&hub, acceptor, handshakes, stranger, stream));
    let Some(tls) = handshake.await? else {
        return Ok(());
    };
    Box::pin(serve_tls(hub, tls, addr, conn_id, kill)).await
}

/// The TLS handshake of a new connection (`None`: it closed before saying anything). The
/// stranger's slot is held until it is done.
async fn handshake(
    hub: &Hub,
    acceptor: Arc<ServerConfig>,
    handshakes: Arc<Semaphore>,
    stranger: crate::limits::Slot<IpAddr>,
    stream: TcpStream,
) -> Result<Option<Tls>> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let _ = stream.set_nodelay(true);
    // Dormant reverse connections carry no bytes: TCP keepalive keeps them known to middleboxes
    // and finds agents that vanished (PROTOCOL.md, "Reverse connection").
    let _ = ztm_net::on_demand::keepalive(&stream);
    if !client_hello_arrives(&stream).await? {
        return Ok(None);
    }
    // Waiting for a handshake slot counts against the same deadline as the handshake itself:
    // a stranger holds a connection for at most that long.
    let handshaking = hub.metrics.handshaking();
    let tls = tokio::time::timeout_at(deadline, async {
        let _permit = handshakes.acquire().await?;
        Ok::<_, anyhow::Error>(ztm_tls::accept(acceptor, stream).await?)
    })
    .await;
    drop(handshaking);
    drop(stranger);
    match tls {
        Ok(Ok(tls)) => {
            hub.metrics.handshake(Handshake::Ok);
            Ok(Some(Box::new(tls)))
        }
        Ok(Err(e)) => {
            hub.metrics.handshake(Handshake::of_error(&e));
            Err(e)
        }
        Err(_) => {
            hub.metrics.handshake(Handshake::Timeout);
            Err(anyhow!(
                "TLS handshake not done within {HANDSHAKE_TIMEOUT:?}"
            ))
        }
    }
}

/// A connection whose handshake is done: admitted, then served as its ALPN protocol says, or
/// refused.
async fn serve_tls(
    hub: Arc<Hub>,
    mut tls: Tls,
    addr: SocketAddr,
    conn_id: u64,
    kill: Closer,
) -> Result<()> {
    // What the hub needs of the certificate is read here; the connection keeps no copy.
    let chain = tls.take_peer_certificates();
    let cert = chain
        .first()
        .ok_or_else(|| anyhow!("no client certificate"))?;
    let info = ztm_pki::cert_info(cert.as_ref())?;
    drop(chain);
    let alpn = tls.alpn_protocol().map(|a| a.to_vec());
    tracing::Span::current().record("user", info.common_name.as_str());
    let peer = Peer {
        user: info.common_name,
        serial: info.serial,
        addr,
    };
    let handle = match hub.admit(conn_id, &peer, kill.clone()) {
        Ok(h) => h,
        Err(refusal) => {
            tracing::warn!(
                "connection of user {} from {addr} refused: {}",
                peer.user,
                refusal.message
            );
            if alpn.as_deref() == Some(ALPN_CONTROL) {
                Box::pin(crate::control::refuse(tls, refusal)).await;
            } else if alpn.as_deref() == Some(ALPN_CONTROL_ON_DEMAND) {
                Box::pin(crate::control::refuse_lines(tls, refusal)).await;
            } else if alpn.as_deref() == Some(ALPN_REVERSE_ON_DEMAND) {
                Box::pin(crate::reverse::refuse_on_demand(tls, refusal)).await;
            } else {
                Box::pin(crate::reverse::refuse(tls, refusal)).await;
            }
            return Ok(());
        }
    };
    let result = match alpn.as_deref() {
        Some(a) if a == ALPN_CONTROL || a == ALPN_CONTROL_ON_DEMAND => {
            let lines = a == ALPN_CONTROL_ON_DEMAND;
            Box::pin(crate::control::serve(hub, tls, peer, conn_id, kill, lines)).await
        }
        Some(a) if a == ALPN_REVERSE => Box::pin(crate::reverse::serve(hub, tls, peer, kill)).await,
        Some(a) if a == ALPN_REVERSE_ON_DEMAND => {
            Box::pin(crate::reverse::serve_on_demand(hub, tls, peer, kill)).await
        }
        _ => Err(anyhow!("no known ALPN protocol")),
    };
    drop(handle);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn of 8, 5 or 4 arguments returns.
    fn future_size8<A, B, C, D, E, F, G, H, Fut>(_: fn(A, B, C, D, E, F, G, H) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }
    fn future_size6<A, B, C, D, E, F, Fut>(_: fn(A, B, C, D, E, F) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }
    fn future_size5<A, B, C, D, E, Fut>(_: fn(A, B, C, D, E) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }
    fn future_size4<A, B, C, D, Fut>(_: fn(A, B, C, D) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// Every endpoint holds two connections for as long as it is online, each a task whose
    /// future has room for every variable it keeps across an await. The phases of a connection
    /// are futures of their own, boxed one inside the other, so that an idle connection keeps
    /// what serving it needs and not, beside it, the handshake's state, the refusal's, or the
    /// other kind of connection's (all inline, that was over 16 KiB per connection).
    #[test]
    fn an_open_connection_holds_small_futures() {
        let sizes = [
            ("serve_connection", future_size8(serve_connection), 1024),
            ("serve_tls", future_size5(serve_tls), 1024),
            ("control::serve", future_size6(crate::control::serve), 1024),
            (
                "reverse::serve",
                future_size4(crate::reverse::serve),
                2 * 1024,
            ),
            (
                "reverse::serve_on_demand",
                future_size4(crate::reverse::serve_on_demand),
                2 * 1024,
            ),
        ];
        for (name, size, most) in sizes {
            eprintln!("{name}: {size} bytes");
            assert!(size <= most, "{name}: {size} bytes, more than {most}");
        }
    }

    #[test]
    fn names_and_hosts() {
        assert_eq!(HostPort::host_of("127.0.0.1:8888"), "127.0.0.1");
        assert_eq!(HostPort::host_of("[::1]:8888"), "::1");
        assert_eq!(HostPort::host_of("hub.example.com"), "hub.example.com");
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
        // A certificate of the default lifetime (30 days) is renewed after 20.
        let lifetime = ztm_pki::HUB_VALIDITY.as_secs() as i64;
        assert_eq!(
            renewal_delay(0, lifetime),
            Duration::from_secs(20 * 24 * 3600)
        );
        // Expired or about to: at once (a second from now), never a busy loop.
        assert_eq!(renewal_delay(2_000, 1_000), Duration::from_secs(1));
        assert_eq!(renewal_delay(1_000, 1_001), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_warnings_are_throttled() {
        let mut t = Throttled::new(Duration::from_secs(10));
        assert_eq!(t.tick(), Some(0));
        assert_eq!(t.tick(), None);
        assert_eq!(t.tick(), None);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(t.tick(), Some(2));
    }
}
