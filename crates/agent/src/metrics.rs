//! The agent's figures for Prometheus (`GET /metrics` on its API, README "Metrics"): hubs
//! connected per mesh, ports open, and the tunnels of its ports and of its services — open now,
//! opened, failed, bytes each way, time to open — in Prometheus' text format.
//!
//! The one label an operator's data fills is the mesh's name (an agent joins a few meshes, named
//! by whoever joins them); every other label takes a few fixed values. Never an endpoint, a
//! user, an address or a port: one port's figures are in the REST API ([`crate::figures`]).
//!
//! Tunnel counts are bumped where tunnels open and fail; bytes are added by the relays as they
//! move them (plain atomics, see `ztm_relay::Meter`) and read when the figures are asked for,
//! as is what the agent holds (hubs, ports).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Which end of its tunnels the agent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Tunnels from this agent's mapped ports to services elsewhere.
    Port,
    /// Tunnels from elsewhere to this agent's services.
    Service,
}

impl Side {
    const ALL: [Side; 2] = [Side::Port, Side::Service];

    fn label(self) -> &'static str {
        match self {
            Side::Port => "port",
            Side::Service => "service",
        }
    }
}

/// The running totals of one side's tunnels.
pub struct Tunnels {
    active: IntGauge,
    opened: IntCounter,
    failed: IntCounter,
    open_seconds: Histogram,
    /// Bytes towards the service, added by the relays as they move them.
    pub to_service: AtomicU64,
    /// Bytes from the service, likewise.
    pub from_service: AtomicU64,
}

impl Tunnels {
    /// A tunnel opened after `took`; it counts as active until the guard is dropped.
    pub fn opened(&self, took: Duration) -> OpenTunnel {
        self.opened.inc();
        self.open_seconds.observe(took.as_secs_f64());
        self.active.inc();
        OpenTunnel(self.active.clone())
    }

    /// A tunnel could not be opened.
    pub fn failed(&self) {
        self.failed.inc();
    }
}

/// One more tunnel active while it lives.
pub struct OpenTunnel(IntGauge);

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What a mesh's links are doing when the figures are asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshHubs {
    pub mesh: String,
    /// Hubs configured.
    pub hubs: usize,
    /// Hubs with a registered control connection.
    pub connected: usize,
}

/// What the agent holds when the figures are asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub meshes: Vec<MeshHubs>,
    /// Port listeners open, over every mesh.
    pub ports_open: usize,
    /// Open files connections hold now, and how many they may (`crate::files`).
    pub connection_files: usize,
    pub connection_files_budget: usize,
    /// Connections refused so far for want of a file.
    pub connections_refused: u64,
}

