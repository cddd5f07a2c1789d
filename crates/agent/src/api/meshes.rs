//! `/api/meshes[/{mesh}]`: joining (with three PEM texts or an invitation), updating,
//! leaving, the log, and the agent's CA, certificate and key of each mesh.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ztm_proto::invite::Invitation;
use ztm_proto::model::{JoinRequest, Mesh, MeshAgent};
use ztm_proto::names::check_name;

use super::common::{parse_json, runtime};
use super::error::{ApiError, ApiResult};
use crate::agent::Agent;
use crate::store::MeshRecord;
use crate::supervisor::MeshRuntime;

fn pem_text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

fn mesh_json(rt: &MeshRuntime) -> Mesh {
    let record = rt.record();
    Mesh {
        name: record.name.clone(),
        ca: record.ca.clone(),
        agent: MeshAgent {
            id: record.endpoint_id.clone(),
            name: record.agent_name.clone(),
            username: rt.username().to_string(),
            certificate: record.cert.clone(),
            expires: rt.cert_expires(),
        },
        bootstraps: record.bootstraps.clone(),
        connected: rt.connected(),
        errors: rt.errors(),
        ca_expires: rt.ca_expires(),
        warnings: rt.warnings(),
        hubs: rt.hub_links(),
    }
}

pub async fn list(State(agent): State<Arc<Agent>>) -> Json<Vec<Mesh>> {
    Json(agent.runtimes().iter().map(|rt| mesh_json(rt)).collect())
}

pub async fn get(
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
                rt.username(),
                rt.agent_name()
            )
        } else {
            format!("configuration of mesh {} updated", rt.name())
        },
    );
    Ok(Json(mesh_json(&rt)))
}

pub async fn join(
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

pub async fn leave(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
) -> ApiResult<StatusCode> {
    runtime(&agent, &mesh)?;
    agent.stop_mesh(&mesh);
    agent.store.delete_mesh(&mesh)?;
    tracing::info!("left mesh {mesh}");
    Ok(StatusCode::NO_CONTENT)
}

pub async fn log(State(agent): State<Arc<Agent>>, Path(mesh): Path<String>) -> ApiResult<Response> {
    runtime(&agent, &mesh)?;
    Ok(Json(agent.store.log(&mesh)?).into_response())
}

fn pem_body(body: &Bytes, field: &str) -> ApiResult<String> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad(format!("{field}: not text")))?
        .to_string();
    Ok(text)
}

pub async fn get_ca(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
) -> ApiResult<Response> {
    Ok(pem_text(runtime(&agent, &mesh)?.record().ca.clone()))
}

pub async fn set_ca(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Mesh>> {
    let mut record = runtime(&agent, &mesh)?.record().clone();
    record.ca = pem_body(&body, "ca")?;
    apply(&agent, record, false)
}

pub async fn get_cert(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
) -> ApiResult<Response> {
    Ok(pem_text(runtime(&agent, &mesh)?.record().cert.clone()))
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
    let mut record = runtime(agent, mesh)?.record().clone();
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

pub async fn set_cert(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Mesh>> {
    set_identity(&agent, &mesh, &body, Half::Certificate)
}

pub async fn set_key(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Mesh>> {
    set_identity(&agent, &mesh, &body, Half::Key)
}

#[cfg(test)]
mod tests {
    use super::split_pem;

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
