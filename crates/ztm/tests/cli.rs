//! End-to-end tests of the `ztm` command-line client: the real binary against a real CA, hub
//! and agents on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use ztm_testkit::prelude::*;

const S: fn(u64) -> Duration = Duration::from_secs;

/// What one `ztm` run did.
#[derive(Debug)]
struct Run {
    code: i32,
    out: String,
    err: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.code == 0
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.out).unwrap_or_else(|e| {
            panic!("`-o json` printed something that is not JSON ({e}): {self:?}")
        })
    }
    /// The data rows of a table as whitespace-separated cells, keyed by the header.
    fn rows(&self) -> Vec<Vec<(String, String)>> {
        let mut lines = self.out.lines();
        let Some(header) = lines.next() else {
            return Vec::new();
        };
        let cols: Vec<&str> = header.split_whitespace().collect();
        lines
            .map(|l| {
                cols.iter()
                    .zip(l.split_whitespace())
                    .map(|(c, v)| (c.to_string(), v.to_string()))
                    .collect()
            })
            .collect()
    }
}

/// The round-trip time `describe ep` shows for hub `hub`, connected, in its "Hubs:" table
/// (`HUB  CONNECTED  RTT` rows: `ADDRESS  yes  0.213 ms`).
fn hub_rtt_shown(out: &str, hub: &str) -> Option<f64> {
    let table = out.split("Hubs:\n").nth(1)?;
    let row = table.lines().find(|l| l.trim_start().starts_with(hub))?;
    match row.split_whitespace().collect::<Vec<_>>()[..] {
        [_, "yes", ms, "ms"] => ms.parse().ok(),
        _ => None,
    }
}

fn cell<'a>(row: &'a [(String, String)], col: &str) -> Option<&'a str> {
    row.iter().find(|(c, _)| c == col).map(|(_, v)| v.as_str())
}

/// Runs `ztm ARGS` with HOME = `home` (so no user config leaks in) and the given environment.
fn ztm_env(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = ztm!().command(home);
    cmd.args(args).env_remove("ZTM_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ztm(home: &Path, args: &[&str]) -> Run {
    ztm_env(home, args, &[])
}

/// Runs `ztm ARGS --agent AGENT` and asserts exit 0.
fn ztm_ok(home: &Path, agent: &str, args: &[&str]) -> Run {
    let mut all = args.to_vec();
    all.extend(["--agent", agent]);
    let r = ztm(home, &all);
    assert!(r.ok(), "ztm {all:?} failed: {r:?}");
    r
}

/// Runs `ztm ARGS --agent AGENT` (whatever the outcome).
fn ztm_at(home: &Path, agent: &str, args: &[&str]) -> Run {
    let mut all = args.to_vec();
    all.extend(["--agent", agent]);
    ztm(home, &all)
}

const REPLY: &[u8] = b"hello from B\n";

/// A TCP server that answers every connection with REPLY after reading its first bytes.
fn reply_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(S(10)));
                let mut buf = [0u8; 64];
                if matches!(c.read(&mut buf), Ok(n) if n > 0) {
                    let _ = c.write_all(REPLY);
                }
            });
        }
    });
    port
}

/// Connects to `addr`, sends a line and returns what comes back until the peer closes.
fn exchange(addr: &str) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, S(2)).ok()?;
    s.set_read_timeout(Some(S(10))).ok()?;
    s.write_all(b"ping\n").ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < REPLY.len() {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    Some(got)
}

/// The endpoints as `ztm get ep` shows them: name -> row.
fn ep_rows(home: &Path, agent: &str) -> Vec<Vec<(String, String)>> {
    let r = ztm_at(home, agent, &["get", "ep"]);
    if !r.ok() {
        return Vec::new();
    }
    r.rows()
}

fn row_named<'a>(
    rows: &'a [Vec<(String, String)>],
    name: &str,
) -> Option<&'a Vec<(String, String)>> {
    rows.iter().find(|r| cell(r, "NAME") == Some(name))
}

