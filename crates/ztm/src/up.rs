//! `ztm up`: a whole mesh on this machine in one command. Runs a CA, a hub and an agent in
//! this process, gives user `root` a certificate (kept in the state directory), joins the agent
//! to a mesh as root and prints the web UI address and how to add more computers.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use ztm_net::http1;
use ztm_proto::addr::HostPort;

use crate::roles::{run_agent, run_ca, run_hub, AgentArgs, CaArgs, HubArgs};
use crate::serve::expand_home;

#[derive(Args)]
pub struct UpArgs {
    /// Directory for the databases and root's certificate and key
    #[arg(long, default_value = "~/.ztm")]
    dir: String,
    /// Name of the mesh to create
    #[arg(long, default_value = "default")]
    mesh: String,
    /// CA listen address
    #[arg(long, default_value = "127.0.0.1:9999")]
    ca_listen: String,
    /// Hub listen address (other computers dial it)
    #[arg(long, default_value = "0.0.0.0:8888")]
    hub_listen: String,
    /// Addresses other computers reach the hub at (HOST:PORT); repeatable
    #[arg(long = "hub-name")]
    hub_names: Vec<String>,
    /// Agent (REST API and web UI) listen address
    #[arg(long, default_value = "127.0.0.1:7777")]
    agent_listen: String,
    /// The agent's API token (see `ztm agent --help`); mandatory when --agent-listen is not a
    /// loopback address
    #[arg(long, env = "ZTM_AGENT_TOKEN", hide_env_values = true)]
    agent_token: Option<String>,
}

/// Stands for this computer's address in the printed steps when no `--hub-name` says it.
const THIS_COMPUTER: &str = "THIS-COMPUTER";

/// The hub address another computer should join with: the first `--hub-name`, else the listen
/// address, with a placeholder for a wildcard host (127.0.0.1 would be the other computer).
fn hub_for_others(hub_names: &[String], hub_listen: &str) -> String {
    if let Some(name) = hub_names.first() {
        return name.clone();
    }
    match HostPort::parse(hub_listen) {
        Ok(at) if at.is_unspecified() => HostPort::new(THIS_COMPUTER, at.port).to_string(),
        _ => hub_listen.to_string(),
    }
}

/// Where this computer reaches a server listening on `listen`: 127.0.0.1 for a wildcard host.
fn local_of(listen: &str) -> String {
    match HostPort::parse(listen) {
        Ok(at) if at.is_unspecified() => HostPort::new("127.0.0.1", at.port).to_string(),
        _ => listen.to_string(),
    }
}

async fn wait_http(addr: &str, path: &str) -> Result<()> {
    http1::wait_ready(addr, path, Duration::from_secs(30)).await
}

async fn call(addr: &str, method: &str, path: &str, body: Bytes) -> Result<String> {
    call_with(addr, None, method, path, body).await
}

async fn call_with(
    addr: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Bytes,
) -> Result<String> {
    let r = http1::request(
        addr,
        method,
        path,
        token,
        Some("application/json"),
        body,
        Duration::from_secs(10),
    )
    .await?;
    if r.status >= 300 {
        bail!("{method} {path} on {addr}: {} {}", r.status, r.text());
    }
    Ok(r.text())
}

