//! What each client command does, in terms of the agent's REST API.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
use ztm_proto::model::{Endpoint, LogEntry, Mesh, Port, Service};

use super::api::{decode, enc, normalize_addr, Agent, Config, DEFAULT_AGENT};
use super::table::{age, clean, json_text, time, yes_no, Fields, Table};
use super::{
    ClientCommand, Common, CreateWhat, DeleteWhat, DescribeWhat, GetWhat, MeshOpt, Output, PortRef,
    ProtoArg, Usage,
};

/// What a command needs: the agent, the output format and the config file's defaults.
struct Ctx {
    agent: Agent,
    output: Output,
    config: Config,
}

impl Ctx {
    fn new(common: &Common) -> Result<Ctx> {
        let config = Config::load();
        let raw = common
            .agent
            .clone()
            .or_else(|| {
                std::env::var("ZTM_AGENT")
                    .ok()
                    .filter(|s| !s.trim().is_empty())
            })
            .or_else(|| config.agent.clone())
            .unwrap_or_else(|| DEFAULT_AGENT.to_string());
        Ok(Ctx {
            agent: Agent {
                addr: normalize_addr(&raw)?,
                token: common.token.clone().filter(|t| !t.is_empty()),
            },
            output: common.output,
            config,
        })
    }

    fn json(&self) -> bool {
        self.output == Output::Json
    }

    /// The mesh to work in: `--mesh`, `$ZTM_MESH`, `mesh =` in the config, or the only one.
    async fn mesh(&self, opt: &MeshOpt) -> Result<Mesh> {
        let named = opt
            .mesh
            .clone()
            .or_else(|| {
                std::env::var("ZTM_MESH")
                    .ok()
                    .filter(|s| !s.trim().is_empty())
            })
            .or_else(|| self.config.mesh.clone());
        if let Some(name) = named {
            let path = format!("/api/meshes/{}", enc(&name));
            return Ok(self.agent.get_as::<Mesh>(&path).await?.0);
        }
        let (mut meshes, _) = self.agent.get_as::<Vec<Mesh>>("/api/meshes").await?;
        match meshes.len() {
            0 => Err(anyhow!(
                "the agent at {} has joined no mesh yet; join one with `ztm join MESH --hub HOST:PORT --ca ca.crt --cert USER.crt --key USER.key`",
                self.agent.addr
            )),
            1 => Ok(meshes.remove(0)),
            _ => {
                let mut names: Vec<&str> = meshes.iter().map(|m| m.name.as_str()).collect();
                names.sort_unstable();
                Err(Usage(format!(
                    "the agent has joined several meshes ({}); choose one with --mesh NAME",
                    names.join(", ")
                ))
                .into())
            }
        }
    }
}

/// Prints the agent's JSON, pretty, with controls in its strings as JSON escapes.
fn print_json(v: &Value) -> Result<()> {
    outln!("{}", json_text(&serde_json::to_string_pretty(v)?));
    Ok(())
}

fn mesh_path(mesh: &Mesh) -> String {
    format!("/api/meshes/{}", enc(&mesh.name))
}

/// The path of endpoint `ep` (default: the local one) in `mesh`.
fn ep_path(mesh: &Mesh, ep: Option<&str>) -> String {
    format!(
        "{}/endpoints/{}",
        mesh_path(mesh),
        enc(ep.unwrap_or(&mesh.agent.id))
    )
}

/// How to name endpoint `ep` in messages.
fn ep_label(mesh: &Mesh, ep: Option<&str>) -> String {
    match ep {
        None => format!("{} (this endpoint)", mesh.agent.name),
        Some(e) if e == mesh.agent.id || e == mesh.agent.name => {
            format!("{} (this endpoint)", mesh.agent.name)
        }
        Some(e) => e.to_string(),
    }
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
        let (ip, port) = s.rsplit_once(':').ok_or_else(bad)?;
        (
            ip.parse::<IpAddr>().map_err(|_| bad())?,
            port.parse::<u16>().map_err(|_| bad())?,
        )
    };
    if port == 0 {
        return Err(bad().into());
    }
    Ok((ip, port))
}

