//! Services: `get svc`, `describe svc`, `create svc` (publish) and `delete svc` (withdraw).

use anyhow::Result;
use serde_json::Value;
use ztm_proto::model::{Mesh, Service, ServiceBody};

use super::{ep_label, ep_path, listen_text, mesh_path, print_json, Ctx};
use crate::client::api::enc;
use crate::client::table::{yes_no, Fields, Table};
use crate::client::{MeshOpt, NewService, ServiceRef, Usage};

/// `get svc [--ep ENDPOINT]`: the services of the mesh, or those one endpoint provides.
pub(super) async fn get(ctx: &Ctx, mesh_opt: &MeshOpt, ep: Option<&str>) -> Result<()> {
    let mesh = ctx.mesh(mesh_opt).await?;
    let path = match ep {
        Some(_) => format!("{}/services", ep_path(&mesh, ep)),
        None => format!("{}/services", mesh_path(&mesh.name)),
    };
    let (svcs, raw) = ctx.agent.get_as::<Vec<Service>>(&path).await?;
    if ctx.json() {
        return print_json(&raw);
    }
    if svcs.is_empty() {
        match ep {
            Some(_) => errln!("No services on endpoint {}.", ep_label(&mesh, ep)),
            None => errln!("No services in mesh {}.", mesh.name),
        }
        return Ok(());
    }
    out!("{}", table(&svcs).render());
    Ok(())
}

/// The services table (also in `describe ep`).
pub(super) fn table(svcs: &[Service]) -> Table {
    let mut t = Table::new(&["NAME", "ENDPOINTS", "LOCAL", "TARGET", "USERS"]);
    for s in svcs {
        t.row(vec![
            format!("{}/{}", s.protocol, s.name),
            endpoint_names(s),
            yes_no(s.is_local),
            target_text(s),
            service_users_text(s),
        ]);
    }
    t
}

/// `describe svc [PROTO/]NAME`: the service and the endpoints providing it.
pub(super) async fn describe(ctx: &Ctx, mesh_opt: &MeshOpt, name: &str) -> Result<()> {
    let (proto, name) = parse_service(name)?;
    let mesh = ctx.mesh(mesh_opt).await?;
    let path = format!("{}/services/{proto}/{}", mesh_path(&mesh.name), enc(&name));
    let (s, raw) = ctx.agent.get_as::<Service>(&path).await?;
    if ctx.json() {
        return print_json(&raw);
    }
    let mut f = Fields::new();
    f.add("Name", format!("{}/{}", s.protocol, s.name));
    f.add("Mesh", &mesh.name);
    f.add("Provided here", yes_no(s.is_local));
    if s.is_local {
        f.add("Target", target_text(&s));
    }
    f.add("Users", service_users_text(&s));
    if s.endpoints.is_empty() {
        f.add("Endpoints", "(none)");
    }
    out!("{}", f.render());
    if !s.endpoints.is_empty() {
        outln!("Endpoints:");
        let mut t = Table::new(&["NAME", "ID"]);
        for e in &s.endpoints {
            t.row(vec![e.name.clone(), e.id.clone()]);
        }
        out!("{}", t.render_indented("  "));
    }
    Ok(())
}

/// `create svc PROTO/NAME --port PORT`: publishes HOST:PORT under PROTO/NAME.
pub(super) async fn create(ctx: &Ctx, mesh_opt: &MeshOpt, new: NewService) -> Result<()> {
    let (proto, name) = parse_service(&new.name)?;
    let mesh = ctx.mesh(mesh_opt).await?;
    if new.port == 0 {
        return Err(Usage("--port must be 1-65535".into()).into());
    }
    let path = service_path(&mesh, new.ep.as_deref(), proto, &name);
    let label = ep_label(&mesh, new.ep.as_deref());
    let body = service_body(new);
    let answer = ctx.agent.post(&path, &body).await?;
    if ctx.json() {
        return print_json(&answer.unwrap_or(Value::Null));
    }
    outln!(
        "service {proto}/{name} -> {} created on endpoint {label}",
        listen_text(&body.host, body.port)
    );
    Ok(())
}

/// What `create svc` asks the agent for: the target, and the users (blanks dropped) if given.
fn service_body(new: NewService) -> ServiceBody {
    ServiceBody {
        host: new.host,
        port: new.port,
        users: new.users.map(|users| {
            users
                .into_iter()
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect()
        }),
    }
}

