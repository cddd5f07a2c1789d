//! The agent's REST API (docs/requirements.md §5): meshes, endpoints, services, ports. Requests for another
//! endpoint are carried through a hub ([`MeshRuntime::forward`]); requests a hub forwards to
//! us arrive here too, marked [`Forwarded`].

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use ztm_proto::invite::Invitation;
use ztm_proto::model::{JoinRequest, Mesh, MeshAgent, PortBody, Service, ServiceBody};
use ztm_proto::names::{check_name, decode_segment};
use ztm_proto::wire::{is_endpoint_id, Proto};

use crate::discovery::Unresolved;
use crate::mesh::MeshRuntime;
use crate::store::{MeshRecord, PortRecord, ServiceRecord};
use crate::{Agent, Forwarded};

/// Largest request body the API reads.
const BODY_LIMIT: usize = 1 << 20;

/// An error answer: `{"status":N,"message":"..."}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn into_response_json(self) -> Response {
        (
            self.status,
            Json(ztm_proto::model::ApiError::new(
                self.status.as_u16(),
                self.message,
            )),
        )
            .into_response()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.into_response_json()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!("{e}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

type ApiResult<T = Response> = Result<T, ApiError>;

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/", get(crate::ui::index))
        .route("/ui/{file}", get(crate::ui::asset))
        .route("/api/meshes", get(list_meshes))
        .route(
            "/api/meshes/{mesh}",
            get(get_mesh).post(join_mesh).delete(leave_mesh),
        )
        .route("/api/meshes/{mesh}/log", get(mesh_log))
        .route("/api/meshes/{mesh}/ca", get(get_ca).post(set_ca))
        .route(
            "/api/meshes/{mesh}/agent/certificate",
            get(get_cert).post(set_cert),
        )
        .route("/api/meshes/{mesh}/agent/key", post(set_key))
        .route("/api/meshes/{mesh}/endpoints", get(list_endpoints))
        .route("/api/meshes/{mesh}/endpoints/{ep}", get(get_endpoint))
        .route(
            "/api/meshes/{mesh}/endpoints/{ep}/{*rest}",
            any(endpoint_scoped),
        )
        .route("/api/meshes/{mesh}/services", get(list_services))
        .route(
            "/api/meshes/{mesh}/services/{proto}/{svc}",
            get(get_service),
        )
        .fallback(crate::api::fallback)
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            agent.clone(),
            crate::guard::guard,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(crate::guard::headers))
        .with_state(agent)
}

async fn fallback(uri: Uri) -> Response {
    ApiError::not_found(format!("no such API: {}", uri.path())).into_response()
}

/// Turns the plain-text errors of extractors and limits into the JSON error body.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return resp;
    }
    let body = axum::body::to_bytes(resp.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    ApiError::new(status, message).into_response()
}

fn parse_json<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("malformed JSON: {e}")))
}

fn pem_text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

fn runtime(agent: &Agent, mesh: &str) -> ApiResult<Arc<MeshRuntime>> {
    agent
        .runtime(mesh)
        .ok_or_else(|| ApiError::not_found(format!("no mesh named {mesh}")))
}

fn mesh_json(rt: &MeshRuntime) -> Mesh {
    Mesh {
        name: rt.record.name.clone(),
        ca: rt.record.ca.clone(),
        agent: MeshAgent {
            id: rt.record.endpoint_id.clone(),
            name: rt.record.agent_name.clone(),
            username: rt.username.clone(),
            certificate: rt.record.cert.clone(),
            expires: rt.cert_expires,
        },
        bootstraps: rt.record.bootstraps.clone(),
        connected: rt.connected(),
        errors: rt.errors(),
        ca_expires: rt.ca_expires,
        warnings: rt.warnings(),
    }
}

async fn list_meshes(State(agent): State<Arc<Agent>>) -> Json<Vec<Mesh>> {
    Json(agent.runtimes().iter().map(|rt| mesh_json(rt)).collect())
}

async fn get_mesh(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
) -> ApiResult<Json<Mesh>> {
    let rt = runtime(&agent, &mesh)?;
    Ok(Json(mesh_json(&rt)))
}

