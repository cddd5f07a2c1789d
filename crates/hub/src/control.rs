//! The control connection (agent = HTTP/2 client): registration, heartbeats, publishing,
//! discovery, management forwarding and outgoing tunnels. See PROTOCOL.md.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, StatusCode};
use tokio_util::sync::CancellationToken;
use ztm_net::h2io::{self, read_body, respond, respond_error, respond_json};
use ztm_net::now_ms;
use ztm_net::relay;
use ztm_proto::acl;
use ztm_proto::names::check_name;
use ztm_proto::wire::{
    is_endpoint_id, Proto, Register, Registered, ServiceDecl, ServiceInfo, ENDPOINT_USER_HEADER,
    HOP_TIMEOUT, MAX_MANAGE_BODY, REGISTER_TIMEOUT, TUNNEL_PROTOCOL, USER_HEADER,
};
use ztm_tls::TlsStream;

use crate::registry::{self, RegisterError, SessionId};
use crate::server::{Hub, Peer, SessionIo};

/// Largest body of a registration or a service list.
const MAX_CONTROL_BODY: usize = 1 << 20;
/// Most services one endpoint may publish.
const MAX_SERVICES: usize = 10_000;

struct Conn {
    hub: Arc<Hub>,
    peer: Peer,
    id: u64,
    kill: CancellationToken,
    /// The endpoint registered on this connection and its session.
    registered: Mutex<Option<(String, SessionId)>>,
}

