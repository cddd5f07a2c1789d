//! Endpoints: `get ep` and `describe ep` (with the endpoint's hubs, services and ports).

use anyhow::Result;
use ztm_proto::model::{Endpoint, HubLink, Mesh, Port, Service};

use super::{ep_path, hubs_table, listen_text, mesh_path, ports, print_json, services, Ctx};
use crate::client::table::{age, yes_no, Fields, Table};
use crate::client::MeshOpt;

/// `get ep`: the endpoints of the mesh, `*` marking this agent's.
pub(super) async fn get(ctx: &Ctx, mesh_opt: &MeshOpt) -> Result<()> {
    let mesh = ctx.mesh(mesh_opt).await?;
    let path = format!("{}/endpoints", mesh_path(&mesh.name));
    let (eps, raw) = ctx.agent.get_as::<Vec<Endpoint>>(&path).await?;
    if ctx.json() {
        return print_json(&raw);
    }
    out!("{}", table(&mesh, &eps).render());
    Ok(())
}

fn table(mesh: &Mesh, eps: &[Endpoint]) -> Table {
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
        t.row(vec![
            e.name.clone(),
            e.id.clone(),
            e.username.clone(),
            yes_no(e.online),
            address(e),
            age(e.heartbeat),
            if is_local(mesh, e) { "*" } else { "" }.to_string(),
        ]);
    }
    t
}

/// `describe ep NAME`: the endpoint, its hubs (with the round-trip time to each, as the
/// endpoint measures it), its services and its ports.
pub(super) async fn describe(ctx: &Ctx, mesh_opt: &MeshOpt, name: &str) -> Result<()> {
    let mesh = ctx.mesh(mesh_opt).await?;
    let path = ep_path(&mesh, Some(name));
    let (mut ep, raw) = ctx.agent.get_as::<Endpoint>(&path).await?;
    if ctx.json() {
        return print_json(&raw);
    }
    if ep.ip.is_empty() {
        // The agent describes itself without the address the hubs see; the list has it.
        let list_path = format!("{}/endpoints", mesh_path(&mesh.name));
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
    // The endpoint's own view of its hubs: this agent's links, or the far agent's answer.
    let hubs = ctx
        .agent
        .get_as::<Vec<HubLink>>(&format!("{by_id}/hubs"))
        .await
        .map(|(h, _)| h);
    let mut f = Fields::new();
    f.add("Name", &ep.name);
    f.add("ID", &ep.id);
    f.add("User", &ep.username);
    f.add("Online", yes_no(ep.online));
    f.add("Address", address(&ep));
    f.add(
        "Heartbeat",
        match age(ep.heartbeat).as_str() {
            "-" => "-".to_string(),
            a => format!("{a} ago"),
        },
    );
    f.add("Local", yes_no(is_local(&mesh, &ep)));
    f.add("Mesh", &mesh.name);
    match &hubs {
        Ok(h) if h.is_empty() => f.add("Hubs", "(none)"),
        Err(e) => f.add("Hubs", format!("(not available: {e:#})")),
        Ok(_) => {}
    }
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
    if let Ok(h) = hubs.as_deref().map(hubs_table) {
        if !h.is_empty() {
            outln!("Hubs:");
            out!("{}", h.render_indented("  "));
        }
    }
    if let Ok(s) = services.as_deref().map(services::table) {
        if !s.is_empty() {
            outln!("Services:");
            out!("{}", s.render_indented("  "));
        }
    }
    if let Ok(p) = ports.as_deref().map(ports::table) {
        if !p.is_empty() {
            outln!("Ports:");
            out!("{}", p.render_indented("  "));
        }
    }
    Ok(())
}

/// The address the hubs see the endpoint at, `-` if none.
fn address(e: &Endpoint) -> String {
    if e.ip.is_empty() {
        "-".to_string()
    } else {
        listen_text(&e.ip, e.port)
    }
}

/// Whether `e` is this agent's endpoint.
fn is_local(mesh: &Mesh, e: &Endpoint) -> bool {
    e.is_local || e.id == mesh.agent.id
}
