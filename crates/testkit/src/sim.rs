//! Simulated endpoints for `ztm bench scale`: each does what an honest agent does at a hub
//! (PROTOCOL.md) and nothing more — a control connection that carries lines, as an agent's
//! does until it first needs HTTP/2: it registers the endpoint with one service, asks for the
//! CRL, sends a heartbeat every 15 s and asks for the CRL again when a heartbeat's answer names
//! a newer one; and a reverse connection started on demand, bound by its hello line and then
//! dormant until the hub starts HTTP/2 on it — with real TLS (and HTTP/2 where the hub starts
//! it) on loopback, many of them in one process. Each dials from
//! its own address of 127.0.0.0/8, as computers of a real mesh come from their own addresses.
//! A session that fails is started again after a pause, as an agent does.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;
use tokio_util::task::AbortOnDropHandle;
use ztm_net::lines::{self, LineReader};
use ztm_net::{h2io, on_demand};
use ztm_proto::wire::{
    self, ControlLine, Hello, LineAnswer, Proto, ServiceDecl, BACKOFF_MAX, BACKOFF_MIN,
    HEARTBEAT_INTERVAL, PROTOCOL_VERSION, REQUEST_TIMEOUT,
};

use crate::dir::rand_u64;
use crate::mesh::User;

/// One user's TLS configurations: control and reverse connections.
pub struct SimUser {
    pub name: String,
    /// The mesh CA, to read the CRLs the hub hands out.
    ca_pem: String,
    control: Arc<ClientConfig>,
    lister: Arc<ClientConfig>,
    reverse: Arc<ClientConfig>,
}

impl SimUser {
    pub fn new(ca_pem: &str, user: &User) -> Result<SimUser> {
        let config = |alpn| -> Result<Arc<ClientConfig>> {
            Ok(Arc::new(
                ztm_pki::agent_client_config(ca_pem, &user.cert, &user.key, alpn)
                    .map_err(|e| anyhow!("TLS configuration of {}: {e}", user.name))?,
            ))
        };
        Ok(SimUser {
            name: user.name.clone(),
            ca_pem: ca_pem.to_string(),
            control: config(ztm_pki::ALPN_CONTROL_ON_DEMAND)?,
            lister: config(ztm_pki::ALPN_CONTROL)?,
            reverse: {
                let mut c = ztm_pki::agent_client_config(
                    ca_pem,
                    &user.cert,
                    &user.key,
                    ztm_pki::ALPN_REVERSE_ON_DEMAND,
                )
                .map_err(|e| anyhow!("TLS configuration of {}: {e}", user.name))?;
                // What an agent offers; a hub that does not know the first is refused below.
                c.alpn_protocols = vec![
                    ztm_pki::ALPN_REVERSE_ON_DEMAND.to_vec(),
                    ztm_pki::ALPN_REVERSE.to_vec(),
                ];
                Arc::new(c)
            },
        })
    }
}

/// What all simulated endpoints report, and how they are stopped.
#[derive(Default)]
pub struct Fleet {
    /// Endpoints registered with their reverse connection bound (each counted once).
    pub ready: AtomicUsize,
    /// Sessions that failed and were started again.
    pub retries: AtomicU64,
    /// Heartbeats answered with anything but 204, or not at all.
    pub missed: AtomicU64,
    /// While set, each heartbeat's round trip is kept (microseconds).
    pub recording: AtomicBool,
    pub heartbeats: Mutex<Vec<u32>>,
    /// The last reason a session failed.
    pub last_error: Mutex<Option<String>>,
    /// How many sessions failed for each kind of reason (the reason with numbers left out).
    pub reasons: Mutex<std::collections::HashMap<String, u64>>,
    stop: AtomicBool,
    stopped: tokio::sync::Notify,
}

