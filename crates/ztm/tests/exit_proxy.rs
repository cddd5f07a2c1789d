//! An exit and proxies end to end, in network namespaces the test creates (and removes):
//!
//! - `hub`: the CA, the hub (10.77.1.2) and two proxy agents, alice's and bob's; the clients
//!   (curl, ssh, a hand-written SOCKS5 client) run here;
//! - `exit`: the exit agent (user `ops`), linked to `hub` (10.77.1.1) and to `lan`
//!   (10.77.2.1), forwarding nothing between them; its `/etc/hosts` names the lan's hosts;
//! - `lan`: an HTTP server (10.77.2.2:80), a listener on a port the exit does not allow
//!   (10.77.2.2:8080), one on an address outside the allowed range (10.77.2.130:80), and an
//!   sshd (10.77.2.2:22). Only `exit` reaches it.
//!
//! alice's proxy reaches the lan through the exit with SOCKS5 (names resolved by the client or
//! at the exit), HTTP forwarding (GET, POST) and HTTP CONNECT, and ssh goes through it; each
//! refusal (a port or a resolved address outside the rules, a user the exit does not serve, a
//! malformed SOCKS5 greeting) answers with its code and leaves the target's listener
//! untouched. Needs root, iproute2, curl, OpenSSH (client and server) and OpenBSD netcat:
//! ignored by default, and scripts/test runs it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ztm_testkit::netns::{in_ns, run, unavailable, veth, End, Namespaces};
use ztm_testkit::prelude::*;
use ztm_testkit::traffic::{read_verify, serve, write_stream, Backend, MB};

const S: fn(u64) -> Duration = Duration::from_secs;

/// The lan's web server and the listeners beside it.
const WEB: &str = "10.77.2.2";
/// An address of the lan outside the exit's allowed range (`evil.corp.example`).
const EVIL: &str = "10.77.2.130";
/// The web server's IPv6 address.
const WEB6: &str = "fd77:2::2";
const HUB: &str = "10.77.1.2";

/// The exit's rules: the lower half of the lan on ports 80-81 (nothing listens on 81), ssh to
/// the web server, the lan's IPv6 network on port 80, and names under corp.example on port 80.
const RULES: [&str; 4] = [
    "10.77.2.0/25:80-81",
    "10.77.2.2:22",
    "[fd77:2::/64]:80",
    "*.corp.example:80",
];

/// The exit's `/etc/hosts`.
const EXIT_HOSTS: &str = "127.0.0.1 localhost\n\
                          10.77.2.2 web.corp.example\n\
                          10.77.2.130 evil.corp.example\n";

/// The stream the web server sends for `/big/N`.
const SEED: u64 = 0x5eed_e417;

// SOCKS5 reply codes (RFC 1928).
const SUCCEEDED: u8 = 0x00;
const GENERAL_FAILURE: u8 = 0x01;
const NOT_ALLOWED: u8 = 0x02;
const HOST_UNREACHABLE: u8 = 0x04;
const REFUSED: u8 = 0x05;
const COMMAND_NOT_SUPPORTED: u8 = 0x07;

/// curl's exit code when a SOCKS proxy refuses (CURLE_PROXY) and when an HTTP proxy answers
/// CONNECT with an error (CURLE_RECV_ERROR).
const CURL_PROXY_REFUSED: i32 = 97;
const CURL_CONNECT_FAILED: i32 = 56;

// ---------------------------------------------------------------------------------------------
// The lan's HTTP server.

/// The request's path, whether it came in origin form (`/x`) or absolute form (`http://h/x`).
fn origin_path(target: &str) -> &str {
    match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    }
}

fn read_chunked(r: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        r.read_line(&mut size)?;
        let size = size.trim().split(';').next().unwrap_or("");
        let n = usize::from_str_radix(size, 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {size:?}")))?;
        let mut chunk = vec![0u8; n + 2];
        r.read_exact(&mut chunk)?;
        body.extend_from_slice(&chunk[..n]);
        if n == 0 {
            // The trailer section ends with an empty line (read above as the chunk's CRLF,
            // when there are no trailers).
            return Ok(body);
        }
    }
}

/// One request, one answer, then the connection closes:
/// - `GET /big/N`: N bytes of stream [`SEED`];
/// - `POST /echo`: the request's body;
/// - anything else: `{tag} {METHOD} {path} host={Host}`.
fn answer(tag: &str, s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(S(30)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or("").to_string();
    let target = words.next().unwrap_or("").to_string();
    let (mut len, mut chunked, mut host) = (0usize, false, String::new());
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let v = v.trim();
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = v.parse().unwrap_or(0),
                "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
                "host" => host = v.to_string(),
                _ => {}
            }
        }
    }
    let body = if chunked {
        read_chunked(&mut r)?
    } else {
        let mut b = vec![0u8; len];
        r.read_exact(&mut b)?;
        b
    };
    let path = origin_path(&target);
    let head = |n: u64| {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n").into_bytes()
    };
    if let Some(n) = path
        .strip_prefix("/big/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        w.write_all(&head(n))?;
        write_stream(&mut w, SEED, n)?;
    } else if method == "POST" && path == "/echo" {
        w.write_all(&head(body.len() as u64))?;
        w.write_all(&body)?;
    } else {
        let text = format!("{tag} {method} {path} host={host}\n");
        w.write_all(&head(text.len() as u64))?;
        w.write_all(text.as_bytes())?;
    }
    w.flush()?;
    let _ = w.shutdown(Shutdown::Write);
    Ok(())
}

