//! The hub's figures for Prometheus (`ztm hub --metrics ADDR`, README "Metrics"): what it holds
//! and what it did, in Prometheus' text format. Labels take a few fixed values each (a kind,
//! an outcome, a reason, a status code): never an endpoint, a user or an address, so the number
//! of series stays bounded however large the mesh.
//!
//! Counters are bumped where things happen; what the hub holds anyway (endpoints, the age of
//! the last revocation poll, stalled-tunnel resets) is read when the figures are asked for.

use prometheus::{
    exponential_buckets, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// A connection's kind, by its ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Control,
    Reverse,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Control => "control",
            Kind::Reverse => "reverse",
        }
    }
}

/// How a TLS handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    Ok,
    NoCertificate,
    UnknownCa,
    Revoked,
    Expired,
    Timeout,
    Failed,
}

impl Handshake {
    pub const ALL: [Handshake; 7] = [
        Handshake::Ok,
        Handshake::NoCertificate,
        Handshake::UnknownCa,
        Handshake::Revoked,
        Handshake::Expired,
        Handshake::Timeout,
        Handshake::Failed,
    ];

    fn label(self) -> &'static str {
        match self {
            Handshake::Ok => "ok",
            Handshake::NoCertificate => "no_certificate",
            Handshake::UnknownCa => "unknown_ca",
            Handshake::Revoked => "revoked",
            Handshake::Expired => "expired",
            Handshake::Timeout => "timeout",
            Handshake::Failed => "failed",
        }
    }

    /// The outcome a handshake error stands for: the rustls error inside it, if any.
    pub fn of_error(e: &anyhow::Error) -> Handshake {
        use ztm_pki::rustls::{CertificateError, Error};
        let rustls = e.chain().find_map(|c| {
            c.downcast_ref::<Error>().or_else(|| {
                c.downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .and_then(|inner| inner.downcast_ref::<Error>())
            })
        });
        match rustls {
            Some(Error::NoCertificatesPresented) => Handshake::NoCertificate,
            Some(Error::InvalidCertificate(c)) => match c {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    Handshake::UnknownCa
                }
                CertificateError::Revoked => Handshake::Revoked,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Handshake::Expired
                }
                _ => Handshake::Failed,
            },
            _ => Handshake::Failed,
        }
    }
}

/// Why a tunnel was not opened, from the status its client was answered with, or why an open
/// one ended badly.
pub fn tunnel_failure(status: u16) -> &'static str {
    match status {
        400 => "bad_request",
        403 => "refused",
        404 => "not_found",
        429 | 503 => "busy",
        502 => "unreachable",
        504 => "timeout",
        _ => "rejected",
    }
}

/// Tunnels that failed once open (a reset, a broken connection).
pub const BROKEN: &str = "broken";

/// Which way relayed bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client's agent to the provider's.
    ToProvider,
    /// From the provider's agent back to the client's.
    ToClient,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::ToProvider => "to_provider",
            Direction::ToClient => "to_client",
        }
    }
}

