//! Adding a computer in one step: `ztm invite` writes one invitation, `ztm join --invite`
//! joins with it, and a damaged, altered or revoked invitation is refused with words that say
//! what is wrong, changing nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use ztm_testkit::prelude::*;

/// Runs `ztm ARGS` in `dir`: exit code, stdout, stderr.
fn ztm(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = ztm!().command(dir).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn meshes(agent: &str) -> Vec<Value> {
    get(agent, "/api/meshes")
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

struct Site {
    dir: TempDir,
    ca: CaProc,
    hub: HubProc,
    /// root's agent, with an echo-like service.
    a: AgentProc,
}

fn site(tag: &str) -> Site {
    let dir = TempDir::new(tag);
    let ca = ztm!().start_ca(dir.path());
    let pem = ca_pem(&ca.addr);
    let root = create_user(&ca.addr, "root");
    let hub = ztm!().start_hub(dir.path(), "hub", &ca.addr);
    let a = ztm!().start_agent(dir.path(), "a");
    join_ok(&a.addr, &pem, "a", &root, &[&hub.addr]);
    Site { dir, ca, hub, a }
}

/// A line server: answers every line with "from A: " and the line.
fn line_server() -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut w = s.try_clone().unwrap();
            let mut line = String::new();
            if BufReader::new(s).read_line(&mut line).is_ok() {
                let _ = w.write_all(format!("from A: {line}").as_bytes());
            }
        }
    });
    port
}

fn ask(port: u16, line: &str) -> Option<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("{line}\n").as_bytes()).ok()?;
    let mut out = String::new();
    BufReader::new(s).read_line(&mut out).ok()?;
    Some(out)
}

