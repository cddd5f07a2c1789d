//! The control connection (agent = HTTP/2 client): registration, heartbeats, publishing,
//! discovery, management forwarding and outgoing tunnels. See PROTOCOL.md. Who may do what is
//! decided in [`crate::admission`]; this module reads requests and acts on the answers.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, StatusCode};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;
use ztm_net::goaway::{self, Role};
use ztm_net::h2io::{
    self, read_body, respond, respond_error, respond_json, respond_json_with, BodyError,
};
use ztm_net::lines::{LineReader, Next};
use ztm_net::now_ms;
use ztm_net::on_demand::{self, Prefixed};
use ztm_proto::model::ApiError;
use ztm_proto::names::check_name;
use ztm_proto::wire::{
    choose_version, is_endpoint_id, ControlLine, LineAnswer, Proto, Register, Registered,
    ServiceDecl, DESTINATION_HEADER, ENDPOINT_USER_HEADER, HOP_TIMEOUT, MAX_MANAGE_BODY,
    PROTOCOL_HEADER, PROTOCOL_VERSION, REGISTER_TIMEOUT, REQUEST_TIMEOUT, TOTAL_HEADER,
    TUNNEL_PROTOCOL, TUNNEL_STREAMS, USER_HEADER,
};

use crate::admission::{self, Refusal, Target};
use crate::closer::{self, Closer, Goodbye, FAREWELL_TIMEOUT};
use crate::limits::{Refused, Slot, BODY_TIMEOUT, MAX_CONTROL_BODY};
use crate::metrics;
use crate::registry::{self, RegisterError, SessionId};
use crate::state::{Hub, NoReverse, Peer, RegisterRefusal, Tls};
use ztm_proto::listing::ListQuery;
use ztm_proto::wire::{CONTROL_LINE_MAX, CONTROL_LINE_SMALL};

struct Conn {
    hub: Arc<Hub>,
    peer: Peer,
    id: u64,
    kill: Closer,
    /// The endpoint registered on this connection and its session.
    registered: Mutex<Option<(String, SessionId)>>,
    /// Held through a registration, so that two on one connection cannot interleave.
    registering: tokio::sync::Mutex<()>,
    /// Requests with a body in progress on this connection.
    bodies: Arc<Semaphore>,
}

impl Conn {
    fn registered(&self) -> Option<(String, SessionId)> {
        self.registered.lock().clone()
    }
}

/// Serves a control connection. One whose ALPN is `ztm-control-on-demand` (`lines`) carries
/// lines until the agent starts HTTP/2 on it (PROTOCOL.md, "Control connection on demand").
pub async fn serve(
    hub: Arc<Hub>,
    tls: Tls,
    peer: Peer,
    conn_id: u64,
    kill: Closer,
    lines: bool,
) -> Result<()> {
    let _open = hub.metrics.connection(metrics::Kind::Control);
    let bodies = Arc::new(Semaphore::new(hub.limits.bodies_per_connection));
    let conn = Arc::new(Conn {
        hub,
        peer,
        id: conn_id,
        kill,
        registered: Mutex::new(None),
        registering: tokio::sync::Mutex::new(()),
        bodies,
    });
    let deadline = tokio::time::Instant::now() + REGISTER_TIMEOUT;
    let io = if lines {
        // Boxed, as every phase that ends: the connection's future keeps no room for it.
        Box::pin(serve_lines(&conn, tls, deadline)).await
    } else {
        Some(Prefixed::new(Bytes::new(), tls))
    };
    if let Some(io) = io {
        if let Err(e) = Box::pin(serve_h2(&conn, io, deadline)).await {
            tracing::debug!("control connection from {}: {e}", conn.peer.addr);
        }
    }
    if let Some((id, session)) = conn.registered() {
        let name = conn
            .hub
            .registry()
            .get(&id)
            .map(|e| e.name.clone())
            .unwrap_or_default();
        if conn.hub.end_session(&id, session, conn.id) {
            tracing::info!("endpoint {name} ({id}) of user {} offline", conn.peer.user);
        }
    }
    Ok(())
}

/// Serves HTTP/2 on a control connection until it closes.
async fn serve_h2(
    conn: &Arc<Conn>,
    io: Prefixed<Tls>,
    deadline: tokio::time::Instant,
) -> Result<()> {
    let (io, farewell) = goaway::wrap(io, Role::Server);
    // Boxed, as every phase that ends (server.rs, `serve_connection`): the connection's future
    // keeps no room for the HTTP/2 handshake once it is done.
    let mut h2 = Box::pin(ztm_net::h2io::server_builder().handshake::<_, Bytes>(io)).await?;
    let register_deadline = tokio::time::sleep_until(deadline);
    tokio::pin!(register_deadline);
    let goodbye = loop {
        tokio::select! {
            next = h2.accept() => match next {
                Some(Ok((req, send))) => {
                    // Heartbeats, by far the most frequent request, are answered here without
                    // a task of their own (a revoked certificate's go the long way, to 403).
                    if let Some(id) = heartbeat_of(&req) {
                        if !conn.hub.revoked.contains(&conn.peer.serial) {
                            heartbeat(conn, id, send);
                            continue;
                        }
                    }
                    let conn = conn.clone();
                    tokio::spawn(async move { handle(conn, req, send).await });
                }
                Some(Err(e)) => {
                    tracing::debug!("control connection from {}: {e}", conn.peer.addr);
                    break None;
                }
                None => break None,
            },
            _ = conn.kill.closed() => break Some(conn.kill.why()),
            _ = &mut register_deadline, if conn.registered().is_none() => {
                tracing::debug!("{} did not register in time", conn.peer.addr);
                break Some(Goodbye::new(h2::Reason::NO_ERROR, closer::text::NOT_REGISTERED));
            }
        }
    };
    if let Some(goodbye) = goodbye {
        tracing::debug!(
            "closing the control connection of user {} from {}: {goodbye}",
            conn.peer.user,
            conn.peer.addr
        );
        farewell.close(goodbye);
        let drained = async { while h2.accept().await.is_some() {} };
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, drained).await;
    }
    Ok(())
}