/// `delete svc PROTO/NAME`: withdraws the service.
pub(super) async fn delete(ctx: &Ctx, mesh_opt: &MeshOpt, service: &ServiceRef) -> Result<()> {
    let (proto, name) = parse_service(&service.name)?;
    let mesh = ctx.mesh(mesh_opt).await?;
    let ep = service.ep.as_deref();
    ctx.agent
        .delete(&service_path(&mesh, ep, proto, &name))
        .await?;
    if !ctx.json() {
        outln!(
            "service {proto}/{name} deleted from endpoint {}",
            ep_label(&mesh, ep)
        );
    }
    Ok(())
}

/// The path of service `proto/name` on endpoint `ep` (default: the local one).
fn service_path(mesh: &Mesh, ep: Option<&str>, proto: &str, name: &str) -> String {
    format!("{}/services/{proto}/{}", ep_path(mesh, ep), enc(name))
}

/// `[PROTO/]NAME` → (proto, name); PROTO defaults to tcp.
fn parse_service(s: &str) -> Result<(&'static str, String)> {
    let (proto, name) = match s.split_once('/') {
        Some((p, n)) => (p, n),
        None => ("tcp", s),
    };
    let proto = match proto {
        "tcp" => "tcp",
        "udp" => "udp",
        _ => {
            return Err(Usage(format!(
                "bad service {s:?}: expected PROTO/NAME with PROTO tcp or udp, e.g. tcp/ssh"
            ))
            .into())
        }
    };
    if name.is_empty() || name.contains('/') {
        return Err(Usage(format!(
            "bad service {s:?}: expected PROTO/NAME, e.g. tcp/ssh"
        ))
        .into());
    }
    Ok((proto, name.to_string()))
}

fn users_text(users: &Option<Vec<String>>) -> String {
    match users {
        Some(u) if !u.is_empty() => u.join(","),
        Some(_) => "(owner)".to_string(),
        None => "(all)".to_string(),
    }
}

/// Who may use a service: its providers' shared list, or each provider's when they differ.
fn service_users_text(s: &Service) -> String {
    if s.users.is_some() || s.endpoints.iter().all(|e| e.users.is_none()) {
        return users_text(&s.users);
    }
    s.endpoints
        .iter()
        .map(|e| format!("{}:{}", e.name, users_text(&e.users)))
        .collect::<Vec<_>>()
        .join(";")
}

fn endpoint_names(s: &Service) -> String {
    let names: Vec<&str> = s.endpoints.iter().map(|e| e.name.as_str()).collect();
    if names.is_empty() {
        "-".to_string()
    } else {
        names.join(",")
    }
}

/// Where the providing endpoint connects, if this agent knows.
fn target_text(s: &Service) -> String {
    match (&s.host, s.port) {
        (Some(h), Some(p)) => listen_text(h, p),
        _ => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services() {
        assert_eq!(parse_service("tcp/ssh").ok(), Some(("tcp", "ssh".into())));
        assert_eq!(parse_service("udp/dns").ok(), Some(("udp", "dns".into())));
        assert_eq!(parse_service("web").ok(), Some(("tcp", "web".into())));
        assert!(parse_service("http/web").is_err());
        assert!(parse_service("tcp/").is_err());
    }

    /// The body is what the agent reads, and leaves out what is not given.
    #[test]
    fn bodies() {
        let new = |users: Option<&[&str]>| NewService {
            name: "tcp/web".into(),
            host: "10.0.0.5".into(),
            port: 80,
            users: users.map(|u| u.iter().map(|s| s.to_string()).collect()),
            ep: None,
        };
        let json = |b: &ServiceBody| serde_json::to_value(b).ok();
        assert_eq!(
            json(&service_body(new(None))),
            Some(serde_json::json!({"host": "10.0.0.5", "port": 80}))
        );
        let b = service_body(new(Some(&["alice", " ", " bob "])));
        assert_eq!(
            json(&b),
            Some(serde_json::json!({"host": "10.0.0.5", "port": 80, "users": ["alice", "bob"]}))
        );
        let sent = serde_json::to_vec(&b).unwrap_or_default();
        assert_eq!(serde_json::from_slice::<ServiceBody>(&sent).ok(), Some(b));
        assert_eq!(
            json(&service_body(new(Some(&[""])))),
            Some(serde_json::json!({"host": "10.0.0.5", "port": 80, "users": []}))
        );
    }
}