impl Conn {
    fn registered(&self) -> Option<(String, SessionId)> {
        self.registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub async fn serve(
    hub: Arc<Hub>,
    tls: TlsStream,
    peer: Peer,
    conn_id: u64,
    kill: CancellationToken,
) -> Result<()> {
    let mut h2 = ztm_net::h2io::server_builder()
        .handshake::<_, Bytes>(tls)
        .await?;
    let conn = Arc::new(Conn {
        hub,
        peer,
        id: conn_id,
        kill,
        registered: Mutex::new(None),
    });
    let register_deadline = tokio::time::sleep(REGISTER_TIMEOUT);
    tokio::pin!(register_deadline);
    loop {
        tokio::select! {
            next = h2.accept() => match next {
                Some(Ok((req, send))) => {
                    let conn = conn.clone();
                    tokio::spawn(async move { handle(conn, req, send).await });
                }
                Some(Err(e)) => {
                    tracing::debug!("control connection from {}: {e}", conn.peer.addr);
                    break;
                }
                None => break,
            },
            _ = conn.kill.cancelled() => break,
            _ = &mut register_deadline, if conn.registered().is_none() => {
                tracing::debug!("{} did not register in time", conn.peer.addr);
                break;
            }
        }
    }
    if let Some((id, session)) = conn.registered() {
        let name = conn
            .hub
            .registry()
            .get(&id)
            .map(|e| e.name.clone())
            .unwrap_or_default();
        conn.hub.registry().end_session(&id, session);
        let mine = {
            let mut sessions = conn.hub.sessions();
            let mine = sessions.get(&session).map(|s| s.conn) == Some(conn.id);
            if mine {
                if let Some(io) = sessions.remove(&session) {
                    io.kill.cancel();
                }
            }
            mine
        };
        if mine {
            tracing::info!("endpoint {name} ({id}) of user {} offline", conn.peer.user);
        }
    }
    Ok(())
}

async fn handle(conn: Arc<Conn>, req: Request<RecvStream>, send: SendResponse<Bytes>) {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    match (&method, segments.as_slice()) {
        (&Method::CONNECT, ["api", "endpoints", ep, "services", proto, svc]) => {
            let (ep, proto, svc) = (ep.to_string(), proto.to_string(), svc.to_string());
            tunnel(&conn, &ep, &proto, &svc, req, send).await
        }
        (&Method::CONNECT, _) => respond_error(send, StatusCode::NOT_FOUND, "no such tunnel path"),
        (&Method::POST, ["api", "endpoints", id]) => register(&conn, id, req, send).await,
        (&Method::POST, ["api", "endpoints", id, "heartbeat"]) => heartbeat(&conn, id, send),
        (&Method::POST, ["api", "endpoints", id, "services"]) => {
            publish(&conn, id, req, send).await
        }
        (&Method::GET, ["api", "endpoints"]) => {
            let list = conn.hub.registry().endpoints(now_ms());
            respond_json(send, StatusCode::OK, &list);
        }
        (&Method::GET, ["api", "services"]) => {
            // Each user discovers only the providers it may connect to, each by its own list.
            let mut list = conn.hub.registry().services(now_ms());
            for s in &mut list {
                s.endpoints
                    .retain(|e| acl::can_connect(&conn.peer.user, &e.username, e.users.as_deref()));
                s.users = ServiceInfo::common_users(&s.endpoints);
            }
            list.retain(|s| !s.endpoints.is_empty());
            respond_json(send, StatusCode::OK, &list);
        }
        (_, ["api", "endpoints", ep, "manage", ..]) => {
            let ep = ep.to_string();
            manage(&conn, &ep, req, send).await
        }
        _ => respond_error(
            send,
            StatusCode::NOT_FOUND,
            format!("no such API: {method} {path}"),
        ),
    }
}

fn check_services(services: &[ServiceDecl]) -> Result<(), String> {
    if services.len() > MAX_SERVICES {
        return Err(format!("more than {MAX_SERVICES} services"));
    }
    for s in services {
        check_name(&s.name).map_err(|e| format!("service {:?}: {e}", s.name))?;
    }
    Ok(())
}

async fn register(conn: &Arc<Conn>, id: &str, req: Request<RecvStream>, send: SendResponse<Bytes>) {
    if !is_endpoint_id(id) {
        return respond_error(send, StatusCode::BAD_REQUEST, "endpoint id must be a UUID");
    }
    let mut body = req.into_body();
    let reg: Register = match read_body(&mut body, MAX_CONTROL_BODY)
        .await
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => {
            return respond_error(
                send,
                StatusCode::BAD_REQUEST,
                format!("bad registration: {e}"),
            )
        }
    };
    if let Err(e) = check_name(&reg.name)
        .map_err(|e| e.to_string())
        .and_then(|_| check_services(&reg.services))
    {
        return respond_error(send, StatusCode::BAD_REQUEST, e);
    }
    if let Some((existing, _)) = conn.registered() {
        if existing != id {
            return respond_error(
                send,
                StatusCode::CONFLICT,
                "this connection already registered another endpoint",
            );
        }
    }
    let token = format!("{:032x}", rand::random::<u128>());
    let outcome = conn.hub.registry().register(
        registry::Register {
            id,
            user: &conn.peer.user,
            serial: &conn.peer.serial,
            name: &reg.name,
            ip: conn.peer.addr.ip().to_string(),
            port: conn.peer.addr.port(),
            services: reg.services,
            token: token.clone(),
        },
        now_ms(),
    );
    let registration = match outcome {
        Ok(r) => r,
        Err(RegisterError::Taken { .. }) => {
            tracing::warn!(
                "user {} tried to register endpoint {id}, which another user holds",
                conn.peer.user
            );
            return respond_error(
                send,
                StatusCode::FORBIDDEN,
                format!("endpoint {id} is online under another user"),
            );
        }
        Err(RegisterError::Full) => {
            return respond_error(send, StatusCode::SERVICE_UNAVAILABLE, "the hub is full")
        }
    };
    {
        let mut sessions = conn.hub.sessions();
        if let Some(old) = registration.replaced {
            if let Some(io) = sessions.remove(&old) {
                if io.conn != conn.id {
                    io.kill.cancel();
                }
            }
        }
        sessions.insert(
            registration.session,
            SessionIo::new(conn.kill.clone(), conn.id),
        );
    }
    *conn.registered.lock().unwrap_or_else(|p| p.into_inner()) =
        Some((id.to_string(), registration.session));
    tracing::info!(
        "endpoint {} ({id}) of user {} online from {}",
        reg.name,
        conn.peer.user,
        conn.peer.addr
    );
    respond_json(
        send,
        StatusCode::OK,
        &Registered {
            session: token,
            hub: conn.hub.name.clone(),
        },
    );
}

/// The session registered on this connection, if it is for endpoint `id`.
fn own_session(conn: &Conn, id: &str) -> Option<SessionId> {
    conn.registered()
        .filter(|(registered, _)| registered == id)
        .map(|(_, s)| s)
}

fn heartbeat(conn: &Arc<Conn>, id: &str, send: SendResponse<Bytes>) {
    match own_session(conn, id) {
        Some(s) if conn.hub.registry().heartbeat(id, s, now_ms()) => {
            respond(send, StatusCode::NO_CONTENT, None, Bytes::new())
        }
        _ => respond_error(
            send,
            StatusCode::NOT_FOUND,
            "no such session; register again",
        ),
    }
}

async fn publish(conn: &Arc<Conn>, id: &str, req: Request<RecvStream>, send: SendResponse<Bytes>) {
    let Some(session) = own_session(conn, id) else {
        return respond_error(
            send,
            StatusCode::NOT_FOUND,
            "no such session; register again",
        );
    };
    let mut body = req.into_body();
    let services: Vec<ServiceDecl> = match read_body(&mut body, MAX_CONTROL_BODY)
        .await
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            return respond_error(
                send,
                StatusCode::BAD_REQUEST,
                format!("bad service list: {e}"),
            )
        }
    };
    if let Err(e) = check_services(&services) {
        return respond_error(send, StatusCode::BAD_REQUEST, e);
    }
    if conn.hub.registry().publish(id, session, services) {
        respond(send, StatusCode::NO_CONTENT, None, Bytes::new())
    } else {
        respond_error(
            send,
            StatusCode::NOT_FOUND,
            "no such session; register again",
        )
    }
}

