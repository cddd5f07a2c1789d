//! The mesh under test: CA, hub and two agents as child processes of this executable on free
//! loopback ports, their databases and logs in a temporary directory. Dropping the stack kills
//! the children and removes the directory.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use serde_json::{json, Value};
use ztm_net::http1;

pub const MESH: &str = "bench";

/// One child process and where its log goes.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let v: Vec<&str> = text.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

/// Children and the temporary directory; both cleaned up on drop (also on error paths).
pub struct Stack {
    pub procs: Vec<Proc>,
    dir: PathBuf,
    keep: bool,
    pub ca: String,
    pub hub: String,
    pub a: String,
    pub b: String,
    pub b_id: String,
    /// Environment the hub and agents get on top of ours.
    env: Vec<(&'static str, &'static str)>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
        }
        for p in &mut self.procs {
            let _ = p.child.wait();
        }
        if self.keep {
            eprintln!("bench: keeping {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .context("finding a free port")?
        .local_addr()?
        .port())
}

pub fn free_addr() -> Result<String> {
    Ok(format!("127.0.0.1:{}", free_port()?))
}

fn temp_dir() -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("ztm-bench-{}-{nanos:x}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

impl Stack {
    fn new() -> Result<Stack> {
        Ok(Stack {
            procs: Vec::new(),
            dir: temp_dir()?,
            keep: std::env::var_os("ZTM_BENCH_KEEP").is_some(),
            ca: String::new(),
            hub: String::new(),
            a: String::new(),
            b: String::new(),
            b_id: String::new(),
            env: Vec::new(),
        })
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    fn spawn(&mut self, name: &'static str, args: &[&str]) -> Result<()> {
        let exe = std::env::current_exe().context("locating the ztm executable")?;
        let log = self.dir.join(format!("{name}.log"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(&exe);
        if let Ok(n) = std::env::var("ZTM_BENCH_THREADS") {
            cmd.env("ZTM_THREADS", n);
        }
        cmd.envs(self.env.iter().copied());
        let child = cmd
            .args(args)
            .current_dir(&self.dir)
            .env("HOME", &self.dir)
            .env(
                "ZTM_LOG",
                std::env::var("ZTM_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {} {name}", exe.display()))?;
        self.procs.push(Proc { name, child, log });
        Ok(())
    }

    pub fn proc(&self, name: &str) -> Option<&Proc> {
        self.procs.iter().find(|p| p.name == name)
    }

    /// An error if any child has exited, with the end of its log.
    pub fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.procs {
            if let Ok(Some(st)) = p.child.try_wait() {
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
        for p in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
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
}

async fn call(addr: &str, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let (ct, bytes) = match body {
        Some(v) => (Some("application/json"), Bytes::from(v.to_string())),
        None => (None, Bytes::new()),
    };
    let r = http1::request(addr, method, path, None, ct, bytes, Duration::from_secs(10)).await?;
    if r.status >= 300 {
        bail!("{method} {path} on {addr}: {} {}", r.status, r.text());
    }
    if r.body.is_empty() {
        return Ok(Value::Null);
    }
    Ok(serde_json::from_slice(&r.body).unwrap_or_else(|_| Value::String(r.text())))
}

async fn call_text(addr: &str, method: &str, path: &str) -> Result<String> {
    let r = http1::request(
        addr,
        method,
        path,
        None,
        None,
        Bytes::new(),
        Duration::from_secs(10),
    )
    .await?;
    if r.status >= 300 {
        bail!("{method} {path} on {addr}: {} {}", r.status, r.text());
    }
    Ok(r.text())
}

/// Polls `f` every 100 ms until it yields a value; an error naming `what` after `within`.
async fn poll<T, F, Fut>(within: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_http(addr: &str, path: &str) -> Result<()> {
    http1::wait_ready(addr, path, Duration::from_secs(30)).await
}

/// A service published on B and the port mapped to it on A.
pub struct Mapping {
    pub service: &'static str,
    pub target: String,
}

/// The three plain reference relays, first hop first.
pub const PLAIN: [&str; 3] = ["plain-1", "plain-2", "plain-3"];

impl Stack {
    /// Starts three chained plain relays (see `plain.rs`) in front of each of `targets`;
    /// returns the first hop's address for each target. The processes are the stack's: checked
    /// and stopped with it.
    pub fn start_plain(&mut self, targets: &[String]) -> Result<Vec<String>> {
        let mut next: Vec<String> = targets.to_vec();
        for name in PLAIN.iter().rev() {
            let mut maps = Vec::new();
            let mut listens = Vec::new();
            for to in &next {
                let listen = free_addr()?;
                maps.push("--map".to_string());
                maps.push(format!("{listen}={to}"));
                listens.push(listen);
            }
            let mut args = vec!["bench-relay"];
            args.extend(maps.iter().map(String::as_str));
            self.spawn(name, &args)?;
            next = listens;
        }
        Ok(next)
    }
}

/// Starts the processes (with `env` set for them), joins both agents as root, publishes
/// `services` on B and maps a port on A to each; returns the stack and the tunnel address of
/// each service (same order).
pub async fn start(
    services: &[Mapping],
    env: &[(&'static str, &'static str)],
) -> Result<(Stack, Vec<String>)> {
    let mut stack = Stack::new()?;
    stack.env = env.to_vec();
    match bring_up(&mut stack, services).await {
        Ok(ports) => Ok((stack, ports)),
        Err(e) => Err(stack.explain(e)),
    }
}

async fn bring_up(s: &mut Stack, services: &[Mapping]) -> Result<Vec<String>> {
    s.ca = free_addr()?;
    s.hub = free_addr()?;
    s.a = free_addr()?;
    s.b = free_addr()?;
    let (ca, hub, a, b) = (s.ca.clone(), s.hub.clone(), s.a.clone(), s.b.clone());
    let (ca_db, a_db, b_db) = (s.path("ca.db"), s.path("a.db"), s.path("b.db"));
    s.spawn("ca", &["ca", "--listen", &ca, "--database", &ca_db])?;
    wait_http(&ca, "/api/certificates/ca").await?;
    s.spawn(
        "hub",
        &["hub", "--listen", &hub, "--ca", &ca, "--name", &hub],
    )?;
    s.spawn("agent-a", &["agent", "--listen", &a, "--database", &a_db])?;
    s.spawn("agent-b", &["agent", "--listen", &b, "--database", &b_db])?;

    let key = call_text(&ca, "POST", "/api/certificates/root").await?;
    let cert = call_text(&ca, "GET", "/api/certificates/root").await?;
    let ca_pem = call_text(&ca, "GET", "/api/certificates/ca").await?;
    wait_http(&a, "/api/meshes").await?;
    wait_http(&b, "/api/meshes").await?;
    for (addr, name) in [(&a, "bench-a"), (&b, "bench-b")] {
        let body = json!({
            "ca": ca_pem,
            "agent": {"name": name, "certificate": cert, "privateKey": key},
            "bootstraps": [hub],
        });
        call(addr, "POST", &format!("/api/meshes/{MESH}"), Some(&body))
            .await
            .with_context(|| format!("joining {name}"))?;
    }
    let mesh = call(&b, "GET", &format!("/api/meshes/{MESH}"), None).await?;
    let b_id = mesh["agent"]["id"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow!("agent B reports no endpoint id: {mesh}"))?
        .to_string();
    s.b_id = b_id.clone();

    for m in services {
        let (host, port) = m
            .target
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("bad target {}", m.target))?;
        let port: u16 = port.parse()?;
        call(
            &b,
            "POST",
            &format!(
                "/api/meshes/{MESH}/endpoints/{b_id}/services/tcp/{}",
                m.service
            ),
            Some(&json!({"host": host, "port": port})),
        )
        .await
        .with_context(|| format!("publishing {} on B", m.service))?;
    }
    let names: Vec<&str> = services.iter().map(|m| m.service).collect();
    let a2 = a.clone();
    poll(
        Duration::from_secs(30),
        "A to discover B's services",
        || async {
            let list = call(&a2, "GET", &format!("/api/meshes/{MESH}/services"), None)
                .await
                .ok()?;
            let list = list.as_array()?;
            let found = names.iter().all(|n| {
                list.iter().any(|s| {
                    s["name"] == *n
                        && s["protocol"] == "tcp"
                        && s["endpoints"]
                            .as_array()
                            .is_some_and(|e| e.iter().any(|e| e["id"] == b_id.as_str()))
                })
            });
            found.then_some(())
        },
    )
    .await?;

    let a_mesh = call(&a, "GET", &format!("/api/meshes/{MESH}"), None).await?;
    let a_id = a_mesh["agent"]["id"]
        .as_str()
        .ok_or_else(|| anyhow!("agent A reports no endpoint id: {a_mesh}"))?
        .to_string();
    let mut ports = Vec::new();
    for m in services {
        let port = free_port()?;
        let path = format!("/api/meshes/{MESH}/endpoints/{a_id}/ports/127.0.0.1/tcp/{port}");
        let body = json!({"target": {"service": m.service}});
        call(&a, "POST", &path, Some(&body))
            .await
            .with_context(|| format!("mapping port {port} on A to {}", m.service))?;
        let a3 = a.clone();
        poll(
            Duration::from_secs(20),
            &format!("port {port} on A to open"),
            || async {
                let r = call(&a3, "GET", &path, None).await.ok()?;
                (r["open"] == true).then_some(())
            },
        )
        .await?;
        ports.push(format!("127.0.0.1:{port}"));
    }
    Ok(ports)
}
