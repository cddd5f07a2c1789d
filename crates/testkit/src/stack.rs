//! A CA, a hub and N agents joined to MESH as given users, every endpoint online as seen from
//! every agent; services published on agents and ports mapped to them.

use std::time::Duration;

use anyhow::{anyhow, Context};
use serde_json::Value;

use crate::dir::TempDir;
use crate::http::free_port;
use crate::mesh::*;
use crate::poll::{poll, wait_until};
use crate::roles::{AgentProc, CaProc, HubProc};
use crate::traffic::{tagged_server, wait_tunnel, Backend};
use crate::Ztm;

/// The agents' names, in order: agent `i` is named `AGENT_NAMES[i]` (its log is
/// `agent-{name}.log`).
pub const AGENT_NAMES: [&str; 4] = ["a", "b", "c", "d"];

pub struct Stack {
    /// First, so that agents stop before the hub and the CA.
    pub agents: Vec<AgentProc>,
    /// The endpoint id of each agent.
    pub ids: Vec<String>,
    /// The users' certificates, one per user name.
    pub users: Vec<User>,
    pub hub: HubProc,
    pub ca: CaProc,
    pub ztm: Ztm,
    /// Last, so that processes are gone (and their logs printed) before it is removed.
    pub dir: TempDir,
}

impl Stack {
    /// Starts a CA, a hub and one agent per entry of `users` (named a, b, c, ... and joined as
    /// that user) in a new directory; waits until every agent lists every endpoint online.
    pub fn start(ztm: &Ztm, tag: &str, users: &[&str]) -> Stack {
        Self::try_start_in(ztm, TempDir::new(tag), users).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`Stack::start`] in `dir`, with an error instead of a panic.
    pub fn try_start_in(ztm: &Ztm, dir: TempDir, users: &[&str]) -> anyhow::Result<Stack> {
        Self::try_start_with(ztm, dir, users, &[])
    }

    /// Like [`Stack::try_start_in`], the hub started with `hub_flags`.
    pub fn try_start_with(
        ztm: &Ztm,
        dir: TempDir,
        users: &[&str],
        hub_flags: &[&str],
    ) -> anyhow::Result<Stack> {
        if users.len() > AGENT_NAMES.len() {
            return Err(anyhow!("at most {} agents", AGENT_NAMES.len()));
        }
        let ca = ztm.try_start_ca(dir.path(), &[], &[])?;
        let pem = try_ca_pem(&ca.addr)?;
        let mut issued: Vec<User> = Vec::new();
        for u in users {
            if !issued.iter().any(|i| i.name == *u) {
                issued.push(try_create_user(&ca.addr, u)?);
            }
        }
        let hub = ztm.try_start_hub(dir.path(), "hub", &ca.addr, hub_flags)?;
        let mut agents = Vec::new();
        let mut ids = Vec::new();
        for (i, u) in users.iter().enumerate() {
            let name = AGENT_NAMES[i];
            let agent = ztm.try_start_agent(dir.path(), name, &[])?;
            let user = issued
                .iter()
                .find(|x| x.name == *u)
                .context("a user issued above")?;
            try_join(
                &agent.addr,
                MESH,
                &join_body(&pem, name, user, &[&hub.addr]),
            )?;
            ids.push(try_local_id(&agent.addr, MESH)?);
            agents.push(agent);
        }
        let st = Stack {
            agents,
            ids,
            users: issued,
            hub,
            ca,
            ztm: ztm.clone(),
            dir,
        };
        let online = poll(Duration::from_secs(30), || st.all_online().then_some(()));
        online.ok_or_else(|| {
            anyhow!("not every endpoint online as seen from every agent within 30 s")
        })?;
        Ok(st)
    }

    /// Whether every agent lists every endpoint online.
    pub fn all_online(&self) -> bool {
        self.agents
            .iter()
            .all(|a| self.ids.iter().all(|id| is_online(&a.addr, id)))
    }

    /// The REST API of agent `i`.
    pub fn api(&self, i: usize) -> &str {
        &self.agents[i].addr
    }

    /// The certificate of user `name`.
    pub fn user(&self, name: &str) -> &User {
        self.users
            .iter()
            .find(|u| u.name == name)
            .unwrap_or_else(|| panic!("no user {name} in this stack"))
    }

    /// Agent `i` publishes `{proto}/{name}` on its own endpoint, backed by 127.0.0.1:`port`.
    pub fn add_service(
        &self,
        i: usize,
        proto: &str,
        name: &str,
        port: u16,
        users: Option<&[&str]>,
    ) {
        add_service_at(self.api(i), &self.ids[i], proto, name, port, users);
    }

    /// Publishes `service` (TCP, at `svc_port`) on agent 1 beside a `lines` witness service
    /// (a [`tagged_server`] answering "B"), maps both to new ports on agent 0 and waits until
    /// the witness answers. Returns the witness, the service's port and the witness's port.
    pub fn map_beside_lines(&self, service: &str, svc_port: u16) -> (Backend, u16, u16) {
        let lines = tagged_server("B");
        self.add_service(1, "tcp", service, svc_port, None);
        self.add_service(1, "tcp", "lines", lines.port, None);
        self.wait_service(0, "tcp", service, &[1]);
        self.wait_service(0, "tcp", "lines", &[1]);
        let port = free_port();
        let lines_port = free_port();
        self.map_port(0, "tcp", port, service, None);
        self.map_port(0, "tcp", lines_port, "lines", None);
        wait_tunnel(lines_port, "B", Duration::from_secs(20));
        (lines, port, lines_port)
    }

    /// Agent `i` maps 127.0.0.1:`port`/`proto` on its own endpoint to `service`.
    pub fn map_port(
        &self,
        i: usize,
        proto: &str,
        port: u16,
        service: &str,
        endpoint: Option<&str>,
    ) -> Value {
        map_port_at(self.api(i), &self.ids[i], proto, port, service, endpoint)
    }

    /// Waits until agent `i` discovers `{proto}/{name}` provided by every endpoint of
    /// `providers` (indices).
    pub fn wait_service(&self, i: usize, proto: &str, name: &str, providers: &[usize]) {
        let ids: Vec<&str> = providers.iter().map(|p| self.ids[*p].as_str()).collect();
        let api = self.api(i).to_string();
        wait_until(
            Duration::from_secs(20),
            &format!("agent {i} to discover {proto}/{name} on {ids:?}"),
            || discovered(&api, proto, name, &ids),
        );
    }

    /// The pids of the hub and the agents still running, with names.
    pub fn pids(&self) -> Vec<(String, u32)> {
        let mut v = vec![(self.hub.proc.name.clone(), self.hub.proc.pid())];
        for a in &self.agents {
            if a.proc.pid() != 0 {
                v.push((a.proc.name.clone(), a.proc.pid()));
            }
        }
        v
    }
}
