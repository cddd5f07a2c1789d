//! Port mappings: a listener per configured port, whose connections (TCP) or client flows
//! (UDP) are carried through tunnels to the target service. Listeners that cannot open (port
//! taken) report why and retry. Each port keeps its live figures ([`PortFigures`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use bytes::Bytes;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use ztm_net::now_ms;
use ztm_proto::model::{PortStats, PortTarget};
use ztm_proto::wire::{Proto, EXIT_SERVICE};
use ztm_relay as relay;

use crate::balance::Balancer;
use crate::figures::PortFigures;
use crate::files::Party;
use crate::mesh::Mesh;
use crate::proxy;
use crate::store::PortRecord;
use crate::tunnel;

const RETRY: Duration = Duration::from_secs(5);
/// Accept queue of port listeners: bursts of new connections must not overflow it.
const LISTEN_BACKLOG: u32 = 4096;
/// Most UDP client flows one port keeps at once.
const MAX_UDP_FLOWS: usize = 16_384;
/// Datagrams queued per UDP flow while its tunnel is busy (more are dropped, as UDP may).
const UDP_QUEUE: usize = 256;

pub type PortKey = (String, Proto, u16);

#[derive(Clone, Debug, Default)]
pub struct PortState {
    pub open: bool,
    pub error: Option<String>,
}

struct Running {
    target: PortTarget,
    stop: CancellationToken,
    state: Arc<Mutex<PortState>>,
    figures: Arc<PortFigures>,
}

/// The listeners of one mesh.
#[derive(Default)]
pub struct Ports {
    running: Mutex<HashMap<PortKey, Running>>,
}

fn key(p: &PortRecord) -> PortKey {
    (p.ip.clone(), p.protocol, p.port)
}

impl Ports {
    pub fn state(&self, key: &PortKey) -> PortState {
        self.running
            .lock()
            .get(key)
            .map(|r| r.state.lock().clone())
            .unwrap_or_default()
    }

    /// The live figures of a port (zero for one not running).
    pub fn stats(&self, key: &PortKey) -> PortStats {
        self.running
            .lock()
            .get(key)
            .map(|r| r.figures.stats())
            .unwrap_or_default()
    }

    /// How many ports are listening.
    pub fn open(&self) -> usize {
        self.running
            .lock()
            .values()
            .filter(|r| r.state.lock().open)
            .count()
    }

    /// Makes the running listeners match `wanted`: starts new ones, stops removed ones and
    /// restarts those whose target changed.
    pub fn sync(&self, rt: &Arc<Mesh>, wanted: &[PortRecord]) {
        let mut running = self.running.lock();
        running.retain(|k, r| {
            let keep = wanted.iter().any(|p| key(p) == *k && p.target == r.target);
            if !keep {
                r.stop.cancel();
            }
            keep
        });
        for p in wanted {
            if running.contains_key(&key(p)) {
                continue;
            }
            let stop = rt.stopping().child_token();
            let first = bind_now(p);
            let state = Arc::new(Mutex::new(PortState {
                open: first.is_ok(),
                error: first
                    .as_ref()
                    .err()
                    .map(|e| format!("cannot listen on {}:{}/{}: {e}", p.ip, p.port, p.protocol)),
            }));
            let figures = Arc::new(PortFigures::new(rt.metrics().clone()));
            tokio::spawn(run_port(
                rt.clone(),
                p.clone(),
                stop.clone(),
                state.clone(),
                figures.clone(),
                first,
            ));
            running.insert(
                key(p),
                Running {
                    target: p.target.clone(),
                    stop,
                    state,
                    figures,
                },
            );
        }
    }

    pub fn stop_all(&self) {
        for (_, r) in self.running.lock().drain() {
            r.stop.cancel();
        }
    }
}

fn set(state: &Mutex<PortState>, open: bool, error: Option<String>) {
    let mut s = state.lock();
    s.open = open;
    s.error = error;
}

enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

fn listen_addr(port: &PortRecord) -> std::io::Result<SocketAddr> {
    let ip: std::net::IpAddr = port
        .ip
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    Ok(SocketAddr::new(ip, port.port))
}

/// Binds now (from the caller's thread, so the API can answer with the real state).
fn bind_now(port: &PortRecord) -> std::io::Result<Bound> {
    let addr = listen_addr(port)?;
    match port.protocol {
        Proto::Tcp => {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            Ok(Bound::Tcp(socket.listen(LISTEN_BACKLOG)?))
        }
        Proto::Udp => {
            let s = std::net::UdpSocket::bind(addr)?;
            s.set_nonblocking(true)?;
            Ok(Bound::Udp(UdpSocket::from_std(s)?))
        }
    }
}

