//! Exits and proxies: `create exit` (let connections out to the destinations given), `get
//! exit`/`describe exit`, `delete exit`; `create proxy` (a local SOCKS5 and HTTP proxy whose
//! connections leave through an exit), `get proxy`, `describe proxy`, `delete proxy`; and
//! `get exits`-style listing of the exits this user may use (`get exit --all`).

use anyhow::Result;
use serde_json::Value;
use ztm_proto::model::{EndpointRef, Exit, ExitTarget, Proxy, ProxyBody};

use super::ports::{bytes, parse_listen, stats_cells};
use super::{ep_label, ep_path, listen_text, mesh_path, print_json, Ctx};
use crate::client::api::{decode, enc};
use crate::client::table::{yes_no, Fields, Table};
use crate::client::{MeshOpt, NewExit, NewProxy, ProxyRef};

fn exit_path(mesh: &ztm_proto::model::Mesh, ep: Option<&str>) -> String {
    format!("{}/exit", ep_path(mesh, ep))
}

/// `create exit --allow RULE...`: makes the endpoint an exit (or changes its rules).
pub(super) async fn create(ctx: &Ctx, mesh_opt: &MeshOpt, new: NewExit) -> Result<()> {
    let mesh = ctx.mesh(mesh_opt).await?;
    let ep = new.ep.as_deref();
    let path = exit_path(&mesh, ep);
    let body = Exit {
        allow: new.allow,
        users: new.users,
    };
    let answer = ctx.agent.post(&path, &body).await?;
    if ctx.json() {
        return print_json(&answer.unwrap_or(Value::Null));
    }
    let exit: Exit = answer
        .as_ref()
        .and_then(|v| decode(v, &path).ok())
        .unwrap_or(body);
    outln!(
        "endpoint {} is an exit to {}{}",
        ep_label(&mesh, ep),
        exit.allow.join(", "),
        users_text(exit.users.as_deref())
    );
    Ok(())
}

fn users_text(users: Option<&[String]>) -> String {
    match users {
        Some(u) => format!(" for users {}", u.join(", ")),
        None => " for every user".to_string(),
    }
}

/// `get exit [--ep E]`: the endpoint's exit; `get exit --all`: the exits this user may use.
pub(super) async fn get(ctx: &Ctx, mesh_opt: &MeshOpt, ep: Option<&str>, all: bool) -> Result<()> {
    let mesh = ctx.mesh(mesh_opt).await?;
    if all {
        let path = format!("{}/exits", mesh_path(&mesh.name));
        let (exits, raw) = ctx.agent.get_as::<Vec<EndpointRef>>(&path).await?;
        if ctx.json() {
            return print_json(&raw);
        }
        if exits.is_empty() {
            errln!(
                "No exit that user {} may use is online.",
                mesh.agent.username
            );
            return Ok(());
        }
        let mut t = Table::new(&["ENDPOINT", "ID", "USER", "USERS"]);
        for e in exits {
            t.row(vec![
                e.name,
                e.id,
                e.username,
                e.users.map(|u| u.join(",")).unwrap_or_else(|| "*".into()),
            ]);
        }
        out!("{}", t.render());
        return Ok(());
    }
    let path = exit_path(&mesh, ep);
    let (exit, raw) = ctx.agent.get_as::<Exit>(&path).await?;
    if ctx.json() {
        return print_json(&raw);
    }
    let mut t = Table::new(&["ENDPOINT", "ALLOW", "USERS"]);
    t.row(vec![
        ep_label(&mesh, ep),
        exit.allow.join(" "),
        exit.users
            .map(|u| u.join(","))
            .unwrap_or_else(|| "*".into()),
    ]);
    out!("{}", t.render());
    Ok(())
}

/// `describe exit [--ep E]`: one rule per line.
pub(super) async fn describe(ctx: &Ctx, mesh_opt: &MeshOpt, ep: Option<&str>) -> Result<()> {
    let mesh = ctx.mesh(mesh_opt).await?;
    let path = exit_path(&mesh, ep);
    let (exit, raw) = ctx.agent.get_as::<Exit>(&path).await?;
    if ctx.json() {
        return print_json(&raw);
    }
    let mut f = Fields::new();
    f.add("Endpoint", ep_label(&mesh, ep));
    f.add(
        "Users",
        exit.users
            .map(|u| format!("{} (and its own user and root)", u.join(", ")))
            .unwrap_or_else(|| "every user of the mesh".into()),
    );
    for (i, rule) in exit.allow.iter().enumerate() {
        f.add(if i == 0 { "Allow" } else { "" }, rule);
    }
    out!("{}", f.render());
    Ok(())
}

/// `delete exit [--ep E]`.
pub(super) async fn delete(ctx: &Ctx, mesh_opt: &MeshOpt, ep: Option<&str>) -> Result<()> {
    let mesh = ctx.mesh(mesh_opt).await?;
    ctx.agent.delete(&exit_path(&mesh, ep)).await?;
    if !ctx.json() {
        outln!("endpoint {} is no longer an exit", ep_label(&mesh, ep));
    }
    Ok(())
}

fn proxy_path(mesh: &ztm_proto::model::Mesh, ep: Option<&str>, listen: &str) -> Result<String> {
    let (ip, port) = parse_listen(listen)?;
    Ok(format!(
        "{}/proxies/{}/{port}",
        ep_path(mesh, ep),
        enc(&ip.to_string())
    ))
}

