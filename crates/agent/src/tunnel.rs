//! Tunnels at the agent. The service end ([`accept`]) answers a CONNECT from the hub by
//! connecting to the local service; the client end ([`open`]) picks a provider and opens a
//! CONNECT through a hub. TCP bytes ride the stream as they are; UDP datagrams ride it as
//! RFC 9297 capsules, one stream per client flow.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use tokio::net::{TcpStream, UdpSocket};
use ztm_net::h2io::{self, respond_error, respond_json};
use ztm_proto::capsule;
use ztm_proto::model::ApiError;
use ztm_proto::model::PortTarget;
use ztm_proto::wire::{
    Proto, DESTINATION_HEADER, ENDPOINT_USER_HEADER, EXIT_SERVICE, REQUEST_TIMEOUT,
    SERVICE_CONNECT_TIMEOUT, TUNNEL_PROTOCOL, TUNNEL_STREAMS, USER_HEADER,
};
use ztm_relay as relay;

use crate::admission;
use crate::balance::{Active, Balancer};
use crate::figures::PortFigures;
use crate::files::{FileSlot, Party};
use crate::mesh::{LocalService, Mesh, Provider};
use crate::metrics::{OpenTunnel, Tunnels};
use tokio_util::sync::CancellationToken;
use ztm_net::now_ms;

/// A UDP flow with no datagram either way for this long is closed.
pub const UDP_IDLE: Duration = Duration::from_secs(60);

/// A tunnel request being answered at the service end: counted in the agent's figures as
/// failed unless it opens (a refusal, a service that does not accept, a request dropped
/// meanwhile).
struct Opening<'a> {
    figures: &'a Tunnels,
    started: Instant,
    opened: bool,
}

