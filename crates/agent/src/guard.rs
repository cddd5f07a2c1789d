//! Who may talk to the agent's API. It has no login, so it only answers requests addressed to
//! a loopback name (against DNS rebinding) and refuses state-changing requests that a web page
//! of another origin sends (against cross-site request forgery).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use crate::{Agent, ApiError};

/// Splits `host[:port]` (with `[v6]` brackets) into host and port.
fn split_host(authority: &str) -> (&str, Option<&str>) {
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some((h, tail)) = rest.split_once(']') {
            return (h, tail.strip_prefix(':'));
        }
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        _ => (authority, None),
    }
}

fn is_local_host(host: &str, listen: &SocketAddr) -> bool {
    let host = host.to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback() || (!listen.ip().is_unspecified() && ip == listen.ip()),
        Err(_) => false,
    }
}

/// Is a request with this `Host` header addressed to us?
pub fn host_allowed(host: Option<&str>, listen: &SocketAddr) -> bool {
    match host {
        Some(h) => is_local_host(split_host(h).0, listen),
        None => false,
    }
}

/// May a request with this `Origin` change state? Same origin only: a loopback host on our port.
pub fn origin_allowed(origin: Option<&str>, listen: &SocketAddr) -> bool {
    let Some(origin) = origin else {
        // Not sent by a browser's cross-origin machinery (curl, the CLI, same-origin GETs).
        return true;
    };
    let Some(authority) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let (host, port) = split_host(authority);
    let port_ok = match port {
        Some(p) => p.parse::<u16>().ok() == Some(listen.port()),
        None => listen.port() == 80,
    };
    port_ok && is_local_host(host, listen)
}

pub async fn guard(State(agent): State<Arc<Agent>>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok());
    if !host_allowed(host, &agent.listen) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "this agent only answers requests addressed to localhost",
        )
        .into_response_json();
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe {
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok());
        let cross_site = req
            .headers()
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "cross-site");
        if cross_site || !origin_allowed(origin, &agent.listen) {
            return ApiError::new(StatusCode::FORBIDDEN, "cross-origin requests are refused")
                .into_response_json();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let listen: SocketAddr = "127.0.0.1:7777".parse().unwrap();
        for ok in [
            "localhost:7777",
            "127.0.0.1:7777",
            "[::1]:7777",
            "localhost",
            "app.localhost:7777",
            "127.1.2.3",
        ] {
            assert!(host_allowed(Some(ok), &listen), "{ok}");
        }
        for bad in [
            "evil.com",
            "evil.com:7777",
            "10.0.0.1:7777",
            "localhost.evil.com",
        ] {
            assert!(!host_allowed(Some(bad), &listen), "{bad}");
        }
        assert!(!host_allowed(None, &listen));
        let public: SocketAddr = "192.0.2.10:7777".parse().unwrap();
        assert!(host_allowed(Some("192.0.2.10:7777"), &public));
    }

    #[test]
    fn origins() {
        let listen: SocketAddr = "127.0.0.1:7777".parse().unwrap();
        assert!(origin_allowed(None, &listen));
        assert!(origin_allowed(Some("http://localhost:7777"), &listen));
        assert!(origin_allowed(Some("http://127.0.0.1:7777"), &listen));
        assert!(!origin_allowed(Some("http://localhost:3000"), &listen));
        assert!(!origin_allowed(Some("https://evil.com"), &listen));
        assert!(!origin_allowed(Some("null"), &listen));
    }
}