/// Join, list endpoints, a service on a remote endpoint, a port to it, traffic, `-o json`,
/// deletes, mesh selection, the config file and the environment.
#[test]
fn cli_drives_a_mesh() {
    let dir = TempDir::new("cli");
    let home = dir.path();
    let ca = ztm!().start_ca(home);
    let ca_cert = ca_pem(&ca.addr);
    let root = create_user(&ca.addr, "root");
    let bob = create_user(&ca.addr, "bob");
    write_file(home, "ca.crt", &ca_cert);
    write_file(home, "root.crt", &root.cert);
    write_file(home, "root.key", &root.key);
    write_file(home, "bob.crt", &bob.cert);
    write_file(home, "bob.key", &bob.key);
    let hub = ztm!().start_hub(home, "hub", &ca.addr);
    let a = ztm!().start_agent(home, "a");
    let b = ztm!().start_agent(home, "b");

    // Before joining: no mesh to work in is the agent's state, not a usage error.
    let r = ztm_at(home, &a.addr, &["get", "ep"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.err.contains("no mesh"), "{r:?}");

    // Join both with `ztm join`, from the PEM files the CA handed out.
    let r = ztm_ok(
        home,
        &a.addr,
        &[
            "join", MESH, "--as", "a", "--hub", &hub.addr, "--ca", "ca.crt", "--cert", "root.crt",
            "--key", "root.key",
        ],
    );
    assert!(r.out.contains("joined mesh m"), "{r:?}");
    let r = ztm_ok(
        home,
        &b.addr,
        &[
            "join", MESH, "--as", "b", "--hub", &hub.addr, "--ca", "ca.crt", "--cert", "bob.crt",
            "--key", "bob.key", "-o", "json",
        ],
    );
    let joined = r.json();
    assert_eq!(joined["name"], MESH, "{joined}");
    assert_eq!(joined["agent"]["username"], "bob", "{joined}");
    let a_id = local_id(&a.addr);
    let b_id = local_id(&b.addr);

    // A bad key file is the agent refusing: exit 1, its message on one line.
    let r = ztm_at(
        home,
        &a.addr,
        &[
            "join", "other", "--hub", &hub.addr, "--ca", "ca.crt", "--cert", "root.crt", "--key",
            "bob.key",
        ],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(r.err.lines().count(), 1, "{r:?}");
    assert!(r.err.starts_with("ztm: "), "{r:?}");
    // A missing file too.
    let r = ztm_at(
        home,
        &a.addr,
        &[
            "join", "other", "--hub", &hub.addr, "--ca", "nope.crt", "--cert", "root.crt", "--key",
            "root.key",
        ],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.err.contains("nope.crt"), "{r:?}");

    // List endpoints: both online, A marked as the local one.
    wait_until(S(20), "ztm get ep on A shows a and b online", || {
        let rows = ep_rows(home, &a.addr);
        let online = |n: &str| row_named(&rows, n).and_then(|r| cell(r, "ONLINE")) == Some("yes");
        online("a") && online("b")
    });
    let rows = ep_rows(home, &a.addr);
    let ra = row_named(&rows, "a").unwrap();
    let rb = row_named(&rows, "b").unwrap();
    assert_eq!(cell(ra, "ID"), Some(a_id.as_str()), "{rows:?}");
    assert_eq!(cell(rb, "ID"), Some(b_id.as_str()), "{rows:?}");
    assert_eq!(cell(ra, "USER"), Some("root"), "{rows:?}");
    assert_eq!(cell(rb, "USER"), Some("bob"), "{rows:?}");
    assert_eq!(cell(ra, "LOCAL"), Some("*"), "{rows:?}");
    assert_ne!(cell(rb, "LOCAL"), Some("*"), "{rows:?}");
    assert!(
        cell(rb, "ADDRESS").is_some_and(|a| a.contains(':')),
        "{rows:?}"
    );
    // The header names the columns the issue asks for.
    let r = ztm_ok(home, &a.addr, &["get", "endpoints"]);
    for col in ["NAME", "ONLINE", "USER", "ADDRESS"] {
        assert!(r.out.lines().next().unwrap_or("").contains(col), "{r:?}");
    }

    // `-o json` is the API's answer (heartbeats move, so compare the rest).
    let strip = |v: &Value| -> Vec<Value> {
        let mut l: Vec<Value> = v
            .as_array()
            .unwrap_or_else(|| panic!("not a list: {v}"))
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.as_object_mut().unwrap().remove("heartbeat");
                e
            })
            .collect();
        l.sort_by_key(|e| e["id"].as_str().unwrap_or("").to_string());
        l
    };
    let cli_eps = ztm_ok(home, &a.addr, &["get", "ep", "-o", "json"]).json();
    let api_eps = get(&a.addr, &format!("/api/meshes/{MESH}/endpoints")).json();
    assert_eq!(strip(&cli_eps), strip(&api_eps));

    // Create a service on B (by name) from A.
    let svc_port = reply_server();
    let r = ztm_ok(
        home,
        &a.addr,
        &[
            "create",
            "svc",
            "tcp/greet",
            "--host",
            "127.0.0.1",
            "--port",
            &svc_port.to_string(),
            "--ep",
            "b",
        ],
    );
    assert!(r.out.contains("tcp/greet"), "{r:?}");
    let on_b = services_on(&b.addr, &b_id).unwrap_or_default();
    assert!(has_service(&on_b, "greet"), "B's services: {on_b:?}");
    // It is B's service (listed through A's view of B).
    let r = ztm_ok(home, &a.addr, &["get", "svc", "--ep", "b"]);
    assert!(r.out.contains("tcp/greet"), "{r:?}");
    // A discovers it.
    wait_until(
        S(20),
        "ztm get svc on A lists tcp/greet provided by b",
        || {
            let r = ztm_at(home, &a.addr, &["get", "svc"]);
            r.ok()
                && r.rows().iter().any(|row| {
                    cell(row, "NAME") == Some("tcp/greet") && cell(row, "ENDPOINTS") == Some("b")
                })
        },
    );
    let r = ztm_ok(home, &a.addr, &["describe", "ep", "b"]);
    assert!(r.out.contains(&b_id) && r.out.contains("bob"), "{r:?}");
    assert!(r.out.contains("tcp/greet"), "B's services not shown: {r:?}");
    // Its hubs, as B sees them (asked through the hub), and this endpoint's own.
    for ep in ["b", "a"] {
        let r = ztm_ok(home, &a.addr, &["describe", "ep", ep]);
        let ms = hub_rtt_shown(&r.out, &hub.addr)
            .unwrap_or_else(|| panic!("no RTT to the hub for {ep}: {r:?}"));
        assert!(plausible_rtt_ms(ms), "{ms} ms: {r:?}");
    }
    let r = ztm_ok(home, &a.addr, &["describe", "svc", "tcp/greet"]);
    assert!(r.out.contains(&b_id), "{r:?}");

    // A port on A to it; traffic flows through it.
    let local_port = free_port();
    let listen = format!("127.0.0.1:{local_port}");
    let r = ztm_ok(
        home,
        &a.addr,
        &[
            "create",
            "port",
            &listen,
            "--proto",
            "tcp",
            "--service",
            "greet",
            "--target-ep",
            "b",
        ],
    );
    assert!(r.out.contains("greet"), "{r:?}");
    wait_until(S(20), "a reply through A's port to B's service", || {
        exchange(&listen).as_deref() == Some(REPLY)
    });
    for _ in 0..3 {
        assert_eq!(exchange(&listen).as_deref(), Some(REPLY));
    }
    // The port's figures: no connection open once the exchanges closed, at least the four
    // that got a reply opened, and their bytes (5 each way in, 13 back).
    let mut r = ztm_ok(home, &a.addr, &["get", "port"]);
    wait_until(S(10), "no tunnel active on A's port", || {
        r = ztm_ok(home, &a.addr, &["get", "port"]);
        r.rows().first().and_then(|row| cell(row, "ACTIVE")) == Some("0")
    });
    let rows = r.rows();
    assert_eq!(rows.len(), 1, "{r:?}");
    assert_eq!(cell(&rows[0], "LISTEN"), Some(listen.as_str()), "{r:?}");
    assert_eq!(cell(&rows[0], "SERVICE"), Some("greet"), "{r:?}");
    assert_eq!(cell(&rows[0], "OPEN"), Some("yes"), "{r:?}");
    let number = |col: &str| -> u64 {
        cell(&rows[0], col)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{col}: {r:?}"))
    };
    assert!(number("TOTAL") >= 4, "{r:?}");
    let _ = number("FAILED");
    let bytes = |col: &str| -> u64 {
        cell(&rows[0], col)
            .and_then(|v| v.strip_suffix('B')?.parse().ok())
            .unwrap_or_else(|| panic!("{col}: {r:?}"))
    };
    assert!(bytes("TO-SVC") >= 4 * 5, "{r:?}");
    assert!(bytes("FROM-SVC") >= 4 * REPLY.len() as u64, "{r:?}");
    let r = ztm_ok(
        home,
        &a.addr,
        &["describe", "port", &local_port.to_string()],
    );
    assert!(r.out.contains("greet"), "{r:?}");
    assert!(
        r.out
            .lines()
            .any(|l| l.starts_with("Tunnels open:") && l.ends_with(" 0")),
        "{r:?}"
    );
    assert!(r.out.contains("From the service:"), "{r:?}");

    // `-o json` matches the API for ports, services and meshes.
    let ports_path = format!("/api/meshes/{MESH}/endpoints/{a_id}/ports");
    let cli = ztm_ok(home, &a.addr, &["get", "port", "-o", "json"]).json();
    assert_eq!(cli, get(&a.addr, &ports_path).json());
    assert_eq!(cli[0]["target"]["service"], "greet", "{cli}");
    let b_svcs = format!("/api/meshes/{MESH}/endpoints/{b_id}/services");
    let cli = ztm_ok(home, &a.addr, &["get", "svc", "--ep", &b_id, "-o", "json"]).json();
    assert_eq!(cli, get(&a.addr, &b_svcs).json());
    let cli = ztm_ok(home, &a.addr, &["describe", "ep", "b", "-o", "json"]).json();
    assert_eq!(cli["id"], b_id.as_str(), "{cli}");
    wait_until(
        S(10),
        "`ztm get mesh -o json` equal to GET /api/meshes",
        || {
            let cli = ztm_at(home, &a.addr, &["get", "mesh", "-o", "json"]);
            cli.ok() && cli.json() == get(&a.addr, "/api/meshes").json()
        },
    );

    // Delete both.
    ztm_ok(
        home,
        &a.addr,
        &["delete", "port", &local_port.to_string(), "--proto", "tcp"],
    );
    let left = get(&a.addr, &ports_path).json();
    assert_eq!(left, serde_json::json!([]), "{left}");
    wait_until(S(10), "A's port closed", || !port_open(&listen));
    ztm_ok(home, &a.addr, &["delete", "svc", "tcp/greet", "--ep", "b"]);
    let on_b = services_on(&b.addr, &b_id).unwrap_or_default();
    assert!(!has_service(&on_b, "greet"), "B's services: {on_b:?}");
    // Deleting again: the agent refuses, exit 1, its message on stderr.
    let r = ztm_at(home, &a.addr, &["delete", "svc", "tcp/greet", "--ep", "b"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.err.starts_with("ztm: ") && r.err.contains("no service"),
        "{r:?}"
    );
    assert_eq!(r.err.lines().count(), 1, "{r:?}");

    // An unknown mesh.
    let r = ztm_at(home, &a.addr, &["get", "ep", "--mesh", "nope"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.err.contains("no mesh named nope"), "{r:?}");

    // Several meshes: without --mesh, exit 2 listing them; with it, fine.
    ztm_ok(
        home,
        &a.addr,
        &[
            "join", "m2", "--as", "a2", "--hub", &hub.addr, "--ca", "ca.crt", "--cert", "root.crt",
            "--key", "root.key",
        ],
    );
    let r = ztm_at(home, &a.addr, &["get", "ep"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.err.contains("m, m2") && r.err.contains("--mesh"), "{r:?}");
    let r = ztm_ok(home, &a.addr, &["get", "ep", "--mesh", "m2"]);
    assert!(row_named(&r.rows(), "a2").is_some(), "{r:?}");
    let r = ztm_ok(home, &a.addr, &["get", "mesh"]);
    assert_eq!(r.rows().len(), 2, "{r:?}");

    // The agent's address from the environment, and from ~/.ztm/config.
    let r = ztm_env(
        home,
        &["get", "ep", "--mesh", "m"],
        &[("ZTM_AGENT", &a.addr)],
    );
    assert!(r.ok(), "{r:?}");
    assert!(row_named(&r.rows(), "b").is_some(), "{r:?}");
    std::fs::create_dir_all(home.join(".ztm")).unwrap();
    std::fs::write(
        home.join(".ztm/config"),
        format!("# written by the test\nagent = {}\nmesh = m\n", a.addr),
    )
    .unwrap();
    let r = ztm(home, &["get", "ep"]);
    assert!(r.ok(), "{r:?}");
    assert!(row_named(&r.rows(), "b").is_some(), "{r:?}");
    std::fs::remove_file(home.join(".ztm/config")).unwrap();

    // Leave.
    let r = ztm_ok(home, &a.addr, &["leave", "m2"]);
    assert!(r.out.contains("left mesh m2"), "{r:?}");
    let r = ztm_ok(home, &a.addr, &["get", "mesh", "-o", "json"]);
    let list = r.json();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(names, vec!["m"], "{r:?}");
    drop((a, b, hub, ca));
}

/// An agent nobody listens for: one line on stderr, exit 1.
#[test]
fn unreachable_agent_is_one_line_and_exit_1() {
    let dir = TempDir::new("cli-unreach");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    for args in [
        vec!["get", "ep", "--agent", &addr],
        vec!["get", "mesh", "-o", "json", "--agent", &addr],
        vec!["delete", "svc", "tcp/x", "--agent", &addr],
    ] {
        let r = ztm(dir.path(), &args);
        assert_eq!(r.code, 1, "{args:?}: {r:?}");
        assert!(r.out.is_empty(), "{args:?}: {r:?}");
        assert_eq!(r.err.lines().count(), 1, "{args:?}: {r:?}");
        assert!(
            r.err.starts_with(&format!(
                "ztm: cannot reach the agent at {addr}: connection refused"
            )),
            "{args:?}: {r:?}"
        );
    }
    // The same through the environment.
    let r = ztm_env(dir.path(), &["get", "ep"], &[("ZTM_AGENT", &addr)]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.err.contains(&addr), "{r:?}");
}

/// An agent started with a token: the client sends it when given `--token` or
/// `ZTM_AGENT_TOKEN`, and says what is missing when it is not.
#[test]
fn cli_sends_the_agent_token() {
    let dir = TempDir::new("cli-token");
    let home = dir.path();
    let agent = ztm!().start_agent_with(home, "a", &["--token", "t0ken"]);
    let addr = agent.addr.as_str();
    let r = ztm_at(home, addr, &["get", "mesh"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        r.err.trim(),
        format!(
            "ztm: the agent at {addr} requires its API token: pass --token or set ZTM_AGENT_TOKEN"
        ),
        "{r:?}"
    );
    let r = ztm_at(home, addr, &["get", "mesh", "--token", "wrong"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        r.err.trim(),
        format!("ztm: the agent at {addr} refused the API token given"),
        "{r:?}"
    );
    let r = ztm_at(
        home,
        addr,
        &["get", "mesh", "-o", "json", "--token", "t0ken"],
    );
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.json(), serde_json::json!([]));
    let r = ztm_env(
        home,
        &["leave", "nothing", "--agent", addr],
        &[("ZTM_AGENT_TOKEN", "t0ken")],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.err.contains("no mesh named nothing"), "{r:?}");
}

/// Usage errors exit 2; a mistyped subcommand gets a suggestion.
#[test]
fn usage_errors_exit_2_with_suggestions() {
    let dir = TempDir::new("cli-usage");
    let home = dir.path();
    for (args, want) in [
        (vec!["gett", "ep"], "get"),
        (vec!["get", "endpointz"], "endpoints"),
        (vec!["creat", "svc", "tcp/x", "--port", "1"], "create"),
    ] {
        let r = ztm(home, &args);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        let e = r.err.to_lowercase();
        assert!(
            (e.contains("similar") || e.contains("did you mean")) && e.contains(want),
            "{args:?}: no suggestion of {want}: {r:?}"
        );
    }
    // Bad arguments found after parsing are usage errors too (no agent needed).
    let r = ztm(
        home,
        &[
            "create",
            "port",
            "notaport",
            "--service",
            "x",
            "--agent",
            "127.0.0.1:1",
        ],
    );
    assert_eq!(r.code, 2, "{r:?}");
    let r = ztm(home, &["get", "ep", "--agent", "nohost"]);
    assert_eq!(r.code, 2, "{r:?}");
    let r = ztm(home, &["create", "svc", "tcp/x"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.err.contains("--port"), "{r:?}");
}

/// `ztm help`, `ztm help CMD`, `ztm completion SHELL`; the role subcommands are still there.
#[test]
fn help_and_completion() {
    let dir = TempDir::new("cli-help");
    let home = dir.path();
    let r = ztm(home, &["help"]);
    assert!(r.ok(), "{r:?}");
    for cmd in [
        "ca",
        "hub",
        "agent",
        "up",
        "get",
        "describe",
        "join",
        "leave",
        "create",
        "delete",
        "completion",
    ] {
        assert!(
            r.out
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{cmd} "))),
            "`ztm help` does not list {cmd}: {r:?}"
        );
    }
    let r = ztm(home, &["help", "get"]);
    assert!(
        r.ok() && r.out.contains("endpoints") && r.out.contains("ep"),
        "{r:?}"
    );
    let r = ztm(home, &["help", "create", "port"]);
    assert!(r.ok() && r.out.contains("--target-ep"), "{r:?}");
    let r = ztm(home, &["join", "--help"]);
    assert!(
        r.ok() && r.out.contains("--hub") && r.out.contains("--as"),
        "{r:?}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let r = ztm(home, &["completion", shell]);
        assert!(r.ok(), "{shell}: {r:?}");
        assert!(r.out.contains("ztm") && r.out.len() > 500, "{shell}: {r:?}");
    }
    let r = ztm(home, &["completion", "bash"]);
    assert!(
        r.out.contains("complete") && r.out.contains("describe"),
        "{r:?}"
    );
    // bash accepts the script.
    let script = dir.join("ztm.bash");
    std::fs::write(&script, &r.out).unwrap();
    let (code, _, err) = sh(home, &format!("source {}", script.display()));
    assert_eq!(code, 0, "{err}");
    let r = ztm(home, &["ca", "--help"]);
    assert!(r.ok() && r.out.contains("--database"), "{r:?}");
}