impl<'a> Opening<'a> {
    fn new(figures: &'a Tunnels) -> Opening<'a> {
        Opening {
            figures,
            started: Instant::now(),
            opened: false,
        }
    }

    /// The service accepted: the tunnel counts as open until the guard is dropped.
    fn opened(mut self) -> OpenTunnel {
        self.opened = true;
        self.figures.opened(self.started.elapsed())
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if !self.opened {
            self.figures.failed();
        }
    }
}

/// Service end: hub `hub` asks for `CONNECT /api/services/{proto}/{name}` on behalf of the
/// user in `ztm-user`, whom the service must admit (checked here again: see
/// [`crate::admission`]).
pub async fn accept(
    rt: Arc<Mesh>,
    hub: &str,
    req: Request<RecvStream>,
    mut send: SendResponse<Bytes>,
) {
    let opening = Opening::new(&rt.metrics().service);
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["api", "services", proto, name] = segments.as_slice() else {
        return respond_error(send, StatusCode::NOT_FOUND, "no such tunnel path");
    };
    let Some(proto) = Proto::parse(proto) else {
        return respond_error(send, StatusCode::BAD_REQUEST, "protocol must be tcp or udp");
    };
    let user = match admission::user(req.headers().get(USER_HEADER).map(|v| v.as_bytes())) {
        Ok(u) => u.to_string(),
        Err(refusal) => return respond_error(send, refusal.status(), refusal.to_string()),
    };
    if proto == Proto::Tcp && *name == EXIT_SERVICE {
        let _file = match take_file(&rt, &format!("{proto}/{name}"), &user) {
            Ok(f) => f,
            Err(spent) => return respond_error(send, StatusCode::SERVICE_UNAVAILABLE, spent),
        };
        let (tcp, dest) = match crate::exit::connect_for(&rt, hub, &user, req.headers()).await {
            Ok(v) => v,
            Err(e) => {
                let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_GATEWAY);
                return respond_json(send, status, &e);
            }
        };
        let started = Instant::now();
        match serve_tcp(&rt, tcp, send, req.into_body(), opening).await {
            Ok(m) => tracing::debug!(
                user,
                destination = %dest,
                bytes_in = m.received,
                bytes_out = m.sent,
                "exit tunnel from {user} to {dest} closed after {:?}",
                started.elapsed()
            ),
            Err(e) => tracing::debug!(
                user,
                destination = %dest,
                "exit tunnel from {user} to {dest} failed: {e}"
            ),
        }
        return;
    }
    let Some(service) = rt.local_service(proto, name) else {
        return respond_error(
            send,
            StatusCode::NOT_FOUND,
            format!("no service {proto}/{name} here"),
        );
    };
    let service_name = format!("{proto}/{name}");
    if let Err(refusal) = admission::tunnel(
        &user,
        rt.username(),
        &service_name,
        service.users.as_deref(),
    ) {
        rt.refused(
            hub,
            &format!("refused a tunnel to {service_name} for user {user}, whom it does not admit"),
        );
        return respond_error(send, refusal.status(), refusal.to_string());
    }
    let _file = match take_file(&rt, &service_name, &user) {
        Ok(f) => f,
        Err(spent) => return respond_error(send, StatusCode::SERVICE_UNAVAILABLE, spent),
    };
    let LocalService { host, port, .. } = service;
    let recv = req.into_body();
    let started = Instant::now();
    // A relay at the service end sends what it reads from the service and writes what it
    // receives to it.
    let figures = &rt.metrics().service;
    let (to_service, from_service) = ([&figures.to_service], [&figures.from_service]);
    let meters = relay::Meters {
        sent: &from_service,
        received: &to_service,
    };
    let result = match proto {
        Proto::Tcp => {
            let tcp = match tokio::time::timeout(
                SERVICE_CONNECT_TIMEOUT,
                TcpStream::connect((host.as_str(), port)),
            )
            .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    return respond_error(
                        send,
                        StatusCode::BAD_GATEWAY,
                        format!("service {proto}/{name} at {host}:{port}: {e}"),
                    )
                }
                Err(_) => {
                    return respond_error(
                        send,
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("service {proto}/{name} at {host}:{port} did not accept"),
                    )
                }
            };
            serve_tcp(&rt, tcp, send, recv, opening).await
        }
        Proto::Udp => {
            let socket = match udp_connected(&host, port).await {
                Ok(s) => s,
                Err(e) => {
                    return respond_error(
                        send,
                        StatusCode::BAD_GATEWAY,
                        format!("service {proto}/{name} at {host}:{port}: {e}"),
                    )
                }
            };
            let _open = opening.opened();
            let Ok(stream) = send.send_response(http::Response::new(()), false) else {
                return;
            };
            udp_service_flow(socket, stream, recv, meters).await
        }
    };
    match result {
        Ok(m) => tracing::debug!(
            "tunnel from {user} to {proto}/{name} closed: {} bytes in, {} out, {:?}",
            m.received,
            m.sent,
            started.elapsed()
        ),
        Err(e) => tracing::debug!("tunnel from {user} to {proto}/{name} failed: {e}"),
    }
}

/// A file for the connection a tunnel opens to `what` for `user`, or why the agent has none
/// to spare (`crate::files`), told in the event log at most every few seconds.
fn take_file(rt: &Mesh, what: &str, user: &str) -> Result<FileSlot, String> {
    rt.files().take(Party::User(user)).map_err(|spent| {
        if spent.warn {
            rt.event(
                "error",
                &format!("refused a tunnel to {what} for user {user}: {spent}"),
            );
        }
        spent.to_string()
    })
}

/// Service end of a TCP tunnel whose connection `tcp` is open: answers yes and relays until
/// either side is done. Bytes count in the agent's figures as they move.
async fn serve_tcp(
    rt: &Mesh,
    tcp: TcpStream,
    mut send: SendResponse<Bytes>,
    recv: RecvStream,
    opening: Opening<'_>,
) -> std::io::Result<relay::Moved> {
    let figures = &rt.metrics().service;
    let (to_service, from_service) = ([&figures.to_service], [&figures.from_service]);
    let meters = relay::Meters {
        sent: &from_service,
        received: &to_service,
    };
    let _ = tcp.set_nodelay(true);
    let _open = opening.opened();
    let stream = send
        .send_response(http::Response::new(()), false)
        .map_err(std::io::Error::other)?;
    relay::pump(tcp, stream, recv, rt.stalls(), meters).await
}

async fn udp_connected(host: &str, port: u16) -> std::io::Result<UdpSocket> {
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("host resolves to nothing"))?;
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().map_err(std::io::Error::other)?
    } else {
        "[::]:0".parse().map_err(std::io::Error::other)?
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(addr).await?;
    Ok(socket)
}