fn check_hub_address(addr: &str) -> Result<(), String> {
    let (host, port) = match addr.rsplit_once(':') {
        Some(v) => v,
        None => return Err(format!("hub address {addr:?} must be HOST:PORT")),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(format!("hub address {addr:?} must be HOST:PORT")),
    }
}

/// Checks a complete mesh configuration; the errors name the field.
fn validate(record: &MeshRecord) -> ApiResult<()> {
    check_name(&record.name).map_err(|e| ApiError::bad(format!("mesh name: {e}")))?;
    check_name(&record.agent_name).map_err(|e| ApiError::bad(format!("agent.name: {e}")))?;
    ztm_pki::parse_cert(&record.ca, "ca").map_err(|e| ApiError::bad(e.to_string()))?;
    ztm_pki::cert_info_pem(&record.ca, "ca").map_err(|e| ApiError::bad(e.to_string()))?;
    ztm_pki::cert_info_pem(&record.cert, "agent.certificate")
        .map_err(|e| ApiError::bad(e.to_string()))?;
    ztm_pki::parse_key(&record.key, "agent.privateKey")
        .map_err(|e| ApiError::bad(e.to_string()))?;
    ztm_pki::key_matches_cert(&record.cert, &record.key)
        .map_err(|e| ApiError::bad(format!("agent.privateKey: {e}")))?;
    if record.bootstraps.is_empty() {
        return Err(ApiError::bad(
            "bootstraps: give at least one hub address (HOST:PORT)",
        ));
    }
    if record.bootstraps.len() > 16 {
        return Err(ApiError::bad("bootstraps: at most 16 hubs"));
    }
    for b in &record.bootstraps {
        check_hub_address(b).map_err(|e| ApiError::bad(format!("bootstraps: {e}")))?;
    }
    Ok(())
}

fn default_agent_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| check_name(s).is_ok())
        .unwrap_or_else(|| "agent".to_string())
}

/// Saves a new configuration for a mesh (validated first) and restarts its runtime.
fn apply(agent: &Agent, record: MeshRecord, joined: bool) -> ApiResult<Json<Mesh>> {
    validate(&record)?;
    agent.store.put_mesh(&record)?;
    let rt = agent.start_mesh(record);
    rt.event(
        "info",
        &if joined {
            format!(
                "joined mesh {} as {} ({})",
                rt.name(),
                rt.username,
                rt.record.agent_name
            )
        } else {
            format!("configuration of mesh {} updated", rt.name())
        },
    );
    Ok(Json(mesh_json(&rt)))
}

async fn join_mesh(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Mesh>> {
    check_name(&mesh).map_err(|e| ApiError::bad(format!("mesh name: {e}")))?;
    let mut req: JoinRequest = parse_json(&body)?;
    let existing = agent.store.mesh(&mesh)?;
    if let Some(text) = req.invitation.take() {
        if existing.is_some() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "mesh {mesh} is joined already: leave it first, or join with the invitation \
                     under another mesh name"
                ),
            ));
        }
        req = from_invitation(&text, req.agent.name.take())?;
    }
    let key = match (
        req.agent.private_key.filter(|k| !k.trim().is_empty()),
        &existing,
    ) {
        (Some(key), _) => key,
        (None, Some(e)) => e.key.clone(),
        (None, None) => return Err(ApiError::bad("agent.privateKey: required to join a mesh")),
    };
    let record = MeshRecord {
        name: mesh,
        ca: req.ca,
        cert: req.agent.certificate,
        key,
        agent_name: req
            .agent
            .name
            .filter(|n| !n.is_empty())
            .or_else(|| existing.as_ref().map(|e| e.agent_name.clone()))
            .unwrap_or_else(default_agent_name),
        // A new mesh's id is derived from its user when it starts (`identity::bind`).
        endpoint_id: existing
            .as_ref()
            .map(|e| e.endpoint_id.clone())
            .unwrap_or_default(),
        id_nonce: existing
            .as_ref()
            .map(|e| e.id_nonce.clone())
            .unwrap_or_default(),
        bootstraps: req.bootstraps,
    };
    apply(&agent, record, existing.is_none())
}

