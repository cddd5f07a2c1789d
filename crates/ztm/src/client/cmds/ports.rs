//! Ports: `get port`, `describe port` (with the port's live figures: tunnels open, opened and
//! failed, bytes each way, the last error), `create port` (map a local port to a service of
//! the mesh) and `delete port` (unmap it).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::Result;
use serde_json::Value;
use ztm_proto::addr::HostPort;
use ztm_proto::model::{Mesh, Port, PortBody, PortStats, PortTarget};

use super::{ep_label, ep_path, listen_text, print_json, Ctx};
use crate::client::api::{decode, enc};
use crate::client::table::{age, time, yes_no, Fields, Table};
use crate::client::{MeshOpt, NewPort, PortRef, ProtoArg, Usage};

/// `get port [--ep ENDPOINT]`: the ports mapped on an endpoint (default: this one).
pub(super) async fn get(ctx: &Ctx, mesh_opt: &MeshOpt, ep: Option<&str>) -> Result<()> {
    let mesh = ctx.mesh(mesh_opt).await?;
    let path = format!("{}/ports", ep_path(&mesh, ep));
    let (ports, raw) = ctx.agent.get_as::<Vec<Port>>(&path).await?;
    if ctx.json() {
        return print_json(&raw);
    }
    if ports.is_empty() {
        errln!("No ports on endpoint {}.", ep_label(&mesh, ep));
        return Ok(());
    }
    out!("{}", table(&ports).render());
    Ok(())
}

/// The ports table (also in `describe ep`), with each port's figures: tunnels open now
/// (ACTIVE), opened (TOTAL) and not opened (FAILED), bytes to the service (TO-SVC) and from
/// it (FROM-SVC), and the last error with its age. `-` where the agent gave no figures.
pub(super) fn table(ports: &[Port]) -> Table {
    let mut t = Table::new(&[
        "LISTEN",
        "PROTO",
        "SERVICE",
        "TARGET-EP",
        "OPEN",
        "ACTIVE",
        "TOTAL",
        "FAILED",
        "TO-SVC",
        "FROM-SVC",
        "ERROR",
        "LAST-ERROR",
    ]);
    for p in ports {
        let mut row = vec![
            listen_text(&p.listen.ip, p.listen.port),
            p.protocol.to_string(),
            p.target.service.clone(),
            p.target
                .endpoint
                .clone()
                .unwrap_or_else(|| "(any)".to_string()),
            yes_no(p.open),
        ];
        row.extend(stats_cells(p.stats.as_ref()));
        row.push(p.error.clone().unwrap_or_default());
        row.push(
            p.stats
                .as_ref()
                .and_then(|s| s.last_error.as_ref())
                .map(|e| format!("{} ({} ago)", e.message, age(e.time)))
                .unwrap_or_default(),
        );
        t.row(row);
    }
    t
}

/// The figures' cells of a ports table row: ACTIVE, TOTAL, FAILED, TO-SVC, FROM-SVC.
pub(super) fn stats_cells(stats: Option<&PortStats>) -> Vec<String> {
    match stats {
        Some(s) => vec![
            s.active.to_string(),
            s.total.to_string(),
            s.failed.to_string(),
            bytes(s.bytes_to_service),
            bytes(s.bytes_from_service),
        ],
        None => vec!["-".to_string(); 5],
    }
}

/// A byte count for a table, in one word: `512B`, `1.5KiB`, `12.3MiB`, `800GiB` (units of
/// 1024; one decimal below 100).
pub(super) fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    // Rounded as shown, a value must stay below 1024 of its unit.
    while value >= 1023.5 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value < 99.95 {
        format!("{value:.1}{}", UNITS[unit])
    } else {
        format!("{value:.0}{}", UNITS[unit])
    }
}

