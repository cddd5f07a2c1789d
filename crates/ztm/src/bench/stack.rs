//! The mesh under test, started by the test kit (`ztm_testkit`) from this executable: a CA, a
//! hub and two agents A and B (both root) as child processes on ports of 127.0.0.1 the kernel
//! chose, their databases and logs in a temporary directory; B's services, A's ports to them,
//! B's exit and A's proxy to it, and the plain relays. Dropping the stack kills the children and removes the directory
//! (`ZTM_BENCH_KEEP` keeps it).

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use ztm_testkit::dir::TempDir;
use ztm_testkit::mesh::{discovered, MESH};
use ztm_testkit::poll::poll;
use ztm_testkit::proc::Proc;
use ztm_testkit::Ztm;

/// A service published on B and the port mapped to it on A.
pub struct Mapping {
    pub service: &'static str,
    pub target: String,
}

/// The three plain reference relays, first hop first.
pub const PLAIN: [&str; 3] = ["plain-1", "plain-2", "plain-3"];

/// What a plain relay logs for each address it listens on (see `plain.rs`).
const PLAIN_LISTENING: &str = "plain relay listening on ";

/// The children and their directory; both cleaned up on drop (also on error paths).
pub struct Stack {
    /// The plain relays, first: they go before the directory does.
    plain: Vec<Proc>,
    mesh: ztm_testkit::stack::Stack,
    ztm: Ztm,
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::env::var_os("ZTM_BENCH_KEEP").is_some() {
            eprintln!("bench: keeping {}", self.mesh.dir.path().display());
            self.mesh.dir.keep();
        }
    }
}

impl Stack {
    fn procs_mut(&mut self) -> Vec<&mut Proc> {
        let mesh = &mut self.mesh;
        let mut all = vec![&mut mesh.ca.proc, &mut mesh.hub.proc];
        all.extend(mesh.agents.iter_mut().map(|a| &mut a.proc));
        all.extend(self.plain.iter_mut());
        all
    }

    fn procs(&self) -> Vec<&Proc> {
        let mesh = &self.mesh;
        let mut all = vec![&mesh.ca.proc, &mesh.hub.proc];
        all.extend(mesh.agents.iter().map(|a| &a.proc));
        all.extend(self.plain.iter());
        all
    }

    /// The CA, the hub and the agents.
    pub fn mesh(&self) -> &ztm_testkit::stack::Stack {
        &self.mesh
    }

    /// The process named `name`: ca, hub, agent-a, agent-b or one of [`PLAIN`].
    pub fn proc(&self, name: &str) -> Option<&Proc> {
        self.procs().into_iter().find(|p| p.name == name)
    }

    /// An error if any child has exited, with the end of its log.
    pub fn check_alive(&mut self) -> Result<()> {
        for p in self.procs_mut() {
            if let Some(st) = p.exited() {
                bail!(
                    "{} exited ({st}); end of its log:\n{}",
                    p.name,
                    p.log_tail(30)
                );
            }
        }
        Ok(())
    }

    /// `err` with the state of the children appended: a dead child's log, else the last
    /// warnings each child logged.
    pub fn explain(&mut self, err: anyhow::Error) -> anyhow::Error {
        if let Err(dead) = self.check_alive() {
            return err.context(format!("{dead:#}"));
        }
        let mut notes = String::new();
        for p in self.procs() {
            let text = p.log();
            let warnings: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            for l in &warnings[warnings.len().saturating_sub(3)..] {
                notes.push_str(&format!("\n  {}: {l}", p.name));
            }
        }
        if notes.is_empty() {
            err
        } else {
            err.context(format!("last warnings of the mesh processes:{notes}"))
        }
    }

    /// What a Prometheus watching the mesh would scrape: the hub's metrics listener and each
    /// agent's API (`GET /metrics`), by process name.
    pub fn scrape_targets(&mut self) -> Result<Vec<(&'static str, String)>> {
        let hub = self.mesh.hub.proc.wait_address(HUB_METRICS, START_WITHIN)?;
        let mut targets = vec![("hub", hub)];
        for (i, name) in ["agent-a", "agent-b"].into_iter().enumerate() {
            targets.push((name, self.mesh.api(i).to_string()));
        }
        Ok(targets)
    }

