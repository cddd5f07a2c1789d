//! Exits and proxies (docs/exits.md): this endpoint's exit under
//! `/api/meshes/{mesh}/endpoints/{ep}/exit`, its proxies under `.../proxies/{ip}/{port}` (see
//! [`super::endpoints::scoped`]), and the mesh's exits this user may use under
//! `/api/meshes/{mesh}/exits`. A proxy is kept as a TCP port whose target is the exit service
//! ([`super::ports::is_proxy`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ztm_proto::exit::Rules;
use ztm_proto::listing::{self, ListQuery};
use ztm_proto::model::{Exit, ExitTarget, Listen, Proxy, ProxyBody};
use ztm_proto::names::check_name;
use ztm_proto::wire::Proto;

use super::common::{by_whom, list_answer, parse_json, runtime};
use super::error::{ApiError, ApiResult};
use super::ports::{is_proxy, pin_target, port_key};
use crate::agent::Agent;
use crate::session::Forwarded;
use crate::store::PortRecord;
use crate::supervisor::MeshRuntime;

/// `GET /api/meshes/{mesh}/exits`: the online exits this agent's user may use, all of them or
/// the part `?q=…&offset=…&limit=…` asks for (with the number of matches in `ztm-total`).
pub async fn list(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
    uri: axum::http::Uri,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    let query = ListQuery::parse(uri.query()).map_err(ApiError::bad)?;
    let all = rt.exits().await;
    Ok(list_answer(&query, all, listing::provider_fields))
}

/// `GET .../endpoints/{ep}/exit` for this endpoint.
pub async fn get_local(
    State(agent): State<Arc<Agent>>,
    Path((mesh, _ep)): Path<(String, String)>,
) -> ApiResult<Json<Exit>> {
    let rt = runtime(&agent, &mesh)?;
    rt.store()
        .exit(rt.name())?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("this endpoint is not an exit"))
}

/// Checks an exit's users like a service's: at most 1,000 valid user names.
fn check_users(users: Option<&[String]>) -> ApiResult<()> {
    let Some(users) = users else { return Ok(()) };
    if users.len() > 1000 {
        return Err(ApiError::bad("users: at most 1000 names"));
    }
    for u in users {
        check_name(u).map_err(|e| ApiError::bad(format!("users: {u:?}: {e}")))?;
    }
    Ok(())
}

/// `POST .../endpoints/{ep}/exit` for this endpoint: makes it an exit, or changes its rules.
pub async fn set(
    State(agent): State<Arc<Agent>>,
    Path((mesh, _ep)): Path<(String, String)>,
    forwarded: Option<Extension<Forwarded>>,
    body: Bytes,
) -> ApiResult<Json<Exit>> {
    let rt = runtime(&agent, &mesh)?;
    let by = forwarded.map(|Extension(f)| f.user);
    let body: Exit = parse_json(&body)?;
    let rules = Rules::parse(&body.allow).map_err(|e| ApiError::bad(format!("allow: {e}")))?;
    check_users(body.users.as_deref())?;
    // Kept in the canonical spelling, as it is judged.
    let exit = Exit {
        allow: rules.texts(),
        users: body.users,
    };
    rt.store().put_exit(rt.name(), &exit)?;
    rt.publish();
    rt.event(
        "info",
        &format!(
            "exit to {}{}{}",
            exit.allow.join(", "),
            match &exit.users {
                Some(u) => format!(" for users {}", u.join(", ")),
                None => String::new(),
            },
            by_whom(by.as_deref())
        ),
    );
    Ok(Json(exit))
}

/// `DELETE .../endpoints/{ep}/exit` for this endpoint.
pub async fn delete(
    State(agent): State<Arc<Agent>>,
    Path((mesh, _ep)): Path<(String, String)>,
    forwarded: Option<Extension<Forwarded>>,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    let by = forwarded.map(|Extension(f)| f.user);
    if !rt.store().delete_exit(rt.name())? {
        return Err(ApiError::not_found("this endpoint is not an exit"));
    }
    rt.publish();
    rt.event("info", &format!("exit removed{}", by_whom(by.as_deref())));
    Ok(StatusCode::NO_CONTENT.into_response())
}

type ProxyPath = (String, String, String, String);

fn proxy_of(rt: &MeshRuntime, p: PortRecord) -> Proxy {
    let key = (p.ip.clone(), p.protocol, p.port);
    let state = rt.port_state(&key);
    Proxy {
        listen: Listen {
            ip: p.ip,
            port: p.port,
        },
        exit: ExitTarget::of(&p.target),
        open: state.open,
        error: state.error,
        stats: Some(rt.port_stats(&key)),
    }
}

