//! Is an HTTP request addressed to this computer, and from a page of our own origin? The
//! decisions behind the agent's and the CA's defences against DNS rebinding and cross-site
//! requests (both answer loopback clients without a login).

use std::net::{IpAddr, SocketAddr};

use crate::addr::HostPort;

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
        Some(h) => is_local_host(HostPort::host_of(h), listen),
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
    let (host, port) = HostPort::split(authority);
    let port_ok = match port {
        Some(p) => p.parse::<u16>().ok() == Some(listen.port()),
        None => listen.port() == 80,
    };
    port_ok && is_local_host(host, listen)
}

/// Why a request to an API without a login, listening on `listen`, is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Addressed to a name other than a loopback one or our own address: a page that rebound
    /// its DNS name to us.
    NotLocal,
    /// A state-changing request that a page of another origin sent.
    CrossOrigin,
}

/// The checks of [`host_allowed`] and [`origin_allowed`] on a request: `None` if it may be
/// answered. Safe methods (GET, HEAD, OPTIONS) need only the right `Host`.
pub fn refusal(
    method: &http::Method,
    headers: &http::HeaderMap,
    listen: &SocketAddr,
) -> Option<Refusal> {
    let header = |name: http::header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if !host_allowed(header(http::header::HOST), listen) {
        return Some(Refusal::NotLocal);
    }
    let safe = matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    );
    if safe {
        return None;
    }
    let cross_site = header(http::header::HeaderName::from_static("sec-fetch-site"))
        .is_some_and(|v| v == "cross-site");
    if cross_site || !origin_allowed(header(http::header::ORIGIN), listen) {
        return Some(Refusal::CrossOrigin);
    }
    None
}

/// Does an `Authorization` header's value carry `token` (`Bearer <token>`)? Compared in time
/// that does not depend on where the two differ.
pub fn bearer_matches(authorization: Option<&str>, token: &str) -> bool {
    let Some(given) = authorization.and_then(|v| v.strip_prefix("Bearer ")) else {
        return false;
    };
    let (a, b) = (given.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert!(bearer_matches(Some("Bearer s3cret"), "s3cret"));
        for bad in [
            None,
            Some(""),
            Some("s3cret"),
            Some("Bearer "),
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("Bearer S3cret"),
            Some("Basic s3cret"),
            Some("bearer s3cret"),
            Some("Bearer  s3cret"),
        ] {
            assert!(!bearer_matches(bad, "s3cret"), "{bad:?}");
        }
    }

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

    #[test]
    fn requests() {
        use http::{HeaderMap, HeaderValue, Method};
        let listen: SocketAddr = "127.0.0.1:7777".parse().unwrap();
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        let local = headers(&[("host", "localhost:7777")]);
        assert_eq!(refusal(&Method::GET, &local, &listen), None);
        assert_eq!(refusal(&Method::POST, &local, &listen), None);
        let rebound = headers(&[("host", "evil.com:7777")]);
        assert_eq!(
            refusal(&Method::GET, &rebound, &listen),
            Some(Refusal::NotLocal)
        );
        let forged = headers(&[("host", "127.0.0.1:7777"), ("origin", "https://evil.com")]);
        assert_eq!(refusal(&Method::GET, &forged, &listen), None);
        assert_eq!(
            refusal(&Method::DELETE, &forged, &listen),
            Some(Refusal::CrossOrigin)
        );
        let cross = headers(&[("host", "127.0.0.1:7777"), ("sec-fetch-site", "cross-site")]);
        assert_eq!(
            refusal(&Method::POST, &cross, &listen),
            Some(Refusal::CrossOrigin)
        );
        let same = headers(&[
            ("host", "127.0.0.1:7777"),
            ("origin", "http://127.0.0.1:7777"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(refusal(&Method::POST, &same, &listen), None);
    }
}
