//! What a proxy's clients say and are answered, as pure functions over bytes: the SOCKS5
//! greeting and request (RFC 1928; no authentication, CONNECT only), HTTP proxy requests
//! (CONNECT, and absolute-URI requests forwarded with their head rewritten), and which reply
//! each reason a tunnel did not open gets.

use bytes::{BufMut, Bytes, BytesMut};
use ztm_proto::exit::Destination;
use ztm_proto::wire::{CONNECTION_REFUSED, HOST_UNREACHABLE};

/// The protocol a client speaks, by its first byte: SOCKS5 starts with its version, 5; an
/// HTTP request with a method's letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Socks5,
    Http,
}

pub fn dialect(first: u8) -> Option<Dialect> {
    match first {
        5 => Some(Dialect::Socks5),
        b'A'..=b'Z' => Some(Dialect::Http),
        _ => None,
    }
}

/// The result of parsing what has arrived so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    /// Complete: the value and how many bytes it took.
    Done(T, usize),
    /// More bytes are needed.
    Partial,
    /// Malformed: the client is answered (if the reply is not empty) and closed.
    Bad(Bytes, String),
}

/// SOCKS5 reply codes (RFC 1928 §6).
pub mod reply {
    pub const SUCCEEDED: u8 = 0x00;
    pub const GENERAL_FAILURE: u8 = 0x01;
    pub const NOT_ALLOWED: u8 = 0x02;
    pub const HOST_UNREACHABLE: u8 = 0x04;
    pub const REFUSED: u8 = 0x05;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
    pub const ADDRESS_NOT_SUPPORTED: u8 = 0x08;
}

/// The answer to a greeting that offers no method we take.
pub const NO_ACCEPTABLE_METHOD: [u8; 2] = [5, 0xFF];
/// The answer to a greeting that offers "no authentication".
pub const NO_AUTH: [u8; 2] = [5, 0];

/// A SOCKS5 reply with `code` and an unspecified bound address (0.0.0.0:0).
pub fn socks_reply(code: u8) -> Bytes {
    Bytes::copy_from_slice(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0])
}

/// The greeting: version 5, at least one method, and "no authentication" among them.
pub fn socks_greeting(buf: &[u8]) -> Parsed<()> {
    let [version, n, ..] = buf else {
        return Parsed::Partial;
    };
    if *version != 5 {
        return Parsed::Bad(Bytes::new(), format!("SOCKS version {version}, not 5"));
    }
    if *n == 0 {
        return Parsed::Bad(Bytes::new(), "a SOCKS5 greeting offering no method".into());
    }
    let end = 2 + usize::from(*n);
    let Some(methods) = buf.get(2..end) else {
        return Parsed::Partial;
    };
    if methods.contains(&0) {
        Parsed::Done((), end)
    } else {
        Parsed::Bad(
            Bytes::copy_from_slice(&NO_ACCEPTABLE_METHOD),
            "the SOCKS5 client offers no method but authentication, which this proxy does not ask"
                .into(),
        )
    }
}

/// The request after the greeting: CONNECT to an IPv4, domain-name or IPv6 destination.
pub fn socks_request(buf: &[u8]) -> Parsed<Destination> {
    let bad = |code: u8, why: &str| Parsed::Bad(socks_reply(code), why.to_string());
    let [version, command, reserved, kind, rest @ ..] = buf else {
        return Parsed::Partial;
    };
    if *version != 5 || *reserved != 0 {
        return bad(reply::GENERAL_FAILURE, "a malformed SOCKS5 request");
    }
    let (host, after) = match kind {
        1 => match rest.get(..4) {
            Some(a) => (
                std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string(),
                4,
            ),
            None => return Parsed::Partial,
        },
        4 => match rest.get(..16).and_then(|a| <[u8; 16]>::try_from(a).ok()) {
            Some(a) => (format!("[{}]", std::net::Ipv6Addr::from(a)), 16),
            None => return Parsed::Partial,
        },
        3 => {
            let Some(&len) = rest.first() else {
                return Parsed::Partial;
            };
            let Some(name) = rest.get(1..1 + usize::from(len)) else {
                return Parsed::Partial;
            };
            let Ok(name) = std::str::from_utf8(name) else {
                return bad(reply::GENERAL_FAILURE, "a domain name that is not text");
            };
            (name.to_string(), 1 + usize::from(len))
        }
        _ => {
            return bad(
                reply::ADDRESS_NOT_SUPPORTED,
                "an unknown SOCKS5 address type",
            )
        }
    };
    let Some(port) = rest.get(after..after + 2) else {
        return Parsed::Partial;
    };
    let port = u16::from_be_bytes([port[0], port[1]]);
    if *command != 1 {
        // BIND and UDP ASSOCIATE.
        return bad(
            reply::COMMAND_NOT_SUPPORTED,
            &format!("SOCKS5 command {command} (only CONNECT is supported)"),
        );
    }
    match Destination::parse(&format!("{host}:{port}")) {
        Ok(d) => Parsed::Done(d, 4 + after + 2),
        Err(e) => bad(reply::GENERAL_FAILURE, &e),
    }
}