/// `describe port [IP:]PORT`: the mapping, where its connections go, and whether it is open.
pub(super) async fn describe(ctx: &Ctx, mesh_opt: &MeshOpt, port: &PortRef) -> Result<()> {
    let (ip, number) = parse_listen(&port.listen)?;
    let mesh = ctx.mesh(mesh_opt).await?;
    let ep = port.ep.as_deref();
    let path = port_path(&mesh, ep, ip, port.proto, number);
    let (p, raw) = ctx.agent.get_as::<Port>(&path).await?;
    if ctx.json() {
        return print_json(&raw);
    }
    let mut f = Fields::new();
    f.add("Listen", listen_text(&p.listen.ip, p.listen.port));
    f.add("Protocol", p.protocol.to_string());
    f.add("Endpoint", ep_label(&mesh, ep));
    f.add("Service", &p.target.service);
    f.add(
        "Target endpoint",
        match (&p.target.endpoint, &p.target.user) {
            (Some(ep), Some(user)) => format!("{ep} (user {user})"),
            (Some(ep), None) => ep.clone(),
            (None, _) => match &p.target.trust {
                Some(users) => format!("(any provider of {})", users.join(", ")),
                None => "(any provider of this user or root)".to_string(),
            },
        },
    );
    f.add("Open", yes_no(p.open));
    f.add("Error", p.error.clone().unwrap_or_else(|| "-".to_string()));
    if let Some(s) = &p.stats {
        f.add("Tunnels open", s.active.to_string());
        f.add("Tunnels opened", s.total.to_string());
        f.add("Tunnels failed", s.failed.to_string());
        f.add(
            "To the service",
            format!(
                "{} ({} bytes)",
                bytes(s.bytes_to_service),
                s.bytes_to_service
            ),
        );
        f.add(
            "From the service",
            format!(
                "{} ({} bytes)",
                bytes(s.bytes_from_service),
                s.bytes_from_service
            ),
        );
        f.add(
            "Last error",
            s.last_error
                .as_ref()
                .map(|e| format!("{} UTC: {}", time(e.time), e.message))
                .unwrap_or_else(|| "-".to_string()),
        );
    }
    out!("{}", f.render());
    Ok(())
}

/// `create port [IP:]PORT --service NAME`: maps the port to the service, on one provider
/// (`--target-ep`) or any provider of the users trusted.
pub(super) async fn create(ctx: &Ctx, mesh_opt: &MeshOpt, new: NewPort) -> Result<()> {
    let (ip, number) = parse_listen(&new.listen)?;
    let mesh = ctx.mesh(mesh_opt).await?;
    let proto = new.proto;
    // `--service tcp/NAME` is accepted when the protocol matches.
    let service = match new.service.split_once('/') {
        Some((p, n)) if p == proto.as_str() => n.to_string(),
        Some(_) => {
            return Err(Usage(format!(
                "--service {:?}: give the service name; its protocol is --proto ({})",
                new.service,
                proto.as_str()
            ))
            .into())
        }
        None => new.service,
    };
    let ep = new.ep.as_deref();
    let path = port_path(&mesh, ep, ip, proto, number);
    let body = port_body(&service, new.target_ep.as_deref(), new.trust);
    let answer = ctx.agent.post(&path, &body).await?;
    if ctx.json() {
        return print_json(&answer.unwrap_or(Value::Null));
    }
    let port: Option<Port> = answer.as_ref().and_then(|v| decode(v, &path).ok());
    let shown = port
        .as_ref()
        .map(|p| listen_text(&p.listen.ip, p.listen.port))
        .unwrap_or(new.listen);
    outln!(
        "port {}/{shown} -> service {service}{} created on endpoint {}",
        proto.as_str(),
        new.target_ep
            .as_deref()
            .map(|t| format!(" at {t}"))
            .unwrap_or_default(),
        ep_label(&mesh, ep)
    );
    if let Some(err) = port.and_then(|p| p.error) {
        errln!("ztm: warning: the port is not open yet: {err}");
    }
    Ok(())
}

/// What `create port` asks the agent for: the service, on one endpoint or on any provider of
/// the users trusted (none given: the agent's default).
fn port_body(service: &str, endpoint: Option<&str>, trust: Vec<String>) -> PortBody {
    PortBody {
        target: PortTarget {
            service: service.to_string(),
            endpoint: endpoint.map(str::to_string),
            // The agent pins the endpoint's user itself.
            user: None,
            trust: (!trust.is_empty()).then_some(trust),
        },
    }
}

/// `delete port [IP:]PORT`: unmaps the port.
pub(super) async fn delete(ctx: &Ctx, mesh_opt: &MeshOpt, port: &PortRef) -> Result<()> {
    let (ip, number) = parse_listen(&port.listen)?;
    let mesh = ctx.mesh(mesh_opt).await?;
    let ep = port.ep.as_deref();
    ctx.agent
        .delete(&port_path(&mesh, ep, ip, port.proto, number))
        .await?;
    if !ctx.json() {
        outln!(
            "port {}/{} deleted from endpoint {}",
            port.proto.as_str(),
            listen_text(&ip.to_string(), number),
            ep_label(&mesh, ep)
        );
    }
    Ok(())
}

/// The path of port `ip:port` (`proto`) on endpoint `ep` (default: the local one).
fn port_path(mesh: &Mesh, ep: Option<&str>, ip: IpAddr, proto: ProtoArg, port: u16) -> String {
    format!(
        "{}/ports/{}/{}/{port}",
        ep_path(mesh, ep),
        enc(&ip.to_string()),
        proto.as_str()
    )
}

