//! Exits: which destinations an exit endpoint lets connections out to, as pure functions
//! (docs/exits.md).
//!
//! An exit lists rules, `PATTERN[:PORTS]`. A pattern is an address or a CIDR (IPv6 in
//! brackets when ports follow), a host name, `*.SUFFIX` for any name under a domain, or `*`
//! for any name. Nothing is allowed unless a rule lists it:
//! - a destination given as an address is allowed when an address rule covers it and its port;
//! - a destination given as a name is allowed when a name rule matches it and its port, and
//!   then only to an address it resolves to (at the exit) that an address rule covers too.
//!   A name that resolves only into unlisted ranges is refused.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::addr::{HostPort, MAX_HOST_LEN};

/// Most rules one exit has.
pub const MAX_RULES: usize = 1000;

/// What a rule matches, ports aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// Addresses in a network (a single address is a /32 or /128).
    Net(IpNet),
    /// One host name (lower case, no trailing dot).
    Name(String),
    /// Names under a domain: `*.corp.example` is `corp.example` (lower case), matching
    /// `a.corp.example` and `a.b.corp.example` but not `corp.example` itself.
    Under(String),
    /// Any name.
    AnyName,
}

/// One rule: a pattern and the ports it allows (inclusive range).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub pattern: Pattern,
    pub ports: (u16, u16),
}

/// An exit's rules, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules(Vec<Rule>);

/// The host of a destination: an address or a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

/// Where a connection through an exit should go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub host: Host,
    pub port: u16,
}

/// Why a destination is not let out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No rule lists this address and port.
    Address(SocketAddr),
    /// No rule lists this name and port.
    Name(String, u16),
    /// The name is listed, but none of the addresses it resolves to.
    Resolved(String, Vec<IpAddr>),
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::Address(a) => write!(f, "{a} is not a destination this exit allows"),
            Denied::Name(n, p) => write!(f, "{n}:{p} is not a destination this exit allows"),
            Denied::Resolved(n, addrs) => {
                let list: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
                write!(
                    f,
                    "{n} resolves to {}, outside the addresses this exit allows",
                    list.join(", ")
                )
            }
        }
    }
}

/// Lower case, without a trailing dot; `None` if it is not a host name.
fn host_name(text: &str) -> Option<String> {
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.len() <= MAX_HOST_LEN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
        });
    ok.then_some(name)
}

fn parse_ports(text: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => (port(text)?, port(text)?),
    };
    if lo > hi {
        return Err(format!("ports {lo}-{hi}: the first is above the last"));
    }
    Ok((lo, hi))
}

fn parse_pattern(text: &str) -> Result<Pattern, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(Pattern::Net(net.trunc()));
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(Pattern::Net(IpNet::from(ip.to_canonical())));
    }
    if text == "*" {
        return Ok(Pattern::AnyName);
    }
    if let Some(domain) = text.strip_prefix("*.") {
        return host_name(domain)
            .map(Pattern::Under)
            .ok_or_else(|| format!("{text:?}: {domain:?} is not a domain name"));
    }
    if text.contains(['/', ':', '[', ']']) || text.parse::<IpAddr>().is_ok() {
        return Err(format!("{text:?} is not an address or a network"));
    }
    host_name(text).map(Pattern::Name).ok_or_else(|| {
        format!("{text:?} is not an address, a network (CIDR), a host name, *.DOMAIN or *")
    })
}

impl Rule {
    /// Parses `PATTERN[:PORTS]`: `10.0.0.0/8`, `192.168.1.10:80-90`, `[fd00::/8]:443`,
    /// `fd00::1`, `nas.lan:5000`, `*.corp.example`, `*:443`.
    pub fn parse(text: &str) -> Result<Rule, String> {
        let text = text.trim();
        let (pattern, ports) = if let Some(rest) = text.strip_prefix('[') {
            let (inner, tail) = rest
                .split_once(']')
                .ok_or_else(|| format!("{text:?}: no closing ]"))?;
            match tail {
                "" => (inner, None),
                t => (
                    inner,
                    Some(
                        t.strip_prefix(':')
                            .ok_or_else(|| format!("{text:?}: expected :PORTS after ]"))?,
                    ),
                ),
            }
        } else if text.matches(':').count() > 1 {
            // An IPv6 address or network without brackets: no ports.
            (text, None)
        } else {
            match text.split_once(':') {
                Some((p, ports)) => (p, Some(ports)),
                None => (text, None),
            }
        };
        let pattern = parse_pattern(pattern)?;
        let ports = match ports {
            Some(p) => parse_ports(p).map_err(|e| format!("{text:?}: {e}"))?,
            None => (1, u16::MAX),
        };
        Ok(Rule { pattern, ports })
    }

