//! What each client command does, in terms of the agent's REST API: one module per noun
//! (meshes, endpoints, services, ports, exits and proxies), each with its requests, tables and messages. Here is
//! what they share: a command's context (the agent, the output format, the mesh to work in),
//! the dispatch from the command line to the nouns, the API's paths and JSON printing.

mod endpoints;
mod exits;
mod meshes;
mod ports;
mod services;
mod status;

use anyhow::{anyhow, Result};
use serde_json::Value;
use ztm_proto::addr::HostPort;
use ztm_proto::model::{HubLink, Mesh};

use super::api::{enc, normalize_addr, Agent, Config, DEFAULT_AGENT};
use super::table::{json_text, rtt, yes_no, Table};
use super::{
    ClientCommand, Common, CreateWhat, DeleteWhat, DescribeWhat, GetWhat, MeshOpt, Output, Usage,
};

/// Runs one client command (`completion` aside, which needs no agent).
pub async fn run(cmd: ClientCommand) -> Result<()> {
    match cmd {
        ClientCommand::Get(a) => {
            let ctx = Ctx::new(&a.common)?;
            match a.what {
                GetWhat::Meshes => meshes::get(&ctx).await,
                GetWhat::Endpoints => endpoints::get(&ctx, &a.mesh).await,
                GetWhat::Services { ep } => services::get(&ctx, &a.mesh, ep.as_deref()).await,
                GetWhat::Ports { ep } => ports::get(&ctx, &a.mesh, ep.as_deref()).await,
                GetWhat::Exit { ep, all } => exits::get(&ctx, &a.mesh, ep.as_deref(), all).await,
                GetWhat::Proxies { ep } => exits::get_proxies(&ctx, &a.mesh, ep.as_deref()).await,
            }
        }
        ClientCommand::Describe(a) => {
            let ctx = Ctx::new(&a.common)?;
            match a.what {
                DescribeWhat::Mesh { name } => meshes::describe(&ctx, &a.mesh, name).await,
                DescribeWhat::Endpoint { name } => endpoints::describe(&ctx, &a.mesh, &name).await,
                DescribeWhat::Service { name } => services::describe(&ctx, &a.mesh, &name).await,
                DescribeWhat::Port(port) => ports::describe(&ctx, &a.mesh, &port).await,
                DescribeWhat::Exit { ep } => exits::describe(&ctx, &a.mesh, ep.as_deref()).await,
                DescribeWhat::Proxy(p) => exits::describe_proxy(&ctx, &a.mesh, &p).await,
            }
        }
        ClientCommand::Create(a) => {
            let ctx = Ctx::new(&a.common)?;
            match a.what {
                CreateWhat::Service(new) => services::create(&ctx, &a.mesh, new).await,
                CreateWhat::Port(new) => ports::create(&ctx, &a.mesh, new).await,
                CreateWhat::Exit(new) => exits::create(&ctx, &a.mesh, new).await,
                CreateWhat::Proxy(new) => exits::create_proxy(&ctx, &a.mesh, new).await,
            }
        }
        ClientCommand::Delete(a) => {
            let ctx = Ctx::new(&a.common)?;
            match a.what {
                DeleteWhat::Service(service) => services::delete(&ctx, &a.mesh, &service).await,
                DeleteWhat::Port(port) => ports::delete(&ctx, &a.mesh, &port).await,
                DeleteWhat::Exit { ep } => exits::delete(&ctx, &a.mesh, ep.as_deref()).await,
                DeleteWhat::Proxy(p) => exits::delete_proxy(&ctx, &a.mesh, &p).await,
            }
        }
        ClientCommand::Join(a) => meshes::join(&Ctx::new(&a.common)?, &a).await,
        ClientCommand::Leave(a) => meshes::leave(&Ctx::new(&a.common)?, &a.mesh).await,
        ClientCommand::Log(a) => meshes::log(&Ctx::new(&a.common)?, &a.mesh, a.tail).await,
        ClientCommand::Status(a) => status::status(&Ctx::new(&a.common)?).await,
        // Handled before a runtime is built.
        ClientCommand::Completion(_) => Ok(()),
    }
}

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

    /// `-o json`: print the agent's answers as they are.
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
            return Ok(self.agent.get_as::<Mesh>(&mesh_path(&name)).await?.0);
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

/// The path of mesh `name`.
fn mesh_path(name: &str) -> String {
    format!("/api/meshes/{}", enc(name))
}

/// The path of endpoint `ep` (default: the local one) in `mesh`.
fn ep_path(mesh: &Mesh, ep: Option<&str>) -> String {
    format!(
        "{}/endpoints/{}",
        mesh_path(&mesh.name),
        enc(ep.unwrap_or(&mesh.agent.id))
    )
}

/// How to name endpoint `ep` (default: the local one) in messages.
fn ep_label(mesh: &Mesh, ep: Option<&str>) -> String {
    match ep {
        None => format!("{} (this endpoint)", mesh.agent.name),
        Some(e) if e == mesh.agent.id || e == mesh.agent.name => {
            format!("{} (this endpoint)", mesh.agent.name)
        }
        Some(e) => e.to_string(),
    }
}

/// One row per hub of an endpoint: its address, whether the endpoint is registered with it,
/// and the round-trip time to it.
fn hubs_table(hubs: &[HubLink]) -> Table {
    let mut t = Table::new(&["HUB", "CONNECTED", "RTT"]);
    for h in hubs {
        t.row(vec![h.address.clone(), yes_no(h.connected), rtt(h.rtt_ms)]);
    }
    t
}

/// One hub in a line of text: `ADDRESS (RTT)`, or `ADDRESS (not connected)`.
fn hub_text(h: &HubLink) -> String {
    if h.connected {
        format!("{} ({})", h.address, rtt(h.rtt_ms))
    } else {
        format!("{} (not connected)", h.address)
    }
}

/// An address as `IP:PORT`, or `[IP]:PORT` for IPv6.
fn listen_text(ip: &str, port: u16) -> String {
    HostPort::new(ip, port).to_string()
}
