//! Users, joining, and what agents report, through the CA's and the agents' REST APIs; and
//! [`setup`], a CA, hubs and two agents joined to one mesh. Polling helpers never panic on a
//! refused connection (agents and hubs get restarted, stopped and killed).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::dir::TempDir;
use crate::http::{get, http, post_json, try_json, try_req, Resp};
use crate::poll::wait_until;
use crate::roles::{AgentProc, CaProc, HubProc};
use crate::Ztm;

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
    try_create_user(ca_addr, name).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Like [`create_user`], with an error instead of a panic.
pub fn try_create_user(ca_addr: &str, name: &str) -> anyhow::Result<User> {
    let path = format!("/api/certificates/{name}");
    let k = http(ca_addr, "POST", &path, &[], b"").with_context(|| format!("POST {path}"))?;
    let key = k.text();
    if k.status != 200 || !key.contains("PRIVATE KEY") {
        bail!("create user {name}: {} {key}", k.status);
    }
    let c = http(ca_addr, "GET", &path, &[], b"").with_context(|| format!("GET {path}"))?;
    let cert = c.text();
    if c.status != 200 || !cert.contains("BEGIN CERTIFICATE") {
        bail!("get the certificate of {name}: {} {cert}", c.status);
    }
    Ok(User {
        name: name.to_string(),
        cert,
        key,
    })
}