    fn port_ok(&self, port: u16) -> bool {
        (self.ports.0..=self.ports.1).contains(&port)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports = match self.ports {
            (1, u16::MAX) => None,
            (lo, hi) if lo == hi => Some(lo.to_string()),
            (lo, hi) => Some(format!("{lo}-{hi}")),
        };
        let pattern = match &self.pattern {
            Pattern::Net(net) if net.prefix_len() == net.max_prefix_len() => net.addr().to_string(),
            Pattern::Net(net) => net.to_string(),
            Pattern::Name(n) => n.clone(),
            Pattern::Under(d) => format!("*.{d}"),
            Pattern::AnyName => "*".to_string(),
        };
        match ports {
            None => f.write_str(&pattern),
            Some(p) if pattern.contains(':') => write!(f, "[{pattern}]:{p}"),
            Some(p) => write!(f, "{pattern}:{p}"),
        }
    }
}

impl Rules {
    /// Parses an exit's rules; the first bad one is the error. At least one, at most
    /// [`MAX_RULES`].
    pub fn parse<S: AsRef<str>>(texts: &[S]) -> Result<Rules, String> {
        if texts.is_empty() {
            return Err(
                "an exit needs at least one rule (nothing is allowed unless listed)".into(),
            );
        }
        if texts.len() > MAX_RULES {
            return Err(format!("at most {MAX_RULES} rules"));
        }
        texts
            .iter()
            .map(|t| Rule::parse(t.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map(Rules)
    }

    /// The rules in their canonical spelling.
    pub fn texts(&self) -> Vec<String> {
        self.0.iter().map(Rule::to_string).collect()
    }

    /// Does an address rule cover `ip` and `port`?
    pub fn address_allowed(&self, ip: IpAddr, port: u16) -> bool {
        let ip = ip.to_canonical();
        self.0
            .iter()
            .any(|r| r.port_ok(port) && matches!(&r.pattern, Pattern::Net(n) if n.contains(&ip)))
    }

    /// Does a name rule match `name` (lower case) and `port`?
    pub fn name_allowed(&self, name: &str, port: u16) -> bool {
        self.0.iter().any(|r| {
            r.port_ok(port)
                && match &r.pattern {
                    Pattern::Name(n) => n == name,
                    Pattern::Under(d) => name
                        .strip_suffix(d.as_str())
                        .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
                    Pattern::AnyName => true,
                    Pattern::Net(_) => false,
                }
        })
    }

    /// The first decision, before any name is resolved: is `dest` listed? An address that is
    /// allowed is where to connect (`Some`); a name that is allowed must be resolved and its
    /// addresses judged by [`Rules::pick`] (`None`).
    pub fn admit(&self, dest: &Destination) -> Result<Option<SocketAddr>, Denied> {
        match &dest.host {
            Host::Ip(ip) => {
                let addr = SocketAddr::new(ip.to_canonical(), dest.port);
                if self.address_allowed(*ip, dest.port) {
                    Ok(Some(addr))
                } else {
                    Err(Denied::Address(addr))
                }
            }
            Host::Name(name) if self.name_allowed(name, dest.port) => Ok(None),
            Host::Name(name) => Err(Denied::Name(name.clone(), dest.port)),
        }
    }

    /// The addresses `name` resolved to that may be connected to, in the resolver's order.
    pub fn pick(&self, name: &str, resolved: &[SocketAddr]) -> Result<Vec<SocketAddr>, Denied> {
        let allowed: Vec<SocketAddr> = resolved
            .iter()
            .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
            .filter(|a| self.address_allowed(a.ip(), a.port()))
            .collect();
        if allowed.is_empty() {
            return Err(Denied::Resolved(
                name.to_string(),
                resolved.iter().map(SocketAddr::ip).collect(),
            ));
        }
        Ok(allowed)
    }
}

impl Destination {
    /// Parses `HOST:PORT` as a tunnel request carries it (an IPv6 address in brackets). The
    /// port is 1-65535; a name is lower-cased.
    pub fn parse(text: &str) -> Result<Destination, String> {
        let hp = HostPort::parse(text).map_err(|e| format!("destination {text:?}: {e}"))?;
        if hp.port == 0 {
            return Err(format!("destination {text:?}: port 0"));
        }
        let host = match hp.host.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip.to_canonical()),
            Err(_) => Host::Name(
                host_name(&hp.host)
                    .ok_or_else(|| format!("destination {text:?}: not a host name or address"))?,
            ),
        };
        Ok(Destination {
            host,
            port: hp.port,
        })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(ip) => write!(f, "{ip}:{}", self.port),
            Host::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(texts: &[&str]) -> Rules {
        Rules::parse(texts).unwrap()
    }

    fn dest(text: &str) -> Destination {
        Destination::parse(text).unwrap()
    }

    #[test]
    fn rules_parse_and_print_canonically() {
        for (text, want) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("10.0.0.1", "10.0.0.1"),
            ("10.0.0.1:22", "10.0.0.1:22"),
            ("192.168.1.0/24:80-90", "192.168.1.0/24:80-90"),
            ("[fd00::/8]:443", "[fd00::/8]:443"),
            ("fd00::/8", "fd00::/8"),
            ("fd00::1", "fd00::1"),
            ("[fd00::1]", "fd00::1"),
            ("::ffff:10.0.0.1", "10.0.0.1"),
            ("NAS.lan.:5000", "nas.lan:5000"),
            ("*.Corp.Example", "*.corp.example"),
            ("*:443", "*:443"),
            ("*", "*"),
            (" web:1-65535 ", "web"),
        ] {
            assert_eq!(
                Rule::parse(text).map(|r| r.to_string()),
                Ok(want.into()),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_rules_are_refused_with_reasons() {
        for text in [
            "",
            "10.0.0.0/33",
            "10.0.0.1:0",
            "10.0.0.1:70000",
            "10.0.0.1:90-80",
            "10.0.0.1:x",
            "[fd00::/8",
            "[fd00::/8]443",
            "*.",
            "*.-bad",
            "a..b",
            "a b",
            "a/b",
            "**",
            "x.*",
        ] {
            assert!(Rule::parse(text).is_err(), "{text:?} parsed");
        }
        assert!(Rules::parse::<&str>(&[]).is_err(), "an exit with no rules");
        let many: Vec<String> = (0..=MAX_RULES)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        assert!(Rules::parse(&many).is_err());
    }

    #[test]
    fn addresses_need_an_address_rule_with_the_port() {
        let r = rules(&[
            "10.1.0.0/16",
            "10.2.0.5:22",
            "[fd00::/8]:443",
            "*.corp.example",
        ]);
        for (d, ok) in [
            ("10.1.2.3:80", true),
            ("10.1.255.255:65535", true),
            ("10.3.0.1:80", false),
            ("10.2.0.5:22", true),
            ("10.2.0.5:23", false),
            ("[fd00::1]:443", true),
            ("[fd00::1]:80", false),
            ("[fe80::1]:443", false),
            // An IPv4-mapped IPv6 address is judged as the IPv4 address it is.
            ("[::ffff:10.1.0.1]:80", true),
            ("[::ffff:127.0.0.1]:80", false),
            ("127.0.0.1:80", false),
        ] {
            assert_eq!(r.admit(&dest(d)).is_ok(), ok, "{d}");
        }
        assert_eq!(
            r.admit(&dest("[::ffff:10.1.0.1]:80")),
            Ok(Some("10.1.0.1:80".parse().unwrap())),
            "connects to the canonical address"
        );
    }

    #[test]
    fn names_need_a_name_rule_and_then_an_allowed_address() {
        let r = rules(&[
            "10.1.0.0/16",
            "*.corp.example:80-443",
            "nas.lan",
            "10.9.9.9:5000",
        ]);
        for (d, ok) in [
            ("web.corp.example:80", true),
            ("a.b.corp.example:443", true),
            ("WEB.Corp.Example.:80", true),
            ("web.corp.example:22", false),
            ("corp.example:80", false),
            ("xcorp.example:80", false),
            ("nas.lan:5000", true),
            ("nas.lan2:5000", false),
            ("printer.lan:80", false),
        ] {
            let got = r.admit(&dest(d));
            assert_eq!(got.is_ok(), ok, "{d}: {got:?}");
            if ok {
                assert_eq!(got, Ok(None), "{d}: a name is resolved first");
            }
        }
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        // Resolved into a listed range: those addresses only, in order.
        assert_eq!(
            r.pick(
                "web.corp.example",
                &[a("127.0.0.1:80"), a("10.1.0.7:80"), a("10.1.0.8:80")]
            ),
            Ok(vec![a("10.1.0.7:80"), a("10.1.0.8:80")])
        );
        // Resolved only into unlisted ranges: refused, with what it resolved to.
        assert_eq!(
            r.pick("evil.corp.example", &[a("127.0.0.1:80"), a("[::1]:80")]),
            Err(Denied::Resolved(
                "evil.corp.example".into(),
                vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()]
            ))
        );
        // An address rule's ports apply to resolved addresses too.
        assert!(r.pick("nas.lan", &[a("10.9.9.9:5000")]).is_ok());
        assert!(r.pick("nas.lan", &[a("10.9.9.9:5001")]).is_err());
        assert!(r.pick("nas.lan", &[]).is_err(), "nothing resolved");
    }

    #[test]
    fn any_name_still_needs_an_allowed_address() {
        let r = rules(&["*", "192.168.1.0/24"]);
        assert_eq!(r.admit(&dest("anything:80")), Ok(None));
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(r.pick("anything", &[a("192.168.1.5:80")]).is_ok());
        assert!(r.pick("anything", &[a("192.168.2.5:80")]).is_err());
        // Without an address rule nothing at all gets out.
        let names_only = rules(&["*"]);
        assert!(names_only.pick("anything", &[a("192.168.1.5:80")]).is_err());
        assert!(names_only.admit(&dest("192.168.1.5:80")).is_err());
    }

    #[test]
    fn destinations_parse() {
        assert_eq!(
            dest("Web.Corp:80"),
            Destination {
                host: Host::Name("web.corp".into()),
                port: 80
            }
        );
        assert_eq!(dest("[::1]:22").to_string(), "[::1]:22");
        assert_eq!(dest("10.0.0.1:22").to_string(), "10.0.0.1:22");
        for bad in [
            "web", "web:0", ":80", "a b:80", "a/b:80", "[::1:80", "web:x", "-a:80",
        ] {
            assert!(Destination::parse(bad).is_err(), "{bad}");
        }
    }
}
