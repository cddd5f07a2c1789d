//! The test kit: a CA, hubs and agents as real `ztm` processes on loopback, for the end-to-end
//! tests of `crates/ztm/tests` and for `ztm bench`.
//!
//! Every process is started from a [`Ztm`], which names the binary under test (the tests give
//! `env!("CARGO_BIN_EXE_ztm")` through [`ztm!`], the benchmark its own executable). Each role
//! listens on `127.0.0.1:0` and the kit reads the address the kernel chose from the line the
//! role logs when it is up, so no port is picked first and bound later by someone else.
//!
//! - [`dir`]: temporary directories, small random numbers, files.
//! - [`proc`]: a process with its log; signals, stop, kill, waiting for log lines.
//! - [`roles`]: starting the CA, hubs and agents ([`Ztm::start_ca`], [`Ztm::start_hub`],
//!   [`Ztm::start_agent`] and their variants), restarting them.
//! - [`http`]: a raw HTTP/1.1 client (tests control every byte of the request line).
//! - [`mesh`]: users, joining, and what agents report (endpoints, services), through the REST
//!   API; [`mesh::setup`] starts a CA, hubs and two joined agents.
//! - [`stack`]: a CA, a hub and N agents joined as given users, with services and ports.
//! - [`traffic`]: backends behind services, clients through ports, data streams that check
//!   themselves.
//! - [`poll`]: waiting for a condition, with a deadline.
//! - [`procfs`]: RSS, CPU time, threads and descriptors of a process, and a peak-RSS sampler.
//! - [`hostile`]: a hand-made hostile agent and a flood of strangers; [`hostile::Honest`], honest
//!   users beside an attack.
//! - [`fake_hub`]: a compromised hub a real agent joins through.
//! - [`netns`]: network namespaces for the root-only tests, and code run inside one.
//!
//! `use ztm_testkit::prelude::*` brings what most tests use.
// Test code: a step that cannot be taken fails the test (or benchmark) at once, with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod dir;
pub mod fake_hub;
pub mod hostile;
pub mod http;
pub mod mesh;
pub mod netns;
pub mod poll;
pub mod proc;
pub mod procfs;
pub mod roles;
pub mod sim;
pub mod stack;
pub mod traffic;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

/// The `ztm` binary of the integration test that expands it: `ztm_testkit::Ztm` for
/// `env!("CARGO_BIN_EXE_ztm")`.
#[macro_export]
macro_rules! ztm {
    () => {
        $crate::Ztm::new(env!("CARGO_BIN_EXE_ztm"))
    };
}

/// The log filter (`ZTM_LOG`) that keeps the lines the kit reads addresses from: each role's
/// "listening on" line is logged at INFO by these modules.
pub const LISTEN_LINES: &str = "ztm::roles=info,ztm_hub::server=info";

/// A `ztm` binary and the environment every process started from it gets.
#[derive(Clone, Debug)]
pub struct Ztm {
    bin: Arc<PathBuf>,
    env: Vec<(String, String)>,
    /// The open-file limit (soft and hard) processes start with, if not the test's own.
    files: Option<u64>,
    /// The network namespace processes start in (under `ip netns exec`), if not the test's.
    netns: Option<String>,
}

impl Ztm {
    /// Processes of `bin`, logging at DEBUG (`ZTM_LOG=debug`).
    pub fn new(bin: impl Into<PathBuf>) -> Ztm {
        Ztm {
            bin: Arc::new(bin.into()),
            env: vec![("ZTM_LOG".into(), "debug".into())],
            files: None,
            netns: None,
        }
    }

    /// The same, with `key=value` in the environment of every process started.
    pub fn with_env(mut self, key: &str, value: &str) -> Ztm {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
        self
    }

    /// The same, with processes that may open at most `n` files, soft and hard limit (they
    /// start under util-linux's `prlimit`).
    pub fn with_files(mut self, n: u64) -> Ztm {
        self.files = Some(n);
        self
    }

    /// The same, with processes that start in network namespace `ns` under `ip netns exec`
    /// (which also mounts `/etc/netns/{ns}/*` over `/etc` for them; see [`netns`]).
    pub fn in_netns(mut self, ns: &str) -> Ztm {
        self.netns = Some(ns.to_string());
        self
    }

    /// The same, logging as `filter` says (a `ZTM_LOG` value), plus [`LISTEN_LINES`].
    pub fn with_log(self, filter: &str) -> Ztm {
        self.with_env("ZTM_LOG", &format!("{filter},{LISTEN_LINES}"))
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The binary as a string (for shell lines and `Command`s).
    pub fn bin_str(&self) -> &str {
        self.bin.to_str().expect("the ztm path is UTF-8")
    }

    /// `ztm` as a one-shot command in `home` (its working directory and `HOME`, so no user
    /// configuration leaks in), without the client's environment variables, stdin closed; in
    /// the namespace of [`Ztm::in_netns`] if one was given.
    pub fn command(&self, home: &Path) -> Command {
        let mut cmd = match &self.netns {
            None => Command::new(self.bin()),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(self.bin());
                c
            }
        };
        cmd.current_dir(home)
            .env("HOME", home)
            .env_remove("ZTM_AGENT")
            .env_remove("ZTM_MESH")
            .env_remove("ZTM_AGENT_TOKEN")
            .stdin(Stdio::null());
        cmd
    }

    /// Starts `ztm ARGS` in `dir` as `name` (its log is `dir/{name}.log`).
    pub fn spawn(&self, name: &str, dir: &Path, args: &[&str]) -> proc::Proc {
        self.spawn_env(name, dir, args, &[])
    }

    /// Like [`Ztm::spawn`], with `env` on top of the kit's environment.
    pub fn spawn_env(
        &self,
        name: &str,
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> proc::Proc {
        self.try_spawn(name, dir, args, env)
            .unwrap_or_else(|e| panic!("starting ztm {args:?}: {e:#}"))
    }

    /// Like [`Ztm::spawn_env`], with an error instead of a panic.
    pub fn try_spawn(
        &self,
        name: &str,
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<proc::Proc> {
        let mut all: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        all.extend_from_slice(env);
        // The command line: the binary, under prlimit, under `ip netns exec`.
        let limit = self.files.map(|n| format!("--nofile={n}:{n}"));
        let mut line: Vec<&str> = Vec::new();
        if let Some(ns) = &self.netns {
            line.extend(["ip", "netns", "exec", ns]);
        }
        if let Some(limit) = &limit {
            line.extend(["prlimit", limit, "--"]);
        }
        line.push(self.bin_str());
        line.extend_from_slice(args);
        proc::Proc::spawn(Path::new(line[0]), name, dir, &line[1..], &all)
    }
}

/// What most tests use.
pub mod prelude {
    pub use crate::dir::{rand_u64, write_file, Rng, TempDir};
    pub use crate::http::{
        delete, free_port, get, http, port_open, post, post_json, sh, try_json, try_req, wait_port,
        Resp,
    };
    pub use crate::mesh::*;
    pub use crate::poll::{runtime, time_until, until, wait_until};
    pub use crate::proc::Proc;
    pub use crate::roles::{AgentProc, CaProc, HubProc};
    pub use crate::{ztm, Ztm};
}