/// Forwards a management request to endpoint `ep` over its reverse connection.
async fn manage(conn: &Arc<Conn>, ep: &str, req: Request<RecvStream>, send: SendResponse<Bytes>) {
    let target = {
        let registry = conn.hub.registry();
        registry
            .online_entry(ep, now_ms())
            .map(|e| (e.user.clone(), e.session.as_ref().map(|s| s.id)))
    };
    let Some((owner, Some(session))) = target else {
        return respond_error(
            send,
            StatusCode::NOT_FOUND,
            format!("endpoint {ep} is not online at this hub"),
        );
    };
    if let Some(refusal) = other_users_endpoint(&req, ep, &owner) {
        return respond_error(send, StatusCode::NOT_FOUND, refusal);
    }
    if !acl::can_manage(&conn.peer.user, &owner) {
        return respond_error(
            send,
            StatusCode::FORBIDDEN,
            format!(
                "user {} may not manage endpoints of user {owner}",
                conn.peer.user
            ),
        );
    }
    let Some(sender) = conn.hub.reverse_of(session).await else {
        return respond_error(
            send,
            StatusCode::BAD_GATEWAY,
            format!("endpoint {ep} did not finish connecting to this hub"),
        );
    };
    let prefix = format!("/api/endpoints/{ep}/manage");
    let rest = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("")
        .strip_prefix(&prefix)
        .unwrap_or("")
        .to_string();
    let method = req.method().clone();
    let content_type = req.headers().get(http::header::CONTENT_TYPE).cloned();
    let mut body = req.into_body();
    let body = match read_body(&mut body, MAX_MANAGE_BODY).await {
        Ok(b) => b,
        Err(e) => return respond_error(send, StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
    };
    let forwarded = h2io::build(method, &format!("/api{rest}")).map(|b| {
        let b = b.header(USER_HEADER, conn.peer.user.as_str());
        match content_type {
            Some(ct) => b.header(http::header::CONTENT_TYPE, ct),
            None => b,
        }
    });
    let Ok(Ok(forwarded)) = forwarded.map(|b| b.body(())) else {
        return respond_error(send, StatusCode::BAD_REQUEST, "bad management path");
    };
    match h2io::request(&sender, forwarded, body, MAX_MANAGE_BODY, HOP_TIMEOUT).await {
        Ok(answer) => {
            let ct = answer
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            respond(send, answer.status, ct.as_deref(), answer.body)
        }
        Err(e) => respond_error(
            send,
            StatusCode::GATEWAY_TIMEOUT,
            format!("endpoint {ep} did not answer: {e:#}"),
        ),
    }
}

/// When the caller names the user it knows endpoint `ep` by ([`ENDPOINT_USER_HEADER`]) and
/// the id is registered here by `owner`, someone else: the answer, as for an endpoint that is
/// not here (the caller then tries its other hubs).
fn other_users_endpoint(req: &Request<RecvStream>, ep: &str, owner: &str) -> Option<String> {
    let expected = req.headers().get(ENDPOINT_USER_HEADER)?;
    (expected.as_bytes() != owner.as_bytes()).then(|| {
        format!(
            "endpoint {ep} of user {} is not online at this hub",
            String::from_utf8_lossy(expected.as_bytes())
        )
    })
}

fn is_tunnel(req: &Request<RecvStream>) -> bool {
    req.extensions()
        .get::<h2::ext::Protocol>()
        .is_some_and(|p| p.as_str() == TUNNEL_PROTOCOL)
}

/// Opens a tunnel to service `proto/svc` on endpoint `ep` over its reverse connection and
/// relays between the two streams.
async fn tunnel(
    conn: &Arc<Conn>,
    ep: &str,
    proto: &str,
    svc: &str,
    req: Request<RecvStream>,
    send: SendResponse<Bytes>,
) {
    if !is_tunnel(&req) {
        return respond_error(
            send,
            StatusCode::BAD_REQUEST,
            "expected :protocol ztm-tunnel",
        );
    }
    let Some(proto) = Proto::parse(proto) else {
        return respond_error(send, StatusCode::BAD_REQUEST, "protocol must be tcp or udp");
    };
    let target = {
        let registry = conn.hub.registry();
        registry.online_entry(ep, now_ms()).map(|e| {
            let service = e
                .services
                .iter()
                .find(|s| s.protocol == proto && s.name == svc)
                .cloned();
            (e.user.clone(), e.session.as_ref().map(|s| s.id), service)
        })
    };
    let Some((owner, Some(session), service)) = target else {
        return respond_error(
            send,
            StatusCode::NOT_FOUND,
            format!("endpoint {ep} is not online at this hub"),
        );
    };
    if let Some(refusal) = other_users_endpoint(&req, ep, &owner) {
        return respond_error(send, StatusCode::NOT_FOUND, refusal);
    }
    let Some(service) = service else {
        return respond_error(
            send,
            StatusCode::NOT_FOUND,
            format!("endpoint {ep} has no service {proto}/{svc}"),
        );
    };
    if !acl::can_connect(&conn.peer.user, &owner, service.users.as_deref()) {
        tracing::warn!(
            "user {} refused a tunnel to {proto}/{svc} on endpoint {ep}",
            conn.peer.user
        );
        return respond_error(
            send,
            StatusCode::FORBIDDEN,
            format!(
                "user {} may not connect to service {proto}/{svc}",
                conn.peer.user
            ),
        );
    }
    let Some(reverse) = conn.hub.reverse_of(session).await else {
        return respond_error(
            send,
            StatusCode::BAD_GATEWAY,
            format!("endpoint {ep} did not finish connecting to this hub"),
        );
    };
    let started = std::time::Instant::now();
    let requested = async {
        let mut b_req = h2io::build(Method::CONNECT, &format!("/api/services/{proto}/{svc}"))?
            .header(USER_HEADER, conn.peer.user.as_str())
            .body(())?;
        b_req
            .extensions_mut()
            .insert(h2::ext::Protocol::from_static(TUNNEL_PROTOCOL));
        let mut sender = reverse.ready().await?;
        Ok::<_, anyhow::Error>(sender.send_request(b_req, false)?)
    }
    .await;
    let (b_resp, b_send) = match requested {
        Ok(v) => v,
        Err(e) => return respond_error(send, StatusCode::BAD_GATEWAY, format!("{e:#}")),
    };
    // B's answer decides; meanwhile the client's first bytes already travel on to B.
    let opened = async move {
        let resp = match tokio::time::timeout(HOP_TIMEOUT, b_resp).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                respond_error(send, StatusCode::BAD_GATEWAY, format!("endpoint {ep}: {e}"));
                return Err(());
            }
            Err(_) => {
                let msg = format!("endpoint {ep} did not answer");
                respond_error(send, StatusCode::GATEWAY_TIMEOUT, msg);
                return Err(());
            }
        };
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let message = h2io::error_message_of(resp).await;
            respond_error(send, status, message);
            return Err(());
        }
        let mut send = send;
        let a_send = send
            .send_response(http::Response::new(()), false)
            .map_err(|_| ())?;
        tracing::debug!("tunnel {} -> {proto}/{svc}@{ep} opened", conn.peer.user);
        Ok((a_send, resp.into_body()))
    };
    match relay::relay_opening(req.into_body(), b_send, opened, &conn.hub.stalls).await {
        Err(()) => {}
        Ok(Ok((up, down))) => tracing::debug!(
            "tunnel {} -> {proto}/{svc}@{ep} closed: {up} bytes up, {down} down, {:?}",
            conn.peer.user,
            started.elapsed()
        ),
        Ok(Err(e)) => tracing::debug!(
            "tunnel {} -> {proto}/{svc}@{ep} failed after {:?}: {e}",
            conn.peer.user,
            started.elapsed()
        ),
    }
}