/// `[IP:]PORT` → (ip, port); IP defaults to 127.0.0.1.
pub(super) fn parse_listen(s: &str) -> Result<(IpAddr, u16)> {
    let bad = || {
        Usage(format!(
            "bad port {s:?}: expected [IP:]PORT, e.g. 2222 or 0.0.0.0:2222"
        ))
    };
    let (ip, port) = if let Ok(port) = s.parse::<u16>() {
        (IpAddr::V4(Ipv4Addr::LOCALHOST), port)
    } else if let Ok(sa) = s.parse::<SocketAddr>() {
        (sa.ip(), sa.port())
    } else {
        let at = HostPort::parse(s).map_err(|_| bad())?;
        (at.host.parse::<IpAddr>().map_err(|_| bad())?, at.port)
    };
    if port == 0 {
        return Err(bad().into());
    }
    Ok((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_in_one_word() {
        let cases = [
            (0, "0B"),
            (1023, "1023B"),
            (1024, "1.0KiB"),
            (1536, "1.5KiB"),
            (102_348, "99.9KiB"),
            (102_400, "100KiB"),
            (1_047_552, "1023KiB"),
            // 1023.5 KiB would show as 1024KiB: the next unit instead.
            (1_048_064, "1.0MiB"),
            (4 << 20, "4.0MiB"),
            (5 << 30, "5.0GiB"),
            (800 << 30, "800GiB"),
            (u64::MAX, "16.0EiB"),
        ];
        for (n, shown) in cases {
            assert_eq!(bytes(n), shown, "{n}");
        }
    }

    #[test]
    fn figures_in_the_table() {
        let port = |stats: Option<PortStats>| Port {
            protocol: ztm_proto::wire::Proto::Tcp,
            listen: ztm_proto::model::Listen {
                ip: "127.0.0.1".into(),
                port: 2222,
            },
            target: PortTarget {
                service: "ssh".into(),
                endpoint: None,
                user: None,
                trust: None,
            },
            open: true,
            error: None,
            stats,
        };
        let stats = PortStats {
            active: 2,
            total: 17,
            failed: 3,
            bytes_to_service: 1536,
            bytes_from_service: 4 << 20,
            last_error: Some(ztm_proto::model::TimedMessage::new(
                crate::client::table::now_ms() - 5_500,
                "no answer",
            )),
        };
        let out = table(&[port(Some(stats)), port(None)]).render();
        let lines: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0][5..10],
            ["ACTIVE", "TOTAL", "FAILED", "TO-SVC", "FROM-SVC"]
        );
        assert_eq!(lines[1][5..10], ["2", "17", "3", "1.5KiB", "4.0MiB"]);
        let first = out.lines().nth(1).unwrap_or_default();
        assert!(
            first.contains("   no answer (") && first.ends_with("s ago)"),
            "{out}"
        );
        // An agent that gives no figures: dashes.
        assert_eq!(lines[2][5..10], ["-"; 5]);
    }

    #[test]
    fn listens() {
        let l = |s: &str| parse_listen(s).ok().map(|(ip, p)| (ip.to_string(), p));
        assert_eq!(l("2222"), Some(("127.0.0.1".into(), 2222)));
        assert_eq!(l("0.0.0.0:80"), Some(("0.0.0.0".into(), 80)));
        assert_eq!(l("[::1]:80"), Some(("::1".into(), 80)));
        assert_eq!(l("::1:80"), Some(("::1".into(), 80)));
        assert_eq!(l("0"), None);
        assert_eq!(l("x:1"), None);
    }

    /// The body is what the agent reads, and leaves out what is not given.
    #[test]
    fn bodies() {
        let json = |b: &PortBody| serde_json::to_value(b).ok();
        assert_eq!(
            json(&port_body("ssh", Some("home-pc"), Vec::new())),
            Some(serde_json::json!({"target": {"service": "ssh", "endpoint": "home-pc"}}))
        );
        assert_eq!(
            json(&port_body("dns", None, Vec::new())),
            Some(serde_json::json!({"target": {"service": "dns"}}))
        );
        let b = port_body("web", None, vec!["alice".into(), "*".into()]);
        assert_eq!(
            json(&b),
            Some(serde_json::json!({"target": {"service": "web", "trust": ["alice", "*"]}}))
        );
        let sent = serde_json::to_vec(&b).unwrap_or_default();
        assert_eq!(serde_json::from_slice::<PortBody>(&sent).ok(), Some(b));
    }
}
