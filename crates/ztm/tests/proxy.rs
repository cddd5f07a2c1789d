//! Exits and proxies on loopback: a proxy on alice's endpoint sends SOCKS5 and HTTP proxy
//! connections through the hub to bob's exit, which connects only where its rules allow and
//! only for users it admits. Each refusal gets the protocol's own answer, and the refused
//! destinations never see a connection. Both survive restarts. (Across network namespaces,
//! with curl and ssh: `exit_proxy.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};
use ztm_testkit::prelude::*;
use ztm_testkit::stack::Stack;
use ztm_testkit::traffic::*;

/// Answers an HTTP request with a response naming the request line it got (and echoing a
/// body it was sent).
fn answer_http(mut s: TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let first = head.lines().next().unwrap_or("").to_string();
    let host = head
        .lines()
        .find_map(|l| l.strip_prefix("Host: "))
        .unwrap_or("")
        .to_string();
    let proxy_headers = head.to_ascii_lowercase().contains("proxy-");
    let body = format!(
        "{first}|{host}|proxy headers: {proxy_headers}|{}",
        String::from_utf8_lossy(&buf[head_end..head_end + length])
    );
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn read_n(s: &mut TcpStream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

enum To<'a> {
    V4([u8; 4]),
    V6([u8; 16]),
    Name(&'a str),
}

/// A SOCKS5 client: greeting (no authentication), then `command` to `to`:`port`. The reply
/// code, and the connection if it succeeded.
fn socks(proxy: u16, command: u8, to: To, port: u16) -> (u8, TcpStream) {
    let mut s = connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    assert_eq!(read_n(&mut s, 2).unwrap(), [5, 0], "greeting answered");
    let mut req = vec![5, command, 0];
    match to {
        To::V4(a) => {
            req.push(1);
            req.extend_from_slice(&a);
        }
        To::V6(a) => {
            req.push(4);
            req.extend_from_slice(&a);
        }
        To::Name(n) => {
            req.push(3);
            req.push(n.len() as u8);
            req.extend_from_slice(n.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).unwrap();
    let reply = read_n(&mut s, 10).unwrap();
    assert_eq!(reply[0], 5, "{reply:?}");
    (reply[1], s)
}

const LOCAL: [u8; 4] = [127, 0, 0, 1];

/// Sends an HTTP request to the proxy; the whole answer until the proxy closes.
fn http_via(proxy: u16, request: &str) -> String {
    let mut s = connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn exit_path(st: &Stack, i: usize) -> String {
    format!("/api/meshes/{MESH}/endpoints/{}/exit", st.ids[i])
}

fn proxy_path(st: &Stack, i: usize, port: u16) -> String {
    format!(
        "/api/meshes/{MESH}/endpoints/{}/proxies/127.0.0.1/{port}",
        st.ids[i]
    )
}

fn log_of(api: &str) -> String {
    get(api, &format!("/api/meshes/{MESH}/log")).text()
}

#[test]
fn proxies_reach_what_exits_allow_and_nothing_else() {
    let st = Stack::start(&ztm!(), "proxy", &["alice", "bob", "carol"]);
    let echo = echo_server();
    // Servers that count their connections: a web server, and one that closes at once.
    let Backend {
        port: web,
        accepted: web_hits,
    } = serve(bind_local(), answer_http);
    let Backend {
        port: forbidden,
        accepted: forbidden_hits,
    } = serve(bind_local(), drop);
    let refused = closed_port();
    // Bob's endpoint is an exit for alice: the echo and web servers by address, "localhost"
    // by name (it resolves to 127.0.0.1, allowed, and ::1, not allowed), and a closed port.
    let r = post_json(
        st.api(1),
        &exit_path(&st, 1),
        &json!({
            "allow": [
                format!("127.0.0.1:{}", echo.port),
                format!("127.0.0.1:{web}"),
                format!("127.0.0.1:{refused}"),
                "LocalHost",
                "*.corp.example",
            ],
            "users": ["alice"],
        }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["allow"][3],
        "localhost",
        "kept canonical: {}",
        r.text()
    );
    // Bad rules are refused, naming the rule, and change nothing.
    for bad in [
        json!({"allow": []}),
        json!({"allow": ["10.0.0.0/33"]}),
        json!({"allow": ["a b"]}),
        json!({"allow": ["*"], "users": ["not a name"]}),
        json!({"allow": ["*"], "extra": 1}),
    ] {
        let r = post_json(st.api(1), &exit_path(&st, 1), &bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    assert_eq!(
        get(st.api(1), &exit_path(&st, 1)).json()["allow"][3],
        "localhost"
    );

    // Alice sees bob's exit; carol does not (it does not admit her).
    wait_until(Duration::from_secs(20), "alice to see bob's exit", || {
        get(st.api(0), &format!("/api/meshes/{MESH}/exits"))
            .json()
            .as_array()
            .is_some_and(|l| l.iter().any(|e| e["id"] == st.ids[1].as_str()))
    });
    let carol_sees = get(st.api(2), &format!("/api/meshes/{MESH}/exits")).json();
    assert_eq!(carol_sees, json!([]), "{carol_sees}");
    // The list is searched and paged as the others are, with the number of matches.
    let exits = |query: &str| get(st.api(0), &format!("/api/meshes/{MESH}/exits?{query}"));
    let r = exits("q=BOB&limit=1");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("ztm-total"), Some("1"), "{:?}", r.headers);
    assert_eq!(r.json()[0]["id"], st.ids[1].as_str(), "{}", r.text());
    let r = exits("q=nobody&limit=10");
    assert_eq!((r.header("ztm-total"), r.json()), (Some("0"), json!([])));
    let r = exits("offset=1&limit=10");
    assert_eq!((r.header("ztm-total"), r.json()), (Some("1"), json!([])));
    for bad in ["limit=0", "offset=x"] {
        assert_eq!(exits(bad).status, 400, "GET exits?{bad}");
    }
    // The exit is not listed as a service.
    let services = get(st.api(0), &format!("/api/meshes/{MESH}/services")).text();
    assert!(!services.contains("exit"), "{services}");

    // A proxy on alice's endpoint, to bob's exit by name.
    let proxy = free_port();
    let r = post_json(
        st.api(0),
        &proxy_path(&st, 0, proxy),
        &json!({"exit": {"endpoint": "b"}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["exit"]["endpoint"],
        st.ids[1].as_str(),
        "pinned: {}",
        r.text()
    );
    assert_eq!(r.json()["open"], true, "{}", r.text());
    // Not a port.
    let ports = get(
        st.api(0),
        &format!("/api/meshes/{MESH}/endpoints/{}/ports", st.ids[0]),
    );
    assert_eq!(ports.json(), json!([]), "{}", ports.text());

    // SOCKS5 CONNECT by address and by name, through to the echo server.
    let (code, mut s) = socks(proxy, 1, To::V4(LOCAL), echo.port);
    assert_eq!(code, 0);
    assert_eq!(line_on(&mut s, "by address").unwrap(), "by address");
    let (code, mut s) = socks(proxy, 1, To::Name("localhost"), echo.port);
    assert_eq!(code, 0, "localhost resolves to 127.0.0.1 at the exit");
    assert_eq!(line_on(&mut s, "by name").unwrap(), "by name");
    // 8 MiB each way, intact.
    let (code, s) = socks(proxy, 1, To::V4(LOCAL), echo.port);
    assert_eq!(code, 0);
    let mut reader = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut s = s;
        write_stream(&mut s, 7, 8 << 20).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
    assert_eq!(read_verify(&mut reader, 7), Ok(8 << 20));
    writer.join().unwrap();

    // HTTP: CONNECT, and a forwarded POST with its body (proxy headers not passed on).
    let mut s = connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "CONNECT 127.0.0.1:{} HTTP/1.1\r\nHost: x\r\n\r\n",
        echo.port
    )
    .unwrap();
    let head = read_n(&mut s, 39).unwrap();
    assert_eq!(&head[..], b"HTTP/1.1 200 Connection established\r\n\r\n");
    assert_eq!(
        line_on(&mut s, "through CONNECT").unwrap(),
        "through CONNECT"
    );
    let answer = http_via(
        proxy,
        &format!(
            "POST http://127.0.0.1:{web}/a?b=1 HTTP/1.1\r\nHost: 127.0.0.1:{web}\r\n\
             Proxy-Connection: keep-alive\r\nContent-Length: 5\r\n\r\nhello"
        ),
    );
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(
        answer.ends_with(&format!(
            "POST /a?b=1 HTTP/1.1|127.0.0.1:{web}|proxy headers: false|hello"
        )),
        "{answer}"
    );
    assert_eq!(web_hits.load(Ordering::SeqCst), 1);

    // Refusals, each in the client's protocol, none reaching its destination:
    // a port the rules do not list,
    let (code, _) = socks(proxy, 1, To::V4(LOCAL), forbidden);
    assert_eq!(code, 0x02, "not allowed");
    let answer = http_via(
        proxy,
        &format!("CONNECT 127.0.0.1:{forbidden} HTTP/1.1\r\n\r\n"),
    );
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    let answer = http_via(
        proxy,
        &format!("GET http://127.0.0.1:{forbidden}/ HTTP/1.1\r\n\r\n"),
    );
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    // an address the rules do not list (::1 is localhost too, but only 127.0.0.1 is listed),
    let mut v6 = [0u8; 16];
    v6[15] = 1;
    let (code, _) = socks(proxy, 1, To::V6(v6), echo.port);
    assert_eq!(code, 0x02, "[::1] is not allowed");
    // a listed name at a port no address rule allows (it resolves into a forbidden place),
    let (code, _) = socks(proxy, 1, To::Name("localhost"), forbidden);
    assert_eq!(code, 0x02, "resolves outside the rules");
    // a name the rules do not list,
    let (code, _) = socks(proxy, 1, To::Name("127.0.0.1.nip.example"), forbidden);
    assert_eq!(code, 0x02);
    // a listed name that does not resolve,
    let (code, _) = socks(proxy, 1, To::Name("nothing.corp.example"), echo.port);
    assert_eq!(code, 0x04, "host unreachable");
    let answer = http_via(proxy, "GET http://nothing.corp.example/ HTTP/1.1\r\n\r\n");
    assert!(
        answer.starts_with("HTTP/1.1 502 ") || answer.starts_with("HTTP/1.1 504 "),
        "{answer}"
    );
    // a listed destination that refuses the connection,
    let (code, _) = socks(proxy, 1, To::V4(LOCAL), refused);
    assert_eq!(code, 0x05, "connection refused");
    // commands other than CONNECT,
    let (code, _) = socks(proxy, 3, To::V4(LOCAL), forbidden);
    assert_eq!(code, 0x07, "UDP ASSOCIATE is not supported");
    let (code, _) = socks(proxy, 2, To::V4(LOCAL), forbidden);
    assert_eq!(code, 0x07, "BIND is not supported");
    // malformed greetings: closed, or told no method is acceptable.
    for (greeting, want) in [
        (&[5u8, 0][..], &[][..]),
        (&[5, 1, 2], &[5, 0xFF]),
        (&[4, 1, 0, 80], &[]),
    ] {
        let mut s = connect(proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(greeting).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert_eq!(got, want, "{greeting:?}");
    }
    // Nothing but the allowed server ever saw a connection.
    assert_eq!(
        forbidden_hits.load(Ordering::SeqCst),
        0,
        "the exit connected where it may not"
    );
    assert_eq!(web_hits.load(Ordering::SeqCst), 1);
    // The proxy's figures and log say why.
    let p = get(st.api(0), &proxy_path(&st, 0, proxy)).json();
    assert!(p["stats"]["failed"].as_u64().unwrap() >= 10, "{p}");
    assert!(p["stats"]["total"].as_u64().unwrap() >= 5, "{p}");
    let log = log_of(st.api(0));
    assert!(
        log.contains("is not a destination this exit allows"),
        "{log}"
    );
    assert!(
        log.contains("outside the addresses this exit allows"),
        "{log}"
    );

    // Carol's proxy to bob's exit: she is not admitted.
    let carol_proxy = free_port();
    let r = post_json(
        st.api(2),
        &proxy_path(&st, 2, carol_proxy),
        &json!({"exit": {"endpoint": st.ids[1], "user": "bob"}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (code, _) = socks(carol_proxy, 1, To::V4(LOCAL), echo.port);
    assert_eq!(code, 0x02, "carol may not use the exit");
    let answer = http_via(
        carol_proxy,
        &format!("CONNECT 127.0.0.1:{web} HTTP/1.1\r\n\r\n"),
    );
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert_eq!(
        web_hits.load(Ordering::SeqCst),
        1,
        "carol reached the web server"
    );

    // Both survive restarts.
    let mut st = st;
    for i in [1, 0] {
        st.agents[i].proc.stop();
        st.agents[i].restart();
    }
    assert_eq!(
        get(st.api(1), &exit_path(&st, 1)).json()["users"],
        json!(["alice"])
    );
    let p: Value = get(st.api(0), &proxy_path(&st, 0, proxy)).json();
    assert_eq!(p["exit"]["endpoint"], st.ids[1].as_str(), "{p}");
    wait_until(
        Duration::from_secs(30),
        "the proxy to work after restarts",
        || {
            let Ok(mut s) = connect(proxy) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = s.write_all(&[5, 1, 0]);
            if read_n(&mut s, 2).ok().as_deref() != Some(&[5, 0]) {
                return false;
            }
            let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
            req.extend_from_slice(&echo.port.to_be_bytes());
            let _ = s.write_all(&req);
            read_n(&mut s, 10).is_ok_and(|r| r[1] == 0)
                && line_on(&mut s, "after restart").ok().as_deref() == Some("after restart")
        },
    );

    // Deleting the exit closes it: alice is refused (no exit is there any more).
    assert_eq!(delete(st.api(1), &exit_path(&st, 1)).status, 204);
    assert_eq!(get(st.api(1), &exit_path(&st, 1)).status, 404);
    wait_until(Duration::from_secs(20), "the exit to be gone", || {
        socks(proxy, 1, To::V4(LOCAL), echo.port).0 == 0x02
    });
    assert_eq!(delete(st.api(0), &proxy_path(&st, 0, proxy)).status, 204);
    wait_until(
        Duration::from_secs(10),
        "the proxy to stop listening",
        || connect(proxy).is_err(),
    );
    assert_eq!(delete(st.api(0), &proxy_path(&st, 0, proxy)).status, 404);
}

/// `ztm` at `agent`: exit code and stdout + stderr.
fn cli(home: &std::path::Path, agent: &str, args: &[&str]) -> (i32, String) {
    let out = ztm!()
        .command(home)
        .args(args)
        .args(["--agent", agent])
        .env_remove("ZTM_LOG")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_cli_makes_exits_and_proxies() {
    let st = Stack::start(&ztm!(), "proxy-cli", &["alice", "bob"]);
    let home = st.dir.path();
    let echo = echo_server();
    let rule = format!("127.0.0.1:{}", echo.port);
    let (code, out) = cli(
        home,
        st.api(1),
        &[
            "create", "exit", "--allow", &rule, "--allow", "*.lan", "--users", "alice",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("is an exit to {rule}, *.lan for users alice")),
        "{out}"
    );
    let (code, out) = cli(home, st.api(1), &["create", "exit", "--allow", "a b"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("allow") && out.contains("\"a b\""), "{out}");
    let (code, out) = cli(home, st.api(1), &["get", "exit"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ALLOW") && out.contains(&rule) && out.contains("alice"),
        "{out}"
    );
    let (code, out) = cli(home, st.api(1), &["describe", "exit"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Allow") && out.contains("*.lan"), "{out}");
    // Alice's agent lists the exit, and its own exit through bob's agent is none.
    wait_until(Duration::from_secs(20), "alice to list bob's exit", || {
        let (code, out) = cli(home, st.api(0), &["get", "exit", "--all"]);
        code == 0 && out.contains(&st.ids[1]) && out.contains("bob")
    });
    let (code, out) = cli(home, st.api(0), &["get", "exit", "--ep", "b"]);
    assert_eq!(code, 1, "alice may not manage bob's endpoint: {out}");

    let proxy = free_port();
    let listen = proxy.to_string();
    let (code, out) = cli(
        home,
        st.api(0),
        &["create", "proxy", &listen, "--exit-ep", "b"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("proxy 127.0.0.1:{proxy}")) && out.contains(&st.ids[1]),
        "{out}"
    );
    let (code, mut s) = socks(proxy, 1, To::V4(LOCAL), echo.port);
    assert_eq!(code, 0);
    assert_eq!(
        line_on(&mut s, "via the cli's proxy").unwrap(),
        "via the cli's proxy"
    );
    let (code, out) = cli(home, st.api(0), &["get", "proxy"]);
    assert_eq!(code, 0, "{out}");
    let row = out
        .lines()
        .find(|l| l.contains(&format!("127.0.0.1:{proxy}")))
        .unwrap_or("");
    let cells: Vec<&str> = row.split_whitespace().collect();
    // LISTEN EXIT (user U) OPEN ACTIVE TOTAL FAILED ...
    assert_eq!(cells.get(4..7), Some(&["yes", "1", "1"][..]), "{out}");
    let (code, out) = cli(home, st.api(0), &["describe", "proxy", &listen]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("SOCKS5") && out.contains("Connections open"),
        "{out}"
    );
    // Proxies are not ports.
    let (_, out) = cli(home, st.api(0), &["get", "port"]);
    assert!(!out.contains(&format!(":{proxy}")), "{out}");
    drop(s);

    let (code, out) = cli(home, st.api(0), &["delete", "proxy", &listen]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(home, st.api(0), &["delete", "proxy", &listen]);
    assert_eq!(code, 1, "{out}");
    let (code, out) = cli(home, st.api(1), &["delete", "exit"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no longer an exit"), "{out}");
    let (code, out) = cli(home, st.api(1), &["get", "exit"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not an exit"), "{out}");
}
