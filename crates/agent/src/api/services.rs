//! Services: the mesh's (discovered through hubs, and this endpoint's), and this endpoint's
//! own under `/api/meshes/{mesh}/endpoints/{ep}/services` (see [`super::endpoints::scoped`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ztm_proto::listing::{self, ListQuery};
use ztm_proto::model::{Service, ServiceBody};
use ztm_proto::names::check_name;

use super::common::{by_whom, list_answer, parse_json, parse_proto, runtime};
use super::error::{ApiError, ApiResult};
use crate::agent::Agent;
use crate::mesh::Mesh;
use crate::session::Forwarded;
use crate::store::ServiceRecord;

/// `GET .../services`, all of them or the part `?q=…&offset=…&limit=…` asks for (with the
/// number of matches in `ztm-total`).
pub async fn list(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
    uri: axum::http::Uri,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    let query = ListQuery::parse(uri.query()).map_err(ApiError::bad)?;
    let all = rt.services_matching(query.q.as_deref()).await;
    Ok(list_answer(&query, all, listing::agent_service_fields))
}

pub async fn get(
    State(agent): State<Arc<Agent>>,
    Path((mesh, proto, svc)): Path<(String, String, String)>,
) -> ApiResult<Json<Service>> {
    let rt = runtime(&agent, &mesh)?;
    let proto = parse_proto(&proto)?;
    rt.service(proto, &svc)
        .await
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no service {proto}/{svc} in mesh {mesh}")))
}

fn local_services(rt: &Mesh) -> ApiResult<Vec<Service>> {
    Ok(rt
        .store()
        .services(rt.name())?
        .into_iter()
        .map(|s| Service {
            name: s.name,
            protocol: s.protocol,
            endpoints: vec![ztm_proto::model::EndpointRef {
                id: rt.id().to_string(),
                name: rt.agent_name().to_string(),
                username: rt.username().to_string(),
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

/// `GET .../endpoints/{ep}/services` for this endpoint.
pub async fn list_local(
    State(agent): State<Arc<Agent>>,
    Path((mesh, _ep)): Path<(String, String)>,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    Ok(Json(local_services(&rt)?).into_response())
}

/// `GET .../endpoints/{ep}/services/{proto}/{svc}` for this endpoint.
pub async fn get_local(
    State(agent): State<Arc<Agent>>,
    Path((mesh, _ep, proto, name)): Path<(String, String, String, String)>,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    let proto = parse_proto(&proto)?;
    local_services(&rt)?
        .into_iter()
        .find(|s| s.protocol == proto && s.name == name)
        .map(|s| Json(s).into_response())
        .ok_or_else(|| ApiError::not_found(format!("no service {proto}/{name} on this endpoint")))
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

/// `POST .../endpoints/{ep}/services/{proto}/{svc}` for this endpoint.
pub async fn create(
    State(agent): State<Arc<Agent>>,
    Path((mesh, _ep, proto, name)): Path<(String, String, String, String)>,
    forwarded: Option<Extension<Forwarded>>,
    body: Bytes,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    let proto = parse_proto(&proto)?;
    let by = forwarded.map(|Extension(f)| f.user);
    let by = by.as_deref();
    check_name(&name).map_err(|e| ApiError::bad(format!("service name: {e}")))?;
    let body: ServiceBody = parse_json(&body)?;
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
        name: name.clone(),
        host: body.host,
        port: body.port,
        users: body.users,
    };
    rt.store().put_service(rt.name(), &record)?;
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
    local_services(&rt)?
        .into_iter()
        .find(|s| s.protocol == proto && s.name == name)
        .map(|s| Json(s).into_response())
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "service vanished"))
}

/// `DELETE .../endpoints/{ep}/services/{proto}/{svc}` for this endpoint.
pub async fn delete(
    State(agent): State<Arc<Agent>>,
    Path((mesh, _ep, proto, name)): Path<(String, String, String, String)>,
    forwarded: Option<Extension<Forwarded>>,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    let proto = parse_proto(&proto)?;
    let by = forwarded.map(|Extension(f)| f.user);
    if !agent.store.delete_service(rt.name(), proto, &name)? {
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