/// The hub's metrics.
pub struct Metrics {
    registry: Registry,
    connections: IntGaugeVec,
    handshaking: IntGauge,
    handshakes: IntCounterVec,
    refused_full: IntCounter,
    endpoints: IntGauge,
    tunnels_opened: IntCounter,
    tunnels_active: IntGauge,
    tunnels_failed: IntCounterVec,
    tunnel_open: Histogram,
    relayed: IntCounterVec,
    stalled_resets: IntCounter,
    revocations: IntCounter,
    ca_poll_age: Gauge,
    management: IntCounterVec,
    dormant: IntGauge,
    control_dormant: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("ztm_hub".into()), None)?;
        let connections = IntGaugeVec::new(
            Opts::new("connections", "Authenticated connections open, by kind"),
            &["kind"],
        )?;
        let handshaking = IntGauge::new(
            "handshaking_connections",
            "Connections accepted whose TLS handshake is not done",
        )?;
        let handshakes = IntCounterVec::new(
            Opts::new(
                "tls_handshakes_total",
                "TLS handshakes finished, by outcome",
            ),
            &["outcome"],
        )?;
        let refused_full = IntCounter::new(
            "connections_refused_full_total",
            "Connections closed at accept because the hub held all its open-file limit allows",
        )?;
        let endpoints = IntGauge::new("endpoints", "Endpoints registered and online")?;
        let tunnels_opened = IntCounter::new("tunnels_opened_total", "Tunnels opened")?;
        let tunnels_active = IntGauge::new("tunnels_active", "Tunnels open now")?;
        let tunnels_failed = IntCounterVec::new(
            Opts::new(
                "tunnels_failed_total",
                "Tunnels refused or not opened, and open tunnels that broke, by reason",
            ),
            &["reason"],
        )?;
        let tunnel_open = Histogram::with_opts(
            HistogramOpts::new(
                "tunnel_open_seconds",
                "Time from a tunnel request to the provider's answer",
            )
            .buckets(exponential_buckets(0.0005, 2.0, 14)?),
        )?;
        let relayed = IntCounterVec::new(
            Opts::new(
                "relayed_bytes_total",
                "Bytes relayed by tunnels that ended, by direction",
            ),
            &["direction"],
        )?;
        let stalled_resets = IntCounter::new(
            "stalled_tunnels_reset_total",
            "Tunnels reset because their reader stopped while the hub held too much",
        )?;
        let revocations = IntCounter::new(
            "revocations_applied_total",
            "Certificate revocations the hub learned from the CA",
        )?;
        let ca_poll_age = Gauge::new(
            "ca_poll_age_seconds",
            "Seconds since the hub last heard from the CA about revocations",
        )?;
        let management = IntCounterVec::new(
            Opts::new(
                "management_requests_total",
                "Management requests forwarded to endpoints, by the status answered",
            ),
            &["status"],
        )?;
        let dormant = IntGauge::new(
            "reverse_connections_dormant",
            "Reverse connections bound whose HTTP/2 the hub has not started: no request needed them yet",
        )?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(dormant.clone()))?;
        let control_dormant = IntGauge::new(
            "control_connections_dormant",
            "Control connections that carry lines: their agent has not started HTTP/2 on them",
        )?;
        registry.register(Box::new(control_dormant.clone()))?;
        registry.register(Box::new(handshaking.clone()))?;
        registry.register(Box::new(handshakes.clone()))?;
        registry.register(Box::new(refused_full.clone()))?;
        registry.register(Box::new(endpoints.clone()))?;
        registry.register(Box::new(tunnels_opened.clone()))?;
        registry.register(Box::new(tunnels_active.clone()))?;
        registry.register(Box::new(tunnels_failed.clone()))?;
        registry.register(Box::new(tunnel_open.clone()))?;
        registry.register(Box::new(relayed.clone()))?;
        registry.register(Box::new(stalled_resets.clone()))?;
        registry.register(Box::new(revocations.clone()))?;
        registry.register(Box::new(ca_poll_age.clone()))?;
        registry.register(Box::new(management.clone()))?;
        // Every series of a fixed label set exists from the start, at zero.
        for kind in [Kind::Control, Kind::Reverse] {
            connections.with_label_values(&[kind.label()]);
        }
        for h in Handshake::ALL {
            handshakes.with_label_values(&[h.label()]);
        }
        for d in [Direction::ToProvider, Direction::ToClient] {
            relayed.with_label_values(&[d.label()]);
        }
        Ok(Metrics {
            registry,
            connections,
            handshaking,
            handshakes,
            refused_full,
            endpoints,
            tunnels_opened,
            tunnels_active,
            tunnels_failed,
            tunnel_open,
            relayed,
            stalled_resets,
            revocations,
            ca_poll_age,
            management,
            dormant,
            control_dormant,
        })
    }

    /// The figures in Prometheus' text format, with `endpoints` online, the last revocation
    /// poll `poll_age` seconds ago and `stalled` tunnel resets so far.
    pub fn render(&self, endpoints: usize, poll_age: f64, stalled: u64) -> String {
        self.endpoints
            .set(i64::try_from(endpoints).unwrap_or(i64::MAX));
        self.ca_poll_age.set(poll_age);
        let seen = self.stalled_resets.get();
        self.stalled_resets.inc_by(stalled.saturating_sub(seen));
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }

    /// A connection is being handshaken until the guard is dropped.
    pub fn handshaking(&self) -> GaugeGuard {
        GaugeGuard::new(self.handshaking.clone())
    }

    pub fn handshake(&self, outcome: Handshake) {
        self.handshakes.with_label_values(&[outcome.label()]).inc();
    }

    pub fn refused_full(&self) {
        self.refused_full.inc();
    }

    /// An authenticated connection of `kind` is open until the guard is dropped.
    pub fn connection(&self, kind: Kind) -> GaugeGuard {
        GaugeGuard::new(self.connections.with_label_values(&[kind.label()]))
    }

    /// A control connection carries lines until the guard is dropped.
    pub fn control_dormant(&self) -> GaugeGuard {
        GaugeGuard::new(self.control_dormant.clone())
    }

    /// A reverse connection is dormant until the guard is dropped.
    pub fn dormant(&self) -> GaugeGuard {
        GaugeGuard::new(self.dormant.clone())
    }

    /// A tunnel was not opened, or broke: the status its client got, or [`BROKEN`].
    pub fn tunnel_failed(&self, reason: &str) {
        self.tunnels_failed.with_label_values(&[reason]).inc();
    }

    /// A tunnel opened after `took` seconds; it counts as active until the guard is dropped.
    pub fn tunnel_opened(&self, took: f64) -> GaugeGuard {
        self.tunnels_opened.inc();
        self.tunnel_open.observe(took);
        GaugeGuard::new(self.tunnels_active.clone())
    }

    /// A tunnel ended having moved these bytes.
    pub fn relayed(&self, to_provider: u64, to_client: u64) {
        self.relayed
            .with_label_values(&[Direction::ToProvider.label()])
            .inc_by(to_provider);
        self.relayed
            .with_label_values(&[Direction::ToClient.label()])
            .inc_by(to_client);
    }

    pub fn revocations(&self, n: u64) {
        self.revocations.inc_by(n);
    }

    pub fn management(&self, status: u16) {
        self.management
            .with_label_values(&[&status.to_string()])
            .inc();
    }
}

