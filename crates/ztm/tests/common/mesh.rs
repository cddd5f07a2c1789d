//! Helpers for the control-plane end-to-end tests: a CA, hubs and agents as real processes on
//! loopback, joined to one mesh through the agents' REST API, and polling helpers that never
//! panic on a refused connection (agents and hubs get restarted, stopped and killed).
#![allow(dead_code)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;

/// The mesh every test joins.
pub const MESH: &str = "m";

/// A user certificate and its private key, as the CA handed them out.
#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub cert: String,
    pub key: String,
}

/// Issues a user at the CA (`POST` returns the key, `GET` the certificate).
pub fn create_user(ca_addr: &str, name: &str) -> User {
    let k = post(ca_addr, &format!("/api/certificates/{name}"), "");
    assert_eq!(k.status, 200, "create user {name}: {}", k.text());
    let key = k.text();
    assert!(key.contains("PRIVATE KEY"), "{key}");
    let c = get(ca_addr, &format!("/api/certificates/{name}"));
    assert_eq!(c.status, 200, "get cert {name}: {}", c.text());
    let cert = c.text();
    assert!(cert.contains("BEGIN CERTIFICATE"), "{cert}");
    User {
        name: name.to_string(),
        cert,
        key,
    }
}

/// The CA's own certificate, PEM.
pub fn ca_pem(ca_addr: &str) -> String {
    let r = get(ca_addr, "/api/certificates/ca");
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

/// Starts a second, unrelated CA in `dir/sub`.
pub fn start_other_ca(dir: &Path, sub: &str) -> CaProc {
    let d = dir.join(sub);
    std::fs::create_dir_all(&d).unwrap();
    start_ca(&d)
}

/// A running hub.
pub struct HubProc {
    pub proc: Proc,
    pub addr: String,
    pub tag: String,
    dir: PathBuf,
    ca_addr: String,
}

/// Starts `ztm hub` on a fresh port and waits until it accepts connections.
pub fn start_hub(dir: &Path, tag: &str, ca_addr: &str) -> HubProc {
    let addr = format!("127.0.0.1:{}", free_port());
    start_hub_on(dir, tag, ca_addr, &addr)
}

/// Starts `ztm hub` on `addr` and waits until it accepts connections.
pub fn start_hub_on(dir: &Path, tag: &str, ca_addr: &str, addr: &str) -> HubProc {
    let proc = spawn_hub(dir, tag, ca_addr, addr);
    wait_port(addr, Duration::from_secs(20));
    HubProc {
        proc,
        addr: addr.to_string(),
        tag: tag.to_string(),
        dir: dir.to_path_buf(),
        ca_addr: ca_addr.to_string(),
    }
}

/// Spawns `ztm hub` on `addr` without waiting for its port.
pub fn spawn_hub(dir: &Path, tag: &str, ca_addr: &str, addr: &str) -> Proc {
    spawn_hub_with(dir, tag, ca_addr, addr, &[])
}

/// Spawns `ztm hub` on `addr` with `extra` flags, without waiting for its port.
pub fn spawn_hub_with(dir: &Path, tag: &str, ca_addr: &str, addr: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["hub", "--listen", addr, "--ca", ca_addr, "--name", addr];
    args.extend_from_slice(extra);
    Proc::spawn(tag, dir, &args)
}

/// Starts `ztm hub` with `extra` flags on a fresh port and waits until it accepts connections.
pub fn start_hub_with(dir: &Path, tag: &str, ca_addr: &str, extra: &[&str]) -> HubProc {
    let addr = format!("127.0.0.1:{}", free_port());
    let proc = spawn_hub_with(dir, tag, ca_addr, &addr, extra);
    wait_port(&addr, Duration::from_secs(20));
    HubProc {
        proc,
        addr,
        tag: tag.to_string(),
        dir: dir.to_path_buf(),
        ca_addr: ca_addr.to_string(),
    }
}

impl HubProc {
    /// Starts the hub again on the same port (after `kill9`); returns when the port accepts.
    pub fn restart(&mut self) {
        self.proc = spawn_hub(&self.dir, &self.tag, &self.ca_addr, &self.addr);
        wait_port(&self.addr, Duration::from_secs(20));
    }
}

/// A running agent (REST API on `addr`, state in `db`).
pub struct AgentProc {
    pub proc: Proc,
    pub addr: String,
    pub db: PathBuf,
    pub tag: String,
    dir: PathBuf,
    extra: Vec<String>,
}

/// Starts `ztm agent` on a fresh port with database `dir/{tag}.db`.
pub fn start_agent(dir: &Path, tag: &str) -> AgentProc {
    start_agent_with(dir, tag, &[])
}

/// Like `start_agent`, with `extra` command-line arguments (`--token T`, say).
pub fn start_agent_with(dir: &Path, tag: &str, extra: &[&str]) -> AgentProc {
    let addr = format!("127.0.0.1:{}", free_port());
    let db = dir.join(format!("{tag}.db"));
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let proc = spawn_agent(dir, tag, &addr, &db, &extra);
    wait_port(&addr, Duration::from_secs(20));
    AgentProc {
        proc,
        addr,
        db,
        tag: tag.to_string(),
        dir: dir.to_path_buf(),
        extra,
    }
}

fn spawn_agent(dir: &Path, tag: &str, addr: &str, db: &Path, extra: &[String]) -> Proc {
    let mut args = vec![
        "agent",
        "--listen",
        addr,
        "--database",
        db.to_str().unwrap(),
    ];
    args.extend(extra.iter().map(String::as_str));
    Proc::spawn(&format!("agent-{tag}"), dir, &args)
}

impl AgentProc {
    /// Starts the agent again on the same port and database (after `stop` or `kill9`).
    pub fn restart(&mut self) {
        self.proc = spawn_agent(&self.dir, &self.tag, &self.addr, &self.db, &self.extra);
        wait_port(&self.addr, Duration::from_secs(20));
    }
}

/// The JSON body of a join request.
pub fn join_body(ca_pem: &str, name: &str, user: &User, bootstraps: &[&str]) -> Value {
    json!({
        "ca": ca_pem,
        "agent": {"name": name, "certificate": user.cert, "privateKey": user.key},
        "bootstraps": bootstraps,
    })
}

/// `POST /api/meshes/{mesh}` on an agent.
pub fn join(agent: &str, mesh: &str, body: &Value) -> Resp {
    post_json(agent, &format!("/api/meshes/{mesh}"), body)
}

/// Joins and asserts success (200/201); returns the Mesh JSON of the answer.
pub fn join_ok(agent: &str, ca_pem: &str, name: &str, user: &User, bootstraps: &[&str]) -> Value {
    let r = join(agent, MESH, &join_body(ca_pem, name, user, bootstraps));
    assert!(
        r.status == 200 || r.status == 201,
        "join {name}: {} {}",
        r.status,
        r.text()
    );
    assert!(
        !r.text().contains("PRIVATE KEY"),
        "the join answer contains the private key: {}",
        r.text()
    );
    r.json()
}

/// One request that may fail (process down, stopped, restarting): None on any I/O error.
pub fn try_req(addr: &str, method: &str, path: &str, body: Option<&Value>) -> Option<Resp> {
    let b = body.map(|v| v.to_string()).unwrap_or_default();
    let headers: &[(&str, &str)] = if body.is_some() {
        &[("Content-Type", "application/json")]
    } else {
        &[]
    };
    http(addr, method, path, headers, b.as_bytes()).ok()
}

/// `GET` answering 200 with JSON, or None.
pub fn try_json(addr: &str, path: &str) -> Option<Value> {
    let r = try_req(addr, "GET", path, None)?;
    if r.status != 200 {
        return None;
    }
    serde_json::from_slice(&r.body).ok()
}

/// `GET /api/meshes/{MESH}` (panics unless 200).
pub fn mesh_info(agent: &str) -> Value {
    let r = get(agent, &format!("/api/meshes/{MESH}"));
    assert_eq!(r.status, 200, "GET mesh: {}", r.text());
    r.json()
}

/// The local endpoint id of the agent in MESH.
pub fn local_id(agent: &str) -> String {
    let m = mesh_info(agent);
    let id = m["agent"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("mesh has no agent.id: {m}"))
        .to_string();
    assert!(!id.is_empty(), "{m}");
    id
}

/// `GET /api/meshes/{MESH}/endpoints`, or None if the agent does not answer.
pub fn endpoints(agent: &str) -> Option<Vec<Value>> {
    try_json(agent, &format!("/api/meshes/{MESH}/endpoints"))?
        .as_array()
        .cloned()
}

/// The endpoint `ep` as `agent` lists it.
pub fn endpoint(agent: &str, ep: &str) -> Option<Value> {
    endpoints(agent)?.into_iter().find(|e| e["id"] == ep)
}

/// Whether `agent` lists `ep` as online.
pub fn is_online(agent: &str, ep: &str) -> bool {
    endpoint(agent, ep).is_some_and(|e| e["online"] == true)
}

/// Whether `agent` lists `ep` as offline (or no longer lists it) while answering.
pub fn is_offline(agent: &str, ep: &str) -> bool {
    match endpoints(agent) {
        None => false,
        Some(list) => !list.iter().any(|e| e["id"] == ep && e["online"] == true),
    }
}

/// Whether the agent's MESH reports `connected: true`.
pub fn is_connected(agent: &str) -> bool {
    try_json(agent, &format!("/api/meshes/{MESH}")).is_some_and(|m| m["connected"] == true)
}

pub fn svc_path(ep: &str, name: &str) -> String {
    format!("/api/meshes/{MESH}/endpoints/{ep}/services/tcp/{name}")
}

/// `POST .../endpoints/{ep}/services/tcp/{name}` through `agent`.
pub fn create_service(agent: &str, ep: &str, name: &str, port: u16) -> Resp {
    post_json(
        agent,
        &svc_path(ep, name),
        &json!({"host": "127.0.0.1", "port": port}),
    )
}

/// Non-panicking variant of `create_service`.
pub fn try_create_service(agent: &str, ep: &str, name: &str, port: u16) -> Option<Resp> {
    try_req(
        agent,
        "POST",
        &svc_path(ep, name),
        Some(&json!({"host": "127.0.0.1", "port": port})),
    )
}

/// `GET .../endpoints/{ep}/services` through `agent`, or None unless 200.
pub fn services_on(agent: &str, ep: &str) -> Option<Vec<Value>> {
    try_json(
        agent,
        &format!("/api/meshes/{MESH}/endpoints/{ep}/services"),
    )?
    .as_array()
    .cloned()
}

/// Whether a list of services has `tcp/{name}`.
pub fn has_service(list: &[Value], name: &str) -> bool {
    list.iter()
        .any(|s| s["name"] == name && s["protocol"] == "tcp")
}

/// Whether `GET /api/meshes/{MESH}/services` on `agent` lists `tcp/{name}` provided by `ep`.
pub fn discovers(agent: &str, name: &str, ep: &str) -> bool {
    let Some(list) = try_json(agent, &format!("/api/meshes/{MESH}/services")) else {
        return false;
    };
    list.as_array().is_some_and(|l| {
        l.iter().any(|s| {
            s["name"] == name
                && s["protocol"] == "tcp"
                && s["endpoints"]
                    .as_array()
                    .is_some_and(|eps| eps.iter().any(|e| e["id"] == ep))
        })
    })
}

pub fn is_2xx(r: &Resp) -> bool {
    (200..300).contains(&r.status)
}

/// Times one `GET /api/meshes`; panics unless it answers 200.
pub fn timed_list_meshes(agent: &str) -> Duration {
    let t = Instant::now();
    let r = http(agent, "GET", "/api/meshes", &[], b"")
        .unwrap_or_else(|e| panic!("GET /api/meshes on {agent}: {e}"));
    let took = t.elapsed();
    assert_eq!(r.status, 200, "GET /api/meshes: {}", r.text());
    took
}

/// Whether something accepts TCP connections on `addr` right now.
pub fn port_open(addr: &str) -> bool {
    TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200)).is_ok()
}