fn port_path(mesh: &Mesh, ep: Option<&str>, listen: &str, proto: ProtoArg) -> Result<String> {
    let (ip, port) = parse_listen(listen)?;
    Ok(format!(
        "{}/ports/{}/{}/{port}",
        ep_path(mesh, ep),
        enc(&ip.to_string()),
        proto.as_str()
    ))
}

fn listen_text(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
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

fn target_text(s: &Service) -> String {
    match (&s.host, s.port) {
        (Some(h), Some(p)) => listen_text(h, p),
        _ => "-".to_string(),
    }
}

pub async fn run(cmd: ClientCommand) -> Result<()> {
    match cmd {
        ClientCommand::Get(a) => get(&Ctx::new(&a.common)?, &a.mesh, a.what).await,
        ClientCommand::Describe(a) => describe(&Ctx::new(&a.common)?, &a.mesh, a.what).await,
        ClientCommand::Create(a) => create(&Ctx::new(&a.common)?, &a.mesh, a.what).await,
        ClientCommand::Delete(a) => delete(&Ctx::new(&a.common)?, &a.mesh, a.what).await,
        ClientCommand::Join(a) => join(&Ctx::new(&a.common)?, a).await,
        ClientCommand::Leave(a) => {
            let ctx = Ctx::new(&a.common)?;
            ctx.agent
                .call("DELETE", &format!("/api/meshes/{}", enc(&a.mesh)), None)
                .await?;
            if !ctx.json() {
                outln!("left mesh {}", a.mesh);
            }
            Ok(())
        }
        ClientCommand::Log(a) => log(&Ctx::new(&a.common)?, &a.mesh, a.tail).await,
        // Handled before a runtime is built.
        ClientCommand::Completion(_) => Ok(()),
    }
}

async fn get(ctx: &Ctx, mesh_opt: &MeshOpt, what: GetWhat) -> Result<()> {
    if let GetWhat::Meshes = what {
        let (meshes, raw) = ctx.agent.get_as::<Vec<Mesh>>("/api/meshes").await?;
        if ctx.json() {
            return print_json(&raw);
        }
        if meshes.is_empty() {
            errln!("This agent has joined no mesh (see `ztm join --help`).");
            return Ok(());
        }
        let mut t = Table::new(&[
            "NAME",
            "USER",
            "ENDPOINT",
            "CONNECTED",
            "HUBS",
            "CERT EXPIRES",
            "ERRORS",
        ]);
        for m in &meshes {
            t.row(vec![
                m.name.clone(),
                m.agent.username.clone(),
                m.agent.name.clone(),
                yes_no(m.connected),
                m.bootstraps.join(","),
                expiry(m.agent.expires, !m.warnings.is_empty()),
                m.errors.len().to_string(),
            ]);
        }
        out!("{}", t.render());
        for m in &meshes {
            for w in &m.warnings {
                errln!("ztm: warning: mesh {}: {}", m.name, w.message);
            }
        }
        return Ok(());
    }
    let mesh = ctx.mesh(mesh_opt).await?;
    match what {
        GetWhat::Meshes => Ok(()),
        GetWhat::Endpoints => {
            let path = format!("{}/endpoints", mesh_path(&mesh));
            let (eps, raw) = ctx.agent.get_as::<Vec<Endpoint>>(&path).await?;
            if ctx.json() {
                return print_json(&raw);
            }
            out!("{}", endpoints_table(&mesh, &eps).render());
            Ok(())
        }
        GetWhat::Services { ep } => {
            let path = match &ep {
                Some(_) => format!("{}/services", ep_path(&mesh, ep.as_deref())),
                None => format!("{}/services", mesh_path(&mesh)),
            };
            let (svcs, raw) = ctx.agent.get_as::<Vec<Service>>(&path).await?;
            if ctx.json() {
                return print_json(&raw);
            }
            if svcs.is_empty() {
                match &ep {
                    Some(_) => errln!(
                        "No services on endpoint {}.",
                        ep_label(&mesh, ep.as_deref())
                    ),
                    None => errln!("No services in mesh {}.", mesh.name),
                }
                return Ok(());
            }
            out!("{}", services_table(&svcs).render());
            Ok(())
        }
        GetWhat::Ports { ep } => {
            let path = format!("{}/ports", ep_path(&mesh, ep.as_deref()));
            let (ports, raw) = ctx.agent.get_as::<Vec<Port>>(&path).await?;
            if ctx.json() {
                return print_json(&raw);
            }
            if ports.is_empty() {
                errln!("No ports on endpoint {}.", ep_label(&mesh, ep.as_deref()));
                return Ok(());
            }
            out!("{}", ports_table(&ports).render());
            Ok(())
        }
    }
}

fn endpoints_table(mesh: &Mesh, eps: &[Endpoint]) -> Table {
    let mut t = Table::new(&[
        "NAME",
        "ID",
        "USER",
        "ONLINE",
        "ADDRESS",
        "HEARTBEAT",
        "LOCAL",
    ]);
    for e in eps {
        let local = e.is_local || e.id == mesh.agent.id;
        t.row(vec![
            e.name.clone(),
            e.id.clone(),
            e.username.clone(),
            yes_no(e.online),
            if e.ip.is_empty() {
                "-".to_string()
            } else {
                listen_text(&e.ip, e.port)
            },
            age(e.heartbeat),
            if local { "*" } else { "" }.to_string(),
        ]);
    }
    t
}

fn services_table(svcs: &[Service]) -> Table {
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

fn ports_table(ports: &[Port]) -> Table {
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

async fn describe(ctx: &Ctx, mesh_opt: &MeshOpt, what: DescribeWhat) -> Result<()> {
    match &what {
        DescribeWhat::Service { name } => drop(parse_service(name)?),
        DescribeWhat::Port(PortRef { listen, .. }) => drop(parse_listen(listen)?),
        _ => {}
    }
    let mesh = match &what {
        DescribeWhat::Mesh { name: Some(name) } => {
            let path = format!("/api/meshes/{}", enc(name));
            ctx.agent.get_as::<Mesh>(&path).await?.0
        }
        _ => ctx.mesh(mesh_opt).await?,
    };
    match what {
        DescribeWhat::Mesh { .. } => {
            let raw = ctx.agent.get(&mesh_path(&mesh)).await?;
            let mesh: Mesh = decode(&raw, &mesh_path(&mesh))?;
            if ctx.json() {
                return print_json(&raw);
            }
            let mut f = Fields::new();
            f.add("Name", &mesh.name);
            f.add("User", &mesh.agent.username);
            f.add("Endpoint", &mesh.agent.name);
            f.add("Endpoint ID", &mesh.agent.id);
            f.add("Hubs", mesh.bootstraps.join(", "));
            f.add("Connected", yes_no(mesh.connected));
            f.add(
                "Certificate expires",
                expiry(mesh.agent.expires, !mesh.warnings.is_empty()),
            );
            f.add("CA expires", expiry(mesh.ca_expires, false));
            for w in &mesh.warnings {
                f.add("Warning", &w.message);
            }
            if mesh.errors.is_empty() {
                f.add("Errors", "(none)");
            }
            out!("{}", f.render());
            if !mesh.errors.is_empty() {
                outln!("Errors:");
                for e in &mesh.errors {
                    outln!("  {}  {}", time(e.time), clean(&e.message));
                }
            }
            let log_path = format!("{}/log", mesh_path(&mesh));
            if let Ok((log, _)) = ctx.agent.get_as::<Vec<LogEntry>>(&log_path).await {
                if !log.is_empty() {
                    outln!("Recent log:");
                    for e in &log[log.len().saturating_sub(10)..] {
                        outln!(
                            "  {}  {:<5}  {}",
                            time(e.time),
                            clean(&e.kind),
                            clean(&e.message)
                        );
                    }
                }
            }
            Ok(())
        }
        DescribeWhat::Endpoint { name } => {
            let path = ep_path(&mesh, Some(&name));
            let (mut ep, raw) = ctx.agent.get_as::<Endpoint>(&path).await?;
            if ctx.json() {
                return print_json(&raw);
            }
            if ep.ip.is_empty() {
                // The agent describes itself without the address the hubs see; the list has it.
                let list_path = format!("{}/endpoints", mesh_path(&mesh));
                if let Ok((list, _)) = ctx.agent.get_as::<Vec<Endpoint>>(&list_path).await {
                    if let Some(e) = list.into_iter().find(|e| e.id == ep.id) {
                        ep.ip = e.ip;
                        ep.port = e.port;
                        ep.heartbeat = ep.heartbeat.max(e.heartbeat);
                    }
                }
            }
            let by_id = ep_path(&mesh, Some(&ep.id));
            let services = ctx
                .agent
                .get_as::<Vec<Service>>(&format!("{by_id}/services"))
                .await
                .map(|(s, _)| s);
            let ports = ctx
                .agent
                .get_as::<Vec<Port>>(&format!("{by_id}/ports"))
                .await
                .map(|(p, _)| p);
            let mut f = Fields::new();
            f.add("Name", &ep.name);
            f.add("ID", &ep.id);
            f.add("User", &ep.username);
            f.add("Online", yes_no(ep.online));
            f.add(
                "Address",
                if ep.ip.is_empty() {
                    "-".to_string()
                } else {
                    listen_text(&ep.ip, ep.port)
                },
            );
            f.add(
                "Heartbeat",
                match age(ep.heartbeat).as_str() {
                    "-" => "-".to_string(),
                    a => format!("{a} ago"),
                },
            );
            f.add("Local", yes_no(ep.is_local || ep.id == mesh.agent.id));
            f.add("Mesh", &mesh.name);
            match &services {
                Ok(s) if s.is_empty() => f.add("Services", "(none)"),
                Err(e) => f.add("Services", format!("(not available: {e:#})")),
                Ok(_) => {}
            }
            match &ports {
                Ok(p) if p.is_empty() => f.add("Ports", "(none)"),
                Err(e) => f.add("Ports", format!("(not available: {e:#})")),
                Ok(_) => {}
            }
            out!("{}", f.render());
            if let Ok(s) = services.as_ref().map(|s| services_table(s)) {
                if !s.is_empty() {
                    outln!("Services:");
                    out!("{}", s.render_indented("  "));
                }
            }
            if let Ok(p) = ports.as_ref().map(|p| ports_table(p)) {
                if !p.is_empty() {
                    outln!("Ports:");
                    out!("{}", p.render_indented("  "));
                }
            }
            Ok(())
        }
        DescribeWhat::Service { name } => {
            let (proto, name) = parse_service(&name)?;
            let path = format!("{}/services/{proto}/{}", mesh_path(&mesh), enc(&name));
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
        DescribeWhat::Port(PortRef { listen, proto, ep }) => {
            let path = port_path(&mesh, ep.as_deref(), &listen, proto)?;
            let (p, raw) = ctx.agent.get_as::<Port>(&path).await?;
            if ctx.json() {
                return print_json(&raw);
            }
            let mut f = Fields::new();
            f.add("Listen", listen_text(&p.listen.ip, p.listen.port));
            f.add("Protocol", p.protocol.to_string());
            f.add("Endpoint", ep_label(&mesh, ep.as_deref()));
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
    }
}

async fn create(ctx: &Ctx, mesh_opt: &MeshOpt, what: CreateWhat) -> Result<()> {
    match &what {
        CreateWhat::Service { name, .. } => drop(parse_service(name)?),
        CreateWhat::Port { listen, .. } => drop(parse_listen(listen)?),
    }
    let mesh = ctx.mesh(mesh_opt).await?;
    match what {
        CreateWhat::Service {
            name,
            host,
            port,
            users,
            ep,
        } => {
            let (proto, name) = parse_service(&name)?;
            if port == 0 {
                return Err(Usage("--port must be 1-65535".into()).into());
            }
            let mut body = json!({"host": host, "port": port});
            if let Some(u) = users {
                let u: Vec<String> = u
                    .into_iter()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                body["users"] = json!(u);
            }
            let path = format!(
                "{}/services/{proto}/{}",
                ep_path(&mesh, ep.as_deref()),
                enc(&name)
            );
            let answer = ctx.agent.call("POST", &path, Some(&body)).await?;
            if ctx.json() {
                return print_json(&answer.unwrap_or(Value::Null));
            }
            outln!(
                "service {proto}/{name} -> {} created on endpoint {}",
                listen_text(&host, port),
                ep_label(&mesh, ep.as_deref())
            );
            Ok(())
        }
        CreateWhat::Port {
            listen,
            proto,
            service,
            target_ep,
            trust,
            ep,
        } => {
            // `--service tcp/NAME` is accepted when the protocol matches.
            let service = match service.split_once('/') {
                Some((p, n)) if p == proto.as_str() => n.to_string(),
                Some(_) => {
                    return Err(Usage(format!(
                    "--service {service:?}: give the service name; its protocol is --proto ({})",
                    proto.as_str()
                ))
                    .into())
                }
                None => service,
            };
            let path = port_path(&mesh, ep.as_deref(), &listen, proto)?;
            let mut target = json!({"service": service});
            if let Some(t) = &target_ep {
                target["endpoint"] = json!(t);
            }
            if !trust.is_empty() {
                target["trust"] = json!(trust);
            }
            let answer = ctx
                .agent
                .call("POST", &path, Some(&json!({"target": target})))
                .await?;
            if ctx.json() {
                return print_json(&answer.unwrap_or(Value::Null));
            }
            let port: Option<Port> = answer.as_ref().and_then(|v| decode(v, &path).ok());
            let shown = port
                .as_ref()
                .map(|p| listen_text(&p.listen.ip, p.listen.port))
                .unwrap_or(listen);
            outln!(
                "port {}/{shown} -> service {service}{} created on endpoint {}",
                proto.as_str(),
                target_ep
                    .as_deref()
                    .map(|t| format!(" at {t}"))
                    .unwrap_or_default(),
                ep_label(&mesh, ep.as_deref())
            );
            if let Some(err) = port.and_then(|p| p.error) {
                errln!("ztm: warning: the port is not open yet: {err}");
            }
            Ok(())
        }
    }
}

async fn delete(ctx: &Ctx, mesh_opt: &MeshOpt, what: DeleteWhat) -> Result<()> {
    match &what {
        DeleteWhat::Service { name, .. } => drop(parse_service(name)?),
        DeleteWhat::Port(PortRef { listen, .. }) => drop(parse_listen(listen)?),
    }
    let mesh = ctx.mesh(mesh_opt).await?;
    let (path, what_text, ep) = match what {
        DeleteWhat::Service { name, ep } => {
            let (proto, name) = parse_service(&name)?;
            (
                format!(
                    "{}/services/{proto}/{}",
                    ep_path(&mesh, ep.as_deref()),
                    enc(&name)
                ),
                format!("service {proto}/{name}"),
                ep,
            )
        }
        DeleteWhat::Port(PortRef { listen, proto, ep }) => {
            let (ip, port) = parse_listen(&listen)?;
            (
                port_path(&mesh, ep.as_deref(), &listen, proto)?,
                format!(
                    "port {}/{}",
                    proto.as_str(),
                    listen_text(&ip.to_string(), port)
                ),
                ep,
            )
        }
    };
    ctx.agent.call("DELETE", &path, None).await?;
    if !ctx.json() {
        outln!(
            "{what_text} deleted from endpoint {}",
            ep_label(&mesh, ep.as_deref())
        );
    }
    Ok(())
}

async fn join(ctx: &Ctx, a: super::JoinArgs) -> Result<()> {
    if let Some(invite) = &a.invite {
        return join_invited(ctx, &a, invite).await;
    }
    let read = |p: &Option<std::path::PathBuf>, what: &str| {
        let p = p
            .as_deref()
            .ok_or_else(|| Usage(format!("give {what} (or --invite)")))?;
        std::fs::read_to_string(p).with_context(|| format!("cannot read {what} {}", p.display()))
    };
    let ca = read(&a.ca, "the CA certificate")?;
    let cert = read(&a.cert, "the certificate")?;
    let key = read(&a.key, "the private key")?;
    let mesh = a.mesh.clone().unwrap_or_default();
    let hubs: Vec<String> = a
        .hubs
        .iter()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    if hubs.is_empty() {
        return Err(Usage("--hub: give at least one hub address (HOST:PORT)".into()).into());
    }
    let body = json!({
        "ca": ca,
        "agent": {"name": a.name, "certificate": cert, "privateKey": key},
        "bootstraps": hubs,
    });
    let answer = ctx
        .agent
        .call("POST", &format!("/api/meshes/{}", enc(&mesh)), Some(&body))
        .await?;
    print_joined(ctx, answer, &mesh)
}

/// An expiry time as a date, marked when it needs attention.
fn expiry(ms: u64, soon: bool) -> String {
    match (ms, soon) {
        (0, _) => "-".to_string(),
        (ms, true) => format!("{} (!)", ztm_net::date(ms)),
        (ms, false) => ztm_net::date(ms),
    }
}

fn print_joined(ctx: &Ctx, answer: Option<Value>, mesh: &str) -> Result<()> {
    let raw = answer.unwrap_or(Value::Null);
    if ctx.json() {
        return print_json(&raw);
    }
    match decode::<Mesh>(&raw, "join") {
        Ok(m) => outln!(
            "joined mesh {} as user {} (endpoint {}, id {}) via {}",
            m.name,
            m.agent.username,
            m.agent.name,
            m.agent.id,
            m.bootstraps.join(", ")
        ),
        Err(_) => outln!("joined mesh {mesh}"),
    }
    Ok(())
}

/// How long `join --invite` waits for the first hub to admit the invitation's certificate.
const INVITE_CHECK: std::time::Duration = std::time::Duration::from_secs(15);

/// The text of an invitation given as a file or as text; warns about a file others can read.
fn invitation_text(arg: &str) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let trimmed = arg.trim();
    if trimmed.starts_with(ztm_proto::invite::TEXT_PREFIX) || trimmed.starts_with('{') {
        return Ok(trimmed.to_string());
    }
    let path = std::path::Path::new(arg);
    let meta = std::fs::metadata(path).with_context(|| {
        format!("--invite {arg:?}: no such file (and not the text of an invitation)")
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        errln!(
            "ztm: warning: {} can be read by other users of this computer, and it holds a \
             private key; keep it owner-only (chmod 600) or delete it once joined",
            path.display()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

async fn join_invited(ctx: &Ctx, a: &super::JoinArgs, invite: &str) -> Result<()> {
    let text = invitation_text(invite)?;
    let inv =
        ztm_proto::invite::Invitation::parse(&text).map_err(|e| Usage(format!("--invite: {e}")))?;
    let mesh = a.mesh.clone().unwrap_or_else(|| inv.mesh.clone());
    let path = format!("/api/meshes/{}", enc(&mesh));
    let body = json!({"invitation": text, "agent": {"name": a.name}});
    let answer = ctx.agent.call("POST", &path, Some(&body)).await?;
    // The certificate may have been revoked since the invitation was made: the first hub
    // says so. Such a join is undone.
    let deadline = std::time::Instant::now() + INVITE_CHECK;
    let mut last_error = None;
    while std::time::Instant::now() < deadline {
        let (m, _) = ctx.agent.get_as::<Mesh>(&path).await?;
        if m.connected {
            last_error = None;
            break;
        }
        if let Some(e) = m
            .errors
            .iter()
            .find(|e| e.message.to_ascii_lowercase().contains("revoked"))
        {
            let _ = ctx.agent.call("DELETE", &path, None).await;
            anyhow::bail!(
                "the invitation of user {} cannot be used: {} (its certificate was revoked at the \
                 CA; ask for a new invitation). The mesh was not joined.",
                inv.user,
                e.message
            );
        }
        last_error = m.errors.last().map(|e| e.message.clone());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    print_joined(ctx, answer, &mesh)?;
    if let Some(e) = last_error {
        errln!("ztm: warning: not connected to a hub yet: {e}");
    }
    Ok(())
}

async fn log(ctx: &Ctx, mesh_opt: &MeshOpt, tail: usize) -> Result<()> {
    let mesh = ctx.mesh(mesh_opt).await?;
    let path = format!("{}/log", mesh_path(&mesh));
    let (log, raw) = ctx.agent.get_as::<Vec<LogEntry>>(&path).await?;
    let skip = if tail == 0 {
        0
    } else {
        log.len().saturating_sub(tail)
    };
    if ctx.json() {
        let items: Vec<Value> = raw.as_array().cloned().unwrap_or_default();
        return print_json(&Value::Array(items.into_iter().skip(skip).collect()));
    }
    let mut t = Table::new(&["TIME (UTC)", "TYPE", "MESSAGE"]);
    for e in &log[skip..] {
        t.row(vec![time(e.time), e.kind.clone(), e.message.clone()]);
    }
    out!("{}", t.render());
    Ok(())
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
}