fn local_proxies(rt: &MeshRuntime) -> ApiResult<Vec<Proxy>> {
    Ok(rt
        .store()
        .ports(rt.name())?
        .into_iter()
        .filter(is_proxy)
        .map(|p| proxy_of(rt, p))
        .collect())
}

fn local_proxy(rt: &MeshRuntime, ip: &str, port: u16) -> ApiResult<Option<Proxy>> {
    Ok(local_proxies(rt)?
        .into_iter()
        .find(|p| p.listen.ip == ip && p.listen.port == port))
}

fn proxy_key(ip: &str, port: &str) -> ApiResult<(String, u16)> {
    let (ip, _, port) = port_key(ip, "tcp", port)?;
    Ok((ip, port))
}

/// `GET .../endpoints/{ep}/proxies` for this endpoint.
pub async fn list_proxies(
    State(agent): State<Arc<Agent>>,
    Path((mesh, _ep)): Path<(String, String)>,
) -> ApiResult<Json<Vec<Proxy>>> {
    let rt = runtime(&agent, &mesh)?;
    Ok(Json(local_proxies(&rt)?))
}

/// `GET .../endpoints/{ep}/proxies/{ip}/{port}` for this endpoint.
pub async fn get_proxy(
    State(agent): State<Arc<Agent>>,
    Path((mesh, _ep, ip, port)): Path<ProxyPath>,
) -> ApiResult<Json<Proxy>> {
    let rt = runtime(&agent, &mesh)?;
    let (ip, port) = proxy_key(&ip, &port)?;
    local_proxy(&rt, &ip, port)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no proxy {ip}/{port} on this endpoint")))
}

/// `POST .../endpoints/{ep}/proxies/{ip}/{port}` for this endpoint.
pub async fn create_proxy(
    State(agent): State<Arc<Agent>>,
    Path((mesh, _ep, ip, port)): Path<ProxyPath>,
    forwarded: Option<Extension<Forwarded>>,
    body: Bytes,
) -> ApiResult<Json<Proxy>> {
    let rt = runtime(&agent, &mesh)?;
    let (ip, port) = proxy_key(&ip, &port)?;
    let by = forwarded.map(|Extension(f)| f.user);
    let body: ProxyBody = if body.is_empty() {
        ProxyBody::default()
    } else {
        parse_json(&body)?
    };
    let taken = rt
        .store()
        .ports(rt.name())?
        .into_iter()
        .any(|p| p.ip == ip && p.port == port && p.protocol == Proto::Tcp && !is_proxy(&p));
    if taken {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("port {ip}/tcp/{port} is mapped to a service; delete it first"),
        ));
    }
    let mut target = body.exit.as_port_target();
    pin_target(&rt, &mut target).await?;
    let record = PortRecord {
        ip: ip.clone(),
        protocol: Proto::Tcp,
        port,
        target,
    };
    rt.store().put_port(rt.name(), &record)?;
    rt.sync_ports();
    rt.event(
        "info",
        &format!(
            "proxy on {ip}:{port} to {}{}",
            match &record.target.endpoint {
                Some(ep) => format!("exit {ep}"),
                None => "any trusted exit".to_string(),
            },
            by_whom(by.as_deref())
        ),
    );
    local_proxy(&rt, &ip, port)?
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "proxy vanished"))
}

/// `DELETE .../endpoints/{ep}/proxies/{ip}/{port}` for this endpoint.
pub async fn delete_proxy(
    State(agent): State<Arc<Agent>>,
    Path((mesh, _ep, ip, port)): Path<ProxyPath>,
    forwarded: Option<Extension<Forwarded>>,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    let (ip, port) = proxy_key(&ip, &port)?;
    let by = forwarded.map(|Extension(f)| f.user);
    if local_proxy(&rt, &ip, port)?.is_none()
        || !rt.store().delete_port(rt.name(), &ip, Proto::Tcp, port)?
    {
        return Err(ApiError::not_found(format!(
            "no proxy {ip}/{port} on this endpoint"
        )));
    }
    rt.sync_ports();
    rt.event(
        "info",
        &format!("proxy on {ip}:{port} removed{}", by_whom(by.as_deref())),
    );
    Ok(StatusCode::NO_CONTENT.into_response())
}