/// Service end of a UDP flow: capsules from the stream to the service, datagrams back.
/// Datagrams' bytes count in `meters` as they go.
async fn udp_service_flow(
    socket: UdpSocket,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    meters: relay::Meters<'_>,
) -> std::io::Result<relay::Moved> {
    let mut decoder = capsule::Decoder::default();
    let mut buf = vec![0u8; 65_536];
    let mut moved = relay::Moved::default();
    loop {
        tokio::select! {
            chunk = recv.data() => {
                let Some(chunk) = chunk else { break };
                let chunk = chunk.map_err(std::io::Error::other)?;
                let _ = recv.flow_control().release_capacity(chunk.len());
                decoder.push(&chunk);
                while let Some(d) = decoder.next_datagram().map_err(std::io::Error::other)? {
                    moved.received += d.len() as u64;
                    if socket.send(&d).await.is_ok() {
                        relay::count(meters.received, d.len());
                    }
                }
            }
            n = socket.recv(&mut buf) => {
                let n = n?;
                if relay::send_datagram(&mut send, capsule::encode_datagram(&buf[..n]))? {
                    moved.sent += n as u64;
                    relay::count(meters.sent, n);
                }
            }
            _ = tokio::time::sleep(UDP_IDLE) => break,
        }
    }
    let _ = send.send_data(Bytes::new(), true);
    Ok(moved)
}

/// An open tunnel at the client end. Its stream slot and its place in the balancer's count are
/// held until it is dropped.
pub struct Opened {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub endpoint: String,
    pub active: Active,
    pub slot: tokio::sync::OwnedSemaphorePermit,
    /// How many of the client's first bytes went out with the CONNECT (see [`FirstBytes`]):
    /// moved towards the service already, before any relay.
    pub first_sent: usize,
}

/// The first bytes a TCP client sends while its tunnel is being opened. They go out right
/// behind the CONNECT (the hub passes them on before the service end answers), which saves a
/// round trip on every fresh connection; they are kept to be sent again if a provider refuses
/// and the next one is tried.
pub struct FirstBytes<'a> {
    socket: &'a TcpStream,
    data: Option<Bytes>,
    /// The client already half-closed (or its socket failed): the relay will see it.
    done: bool,
}