/// What ended the lines of a control connection.
enum LinesEnd {
    /// The agent started HTTP/2: the bytes read after the last line come first.
    Started,
    /// The connection closed, or the hub closed it after saying why.
    Closed,
}

/// Serves the lines of a control connection before its HTTP/2 starts (PROTOCOL.md, "Control
/// connection on demand"): each request line is answered with one line, in order. The
/// stream, with the bytes read past the last line in front, once the agent starts HTTP/2;
/// `None` when the connection ended.
async fn serve_lines(
    conn: &Arc<Conn>,
    mut tls: Tls,
    deadline: tokio::time::Instant,
) -> Option<Prefixed<Tls>> {
    let _dormant = conn.hub.metrics.control_dormant();
    let mut reader = LineReader::new();
    let end = read_lines(conn, &mut tls, &mut reader, deadline).await;
    match end {
        LinesEnd::Started => Some(Prefixed::new(reader.into_rest(), tls)),
        LinesEnd::Closed => {
            let _ = tokio::time::timeout(
                FAREWELL_TIMEOUT,
                tokio::io::AsyncWriteExt::shutdown(&mut tls),
            )
            .await;
            None
        }
    }
}

async fn read_lines(
    conn: &Arc<Conn>,
    tls: &mut Tls,
    reader: &mut LineReader,
    deadline: tokio::time::Instant,
) -> LinesEnd {
    // A long line (a registration or service list) holds one of the places for requests with
    // a body, as its HTTP/2 request would, and must arrive within the same time.
    let mut long: Option<(BodyPermit, tokio::time::Instant)> = None;
    loop {
        while let Some(next) = reader.next(CONTROL_LINE_MAX) {
            let answer = match next {
                Next::Preface => return LinesEnd::Started,
                Next::TooLong => LineAnswer {
                    closing: true,
                    ..LineAnswer::error(
                        StatusCode::PAYLOAD_TOO_LARGE.as_u16(),
                        format!("a line longer than {CONTROL_LINE_MAX} bytes"),
                    )
                },
                Next::Line(line) => {
                    let answer = answer_line(conn, &line).await;
                    long = None;
                    answer
                }
            };
            if !say(tls, &answer).await || answer.closing {
                return LinesEnd::Closed;
            }
        }
        if long.is_none() && reader.buffered() > CONTROL_LINE_SMALL {
            match body_permit(conn) {
                Ok(permit) => {
                    long = Some((permit, tokio::time::Instant::now() + BODY_TIMEOUT));
                }
                Err(r) => {
                    say(tls, &closing(refusal_line(r))).await;
                    return LinesEnd::Closed;
                }
            }
        }
        let body_deadline = long.as_ref().map(|(_, d)| *d).unwrap_or(deadline);
        tokio::select! {
            read = reader.fill(tls) => match read {
                Ok(0) | Err(_) => return LinesEnd::Closed,
                Ok(_) => {}
            },
            _ = conn.kill.closed() => {
                say(tls, &goodbye_line(&conn.kill.why())).await;
                return LinesEnd::Closed;
            }
            _ = tokio::time::sleep_until(deadline), if conn.registered().is_none() => {
                tracing::debug!("{} did not register in time", conn.peer.addr);
                say(tls, &closing(LineAnswer::error(
                    StatusCode::REQUEST_TIMEOUT.as_u16(),
                    closer::text::NOT_REGISTERED,
                ))).await;
                return LinesEnd::Closed;
            }
            _ = tokio::time::sleep_until(body_deadline), if long.is_some() => {
                say(tls, &closing(LineAnswer::error(
                    StatusCode::REQUEST_TIMEOUT.as_u16(),
                    format!("the line did not arrive within {BODY_TIMEOUT:?}"),
                ))).await;
                return LinesEnd::Closed;
            }
        }
    }
}

/// The line a control connection that carries lines is closed with: what its GOAWAY would say.
fn goodbye_line(goodbye: &Goodbye) -> LineAnswer {
    let answer = closer::answer(goodbye);
    closing(LineAnswer {
        status: answer.status,
        message: answer.message,
        ..LineAnswer::default()
    })
}

fn closing(answer: LineAnswer) -> LineAnswer {
    LineAnswer {
        closing: true,
        ..answer
    }
}

/// Writes one line within [`REQUEST_TIMEOUT`] (an agent that does not read gets no more):
/// whether it went.
async fn say(tls: &mut Tls, answer: &LineAnswer) -> bool {
    matches!(
        tokio::time::timeout(REQUEST_TIMEOUT, on_demand::write_line(tls, answer)).await,
        Ok(Ok(()))
    )
}

fn refusal_line(refusal: Refusal) -> LineAnswer {
    LineAnswer::error(refusal.status.as_u16(), refusal.message)
}