/// Why a tunnel to the exit did not open, as the proxy's client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not allowed: the exit's rules, a user the exit does not admit, or no exit this user
    /// may use.
    NotAllowed,
    /// The destination refused the connection.
    Refused,
    /// No such name, no route.
    Unreachable,
    /// No answer in time.
    TimedOut,
    /// Anything else.
    Failed,
}

/// What a failed open means for the client: from the refusal's status and reason (`None`:
/// none answered), or that no exit the user may use is online.
pub fn outcome(status: Option<u16>, reason: Option<&str>, no_exit: bool) -> Outcome {
    if no_exit {
        return Outcome::NotAllowed;
    }
    match (status, reason) {
        (Some(403), _) => Outcome::NotAllowed,
        (Some(_), Some(CONNECTION_REFUSED)) => Outcome::Refused,
        (Some(504), _) => Outcome::TimedOut,
        (Some(_), Some(HOST_UNREACHABLE)) => Outcome::Unreachable,
        _ => Outcome::Failed,
    }
}

/// The SOCKS5 reply code of an outcome.
pub fn socks_code(o: Outcome) -> u8 {
    match o {
        Outcome::NotAllowed => reply::NOT_ALLOWED,
        Outcome::Refused => reply::REFUSED,
        Outcome::Unreachable | Outcome::TimedOut => reply::HOST_UNREACHABLE,
        Outcome::Failed => reply::GENERAL_FAILURE,
    }
}

/// The HTTP status of an outcome.
pub fn http_status(o: Outcome) -> u16 {
    match o {
        Outcome::NotAllowed => 403,
        Outcome::TimedOut => 504,
        Outcome::Refused | Outcome::Unreachable | Outcome::Failed => 502,
    }
}

/// An HTTP error answer with a one-line text body; the connection closes after it.
pub fn http_error(status: u16, message: &str) -> Bytes {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let body = format!("{message}\n");
    Bytes::from(format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ))
}

/// The answer to an HTTP CONNECT whose tunnel opened.
pub const HTTP_CONNECTED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// Most bytes of an HTTP request head.
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 100;

/// An HTTP proxy request: where to, and for a forwarded request the head to send there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    pub destination: Destination,
    /// `None` for CONNECT; else the request's head in origin form, to go first.
    pub forward: Option<Bytes>,
}

/// Headers meant for the proxy, not passed on (RFC 9110 §7.6.1 and the de facto
/// `Proxy-Connection`), and `Connection`, which the forwarded head sets itself.
fn hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "proxy-connection",
        "proxy-authorization",
        "keep-alive",
        "te",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// Parses an HTTP proxy request's head.