/// Which way tunnel bytes went, as a label.
const TO_SERVICE: &str = "to_service";
const FROM_SERVICE: &str = "from_service";

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    /// Tunnels of the mapped ports.
    pub port: Tunnels,
    /// Tunnels to the local services.
    pub service: Tunnels,
    bytes: IntCounterVec,
    hubs: IntGaugeVec,
    hubs_connected: IntGaugeVec,
    ports_open: IntGauge,
    connection_files: IntGauge,
    connection_files_budget: IntGauge,
    connections_refused: IntCounter,
    /// One rendering at a time: byte counters are brought up to the relays' totals by adding
    /// the difference, which two renderings at once would add twice.
    rendering: Mutex<()>,
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("ztm_agent".into()), None)?;
        let hubs = IntGaugeVec::new(Opts::new("hubs", "Hubs configured, by mesh"), &["mesh"])?;
        let hubs_connected = IntGaugeVec::new(
            Opts::new(
                "hubs_connected",
                "Hubs this agent is registered with, by mesh",
            ),
            &["mesh"],
        )?;
        let ports_open = IntGauge::new("ports_open", "Mapped ports listening")?;
        let connection_files = IntGauge::new(
            "connection_files",
            "Open files held by connections: port and proxy clients, and what tunnels connect to",
        )?;
        let connection_files_budget = IntGauge::new(
            "connection_files_limit",
            "Open files connections may hold: the open-file limit less the agent's own reserve",
        )?;
        let connections_refused = IntCounter::new(
            "connections_refused_total",
            "Connections refused at once because connections held all the files they may, or \
             one user's tunnels its share of them",
        )?;
        let active = IntGaugeVec::new(
            Opts::new("tunnels_active", "Tunnels open now, by side"),
            &["side"],
        )?;
        let opened = IntCounterVec::new(
            Opts::new("tunnels_opened_total", "Tunnels opened, by side"),
            &["side"],
        )?;
        let failed = IntCounterVec::new(
            Opts::new(
                "tunnels_failed_total",
                "Tunnels that could not be opened (refused, unreachable, timed out), by side",
            ),
            &["side"],
        )?;
        let open_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tunnel_open_seconds",
                "Time to open a tunnel, by side: from a port's new connection to the provider's \
                 answer, or from a tunnel's request to its service accepting",
            )
            .buckets(exponential_buckets(0.0005, 2.0, 15)?),
            &["side"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "tunnel_bytes_total",
                "Bytes tunnels moved, counted as they move, by side and direction",
            ),
            &["side", "direction"],
        )?;
        registry.register(Box::new(hubs.clone()))?;
        registry.register(Box::new(hubs_connected.clone()))?;
        registry.register(Box::new(ports_open.clone()))?;
        registry.register(Box::new(connection_files.clone()))?;
        registry.register(Box::new(connection_files_budget.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        registry.register(Box::new(active.clone()))?;
        registry.register(Box::new(opened.clone()))?;
        registry.register(Box::new(failed.clone()))?;
        registry.register(Box::new(open_seconds.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        // Every series of a fixed label set exists from the start, at zero.
        let side = |s: Side| -> Result<Tunnels, prometheus::Error> {
            let l = [s.label()];
            for direction in [TO_SERVICE, FROM_SERVICE] {
                bytes.get_metric_with_label_values(&[s.label(), direction])?;
            }
            Ok(Tunnels {
                active: active.get_metric_with_label_values(&l)?,
                opened: opened.get_metric_with_label_values(&l)?,
                failed: failed.get_metric_with_label_values(&l)?,
                open_seconds: open_seconds.get_metric_with_label_values(&l)?,
                to_service: AtomicU64::new(0),
                from_service: AtomicU64::new(0),
            })
        };
        Ok(Metrics {
            port: side(Side::Port)?,
            service: side(Side::Service)?,
            registry,
            bytes,
            hubs,
            hubs_connected,
            ports_open,
            connection_files,
            connection_files_budget,
            connections_refused,
            rendering: Mutex::new(()),
        })
    }

    pub fn side(&self, side: Side) -> &Tunnels {
        match side {
            Side::Port => &self.port,
            Side::Service => &self.service,
        }
    }

    /// The figures in Prometheus' text format, with what the agent holds now.
    pub fn render(&self, held: &Held) -> String {
        let _one = self.rendering.lock();
        // Meshes left since the last rendering disappear.
        self.hubs.reset();
        self.hubs_connected.reset();
        for m in &held.meshes {
            self.hubs.with_label_values(&[&m.mesh]).set(to_i64(m.hubs));
            self.hubs_connected
                .with_label_values(&[&m.mesh])
                .set(to_i64(m.connected));
        }
        self.ports_open.set(to_i64(held.ports_open));
        self.connection_files.set(to_i64(held.connection_files));
        self.connection_files_budget
            .set(to_i64(held.connection_files_budget));
        let refused = &self.connections_refused;
        refused.inc_by(held.connections_refused.saturating_sub(refused.get()));
        for side in Side::ALL {
            let t = self.side(side);
            for (direction, total) in [(TO_SERVICE, &t.to_service), (FROM_SERVICE, &t.from_service)]
            {
                let counter = self.bytes.with_label_values(&[side.label(), direction]);
                let now = total.load(Ordering::Relaxed);
                counter.inc_by(now.saturating_sub(counter.get()));
            }
        }
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    fn has(text: &str, line: &str) {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }

    #[test]
    fn figures_render_in_the_text_format() {
        let m = Metrics::new().unwrap();
        let open = m.port.opened(Duration::from_millis(3));
        m.port.to_service.fetch_add(1000, Ordering::Relaxed);
        m.port.from_service.fetch_add(24, Ordering::Relaxed);
        m.port.failed();
        {
            let _served = m.service.opened(Duration::from_millis(1));
            m.service.to_service.fetch_add(7, Ordering::Relaxed);
        }
        let held = Held {
            meshes: vec![
                MeshHubs {
                    mesh: "home".into(),
                    hubs: 2,
                    connected: 1,
                },
                MeshHubs {
                    mesh: "work".into(),
                    hubs: 1,
                    connected: 0,
                },
            ],
            ports_open: 3,
            connection_files: 5,
            connection_files_budget: 896,
            connections_refused: 2,
        };
        let text = m.render(&held);
        for line in [
            "ztm_agent_hubs{mesh=\"home\"} 2",
            "ztm_agent_hubs_connected{mesh=\"home\"} 1",
            "ztm_agent_hubs_connected{mesh=\"work\"} 0",
            "ztm_agent_ports_open 3",
            "ztm_agent_connection_files 5",
            "ztm_agent_connection_files_limit 896",
            "ztm_agent_connections_refused_total 2",
            "ztm_agent_tunnels_active{side=\"port\"} 1",
            "ztm_agent_tunnels_active{side=\"service\"} 0",
            "ztm_agent_tunnels_opened_total{side=\"port\"} 1",
            "ztm_agent_tunnels_opened_total{side=\"service\"} 1",
            "ztm_agent_tunnels_failed_total{side=\"port\"} 1",
            "ztm_agent_tunnels_failed_total{side=\"service\"} 0",
            "ztm_agent_tunnel_bytes_total{direction=\"to_service\",side=\"port\"} 1000",
            "ztm_agent_tunnel_bytes_total{direction=\"from_service\",side=\"port\"} 24",
            "ztm_agent_tunnel_bytes_total{direction=\"to_service\",side=\"service\"} 7",
            "ztm_agent_tunnel_bytes_total{direction=\"from_service\",side=\"service\"} 0",
            "ztm_agent_tunnel_open_seconds_count{side=\"port\"} 1",
            "ztm_agent_tunnel_open_seconds_bucket{side=\"port\",le=\"0.004\"} 1",
            "ztm_agent_tunnel_open_seconds_bucket{side=\"port\",le=\"0.002\"} 0",
        ] {
            has(&text, line);
        }

        // Rendering again adds no bytes twice; a tunnel closed and a mesh left show.
        drop(open);
        m.port.to_service.fetch_add(1, Ordering::Relaxed);
        let again = m.render(&Held {
            meshes: held.meshes[..1].to_vec(),
            ports_open: 2,
            connections_refused: 7,
            ..held.clone()
        });
        has(
            &again,
            "ztm_agent_tunnel_bytes_total{direction=\"to_service\",side=\"port\"} 1001",
        );
        has(&again, "ztm_agent_tunnels_active{side=\"port\"} 0");
        has(&again, "ztm_agent_ports_open 2");
        has(&again, "ztm_agent_connections_refused_total 7");
        assert!(!again.contains("work"), "{again}");
    }

    #[test]
    fn labels_hold_only_mesh_names_and_fixed_values() {
        let m = Metrics::new().unwrap();
        let held = Held {
            meshes: vec![MeshHubs {
                mesh: "home".into(),
                hubs: 1,
                connected: 1,
            }],
            ports_open: 1,
            ..Held::default()
        };
        let text = m.render(&held);
        for line in lines(&text) {
            let Some((_, labels)) = line.split_once('{') else {
                continue;
            };
            let labels = labels.split('}').next().unwrap_or_default();
            for pair in labels.split(',') {
                let (k, v) = pair.split_once('=').unwrap();
                let v = v.trim_matches('"');
                let fixed: &[&str] = match k {
                    "mesh" => &["home"],
                    "side" => &["port", "service"],
                    "direction" => &[TO_SERVICE, FROM_SERVICE],
                    "le" => continue,
                    other => panic!("label {other} in {line}"),
                };
                assert!(fixed.contains(&v), "{line}");
            }
        }
    }
}