/// The answer to one request line.
async fn answer_line(conn: &Arc<Conn>, line: &[u8]) -> LineAnswer {
    if conn.hub.revoked.contains(&conn.peer.serial) {
        conn.kill.close(closer::revoked());
        return closing(LineAnswer::error(
            StatusCode::FORBIDDEN.as_u16(),
            format!(
                "the certificate of user {} has been revoked",
                conn.peer.user
            ),
        ));
    }
    let request: ControlLine = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            return LineAnswer::error(
                StatusCode::BAD_REQUEST.as_u16(),
                format!("not a control line: {e}"),
            )
        }
    };
    let not_found = || {
        LineAnswer::error(
            StatusCode::NOT_FOUND.as_u16(),
            "no such session; register again",
        )
    };
    match request {
        ControlLine::Heartbeat { id } => {
            if !beat(conn, &id) {
                return not_found();
            }
            LineAnswer {
                crl_number: conn.hub.revoked.crl().number(),
                ..LineAnswer::status(StatusCode::NO_CONTENT.as_u16())
            }
        }
        ControlLine::Register {
            id,
            protocol,
            name,
            services,
            nonce,
        } => {
            let Some(version) = choose_version(Some(&protocol)) else {
                return LineAnswer {
                    protocol: Some(PROTOCOL_VERSION.to_string()),
                    ..LineAnswer::error(
                        StatusCode::BAD_REQUEST.as_u16(),
                        version_mismatch(Some(protocol)),
                    )
                };
            };
            let version = version.to_string();
            let reg = Register {
                name,
                services,
                nonce,
            };
            match Box::pin(enrol(conn, &id, reg)).await {
                Ok(registered) => LineAnswer {
                    session: Some(registered.session),
                    hub: Some(registered.hub),
                    protocol: Some(version),
                    ..LineAnswer::status(StatusCode::OK.as_u16())
                },
                Err(r) => refusal_line(r),
            }
        }
        ControlLine::Resume { id, session } => {
            let _registering = conn.registering.lock().await;
            if conn.registered().is_some() {
                return LineAnswer::error(
                    StatusCode::CONFLICT.as_u16(),
                    "this connection already holds a session",
                );
            }
            let peer = &conn.peer;
            match conn
                .hub
                .resume(&id, &session, &peer.user, conn.id, &conn.kill)
            {
                Some(s) => {
                    *conn.registered.lock() = Some((id.clone(), s));
                    tracing::debug!("endpoint {id} of user {} resumed its session", peer.user);
                    LineAnswer::status(StatusCode::OK.as_u16())
                }
                None => not_found(),
            }
        }
        ControlLine::Publish { id, services } => match publish_list(conn, &id, services) {
            Ok(()) => LineAnswer::status(StatusCode::NO_CONTENT.as_u16()),
            Err(r) => refusal_line(r),
        },
        ControlLine::Crl { after } => {
            let crl = conn.hub.revoked.crl().current();
            match crl {
                Some(c) if after.is_none_or(|a| c.number > a) => LineAnswer {
                    crl: Some(c.pem()),
                    ..LineAnswer::status(StatusCode::OK.as_u16())
                },
                Some(_) => LineAnswer::status(StatusCode::NO_CONTENT.as_u16()),
                None => LineAnswer::error(
                    StatusCode::SERVICE_UNAVAILABLE.as_u16(),
                    "this hub has no CRL from the CA yet",
                ),
            }
        }
    }
}

/// Answers the first request on a control connection the hub does not admit with `refusal`,
/// then closes it with a GOAWAY that says why (see [`closer::refused`]): the agent learns why
/// instead of seeing a connection drop.
pub async fn refuse(tls: Tls, refusal: Refusal) {
    let (io, farewell) = goaway::wrap(tls, Role::Server);
    let work = async {
        let Ok(mut h2) = ztm_net::h2io::server_builder()
            .handshake::<_, Bytes>(io)
            .await
        else {
            return;
        };
        let first = tokio::time::timeout(Duration::from_secs(2), h2.accept()).await;
        if let Ok(Some(Ok((_, send)))) = first {
            respond_error(send, refusal.status, refusal.message.clone());
        }
        farewell.close(closer::refused(&refusal));
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, async {
            while h2.accept().await.is_some() {}
        })
        .await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(2) + FAREWELL_TIMEOUT, work).await;
}

/// The same for a control connection that carries lines: its first line is answered with
/// the refusal, and the connection closed.
pub async fn refuse_lines(mut tls: Tls, refusal: Refusal) {
    let mut reader = LineReader::new();
    let first = reader.read(&mut tls, CONTROL_LINE_MAX);
    let _ = tokio::time::timeout(Duration::from_secs(2), first).await;
    let line = goodbye_line(&closer::refused(&refusal));
    on_demand::last_line(&mut tls, &line, FAREWELL_TIMEOUT).await;
}

fn refuse_with(send: SendResponse<Bytes>, refusal: Refusal) {
    let mut body = ApiError::new(refusal.status.as_u16(), refusal.message);
    if let Some(reason) = refusal.reason {
        body = body.with_reason(reason);
    }
    respond_json(send, refusal.status, &body)
}