/// A join request made of an invitation (checked: its certificate is its user's, signed by its
/// CA, and matches its key), with this endpoint's `name`.
fn from_invitation(text: &str, name: Option<String>) -> ApiResult<JoinRequest> {
    let bad = |m: String| ApiError::bad(format!("invitation: {m}"));
    let inv = Invitation::parse(text).map_err(|e| bad(e.to_string()))?;
    ztm_pki::parse_cert(&inv.ca, "its CA certificate").map_err(|e| bad(e.to_string()))?;
    let info = ztm_pki::cert_info_pem(&inv.certificate, "its certificate")
        .map_err(|e| bad(e.to_string()))?;
    if info.common_name != inv.user {
        return Err(bad(format!(
            "its certificate is of user {}, not of user {}",
            info.common_name, inv.user
        )));
    }
    ztm_pki::verify_signed_by(&inv.ca, &inv.certificate).map_err(|_| {
        bad(
            "its certificate is not signed by its CA certificate (a wrong or altered \
             CA certificate)"
                .into(),
        )
    })?;
    ztm_pki::parse_key(&inv.private_key, "its private key").map_err(|e| bad(e.to_string()))?;
    ztm_pki::key_matches_cert(&inv.certificate, &inv.private_key)
        .map_err(|_| bad("its private key does not match its certificate".into()))?;
    Ok(JoinRequest {
        ca: inv.ca,
        agent: ztm_proto::model::JoinAgent {
            name,
            certificate: inv.certificate,
            private_key: Some(inv.private_key),
        },
        bootstraps: inv.hubs,
        invitation: None,
    })
}

async fn leave_mesh(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
) -> ApiResult<StatusCode> {
    runtime(&agent, &mesh)?;
    agent.stop_mesh(&mesh);
    agent.store.delete_mesh(&mesh)?;
    tracing::info!("left mesh {mesh}");
    Ok(StatusCode::NO_CONTENT)
}

async fn mesh_log(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
) -> ApiResult<Response> {
    runtime(&agent, &mesh)?;
    Ok(Json(agent.store.log(&mesh)?).into_response())
}

fn pem_body(body: &Bytes, field: &str) -> ApiResult<String> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad(format!("{field}: not text")))?
        .to_string();
    Ok(text)
}

async fn get_ca(State(agent): State<Arc<Agent>>, Path(mesh): Path<String>) -> ApiResult<Response> {
    Ok(pem_text(runtime(&agent, &mesh)?.record.ca.clone()))
}

async fn set_ca(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Mesh>> {
    let mut record = runtime(&agent, &mesh)?.record.clone();
    record.ca = pem_body(&body, "ca")?;
    apply(&agent, record, false)
}

async fn get_cert(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
) -> ApiResult<Response> {
    Ok(pem_text(runtime(&agent, &mesh)?.record.cert.clone()))
}

/// Which half of the agent's identity a request sets.
#[derive(Clone, Copy, PartialEq)]
enum Half {
    Certificate,
    Key,
}

impl Half {
    fn field(self) -> &'static str {
        match self {
            Half::Certificate => "agent.certificate",
            Half::Key => "agent.privateKey",
        }
    }
    fn what(self) -> &'static str {
        match self {
            Half::Certificate => "certificate",
            Half::Key => "private key",
        }
    }
    fn other(self) -> Half {
        match self {
            Half::Certificate => Half::Key,
            Half::Key => Half::Certificate,
        }
    }
}

/// `POST .../agent/certificate` and `.../agent/key`: a new certificate or key for the mesh.
/// The two must match, so a body may carry both (one PEM text with the certificate and its
/// private key) to change the agent's identity in one step.
fn set_identity(agent: &Agent, mesh: &str, body: &Bytes, half: Half) -> ApiResult<Json<Mesh>> {
    let mut record = runtime(agent, mesh)?.record.clone();
    let field = half.field();
    let (certs, key) = split_pem(&pem_body(body, field)?);
    let both = certs.is_some() && key.is_some();
    match (half, certs, key) {
        (_, Some(c), Some(k)) => (record.cert, record.key) = (c, k),
        (Half::Certificate, Some(c), None) => record.cert = c,
        (Half::Key, None, Some(k)) => record.key = k,
        _ => {
            return Err(ApiError::bad(format!(
                "{field}: the body holds no PEM {}",
                half.what()
            )))
        }
    }
    if !both && ztm_pki::key_matches_cert(&record.cert, &record.key).is_err() {
        return Err(ApiError::bad(format!(
            "{field}: does not match the mesh's {}; to change both, send the certificate and \
             its private key together in one PEM body",
            half.other().what()
        )));
    }
    apply(agent, record, false)
}

