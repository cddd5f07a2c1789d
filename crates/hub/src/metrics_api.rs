//! `GET /metrics` on the hub's metrics listener (`ztm hub --metrics ADDR`): the figures of
//! [`crate::metrics`] for Prometheus, behind a bearer token when one is set. Nothing else is
//! served there.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::state::Hub;

/// The metrics listener: bound by the caller (so that a port in use fails at start), with
/// the token asked of every scrape (required off loopback).
pub struct MetricsListen {
    pub listener: std::net::TcpListener,
    pub token: Option<String>,
}

/// The content type of Prometheus' text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

struct Api {
    hub: Arc<Hub>,
    token: Option<String>,
}

/// Serves the metrics on `listen` until `stop` is cancelled.
pub fn spawn(hub: Arc<Hub>, listen: MetricsListen, stop: CancellationToken) -> anyhow::Result<()> {
    listen.listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listen.listener)?;
    let api = Arc::new(Api {
        hub,
        token: listen.token,
    });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(api);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!("the metrics listener stopped: {e}");
        }
    });
    Ok(())
}

async fn metrics(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    if let Some(token) = &api.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !ztm_proto::local::bearer_matches(given, token) {
            return (StatusCode::UNAUTHORIZED, "a bearer token is required\n").into_response();
        }
    }
    let text = api.hub.metrics_text();
    ([(header::CONTENT_TYPE, TEXT_FORMAT)], text).into_response()
}
