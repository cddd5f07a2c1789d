//! What the API's entity modules share: reading JSON, finding the running mesh, naming who
//! changed something, resolving an endpoint.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use ztm_proto::listing::ListQuery;
use ztm_proto::model::Endpoint;
use ztm_proto::wire::{Proto, TOTAL_HEADER};

use super::error::{ApiError, ApiResult};
use crate::agent::Agent;
use crate::discovery::Unresolved;
use crate::mesh::Mesh;
use crate::supervisor::MeshRuntime;
use std::sync::Arc;

/// Largest request body the API reads.
pub const BODY_LIMIT: usize = 1 << 20;

/// The answer to a list request: all of `all` as JSON when `query` asks for everything, else
/// the page it asks for, with the number of matches in `ztm-total`.
pub fn list_answer<T: serde::Serialize>(
    query: &ListQuery,
    all: Vec<T>,
    fields: impl Fn(&T) -> Vec<&str>,
) -> Response {
    if query.is_all() {
        return Json(all).into_response();
    }
    let (page, total) = query.page(all.into_iter(), fields);
    ([(TOTAL_HEADER, total.to_string())], Json(page)).into_response()
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

pub fn parse_proto(s: &str) -> ApiResult<Proto> {
    Proto::parse(s).ok_or_else(|| ApiError::bad(format!("protocol must be tcp or udp, not {s:?}")))
}

pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("malformed JSON: {e}")))
}

/// The running mesh named `mesh`, or 404.
pub fn runtime(agent: &Agent, mesh: &str) -> ApiResult<Arc<MeshRuntime>> {
    agent
        .runtime(mesh)
        .ok_or_else(|| ApiError::not_found(format!("no mesh named {mesh}")))
}

/// Who changed something, for the mesh log: ` by {user} (remote)` for a forwarded request.
pub fn by_whom(user: Option<&str>) -> String {
    user.map(|u| format!(" by {u} (remote)"))
        .unwrap_or_default()
}

/// The one endpoint `ep` (an id or a name) of user `user` (any user if `None`) names.
pub async fn resolve(rt: &Mesh, ep: &str, user: Option<&str>) -> ApiResult<Endpoint> {
    if (ep == rt.id() || ep == rt.agent_name()) && user.is_none_or(|u| u == rt.username()) {
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