/// The web server on `addr` (an address of the namespace the caller is in), counting the
/// connections it accepts.
fn web_server(addr: &str, tag: &'static str) -> Backend {
    let listener =
        TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding the web server {addr}: {e}"));
    serve(listener, move |s| {
        let _ = answer(tag, s);
    })
}

/// `GET /` straight to `addr`, answered with the server's tag line.
fn direct_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, S(3))?;
    s.set_read_timeout(Some(S(10)))?;
    s.write_all(b"GET /direct HTTP/1.1\r\nHost: direct\r\n\r\n")?;
    let mut got = String::new();
    s.read_to_string(&mut got)?;
    Ok(got)
}

// ---------------------------------------------------------------------------------------------
// Clients: curl, ssh and a SOCKS5 client of our own, all run in a namespace.

/// What one command did.
#[derive(Debug)]
struct Out {
    code: i32,
    out: String,
    err: String,
}

/// Runs `program ARGS` in namespace `ns`, stdin closed.
fn run_in(ns: &str, program: &str, args: &[&str]) -> Out {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {program} in {ns}: {e}"));
    Out {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// curl in `ns`, quiet but for errors, at most 20 s.
fn curl(ns: &str, args: &[&str]) -> Out {
    let mut all = vec!["-sS", "--max-time", "20"];
    all.extend_from_slice(args);
    run_in(ns, "curl", &all)
}

/// curl in `ns` sends a GET for `url` through the HTTP proxy `proxy` (forwarded, not CONNECT):
/// what it did, with the status the proxy answered in `out`.
fn forwarded_get(ns: &str, proxy: &str, url: &str) -> Out {
    curl(
        ns,
        &["-x", proxy, "-o", "/dev/null", "-w", "%{http_code}", url],
    )
}

/// A destination as a SOCKS5 client names it.
#[derive(Debug, Clone, Copy)]
enum Dest<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

fn ip(text: &str) -> Dest<'_> {
    Dest::Ip(text.parse().unwrap())
}

/// A SOCKS5 request: `command` (1 CONNECT, 2 BIND, 3 UDP ASSOCIATE) to `dest`:`port`.
fn socks_request(command: u8, dest: Dest, port: u16) -> Vec<u8> {
    let mut req = vec![0x05, command, 0x00];
    match dest {
        Dest::Ip(IpAddr::V4(a)) => {
            req.push(0x01);
            req.extend_from_slice(&a.octets());
        }
        Dest::Ip(IpAddr::V6(a)) => {
            req.push(0x04);
            req.extend_from_slice(&a.octets());
        }
        Dest::Name(n) => {
            req.push(0x03);
            req.push(n.len() as u8);
            req.extend_from_slice(n.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    req
}

/// Greets the SOCKS5 proxy on 127.0.0.1:`proxy` (no authentication) and sends `command` for
/// `dest`:`port`: the reply code, and the connection (carrying the tunnel if it is 0).
fn socks(proxy: u16, command: u8, dest: Dest, port: u16) -> std::io::Result<(u8, TcpStream)> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], proxy)), S(5))?;
    s.set_read_timeout(Some(S(30)))?;
    s.set_nodelay(true)?;
    s.write_all(&[0x05, 0x01, 0x00])?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice)?;
    if choice != [0x05, 0x00] {
        return Err(std::io::Error::other(format!(
            "the proxy chose method {choice:02x?}, not 05 00"
        )));
    }
    s.write_all(&socks_request(command, dest, port))?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    if head[0] != 0x05 {
        return Err(std::io::Error::other(format!("reply {head:02x?}")));
    }
    let rest = match head[3] {
        0x01 => 4 + 2,
        0x04 => 16 + 2,
        0x03 => {
            let mut n = [0u8; 1];
            s.read_exact(&mut n)?;
            n[0] as usize + 2
        }
        other => return Err(std::io::Error::other(format!("reply address type {other}"))),
    };
    let mut bound = vec![0u8; rest];
    s.read_exact(&mut bound)?;
    Ok((head[1], s))
}

