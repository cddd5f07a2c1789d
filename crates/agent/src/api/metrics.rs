//! `GET /metrics`: the agent's figures ([`crate::metrics`]) in Prometheus' text format 0.0.4.
//! Served on the API's own address behind its guard, like every API: addressed to a loopback
//! name without a token, with `Authorization: Bearer <token>` when the agent has one. Hubs
//! cannot forward it (they forward only an endpoint's services and ports).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::agent::Agent;

/// The content type of Prometheus' text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub async fn get(State(agent): State<Arc<Agent>>) -> Response {
    ([(header::CONTENT_TYPE, TEXT_FORMAT)], agent.metrics_text()).into_response()
}