pub fn http_request(buf: &[u8]) -> Parsed<HttpRequest> {
    let bad = |status: u16, why: String| Parsed::Bad(http_error(status, &why), why);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return bad(431, format!("a request head over {MAX_HEAD} bytes"))
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(e) => return bad(400, format!("a malformed HTTP request: {e}")),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return bad(400, "a malformed HTTP request".into());
    };
    if method == "CONNECT" {
        return match Destination::parse(target) {
            Ok(destination) => Parsed::Done(
                HttpRequest {
                    destination,
                    forward: None,
                },
                len,
            ),
            Err(e) => bad(400, e),
        };
    }
    let Some(rest) = target.strip_prefix("http://") else {
        return bad(
            400,
            format!(
                "{target:?}: this is a proxy; it forwards http:// URLs and tunnels CONNECT \
                 (https:// goes through CONNECT)"
            ),
        );
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    // No user information in the authority (it would be sent on as the host).
    if authority.contains('@') || authority.is_empty() {
        return bad(
            400,
            format!("{target:?}: no host, or user information in it"),
        );
    }
    let with_port = if ztm_proto::addr::HostPort::split(authority).1.is_some() {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let destination = match Destination::parse(&with_port) {
        Ok(d) => d,
        Err(e) => return bad(400, e),
    };
    let mut head = BytesMut::with_capacity(len + 32);
    head.put_slice(format!("{method} {path} HTTP/1.{minor}\r\n").as_bytes());
    let mut has_host = false;
    for h in req.headers.iter() {
        if hop_by_hop(h.name) {
            continue;
        }
        has_host |= h.name.eq_ignore_ascii_case("host");
        head.put_slice(h.name.as_bytes());
        head.put_slice(b": ");
        head.put_slice(h.value);
        head.put_slice(b"\r\n");
    }
    if !has_host {
        head.put_slice(format!("Host: {authority}\r\n").as_bytes());
    }
    // One request per connection to the destination: the next may be for another host.
    head.put_slice(b"Connection: close\r\n\r\n");
    Parsed::Done(
        HttpRequest {
            destination,
            forward: Some(head.freeze()),
        },
        len,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done<T>(p: Parsed<T>) -> (T, usize) {
        match p {
            Parsed::Done(v, n) => (v, n),
            Parsed::Partial => panic!("partial"),
            Parsed::Bad(_, why) => panic!("bad: {why}"),
        }
    }

    #[test]
    fn dialects_by_first_byte() {
        assert_eq!(dialect(5), Some(Dialect::Socks5));
        assert_eq!(dialect(b'G'), Some(Dialect::Http));
        assert_eq!(dialect(b'C'), Some(Dialect::Http));
        assert_eq!(dialect(4), None, "SOCKS4");
        assert_eq!(dialect(0x16), None, "TLS");
        assert_eq!(dialect(b'g'), None);
    }

    #[test]
    fn socks_greetings() {
        assert_eq!(socks_greeting(&[]), Parsed::Partial);
        assert_eq!(socks_greeting(&[5]), Parsed::Partial);
        assert_eq!(socks_greeting(&[5, 2, 0]), Parsed::Partial);
        assert_eq!(socks_greeting(&[5, 1, 0]), Parsed::Done((), 3));
        assert_eq!(socks_greeting(&[5, 2, 2, 0, 9]), Parsed::Done((), 4));
        // Malformed: closed without a reply.
        for bad in [&[5u8, 0][..], &[4, 1, 0], &[0, 0]] {
            match socks_greeting(bad) {
                Parsed::Bad(reply, _) => assert!(reply.is_empty(), "{bad:?}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        // Only authentication offered: told there is no acceptable method.
        match socks_greeting(&[5, 1, 2]) {
            Parsed::Bad(reply, _) => assert_eq!(&reply[..], &NO_ACCEPTABLE_METHOD),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn socks_requests() {
        let (d, n) = done(socks_request(&[5, 1, 0, 1, 10, 0, 0, 7, 0, 80, 99]));
        assert_eq!((d.to_string(), n), ("10.0.0.7:80".to_string(), 10));
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&443u16.to_be_bytes());
        let (d, n) = done(socks_request(&v6));
        assert_eq!((d.to_string(), n), ("[fd00::1]:443".to_string(), 22));
        let mut name = vec![5, 1, 0, 3, 15];
        name.extend_from_slice(b"web.corp.Example");
        name.truncate(5 + 15);
        name.extend_from_slice(&22u16.to_be_bytes());
        let (d, n) = done(socks_request(&name));
        assert_eq!((d.to_string(), n), ("web.corp.exampl:22".to_string(), 22));
        // Every prefix is partial.
        for cut in 0..name.len() {
            assert_eq!(socks_request(&name[..cut]), Parsed::Partial, "{cut}");
        }
        let code = |buf: &[u8]| match socks_request(buf) {
            Parsed::Bad(reply, _) => reply[1],
            other => panic!("{buf:?}: {other:?}"),
        };
        assert_eq!(
            code(&[5, 3, 0, 1, 10, 0, 0, 7, 0, 53]),
            reply::COMMAND_NOT_SUPPORTED
        );
        assert_eq!(
            code(&[5, 2, 0, 1, 10, 0, 0, 7, 0, 53]),
            reply::COMMAND_NOT_SUPPORTED
        );
        assert_eq!(
            code(&[5, 1, 0, 9, 10, 0, 0, 7, 0, 53]),
            reply::ADDRESS_NOT_SUPPORTED
        );
        assert_eq!(
            code(&[4, 1, 0, 1, 10, 0, 0, 7, 0, 53]),
            reply::GENERAL_FAILURE
        );
        assert_eq!(
            code(&[5, 1, 0, 1, 10, 0, 0, 7, 0, 0]),
            reply::GENERAL_FAILURE,
            "port 0"
        );
        assert_eq!(
            code(&[5, 1, 0, 3, 3, b'a', b' ', b'b', 0, 80]),
            reply::GENERAL_FAILURE
        );
        assert_eq!(
            code(&[5, 1, 0, 3, 0, 0, 80]),
            reply::GENERAL_FAILURE,
            "empty name"
        );
    }

    #[test]
    fn outcomes_map_to_each_protocol() {
        for (status, reason, no_exit, want, socks, http) in [
            (None, None, true, Outcome::NotAllowed, 0x02, 403),
            (Some(403), None, false, Outcome::NotAllowed, 0x02, 403),
            (
                Some(502),
                Some(CONNECTION_REFUSED),
                false,
                Outcome::Refused,
                0x05,
                502,
            ),
            (
                Some(502),
                Some(HOST_UNREACHABLE),
                false,
                Outcome::Unreachable,
                0x04,
                502,
            ),
            (
                Some(504),
                Some(HOST_UNREACHABLE),
                false,
                Outcome::TimedOut,
                0x04,
                504,
            ),
            (Some(504), None, false, Outcome::TimedOut, 0x04, 504),
            (Some(502), None, false, Outcome::Failed, 0x01, 502),
            (Some(429), None, false, Outcome::Failed, 0x01, 502),
            (None, None, false, Outcome::Failed, 0x01, 502),
        ] {
            let got = outcome(status, reason, no_exit);
            assert_eq!(got, want, "{status:?} {reason:?} {no_exit}");
            assert_eq!(
                (socks_code(got), http_status(got)),
                (socks, http),
                "{got:?}"
            );
        }
    }

    #[test]
    fn http_connect() {
        let input =
            b"CONNECT web.corp.example:443 HTTP/1.1\r\nHost: web.corp.example:443\r\n\r\nxx";
        let (r, n) = done(http_request(input));
        assert_eq!(r.destination.to_string(), "web.corp.example:443");
        assert_eq!(
            (r.forward, n),
            (None, input.len() - 2),
            "bytes after the head stay"
        );
        let (r, _) = done(http_request(b"CONNECT [fd00::1]:22 HTTP/1.1\r\n\r\n"));
        assert_eq!(r.destination.to_string(), "[fd00::1]:22");
        for bad in [
            &b"CONNECT web HTTP/1.1\r\n\r\n"[..],
            b"CONNECT web:0 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET https://web/ HTTP/1.1\r\n\r\n",
            b"GET http://user@web/ HTTP/1.1\r\n\r\n",
            b"GET http:/// HTTP/1.1\r\n\r\n",
            b"GET\x00 / HTTP/1.1\r\n\r\n",
        ] {
            match http_request(bad) {
                Parsed::Bad(reply, _) => {
                    assert!(
                        reply.starts_with(b"HTTP/1.1 400 "),
                        "{}",
                        String::from_utf8_lossy(bad)
                    )
                }
                other => panic!("{}: {other:?}", String::from_utf8_lossy(bad)),
            }
        }
        assert_eq!(
            http_request(b"CONNECT web:443 HTTP/1.1\r\n"),
            Parsed::Partial
        );
        let huge = [
            b"GET http://web/ HTTP/1.1\r\nX: ".as_slice(),
            &[b'a'; MAX_HEAD],
        ]
        .concat();
        match http_request(&huge) {
            Parsed::Bad(reply, _) => assert!(reply.starts_with(b"HTTP/1.1 431 ")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn http_forwarding_rewrites_the_head() {
        let input = b"POST http://Web.Corp.Example:8080/a/b?c=1 HTTP/1.1\r\nHost: web.corp.example:8080\r\n\
              Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\n\
              Content-Length: 5\r\n\r\nhello";
        let (r, n) = done(http_request(input));
        assert_eq!(r.destination.to_string(), "web.corp.example:8080");
        assert_eq!(
            String::from_utf8(r.forward.unwrap().to_vec()).unwrap(),
            "POST /a/b?c=1 HTTP/1.1\r\nHost: web.corp.example:8080\r\nContent-Length: 5\r\n\
             Connection: close\r\n\r\n"
        );
        assert_eq!(n, input.len() - 5, "the body is not part of the head");
        let (r, _) = done(http_request(b"GET http://10.0.0.1?x HTTP/1.0\r\n\r\n"));
        assert_eq!(r.destination.to_string(), "10.0.0.1:80");
        assert_eq!(
            &r.forward.unwrap()[..],
            b"GET /?x HTTP/1.0\r\nHost: 10.0.0.1\r\nConnection: close\r\n\r\n"
        );
        let (r, _) = done(http_request(b"GET http://[fd00::1]:81 HTTP/1.1\r\n\r\n"));
        assert_eq!(r.destination.to_string(), "[fd00::1]:81");
    }
}