/// A CA, hubs and two agents A and B joined to MESH.
pub struct Net {
    pub a: AgentProc,
    pub b: AgentProc,
    pub hubs: Vec<HubProc>,
    pub ca: CaProc,
    pub ca_pem: String,
    pub a_user: User,
    pub b_user: User,
    pub a_id: String,
    pub b_id: String,
    /// Last, so that processes are gone (and their logs printed) before it is removed.
    pub dir: TempDir,
}

pub struct NetOpts<'a> {
    /// User name of B ("root" reuses A's certificate).
    pub b_user: &'a str,
    pub hubs: usize,
    /// B lists the hubs in reverse order (A lists them in order).
    pub b_reversed: bool,
    /// How long to wait for both endpoints to be online as seen from both agents.
    pub online_within: Duration,
}

impl Default for NetOpts<'_> {
    fn default() -> Self {
        NetOpts {
            b_user: "bob",
            hubs: 1,
            b_reversed: false,
            online_within: Duration::from_secs(15),
        }
    }
}

/// Starts CA, hubs and agents; joins A as `root` and B as `opts.b_user`; waits until both are
/// online as seen from both agents.
pub fn setup(tag: &str, opts: NetOpts) -> Net {
    let dir = TempDir::new(tag);
    let ca = start_ca(dir.path());
    let ca_pem = ca_pem(&ca.addr);
    let a_user = create_user(&ca.addr, "root");
    let b_user = if opts.b_user == "root" {
        a_user.clone()
    } else {
        create_user(&ca.addr, opts.b_user)
    };
    let hubs: Vec<HubProc> = (0..opts.hubs)
        .map(|i| start_hub(dir.path(), &format!("hub{}", i + 1), &ca.addr))
        .collect();
    let a = start_agent(dir.path(), "a");
    let b = start_agent(dir.path(), "b");
    let mut boots: Vec<&str> = hubs.iter().map(|h| h.addr.as_str()).collect();
    join_ok(&a.addr, &ca_pem, "a", &a_user, &boots);
    if opts.b_reversed {
        boots.reverse();
    }
    join_ok(&b.addr, &ca_pem, "b", &b_user, &boots);
    let a_id = local_id(&a.addr);
    let b_id = local_id(&b.addr);
    assert_ne!(a_id, b_id, "two agents got the same endpoint id");
    let net = Net {
        a,
        b,
        hubs,
        ca,
        ca_pem,
        a_user,
        b_user,
        a_id,
        b_id,
        dir,
    };
    wait_until(
        opts.online_within,
        "A and B online as seen from both agents",
        || net.all_online(),
    );
    net
}

impl Net {
    /// Both endpoints online as seen from A.
    pub fn online_from_a(&self) -> bool {
        is_online(&self.a.addr, &self.a_id) && is_online(&self.a.addr, &self.b_id)
    }
    /// Both endpoints online as seen from both agents.
    pub fn all_online(&self) -> bool {
        self.online_from_a()
            && is_online(&self.b.addr, &self.a_id)
            && is_online(&self.b.addr, &self.b_id)
    }
    /// A readable summary of what both agents report, for assertion messages.
    pub fn state(&self) -> String {
        let mut s = String::new();
        for (n, ag) in [("A", &self.a), ("B", &self.b)] {
            s.push_str(&format!(
                "\n{n} mesh: {}\n{n} endpoints: {}",
                try_json(&ag.addr, &format!("/api/meshes/{MESH}"))
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "<no answer>".into()),
                try_json(&ag.addr, &format!("/api/meshes/{MESH}/endpoints"))
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "<no answer>".into()),
            ));
        }
        s
    }
}

/// Writes `text` to `dir/name` and returns the path as a string.
pub fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// A small xorshift generator for junk bytes.
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        Rng(rand_u64() | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}
