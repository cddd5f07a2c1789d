//! The agent's REST API (docs/requirements.md §5), by entity: [`meshes`], [`endpoints`]
//! (including everything under one endpoint, here or carried through a hub to it),
//! [`services`], [`ports`], and [`exits`] with proxies; and the figures for Prometheus ([`metrics`]), behind the same
//! guard. Errors become HTTP in [`error`]. Requests a hub forwards to us arrive here too,
//! marked `Forwarded` (`crate::session`).

mod common;
mod endpoints;
mod error;
mod exits;
mod guard;
mod meshes;
mod metrics;
mod ports;
mod services;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

pub use error::{ApiError, ApiResult};

use crate::agent::Agent;
use common::BODY_LIMIT;

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/", get(crate::ui::index))
        .route("/ui/{file}", get(crate::ui::asset))
        .route("/metrics", get(metrics::get))
        .route("/api/meshes", get(meshes::list))
        .route(
            "/api/meshes/{mesh}",
            get(meshes::get).post(meshes::join).delete(meshes::leave),
        )
        .route("/api/meshes/{mesh}/log", get(meshes::log))
        .route(
            "/api/meshes/{mesh}/ca",
            get(meshes::get_ca).post(meshes::set_ca),
        )
        .route(
            "/api/meshes/{mesh}/agent/certificate",
            get(meshes::get_cert).post(meshes::set_cert),
        )
        .route("/api/meshes/{mesh}/agent/key", post(meshes::set_key))
        .route("/api/meshes/{mesh}/endpoints", get(endpoints::list))
        .route("/api/meshes/{mesh}/endpoints/{ep}", get(endpoints::get))
        .nest(
            "/api/meshes/{mesh}/endpoints/{ep}",
            endpoints::scoped(agent.clone()),
        )
        .route("/api/meshes/{mesh}/exits", get(exits::list))
        .route("/api/meshes/{mesh}/services", get(services::list))
        .route(
            "/api/meshes/{mesh}/services/{proto}/{svc}",
            get(services::get),
        )
        .fallback(fallback)
        .method_not_allowed_fallback(common::method_not_allowed)
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            agent.clone(),
            guard::guard,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(guard::headers))
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
