//! Ports: `get port`, `describe port`, `create port` (map a local port to a service of the
//! mesh) and `delete port` (unmap it).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::Result;
use serde_json::Value;
use ztm_proto::addr::HostPort;
use ztm_proto::model::{Mesh, Port, PortBody, PortTarget};

use super::{ep_label, ep_path, listen_text, print_json, Ctx};
use crate::client::api::{decode, enc};
use crate::client::table::{yes_no, Fields, Table};
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

/// The ports table (also in `describe ep`).
pub(super) fn table(ports: &[Port]) -> Table {
    let mut t = Table::new(&["LISTEN", "PROTO", "SERVICE", "TARGET-EP", "OPEN", "ERROR"]);
    for p in ports {
        t.row(vec![
            listen_text(&p.listen.ip, p.listen.port),
            p.protocol.to_string(),
            p.target.service.clone(),
            p.target
                .endpoint
                .clone()
                .unwrap_or_else(|| "(any)".to_string()),
            yes_no(p.open),
            p.error.clone().unwrap_or_default(),
        ]);
    }
    t
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
fn parse_listen(s: &str) -> Result<(IpAddr, u16)> {
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