impl Fleet {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.stopped.notify_waiters();
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The last reason a session failed, if one did.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The commonest reasons sessions failed, most frequent first, with their counts.
    pub fn top_reasons(&self, n: usize) -> Vec<(String, u64)> {
        let reasons = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(String, u64)> = reasons.iter().map(|(k, c)| (k.clone(), *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    /// The heartbeat round trips kept while recording, sorted.
    pub fn take_heartbeats(&self) -> Vec<u32> {
        let mut v = std::mem::take(&mut *self.heartbeats.lock().unwrap_or_else(|p| p.into_inner()));
        v.sort_unstable();
        v
    }
}

/// The source address of simulated endpoint `i`: 127.1.0.1, 127.1.0.2, … (65,000 of them).
pub fn source(i: usize) -> IpAddr {
    let i = u32::try_from(i % 65_000).unwrap_or(0) + 1;
    IpAddr::V4(Ipv4Addr::new(127, 1, (i >> 8) as u8, (i & 0xff) as u8))
}

/// Runs simulated endpoint `i` (named `sim-{i}`, publishing `tcp/svc-{i}`) as `user` against
/// `hub` until the fleet is stopped.
pub async fn run(i: usize, user: Arc<SimUser>, hub: SocketAddr, fleet: Arc<Fleet>) {
    let nonce = wire::new_id_nonce();
    let id = wire::endpoint_id(&user.name, &nonce);
    let mut counted = false;
    let mut backoff = BACKOFF_MIN;
    while !fleet.stopping() {
        let session = session(i, &user, &nonce, &id, hub, &fleet, &mut counted);
        let result = tokio::select! {
            r = session => r,
            _ = fleet.stopped.notified() => return,
        };
        if fleet.stopping() {
            return;
        }
        if let Err(e) = result {
            fleet.retries.fetch_add(1, Ordering::Relaxed);
            let text = format!("{e:#}");
            let kind: String = text
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .take(100)
                .collect();
            *fleet
                .reasons
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(kind)
                .or_default() += 1;
            *fleet.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
        }
        // As an agent: a pause that doubles up to its maximum, with jitter.
        let jitter = rand_u64() % (backoff.as_millis() as u64 + 1);
        tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn dial(from: IpAddr, hub: SocketAddr, config: &Arc<ClientConfig>) -> Result<Tls> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let tcp = socket.connect(hub).await.context("connect")?;
    let _ = tcp.set_nodelay(true);
    let name = ztm_pki::rustls::pki_types::ServerName::from(hub.ip());
    TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .context("TLS")
}

async fn session(
    i: usize,
    user: &SimUser,
    nonce: &str,
    id: &str,
    hub: SocketAddr,
    fleet: &Fleet,
    counted: &mut bool,
) -> Result<()> {
    let from = source(i);
    let tls = tokio::time::timeout(REQUEST_TIMEOUT, dial(from, hub, &user.control))
        .await
        .map_err(|_| anyhow!("control connection: no TLS within {REQUEST_TIMEOUT:?}"))??;
    let mut control = tls;
    if control.get_ref().1.alpn_protocol() != Some(ztm_pki::ALPN_CONTROL_ON_DEMAND) {
        bail!("the hub does not carry lines on control connections");
    }
    let mut reader = LineReader::new();
    let register = ControlLine::Register {
        id: id.to_string(),
        protocol: PROTOCOL_VERSION.to_string(),
        name: format!("sim-{i:05}"),
        services: vec![ServiceDecl {
            protocol: Proto::Tcp,
            name: format!("svc-{i:05}"),
            users: None,
        }],
        nonce: Some(nonce.to_string()),
    };
    let answer = ask(&mut control, &mut reader, &register).await?;
    if answer.status != 200 {
        bail!("register: {}", answer.words());
    }
    let session = answer.session.unwrap_or_default();
    let mut crl = None;
    crl_by_line(&mut control, &mut reader, &user.ca_pem, &mut crl).await?;

    let tls = tokio::time::timeout(REQUEST_TIMEOUT, dial(from, hub, &user.reverse))
        .await
        .map_err(|_| anyhow!("reverse connection: no TLS within {REQUEST_TIMEOUT:?}"))??;

    let mut tls = tls;
    if tls.get_ref().1.alpn_protocol() != Some(ztm_pki::ALPN_REVERSE_ON_DEMAND) {
        bail!("the hub does not start reverse connections on demand");
    }
    let hello = Hello {
        endpoint: id.to_string(),
        session,
    };
    on_demand::say_hello(&mut tls, &hello).await?;
    // Dormant until the hub needs it; then an HTTP/2 server that has nothing to offer.
    let reverse = tokio::spawn(async move {
        let Some(io) = on_demand::await_first_bytes(tls).await else {
            return;
        };
        let Ok(mut server) = h2io::server_builder().handshake::<_, Bytes>(io).await else {
            return;
        };
        while let Some(Ok((_, respond))) = server.accept().await {
            h2io::respond_error(respond, http::StatusCode::NOT_FOUND, "a simulated endpoint");
        }
    });
    let _reverse = AbortOnDropHandle::new(reverse);
    if !*counted {
        *counted = true;
        fleet.ready.fetch_add(1, Ordering::SeqCst);
    }

    // Heartbeats, the first at a random point of the interval (agents do not start in step).
    let first = Duration::from_millis(rand_u64() % HEARTBEAT_INTERVAL.as_millis() as u64);
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + first, HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let started = Instant::now();
        let beat = ControlLine::Heartbeat { id: id.to_string() };
        let answer = ask(&mut control, &mut reader, &beat).await;
        let rtt = started.elapsed();
        match answer {
            Ok(a) if a.status == 204 => {
                if fleet.recording.load(Ordering::Relaxed) {
                    let us = u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX);
                    fleet
                        .heartbeats
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(us);
                }
                if a.crl_number > crl {
                    crl_by_line(&mut control, &mut reader, &user.ca_pem, &mut crl).await?;
                }
            }
            Ok(a) => {
                fleet.missed.fetch_add(1, Ordering::Relaxed);
                bail!("heartbeat: {}", a.words());
            }
            Err(e) => {
                fleet.missed.fetch_add(1, Ordering::Relaxed);
                return Err(e.context("heartbeat"));
            }
        }
    }
}

/// One request line and its answer, within [`REQUEST_TIMEOUT`].
async fn ask(control: &mut Tls, reader: &mut LineReader, line: &ControlLine) -> Result<LineAnswer> {
    Ok(lines::ask(control, reader, line, 32 << 20).await?)
}

/// Asks for a CRL newer than number `held`, as an agent does, and keeps its number.
async fn crl_by_line(
    control: &mut Tls,
    reader: &mut LineReader,
    ca_pem: &str,
    held: &mut Option<u64>,
) -> Result<()> {
    let answer = ask(control, reader, &ControlLine::Crl { after: *held }).await?;
    if let Some(pem) = answer.crl {
        let crl = ztm_pki::parse_crl(ca_pem, &pem).map_err(|e| anyhow!("CRL: {e}"))?;
        *held = Some(crl.number);
    }
    Ok(())
}

/// A control connection that only lists (a hub closes it after 30 s without a registration).
pub struct Lister {
    sender: h2::client::SendRequest<Bytes>,
    _conn: AbortOnDropHandle<()>,
}

impl Lister {
    pub async fn connect(user: &SimUser, hub: SocketAddr) -> Result<Lister> {
        let tls = dial(source(65_000 - 1), hub, &user.lister).await?;
        let (sender, conn) = h2io::client_builder().handshake(tls).await?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Lister {
            sender,
            _conn: AbortOnDropHandle::new(conn),
        })
    }

    /// `GET path`: how long the whole answer took, and its size.
    pub async fn get(&self, path: &str) -> Result<(Duration, usize)> {
        let started = Instant::now();
        let req = h2io::build(http::Method::GET, path)?.body(())?;
        let a = h2io::request(&self.sender, req, Bytes::new(), 256 << 20, REQUEST_TIMEOUT).await?;
        if a.status != http::StatusCode::OK {
            bail!("GET {path}: {} {}", a.status, a.error_message());
        }
        Ok((started.elapsed(), a.body.len()))
    }
}
