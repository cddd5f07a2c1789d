//! Starting the roles: `ztm ca`, `ztm hub` and `ztm agent` as processes on `127.0.0.1:0`, each
//! ready when it has logged the address it listens on (and that address is read from there):
//!
//! - the CA: `CA listening on http://HOST:PORT` (or `https://`);
//! - a hub: `hub hub/NAME listening on HOST:PORT` once it has its certificate, and before that
//!   `hub bound to HOST:PORT` (a hub that never gets a certificate says only that);
//! - an agent: `agent listening on http://HOST:PORT`.
//!
//! A role started again ([`HubProc::restart`], [`AgentProc::restart`]) listens on the port it
//! had, as a restarted server would.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::proc::Proc;
use crate::Ztm;

/// How long a role may take to come up.
pub const START_WITHIN: Duration = Duration::from_secs(30);

const CA_LISTENING: &str = "CA listening on ";
const HUB_LISTENING: &str = "listening on ";
const HUB_BOUND: &str = "hub bound to ";
const AGENT_LISTENING: &str = "agent listening on ";

/// The address a role is started on unless told otherwise: any free port of 127.0.0.1.
pub const ANY_PORT: &str = "127.0.0.1:0";

/// A CA process with its database in its directory (`ca.db`).
pub struct CaProc {
    pub proc: Proc,
    /// Where it listens (HOST:PORT, without the scheme).
    pub addr: String,
}

/// A running hub.
pub struct HubProc {
    pub proc: Proc,
    pub addr: String,
    pub tag: String,
    dir: PathBuf,
    ca_addr: String,
    extra: Vec<String>,
    ztm: Ztm,
}

/// A running agent (REST API on `addr`, state in `db`).
pub struct AgentProc {
    pub proc: Proc,
    pub addr: String,
    pub db: PathBuf,
    pub tag: String,
    dir: PathBuf,
    extra: Vec<String>,
    ztm: Ztm,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

impl Ztm {
    /// `ztm ca` in `dir` (database `dir/ca.db`, log `dir/ca.log`).
    pub fn start_ca(&self, dir: &Path) -> CaProc {
        self.start_ca_with(dir, &[])
    }

    /// A CA with `extra` command-line arguments.
    pub fn start_ca_with(&self, dir: &Path, extra: &[&str]) -> CaProc {
        self.start_ca_env(dir, extra, &[])
    }

    /// A CA with `extra` arguments and `env` in its environment.
    pub fn start_ca_env(&self, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> CaProc {
        self.try_start_ca(dir, extra, env)
            .unwrap_or_else(|e| panic!("starting the CA: {e:#}"))
    }

    /// A second, unrelated CA in `dir/sub`.
    pub fn start_other_ca(&self, dir: &Path, sub: &str) -> CaProc {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).expect("creating the CA's directory");
        self.start_ca(&d)
    }