/// Answers one request, in a task of its own for as long as it lasts. The requests that need
/// large futures (tunnels, registrations, publishing, management) box them, and the one that
/// waits longest — an endpoint's request for the next CRL (PROTOCOL.md: up to 50 s, again and
/// again) — gets a small task of its own.
async fn handle(conn: Arc<Conn>, req: Request<RecvStream>, send: SendResponse<Bytes>) {
    // A certificate revoked since the handshake gets nothing more, whatever it asks; the
    // answer goes out before the connection's GOAWAY.
    if conn.hub.revoked.contains(&conn.peer.serial) {
        respond_error(
            send,
            StatusCode::FORBIDDEN,
            format!(
                "the certificate of user {} has been revoked",
                conn.peer.user
            ),
        );
        return conn.kill.close(closer::revoked());
    }
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    match (&method, segments.as_slice()) {
        (&Method::CONNECT, _) if !is_tunnel(&req) => respond_error(
            send,
            StatusCode::BAD_REQUEST,
            format!("expected :protocol {TUNNEL_PROTOCOL} (extended CONNECT, RFC 8441)"),
        ),
        (&Method::CONNECT, ["api", "endpoints", ep, "services", proto, svc]) => {
            let (ep, proto, svc) = (ep.to_string(), proto.to_string(), svc.to_string());
            Box::pin(tunnel(&conn, &ep, &proto, &svc, req, send)).await
        }
        (&Method::CONNECT, _) => respond_error(send, StatusCode::NOT_FOUND, "no such tunnel path"),
        (&Method::POST, ["api", "endpoints", id]) => Box::pin(register(&conn, id, req, send)).await,
        (&Method::POST, ["api", "endpoints", id, "heartbeat"]) => heartbeat(&conn, id, send),
        (&Method::POST, ["api", "endpoints", id, "services"]) => {
            Box::pin(publish(&conn, id, req, send)).await
        }
        (&Method::GET, ["api", "endpoints"]) => list(&conn, &req, send, Listed::Endpoints),
        (&Method::GET, ["api", "crl"]) => {
            // It may wait for 50 s, and every endpoint has one waiting: a task of its own that
            // holds only what the wait needs, while this one ends.
            let query = req.uri().query().map(str::to_string);
            let revoked = conn.hub.revoked.clone();
            tokio::spawn(async move {
                crate::ca_client::serve_crl(&revoked, query.as_deref(), send).await
            });
        }
        (&Method::GET, ["api", "services"]) => list(&conn, &req, send, Listed::Services),
        (&Method::GET, ["api", "services", proto, name]) => {
            let Some(proto) = Proto::parse(proto) else {
                return respond_error(send, StatusCode::BAD_REQUEST, "protocol must be tcp or udp");
            };
            match conn.hub.service_json(&conn.peer.user, proto, name) {
                Some(body) => respond(send, StatusCode::OK, Some("application/json"), body),
                None => respond_error(
                    send,
                    StatusCode::NOT_FOUND,
                    format!(
                        "no online endpoint here provides {proto}/{name} to user {}",
                        conn.peer.user
                    ),
                ),
            }
        }
        (_, ["api", "endpoints", ep, "manage", ..]) => {
            let ep = ep.to_string();
            Box::pin(manage(&conn, &ep, req, send)).await
        }
        _ => respond_error(
            send,
            StatusCode::NOT_FOUND,
            format!("no such API: {method} {path}"),
        ),
    }
}

enum Listed {
    Endpoints,
    Services,
}

/// `GET /api/endpoints` and `GET /api/services`: the whole list (built once per change and
/// shared), or the part a query asks for with the number of matches in `ztm-total`. Each user
/// discovers only the providers it may connect to, each by its own list.
fn list(conn: &Conn, req: &Request<RecvStream>, send: SendResponse<Bytes>, what: Listed) {
    let query = match ListQuery::parse(req.uri().query()) {
        Ok(q) => q,
        Err(e) => return respond_error(send, StatusCode::BAD_REQUEST, e),
    };
    let user = &conn.peer.user;
    if query.is_all() {
        let body = match what {
            Listed::Endpoints => conn.hub.endpoints_json(user),
            Listed::Services => conn.hub.services_json(user),
        };
        return respond(send, StatusCode::OK, Some("application/json"), body);
    }
    let (body, total) = match what {
        Listed::Endpoints => conn.hub.endpoints_page(user, &query),
        Listed::Services => conn.hub.services_page(user, &query),
    };
    h2io::respond_with(
        send,
        StatusCode::OK,
        Some("application/json"),
        &[(TOTAL_HEADER, &total.to_string())],
        body,
    )
}

/// What a request with a body holds while it reads and handles it.
struct BodyPermit {
    _conn: OwnedSemaphorePermit,
    _user: Slot<String>,
}

/// A place for one more request with a body, within the connection's, the user's and the
/// hub's bounds.
fn body_permit(conn: &Conn) -> Result<BodyPermit, Refusal> {
    let Ok(on_conn) = conn.bodies.clone().try_acquire_owned() else {
        return Err(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} requests with a body are in progress on this connection; wait for them",
                conn.hub.limits.bodies_per_connection
            ),
        ));
    };
    match conn.hub.bodies.try_take(conn.peer.user.clone()) {
        Ok(slot) => Ok(BodyPermit {
            _conn: on_conn,
            _user: slot,
        }),
        Err(Refused::Key(n)) => Err(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "user {} has {n} requests with a body in progress at this hub; wait for them",
                conn.peer.user
            ),
        )),
        Err(Refused::Total(_)) => Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the hub is busy; try again",
        )),
    }
}

/// Reads a whole body of at most `limit` bytes within [`BODY_TIMEOUT`].
async fn read_bounded(body: &mut RecvStream, limit: usize) -> Result<Bytes, Refusal> {
    match tokio::time::timeout(BODY_TIMEOUT, read_body(body, limit)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e @ BodyError::TooLarge(_))) => {
            Err(Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()))
        }
        Ok(Err(e)) => Err(Refusal::new(StatusCode::BAD_REQUEST, e.to_string())),
        Err(_) => Err(Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {BODY_TIMEOUT:?}"),
        )),
    }
}