#[test]
fn an_invitation_is_all_a_new_computer_needs() {
    let s = site("invite-join");
    let d = s.dir.path();
    // The invitation: one owner-only file.
    let (code, out, err) = ztm(
        d,
        &[
            "invite",
            "alice",
            "--hub",
            &s.hub.addr,
            "--ca",
            &s.ca.addr,
            "--mesh",
            MESH,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let file = d.join("alice.ztm-invite");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the invitation is owner-only");
    assert!(err.contains("ztm join --invite"), "{err}");
    assert!(!out.contains("PRIVATE KEY") && !err.contains("PRIVATE KEY"));
    // A user's key is handed out once: inviting alice again is refused, nothing written.
    let again = d.join("again");
    std::fs::create_dir_all(&again).unwrap();
    let (code, _, err) = ztm(
        &again,
        &["invite", "alice", "--hub", &s.hub.addr, "--ca", &s.ca.addr],
    );
    assert_ne!(code, 0);
    assert!(err.contains("exists at the CA already"), "{err}");
    assert!(!again.join("alice.ztm-invite").exists());

    // The new computer joins with the file alone.
    let b = ztm!().start_agent(d, "b");
    let (code, out, err) = ztm(
        d,
        &[
            "join",
            "--invite",
            file.to_str().unwrap(),
            "--as",
            "laptop",
            "--agent",
            &b.addr,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("joined mesh m as user alice"), "{out}");
    assert!(!err.contains("warning"), "{err}");
    wait_until(Duration::from_secs(15), "B connected", || {
        is_connected(&b.addr)
    });

    // And it works: a service on root's agent, a port on alice's.
    let a_id = local_id(&s.a.addr);
    let r = create_service(&s.a.addr, &a_id, "lines", line_server());
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until(Duration::from_secs(15), "B discovers the service", || {
        discovers(&b.addr, "lines", &a_id)
    });
    let port = free_port().to_string();
    let (code, out, err) = ztm(
        d,
        &[
            "create",
            "port",
            &port,
            "--service",
            "lines",
            "--agent",
            &b.addr,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let port: u16 = port.parse().unwrap();
    wait_until(Duration::from_secs(15), "the port answers", || {
        ask(port, "hello").as_deref() == Some("from A: hello\n")
    });

    // The text form, pasted, on a third computer.
    let (code, text, err) = ztm(
        d,
        &[
            "invite",
            "carol",
            "--hub",
            &s.hub.addr,
            "--ca",
            &s.ca.addr,
            "--mesh",
            MESH,
            "--print",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let text = text.trim().to_string();
    assert!(
        text.starts_with("ztm-invite-1:") && !text.contains('\n'),
        "{text}"
    );
    let c = ztm!().start_agent(d, "c");
    let (code, out, err) = ztm(d, &["join", "--invite", &text, "--agent", &c.addr]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("as user carol"), "{out}");
    // The agents never log the invitation or the key.
    for log in [b.proc.log(), c.proc.log()] {
        assert!(
            !log.contains("PRIVATE KEY") && !log.contains(&text[20..60]),
            "{log}"
        );
    }
}

#[test]
fn bad_invitations_are_refused_with_reasons_and_change_nothing() {
    let s = site("invite-bad");
    let d = s.dir.path();
    let other_ca = ztm!().start_other_ca(d, "other");
    let b = ztm!().start_agent(d, "b");
    let invite = |name: &str| {
        let (code, out, err) = ztm(
            d,
            &[
                "invite",
                name,
                "--hub",
                &s.hub.addr,
                "--ca",
                &s.ca.addr,
                "--mesh",
                MESH,
            ],
        );
        assert_eq!(code, 0, "{out}{err}");
        let file = d.join(format!("{name}.ztm-invite"));
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        v
    };
    let alice = invite("alice");
    let bob = invite("bob");
    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p.to_str().unwrap().to_string()
    };
    let with = |base: &Value, field: &str, value: Value| {
        let mut v = base.clone();
        v[field] = value;
        serde_json::to_string_pretty(&v).unwrap()
    };
    let alice_text = serde_json::to_string_pretty(&alice).unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong CA",
            with(&alice, "ca", Value::String(ca_pem(&other_ca.addr))),
            "not signed by its CA certificate",
        ),
        (
            "another user's key",
            with(&alice, "privateKey", bob["privateKey"].clone()),
            "private key does not match its certificate",
        ),
        (
            "another user's certificate",
            with(&alice, "certificate", bob["certificate"].clone()),
            "is of user bob, not of user alice",
        ),
        (
            "garbage",
            "hello, I am not an invitation".into(),
            "not a ZTM invitation",
        ),
        (
            "truncated",
            alice_text[..alice_text.len() / 2].to_string(),
            "cut off or damaged",
        ),
        (
            "a garbled CA",
            with(
                &alice,
                "ca",
                Value::String("-----BEGIN CERTIFICATE-----\nAAAA\n".into()),
            ),
            "CA certificate",
        ),
    ];
    for (what, text, words) in cases {
        let path = write(&format!("{}.inv", what.replace(' ', "-")), &text);
        let (code, out, err) = ztm(d, &["join", "--invite", &path, "--agent", &b.addr]);
        assert_ne!(code, 0, "{what}: {out}");
        assert!(err.contains(words), "{what}: {err}");
        assert!(
            meshes(&b.addr).is_empty(),
            "{what}: a refused invitation changed something"
        );
    }

    // A file others can read: joined, with a warning.
    let loose = write("loose.inv", &alice_text);
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out, err) = ztm(d, &["join", "--invite", &loose, "--agent", &b.addr]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("can be read by other users"), "{err}");
    // Joining with an invitation where the mesh is joined already changes nothing.
    let (code, _, err) = ztm(d, &["join", "--invite", &loose, "--agent", &b.addr]);
    assert_ne!(code, 0);
    assert!(err.contains("joined already"), "{err}");
    assert_eq!(meshes(&b.addr).len(), 1);

    // A user revoked since the invitation was made: refused at join, nothing left behind.
    let carol = invite("carol");
    let revoked = delete(&s.ca.addr, "/api/certificates/carol");
    assert_eq!(revoked.status, 204);
    // The hub learns it within its poll.
    let carol_user = User {
        name: "carol".into(),
        cert: carol["certificate"].as_str().unwrap().to_string(),
        key: carol["privateKey"].as_str().unwrap().to_string(),
    };
    let pem = ca_pem(&s.ca.addr);
    let rt = tokio::runtime::Runtime::new().unwrap();
    wait_until(Duration::from_secs(20), "the hub to refuse carol", || {
        rt.block_on(async {
            let Ok(tls) = ztm_testkit::hostile::try_dial(
                &s.hub.addr,
                &pem,
                &carol_user,
                ztm_pki::ALPN_CONTROL,
            )
            .await
            else {
                return true;
            };
            let Ok((sender, conn)) = h2::client::handshake(tls).await else {
                return true;
            };
            tokio::spawn(conn);
            ztm_testkit::hostile::call(&sender, "GET", "/api/endpoints", &[], bytes::Bytes::new())
                .await
                .is_err()
        })
    });
    let c = ztm!().start_agent(d, "c");
    let path = write("carol.inv", &serde_json::to_string(&carol).unwrap());
    let (code, out, err) = ztm(d, &["join", "--invite", &path, "--agent", &c.addr]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("revoked"), "{err}");
    assert!(
        meshes(&c.addr).is_empty(),
        "the revoked invitation left a mesh behind"
    );
}

/// A process in network namespace `ns`, killed when dropped.
struct NsProc(std::process::Child);

impl Drop for NsProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two computers in two network namespaces joined by a veth pair, removed when dropped.
struct TwoComputers {
    first: String,
    second: String,
    /// The first computer's address on the link.
    first_ip: String,
}

impl TwoComputers {
    fn new() -> TwoComputers {
        let tag = format!("{:x}", rand_u64() & 0xffff);
        let (first, second) = (format!("ztm-inv1-{tag}"), format!("ztm-inv2-{tag}"));
        let octet = (rand_u64() % 200) + 20;
        let first_ip = format!("10.231.{octet}.1");
        let second_ip = format!("10.231.{octet}.2");
        let (va, vb) = (format!("zi1{tag}"), format!("zi2{tag}"));
        let computers = TwoComputers {
            first: first.clone(),
            second: second.clone(),
            first_ip: first_ip.clone(),
        };
        for line in [
            format!("ip netns add {first}"),
            format!("ip netns add {second}"),
            format!("ip link add {va} type veth peer name {vb}"),
            format!("ip link set {va} netns {first}"),
            format!("ip link set {vb} netns {second}"),
            format!("ip -n {first} addr add {first_ip}/24 dev {va}"),
            format!("ip -n {second} addr add {second_ip}/24 dev {vb}"),
            format!("ip -n {first} link set {va} up"),
            format!("ip -n {second} link set {vb} up"),
            format!("ip -n {first} link set lo up"),
            format!("ip -n {second} link set lo up"),
        ] {
            let (code, out, err) = sh(Path::new("/"), &line);
            assert_eq!(
                code, 0,
                "{line}: {out}{err} (this test needs root and iproute2)"
            );
        }
        computers
    }

    /// Runs `line` (a shell line) in namespace `ns`, in `dir` with HOME=`dir`.
    fn run(&self, ns: &str, dir: &Path, line: &str) -> (i32, String, String) {
        let bin_dir = ztm!().bin().parent().unwrap().display().to_string();
        sh(
            dir,
            &format!(
                "ip netns exec {ns} env HOME={} PATH={bin_dir}:$PATH sh -c {}",
                dir.display(),
                shell_quote(line)
            ),
        )
    }

    /// Starts `ztm ARGS` in namespace `ns` in the background.
    fn spawn(&self, ns: &str, dir: &Path, args: &[&str], log: &str) -> NsProc {
        let log = std::fs::File::create(dir.join(log)).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, ztm!().bin_str()])
            .args(args)
            .current_dir(dir)
            .env("HOME", dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        NsProc(child)
    }
}

impl Drop for TwoComputers {
    fn drop(&mut self) {
        for ns in [&self.first, &self.second] {
            let _ = sh(Path::new("/"), &format!("ip netns del {ns}"));
        }
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The code blocks of README's "Add a second computer" section, line by line.
fn readme_steps() -> Vec<Vec<String>> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let section = readme
        .split("### Add a second computer")
        .nth(1)
        .and_then(|s| s.split("\n### ").next())
        .expect("README has the section");
    section
        .split("```sh\n")
        .skip(1)
        .map(|block| {
            block
                .split("```")
                .next()
                .unwrap_or("")
                .lines()
                .map(str::to_string)
                .collect()
        })
        .collect()
}

/// README's "Add a second computer", run as written on two computers (network namespaces):
/// only the invitation file crosses from the first to the second.
#[test]
#[ignore = "needs root (network namespaces); scripts/test runs it"]
fn readme_second_computer_steps_work_across_two_computers() {
    let steps = readme_steps();
    let expect: Vec<Vec<&str>> = vec![
        vec!["ztm up --hub-name 203.0.113.10:8888"],
        vec!["ztm invite alice --hub 203.0.113.10:8888"],
        vec![
            "ztm agent &",
            "ztm join --invite alice.ztm-invite --as laptop",
            "ztm get ep          # both computers, ONLINE yes; * marks this one",
        ],
        vec![
            "ztm create svc tcp/ssh --port 22          # on the first computer",
            "ztm create port 2222 --service ssh        # on the second computer",
            "ssh -p 2222 me@127.0.0.1                  # on the second computer",
        ],
    ];
    assert_eq!(
        steps, expect,
        "README's steps changed: change this test with them"
    );

    let pcs = TwoComputers::new();
    let root = TempDir::new("invite-ns");
    let (d1, d2) = (root.join("first"), root.join("second"));
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let hub = format!("{}:8888", pcs.first_ip);
    let here = |line: &str| line.replace("203.0.113.10:8888", &hub);

    // The first computer: `ztm up`, and a stand-in SSH server on port 22 (a banner).
    let args: Vec<String> = here(steps[0][0].as_str())
        .split_whitespace()
        .skip(1)
        .map(str::to_string)
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _up = pcs.spawn(&pcs.first, &d1, &args, "up.log");
    let _ssh = pcs.spawn_banner(&d1);
    wait_until(
        Duration::from_secs(30),
        "ztm up on the first computer",
        || pcs.run(&pcs.first, &d1, "ztm get ep").0 == 0,
    );
    let (code, out, err) = pcs.run(&pcs.first, &d1, &here(&steps[1][0]));
    assert_eq!(code, 0, "{out}{err}");

    // Only the invitation crosses.
    std::fs::copy(d1.join("alice.ztm-invite"), d2.join("alice.ztm-invite")).unwrap();
    std::fs::set_permissions(
        d2.join("alice.ztm-invite"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let _agent = pcs.spawn(&pcs.second, &d2, &["agent"], "agent.log");
    wait_until(
        Duration::from_secs(20),
        "the second computer's agent",
        || pcs.run(&pcs.second, &d2, "ztm get mesh").0 == 0,
    );
    let (code, out, err) = pcs.run(&pcs.second, &d2, &steps[2][1]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("as user alice"), "{out}");
    wait_until(Duration::from_secs(30), "both computers online", || {
        let (code, out, _) = pcs.run(&pcs.second, &d2, &steps[2][2]);
        code == 0 && out.matches(" yes").count() >= 2
    });

    let (code, out, err) = pcs.run(&pcs.first, &d1, &steps[3][0]);
    assert_eq!(code, 0, "{out}{err}");
    wait_until(
        Duration::from_secs(20),
        "the second computer discovers ssh",
        || pcs.run(&pcs.second, &d2, "ztm get svc").1.contains("ssh"),
    );
    let (code, out, err) = pcs.run(&pcs.second, &d2, &steps[3][1]);
    assert_eq!(code, 0, "{out}{err}");
    // In place of `ssh -p 2222 me@127.0.0.1`: the first computer's SSH banner, through 2222.
    wait_until(
        Duration::from_secs(20),
        "the SSH banner through port 2222",
        || {
            pcs.run(&pcs.second, &d2, BANNER_CLIENT)
                .1
                .contains("SSH-2.0-first-computer")
        },
    );
}

/// Reads the first line that 127.0.0.1:2222 sends.
const BANNER_CLIENT: &str =
    "python3 -c 'import socket; s = socket.create_connection((\"127.0.0.1\", 2222), 5); \
     s.settimeout(5); print(s.recv(100).decode())'";

impl TwoComputers {
    /// A stand-in SSH server on the first computer's 127.0.0.1:22: it sends a banner.
    fn spawn_banner(&self, dir: &Path) -> NsProc {
        let script = "import socket\n\
                      s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                      s.bind(('127.0.0.1', 22)); s.listen(16)\n\
                      while True:\n\
                      \x20   c, _ = s.accept(); c.sendall(b'SSH-2.0-first-computer\\r\\n'); c.close()\n";
        std::fs::write(dir.join("banner.py"), script).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.first, "python3", "banner.py"])
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        NsProc(child)
    }
}

/// The operator chooses how long user certificates live; an agent whose certificate expires
/// within 30 days says so in its API, its log and the CLI.
#[test]
fn certificate_expiry_is_in_view() {
    let dir = TempDir::new("invite-expiry");
    let d = dir.path();
    let ca = ztm!().start_ca_with(d, &["--user-cert-lifetime", "10d"]);
    let pem = ca_pem(&ca.addr);
    let alice = create_user(&ca.addr, "alice");
    let hub = ztm!().start_hub(d, "hub", &ca.addr);
    let a = ztm!().start_agent(d, "a");
    join_ok(&a.addr, &pem, "a", &alice, &[&hub.addr]);
    let m = mesh_info(&a.addr);
    let now = ztm_net::now_ms();
    let expires = m["agent"]["expires"].as_u64().unwrap_or(0);
    let day = 24 * 3600 * 1000;
    assert!(
        expires > now + 9 * day && expires <= now + 10 * day + 60_000,
        "{m}"
    );
    assert!(
        m["caExpires"].as_u64().unwrap_or(0) > now + 365 * day,
        "{m}"
    );
    let warnings = m["warnings"].to_string();
    assert!(
        warnings.contains("this agent's certificate expires on"),
        "{m}"
    );
    assert!(
        warnings.contains("(in 10 days)") || warnings.contains("(in 9 days)"),
        "{m}"
    );
    wait_until(
        Duration::from_secs(10),
        "the warning in the mesh log",
        || {
            get(&a.addr, &format!("/api/meshes/{MESH}/log"))
                .text()
                .contains("expires on")
        },
    );
    let (code, out, err) = ztm(d, &["get", "mesh", "--agent", &a.addr]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("CERT EXPIRES") && out.contains(&ztm_net::date(expires)),
        "{out}"
    );
    assert!(
        out.contains("(!)") && err.contains("expires on"),
        "{out}{err}"
    );
    let (code, out, _) = ztm(d, &["describe", "mesh", "--agent", &a.addr]);
    assert_eq!(code, 0);
    assert!(
        out.contains("Certificate expires") && out.contains("CA expires"),
        "{out}"
    );
    // A bad lifetime is refused with the reason.
    let (code, _, err) = ztm(d, &["ca", "--user-cert-lifetime", "10x"]);
    assert_eq!(code, 2);
    assert!(err.contains("the unit is s, m, h or d"), "{err}");
}