/// The certificate blocks and the (first) private key block of a PEM text, each as PEM text.
fn split_pem(text: &str) -> (Option<String>, Option<String>) {
    const BEGIN: &str = "-----BEGIN ";
    const END: &str = "-----END ";
    let (mut certs, mut key) = (String::new(), None);
    let mut rest = text;
    while let Some(begin) = rest.find(BEGIN) {
        let block = &rest[begin..];
        let Some(end) = block.find(END) else {
            break;
        };
        let Some(close) = block[end + END.len()..].find("-----") else {
            break;
        };
        let (block, after) = block.split_at(end + END.len() + close + 5);
        if block.contains("PRIVATE KEY-----") {
            key.get_or_insert_with(|| format!("{block}\n"));
        } else if block.starts_with("-----BEGIN CERTIFICATE-----") {
            certs.push_str(block);
            certs.push('\n');
        }
        rest = after;
    }
    ((!certs.is_empty()).then_some(certs), key)
}

async fn set_cert(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Mesh>> {
    set_identity(&agent, &mesh, &body, Half::Certificate)
}

async fn set_key(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Mesh>> {
    set_identity(&agent, &mesh, &body, Half::Key)
}

async fn list_endpoints(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    Ok(Json(rt.endpoints().await).into_response())
}

/// The one endpoint `ep` (an id or a name) of user `user` (any user if `None`) names.
async fn resolve_endpoint(
    rt: &MeshRuntime,
    ep: &str,
    user: Option<&str>,
) -> ApiResult<ztm_proto::model::Endpoint> {
    if (ep == rt.id() || ep == rt.record.agent_name) && user.is_none_or(|u| u == rt.username) {
        return Ok(rt.local_endpoint());
    }
    let all = rt.endpoints().await;
    match crate::discovery::resolve(&all, ep, user) {
        Ok(one) => Ok(one.clone()),
        Err(Unresolved::None) => Err(ApiError::not_found(match user {
            Some(u) => format!("no endpoint {ep} of user {u} in mesh {}", rt.name()),
            None => format!("no endpoint {ep} in mesh {}", rt.name()),
        })),
        Err(Unresolved::Several { which, same_id }) => Err(ApiError::bad(format!(
            "several endpoints are {ep} ({}); {}",
            which
                .iter()
                .map(|(id, user)| format!("{id} of user {user}"))
                .collect::<Vec<_>>()
                .join(", "),
            if same_id {
                "different users claim this id on different hubs"
            } else {
                "use the endpoint id"
            }
        ))),
    }
}

async fn get_endpoint(
    State(agent): State<Arc<Agent>>,
    Path((mesh, ep)): Path<(String, String)>,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    Ok(Json(resolve_endpoint(&rt, &ep, None).await?).into_response())
}

async fn list_services(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    Ok(Json(rt.services().await).into_response())
}

fn parse_proto(s: &str) -> ApiResult<Proto> {
    Proto::parse(s).ok_or_else(|| ApiError::bad(format!("protocol must be tcp or udp, not {s:?}")))
}

async fn get_service(
    State(agent): State<Arc<Agent>>,
    Path((mesh, proto, svc)): Path<(String, String, String)>,
) -> ApiResult<Json<Service>> {
    let rt = runtime(&agent, &mesh)?;
    let proto = parse_proto(&proto)?;
    rt.services()
        .await
        .into_iter()
        .find(|s| s.protocol == proto && s.name == svc)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no service {proto}/{svc} in mesh {mesh}")))
}

/// Everything under `/api/meshes/{mesh}/endpoints/{ep}/`: handled here for this endpoint,
/// carried through a hub for any other.
async fn endpoint_scoped(
    State(agent): State<Arc<Agent>>,
    Path((mesh, ep, _)): Path<(String, String, String)>,
    forwarded: Option<Extension<Forwarded>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    // The raw remainder after `/endpoints/{ep}`, still percent-encoded, with the query.
    let raw_path = uri.path();
    let prefix_len = raw_path
        .match_indices('/')
        .nth(5)
        .map(|(i, _)| i)
        .unwrap_or(raw_path.len());
    let rest_raw = &raw_path[prefix_len..];
    let rest: Vec<String> = rest_raw
        .trim_start_matches('/')
        .split('/')
        .map(decode_segment)
        .collect::<Result<_, _>>()
        .map_err(|e| ApiError::bad(e.to_string()))?;
    let local = ep == rt.id() || ep == rt.record.agent_name;
    if !local {
        if forwarded.is_some() {
            return Err(ApiError::not_found(
                "forwarded requests are for this endpoint only",
            ));
        }
        // Resolved even when given by id, for the user it belongs to: the hubs carry the
        // request only to the endpoint of that user.
        let target = resolve_endpoint(&rt, &ep, None).await?;
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let answer = rt
            .forward(
                &target.id,
                &target.username,
                method,
                &format!("{rest_raw}{query}"),
                ct,
                body,
            )
            .await?;
        return relayed(answer, &target.id);
    }
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let by = forwarded.map(|Extension(f)| f.user);
    match (method, rest.as_slice()) {
        (Method::GET, ["services"]) => Ok(Json(local_services(&rt)?).into_response()),
        (Method::GET, ["services", proto, name]) => {
            let proto = parse_proto(proto)?;
            local_services(&rt)?
                .into_iter()
                .find(|s| s.protocol == proto && s.name == *name)
                .map(|s| Json(s).into_response())
                .ok_or_else(|| {
                    ApiError::not_found(format!("no service {proto}/{name} on this endpoint"))
                })
        }
        (Method::POST, ["services", proto, name]) => {
            create_service(&rt, parse_proto(proto)?, name, &body, by.as_deref())
        }
        (Method::DELETE, ["services", proto, name]) => {
            let proto = parse_proto(proto)?;
            if !agent.store.delete_service(rt.name(), proto, name)? {
                return Err(ApiError::not_found(format!(
                    "no service {proto}/{name} on this endpoint"
                )));
            }
            rt.publish();
            rt.event(
                "info",
                &format!("service {proto}/{name} deleted{}", by_whom(by.as_deref())),
            );
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (Method::GET, ["ports"]) => Ok(Json(local_ports(&rt)?).into_response()),
        (Method::GET, ["ports", ip, proto, port]) => {
            let (ip, proto, port) = port_key(ip, proto, port)?;
            local_ports(&rt)?
                .into_iter()
                .find(|p| p.listen.ip == ip && p.protocol == proto && p.listen.port == port)
                .map(|p| Json(p).into_response())
                .ok_or_else(|| {
                    ApiError::not_found(format!("no port {ip}/{proto}/{port} on this endpoint"))
                })
        }
        (Method::POST, ["ports", ip, proto, port]) => {
            let (ip, proto, port) = port_key(ip, proto, port)?;
            let mut body: PortBody = parse_json(&body)?;
            check_name(&body.target.service)
                .map_err(|e| ApiError::bad(format!("target.service: {e}")))?;
            if let Some(name) = body.target.endpoint.as_deref() {
                // Endpoint names are not unique (any user may call an endpoint anything), and
                // ids are chosen by agents (on a hub its owner is not connected to, another
                // user could claim one): a target is pinned to the id and the user of the one
                // endpoint it names now, so that no other endpoint can receive this port's
                // connections.
                let pinned = resolve_endpoint(&rt, name, body.target.user.as_deref()).await;
                match pinned {
                    Ok(e) => {
                        body.target.endpoint = Some(e.id);
                        body.target.user = Some(e.username);
                    }
                    // An endpoint no hub has seen lately can be named by its id; its user is
                    // pinned only if given.
                    Err(e) if e.status == StatusCode::NOT_FOUND && is_endpoint_id(name) => {
                        body.target.endpoint = Some(name.to_ascii_lowercase());
                    }
                    Err(e) => return Err(ApiError::bad(format!("target.endpoint: {}", e.message))),
                }
            } else if body.target.user.is_some() {
                return Err(ApiError::bad("target.user is the user of target.endpoint"));
            }
            check_trust(&body.target)?;
            let record = PortRecord {
                ip: ip.clone(),
                protocol: proto,
                port,
                target: body.target,
            };
            agent.store.put_port(rt.name(), &record)?;
            rt.sync_ports();
            rt.event(
                "info",
                &format!(
                    "port {ip}/{proto}/{port} mapped to service {}{}",
                    record.target.service,
                    by_whom(by.as_deref())
                ),
            );
            local_ports(&rt)?
                .into_iter()
                .find(|p| p.listen.ip == ip && p.protocol == proto && p.listen.port == port)
                .map(|p| Json(p).into_response())
                .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "port vanished"))
        }
        (Method::DELETE, ["ports", ip, proto, port]) => {
            let (ip, proto, port) = port_key(ip, proto, port)?;
            if !agent.store.delete_port(rt.name(), &ip, proto, port)? {
                return Err(ApiError::not_found(format!(
                    "no port {ip}/{proto}/{port} on this endpoint"
                )));
            }
            rt.sync_ports();
            rt.event(
                "info",
                &format!(
                    "port {ip}/{proto}/{port} unmapped{}",
                    by_whom(by.as_deref())
                ),
            );
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (_, ["services"] | ["services", _, _] | ["ports"] | ["ports", _, _, _]) => Err(
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        ),
        _ => Err(ApiError::not_found(format!("no such API: {}", uri.path()))),
    }
}

/// Checks a port target's `trust` list: for targets without an endpoint, at most 1,000 user
/// names or `*`.
fn check_trust(target: &ztm_proto::model::PortTarget) -> ApiResult<()> {
    let Some(trust) = &target.trust else {
        return Ok(());
    };
    if target.endpoint.is_some() {
        return Err(ApiError::bad(
            "target.trust: only for a target without target.endpoint (an endpoint is trusted \
             by naming it)",
        ));
    }
    if trust.len() > 1000 {
        return Err(ApiError::bad("target.trust: at most 1000 names"));
    }
    for u in trust {
        if u != ztm_proto::acl::ANY_USER {
            check_name(u).map_err(|e| ApiError::bad(format!("target.trust: {u:?}: {e}")))?;
        }
    }
    Ok(())
}

/// A remote endpoint's answer to a management request, as this agent passes it on. The API
/// speaks only JSON, and whatever is relayed is served from this agent's origin: a web page
/// the far endpoint (or a hub) sent would run here with the whole API at its disposal. So an
/// answer is relayed only if its body is JSON (or empty, for 204), and always as JSON;
/// anything else is a 502.
fn relayed(answer: ztm_net::h2io::Answer, ep: &str) -> ApiResult<Response> {
    if answer.body.is_empty() && answer.status == StatusCode::NO_CONTENT {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    if answer.body.is_empty()
        || serde_json::from_slice::<serde::de::IgnoredAny>(&answer.body).is_err()
    {
        let content_type = answer
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(64).collect::<String>())
            .unwrap_or_else(|| "no content type".to_string());
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "endpoint {ep} answered something that is not JSON ({} {content_type}, {} bytes)",
                answer.status.as_u16(),
                answer.body.len()
            ),
        ));
    }
    Ok((
        answer.status,
        [(header::CONTENT_TYPE, "application/json")],
        answer.body,
    )
        .into_response())
}

