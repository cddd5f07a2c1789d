//! Endpoints: the mesh's, merged from its hubs; one of them by id or name; and everything
//! under `/api/meshes/{mesh}/endpoints/{ep}/` — answered here for this endpoint, carried
//! through a hub for any other (remote management), whose answer is relayed as JSON only.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing;
use axum::{Extension, Json, Router};
use ztm_proto::listing::{self, ListQuery};
use ztm_proto::model::HubLink;
use ztm_proto::names::decode_segment;

use super::common::{self, list_answer, resolve, runtime, BODY_LIMIT};
use super::error::{ApiError, ApiResult};
use super::{exits, ports, services};
use crate::agent::Agent;
use crate::mesh::Mesh;
use crate::session::Forwarded;

/// `GET .../endpoints`, all of them or the part `?q=…&offset=…&limit=…` asks for (with the
/// number of matches in `ztm-total`).
pub async fn list(
    State(agent): State<Arc<Agent>>,
    Path(mesh): Path<String>,
    uri: axum::http::Uri,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    let query = ListQuery::parse(uri.query()).map_err(ApiError::bad)?;
    let all = rt.endpoints_matching(query.q.as_deref()).await;
    Ok(list_answer(&query, all, listing::agent_endpoint_fields))
}

pub async fn get(
    State(agent): State<Arc<Agent>>,
    Path((mesh, ep)): Path<(String, String)>,
) -> ApiResult<Response> {
    let rt = runtime(&agent, &mesh)?;
    Ok(Json(resolve(&rt, &ep, None).await?).into_response())
}

/// Everything under `/api/meshes/{mesh}/endpoints/{ep}/`: the routes answer for this endpoint;
/// [`here_or_through_a_hub`] carries requests for any other endpoint to it.
pub(super) fn scoped(agent: Arc<Agent>) -> Router<Arc<Agent>> {
    Router::new()
        .route("/services", routing::get(services::list_local))
        .route(
            "/services/{proto}/{svc}",
            routing::get(services::get_local)
                .post(services::create)
                .delete(services::delete),
        )
        .route("/hubs", routing::get(hubs_local))
        .route(
            "/exit",
            routing::get(exits::get_local)
                .post(exits::set)
                .delete(exits::delete),
        )
        .route("/proxies", routing::get(exits::list_proxies))
        .route(
            "/proxies/{ip}/{port}",
            routing::get(exits::get_proxy)
                .post(exits::create_proxy)
                .delete(exits::delete_proxy),
        )
        .route("/ports", routing::get(ports::list_local))
        .route(
            "/ports/{ip}/{proto}/{port}",
            routing::get(ports::get_local)
                .post(ports::create)
                .delete(ports::delete),
        )
        .fallback(unknown)
        .method_not_allowed_fallback(common::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            agent,
            here_or_through_a_hub,
        ))
}

/// `GET .../endpoints/{ep}/hubs` for this endpoint: each of its hubs, whether it is registered
/// with it, and the round-trip time to it. Another endpoint answers for itself, through a hub.
async fn hubs_local(
    State(agent): State<Arc<Agent>>,
    Path((mesh, _ep)): Path<(String, String)>,
) -> ApiResult<Json<Vec<HubLink>>> {
    Ok(Json(runtime(&agent, &mesh)?.hub_links()))
}

/// A path under one endpoint that is not in its API.
async fn unknown(Path(params): Path<HashMap<String, String>>, uri: axum::http::Uri) -> ApiError {
    let at = |k: &str| params.get(k).map(String::as_str).unwrap_or("");
    ApiError::not_found(format!(
        "no such API: /api/meshes/{}/endpoints/{}{}",
        at("mesh"),
        at("ep"),
        uri.path()
    ))
}

/// Lets requests for this endpoint through to its routes, and carries those for another
/// endpoint of the mesh through a hub.
async fn here_or_through_a_hub(
    State(agent): State<Arc<Agent>>,
    Path(params): Path<HashMap<String, String>>,
    forwarded: Option<Extension<Forwarded>>,
    req: Request,
    next: Next,
) -> Response {
    let (Some(mesh), Some(ep)) = (params.get("mesh"), params.get("ep")) else {
        return next.run(req).await;
    };
    let rt = match runtime(&agent, mesh) {
        Ok(rt) => rt,
        Err(e) => return e.into_response(),
    };
    if ep == rt.id() || ep == rt.agent_name() {
        return next.run(req).await;
    }
    if forwarded.is_some() {
        return ApiError::not_found("forwarded requests are for this endpoint only")
            .into_response();
    }
    match forward(&rt, ep, req).await {
        Ok(r) | Err(r) => r,
    }
}

/// Carries `req` (its path below `{ep}` as it came, still percent-encoded, with its query)
/// through a hub to endpoint `ep`, and relays the answer.
async fn forward(rt: &Mesh, ep: &str, req: Request) -> Result<Response, Response> {
    let raw = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_default();
    // Each segment must decode, as for this endpoint's own routes.
    let path = raw.split('?').next().unwrap_or("");
    for segment in path.trim_start_matches('/').split('/') {
        decode_segment(segment).map_err(|e| ApiError::bad(e.to_string()).into_response())?;
    }
    // Resolved even when given by id, for the user it belongs to: the hubs carry the request
    // only to the endpoint of that user.
    let target = resolve(rt, ep, None)
        .await
        .map_err(IntoResponse::into_response)?;
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body: Bytes = axum::body::to_bytes(req.into_body(), BODY_LIMIT)
        .await
        .map_err(|e| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()).into_response())?;
    let answer = rt
        .forward(
            &target.id,
            &target.username,
            method,
            &raw,
            content_type.as_deref(),
            body,
        )
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    relayed(answer, &target.id).map_err(IntoResponse::into_response)
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

#[cfg(test)]
mod tests {
    use super::relayed;
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
}