/// root's key, certificate and the CA certificate, created at the first run.
async fn root_identity(ca: &str, dir: &Path) -> Result<(String, String, String)> {
    let (key_path, crt_path, ca_path) = (
        dir.join("root.key"),
        dir.join("root.crt"),
        dir.join("ca.crt"),
    );
    if !key_path.exists() {
        let key = call(ca, "POST", "/api/certificates/root", Bytes::new())
            .await
            .context("creating root's certificate (if the CA already has one, delete it or use another --dir)")?;
        write_private(&key_path, &key)?;
        std::fs::write(
            &crt_path,
            call(ca, "GET", "/api/certificates/root", Bytes::new()).await?,
        )?;
        std::fs::write(
            &ca_path,
            call(ca, "GET", "/api/certificates/ca", Bytes::new()).await?,
        )?;
    }
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    Ok((read(&ca_path)?, read(&crt_path)?, read(&key_path)?))
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

async fn setup(args: &UpArgs, dir: &Path) -> Result<()> {
    let ca = local_of(&args.ca_listen);
    let agent = local_of(&args.agent_listen);
    let token = args.agent_token.as_deref().filter(|t| !t.is_empty());
    let hub_local = local_of(&args.hub_listen);
    wait_http(&ca, "/api/certificates/ca").await?;
    let (ca_pem, cert, key) = root_identity(&ca, dir).await?;
    wait_http(&agent, "/api/meshes").await?;
    let meshes: serde_json::Value =
        serde_json::from_str(&call_with(&agent, token, "GET", "/api/meshes", Bytes::new()).await?)?;
    let joined = meshes
        .as_array()
        .is_some_and(|m| m.iter().any(|m| m["name"] == args.mesh.as_str()));
    if !joined {
        let body = serde_json::json!({
            "ca": ca_pem,
            "agent": {"name": "root-agent", "certificate": cert, "privateKey": key},
            "bootstraps": [hub_local],
        });
        call_with(
            &agent,
            token,
            "POST",
            &format!("/api/meshes/{}", args.mesh),
            body.to_string().into(),
        )
        .await?;
    }
    let hub_addr = hub_for_others(&args.hub_names, &args.hub_listen);
    let placeholder = if hub_addr.starts_with(THIS_COMPUTER) {
        format!(
            "\x20 ({THIS_COMPUTER}: an address of this computer that the other one can reach; \
             `ztm up --hub-name HOST:PORT` prints it here)\n"
        )
    } else {
        String::new()
    };
    let ca_flag = if ca == "127.0.0.1:9999" {
        String::new()
    } else {
        format!(" --ca {ca}")
    };
    let mesh_flag = if args.mesh == "default" {
        String::new()
    } else {
        format!(" --mesh {}", args.mesh)
    };
    println!(
        "\nZTM is up: CA on {ca}, hub on {}, agent joined to mesh '{}' as root.\n\
         \n  Web UI:  http://{agent}/\n\
         \nTo add another computer (user NAME):\n\
         \x20 here:   ztm invite NAME --hub {hub_addr}{mesh_flag}{ca_flag}\n\
         \x20         (writes NAME.ztm-invite, owner-only; it holds NAME's key)\n\
         \x20 copy NAME.ztm-invite to it privately, then there:\n\
         \x20         ztm agent &\n\
         \x20         ztm join --invite NAME.ztm-invite\n\
         {placeholder}\
         \x20 (or open http://127.0.0.1:7777 there and join with the invitation file)\n",
        args.hub_listen, args.mesh,
    );
    Ok(())
}

pub async fn run_up(args: UpArgs) -> Result<()> {
    let dir = expand_home(&args.dir);
    if !dir.exists() {
        // It will hold the CA's database and the root user's key.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let db = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let hub_public = if args.hub_names.is_empty() {
        vec![local_of(&args.hub_listen)]
    } else {
        args.hub_names.clone()
    };
    // The hub is pinned to the CA certificate this mesh has (created now if it is new).
    let ca_pem = {
        let path = dir.join("ca.db");
        tokio::task::spawn_blocking(move || {
            ztm_ca::CaStore::open(&path).map(|s| s.ca_cert_pem().to_string())
        })
        .await??
    };
    let ca = run_ca(CaArgs::new(&args.ca_listen, &db("ca.db")));
    let hub = run_hub(
        HubArgs::new(
            &args.hub_listen,
            &local_of(&args.ca_listen),
            hub_public.clone(),
        )
        .pin_ca(ca_pem),
    );
    let agent = run_agent(
        AgentArgs::new(&args.agent_listen, &db("agent.db")).with_token(args.agent_token.clone()),
    );
    let setup = async {
        if let Err(e) = setup(&args, &dir).await {
            tracing::error!("setting up the mesh failed: {e:#}");
        }
        std::future::pending::<Result<()>>().await
    };
    // Any role ending (an error, or SIGINT/SIGTERM reaching all of them) ends `up`.
    tokio::select! {
        r = ca => r.map_err(|e| anyhow!("CA: {e:#}")),
        r = hub => r.map_err(|e| anyhow!("hub: {e:#}")),
        r = agent => r.map_err(|e| anyhow!("agent: {e:#}")),
        r = setup => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_computers_are_told_a_reachable_hub_address() {
        let names = vec!["hub.example.org:8888".to_string()];
        assert_eq!(
            hub_for_others(&names, "0.0.0.0:8888"),
            "hub.example.org:8888"
        );
        assert_eq!(hub_for_others(&[], "0.0.0.0:8888"), "THIS-COMPUTER:8888");
        assert_eq!(hub_for_others(&[], "[::]:9000"), "THIS-COMPUTER:9000");
        assert_eq!(hub_for_others(&[], "192.0.2.7:8888"), "192.0.2.7:8888");
    }
}