    /// Like [`Ztm::start_ca_env`], with an error instead of a panic.
    pub fn try_start_ca(
        &self,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<CaProc> {
        let db = dir.join("ca.db");
        let db = db.to_str().context("a UTF-8 path")?;
        let mut args = vec!["ca", "--listen", ANY_PORT, "--database", db];
        args.extend_from_slice(extra);
        let mut proc = self.try_spawn("ca", dir, &args, env)?;
        let addr = proc.wait_address(CA_LISTENING, START_WITHIN)?;
        Ok(CaProc { proc, addr })
    }

    /// `ztm hub` named `tag` (log `dir/{tag}.log`) with CA `ca_addr`; returns once it has its
    /// certificate and serves.
    pub fn start_hub(&self, dir: &Path, tag: &str, ca_addr: &str) -> HubProc {
        self.start_hub_with(dir, tag, ca_addr, &[])
    }

    /// A hub with `extra` flags.
    pub fn start_hub_with(&self, dir: &Path, tag: &str, ca_addr: &str, extra: &[&str]) -> HubProc {
        self.try_start_hub(dir, tag, ca_addr, extra)
            .unwrap_or_else(|e| panic!("starting hub {tag}: {e:#}"))
    }

    /// Like [`Ztm::start_hub_with`], with an error instead of a panic.
    pub fn try_start_hub(
        &self,
        dir: &Path,
        tag: &str,
        ca_addr: &str,
        extra: &[&str],
    ) -> anyhow::Result<HubProc> {
        let mut hub = self.try_spawn_hub(dir, tag, ca_addr, ANY_PORT, extra)?;
        hub.proc.wait_address(HUB_LISTENING, START_WITHIN)?;
        Ok(hub)
    }

    /// A hub on `addr` (an address of a network namespace, say), which is also its `--name`
    /// (so its certificate names it); returns once it serves.
    pub fn start_hub_on(
        &self,
        dir: &Path,
        tag: &str,
        ca_addr: &str,
        addr: &str,
        extra: &[&str],
    ) -> HubProc {
        let mut all = vec!["--name", addr];
        all.extend_from_slice(extra);
        let mut hub = self
            .try_spawn_hub(dir, tag, ca_addr, addr, &all)
            .unwrap_or_else(|e| panic!("starting hub {tag}: {e:#}"));
        if let Err(e) = hub.proc.wait_address(HUB_LISTENING, START_WITHIN) {
            panic!("starting hub {tag}: {e:#}");
        }
        hub
    }

    /// A hub with `extra` flags that returns as soon as it has bound its port, without waiting
    /// for a certificate (for a hub that must never get one).
    pub fn spawn_hub_with(&self, dir: &Path, tag: &str, ca_addr: &str, extra: &[&str]) -> HubProc {
        self.try_spawn_hub(dir, tag, ca_addr, ANY_PORT, extra)
            .unwrap_or_else(|e| panic!("starting hub {tag}: {e:#}"))
    }

    fn try_spawn_hub(
        &self,
        dir: &Path,
        tag: &str,
        ca_addr: &str,
        listen: &str,
        extra: &[&str],
    ) -> anyhow::Result<HubProc> {
        let mut hub = HubProc {
            proc: spawn_hub(self, dir, tag, ca_addr, listen, extra)?,
            addr: String::new(),
            tag: tag.to_string(),
            dir: dir.to_path_buf(),
            ca_addr: ca_addr.to_string(),
            extra: strings(extra),
            ztm: self.clone(),
        };
        hub.addr = hub.proc.wait_address(HUB_BOUND, START_WITHIN)?;
        Ok(hub)
    }

    /// `ztm agent` named `tag` (database `dir/{tag}.db`, log `dir/agent-{tag}.log`).
    pub fn start_agent(&self, dir: &Path, tag: &str) -> AgentProc {
        self.start_agent_with(dir, tag, &[])
    }

    /// Like [`Ztm::start_agent`], with `extra` command-line arguments (`--token T`, say).
    pub fn start_agent_with(&self, dir: &Path, tag: &str, extra: &[&str]) -> AgentProc {
        self.try_start_agent(dir, tag, extra)
            .unwrap_or_else(|e| panic!("starting agent {tag}: {e:#}"))
    }

    /// Like [`Ztm::start_agent_with`], with an error instead of a panic.
    pub fn try_start_agent(
        &self,
        dir: &Path,
        tag: &str,
        extra: &[&str],
    ) -> anyhow::Result<AgentProc> {
        let mut agent = AgentProc {
            proc: spawn_agent(
                self,
                dir,
                tag,
                ANY_PORT,
                &dir.join(format!("{tag}.db")),
                extra,
            )?,
            addr: String::new(),
            db: dir.join(format!("{tag}.db")),
            tag: tag.to_string(),
            dir: dir.to_path_buf(),
            extra: strings(extra),
            ztm: self.clone(),
        };
        agent.addr = agent.proc.wait_address(AGENT_LISTENING, START_WITHIN)?;
        Ok(agent)
    }
}

fn spawn_hub(
    ztm: &Ztm,
    dir: &Path,
    tag: &str,
    ca_addr: &str,
    listen: &str,
    extra: &[&str],
) -> anyhow::Result<Proc> {
    let mut args = vec!["hub", "--listen", listen, "--ca", ca_addr];
    args.extend_from_slice(extra);
    ztm.try_spawn(tag, dir, &args, &[])
}

fn spawn_agent(
    ztm: &Ztm,
    dir: &Path,
    tag: &str,
    listen: &str,
    db: &Path,
    extra: &[&str],
) -> anyhow::Result<Proc> {
    let db = db.to_str().context("a UTF-8 path")?;
    let mut args = vec!["agent", "--listen", listen, "--database", db];
    args.extend_from_slice(extra);
    ztm.try_spawn(&format!("agent-{tag}"), dir, &args, &[])
}

impl HubProc {
    /// Starts the hub again on its port (after `kill9` or `stop`); returns once it serves.
    pub fn restart(&mut self) {
        let extra = strs(&self.extra);
        self.proc = spawn_hub(
            &self.ztm,
            &self.dir,
            &self.tag,
            &self.ca_addr,
            &self.addr,
            &extra,
        )
        .unwrap_or_else(|e| panic!("restarting hub {}: {e:#}", self.tag));
        if let Err(e) = self.proc.wait_address(HUB_LISTENING, START_WITHIN) {
            panic!("restarting hub {}: {e:#}", self.tag);
        }
    }
}

impl AgentProc {
    /// Starts the agent again on its port and database (after `stop` or `kill9`); returns once
    /// it serves.
    pub fn restart(&mut self) {
        let extra = strs(&self.extra);
        self.proc = spawn_agent(
            &self.ztm, &self.dir, &self.tag, &self.addr, &self.db, &extra,
        )
        .unwrap_or_else(|e| panic!("restarting agent {}: {e:#}", self.tag));
        if let Err(e) = self.proc.wait_address(AGENT_LISTENING, START_WITHIN) {
            panic!("restarting agent {}: {e:#}", self.tag);
        }
    }
}
