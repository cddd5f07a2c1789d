//! Simulated endpoints for `ztm bench scale`: each does what an honest agent does at a hub
//! (PROTOCOL.md) and nothing more — a control connection that registers the endpoint with one
//! service, sends a heartbeat every 15 s and a PING once a minute, keeps a request for the
//! next CRL waiting at the hub (as agents follow revocations), and a reverse connection
//! started on demand, bound by its hello line and then dormant until the hub starts HTTP/2 on
//! it — with real TLS and HTTP/2 on loopback, many of them in one process. Each dials from
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
use ztm_net::{h2io, on_demand};
use ztm_proto::wire::{
    self, rtt_due, Hello, Proto, Register, Registered, ServiceDecl, BACKOFF_MAX, BACKOFF_MIN,
    HEARTBEAT_INTERVAL, PROTOCOL_HEADER, PROTOCOL_VERSION, REQUEST_TIMEOUT,
};

use crate::dir::rand_u64;
use crate::mesh::User;

/// One user's TLS configurations: control and reverse connections.
pub struct SimUser {
    pub name: String,
    /// The mesh CA, to read the CRLs the hub hands out.
    ca_pem: String,
    control: Arc<ClientConfig>,
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
            control: config(ztm_pki::ALPN_CONTROL)?,
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
    let (sender, mut conn) = h2io::client_builder().handshake(tls).await?;
    let mut pings = conn
        .ping_pong()
        .ok_or_else(|| anyhow!("control connection: no PING handle"))?;
    let control = tokio::spawn(async move {
        let _ = conn.await;
    });
    let _control = AbortOnDropHandle::new(control);
    let register = Register {
        name: format!("sim-{i:05}"),
        services: vec![ServiceDecl {
            protocol: Proto::Tcp,
            name: format!("svc-{i:05}"),
            users: None,
        }],
        nonce: Some(nonce.to_string()),
    };
    let req = h2io::build(http::Method::POST, &format!("/api/endpoints/{id}"))?
        .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string())
        .header("content-type", "application/json")
        .body(())?;
    let body = Bytes::from(serde_json::to_vec(&register)?);
    let answer = h2io::request(&sender, req, body, 64 * 1024, REQUEST_TIMEOUT).await?;
    if answer.status != http::StatusCode::OK {
        bail!("register: {} {}", answer.status, answer.error_message());
    }
    let registered: Registered = answer.json()?;

    let tls = tokio::time::timeout(REQUEST_TIMEOUT, dial(from, hub, &user.reverse))
        .await
        .map_err(|_| anyhow!("reverse connection: no TLS within {REQUEST_TIMEOUT:?}"))??;
    let crl = tokio::spawn(follow_crl(sender.clone(), user.ca_pem.clone()));
    let _crl = AbortOnDropHandle::new(crl);

    let mut tls = tls;
    if tls.get_ref().1.alpn_protocol() != Some(ztm_pki::ALPN_REVERSE_ON_DEMAND) {
        bail!("the hub does not start reverse connections on demand");
    }
    let hello = Hello {
        endpoint: id.to_string(),
        session: registered.session,
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
    let mut beats: u32 = 0;
    loop {
        tick.tick().await;
        let req = h2io::build(
            http::Method::POST,
            &format!("/api/endpoints/{id}/heartbeat"),
        )?
        .body(())?;
        let started = Instant::now();
        let answer = h2io::request(&sender, req, Bytes::new(), 4096, REQUEST_TIMEOUT).await;
        let rtt = started.elapsed();
        match answer {
            Ok(a) if a.status == http::StatusCode::NO_CONTENT => {
                if fleet.recording.load(Ordering::Relaxed) {
                    let us = u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX);
                    fleet
                        .heartbeats
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(us);
                }
            }
            Ok(a) => {
                fleet.missed.fetch_add(1, Ordering::Relaxed);
                bail!("heartbeat: {} {}", a.status, a.error_message());
            }
            Err(e) => {
                fleet.missed.fetch_add(1, Ordering::Relaxed);
                return Err(e.context("heartbeat"));
            }
        }
        // The round-trip PING an agent sends after some heartbeats (PROTOCOL.md).
        beats += 1;
        if rtt_due(beats) {
            tokio::time::timeout(REQUEST_TIMEOUT, pings.ping(h2::Ping::opaque()))
                .await
                .map_err(|_| anyhow!("no PING ACK within {REQUEST_TIMEOUT:?}"))?
                .context("PING")?;
        }
    }
}

/// Follows the hub's CRL as an agent does (PROTOCOL.md, "Control connection"): asks for a newer
/// one than it holds, which the hub answers when one comes or after 50 s; asks again at once
/// after a long wait, and after a minute when the answer came quickly.
async fn follow_crl(sender: h2::client::SendRequest<Bytes>, ca_pem: String) {
    const INTERVAL: Duration = Duration::from_secs(60);
    let mut number: Option<u64> = None;
    loop {
        let started = Instant::now();
        let path = match number {
            Some(n) => format!("/api/crl?after={n}"),
            None => "/api/crl".to_string(),
        };
        let Ok(req) = h2io::build(http::Method::GET, &path).and_then(|b| Ok(b.body(())?)) else {
            return;
        };
        let mut newer = false;
        match h2io::request(
            &sender,
            req,
            Bytes::new(),
            16 << 20,
            INTERVAL + REQUEST_TIMEOUT,
        )
        .await
        {
            Ok(a) if a.status == http::StatusCode::OK => {
                if let Ok(crl) = ztm_pki::parse_crl(&ca_pem, &String::from_utf8_lossy(&a.body)) {
                    newer = number.is_none_or(|n| crl.number > n);
                    number = Some(crl.number);
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
        let waited = started.elapsed();
        if !newer && waited < INTERVAL / 2 {
            tokio::time::sleep(INTERVAL - waited).await;
        }
    }
}

/// A control connection that only lists (a hub closes it after 30 s without a registration).
pub struct Lister {
    sender: h2::client::SendRequest<Bytes>,
    _conn: AbortOnDropHandle<()>,
}

impl Lister {
    pub async fn connect(user: &SimUser, hub: SocketAddr) -> Result<Lister> {
        let tls = dial(source(65_000 - 1), hub, &user.control).await?;
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