fn exit_text(e: &ExitTarget) -> String {
    match (&e.endpoint, &e.user, &e.trust) {
        (Some(ep), Some(user), _) => format!("{ep} (user {user})"),
        (Some(ep), None, _) => ep.clone(),
        (None, _, Some(users)) => format!("(any exit of {})", users.join(", ")),
        (None, _, None) => "(any exit of this user or root)".to_string(),
    }
}

/// `create proxy [IP:]PORT [--exit-ep E | --trust USERS]`.
pub(super) async fn create_proxy(ctx: &Ctx, mesh_opt: &MeshOpt, new: NewProxy) -> Result<()> {
    let mesh = ctx.mesh(mesh_opt).await?;
    let ep = new.ep.as_deref();
    let path = proxy_path(&mesh, ep, &new.listen)?;
    let body = ProxyBody {
        exit: ExitTarget {
            endpoint: new.exit_ep.clone(),
            user: None,
            trust: (!new.trust.is_empty()).then_some(new.trust),
        },
    };
    let answer = ctx.agent.post(&path, &body).await?;
    if ctx.json() {
        return print_json(&answer.unwrap_or(Value::Null));
    }
    let proxy: Option<Proxy> = answer.as_ref().and_then(|v| decode(v, &path).ok());
    let shown = proxy
        .as_ref()
        .map(|p| listen_text(&p.listen.ip, p.listen.port))
        .unwrap_or(new.listen);
    outln!(
        "proxy {shown} (SOCKS5 and HTTP) -> exit {} created on endpoint {}",
        proxy
            .as_ref()
            .map(|p| exit_text(&p.exit))
            .unwrap_or_else(|| exit_text(&body.exit)),
        ep_label(&mesh, ep)
    );
    if let Some(err) = proxy.and_then(|p| p.error) {
        errln!("ztm: warning: the proxy is not open yet: {err}");
    }
    Ok(())
}

/// `get proxy [--ep E]`.
pub(super) async fn get_proxies(ctx: &Ctx, mesh_opt: &MeshOpt, ep: Option<&str>) -> Result<()> {
    let mesh = ctx.mesh(mesh_opt).await?;
    let path = format!("{}/proxies", ep_path(&mesh, ep));
    let (proxies, raw) = ctx.agent.get_as::<Vec<Proxy>>(&path).await?;
    if ctx.json() {
        return print_json(&raw);
    }
    if proxies.is_empty() {
        errln!("No proxies on endpoint {}.", ep_label(&mesh, ep));
        return Ok(());
    }
    let mut t = Table::new(&[
        "LISTEN", "EXIT", "OPEN", "ACTIVE", "TOTAL", "FAILED", "SENT", "RECEIVED", "ERROR",
    ]);
    for p in &proxies {
        let mut row = vec![
            listen_text(&p.listen.ip, p.listen.port),
            exit_text(&p.exit),
            yes_no(p.open),
        ];
        row.extend(stats_cells(p.stats.as_ref()));
        row.push(
            p.error
                .clone()
                .or_else(|| {
                    p.stats
                        .as_ref()
                        .and_then(|s| s.last_error.as_ref())
                        .map(|e| e.message.clone())
                })
                .unwrap_or_default(),
        );
        t.row(row);
    }
    out!("{}", t.render());
    Ok(())
}

/// `describe proxy [IP:]PORT`.
pub(super) async fn describe_proxy(ctx: &Ctx, mesh_opt: &MeshOpt, p: &ProxyRef) -> Result<()> {
    let mesh = ctx.mesh(mesh_opt).await?;
    let ep = p.ep.as_deref();
    let path = proxy_path(&mesh, ep, &p.listen)?;
    let (proxy, raw) = ctx.agent.get_as::<Proxy>(&path).await?;
    if ctx.json() {
        return print_json(&raw);
    }
    let mut f = Fields::new();
    f.add("Listen", listen_text(&proxy.listen.ip, proxy.listen.port));
    f.add(
        "Speaks",
        "SOCKS5 (CONNECT) and HTTP (CONNECT, http:// URLs)",
    );
    f.add("Endpoint", ep_label(&mesh, ep));
    f.add("Exit", exit_text(&proxy.exit));
    f.add("Open", yes_no(proxy.open));
    f.add("Error", proxy.error.unwrap_or_else(|| "-".into()));
    if let Some(s) = &proxy.stats {
        f.add("Connections open", s.active.to_string());
        f.add("Connections made", s.total.to_string());
        f.add("Connections refused", s.failed.to_string());
        f.add("Sent", bytes(s.bytes_to_service));
        f.add("Received", bytes(s.bytes_from_service));
        f.add(
            "Last error",
            s.last_error
                .as_ref()
                .map(|e| e.message.clone())
                .unwrap_or_else(|| "-".into()),
        );
    }
    out!("{}", f.render());
    Ok(())
}

/// `delete proxy [IP:]PORT`.
pub(super) async fn delete_proxy(ctx: &Ctx, mesh_opt: &MeshOpt, p: &ProxyRef) -> Result<()> {
    let mesh = ctx.mesh(mesh_opt).await?;
    let ep = p.ep.as_deref();
    ctx.agent.delete(&proxy_path(&mesh, ep, &p.listen)?).await?;
    if !ctx.json() {
        outln!(
            "proxy {} deleted from endpoint {}",
            p.listen,
            ep_label(&mesh, ep)
        );
    }
    Ok(())
}
