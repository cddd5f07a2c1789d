//! `ztm status`: whether this computer is fine, on one screen — the agent, each mesh's
//! connection to its hubs (with the round-trip time to each), certificate expiry, and each
//! port with whether its service has a provider online. The exit status says whether anything
//! needs attention (0: all is well; 1: something does, or the agent does not answer), for
//! scripts and monitors.

use anyhow::{anyhow, Result};
use serde_json::json;
use ztm_proto::model::{Mesh, Port, Service};

use super::{ep_path, listen_text, mesh_path, print_json, Ctx};
use crate::client::api::enc;
use crate::client::table::{clean, now_ms, rtt, yes_no, Table};

/// What one mesh looks like from here: the mesh, its ports, and for each port the service it
/// maps to as the agent finds it now (`None`: no provider online).
pub(super) struct MeshState {
    pub mesh: Mesh,
    pub ports: Vec<(Port, Option<Service>)>,
}

/// Something that needs attention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Problem {
    /// The agent reaches none of the mesh's hubs.
    NotConnected { mesh: String },
    /// The agent's certificate for the mesh has expired.
    Expired { mesh: String },
    /// A port does not listen.
    PortClosed {
        mesh: String,
        port: String,
        why: String,
    },
    /// A port listens, but no provider of its service (or not the one it names) is online.
    NoProvider {
        mesh: String,
        port: String,
        service: String,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::NotConnected { mesh } => {
                write!(f, "mesh {mesh}: not connected to any of its hubs")
            }
            Problem::Expired { mesh } => {
                write!(f, "mesh {mesh}: this agent's certificate has expired")
            }
            Problem::PortClosed { mesh, port, why } => {
                write!(f, "mesh {mesh}: port {port} is not open: {why}")
            }
            Problem::NoProvider {
                mesh,
                port,
                service,
            } => write!(
                f,
                "mesh {mesh}: port {port}: no provider of {service} is online"
            ),
        }
    }
}

fn port_name(p: &Port) -> String {
    format!(
        "{}/{}",
        listen_text(&p.listen.ip, p.listen.port),
        p.protocol.as_str()
    )
}

/// Whether the service as found now can take the port's tunnels: a provider is online, and
/// it is the one the port names, if it names one.
fn served(port: &Port, service: Option<&Service>) -> bool {
    let Some(service) = service else {
        return false;
    };
    match &port.target.endpoint {
        None => !service.endpoints.is_empty(),
        Some(ep) => service
            .endpoints
            .iter()
            .any(|e| &e.id == ep || &e.name == ep),
    }
}

/// Everything that needs attention in `meshes` at `now` (ms since the epoch). Pure.
pub(super) fn problems(meshes: &[MeshState], now: u64) -> Vec<Problem> {
    let mut out = Vec::new();
    for m in meshes {
        let mesh = m.mesh.name.clone();
        if !m.mesh.connected {
            out.push(Problem::NotConnected { mesh: mesh.clone() });
        }
        if m.mesh.agent.expires != 0 && m.mesh.agent.expires <= now {
            out.push(Problem::Expired { mesh: mesh.clone() });
        }
        for (port, service) in &m.ports {
            if !port.open {
                out.push(Problem::PortClosed {
                    mesh: mesh.clone(),
                    port: port_name(port),
                    why: port.error.clone().unwrap_or_else(|| "not listening".into()),
                });
            } else if m.mesh.connected && !served(port, service.as_ref()) {
                out.push(Problem::NoProvider {
                    mesh: mesh.clone(),
                    port: port_name(port),
                    service: format!("{}/{}", port.protocol.as_str(), port.target.service),
                });
            }
        }
    }
    out
}

/// `ztm status`.
pub(super) async fn status(ctx: &Ctx) -> Result<()> {
    let meshes = match ctx.agent.get_as::<Vec<Mesh>>("/api/meshes").await {
        Ok((meshes, _)) => meshes,
        Err(e) => {
            if ctx.json() {
                print_json(
                    &json!({"healthy": false, "agent": ctx.agent.addr, "problems": [format!("{e:#}")]}),
                )?;
            } else {
                outln!("Agent   {}   not answering", ctx.agent.addr);
            }
            return Err(e);
        }
    };
    let mut states = Vec::new();
    for mesh in meshes {
        let (ports, _) = ctx
            .agent
            .get_as::<Vec<Port>>(&format!("{}/ports", ep_path(&mesh, None)))
            .await?;
        let mut with_services = Vec::new();
        for port in ports {
            let path = format!(
                "{}/services/{}/{}",
                mesh_path(&mesh.name),
                port.protocol.as_str(),
                enc(&port.target.service)
            );
            // A 404 (no provider anywhere) is an answer here, not a failure.
            let service = ctx
                .agent
                .get_as::<Service>(&path)
                .await
                .ok()
                .map(|(s, _)| s);
            with_services.push((port, service));
        }
        states.push(MeshState {
            mesh,
            ports: with_services,
        });
    }
    let found = problems(&states, now_ms());
    if ctx.json() {
        print_json(&json!({
            "healthy": found.is_empty(),
            "agent": ctx.agent.addr,
            "problems": found.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }))?;
    } else {
        render(ctx, &states, &found);
    }
    if found.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(
            "{} thing{} need{} attention",
            found.len(),
            if found.len() == 1 { "" } else { "s" },
            if found.len() == 1 { "s" } else { "" }
        ))
    }
}