    /// Starts three chained plain relays (see `plain.rs`) in front of each of `targets`;
    /// returns the first hop's address for each target. The processes are the stack's: checked
    /// and stopped with it.
    pub fn start_plain(&mut self, targets: &[String]) -> Result<Vec<String>> {
        let mut next: Vec<String> = targets.to_vec();
        for name in PLAIN.iter().rev() {
            let mut args = vec!["bench-relay".to_string()];
            for to in &next {
                args.push("--map".into());
                args.push(format!("127.0.0.1:0={to}"));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut relay = self.ztm.try_spawn(name, self.mesh.dir.path(), &args, &[])?;
            let listening = relay.wait_addresses(PLAIN_LISTENING, next.len(), START_WITHIN);
            self.plain.push(relay);
            next = listening?;
        }
        Ok(next)
    }
}

/// What the hub logs with the address of its metrics listener.
const HUB_METRICS: &str = "hub metrics on ";

/// How long a process may take to come up.
const START_WITHIN: Duration = Duration::from_secs(30);

/// The processes' log filter: `ZTM_BENCH_LOG` (default `warn`), with the lines that tell
/// where each listens.
fn log_filter() -> String {
    let base = std::env::var("ZTM_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    format!("{base},ztm::bench::plain=info")
}

/// Starts the processes (with `env` set for them), joins both agents as root, publishes
/// `services` on B and maps a port on A to each; returns the stack and the tunnel address of
/// each service (same order).
pub async fn start(
    services: &[Mapping],
    env: &[(&'static str, &'static str)],
) -> Result<(Stack, Vec<String>)> {
    let (st, ports, _) = start_with_proxy(services, env, &[]).await?;
    Ok((st, ports))
}

/// [`start`], and unless `exit_allows` is empty: B becomes an exit allowing those addresses
/// and A opens a proxy (SOCKS5 and HTTP CONNECT) to it; its address comes third.
pub async fn start_with_proxy(
    services: &[Mapping],
    env: &[(&'static str, &'static str)],
    exit_allows: &[String],
) -> Result<(Stack, Vec<String>, Option<String>)> {
    let exit_allows = exit_allows.to_vec();
    let services: Vec<(&'static str, String)> = services
        .iter()
        .map(|m| (m.service, m.target.clone()))
        .collect();
    let env = env.to_vec();
    // The kit waits for processes and answers by polling: off the async runtime.
    tokio::task::spawn_blocking(move || {
        let exe = std::env::current_exe().context("locating the ztm executable")?;
        let mut ztm = Ztm::new(exe).with_log(&log_filter());
        if let Ok(n) = std::env::var("ZTM_BENCH_THREADS") {
            ztm = ztm.with_env("ZTM_THREADS", &n);
        }
        for (k, v) in env {
            ztm = ztm.with_env(k, v);
        }
        let dir = TempDir::try_with_prefix("ztm-bench")?;
        // The hub serves its metrics, as a watched hub would (`--scrape` reads them).
        let mesh = ztm_testkit::stack::Stack::try_start_with(
            &ztm,
            dir,
            &["root", "root"],
            &["--metrics", ztm_testkit::roles::ANY_PORT],
        )?;
        let mut stack = Stack {
            plain: Vec::new(),
            mesh,
            ztm,
        };
        let up = bring_up(&stack, &services).and_then(|ports| {
            let proxy = if exit_allows.is_empty() {
                None
            } else {
                Some(open_proxy(&stack, &exit_allows)?)
            };
            Ok((ports, proxy))
        });
        match up {
            Ok((ports, proxy)) => Ok((stack, ports, proxy)),
            Err(e) => Err(stack.explain(e)),
        }
    })
    .await?
}

/// One request to an agent's API; its JSON answer (Null if empty), or an error unless 2xx.
fn call(addr: &str, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let text = body.map(Value::to_string).unwrap_or_default();
    let headers: &[(&str, &str)] = match body {
        Some(_) => &[("Content-Type", "application/json")],
        None => &[],
    };
    let r = ztm_testkit::http::http(addr, method, path, headers, text.as_bytes())
        .with_context(|| format!("{method} {path} on {addr}"))?;
    if r.status >= 300 {
        bail!("{method} {path} on {addr}: {} {}", r.status, r.text());
    }
    if r.body.is_empty() {
        return Ok(Value::Null);
    }
    Ok(serde_json::from_slice(&r.body).unwrap_or_else(|_| Value::String(r.text())))
}

/// B publishes `services`; A discovers them and maps a port to each.
fn bring_up(st: &Stack, services: &[(&'static str, String)]) -> Result<Vec<String>> {
    let mesh = &st.mesh;
    let (a, b) = (mesh.api(0), mesh.api(1));
    let (a_id, b_id) = (&mesh.ids[0], &mesh.ids[1]);
    for (service, target) in services {
        let (host, port) = target
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("bad target {target}"))?;
        let port: u16 = port.parse()?;
        call(
            b,
            "POST",
            &format!("/api/meshes/{MESH}/endpoints/{b_id}/services/tcp/{service}"),
            Some(&json!({"host": host, "port": port})),
        )
        .with_context(|| format!("publishing {service} on B"))?;
    }
    poll(Duration::from_secs(30), || {
        services
            .iter()
            .all(|(service, _)| discovered(a, "tcp", service, &[b_id]))
            .then_some(())
    })
    .ok_or_else(|| anyhow!("A did not discover B's services within 30 s"))?;

    let mut ports = Vec::new();
    for (service, _) in services {
        // The agent's API takes the port as a number: one that was free a moment ago.
        let port = ztm_testkit::http::free_port();
        let path = format!("/api/meshes/{MESH}/endpoints/{a_id}/ports/127.0.0.1/tcp/{port}");
        call(
            a,
            "POST",
            &path,
            Some(&json!({"target": {"service": service}})),
        )
        .with_context(|| format!("mapping port {port} on A to {service}"))?;
        poll(Duration::from_secs(20), || {
            let r = call(a, "GET", &path, None).ok()?;
            (r["open"] == true).then_some(())
        })
        .ok_or_else(|| anyhow!("port {port} on A did not open within 20 s"))?;
        ports.push(format!("127.0.0.1:{port}"));
    }
    Ok(ports)
}

/// B becomes an exit allowing `allows`; once A sees it, A opens a proxy to it on a port of
/// 127.0.0.1. The proxy's address.
fn open_proxy(st: &Stack, allows: &[String]) -> Result<String> {
    let mesh = &st.mesh;
    let (a, b) = (mesh.api(0), mesh.api(1));
    let (a_id, b_id) = (&mesh.ids[0], &mesh.ids[1]);
    call(
        b,
        "POST",
        &format!("/api/meshes/{MESH}/endpoints/{b_id}/exit"),
        Some(&json!({ "allow": allows })),
    )
    .context("making B an exit")?;
    poll(Duration::from_secs(30), || {
        let exits = call(a, "GET", &format!("/api/meshes/{MESH}/exits"), None).ok()?;
        exits
            .as_array()?
            .iter()
            .any(|e| e["id"] == b_id.as_str())
            .then_some(())
    })
    .ok_or_else(|| anyhow!("A did not see B's exit within 30 s"))?;
    let port = ztm_testkit::http::free_port();
    let path = format!("/api/meshes/{MESH}/endpoints/{a_id}/proxies/127.0.0.1/{port}");
    call(a, "POST", &path, Some(&json!({"exit": {"endpoint": b_id}})))
        .with_context(|| format!("opening a proxy on A's port {port} to B's exit"))?;
    poll(Duration::from_secs(20), || {
        let r = call(a, "GET", &path, None).ok()?;
        (r["open"] == true).then_some(())
    })
    .ok_or_else(|| anyhow!("the proxy on A's port {port} did not open within 20 s"))?;
    Ok(format!("127.0.0.1:{port}"))
}