impl<'a> FirstBytes<'a> {
    pub fn new(socket: &'a TcpStream) -> FirstBytes<'a> {
        FirstBytes {
            socket,
            data: None,
            done: false,
        }
    }

    /// Reads what the client has sent, if anything, without waiting.
    fn read_ready(&mut self) {
        // Read on the stack and keep only what came (usually a few hundred bytes).
        let mut buf = [0u8; FIRST_BYTES];
        match self.socket.try_read(&mut buf) {
            Ok(0) => self.done = true,
            Ok(n) => self.data = Some(Bytes::copy_from_slice(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => self.done = true,
        }
    }

    /// First bytes read already (a proxied request's head): they go out with the CONNECT.
    pub fn given(socket: &'a TcpStream, data: Bytes) -> FirstBytes<'a> {
        FirstBytes {
            socket,
            data: (!data.is_empty()).then_some(data),
            done: true,
        }
    }

    fn waiting(&self) -> bool {
        self.data.is_none() && !self.done
    }
}

/// The most a client may send before its tunnel opens that is passed on at once: the same
/// bound the hub applies when it passes first bytes on (`relay::EAGER_BYTES`).
const FIRST_BYTES: usize = relay::EAGER_BYTES;

/// Why a tunnel could not be opened: the words for the log, and the last refusal a hub or
/// provider answered with, if one did (a proxy tells its client by it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenError {
    pub message: String,
    /// `None`: no provider at all, or none answered.
    pub refusal: Option<ApiError>,
    /// No provider that this user may reach is online.
    pub no_provider: bool,
}

impl OpenError {
    fn words(message: String) -> OpenError {
        OpenError {
            message,
            refusal: None,
            no_provider: false,
        }
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Client end: opens a tunnel to `target`, trying providers in balancing order. With `first`,
/// the client's first bytes ride along (see [`FirstBytes`]); with `destination`, the target
/// is an exit and this is where it should connect (PROTOCOL.md, "Exit tunnels").
pub async fn open(
    rt: &Arc<Mesh>,
    proto: Proto,
    target: &PortTarget,
    balancer: &Arc<Balancer>,
    mut first: Option<FirstBytes<'_>>,
    destination: Option<&str>,
) -> Result<Opened, OpenError> {
    let providers = rt
        .providers(
            proto,
            &target.service,
            target.endpoint.as_deref(),
            target.user.as_deref(),
            target.trust.as_deref(),
        )
        .await;
    if providers.is_empty() {
        let what = if target.service == EXIT_SERVICE {
            "an exit".to_string()
        } else {
            format!("{proto}/{}", target.service)
        };
        let message = match &target.endpoint {
            Some(ep) => format!(
                "endpoint {ep}{} does not provide {what} to user {} (or is offline)",
                target
                    .user
                    .as_ref()
                    .map(|u| format!(" of user {u}"))
                    .unwrap_or_default(),
                rt.username()
            ),
            None => format!(
                "no online endpoint of a trusted user ({}) provides {what} to user {}",
                match &target.trust {
                    Some(list) => list.join(", "),
                    None if rt.username() == ztm_proto::acl::ROOT => rt.username().to_string(),
                    None => format!("{}, {}", rt.username(), ztm_proto::acl::ROOT),
                },
                rt.username()
            ),
        };
        return Err(OpenError {
            no_provider: true,
            ..OpenError::words(message)
        });
    }
    let mut ids: Vec<String> = providers.iter().map(|p| p.endpoint.clone()).collect();
    ids.sort();
    ids.dedup();
    let mut last_error = OpenError::words(String::new());
    for ep in balancer.order(&ids) {
        // Usually one provider; two if two users claim this id on different hubs.
        for provider in providers.iter().filter(|p| p.endpoint == ep) {
            for control in &provider.links {
                // A stream of its own on this connection, never one of those kept for
                // heartbeats and requests; a full connection sends us to the next hub.
                let Ok(slot) = control.tunnels.clone().try_acquire_owned() else {
                    last_error = OpenError::words(format!(
                        "hub {} carries {TUNNEL_STREAMS} tunnels of this agent already, as many as \
                         one connection may",
                        control.hub
                    ));
                    continue;
                };
                let sender = match control.sender().await {
                    Ok(s) => s,
                    Err(e) => {
                        last_error = OpenError::words(e);
                        continue;
                    }
                };
                match connect(
                    &sender,
                    provider,
                    proto,
                    &target.service,
                    first.as_mut(),
                    destination,
                )
                .await
                {
                    Ok((send, recv)) => {
                        let active = balancer.track(&ep);
                        let first_sent = first
                            .as_ref()
                            .and_then(|f| f.data.as_ref())
                            .map_or(0, Bytes::len);
                        return Ok(Opened {
                            send,
                            recv,
                            endpoint: ep,
                            active,
                            slot,
                            first_sent,
                        });
                    }
                    Err(e) => last_error = e,
                }
            }
        }
    }
    rt.forget_providers();
    Err(last_error)
}

async fn connect(
    sender: &h2::client::SendRequest<Bytes>,
    provider: &Provider,
    proto: Proto,
    service: &str,
    mut first: Option<&mut FirstBytes<'_>>,
    destination: Option<&str>,
) -> Result<(SendStream<Bytes>, RecvStream), OpenError> {
    let what = match destination {
        Some(d) => format!("{d} through the exit"),
        None => format!("{proto}/{service}"),
    };
    let work = async {
        let words = |e: &dyn std::fmt::Display| OpenError::words(e.to_string());
        let mut req = h2io::build(
            Method::CONNECT,
            &format!(
                "/api/endpoints/{}/services/{proto}/{service}",
                provider.endpoint
            ),
        )
        .map_err(|e| words(&e))?
        .header(ENDPOINT_USER_HEADER, provider.user.as_str());
        if let Some(d) = destination {
            req = req.header(DESTINATION_HEADER, d);
        }
        let mut req = req.body(()).map_err(|e| words(&e))?;
        req.extensions_mut()
            .insert(h2::ext::Protocol::from_static(TUNNEL_PROTOCOL));
        let mut sender = sender.clone().ready().await.map_err(|e| words(&e))?;
        let (resp, mut send) = sender.send_request(req, false).map_err(|e| words(&e))?;
        tokio::pin!(resp);
        let resp = loop {
            let Some(first) = first.as_deref_mut() else {
                break resp.await;
            };
            if let Some(data) = &first.data {
                // Read just now, or during an attempt a provider refused: it goes out once
                // on every attempt. Queued without reserving capacity (h2 grants a stream
                // capacity only once its HEADERS are written, so waiting for it would send
                // the HEADERS alone): CONNECT and first bytes leave in one write. At most
                // FIRST_BYTES, well within the initial window.
                relay::send_eager(&mut send, data.clone()).map_err(|e| words(&e))?;
            }
            if !first.waiting() {
                break resp.await;
            }
            tokio::select! {
                r = &mut resp => break r,
                ready = first.socket.readable() => {
                    if ready.is_err() {
                        first.done = true;
                    } else {
                        first.read_ready();
                    }
                }
            }
        };
        let ep = &provider.endpoint;
        let resp = resp.map_err(|e| words(&e))?;
        if resp.status() != StatusCode::OK {
            let error = h2io::error_of(resp).await;
            return Err(OpenError {
                message: format!("tunnel to {what} on {ep} refused: {}", error.message),
                refusal: Some(error),
                no_provider: false,
            });
        }
        Ok((send, resp.into_body()))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .map_err(|_| {
            OpenError::words(format!(
                "tunnel to {what} on {}: no answer",
                provider.endpoint
            ))
        })?
}

/// Client end of an opened TCP tunnel: relays between the client's `socket` and the tunnel
/// until either side is done or `stop`, counting bytes in `figures`. `what` names the far
/// end in the log.
pub async fn carry(
    rt: &Mesh,
    socket: TcpStream,
    opened: Opened,
    figures: &PortFigures,
    stop: &CancellationToken,
    what: &str,
) {
    let started = Instant::now();
    let Opened {
        send,
        recv,
        endpoint: ep,
        active: _active,
        slot: _slot,
        first_sent,
    } = opened;
    let (to_service, from_service) = figures.meters();
    relay::count(&to_service, first_sent);
    let meters = relay::Meters {
        sent: &to_service,
        received: &from_service,
    };
    let result = tokio::select! {
        r = relay::pump(socket, send, recv, rt.stalls(), meters) => r,
        _ = stop.cancelled() => return,
    };
    match result {
        Ok(m) => tracing::debug!(
            bytes_up = m.sent,
            bytes_down = m.received,
            duration_ms = started.elapsed().as_millis() as u64,
            "tunnel to {what}@{ep} closed: {} bytes up, {} down, {:?}",
            m.sent,
            m.received,
            started.elapsed()
        ),
        Err(e) => {
            tracing::debug!("tunnel to {what}@{ep} failed: {e}");
            figures.error(&format!("tunnel to {what} on {ep} broke: {e}"), now_ms());
        }
    }
}

/// Client end of a UDP flow: datagrams from `rx` into the tunnel, capsules back to `client`.
/// Datagrams' bytes count in `meters` as they go (`sent`: towards the service).
pub async fn udp_client_flow(
    opened: Opened,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
    meters: relay::Meters<'_>,
) {
    let Opened {
        mut send,
        mut recv,
        active: _active,
        slot: _slot,
        ..
    } = opened;
    let mut decoder = capsule::Decoder::default();
    loop {
        tokio::select! {
            d = rx.recv() => {
                let Some(d) = d else { break };
                match relay::send_datagram(&mut send, capsule::encode_datagram(&d)) {
                    Ok(true) => relay::count(meters.sent, d.len()),
                    Ok(false) => {}
                    Err(_) => break,
                }
            }
            chunk = recv.data() => {
                let Some(Ok(chunk)) = chunk else { break };
                let _ = recv.flow_control().release_capacity(chunk.len());
                decoder.push(&chunk);
                loop {
                    match decoder.next_datagram() {
                        Ok(Some(d)) => {
                            if socket.send_to(&d, client).await.is_ok() {
                                relay::count(meters.received, d.len());
                            }
                        }
                        Ok(None) => break,
                        Err(_) => return,
                    }
                }
            }
            _ = tokio::time::sleep(UDP_IDLE) => break,
        }
    }
    let _ = send.send_data(Bytes::new(), true);
}
