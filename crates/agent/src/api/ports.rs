//! This endpoint's port mappings under `/api/meshes/{mesh}/endpoints/{ep}/ports` (see
//! [`super::endpoints::scoped`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ztm_proto::model::{PortBody, PortTarget};
use ztm_proto::names::check_name;
use ztm_proto::wire::{is_endpoint_id, Proto, EXIT_SERVICE};

use super::common::{by_whom, parse_json, parse_proto, resolve, runtime};
use super::error::{ApiError, ApiResult};
use crate::agent::Agent;
use crate::session::Forwarded;
use crate::store::PortRecord;
use crate::supervisor::MeshRuntime;

type PortPath = (String, String, String, String, String);

/// A proxy is kept as a TCP port whose target is the exit service; it is listed and changed
/// as a proxy (`super::exits`), not as a port.
pub(super) fn is_proxy(p: &PortRecord) -> bool {
    p.protocol == Proto::Tcp && p.target.service == EXIT_SERVICE
}

pub(super) fn port_key(ip: &str, proto: &str, port: &str) -> ApiResult<(String, Proto, u16)> {
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
        .store()
        .ports(rt.name())?
        .into_iter()
        .filter(|p| !is_proxy(p))
        .map(|p| {
            let key = (p.ip.clone(), p.protocol, p.port);
            let state = rt.port_state(&key);
            ztm_proto::model::Port {
                protocol: p.protocol,
                listen: ztm_proto::model::Listen {
                    ip: p.ip,
                    port: p.port,
                },
                target: p.target,
                open: state.open,
                error: state.error,
                stats: Some(rt.port_stats(&key)),
            }
        })
        .collect())
}

fn local_port(rt: &MeshRuntime, ip: &str, proto: Proto, port: u16) -> ApiResult<Option<Response>> {
    Ok(local_ports(rt)?
        .into_iter()
        .find(|p| p.listen.ip == ip && p.protocol == proto && p.listen.port == port)
        .map(|p| Json(p).into_response()))
}

/// `GET .../endpoints/{ep}/ports` for this endpoint.
pub async fn list_local(
    State(agent): State<Arc<Agent>>,
    Path((mesh, _ep)): Path<(String, String)>,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    Ok(Json(local_ports(&rt)?).into_response())
}

/// `GET .../endpoints/{ep}/ports/{ip}/{proto}/{port}` for this endpoint.
pub async fn get_local(
    State(agent): State<Arc<Agent>>,
    Path((mesh, _ep, ip, proto, port)): Path<PortPath>,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    let (ip, proto, port) = port_key(&ip, &proto, &port)?;
    local_port(&rt, &ip, proto, port)?
        .ok_or_else(|| ApiError::not_found(format!("no port {ip}/{proto}/{port} on this endpoint")))
}

/// Checks a port target's `trust` list: for targets without an endpoint, at most 1,000 user
/// names or `*`.
fn check_trust(target: &PortTarget) -> ApiResult<()> {
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

/// `POST .../endpoints/{ep}/ports/{ip}/{proto}/{port}` for this endpoint.
pub async fn create(
    State(agent): State<Arc<Agent>>,
    Path((mesh, _ep, ip, proto, port)): Path<PortPath>,
    forwarded: Option<Extension<Forwarded>>,
    body: Bytes,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    let (ip, proto, port) = port_key(&ip, &proto, &port)?;
    let by = forwarded.map(|Extension(f)| f.user);
    let mut body: PortBody = parse_json(&body)?;
    check_name(&body.target.service).map_err(|e| ApiError::bad(format!("target.service: {e}")))?;
    let proxy_there = agent
        .store
        .ports(rt.name())?
        .into_iter()
        .any(|p| p.ip == ip && p.port == port && p.protocol == proto && is_proxy(&p));
    if proxy_there {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{ip}/{proto}/{port} is a proxy; delete it first"),
        ));
    }
    pin_target(&rt, &mut body.target).await?;
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
    local_port(&rt, &ip, proto, port)?
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "port vanished"))
}

/// Checks a port's or proxy's target and pins the endpoint it names, if it names one.
pub(super) async fn pin_target(rt: &MeshRuntime, target: &mut PortTarget) -> ApiResult<()> {
    if let Some(name) = target.endpoint.as_deref() {
        // Endpoint names are not unique (any user may call an endpoint anything): a target is
        // pinned to the id and the user of the one endpoint it names now, so that no other
        // endpoint can receive this port's connections.
        let pinned = resolve(rt, name, target.user.as_deref()).await;
        match pinned {
            Ok(e) => {
                target.endpoint = Some(e.id);
                target.user = Some(e.username);
            }
            // An endpoint no hub has seen lately can be named by its id; its user is pinned
            // only if given.
            Err(e) if e.status == StatusCode::NOT_FOUND && is_endpoint_id(name) => {
                target.endpoint = Some(name.to_ascii_lowercase());
            }
            Err(e) => return Err(ApiError::bad(format!("target.endpoint: {}", e.message))),
        }
    } else if target.user.is_some() {
        return Err(ApiError::bad("target.user is the user of target.endpoint"));
    }
    check_trust(target)
}

/// `DELETE .../endpoints/{ep}/ports/{ip}/{proto}/{port}` for this endpoint.
pub async fn delete(
    State(agent): State<Arc<Agent>>,
    Path((mesh, _ep, ip, proto, port)): Path<PortPath>,
    forwarded: Option<Extension<Forwarded>>,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    let (ip, proto, port) = port_key(&ip, &proto, &port)?;
    let by = forwarded.map(|Extension(f)| f.user);
    if local_port(&rt, &ip, proto, port)?.is_none()
        || !agent.store.delete_port(rt.name(), &ip, proto, port)?
    {
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