/// Reads and parses a JSON body of at most `limit` bytes.
async fn read_json<T: serde::de::DeserializeOwned>(
    body: &mut RecvStream,
    limit: usize,
    what: &str,
) -> Result<T, Refusal> {
    let bytes = read_bounded(body, limit).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("bad {what}: {e}")))
}

fn version_mismatch(offered: Option<String>) -> String {
    format!(
        "this hub speaks version {PROTOCOL_VERSION} of the ztm protocol; the agent offered {:?}",
        offered.unwrap_or_default()
    )
}

async fn register(conn: &Arc<Conn>, id: &str, req: Request<RecvStream>, send: SendResponse<Bytes>) {
    let offered = req
        .headers()
        .get(PROTOCOL_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    // The version spoken on this connection: the highest the agent offers that the hub
    // speaks (PROTOCOL.md, "Versions").
    let Some(version) = choose_version(offered.as_deref()) else {
        let message = version_mismatch(offered);
        let error = ztm_proto::model::ApiError::new(StatusCode::BAD_REQUEST.as_u16(), message);
        return respond_json_with(
            send,
            StatusCode::BAD_REQUEST,
            &[(PROTOCOL_HEADER, &PROTOCOL_VERSION.to_string())],
            &error,
        );
    };
    let version = version.to_string();
    if !is_endpoint_id(id) {
        return respond_error(
            send,
            StatusCode::BAD_REQUEST,
            "endpoint id must be a UUID in lower case",
        );
    }
    let _permit = match body_permit(conn) {
        Ok(p) => p,
        Err(r) => return refuse_with(send, r),
    };
    let mut body = req.into_body();
    let reg: Register = match read_json(&mut body, MAX_CONTROL_BODY, "registration").await {
        Ok(r) => r,
        Err(r) => return refuse_with(send, r),
    };
    match enrol(conn, id, reg).await {
        Ok(registered) => respond_json_with(
            send,
            StatusCode::OK,
            &[(PROTOCOL_HEADER, &version)],
            &registered,
        ),
        Err(r) => refuse_with(send, r),
    }
}

/// Registers endpoint `id` on this connection (either kind): its new session, or why not.
async fn enrol(conn: &Arc<Conn>, id: &str, reg: Register) -> Result<Registered, Refusal> {
    let bad = |m: String| Refusal::new(StatusCode::BAD_REQUEST, m);
    if !is_endpoint_id(id) {
        return Err(bad("endpoint id must be a UUID in lower case".into()));
    }
    if let Err(e) = check_name(&reg.name) {
        return Err(bad(format!("name: {e}")));
    }
    if let Err(r) = admission::endpoint_id(id, &conn.peer.user, reg.nonce.as_deref()) {
        if r.status == StatusCode::FORBIDDEN {
            tracing::warn!(
                "user {} tried to register endpoint {id}, which is not its own",
                conn.peer.user
            );
        }
        return Err(r);
    }
    admission::services(&reg.services)?;
    // One registration at a time on a connection: the check below and the recording after
    // it must not interleave with another's.
    let _registering = conn.registering.lock().await;
    if let Some((existing, _)) = conn.registered() {
        if existing != id {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "this connection already registered another endpoint",
            ));
        }
    }
    let token = format!("{:032x}", rand::random::<u128>());
    let outcome = conn.hub.register(
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
        conn.id,
        &conn.kill,
    );
    let registration = outcome.map_err(|refusal| register_refusal(conn, id, refusal))?;
    *conn.registered.lock() = Some((id.to_string(), registration.session));
    tracing::info!(
        "endpoint {} ({id}) of user {} online from {}",
        reg.name,
        conn.peer.user,
        conn.peer.addr
    );
    Ok(Registered {
        session: token,
        hub: conn.hub.name.clone(),
    })
}

fn register_refusal(conn: &Conn, id: &str, refusal: RegisterRefusal) -> Refusal {
    let user = &conn.peer.user;
    match refusal {
        RegisterRefusal::Registry(RegisterError::Taken { .. }) => {
            tracing::warn!("user {user} tried to register endpoint {id}, which another user holds");
            Refusal::new(
                StatusCode::FORBIDDEN,
                format!("endpoint {id} is online under another user"),
            )
        }
        RegisterRefusal::Registry(RegisterError::UserFull { limit }) => Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("user {user} has {limit} endpoints online at this hub, as many as it may"),
        ),
        RegisterRefusal::Registry(RegisterError::UserServices { limit }) => Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("the endpoints of user {user} would publish more than {limit} services"),
        ),
        RegisterRefusal::Registry(RegisterError::Full) => {
            Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "the hub is full")
        }
        RegisterRefusal::Stale => Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the hub cannot reach its CA to check revocations; try again later",
        ),
    }
}

/// The session registered on this connection, if it is for endpoint `id`.
fn own_session(conn: &Conn, id: &str) -> Option<SessionId> {
    conn.registered()
        .filter(|(registered, _)| registered == id)
        .map(|(_, s)| s)
}

