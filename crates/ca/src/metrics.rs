//! The CA's figures for Prometheus (`ztm ca --metrics ADDR`, README "Metrics"): certificates
//! issued and revoked since start, and API requests by the status answered. Read from the
//! requests and answers as they pass (a layer over [`crate::router`]), so the handlers stay as
//! they are; served on a listener of its own, behind a bearer token when one is set.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::{IntCounterVec, Opts, Registry, TextEncoder};

/// What a successful request did to the certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Issued,
    Revoked,
}

/// Whose certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    User,
    Hub,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Hub => "hub",
        }
    }
}

/// What request `method path`, answered with `status`, did to the certificates. Pure.
pub fn event(method: &Method, path: &str, status: u16) -> Option<(Event, Kind)> {
    if !(200..300).contains(&status) {
        return None;
    }
    let named = |prefix: &str| path.strip_prefix(prefix).is_some_and(|n| !n.is_empty());
    match *method {
        Method::POST if named("/api/certificates/") => Some((Event::Issued, Kind::User)),
        Method::POST if named("/api/sign/hub/") => Some((Event::Issued, Kind::Hub)),
        Method::DELETE if named("/api/certificates/") => Some((Event::Revoked, Kind::User)),
        Method::DELETE if named("/api/hubs/") => Some((Event::Revoked, Kind::Hub)),
        _ => None,
    }
}

/// The CA's metrics.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    issued: IntCounterVec,
    revoked: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("ztm_ca".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "API requests, by the status answered"),
            &["status"],
        )?;
        let issued = IntCounterVec::new(
            Opts::new(
                "certificates_issued_total",
                "Certificates issued since start",
            ),
            &["kind"],
        )?;
        let revoked = IntCounterVec::new(
            Opts::new(
                "certificates_revoked_total",
                "Certificates revoked since start (a hub's revocation covers all of its)",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(issued.clone()))?;
        registry.register(Box::new(revoked.clone()))?;
        for kind in [Kind::User, Kind::Hub] {
            issued.with_label_values(&[kind.label()]);
            revoked.with_label_values(&[kind.label()]);
        }
        Ok(Metrics {
            registry,
            requests,
            issued,
            revoked,
        })
    }

    fn observe(&self, method: &Method, path: &str, status: u16) {
        self.requests
            .with_label_values(&[&status.to_string()])
            .inc();
        match event(method, path, status) {
            Some((Event::Issued, kind)) => self.issued.with_label_values(&[kind.label()]).inc(),
            Some((Event::Revoked, kind)) => self.revoked.with_label_values(&[kind.label()]).inc(),
            None => {}
        }
    }

    /// The figures in Prometheus' text format.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

/// `router` with every answer counted in `metrics`.
pub fn counted(router: Router, metrics: Arc<Metrics>) -> Router {
    router.layer(middleware::from_fn_with_state(metrics, count))
}

async fn count(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    metrics.observe(&method, &path, resp.status().as_u16());
    resp
}

/// The content type of Prometheus' text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

struct Scrape {
    metrics: Arc<Metrics>,
    token: Option<String>,
}

/// The router of the metrics listener: `GET /metrics`, with `token` required as a bearer
/// token when given.
pub fn scrape_router(metrics: Arc<Metrics>, token: Option<String>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(Arc::new(Scrape { metrics, token }))
}

async fn scrape(State(s): State<Arc<Scrape>>, headers: HeaderMap) -> Response {
    if let Some(token) = &s.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !ztm_proto::local::bearer_matches(given, token) {
            return (StatusCode::UNAUTHORIZED, "a bearer token is required\n").into_response();
        }
    }
    ([(header::CONTENT_TYPE, TEXT_FORMAT)], s.metrics.render()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_as_events() {
        let cases = [
            (
                Method::POST,
                "/api/certificates/alice",
                200,
                Some((Event::Issued, Kind::User)),
            ),
            (Method::POST, "/api/certificates/alice", 409, None),
            (Method::POST, "/api/certificates/", 200, None),
            (Method::GET, "/api/certificates/alice", 200, None),
            (
                Method::DELETE,
                "/api/certificates/alice",
                204,
                Some((Event::Revoked, Kind::User)),
            ),
            (Method::DELETE, "/api/certificates/alice", 404, None),
            (
                Method::POST,
                "/api/sign/hub/h1",
                200,
                Some((Event::Issued, Kind::Hub)),
            ),
            (Method::POST, "/api/hubs/h1", 200, None),
            (
                Method::DELETE,
                "/api/hubs/h1",
                204,
                Some((Event::Revoked, Kind::Hub)),
            ),
            (Method::GET, "/api/crl", 200, None),
        ];
        for (method, path, status, want) in cases {
            assert_eq!(
                event(&method, path, status),
                want,
                "{method} {path} {status}"
            );
        }
    }

    #[test]
    fn figures_render() {
        let m = Metrics::new().unwrap();
        m.observe(&Method::POST, "/api/certificates/alice", 200);
        m.observe(&Method::DELETE, "/api/certificates/alice", 204);
        m.observe(&Method::GET, "/api/nothing", 404);
        let text = m.render();
        for line in [
            "ztm_ca_certificates_issued_total{kind=\"user\"} 1",
            "ztm_ca_certificates_issued_total{kind=\"hub\"} 0",
            "ztm_ca_certificates_revoked_total{kind=\"user\"} 1",
            "ztm_ca_requests_total{status=\"200\"} 1",
            "ztm_ca_requests_total{status=\"204\"} 1",
            "ztm_ca_requests_total{status=\"404\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
    }
}