/// The CA's own certificate, PEM.
pub fn ca_pem(ca_addr: &str) -> String {
    try_ca_pem(ca_addr).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Like [`ca_pem`], with an error instead of a panic.
pub fn try_ca_pem(ca_addr: &str) -> anyhow::Result<String> {
    let r = http(ca_addr, "GET", "/api/certificates/ca", &[], b"")
        .context("GET /api/certificates/ca")?;
    if r.status != 200 {
        bail!("GET /api/certificates/ca: {} {}", r.status, r.text());
    }
    Ok(r.text())
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

/// Joins MESH and asserts success (200/201); returns the Mesh JSON of the answer.
pub fn join_ok(agent: &str, ca_pem: &str, name: &str, user: &User, bootstraps: &[&str]) -> Value {
    try_join(agent, MESH, &join_body(ca_pem, name, user, bootstraps))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Joins `mesh`: the Mesh JSON of the answer, or an error unless it is 200/201 without the
/// private key in it.
pub fn try_join(agent: &str, mesh: &str, body: &Value) -> anyhow::Result<Value> {
    let name = &body["agent"]["name"];
    let r = try_req(agent, "POST", &format!("/api/meshes/{mesh}"), Some(body))
        .with_context(|| format!("join {name}: the agent at {agent} does not answer"))?;
    if r.status != 200 && r.status != 201 {
        bail!("join {name}: {} {}", r.status, r.text());
    }
    if r.text().contains("PRIVATE KEY") {
        bail!("the join answer contains the private key: {}", r.text());
    }
    serde_json::from_slice(&r.body).with_context(|| format!("join {name}: {}", r.text()))
}

/// `GET /api/meshes/{MESH}` (panics unless 200).
pub fn mesh_info(agent: &str) -> Value {
    let r = get(agent, &format!("/api/meshes/{MESH}"));
    assert_eq!(r.status, 200, "GET mesh: {}", r.text());
    r.json()
}

/// The local endpoint id of the agent in MESH.
pub fn local_id(agent: &str) -> String {
    try_local_id(agent, MESH).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The local endpoint id of the agent in `mesh`.
pub fn try_local_id(agent: &str, mesh: &str) -> anyhow::Result<String> {
    let m = try_json(agent, &format!("/api/meshes/{mesh}"))
        .with_context(|| format!("GET /api/meshes/{mesh} on {agent}"))?;
    match m["agent"]["id"].as_str() {
        Some(id) if !id.is_empty() => Ok(id.to_string()),
        _ => bail!("mesh {mesh} has no agent.id: {m}"),
    }
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

/// The round-trip time in milliseconds that a list of hub links (`hubs` of a mesh, or
/// `GET …/endpoints/{ep}/hubs`: `[{address, connected, rttMs?}]`) gives for the hub at `hub`,
/// if it is connected and has one.
pub fn hub_rtt_ms(hubs: &Value, hub: &str) -> Option<f64> {
    hubs.as_array()?
        .iter()
        .find(|h| h["address"] == hub && h["connected"] == true)?["rttMs"]
        .as_f64()
}

/// A round-trip time on loopback is more than nothing and far less than the timeouts.
pub fn plausible_rtt_ms(ms: f64) -> bool {
    ms > 0.0 && ms < 5_000.0
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

/// Whether `GET /api/meshes/{MESH}/services` on `api` lists `{proto}/{name}` provided by all
/// of `ids`.
pub fn discovered(api: &str, proto: &str, name: &str, ids: &[&str]) -> bool {
    service_seen(api, proto, name).is_some_and(|s| {
        s["endpoints"].as_array().is_some_and(|eps| {
            ids.iter()
                .all(|id| eps.iter().any(|e| e["id"].as_str() == Some(*id)))
        })
    })
}

/// `{proto}/{name}` as `GET /api/meshes/{MESH}/services` on `api` lists it.
pub fn service_seen(api: &str, proto: &str, name: &str) -> Option<Value> {
    let list = try_json(api, &format!("/api/meshes/{MESH}/services"))?;
    list.as_array()?
        .iter()
        .find(|s| s["name"] == name && s["protocol"] == proto)
        .cloned()
}

/// The ids of the endpoints `api` lists as providing `{proto}/{name}`, sorted.
pub fn providers_seen(api: &str, proto: &str, name: &str) -> Vec<String> {
    let mut ids: Vec<String> = service_seen(api, proto, name)
        .and_then(|s| s["endpoints"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

/// Agent `api` publishes `{proto}/{name}` on endpoint `ep`, backed by 127.0.0.1:`port`, for
/// `users` (everyone if None); asserts a 2xx answer.
pub fn add_service_at(
    api: &str,
    ep: &str,
    proto: &str,
    name: &str,
    port: u16,
    users: Option<&[&str]>,
) {
    let mut body = json!({"host": "127.0.0.1", "port": port});
    if let Some(u) = users {
        body["users"] = json!(u);
    }
    let path = format!("/api/meshes/{MESH}/endpoints/{ep}/services/{proto}/{name}");
    let r = post_json(api, &path, &body);
    assert!(is_2xx(&r), "POST {path}: {} {}", r.status, r.text());
}

/// Agent `api` maps 127.0.0.1:`port`/`proto` on endpoint `ep` to `service` (at `endpoint`, or
/// at any provider of any user); asserts that the port opened as asked, and returns it.
pub fn map_port_at(
    api: &str,
    ep: &str,
    proto: &str,
    port: u16,
    service: &str,
    endpoint: Option<&str>,
) -> Value {
    let mut target = json!({"service": service});
    match endpoint {
        Some(e) => target["endpoint"] = json!(e),
        // For tests of tunnels: a port without an endpoint reaches providers of every user (by
        // default only its own user's and root's; attack_mesh.rs tests that).
        None => target["trust"] = json!(["*"]),
    }
    let path = format!("/api/meshes/{MESH}/endpoints/{ep}/ports/127.0.0.1/{proto}/{port}");
    let r = post_json(api, &path, &json!({ "target": target }));
    assert!(is_2xx(&r), "POST {path}: {} {}", r.status, r.text());
    let v = r.json();
    assert_eq!(v["open"], true, "the port did not open: {v}");
    assert_eq!(v["listen"]["port"], port, "{v}");
    assert_eq!(v["protocol"], proto, "{v}");
    assert_eq!(v["target"]["service"], service, "{v}");
    v
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
pub fn setup(ztm: &Ztm, tag: &str, opts: NetOpts) -> Net {
    let dir = TempDir::new(tag);
    let ca = ztm.start_ca(dir.path());
    let ca_pem = ca_pem(&ca.addr);
    let a_user = create_user(&ca.addr, "root");
    let b_user = if opts.b_user == "root" {
        a_user.clone()
    } else {
        create_user(&ca.addr, opts.b_user)
    };
    let hubs: Vec<HubProc> = (0..opts.hubs)
        .map(|i| ztm.start_hub(dir.path(), &format!("hub{}", i + 1), &ca.addr))
        .collect();
    let a = ztm.start_agent(dir.path(), "a");
    let b = ztm.start_agent(dir.path(), "b");
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

/// How many times agent `api` has connected to a hub of the test mesh (its event log).
pub fn connections_made(api: &str) -> usize {
    get(api, &format!("/api/meshes/{MESH}/log"))
        .text()
        .matches("connected to hub")
        .count()
}

/// The value of the unlabelled gauge or counter `name` that the metrics listener at `metrics`
/// shows, or -1 if it shows none.
pub fn metric(metrics: &str, name: &str) -> f64 {
    get(metrics, "/metrics")
        .text()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1.0)
}