fn by_whom(user: Option<&str>) -> String {
    user.map(|u| format!(" by {u} (remote)"))
        .unwrap_or_default()
}

fn local_services(rt: &MeshRuntime) -> ApiResult<Vec<Service>> {
    Ok(rt
        .store
        .services(rt.name())?
        .into_iter()
        .map(|s| Service {
            name: s.name,
            protocol: s.protocol,
            endpoints: vec![ztm_proto::model::EndpointRef {
                id: rt.id().to_string(),
                name: rt.record.agent_name.clone(),
                users: s.users.clone(),
            }],
            is_discovered: false,
            is_local: true,
            host: Some(s.host),
            port: Some(s.port),
            users: s.users,
        })
        .collect())
}

fn check_host(host: &str) -> ApiResult<()> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "host: {host:?} is not a host name or IP address"
        )))
    }
}

fn create_service(
    rt: &MeshRuntime,
    proto: Proto,
    name: &str,
    body: &[u8],
    by: Option<&str>,
) -> ApiResult<Response> {
    check_name(name).map_err(|e| ApiError::bad(format!("service name: {e}")))?;
    let body: ServiceBody = parse_json(body)?;
    check_host(&body.host)?;
    if body.port == 0 {
        return Err(ApiError::bad("port: must be 1-65535"));
    }
    if let Some(users) = &body.users {
        if users.len() > 1000 {
            return Err(ApiError::bad("users: at most 1000 names"));
        }
        for u in users {
            check_name(u).map_err(|e| ApiError::bad(format!("users: {u:?}: {e}")))?;
        }
    }
    let record = ServiceRecord {
        protocol: proto,
        name: name.to_string(),
        host: body.host,
        port: body.port,
        users: body.users,
    };
    rt.store.put_service(rt.name(), &record)?;
    rt.publish();
    rt.event(
        "info",
        &format!(
            "service {proto}/{name} -> {}:{}{}",
            record.host,
            record.port,
            by_whom(by)
        ),
    );
    local_services(rt)?
        .into_iter()
        .find(|s| s.protocol == proto && s.name == name)
        .map(|s| Json(s).into_response())
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "service vanished"))
}

