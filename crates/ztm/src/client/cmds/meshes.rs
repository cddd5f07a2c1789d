//! Meshes: `get mesh`, `describe mesh`, `join` (with the PEM files or `--invite`), `leave` and
//! `log`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;
use ztm_proto::invite::Invitation;
use ztm_proto::model::{JoinAgent, JoinRequest, LogEntry, Mesh};

use super::{hub_text, mesh_path, print_json, Ctx};
use crate::client::api::decode;
use crate::client::table::{clean, time, yes_no, Fields, Table};
use crate::client::{JoinArgs, MeshOpt, Usage};

/// How long `join --invite` waits for the first hub to admit the invitation's certificate.
const INVITE_CHECK: Duration = Duration::from_secs(15);

/// How many log entries `describe mesh` shows.
const RECENT_LOG: usize = 10;

/// `get mesh`: the meshes this agent joined, and their warnings.
pub(super) async fn get(ctx: &Ctx) -> Result<()> {
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
    Ok(())
}

/// `describe mesh [NAME]`: identity, hubs, connection, expiries, errors and the recent log.
pub(super) async fn describe(ctx: &Ctx, mesh_opt: &MeshOpt, name: Option<String>) -> Result<()> {
    let name = match name {
        Some(name) => name,
        None => ctx.mesh(mesh_opt).await?.name,
    };
    let path = mesh_path(&name);
    let (mesh, raw) = ctx.agent.get_as::<Mesh>(&path).await?;
    if ctx.json() {
        return print_json(&raw);
    }
    let mut f = Fields::new();
    f.add("Name", &mesh.name);
    f.add("User", &mesh.agent.username);
    f.add("Endpoint", &mesh.agent.name);
    f.add("Endpoint ID", &mesh.agent.id);
    f.add(
        "Hubs",
        if mesh.hubs.is_empty() {
            mesh.bootstraps.join(", ")
        } else {
            mesh.hubs
                .iter()
                .map(hub_text)
                .collect::<Vec<_>>()
                .join(", ")
        },
    );
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
    let log_path = format!("{}/log", mesh_path(&mesh.name));
    if let Ok((log, _)) = ctx.agent.get_as::<Vec<LogEntry>>(&log_path).await {
        if !log.is_empty() {
            outln!("Recent log:");
            for e in &log[log.len().saturating_sub(RECENT_LOG)..] {
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

/// `join`: with an invitation, or with the CA certificate, the user's certificate and key and
/// the hubs.
pub(super) async fn join(ctx: &Ctx, a: &JoinArgs) -> Result<()> {
    if let Some(invite) = &a.invite {
        return join_invited(ctx, a, invite).await;
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
    let body = JoinRequest {
        ca,
        agent: JoinAgent {
            name: a.name.clone(),
            certificate: cert,
            private_key: Some(key),
        },
        bootstraps: hubs,
        invitation: None,
    };
    let answer = ctx.agent.post(&mesh_path(&mesh), &body).await?;
    print_joined(ctx, answer, &mesh)
}

/// `join --invite`: the agent joins with the invitation; a join whose certificate the first
/// hub finds revoked is undone.
async fn join_invited(ctx: &Ctx, a: &JoinArgs, invite: &str) -> Result<()> {
    let text = invitation_text(invite)?;
    let inv = Invitation::parse(&text).map_err(|e| Usage(format!("--invite: {e}")))?;
    let mesh = a.mesh.clone().unwrap_or_else(|| inv.mesh.clone());
    let path = mesh_path(&mesh);
    let answer = ctx
        .agent
        .post(&path, &invited_body(a.name.clone(), text))
        .await?;
    // The certificate may have been revoked since the invitation was made: the first hub
    // says so. Such a join is undone.
    let deadline = Instant::now() + INVITE_CHECK;
    let mut last_error = None;
    while Instant::now() < deadline {
        let (m, _) = ctx.agent.get_as::<Mesh>(&path).await?;
        if m.connected {
            last_error = None;
            break;
        }
        if let Some(e) = m
            .errors
            .iter()
            .find(|e| e.reason.as_deref() == Some(ztm_proto::model::CERTIFICATE_REVOKED))
        {
            let _ = ctx.agent.delete(&path).await;
            anyhow::bail!(
                "the invitation of user {} cannot be used: {} (its certificate was revoked at the \
                 CA; ask for a new invitation). The mesh was not joined.",
                inv.user,
                e.message
            );
        }
        last_error = m.errors.last().map(|e| e.message.clone());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    print_joined(ctx, answer, &mesh)?;
    if let Some(e) = last_error {
        errln!("ztm: warning: not connected to a hub yet: {e}");
    }
    Ok(())
}

/// What `join --invite` asks the agent for: the invitation (which has all the rest) and the
/// endpoint's name if given.
fn invited_body(name: Option<String>, invitation: String) -> JoinRequest {
    JoinRequest {
        agent: JoinAgent {
            name,
            ..JoinAgent::default()
        },
        invitation: Some(invitation),
        ..JoinRequest::default()
    }
}

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

/// What `join` says once the agent took the mesh.
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

/// `leave MESH`.
pub(super) async fn leave(ctx: &Ctx, mesh: &str) -> Result<()> {
    ctx.agent.delete(&mesh_path(mesh)).await?;
    if !ctx.json() {
        outln!("left mesh {mesh}");
    }
    Ok(())
}

/// `log`: the mesh's event log, its last `tail` entries (0: all).
pub(super) async fn log(ctx: &Ctx, mesh_opt: &MeshOpt, tail: usize) -> Result<()> {
    let mesh = ctx.mesh(mesh_opt).await?;
    let path = format!("{}/log", mesh_path(&mesh.name));
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

/// An expiry time as a date, marked when it needs attention.
fn expiry(ms: u64, soon: bool) -> String {
    match (ms, soon) {
        (0, _) => "-".to_string(),
        (ms, true) => format!("{} (!)", ztm_net::date(ms)),
        (ms, false) => ztm_net::date(ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A join with an invitation sends the invitation and the name, nothing empty.
    #[test]
    fn invited_bodies() {
        let json = |b: &JoinRequest| serde_json::to_value(b).ok();
        let b = invited_body(Some("laptop".into()), "ztm-invite-1:e30".into());
        assert_eq!(
            json(&b),
            Some(serde_json::json!({
                "agent": {"name": "laptop"},
                "invitation": "ztm-invite-1:e30",
            }))
        );
        assert_eq!(
            json(&invited_body(None, "ztm-invite-1:e30".into())),
            Some(serde_json::json!({"agent": {}, "invitation": "ztm-invite-1:e30"}))
        );
        // What the agent reads back is what was sent.
        let sent = serde_json::to_vec(&b).unwrap_or_default();
        let read = serde_json::from_slice::<JoinRequest>(&sent).ok();
        assert_eq!(read.as_ref().and_then(json), json(&b));
    }
}