/// One more in a gauge while it lives.
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    fn new(gauge: IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_named_by_status() {
        let cases = [
            (400, "bad_request"),
            (403, "refused"),
            (404, "not_found"),
            (429, "busy"),
            (503, "busy"),
            (502, "unreachable"),
            (504, "timeout"),
            (500, "rejected"),
            (418, "rejected"),
        ];
        for (status, reason) in cases {
            assert_eq!(tunnel_failure(status), reason, "{status}");
        }
    }

    #[test]
    fn handshake_errors_are_classified() {
        use ztm_pki::rustls::{CertificateError, Error};
        let cases = [
            (Error::NoCertificatesPresented, Handshake::NoCertificate),
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer),
                Handshake::UnknownCa,
            ),
            (
                Error::InvalidCertificate(CertificateError::Revoked),
                Handshake::Revoked,
            ),
            (
                Error::InvalidCertificate(CertificateError::Expired),
                Handshake::Expired,
            ),
            (Error::DecryptError, Handshake::Failed),
        ];
        for (error, outcome) in cases {
            let direct = anyhow::Error::new(error.clone());
            assert_eq!(Handshake::of_error(&direct), outcome, "{error:?}");
            // As the TLS layer returns it: inside an I/O error, with context on top.
            let io = std::io::Error::new(std::io::ErrorKind::InvalidData, error.clone());
            let wrapped = anyhow::Error::new(io).context("TLS handshake");
            assert_eq!(Handshake::of_error(&wrapped), outcome, "{error:?} in io");
        }
        assert_eq!(
            Handshake::of_error(&anyhow::anyhow!("connection reset")),
            Handshake::Failed
        );
    }

    #[test]
    fn figures_render_in_the_text_format() {
        let m = Metrics::new().unwrap();
        m.handshake(Handshake::Ok);
        m.handshake(Handshake::Revoked);
        let conn = m.connection(Kind::Control);
        {
            let _tunnel = m.tunnel_opened(0.002);
            m.relayed(1000, 24);
        }
        m.tunnel_failed(tunnel_failure(403));
        m.management(200);
        let text = m.render(3, 1.5, 2);
        for line in [
            "ztm_hub_tls_handshakes_total{outcome=\"ok\"} 1",
            "ztm_hub_tls_handshakes_total{outcome=\"revoked\"} 1",
            "ztm_hub_tls_handshakes_total{outcome=\"timeout\"} 0",
            "ztm_hub_connections{kind=\"control\"} 1",
            "ztm_hub_connections{kind=\"reverse\"} 0",
            "ztm_hub_endpoints 3",
            "ztm_hub_tunnels_opened_total 1",
            "ztm_hub_tunnels_active 0",
            "ztm_hub_tunnels_failed_total{reason=\"refused\"} 1",
            "ztm_hub_relayed_bytes_total{direction=\"to_provider\"} 1000",
            "ztm_hub_relayed_bytes_total{direction=\"to_client\"} 24",
            "ztm_hub_tunnel_open_seconds_count 1",
            "ztm_hub_stalled_tunnels_reset_total 2",
            "ztm_hub_ca_poll_age_seconds 1.5",
            "ztm_hub_management_requests_total{status=\"200\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        drop(conn);
        // Stalled resets are read from a running total: rendering again adds nothing.
        let again = m.render(0, 0.25, 2);
        assert!(
            again.contains("ztm_hub_connections{kind=\"control\"} 0"),
            "{again}"
        );
        assert!(
            again.contains("ztm_hub_stalled_tunnels_reset_total 2"),
            "{again}"
        );
        assert!(
            again.contains("ztm_hub_ca_poll_age_seconds 0.25"),
            "{again}"
        );
    }
}