fn port_key(ip: &str, proto: &str, port: &str) -> ApiResult<(String, Proto, u16)> {
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| ApiError::bad(format!("listen ip: {ip:?} is not an IP address")))?;
    let proto = parse_proto(proto)?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::bad(format!("listen port: {port:?} must be 1-65535")))?;
    Ok((ip.to_string(), proto, port))
}

fn local_ports(rt: &MeshRuntime) -> ApiResult<Vec<ztm_proto::model::Port>> {
    Ok(rt
        .store
        .ports(rt.name())?
        .into_iter()
        .map(|p| {
            let state = rt.port_state(&(p.ip.clone(), p.protocol, p.port));
            ztm_proto::model::Port {
                protocol: p.protocol,
                listen: ztm_proto::model::Listen {
                    ip: p.ip,
                    port: p.port,
                },
                target: p.target,
                open: state.open,
                error: state.error,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::{relayed, split_pem};
    use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
    use bytes::Bytes;
    use ztm_net::h2io::Answer;

    fn answer(status: u16, content_type: &'static str, body: &'static str) -> Answer {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[test]
    fn only_json_is_relayed_and_always_as_json() {
        let ct = |r: &axum::response::Response| {
            r.headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_string())
        };
        for (status, content_type, body) in [
            (200, "text/html", "[1]"),
            (404, "application/json", r#"{"status":404,"message":"x"}"#),
            (200, "application/json", " {\"a\": \"<script>\"} \n"),
        ] {
            let r = relayed(answer(status, content_type, body), "ep").unwrap();
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(ct(&r).as_deref(), Some("application/json"));
        }
        let r = relayed(answer(204, "text/html", ""), "ep").unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        for (status, content_type, body) in [
            (200, "text/html", "<script>alert(1)</script>"),
            (200, "application/json", "<script>alert(1)</script>"),
            (200, "application/json", "[1] <script>"),
            (200, "application/json", ""),
            (500, "text/plain", "oops"),
        ] {
            let e = relayed(answer(status, content_type, body), "ep").unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_GATEWAY, "{body}");
            assert!(e.message.contains("not JSON"), "{}", e.message);
            assert!(!e.message.contains("<script"), "{}", e.message);
        }
    }

    #[test]
    fn a_pem_body_splits_into_certificates_and_a_key() {
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----";
        let key = "-----BEGIN PRIVATE KEY-----\nBBBB\n-----END PRIVATE KEY-----";
        let both = format!("{cert}\n{key}\n");
        assert_eq!(
            split_pem(&both),
            (Some(format!("{cert}\n")), Some(format!("{key}\n")))
        );
        // Order, surrounding text and a chain of two certificates.
        let chain = format!("note\n{key}\r\n{cert}\n{cert}\n");
        let (certs, k) = split_pem(&chain);
        assert_eq!(certs, Some(format!("{cert}\n{cert}\n")));
        assert_eq!(k, Some(format!("{key}\n")));
        assert_eq!(split_pem(cert), (Some(format!("{cert}\n")), None));
        assert_eq!(split_pem("garbage"), (None, None));
        // A block without its end is not taken.
        assert_eq!(
            split_pem("-----BEGIN CERTIFICATE-----\nAAAA\n"),
            (None, None)
        );
        let ec = "-----BEGIN EC PRIVATE KEY-----\nCC\n-----END EC PRIVATE KEY-----";
        assert_eq!(split_pem(ec).1, Some(format!("{ec}\n")));
    }
}
