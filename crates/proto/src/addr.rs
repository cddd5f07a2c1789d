//! `HOST:PORT` addresses as users type them (hub, CA and agent addresses, `--name`s, listen
//! addresses) and as HTTP carries them (`Host`, `Origin`): a host name or IP address and a
//! port, an IPv6 address in brackets (`[::1]:7777`).

use std::fmt;
use std::str::FromStr;

/// Longest host name: a full domain name has at most 253 characters.
pub const MAX_HOST_LEN: usize = 253;

/// A host and a port. The host is a name or an IP address, an IPv6 address without its
/// brackets; [`Display`](fmt::Display) puts them back (`[::1]:7777`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

/// Why a text is not a `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPortError {
    /// No `:PORT`.
    NoPort,
    /// Nothing before `:PORT`.
    NoHost,
    /// The port is not a number from 0 to 65535.
    BadPort(String),
}

impl fmt::Display for HostPortError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPortError::NoPort => write!(f, "no port: expected HOST:PORT"),
            HostPortError::NoHost => write!(f, "no host: expected HOST:PORT"),
            HostPortError::BadPort(p) => {
                write!(f, "bad port {p:?}: expected a number from 0 to 65535")
            }
        }
    }
}

impl std::error::Error for HostPortError {}

impl HostPort {
    pub fn new(host: impl Into<String>, port: u16) -> HostPort {
        HostPort {
            host: host.into(),
            port,
        }
    }

    /// Parses `HOST:PORT` or `[IPV6]:PORT`. The port is required, so an IPv6 address without
    /// brackets takes the part after its last colon as the port (`::1:80` is `::1`, port 80).
    /// The host's characters are not judged here: see [`is_valid_host`].
    pub fn parse(text: &str) -> Result<HostPort, HostPortError> {
        let (host, port) = match text.strip_prefix('[') {
            Some(rest) => {
                let (host, tail) = rest.split_once(']').ok_or(HostPortError::NoPort)?;
                (host, tail.strip_prefix(':').ok_or(HostPortError::NoPort)?)
            }
            None => text.rsplit_once(':').ok_or(HostPortError::NoPort)?,
        };
        if host.is_empty() {
            return Err(HostPortError::NoHost);
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| HostPortError::BadPort(port.to_string()))?;
        Ok(HostPort::new(host, port))
    }

    /// Splits `HOST[:PORT]` into the host (brackets taken off an IPv6 address) and the port's
    /// text, judging neither. The port is optional, so an IPv6 address without brackets is a
    /// host alone (`::1`).
    pub fn split(text: &str) -> (&str, Option<&str>) {
        if let Some(rest) = text.strip_prefix('[') {
            if let Some((host, tail)) = rest.split_once(']') {
                return (host, tail.strip_prefix(':'));
            }
        }
        match text.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') => (host, Some(port)),
            _ => (text, None),
        }
    }

    /// The host of `HOST[:PORT]` (see [`HostPort::split`]).
    pub fn host_of(text: &str) -> &str {
        HostPort::split(text).0
    }

    /// Whether the host is the wildcard address (`0.0.0.0`, `::`): a listen address that
    /// names no one computer.
    pub fn is_unspecified(&self) -> bool {
        self.host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified())
    }
}

impl FromStr for HostPort {
    type Err = HostPortError;

    fn from_str(text: &str) -> Result<HostPort, HostPortError> {
        HostPort::parse(text)
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A host name or IP address as the mesh accepts one in an address or a certificate: 1 to
/// [`MAX_HOST_LEN`] characters of letters, digits, `.`, `-`, `_` and `:` (IPv6).
pub fn is_valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing() {
        let hp = |h: &str, p| Ok(HostPort::new(h, p));
        for (text, want) in [
            ("127.0.0.1:7777", hp("127.0.0.1", 7777)),
            ("localhost:80", hp("localhost", 80)),
            ("hub.example.com:0", hp("hub.example.com", 0)),
            ("[::1]:9", hp("::1", 9)),
            ("[fe80::1%eth0]:443", hp("fe80::1%eth0", 443)),
            ("::1:80", hp("::1", 80)),
            ("[::]:9000", hp("::", 9000)),
            ("h:65535", hp("h", 65535)),
            ("nohost", Err(HostPortError::NoPort)),
            ("", Err(HostPortError::NoPort)),
            ("[::1]", Err(HostPortError::NoPort)),
            ("[::1]80", Err(HostPortError::NoPort)),
            ("[::1:80", Err(HostPortError::NoPort)),
            (":80", Err(HostPortError::NoHost)),
            ("[]:80", Err(HostPortError::NoHost)),
            ("h:", Err(HostPortError::BadPort("".into()))),
            ("h:65536", Err(HostPortError::BadPort("65536".into()))),
            ("h:-1", Err(HostPortError::BadPort("-1".into()))),
            ("h:8o", Err(HostPortError::BadPort("8o".into()))),
            ("h:1/x", Err(HostPortError::BadPort("1/x".into()))),
        ] {
            assert_eq!(HostPort::parse(text), want, "{text:?}");
            assert_eq!(text.parse::<HostPort>(), want, "{text:?}");
        }
    }

    #[test]
    fn display_brackets_ipv6() {
        for (hp, text) in [
            (HostPort::new("127.0.0.1", 7777), "127.0.0.1:7777"),
            (HostPort::new("hub.example.com", 443), "hub.example.com:443"),
            (HostPort::new("::1", 9999), "[::1]:9999"),
            (HostPort::new("::", 0), "[::]:0"),
        ] {
            assert_eq!(hp.to_string(), text);
            assert_eq!(HostPort::parse(text), Ok(hp));
        }
    }

    #[test]
    fn splitting() {
        for (text, host, port) in [
            ("localhost:7777", "localhost", Some("7777")),
            ("localhost", "localhost", None),
            ("[::1]:7777", "::1", Some("7777")),
            ("[::1]", "::1", None),
            ("[::1]x", "::1", None),
            ("::1", "::1", None),
            ("fe80::1", "fe80::1", None),
            ("127.0.0.1:8888", "127.0.0.1", Some("8888")),
            ("127.0.0.1", "127.0.0.1", None),
            ("hub.example.com", "hub.example.com", None),
            ("h:", "h", Some("")),
            ("h:x", "h", Some("x")),
            ("", "", None),
        ] {
            assert_eq!(HostPort::split(text), (host, port), "{text:?}");
            assert_eq!(HostPort::host_of(text), host, "{text:?}");
        }
    }

    #[test]
    fn unspecified_hosts() {
        for (text, any) in [
            ("0.0.0.0:1", true),
            ("[::]:1", true),
            ("127.0.0.1:1", false),
            ("[::1]:1", false),
            ("localhost:1", false),
        ] {
            assert_eq!(HostPort::parse(text).map(|h| h.is_unspecified()), Ok(any));
        }
    }

    #[test]
    fn hosts() {
        for ok in [
            "localhost",
            "hub.example.com",
            "127.0.0.1",
            "::1",
            "my_host-1",
            &"a".repeat(MAX_HOST_LEN),
        ] {
            assert!(is_valid_host(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "ftp://x",
            "[::1]",
            "a/b",
            "é",
            &"a".repeat(MAX_HOST_LEN + 1),
        ] {
            assert!(!is_valid_host(bad), "{bad}");
        }
    }
}