/// The endpoint id of a heartbeat request (`POST /api/endpoints/{id}/heartbeat`).
fn heartbeat_of<B>(req: &Request<B>) -> Option<&str> {
    if req.method() != Method::POST {
        return None;
    }
    let id = req
        .uri()
        .path()
        .strip_prefix("/api/endpoints/")?
        .strip_suffix("/heartbeat")?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// Records a heartbeat of endpoint `id`, if it is the one registered on this connection and
/// its session goes on.
fn beat(conn: &Conn, id: &str) -> bool {
    own_session(conn, id).is_some_and(|s| conn.hub.registry().heartbeat(id, s, now_ms()))
}

fn heartbeat(conn: &Arc<Conn>, id: &str, send: SendResponse<Bytes>) {
    if beat(conn, id) {
        respond(send, StatusCode::NO_CONTENT, None, Bytes::new())
    } else {
        respond_error(
            send,
            StatusCode::NOT_FOUND,
            "no such session; register again",
        )
    }
}

async fn publish(conn: &Arc<Conn>, id: &str, req: Request<RecvStream>, send: SendResponse<Bytes>) {
    if own_session(conn, id).is_none() {
        return respond_error(
            send,
            StatusCode::NOT_FOUND,
            "no such session; register again",
        );
    }
    let _permit = match body_permit(conn) {
        Ok(p) => p,
        Err(r) => return refuse_with(send, r),
    };
    let mut body = req.into_body();
    let services: Vec<ServiceDecl> =
        match read_json(&mut body, MAX_CONTROL_BODY, "service list").await {
            Ok(s) => s,
            Err(r) => return refuse_with(send, r),
        };
    match publish_list(conn, id, services) {
        Ok(()) => respond(send, StatusCode::NO_CONTENT, None, Bytes::new()),
        Err(r) => refuse_with(send, r),
    }
}

/// Replaces the services endpoint `id` publishes, if it is the one registered on this
/// connection.
fn publish_list(conn: &Conn, id: &str, services: Vec<ServiceDecl>) -> Result<(), Refusal> {
    let gone = || Refusal::new(StatusCode::NOT_FOUND, "no such session; register again");
    let session = own_session(conn, id).ok_or_else(gone)?;
    admission::services(&services)?;
    match conn.hub.registry().publish(id, session, services) {
        Ok(true) => Ok(()),
        Ok(false) => Err(gone()),
        Err(e) => Err(register_refusal(conn, id, RegisterRefusal::Registry(e))),
    }
}

/// The `ztm-endpoint-user` header of a request, if it has one.
fn endpoint_user(req: &Request<RecvStream>) -> Option<String> {
    req.headers()
        .get(ENDPOINT_USER_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Is a management answer one the hub relays: JSON (or no body at all)?
fn relayable(answer: &h2io::Answer) -> bool {
    if answer.body.is_empty() {
        return true;
    }
    let json = answer
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    json && serde_json::from_slice::<serde::de::IgnoredAny>(&answer.body).is_ok()
}

/// Forwards a management request to endpoint `ep` over its reverse connection.
async fn manage(conn: &Arc<Conn>, ep: &str, req: Request<RecvStream>, send: SendResponse<Bytes>) {
    let target = {
        let registry = conn.hub.registry();
        registry
            .online_entry(ep, now_ms())
            .map(|e| (e.user.clone(), e.session.as_ref().map(|s| s.id)))
    };
    let view = target.as_ref().map(|(owner, _)| Target {
        id: ep,
        owner: owner.as_str(),
    });
    if let Err(r) = admission::manage(&conn.peer.user, ep, view, endpoint_user(&req).as_deref()) {
        return manage_refuse(conn, send, r);
    }
    let Some((_, Some(session))) = target else {
        return manage_refuse(
            conn,
            send,
            Refusal::not_here(format!("endpoint {ep} is not online at this hub")),
        );
    };
    let _permit = match body_permit(conn) {
        Ok(p) => p,
        Err(r) => return manage_refuse(conn, send, r),
    };
    let sender = match conn.hub.reverse_of(session).await {
        Ok(s) => s,
        Err(e) => return manage_error(conn, send, StatusCode::BAD_GATEWAY, no_reverse(ep, e)),
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
    let body = match read_bounded(&mut body, MAX_MANAGE_BODY).await {
        Ok(b) => b,
        Err(r) => return manage_refuse(conn, send, r),
    };
    let forwarded = h2io::build(method, &format!("/api{rest}")).map(|b| {
        let b = b.header(USER_HEADER, conn.peer.user.as_str());
        match content_type {
            Some(ct) => b.header(http::header::CONTENT_TYPE, ct),
            None => b,
        }
    });
    let Ok(Ok(forwarded)) = forwarded.map(|b| b.body(())) else {
        return manage_error(conn, send, StatusCode::BAD_REQUEST, "bad management path");
    };
    // The hop's own deadline says 504; anything else that fails it, 502.
    let asked = h2io::request(
        &sender,
        forwarded,
        body,
        MAX_MANAGE_BODY,
        HOP_TIMEOUT + Duration::from_secs(1),
    );
    let Ok(answer) = tokio::time::timeout(HOP_TIMEOUT, asked).await else {
        return manage_error(
            conn,
            send,
            StatusCode::GATEWAY_TIMEOUT,
            format!("endpoint {ep} did not answer within {HOP_TIMEOUT:?}"),
        );
    };
    match answer {
        Ok(answer) if relayable(&answer) => {
            let ct = (!answer.body.is_empty()).then_some("application/json");
            conn.hub.metrics.management(answer.status.as_u16());
            respond(send, answer.status, ct, answer.body)
        }
        Ok(answer) => {
            tracing::warn!(
                "endpoint {ep} answered a management request of user {} with {:?}, which is \
                 not JSON; not relayed",
                conn.peer.user,
                answer.headers.get(http::header::CONTENT_TYPE)
            );
            manage_error(
                conn,
                send,
                StatusCode::BAD_GATEWAY,
                format!("endpoint {ep} answered with something that is not JSON"),
            )
        }
        Err(e) => manage_error(
            conn,
            send,
            StatusCode::BAD_GATEWAY,
            format!("endpoint {ep} did not answer: {e:#}"),
        ),
    }
}

/// Answers a management request with an error, counting it by status.
fn manage_error(
    conn: &Conn,
    send: SendResponse<Bytes>,
    status: StatusCode,
    message: impl Into<String>,
) {
    conn.hub.metrics.management(status.as_u16());
    respond_error(send, status, message)
}

fn manage_refuse(conn: &Conn, send: SendResponse<Bytes>, refusal: Refusal) {
    conn.hub.metrics.management(refusal.status.as_u16());
    refuse_with(send, refusal)
}

/// Answers a tunnel request with an error, counting the failure by its reason.
fn tunnel_error(
    conn: &Conn,
    send: SendResponse<Bytes>,
    status: StatusCode,
    message: impl Into<String>,
) {
    tunnel_answer(conn, send, status, &ApiError::new(status.as_u16(), message))
}

/// Answers a tunnel request with `error` (the far agent's, passed on), counting the failure
/// by its reason.
fn tunnel_answer(conn: &Conn, send: SendResponse<Bytes>, status: StatusCode, error: &ApiError) {
    conn.hub
        .metrics
        .tunnel_failed(metrics::tunnel_failure(status.as_u16()));
    respond_json(send, status, error)
}

fn tunnel_refuse(conn: &Conn, send: SendResponse<Bytes>, refusal: Refusal) {
    conn.hub
        .metrics
        .tunnel_failed(metrics::tunnel_failure(refusal.status.as_u16()));
    refuse_with(send, refusal)
}

/// Why a request for endpoint `ep` cannot go over its reverse connection, in words.
fn no_reverse(ep: &str, e: NoReverse) -> String {
    match e {
        NoReverse::NotConnected => format!("endpoint {ep} did not finish connecting to this hub"),
        NoReverse::Refused(why) => {
            format!("endpoint {ep} cannot take requests from this hub: {why}")
        }
    }
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
    let Some(proto) = Proto::parse(proto) else {
        return tunnel_error(
            conn,
            send,
            StatusCode::BAD_REQUEST,
            "protocol must be tcp or udp",
        );
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
    let view = target.as_ref().map(|(owner, _, _)| Target {
        id: ep,
        owner: owner.as_str(),
    });
    let decision = admission::tunnel(
        &conn.peer.user,
        ep,
        view,
        endpoint_user(&req).as_deref(),
        target.as_ref().and_then(|(_, _, s)| s.as_ref()),
        &format!("{proto}/{svc}"),
    );
    let destination = req
        .headers()
        .get(DESTINATION_HEADER)
        .map(|v| v.to_str().unwrap_or("\u{fffd}").to_string());
    let decision = decision.and_then(|()| admission::destination(svc, destination.as_deref()));
    if let Err(r) = decision {
        if r.status == StatusCode::FORBIDDEN {
            tracing::warn!(
                "user {} refused a tunnel to {proto}/{svc} on endpoint {ep}",
                conn.peer.user
            );
        }
        return tunnel_refuse(conn, send, r);
    }
    let Some((_, Some(session), _)) = target else {
        return tunnel_refuse(
            conn,
            send,
            Refusal::not_here(format!("endpoint {ep} is not online at this hub")),
        );
    };
    let _user_slot = match conn.hub.tunnels.try_take(conn.peer.user.clone()) {
        Ok(slot) => slot,
        Err(Refused::Key(n)) => {
            return tunnel_error(
                conn,
                send,
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "user {} has {n} tunnels open through this hub, as many as it may",
                    conn.peer.user
                ),
            )
        }
        Err(Refused::Total(_)) => {
            return tunnel_error(
                conn,
                send,
                StatusCode::SERVICE_UNAVAILABLE,
                "this hub carries as many tunnels as it may; try another hub",
            )
        }
    };
    // A stream of its own on the far agent's reverse connection, never one of those kept
    // for management requests.
    let stream_slot = conn
        .hub
        .tunnel_slots(session)
        .and_then(|slots| slots.try_acquire_owned().ok());
    let Some(_stream_slot) = stream_slot else {
        return tunnel_error(
            conn,
            send,
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "endpoint {ep} has {TUNNEL_STREAMS} tunnels open through this hub, as many as \
                 one connection carries"
            ),
        );
    };
    let reverse = match conn.hub.reverse_of(session).await {
        Ok(r) => r,
        Err(e) => return tunnel_error(conn, send, StatusCode::BAD_GATEWAY, no_reverse(ep, e)),
    };
    let started = std::time::Instant::now();
    // Counted as active from the provider's yes until the relay ends.
    let active = std::sync::OnceLock::new();
    let active = &active;
    let requested = async {
        let mut b_req = h2io::build(Method::CONNECT, &format!("/api/services/{proto}/{svc}"))?
            .header(USER_HEADER, conn.peer.user.as_str());
        if let Some(d) = &destination {
            b_req = b_req.header(DESTINATION_HEADER, d.as_str());
        }
        let mut b_req = b_req.body(())?;
        b_req
            .extensions_mut()
            .insert(h2::ext::Protocol::from_static(TUNNEL_PROTOCOL));
        let mut sender = reverse.ready().await?;
        Ok::<_, anyhow::Error>(sender.send_request(b_req, false)?)
    }
    .await;
    let (b_resp, b_send) = match requested {
        Ok(v) => v,
        Err(e) => return tunnel_error(conn, send, StatusCode::BAD_GATEWAY, format!("{e:#}")),
    };
    // B's answer decides; meanwhile the client's first bytes already travel on to B.
    let opened = async move {
        let resp = match tokio::time::timeout(HOP_TIMEOUT, b_resp).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                tunnel_error(
                    conn,
                    send,
                    StatusCode::BAD_GATEWAY,
                    format!("endpoint {ep}: {e}"),
                );
                return Err(());
            }
            Err(_) => {
                let msg = format!("endpoint {ep} did not answer");
                tunnel_error(conn, send, StatusCode::GATEWAY_TIMEOUT, msg);
                return Err(());
            }
        };
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            // The far agent's words, and its reason (why an exit could not connect).
            let error = h2io::error_of(resp).await;
            tunnel_answer(conn, send, status, &error);
            return Err(());
        }
        let mut send = send;
        let a_send = send
            .send_response(http::Response::new(()), false)
            .map_err(|_| conn.hub.metrics.tunnel_failed(metrics::BROKEN))?;
        let _ = active.set(
            conn.hub
                .metrics
                .tunnel_opened(started.elapsed().as_secs_f64()),
        );
        tracing::debug!("tunnel {} -> {proto}/{svc}@{ep} opened", conn.peer.user);
        Ok((a_send, resp.into_body()))
    };
    let span = tracing::info_span!(
        "tunnel",
        user = %conn.peer.user,
        endpoint = %ep,
        service = %format!("{proto}/{svc}")
    );
    let relayed = ztm_relay::relay_opening(req.into_body(), b_send, opened, &conn.hub.stalls)
        .instrument(span)
        .await;
    match relayed {
        Err(()) => {}
        Ok(Ok((up, down))) => {
            conn.hub.metrics.relayed(up, down);
            tracing::debug!(
                bytes_up = up,
                bytes_down = down,
                duration_ms = started.elapsed().as_millis() as u64,
                "tunnel {} -> {proto}/{svc}@{ep} closed: {up} bytes up, {down} down, {:?}",
                conn.peer.user,
                started.elapsed()
            )
        }
        Ok(Err(e)) => {
            conn.hub.metrics.tunnel_failed(metrics::BROKEN);
            tracing::debug!(
                duration_ms = started.elapsed().as_millis() as u64,
                "tunnel {} -> {proto}/{svc}@{ep} failed after {:?}: {e}",
                conn.peer.user,
                started.elapsed()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_are_recognised_by_method_and_path() {
        let cases = [
            ("POST", "/api/endpoints/abc/heartbeat", Some("abc")),
            ("GET", "/api/endpoints/abc/heartbeat", None),
            ("POST", "/api/endpoints/abc/services", None),
            ("POST", "/api/endpoints//heartbeat", None),
            ("POST", "/api/endpoints/a/b/heartbeat", None),
            ("POST", "/api/endpoints/heartbeat", None),
            ("POST", "/api/endpoints/abc/heartbeat/", None),
        ];
        for (method, path, id) in cases {
            let req = Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .unwrap();
            assert_eq!(heartbeat_of(&req), id, "{method} {path}");
        }
    }

    fn answer(ct: Option<&str>, body: &'static [u8]) -> h2io::Answer {
        let mut headers = http::HeaderMap::new();
        if let Some(ct) = ct {
            headers.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
        }
        h2io::Answer {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(body),
        }
    }

    #[test]
    fn only_json_answers_are_relayed() {
        for (ct, body, ok) in [
            (Some("application/json"), &b"[]"[..], true),
            (Some("application/json; charset=utf-8"), b"{\"a\":1}", true),
            (Some("Application/JSON"), b"null", true),
            (None, b"", true),
            (Some("text/html"), b"", true),
            (Some("text/html"), b"<script>alert(1)</script>", false),
            (
                Some("application/json"),
                b"<script>alert(1)</script>",
                false,
            ),
            (None, b"[]", false),
            (Some("application/javascript"), b"[]", false),
            (Some("text/plain"), b"{}", false),
        ] {
            assert_eq!(relayable(&answer(ct, body)), ok, "{ct:?} {body:?}");
        }
    }
}

#[cfg(test)]
mod future_sizes {
    fn size3<A, B, C, Fut>(_: fn(A, B, C) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// Every request is a task holding `handle`'s future (it was 3.6 KiB, all of it room for
    /// a tunnel's), and every endpoint keeps a request for the next CRL waiting at the hub (it
    /// held all of that while it waited; now a task of the CRL's own future).
    #[test]
    fn requests_hold_small_futures() {
        let handle = size3(super::handle);
        let crl = size3(crate::ca_client::serve_crl);
        eprintln!("handle: {handle} bytes, serve_crl: {crl} bytes");
        assert!(handle <= 1024, "handle: {handle} bytes");
        assert!(crl <= 512, "serve_crl: {crl} bytes");
    }

    /// An idle endpoint's control connection waits in `serve_lines` (PROTOCOL.md, "Control
    /// connection on demand"); answering a line boxes what registering needs.
    #[test]
    fn a_connection_that_carries_lines_holds_a_small_future() {
        let lines = size3(super::serve_lines);
        eprintln!("serve_lines: {lines} bytes");
        assert!(lines <= 1024, "serve_lines: {lines} bytes");
    }
}