async fn run_port(
    rt: Arc<Mesh>,
    port: PortRecord,
    stop: CancellationToken,
    state: Arc<Mutex<PortState>>,
    figures: Arc<PortFigures>,
    first: std::io::Result<Bound>,
) {
    let name = format!("{}:{}/{}", port.ip, port.port, port.protocol);
    let balancer = Arc::new(Balancer::default());
    let mut reported = None;
    let mut attempt = Some(first);
    loop {
        let bound = attempt.take().unwrap_or_else(|| bind_now(&port));
        match bound {
            Ok(Bound::Tcp(l)) => {
                set(&state, true, None);
                rt.event(
                    "info",
                    &format!("port {name} open, to service {}", port.target.service),
                );
                return tcp_accept_loop(&rt, l, &port.target, &balancer, &figures, &stop).await;
            }
            Ok(Bound::Udp(s)) => {
                set(&state, true, None);
                rt.event(
                    "info",
                    &format!("port {name} open, to service {}", port.target.service),
                );
                let socket = Arc::new(s);
                return udp_loop(&rt, socket, &port.target, &balancer, &figures, &stop).await;
            }
            Err(e) => {
                let message = format!("cannot listen on {name}: {e}");
                set(&state, false, Some(message.clone()));
                if reported.as_deref() != Some(message.as_str()) {
                    rt.event("error", &message);
                    reported = Some(message);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

async fn tcp_accept_loop(
    rt: &Arc<Mesh>,
    listener: TcpListener,
    target: &PortTarget,
    balancer: &Arc<Balancer>,
    figures: &Arc<PortFigures>,
    stop: &CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return,
        };
        let (socket, client) = match accepted {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // A client past the agent's budget of files is closed at once (`crate::files`).
        let file = match rt.files().take(Party::Local) {
            Ok(f) => f,
            Err(spent) => {
                figures.failed(&spent.to_string(), now_ms());
                if spent.warn {
                    rt.event(
                        "error",
                        &format!(
                            "connection from {client} to port {}: {spent}",
                            target.service
                        ),
                    );
                }
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let rt = rt.clone();
        let target = target.clone();
        let balancer = balancer.clone();
        let figures = figures.clone();
        let stop = stop.clone();
        let span = tracing::info_span!(
            "tunnel",
            mesh = %rt.name(),
            service = %format!("tcp/{}", target.service),
            client = %client
        );
        let task = async move {
            let _file = file;
            if target.service == EXIT_SERVICE {
                return proxy::serve(&rt, socket, client, &target, &balancer, &figures, &stop)
                    .await;
            }
            let opening = Instant::now();
            let opened = tokio::select! {
                o = tunnel::open(&rt, Proto::Tcp, &target, &balancer, Some(tunnel::FirstBytes::new(&socket)), None) => o,
                _ = stop.cancelled() => return,
            };
            let opened = match opened {
                Ok(o) => o,
                Err(e) => {
                    figures.failed(&e.to_string(), now_ms());
                    rt.event("error", &format!("connection from {client}: {e}"));
                    return;
                }
            };
            let _open = figures.opened(opening.elapsed());
            let what = format!("tcp/{}", target.service);
            tunnel::carry(&rt, socket, opened, &figures, &stop, &what).await;
        };
        tokio::spawn(task.instrument(span));
    }
}

async fn udp_loop(
    rt: &Arc<Mesh>,
    socket: Arc<UdpSocket>,
    target: &PortTarget,
    balancer: &Arc<Balancer>,
    figures: &Arc<PortFigures>,
    stop: &CancellationToken,
) {
    // Each flow by its client, with a number, so that a flow that ended removes itself only
    // and not a newer flow of the same client.
    let mut flows: HashMap<SocketAddr, (u64, mpsc::Sender<Bytes>)> = HashMap::new();
    let mut next_flow = 0u64;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut buf = vec![0u8; 65_536];
    loop {
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let Ok((n, client)) = r else { continue };
                let datagram = Bytes::copy_from_slice(&buf[..n]);
                let datagram = match flows.get(&client) {
                    Some((_, tx)) => match tx.try_send(datagram) {
                        // Queued, or dropped because the flow's queue is full (as UDP may).
                        Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => continue,
                        // The flow just ended: this datagram starts a new one.
                        Err(mpsc::error::TrySendError::Closed(d)) => {
                            flows.remove(&client);
                            d
                        }
                    },
                    None => datagram,
                };
                if flows.len() >= MAX_UDP_FLOWS {
                    continue;
                }
                let (tx, rx) = mpsc::channel(UDP_QUEUE);
                let _ = tx.try_send(datagram);
                next_flow += 1;
                let flow = next_flow;
                flows.insert(client, (flow, tx));
                let rt = rt.clone();
                let target = target.clone();
                let balancer = balancer.clone();
                let socket = socket.clone();
                let done = done_tx.clone();
                let stop = stop.clone();
                let figures = figures.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = async {
                            let opening = Instant::now();
                            match tunnel::open(&rt, Proto::Udp, &target, &balancer, None, None).await {
                                Ok(opened) => {
                                    let _open = figures.opened(opening.elapsed());
                                    let (to_service, from_service) = figures.meters();
                                    let meters = relay::Meters {
                                        sent: &to_service,
                                        received: &from_service,
                                    };
                                    tunnel::udp_client_flow(opened, socket, client, rx, meters).await
                                }
                                Err(e) => {
                                    figures.failed(&e.to_string(), now_ms());
                                    rt.event("error", &format!("udp flow from {client}: {e}"));
                                }
                            }
                        } => {}
                        _ = stop.cancelled() => {}
                    }
                    let _ = done.send((client, flow));
                });
            }
            Some((client, flow)) = done_rx.recv() => {
                if flows.get(&client).is_some_and(|(f, _)| *f == flow) {
                    flows.remove(&client);
                }
            }
            _ = stop.cancelled() => return,
        }
    }
}