/// The number of threads of process `pid`.
fn threads_of(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The reply code of a SOCKS5 CONNECT to `dest`:`port` through 127.0.0.1:`proxy`.
fn socks_code(proxy: u16, dest: Dest, port: u16) -> u8 {
    match socks(proxy, 0x01, dest, port) {
        Ok((code, _)) => code,
        Err(e) => panic!("SOCKS5 CONNECT {dest:?}:{port} through {proxy}: {e}"),
    }
}

/// What the proxy does with bytes that are not a SOCKS5 greeting it can accept: what it
/// sent back before closing the connection. Panics if it neither answers nor closes.
fn after_greeting(proxy: u16, greeting: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], proxy)), S(5))
        .expect("connecting to the proxy");
    s.set_read_timeout(Some(S(10))).unwrap();
    s.write_all(greeting).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            // An answer `05 FF` is enough: the client is to close then.
            Err(_) if got.starts_with(&[0x05, 0xff]) => return got,
            Err(e) => panic!(
                "greeting {greeting:02x?}: the proxy neither refused nor closed within 10 s \
                 (got {got:02x?}): {e}"
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The lan's sshd.

/// Host and user keys, the server's configuration, and the server started in `ns` on
/// `WEB:22` (its log is `dir/sshd.log`); returns the process and the user's key file.
fn start_sshd(ns: &str, dir: &Path) -> (Proc, String) {
    let d = dir.display();
    run(&format!(
        "ssh-keygen -q -t ed25519 -N '' -C host -f {d}/host_key && \
         ssh-keygen -q -t ed25519 -N '' -C user -f {d}/user_key && \
         cp {d}/user_key.pub {d}/authorized_keys && mkdir -p /run/sshd"
    ));
    let config = write_file(
        dir,
        "sshd_config",
        &format!(
            "ListenAddress {WEB}:22\n\
             HostKey {d}/host_key\n\
             PidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             LogLevel VERBOSE\n"
        ),
    );
    let sshd = Proc::spawn(
        Path::new("ip"),
        "sshd",
        dir,
        &[
            "netns",
            "exec",
            ns,
            "/usr/sbin/sshd",
            "-D",
            "-e",
            "-f",
            &config,
        ],
        &[],
    )
    .expect("starting sshd");
    (sshd, format!("{d}/user_key"))
}

/// `ssh root@{WEB} echo ok` from `ns` with the user's key, through `proxy_command` if given.
fn ssh_echo(ns: &str, key: &str, proxy_command: Option<&str>) -> Out {
    let pc = proxy_command.map(|c| format!("ProxyCommand={c}"));
    let mut args = vec![
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "LogLevel=ERROR",
        "-i",
        key,
    ];
    if let Some(pc) = &pc {
        args.extend(["-o", pc]);
    }
    let target = format!("root@{WEB}");
    args.extend([target.as_str(), "echo", "ok"]);
    run_in(ns, "ssh", &args)
}

// ---------------------------------------------------------------------------------------------
// The agents' REST API.

fn exit_path(ep: &str) -> String {
    format!("/api/meshes/{MESH}/endpoints/{ep}/exit")
}

fn proxy_path(ep: &str, port: u16) -> String {
    format!("/api/meshes/{MESH}/endpoints/{ep}/proxies/127.0.0.1/{port}")
}

// ---------------------------------------------------------------------------------------------

/// Counts of a listener before and after `f`: asserts that it accepted nothing meanwhile.
fn untouched<T>(what: &str, listener: &Backend, f: impl FnOnce() -> T) -> T {
    let before = listener.accepted.load(Ordering::SeqCst);
    let v = f();
    let after = listener.accepted.load(Ordering::SeqCst);
    assert_eq!(
        before, after,
        "{what}: the target's listener (port {}) accepted a connection",
        listener.port
    );
    v
}

#[test]
#[ignore = "needs root, iproute2, curl, OpenSSH and netcat (network namespaces); scripts/test runs it"]
fn exit_lets_proxies_out_to_what_its_rules_allow() {
    let started = Instant::now();
    if let Some(why) = unavailable(&["curl", "ssh", "ssh-keygen", "/usr/sbin/sshd", "nc"]) {
        panic!("network namespaces, curl, OpenSSH and netcat are needed here: {why}");
    }
    let dir = TempDir::new("exit-proxy");
    let tag = format!("{}-{:x}", std::process::id(), rand_u64() & 0xfff);
    let (ns_hub, ns_exit, ns_lan) = (
        format!("ztm-x-{tag}-hub"),
        format!("ztm-x-{tag}-exit"),
        format!("ztm-x-{tag}-lan"),
    );
    // Dropped last: after every process below is gone.
    let netns = Namespaces::create(&[&ns_hub, &ns_exit, &ns_lan]);
    veth(
        End {
            ns: &ns_hub,
            dev: "e0",
            addr: "10.77.1.2/24",
        },
        End {
            ns: &ns_exit,
            dev: "eh",
            addr: "10.77.1.1/24",
        },
    );
    veth(
        End {
            ns: &ns_exit,
            dev: "el",
            addr: "10.77.2.1/24",
        },
        End {
            ns: &ns_lan,
            dev: "e0",
            addr: "10.77.2.2/24",
        },
    );
    run(&format!("ip -n {ns_lan} addr add {EVIL}/24 dev e0"));
    // IPv6 between the exit and the lan, usable at once (no duplicate address detection).
    run(&format!(
        "ip -n {ns_exit} addr add fd77:2::1/64 dev el nodad"
    ));
    run(&format!("ip -n {ns_lan} addr add {WEB6}/64 dev e0 nodad"));
    // The exit's namespace routes nothing between its links.
    run(&format!(
        "ip netns exec {ns_exit} sh -c 'echo 0 > /proc/sys/net/ipv4/ip_forward'"
    ));
    // Names resolve at the exit from its own /etc/hosts; any other name fails at once (no
    // name server answers there).
    netns.etc_file(&ns_exit, "hosts", EXIT_HOSTS);
    netns.etc_file(
        &ns_exit,
        "resolv.conf",
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    );

    // The lan: the web server, listeners the exit must never reach, sshd.
    let (web, web6, side, evil) = in_ns(&ns_lan, || {
        (
            web_server(&format!("{WEB}:80"), "web"),
            web_server(&format!("[{WEB6}]:80"), "web6"),
            web_server(&format!("{WEB}:8080"), "side"),
            web_server(&format!("{EVIL}:80"), "evil"),
        )
    });
    let (sshd, key) = start_sshd(&ns_lan, dir.path());
    let web_addr: SocketAddr = format!("{WEB}:80").parse().unwrap();
    // Each is there: the exit's namespace reaches them.
    for (addr, tag) in [
        (web_addr, "web"),
        (format!("[{WEB6}]:80").parse().unwrap(), "web6"),
        (format!("{WEB}:8080").parse().unwrap(), "side"),
        (format!("{EVIL}:80").parse().unwrap(), "evil"),
    ] {
        let got = in_ns(&ns_exit, || direct_get(addr)).unwrap();
        assert!(
            got.ends_with(&format!("{tag} GET /direct host=direct\n")),
            "{got}"
        );
    }
    wait_until(S(10), "sshd to accept connections", || {
        in_ns(&ns_exit, || {
            TcpStream::connect_timeout(&format!("{WEB}:22").parse().unwrap(), S(1)).is_ok()
        })
    });
    let direct = ssh_echo(&ns_exit, &key, None);
    assert_eq!(
        direct.out.trim(),
        "ok",
        "ssh from the exit's namespace straight to the lan: {direct:?}\nsshd: {}",
        sshd.log_tail(20)
    );
    // The hub's namespace has no way to the lan.
    untouched("a direct connection from the hub's namespace", &web, || {
        let r = in_ns(&ns_hub, || TcpStream::connect_timeout(&web_addr, S(2)));
        assert!(r.is_err(), "the hub's namespace reached {web_addr}");
    });
    let r = curl(&ns_hub, &["--max-time", "3", &format!("http://{WEB}/")]);
    assert_ne!(
        r.code, 0,
        "curl from the hub's namespace reached the lan: {r:?}"
    );

    // CA, hub and the proxy agents in the hub's namespace; the exit agent in its own.
    let z_hub = ztm!().in_netns(&ns_hub);
    let z_exit = ztm!().in_netns(&ns_exit);
    let ca = z_hub.start_ca(dir.path());
    let hub_addr = format!("{HUB}:7443");
    let hub = z_hub.start_hub_on(dir.path(), "hub", &ca.addr, &hub_addr, &[]);
    let (pem, alice_user, bob_user, ops_user) = in_ns(&ns_hub, || {
        (
            ca_pem(&ca.addr),
            create_user(&ca.addr, "alice"),
            create_user(&ca.addr, "bob"),
            create_user(&ca.addr, "ops"),
        )
    });
    let alice = z_hub.start_agent(dir.path(), "alice");
    let bob = z_hub.start_agent(dir.path(), "bob");
    let exit = z_exit.start_agent(dir.path(), "exit");
    let (alice_id, bob_id) = in_ns(&ns_hub, || {
        join_ok(&alice.addr, &pem, "alice", &alice_user, &[&hub_addr]);
        join_ok(&bob.addr, &pem, "bob", &bob_user, &[&hub_addr]);
        (local_id(&alice.addr), local_id(&bob.addr))
    });
    let exit_id = in_ns(&ns_exit, || {
        join_ok(&exit.addr, &pem, "exit", &ops_user, &[&hub_addr]);
        local_id(&exit.addr)
    });
    wait_until(S(30), "alice, bob and the exit online", || {
        in_ns(&ns_hub, || {
            [&alice_id, &bob_id, &exit_id]
                .iter()
                .all(|id| is_online(&alice.addr, id) && is_online(&bob.addr, id))
        })
    });

    // The exit, on its own agent.
    let r = in_ns(&ns_exit, || {
        post_json(
            &exit.addr,
            &exit_path(&exit_id),
            &json!({"allow": RULES, "users": ["alice"]}),
        )
    });
    assert_eq!(r.status, 200, "POST exit: {}", r.text());
    let got = in_ns(&ns_exit, || get(&exit.addr, &exit_path(&exit_id)));
    assert_eq!(got.status, 200, "GET exit: {}", got.text());
    let ex = got.json();
    assert_eq!(ex["allow"], json!(RULES), "{ex}");
    assert_eq!(ex["users"], json!(["alice"]), "{ex}");

    // A proxy on alice's agent and one on bob's, both naming the exit.
    let (p_alice, p_bob) = in_ns(&ns_hub, || (free_port(), free_port()));
    let r = in_ns(&ns_hub, || {
        post_json(
            &alice.addr,
            &proxy_path(&alice_id, p_alice),
            &json!({"exit": {"endpoint": "exit"}}),
        )
    });
    assert_eq!(r.status, 200, "POST proxy: {}", r.text());
    let v: Value = r.json();
    assert_eq!(v["open"], true, "alice's proxy did not open: {v}");
    assert_eq!(v["listen"]["port"], p_alice, "{v}");
    let listed = in_ns(&ns_hub, || {
        get(
            &alice.addr,
            &format!("/api/meshes/{MESH}/endpoints/{alice_id}/proxies"),
        )
    });
    assert_eq!(listed.status, 200, "GET proxies: {}", listed.text());
    assert!(
        listed.json().as_array().is_some_and(|l| l.len() == 1),
        "{}",
        listed.text()
    );
    let r = in_ns(&ns_hub, || {
        post_json(
            &bob.addr,
            &proxy_path(&bob_id, p_bob),
            &json!({"exit": {"endpoint": "exit"}}),
        )
    });
    assert_eq!(r.status, 200, "POST bob's proxy: {}", r.text());
    assert_eq!(
        r.json()["open"],
        true,
        "bob's proxy did not open: {}",
        r.text()
    );
    let r = in_ns(&ns_hub, || get(&bob.addr, &proxy_path(&bob_id, p_bob)));
    assert_eq!(r.status, 200, "GET bob's proxy: {}", r.text());
    assert_eq!(r.json()["listen"]["port"], p_bob, "{}", r.text());

    let socks_name = format!("127.0.0.1:{p_alice}");
    let http_proxy = format!("http://127.0.0.1:{p_alice}");
    let hello = "http://web.corp.example/hello";
    let mut last = String::new();
    let through = time_until(S(30), || {
        let r = curl(&ns_hub, &["--socks5-hostname", &socks_name, hello]);
        last = format!("{r:?}");
        r.code == 0 && r.out == "web GET /hello host=web.corp.example\n"
    });
    assert!(
        through.is_some(),
        "no answer through alice's proxy (a name resolved at the exit); last: {last}"
    );

    // ---- Through alice's proxy, each way a client has.
    // SOCKS5 with an address the client gives.
    let r = curl(
        &ns_hub,
        &["--socks5", &socks_name, &format!("http://{WEB}/by-address")],
    );
    assert_eq!(r.out, format!("web GET /by-address host={WEB}\n"), "{r:?}");
    // HTTP: an absolute-URI GET forwarded, a POST whose body comes back, CONNECT.
    let r = curl(&ns_hub, &["-x", &http_proxy, hello]);
    assert_eq!(r.out, "web GET /hello host=web.corp.example\n", "{r:?}");
    let small = "a body to echo";
    let r = curl(
        &ns_hub,
        &[
            "-x",
            &http_proxy,
            "--data-binary",
            small,
            "http://web.corp.example/echo",
        ],
    );
    assert_eq!(r.out, small, "{r:?}");
    let large: String = (0..20_000).map(|i| format!("{i:05}")).collect();
    let body_file = write_file(dir.path(), "body", &large);
    let r = curl(
        &ns_hub,
        &[
            "-x",
            &http_proxy,
            "-H",
            "Expect:",
            "--data-binary",
            &format!("@{body_file}"),
            "http://web.corp.example/echo",
        ],
    );
    assert!(
        r.code == 0 && r.out == large,
        "a 100 kB POST came back as {} bytes: {} {}",
        r.out.len(),
        r.code,
        r.err
    );
    let r = curl(
        &ns_hub,
        &["-p", "-x", &http_proxy, "http://web.corp.example/connect"],
    );
    assert_eq!(r.out, "web GET /connect host=web.corp.example\n", "{r:?}");
    let r = curl(
        &ns_hub,
        &["-p", "-x", &http_proxy, &format!("http://{WEB}/connect")],
    );
    assert_eq!(r.out, format!("web GET /connect host={WEB}\n"), "{r:?}");
    // Our own SOCKS5 client, a name and an address.
    for dest in [Dest::Name("web.corp.example"), ip(WEB)] {
        let (code, mut s) = in_ns(&ns_hub, || socks(p_alice, 0x01, dest, 80)).unwrap();
        assert_eq!(code, SUCCEEDED, "SOCKS5 CONNECT {dest:?}:80");
        s.write_all(b"GET /raw HTTP/1.1\r\nHost: raw\r\n\r\n")
            .unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        assert!(got.ends_with("web GET /raw host=raw\n"), "{got}");
    }
    // IPv6: our client with the address, curl with the address, HTTP forwarding.
    let before6 = web6.accepted.load(Ordering::SeqCst);
    let (code, mut s) = in_ns(&ns_hub, || socks(p_alice, 0x01, ip(WEB6), 80)).unwrap();
    assert_eq!(code, SUCCEEDED, "SOCKS5 CONNECT [{WEB6}]:80");
    s.write_all(b"GET /raw6 HTTP/1.1\r\nHost: raw\r\n\r\n")
        .unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert!(got.ends_with("web6 GET /raw6 host=raw\n"), "{got}");
    let url6 = format!("http://[{WEB6}]/v6");
    let r = curl(&ns_hub, &["--socks5", &socks_name, &url6]);
    assert_eq!(r.out, format!("web6 GET /v6 host=[{WEB6}]\n"), "{r:?}");
    let r = curl(&ns_hub, &["-x", &http_proxy, &url6]);
    assert_eq!(r.out, format!("web6 GET /v6 host=[{WEB6}]\n"), "{r:?}");
    assert_eq!(web6.accepted.load(Ordering::SeqCst), before6 + 3);
    let code = in_ns(&ns_hub, || socks_code(p_alice, ip(WEB6), 8080));
    assert_eq!(code, NOT_ALLOWED, "SOCKS5 CONNECT [{WEB6}]:8080");
    // ssh, through OpenBSD netcat's SOCKS5 client.
    let nc = format!("nc -X 5 -x 127.0.0.1:{p_alice} %h %p");
    let r = ssh_echo(&ns_hub, &key, Some(&nc));
    assert_eq!(r.out.trim(), "ok", "ssh through the proxy: {r:?}");

    // 100 MB through the proxy, checked byte by byte against the stream the server sent.
    let size = 100 * MB;
    let t = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns_hub, "curl", "-sS", "--fail"])
        .args(["--max-time", "60", "--socks5-hostname", &socks_name])
        .arg(format!("http://web.corp.example/big/{size}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let got = read_verify(child.stdout.as_mut().unwrap(), SEED);
    // Closed first, so that curl ends even if the check stopped early.
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "curl of 100 MB: {status}");
    assert_eq!(got, Ok(size), "100 MB through the proxy");
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "100 MB through the proxy in {secs:.1} s ({:.0} MB/s)",
        size as f64 / MB as f64 / secs
    );

    // ---- Refusals: each with its code, and the target never reached.
    // A port the rules do not list, on an allowed host.
    untouched("a port outside the rules", &side, || {
        let code = in_ns(&ns_hub, || socks_code(p_alice, ip(WEB), 8080));
        assert_eq!(code, NOT_ALLOWED, "SOCKS5 CONNECT {WEB}:8080");
        let code = in_ns(&ns_hub, || {
            socks_code(p_alice, Dest::Name("web.corp.example"), 8080)
        });
        assert_eq!(code, NOT_ALLOWED, "SOCKS5 CONNECT web.corp.example:8080");
        let r = curl(
            &ns_hub,
            &["--socks5", &socks_name, &format!("http://{WEB}:8080/")],
        );
        assert_eq!(r.code, CURL_PROXY_REFUSED, "{r:?}");
        let r = forwarded_get(&ns_hub, &http_proxy, &format!("http://{WEB}:8080/"));
        assert_eq!(r.out, "403", "forwarded GET to {WEB}:8080: {r:?}");
        let r = curl(
            &ns_hub,
            &[
                "-p",
                "-x",
                &http_proxy,
                "-w",
                "%{http_connect}",
                &format!("http://{WEB}:8080/"),
            ],
        );
        assert_eq!(
            (r.code, r.out.as_str()),
            (CURL_CONNECT_FAILED, "403"),
            "CONNECT {WEB}:8080: {r:?}"
        );
    });
    // A name the rules list that resolves (at the exit) outside the allowed addresses.
    untouched("a name resolving outside the rules", &evil, || {
        let code = in_ns(&ns_hub, || {
            socks_code(p_alice, Dest::Name("evil.corp.example"), 80)
        });
        assert_eq!(code, NOT_ALLOWED, "SOCKS5 CONNECT evil.corp.example:80");
        let r = curl(
            &ns_hub,
            &[
                "--socks5-hostname",
                &socks_name,
                "http://evil.corp.example/",
            ],
        );
        assert_eq!(r.code, CURL_PROXY_REFUSED, "{r:?}");
        let r = forwarded_get(&ns_hub, &http_proxy, "http://evil.corp.example/");
        assert_eq!(r.out, "403", "forwarded GET to evil.corp.example: {r:?}");
        // Its address, given as one, is outside the rules too.
        let code = in_ns(&ns_hub, || socks_code(p_alice, ip(EVIL), 80));
        assert_eq!(code, NOT_ALLOWED, "SOCKS5 CONNECT {EVIL}:80");
    });
    // A user the exit does not serve: bob's proxy.
    untouched("a user the exit does not serve", &web, || {
        let code = in_ns(&ns_hub, || socks_code(p_bob, ip(WEB), 80));
        assert_eq!(code, NOT_ALLOWED, "bob's SOCKS5 CONNECT {WEB}:80");
        let code = in_ns(&ns_hub, || {
            socks_code(p_bob, Dest::Name("web.corp.example"), 80)
        });
        assert_eq!(
            code, NOT_ALLOWED,
            "bob's SOCKS5 CONNECT web.corp.example:80"
        );
        let r = forwarded_get(&ns_hub, &format!("http://127.0.0.1:{p_bob}"), hello);
        assert_eq!(r.out, "403", "bob's forwarded GET: {r:?}");
        let r = curl(
            &ns_hub,
            &["--socks5-hostname", &format!("127.0.0.1:{p_bob}"), hello],
        );
        assert_eq!(
            r.code, CURL_PROXY_REFUSED,
            "bob's curl --socks5-hostname: {r:?}"
        );
    });
    // Malformed or unacceptable greetings: refused (`05 FF`) or closed, no tunnel.
    untouched("malformed SOCKS5 greetings", &web, || {
        for greeting in [
            // No methods at all.
            &[0x05, 0x00][..],
            // Only username/password, which the proxy does not offer.
            &[0x05, 0x01, 0x02][..],
            // SOCKS4 CONNECT to the web server.
            &[0x04, 0x01, 0x00, 0x50, 10, 77, 2, 2, 0x00][..],
            // A greeting and a CONNECT request in one, with version 4 in the greeting.
            &[
                0x04, 0x01, 0x00, 0x05, 0x01, 0x00, 0x01, 10, 77, 2, 2, 0x00, 0x50,
            ][..],
        ] {
            let got = in_ns(&ns_hub, || after_greeting(p_alice, greeting));
            assert!(
                got.is_empty() || got == [0x05, 0xff],
                "greeting {greeting:02x?}: the proxy answered {got:02x?}"
            );
        }
        // A valid greeting, then a request of version 4.
        let got = in_ns(&ns_hub, || {
            let mut req = vec![0x05, 0x01, 0x00];
            let mut connect = socks_request(0x01, ip(WEB), 80);
            connect[0] = 0x04;
            req.extend(connect);
            after_greeting(p_alice, &req)
        });
        assert!(
            got == [0x05, 0x00] || got.starts_with(&[0x05, 0x00, 0x05]) && got[3] != SUCCEEDED,
            "a CONNECT of version 4: the proxy answered {got:02x?}"
        );
    });
    // Commands the proxy does not carry.
    untouched("BIND and UDP ASSOCIATE", &web, || {
        for command in [0x02, 0x03] {
            let (code, _) = in_ns(&ns_hub, || socks(p_alice, command, ip(WEB), 80)).unwrap();
            assert_eq!(code, COMMAND_NOT_SUPPORTED, "SOCKS5 command {command}");
        }
    });
    // Allowed, but nothing listens there, or the name does not resolve.
    let code = in_ns(&ns_hub, || socks_code(p_alice, ip(WEB), 81));
    assert_eq!(code, REFUSED, "SOCKS5 CONNECT {WEB}:81 (nothing listens)");
    let r = forwarded_get(&ns_hub, &http_proxy, &format!("http://{WEB}:81/"));
    assert_eq!(r.out, "502", "forwarded GET to {WEB}:81: {r:?}");
    let code = in_ns(&ns_hub, || {
        socks_code(p_alice, Dest::Name("nothere.corp.example"), 80)
    });
    assert_eq!(
        code, HOST_UNREACHABLE,
        "SOCKS5 CONNECT nothere.corp.example:80"
    );

    // A flood of names that no server answers, from a user the exit admits: the exit resolves
    // a few at a time for her (each lookup holds one of its threads until the resolver gives
    // up, 1 s here) and refuses the rest at once, instead of a thread for each.
    let blackhole = in_ns(&ns_exit, || {
        std::net::UdpSocket::bind("127.0.0.1:53").unwrap()
    });
    let exit_pid = exit.proc.pid();
    let threads_before = threads_of(exit_pid);
    const FLOOD: usize = 200;
    let mut flood: Vec<TcpStream> = in_ns(&ns_hub, || {
        (0..FLOOD)
            .map(|_| TcpStream::connect(("127.0.0.1", p_alice)).unwrap())
            .collect()
    });
    let most_threads = std::sync::atomic::AtomicUsize::new(threads_before);
    let flooding = std::sync::atomic::AtomicBool::new(true);
    let codes: Vec<u8> = std::thread::scope(|scope| {
        scope.spawn(|| {
            while flooding.load(Ordering::SeqCst) {
                most_threads.fetch_max(threads_of(exit_pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        for (i, s) in flood.iter_mut().enumerate() {
            let name = format!("n{i}.corp.example");
            let mut asked = vec![0x05, 0x01, 0x00];
            asked.extend(socks_request(0x01, Dest::Name(&name), 80));
            s.write_all(&asked).unwrap();
        }
        let codes = flood
            .iter_mut()
            .map(|s| {
                s.set_read_timeout(Some(S(30))).unwrap();
                let mut reply = [0u8; 6];
                s.read_exact(&mut reply).unwrap();
                reply[3]
            })
            .collect();
        flooding.store(false, Ordering::SeqCst);
        codes
    });
    drop(flood);
    drop(blackhole);
    let most_threads = most_threads.into_inner();
    let refused = codes.iter().filter(|&&c| c == GENERAL_FAILURE).count();
    eprintln!(
        "{FLOOD} names nobody answers: {refused} refused at once; the exit's threads went from \
         {threads_before} to at most {most_threads}"
    );
    assert!(
        codes
            .iter()
            .all(|&c| c == GENERAL_FAILURE || c == HOST_UNREACHABLE),
        "replies to names nobody answers: {codes:?}"
    );
    assert!(
        refused >= FLOOD / 2,
        "{refused} of {FLOOD} lookups refused at once: {codes:?}"
    );
    assert!(
        most_threads <= threads_before + 16,
        "the exit's threads went from {threads_before} to {most_threads} for {FLOOD} lookups"
    );
    // Once the resolver has given up on hers, alice's names resolve again.
    let mut last = 0xff;
    let resolves = time_until(S(15), || {
        last = in_ns(&ns_hub, || {
            socks_code(p_alice, Dest::Name("web.corp.example"), 80)
        });
        last == SUCCEEDED
    });
    assert!(
        resolves.is_some(),
        "web.corp.example after the flood: code {last:#04x}"
    );

    // The proxy still works after all that.
    let r = curl(&ns_hub, &["--socks5-hostname", &socks_name, hello]);
    assert_eq!(r.out, "web GET /hello host=web.corp.example\n", "{r:?}");

    // Proxies that choose the exit themselves: one trusting every user's exits finds ops's;
    // one trusting only alice's own user and root finds none, and nothing goes out.
    let (p_any, p_own) = in_ns(&ns_hub, || (free_port(), free_port()));
    for (port, exit) in [(p_any, json!({"trust": ["*"]})), (p_own, json!({}))] {
        let r = in_ns(&ns_hub, || {
            post_json(
                &alice.addr,
                &proxy_path(&alice_id, port),
                &json!({ "exit": exit }),
            )
        });
        assert_eq!(r.status, 200, "POST proxy with exit {exit}: {}", r.text());
    }
    let any = format!("127.0.0.1:{p_any}");
    let mut last = String::new();
    let found = time_until(S(20), || {
        let r = curl(&ns_hub, &["--socks5-hostname", &any, hello]);
        last = format!("{r:?}");
        r.out == "web GET /hello host=web.corp.example\n"
    });
    assert!(
        found.is_some(),
        "no answer through a proxy trusting every user's exits: {last}"
    );
    untouched("a proxy trusting no exit there is", &web, || {
        let code = in_ns(&ns_hub, || socks_code(p_own, ip(WEB), 80));
        assert_ne!(
            code, SUCCEEDED,
            "SOCKS5 CONNECT {WEB}:80 with no trusted exit"
        );
        let r = curl(
            &ns_hub,
            &["--socks5-hostname", &format!("127.0.0.1:{p_own}"), hello],
        );
        assert_ne!(r.code, 0, "curl with no trusted exit: {r:?}");
    });

    // Without the exit, nothing goes out.
    let r = in_ns(&ns_exit, || delete(&exit.addr, &exit_path(&exit_id)));
    assert_eq!(r.status, 204, "DELETE exit: {}", r.text());
    let r = in_ns(&ns_exit, || get(&exit.addr, &exit_path(&exit_id)));
    assert_eq!(r.status, 404, "GET exit after DELETE: {}", r.text());
    untouched("a proxy whose exit is gone", &web, || {
        let code = in_ns(&ns_hub, || socks_code(p_alice, ip(WEB), 80));
        assert_ne!(code, SUCCEEDED, "SOCKS5 CONNECT {WEB}:80 without the exit");
    });
    let r = in_ns(&ns_hub, || {
        delete(&alice.addr, &proxy_path(&alice_id, p_alice))
    });
    assert!(is_2xx(&r), "DELETE proxy: {} {}", r.status, r.text());
    let r = in_ns(&ns_hub, || delete(&bob.addr, &proxy_path(&bob_id, p_bob)));
    assert!(is_2xx(&r), "DELETE bob's proxy: {} {}", r.status, r.text());
    let gone = in_ns(&ns_hub, || {
        TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], p_alice)), S(2))
    });
    assert!(gone.is_err(), "alice's proxy still accepts connections");

    let took = started.elapsed();
    eprintln!("exit and proxies checked in {:.1} s", took.as_secs_f64());
    assert!(took < S(120), "the test took {took:?}");
    drop((alice, bob, exit, hub, ca, sshd));
    drop(netns);
}