fn render(ctx: &Ctx, states: &[MeshState], found: &[Problem]) {
    outln!("Agent   {}   up", ctx.agent.addr);
    if states.is_empty() {
        outln!("No mesh joined (see `ztm join --help`).");
        return;
    }
    let mut t = Table::new(&["MESH", "CONNECTED", "HUBS UP", "CERT EXPIRES", "PORTS OK"]);
    for s in states {
        let ok = s
            .ports
            .iter()
            .filter(|(p, svc)| p.open && served(p, svc.as_ref()))
            .count();
        let hubs = &s.mesh.hubs;
        t.row(vec![
            s.mesh.name.clone(),
            yes_no(s.mesh.connected),
            if hubs.is_empty() {
                // An agent that does not say how each hub is: its list.
                s.mesh.bootstraps.join(",")
            } else {
                format!(
                    "{}/{}",
                    hubs.iter().filter(|h| h.connected).count(),
                    hubs.len()
                )
            },
            match s.mesh.agent.expires {
                0 => "-".to_string(),
                ms => ztm_net::date(ms),
            },
            format!("{ok}/{}", s.ports.len()),
        ]);
    }
    out!("{}", t.render());
    let mut hubs = Table::new(&["HUB", "MESH", "CONNECTED", "RTT"]);
    for s in states {
        for h in &s.mesh.hubs {
            hubs.row(vec![
                h.address.clone(),
                s.mesh.name.clone(),
                yes_no(h.connected),
                rtt(h.rtt_ms),
            ]);
        }
    }
    if !hubs.is_empty() {
        out!("{}", hubs.render());
    }
    for s in states {
        for w in &s.mesh.warnings {
            outln!("Warning: mesh {}: {}", s.mesh.name, clean(&w.message));
        }
    }
    if found.is_empty() {
        outln!("All is well.");
    } else {
        outln!("Needs attention:");
        for p in found {
            outln!("  {}", clean(&p.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztm_proto::model::{EndpointRef, Listen, MeshAgent, PortTarget};
    use ztm_proto::wire::Proto;

    fn mesh(name: &str, connected: bool, expires: u64) -> Mesh {
        Mesh {
            name: name.into(),
            ca: String::new(),
            agent: MeshAgent {
                id: "me".into(),
                name: "mine".into(),
                username: "alice".into(),
                certificate: String::new(),
                expires,
            },
            bootstraps: vec!["hub:8888".into()],
            connected,
            errors: vec![],
            ca_expires: 0,
            warnings: vec![],
            hubs: vec![],
        }
    }

    fn port(n: u16, open: bool, service: &str, endpoint: Option<&str>) -> Port {
        Port {
            protocol: Proto::Tcp,
            listen: Listen {
                ip: "127.0.0.1".into(),
                port: n,
            },
            target: PortTarget {
                service: service.into(),
                endpoint: endpoint.map(Into::into),
                user: None,
                trust: None,
            },
            open,
            error: (!open).then(|| "address in use".to_string()),
            stats: None,
        }
    }

    fn provided_by(names: &[&str]) -> Option<Service> {
        Some(Service {
            name: "s".into(),
            protocol: Proto::Tcp,
            endpoints: names
                .iter()
                .map(|n| EndpointRef {
                    id: format!("id-{n}"),
                    name: n.to_string(),
                    username: "u".into(),
                    users: None,
                })
                .collect(),
            is_discovered: true,
            is_local: false,
            host: None,
            port: None,
            users: None,
        })
    }

    #[test]
    fn what_needs_attention() {
        let now = 1_000_000;
        let cases: Vec<(&str, MeshState, Vec<&str>)> = vec![
            (
                "all well",
                MeshState {
                    mesh: mesh("m", true, now + 1),
                    ports: vec![(port(1, true, "ssh", None), provided_by(&["b"]))],
                },
                vec![],
            ),
            (
                "no hub, expired, and a port that does not listen",
                MeshState {
                    mesh: mesh("m", false, now),
                    ports: vec![(port(2, false, "ssh", None), None)],
                },
                vec![
                    "mesh m: not connected to any of its hubs",
                    "mesh m: this agent's certificate has expired",
                    "mesh m: port 127.0.0.1:2/tcp is not open: address in use",
                ],
            ),
            (
                "no provider, or not the one named",
                MeshState {
                    mesh: mesh("m", true, 0),
                    ports: vec![
                        (port(3, true, "web", None), None),
                        (port(4, true, "web", None), provided_by(&[])),
                        (port(5, true, "web", Some("c")), provided_by(&["b"])),
                        (port(6, true, "web", Some("id-b")), provided_by(&["b"])),
                        (port(7, true, "web", Some("b")), provided_by(&["b"])),
                    ],
                },
                vec![
                    "mesh m: port 127.0.0.1:3/tcp: no provider of tcp/web is online",
                    "mesh m: port 127.0.0.1:4/tcp: no provider of tcp/web is online",
                    "mesh m: port 127.0.0.1:5/tcp: no provider of tcp/web is online",
                ],
            ),
            (
                "without hubs, providers are not asked about",
                MeshState {
                    mesh: mesh("m", false, 0),
                    ports: vec![(port(8, true, "web", None), None)],
                },
                vec!["mesh m: not connected to any of its hubs"],
            ),
        ];
        for (what, state, want) in cases {
            let got: Vec<String> = problems(&[state], now)
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(got, want, "{what}");
        }
    }
}
