//! Who may talk to the agent's API, and what a browser may do with its answers.
//!
//! Without a token (the default, on loopback) the API has no login, so it only answers requests
//! addressed to a loopback name (against DNS rebinding) and refuses state-changing requests
//! that a web page of another origin sends (against cross-site request forgery).
//!
//! With a token (`ztm agent --token`, mandatory off loopback), every request but the UI's own
//! files must carry `Authorization: Bearer <token>`, and the token is the whole guard, as at the
//! CA: a page of another origin (a rebound DNS name is one) can neither read the token, which
//! the UI keeps in its own origin's session storage, nor attach it to a request without a
//! CORS preflight that the agent never approves. The Host check would only refuse the names
//! by which the agent is meant to be reached off loopback.
//!
//! Every answer carries headers that keep a browser from running or framing anything but the
//! UI's own files ([`headers`]).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use ztm_proto::local::{bearer_matches, refusal, Refusal};

use super::error::ApiError;
use crate::agent::Agent;
use crate::session::Forwarded;

pub async fn guard(State(agent): State<Arc<Agent>>, req: Request, next: Next) -> Response {
    // Requests a hub forwarded come from the reverse connection, not from HTTP (no client can
    // set this mark); `crate::admission` decided on them.
    if req.extensions().get::<Forwarded>().is_some() {
        return next.run(req).await;
    }
    if let Some(token) = &agent.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if is_ui(req.uri().path()) || bearer_matches(given, token) {
            return next.run(req).await;
        }
        let mut resp = ApiError::new(
            StatusCode::UNAUTHORIZED,
            if given.is_some() {
                "this agent refused the API token given"
            } else {
                "this agent requires its API token: send 'Authorization: Bearer <token>'"
            },
        )
        .into_response_json();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"ztm-agent\""),
        );
        return resp;
    }
    match refusal(req.method(), req.headers(), &agent.listen) {
        Some(Refusal::NotLocal) => ApiError::new(
            StatusCode::FORBIDDEN,
            "this agent only answers requests addressed to localhost",
        )
        .into_response_json(),
        Some(Refusal::CrossOrigin) => {
            ApiError::new(StatusCode::FORBIDDEN, "cross-origin requests are refused")
                .into_response_json()
        }
        None => next.run(req).await,
    }
}

/// The policy of API answers (and of anything that is not the UI): a browser shown one loads
/// nothing and runs nothing, whatever it holds.
pub const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// The policy of the UI's pages: its own scripts, styles and images only (no inline code, no
/// other origin), and no framing by other pages.
pub const UI_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
                          img-src 'self' data:; base-uri 'none'; form-action 'self'; \
                          frame-ancestors 'none'";

/// Whether `path` is one of the UI's files.
fn is_ui(path: &str) -> bool {
    path == "/" || path.starts_with("/ui/")
}

/// Security headers on every answer of the agent's HTTP server: browsers may not guess a
/// content type (`nosniff`), frame the agent or send its address on; API answers get a policy
/// that runs nothing, the UI one that admits only its own files.
pub async fn headers(req: Request, next: Next) -> Response {
    let ui = is_ui(req.uri().path());
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(if ui { UI_CSP } else { API_CSP }),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::is_ui;

    #[test]
    fn ui_paths() {
        for p in ["/", "/ui/app.js", "/ui/style.css", "/ui/nothing"] {
            assert!(is_ui(p), "{p}");
        }
        for p in ["/api/meshes", "/api", "/index.html", "/uix", "/ui"] {
            assert!(!is_ui(p), "{p}");
        }
    }
}
