//! Attacks on the trust between hubs, the CA and agents, with real processes on loopback: an
//! impostor answering on the CA's address, a network between hub and CA that reads and
//! changes traffic, a hub token used beyond its scope, and a revoked hub that agents must stop
//! using. Each test performs the attack and checks that it fails. docs/security.md ("Hubs, the CA and revocation")
//! describes the attacker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use ztm_testkit::hostile::*;
use ztm_testkit::prelude::*;
use ztm_testkit::traffic::echo_server;

/// A TCP relay on 127.0.0.1 in front of `to` that records every byte it passes (both ways),
/// and can be cut: every connection closed, new ones refused.
struct Relay {
    addr: String,
    seen: Arc<Mutex<Vec<u8>>>,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(to: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let relay = Relay {
            addr,
            seen: Arc::default(),
            cut: Arc::default(),
            conns: Arc::default(),
        };
        let (seen, cut, conns, to) = (
            relay.seen.clone(),
            relay.cut.clone(),
            relay.conns.clone(),
            to.to_string(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if cut.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(&to) else {
                    continue;
                };
                {
                    let mut held = conns.lock().unwrap();
                    held.push(client.try_clone().unwrap());
                    held.push(server.try_clone().unwrap());
                }
                for (from, into) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let seen = seen.clone();
                    std::thread::spawn(move || pump(from, into, seen));
                }
            }
        });
        relay
    }

    fn seen(&self) -> Vec<u8> {
        self.seen.lock().unwrap().clone()
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn pump(mut from: TcpStream, mut into: TcpStream, seen: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
                if into.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = into.shutdown(std::net::Shutdown::Write);
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// A TLS server on 127.0.0.1 that terminates TLS with the given certificate, records the
/// plaintext it receives and answers every request with 200 and `body`.
struct Impostor {
    addr: String,
    received: Arc<Mutex<Vec<u8>>>,
    _rt: tokio::runtime::Runtime,
}

impl Impostor {
    fn start(cert_pem: &str, key_pem: &str, body: &str) -> Impostor {
        use ztm_pki::rustls;
        let rt = runtime();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            ztm_pki::parse_chain(cert_pem, "impostor").unwrap(),
            ztm_pki::parse_key(key_pem, "impostor key").unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let received: Arc<Mutex<Vec<u8>>> = Arc::default();
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let seen = received.clone();
        rt.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen, answer) = (acceptor.clone(), seen.clone(), answer.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !contains(&head, "\r\n\r\n") && head.len() < 65536 {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.lock().unwrap().extend_from_slice(&head);
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Impostor {
            addr,
            received,
            _rt: rt,
        }
    }

    fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }
}

/// The SHA-256 fingerprint of a PEM certificate file as openssl prints it (`AB:CD:...`).
fn openssl_fingerprint(dir: &std::path::Path, file: &str) -> String {
    let (code, out, err) = sh(
        dir,
        &format!("openssl x509 -in {file} -noout -fingerprint -sha256"),
    );
    assert_eq!(code, 0, "{err}");
    out.trim()
        .rsplit('=')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Whether a hub at `hub` answers a control request of `user` (whose CA is `ca_pem`) within
/// a few seconds.
fn hub_admits(hub: &str, ca_pem: &str, user: &User) -> bool {
    runtime().block_on(async {
        let work = async {
            let tls = try_dial(hub, ca_pem, user, ztm_pki::ALPN_CONTROL)
                .await
                .ok()?;
            let (sender, conn) = h2::client::handshake(tls).await.ok()?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            call(&sender, "GET", "/api/endpoints", &[], Bytes::new())
                .await
                .ok()
                .map(|a| a.status == 200)
        };
        tokio::time::timeout(Duration::from_secs(3), work)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    })
}

/// A hub pinned to the mesh CA (by certificate or by fingerprint) and pointed at an address
/// where another CA answers never comes up with that CA: it says why, again and again, and
/// admits nobody, in particular no user of the impostor CA.
#[test]
fn a_pinned_hub_never_trusts_another_ca() {
    let dir = TempDir::new("attack-ca-impostor");
    let real_dir = dir.join("real");
    let fake_dir = dir.join("impostor");
    std::fs::create_dir_all(&real_dir).unwrap();
    std::fs::create_dir_all(&fake_dir).unwrap();
    let real = ztm!().start_ca(&real_dir);
    let fake = ztm!().start_ca(&fake_dir);
    let real_pem = ca_pem(&real.addr);
    let fake_pem = ca_pem(&fake.addr);
    assert_ne!(real_pem, fake_pem);
    let real_crt = write_file(dir.path(), "real.crt", &real_pem);
    let fingerprint = openssl_fingerprint(dir.path(), "real.crt");
    // A user of the impostor CA, whose agent joins the hub.
    let mallory = create_user(&fake.addr, "root");
    let agent = ztm!().start_agent(dir.path(), "mallory");

    for (i, pin) in [
        ["--ca-cert", real_crt.as_str()],
        ["--ca-fingerprint", fingerprint.as_str()],
    ]
    .iter()
    .enumerate()
    {
        let hub = ztm!().spawn_hub_with(dir.path(), &format!("hub{i}"), &fake.addr, pin);
        join_ok(&agent.addr, &fake_pem, "mallory", &mallory, &[&hub.addr]);
        hub.proc.wait_log("pinned CA", 2, Duration::from_secs(20));
        let log = hub.proc.log();
        assert!(!log.contains("listening on"), "the hub came up:\n{log}");
        assert!(
            !hub_admits(&hub.addr, &fake_pem, &mallory),
            "the hub admitted a user of the impostor CA"
        );
        assert!(
            !is_connected(&agent.addr),
            "the impostor's agent connected: {}",
            agent.proc.log()
        );
        assert!(
            !hub.proc.log().contains("listening on"),
            "{}",
            hub.proc.log()
        );
    }

    // Pinned to the CA that answers, the same hub comes up and admits that CA's users.
    let root = create_user(&real.addr, "root");
    let hub = ztm!().start_hub_with(dir.path(), "good", &real.addr, &["--ca-cert", &real_crt]);
    hub.proc
        .wait_log("listening on", 1, Duration::from_secs(20));
    assert!(hub_admits(&hub.addr, &real_pem, &root));
}

/// With the CA on TLS, a relay between hub and CA that records every byte sees neither the
/// hub token nor the admin token, nor any plain HTTP. A server that terminates TLS on the
/// CA's address with a certificate of another CA, or with a hub certificate of the mesh CA
/// (what a compromised hub holds), is refused before the hub sends its token.
#[test]
fn with_tls_the_network_sees_no_token_and_impostors_are_refused() {
    let dir = TempDir::new("attack-ca-tls");
    const ADMIN: &str = "admin-token-4f9c2e71d0b3";
    let ca = ztm!().start_ca_with(dir.path(), &["--tls", "--token", ADMIN]);
    let base = format!("https://{}", ca.addr);
    let (code, pem, err) = sh(dir.path(), &format!("curl -sfk {base}/api/certificates/ca"));
    assert_eq!(code, 0, "{err}");
    let real_crt = write_file(dir.path(), "ca.crt", &pem);
    let fingerprint = openssl_fingerprint(dir.path(), "ca.crt");
    let admin = |method: &str, path: &str| {
        let (code, out, err) = sh(
            dir.path(),
            &format!(
                "curl -sf --cacert ca.crt -X {method} -H 'Authorization: Bearer {ADMIN}' {base}{path}"
            ),
        );
        assert_eq!(code, 0, "{method} {path}: {out}{err}");
        out
    };
    let hub_token = admin("POST", "/api/hubs/h1").trim().to_string();
    assert!(hub_token.len() >= 32, "{hub_token}");
    let root_key = admin("POST", "/api/certificates/root");
    let root = User {
        name: "root".into(),
        cert: admin("GET", "/api/certificates/root"),
        key: root_key,
    };

    // Hubs reach the CA through a relay that records everything.
    let relay = Relay::start(&ca.addr);
    let via = format!("https://{}", relay.addr);
    let h1 = ztm!().start_hub_with(
        dir.path(),
        "h1",
        &via,
        &[
            "--ca-cert",
            &real_crt,
            "--ca-token",
            &hub_token,
            "--id",
            "h1",
        ],
    );
    let h2 = ztm!().start_hub_with(
        dir.path(),
        "h2",
        &via,
        &[
            "--ca-fingerprint",
            &fingerprint,
            "--ca-token",
            ADMIN,
            "--id",
            "h2",
        ],
    );
    for hub in [&h1, &h2] {
        hub.proc
            .wait_log("listening on", 1, Duration::from_secs(20));
        assert!(hub_admits(&hub.addr, &pem, &root), "{}", hub.proc.log());
    }
    // The CRL went through the relay too.
    h1.proc.wait_log("CRL number", 1, Duration::from_secs(20));
    let seen = relay.seen();
    assert!(
        seen.len() > 2_000,
        "the relay saw only {} bytes",
        seen.len()
    );
    for secret in [
        hub_token.as_str(),
        ADMIN,
        "Bearer",
        "HTTP/1.1",
        "BEGIN CERTIFICATE",
    ] {
        assert!(
            !contains(&seen, secret),
            "the relay saw {secret:?} in clear"
        );
    }

    // Impostors terminating TLS on the CA's address.
    let other = ztm_pki::create_ca().unwrap();
    let other_signer = ztm_pki::CaSigner::load(&other.cert_pem, &other.key_pem).unwrap();
    let sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let (other_key, other_public) = ztm_pki::generate_key().unwrap();
    let (other_cert, _) = other_signer
        .sign_hub("ca", &other_public, &sans, ztm_pki::HUB_VALIDITY)
        .unwrap();
    // A certificate the mesh CA signed for a hub, for the CA's address: a compromised hub
    // can get one for any name.
    let (evil_key, evil_public) = ztm_pki::generate_key().unwrap();
    let evil_pub_file = write_file(dir.path(), "evil.pub", &evil_public);
    let (code, evil_cert, err) = sh(
        dir.path(),
        &format!(
            "curl -sf --cacert ca.crt -X POST -H 'Authorization: Bearer {ADMIN}' \
             --data-binary @{evil_pub_file} '{base}/api/sign/hub/evil?names=127.0.0.1,localhost'"
        ),
    );
    assert_eq!(code, 0, "{err}");
    let impostors = [
        (
            "another CA",
            Impostor::start(&other_cert, &other_key, &other.cert_pem),
        ),
        (
            "a hub of the mesh CA",
            Impostor::start(&evil_cert, &evil_key, &pem),
        ),
    ];
    for (what, impostor) in &impostors {
        for (i, pin) in [
            ["--ca-cert", real_crt.as_str()],
            ["--ca-fingerprint", fingerprint.as_str()],
        ]
        .iter()
        .enumerate()
        {
            let mut flags = pin.to_vec();
            flags.extend(["--ca-token", hub_token.as_str(), "--id", "h1"]);
            let hub = ztm!().spawn_hub_with(
                dir.path(),
                &format!("impostor-{i}-{}", what.replace(' ', "-")),
                &format!("https://{}", impostor.addr),
                &flags,
            );
            hub.proc.wait_log("pinned CA", 2, Duration::from_secs(20));
            let log = hub.proc.log();
            assert!(
                !log.contains("listening on"),
                "{what}: the hub came up:\n{log}"
            );
            assert!(!hub_admits(&hub.addr, &pem, &root), "{what}: admitted");
        }
        let got = impostor.received();
        assert!(
            !contains(&got, &hub_token) && !contains(&got, "Bearer"),
            "{what} received the hub token: {}",
            String::from_utf8_lossy(&got)
        );
    }
}

/// A hub token does what a hub needs and nothing else: 403 for users, other hubs' names and
/// the list of hubs; once its hub is revoked it signs nothing, and neither does the admin for
/// that name.
#[test]
fn a_hub_token_is_scoped_to_its_hub() {
    let dir = TempDir::new("attack-ca-scope");
    const ADMIN: &str = "admin-token-8e1d";
    let ca = ztm!().start_ca_with(dir.path(), &["--token", ADMIN]);
    let as_admin = [("Authorization", format!("Bearer {ADMIN}"))];
    let req = |method: &str, path: &str, auth: &[(&str, String)], body: &str| {
        let headers: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
        http(&ca.addr, method, path, &headers, body.as_bytes()).unwrap()
    };
    let r = req("POST", "/api/certificates/root", &as_admin, "");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = req("POST", "/api/hubs/h1", &as_admin, "");
    assert_eq!(r.status, 200, "create hub h1: {}", r.text());
    let token = r.text().trim().to_string();
    assert!(token.len() >= 32, "{token}");
    let again = req("POST", "/api/hubs/h1", &as_admin, "");
    assert_eq!(again.status, 409, "{}", again.text());
    let as_hub = [("Authorization", format!("Bearer {token}"))];
    let (_, public) = ztm_pki::generate_key().unwrap();

    // What a hub needs.
    for path in [
        "/api/certificates/ca",
        "/api/revocations?since=0",
        "/api/crl",
    ] {
        let r = req("GET", path, &as_hub, "");
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    }
    let r = req("POST", "/api/sign/hub/h1?names=127.0.0.1", &as_hub, &public);
    assert_eq!(r.status, 200, "{}", r.text());
    let serial = ztm_pki::cert_info_pem(&r.text(), "hub").unwrap().serial;

    // Nothing else.
    for (method, path) in [
        ("POST", "/api/certificates/mallory"),
        ("DELETE", "/api/certificates/root"),
        ("GET", "/api/certificates/root"),
        ("GET", "/api/certificates"),
        ("POST", "/api/sign/hub/h2"),
        ("POST", "/api/sign/hub/h1x"),
        ("POST", "/api/sign/hub/h1%2F..%2Fh2"),
        ("GET", "/api/hubs"),
        ("POST", "/api/hubs/h2"),
        ("DELETE", "/api/hubs/h1"),
    ] {
        let r = req(method, path, &as_hub, &public);
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text());
        assert!(r.text().contains("hub token"), "{}", r.text());
    }
    assert_eq!(
        req("GET", "/api/certificates/mallory", &as_admin, "").status,
        404
    );
    assert_eq!(
        req("GET", "/api/certificates/root", &as_admin, "").status,
        200
    );

    // The admin sees the hub and its certificate, and revokes it.
    let hubs = req("GET", "/api/hubs", &as_admin, "").json();
    let h1 = hubs
        .as_array()
        .and_then(|l| l.iter().find(|h| h["name"] == "h1"))
        .cloned()
        .unwrap_or_else(|| panic!("h1 not listed: {hubs}"));
    assert_eq!(h1["revoked"], false, "{h1}");
    assert_eq!(h1["certificates"][0]["serial"], serial.as_str(), "{h1}");
    let r = req("DELETE", "/api/hubs/h1", &as_admin, "");
    assert_eq!(r.status, 204, "{}", r.text());

    // The token is dead, and h1 gets no certificate from anyone.
    let r = req("POST", "/api/sign/hub/h1", &as_hub, &public);
    assert!(r.status == 401 || r.status == 403, "{}", r.text());
    let r = req("GET", "/api/revocations", &as_hub, "");
    assert!(r.status == 401 || r.status == 403, "{}", r.text());
    let r = req("POST", "/api/sign/hub/h1", &as_admin, &public);
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("revoked"), "{}", r.text());
    let feed = req("GET", "/api/revocations?since=0", &as_admin, "").json();
    assert!(
        feed["revocations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "hub/h1" && r["serial"] == serial.as_str()),
        "{feed}"
    );
    let hubs = req("GET", "/api/hubs", &as_admin, "").json();
    assert_eq!(hubs[0]["revoked"], true, "{hubs}");

    // The CRL lists the serial and is signed by the CA.
    let crl = req("GET", "/api/crl", &as_admin, "").text();
    std::fs::write(dir.join("crl.pem"), &crl).unwrap();
    std::fs::write(
        dir.join("ca.crt"),
        req("GET", "/api/certificates/ca", &[], "").body,
    )
    .unwrap();
    let (code, out, err) = sh(
        dir.path(),
        "openssl crl -in crl.pem -CAfile ca.crt -noout -text",
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("verify OK") || out.contains("verify OK"),
        "{out}{err}"
    );
    assert!(
        out.to_lowercase().contains(&serial.to_lowercase()),
        "{serial} not in\n{out}"
    );
}

/// Two hubs; agents A and B use both. Hub 1 is cut off from the CA (so it cannot learn of
/// anything), then revoked at the CA. The agents learn it from hub 2, close their links to
/// hub 1 and refuse it in the handshake from then on, also after a restart; the tunnel
/// between them keeps working through hub 2.
#[test]
fn agents_drop_a_revoked_hub_and_learn_it_from_another() {
    let dir = TempDir::new("attack-ca-revoke-hub");
    let ca = ztm!().start_ca(dir.path());
    let pem = ca_pem(&ca.addr);
    let root = create_user(&ca.addr, "root");
    let alice = create_user(&ca.addr, "alice");
    let relay = Relay::start(&ca.addr);
    let h1 = ztm!().start_hub(dir.path(), "hub1", &relay.addr);
    let h2 = ztm!().start_hub(dir.path(), "hub2", &ca.addr);
    let h1_name = format!("127.0.0.1-{}", h1.addr.rsplit(':').next().unwrap());
    let a = ztm!().start_agent(dir.path(), "a");
    let mut b = ztm!().start_agent(dir.path(), "b");
    join_ok(&a.addr, &pem, "a", &root, &[&h1.addr, &h2.addr]);
    join_ok(&b.addr, &pem, "b", &alice, &[&h1.addr, &h2.addr]);
    let (a_id, b_id) = (local_id(&a.addr), local_id(&b.addr));
    let echo = echo_server();
    let r = create_service(&a.addr, &a_id, "echo", echo.port);
    assert_eq!(r.status, 200, "{}", r.text());
    let port = free_port();
    let r = post_json(
        &b.addr,
        &format!("/api/meshes/{MESH}/endpoints/{b_id}/ports/127.0.0.1/tcp/{port}"),
        &json!({"target": {"service": "echo", "endpoint": a_id}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let tunnel_works = || {
        use std::io::{BufRead, BufReader};
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let msg = format!("hello {}\n", rand_u64());
        if s.write_all(msg.as_bytes()).is_err() {
            return false;
        }
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).is_ok() && line == msg
    };
    let online_at = |hub: &str, who: &str| {
        runtime().block_on(async {
            let c = control(hub, &pem, &root).await;
            let r = call(&c.sender, "GET", "/api/endpoints", &[], Bytes::new())
                .await
                .unwrap();
            r.json()
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["id"] == who && e["online"] == true)
        })
    };
    wait_until(
        Duration::from_secs(30),
        "A and B online at both hubs",
        || {
            [&h1.addr, &h2.addr]
                .iter()
                .all(|h| online_at(h, &a_id) && online_at(h, &b_id))
        },
    );
    wait_until(Duration::from_secs(20), "the tunnel works", tunnel_works);

    // Hub 1 can no longer hear from the CA, and is revoked there.
    relay.cut();
    let r = delete(&ca.addr, &format!("/api/hubs/{h1_name}"));
    assert_eq!(r.status, 204, "revoke hub 1: {}", r.text());
    let revoked = format!("hub/{h1_name}'s certificate has been revoked");
    for agent in [&a, &b] {
        agent.proc.wait_log(&revoked, 1, Duration::from_secs(60));
    }
    wait_until(Duration::from_secs(10), "A and B gone from hub 1", || {
        !online_at(&h1.addr, &a_id) && !online_at(&h1.addr, &b_id)
    });
    assert!(tunnel_works(), "the tunnel through hub 2 broke");
    // Dialling hub 1 again fails in the TLS handshake.
    let refused = "the hub's certificate has been revoked by the mesh CA";
    for agent in [&a, &b] {
        agent.proc.wait_log(refused, 1, Duration::from_secs(30));
    }

    // After a restart, B refuses hub 1 at once: it kept the CRL.
    assert_eq!(b.proc.stop(), Some(0));
    let before = b.proc.log().len();
    b.restart();
    wait_until(Duration::from_secs(20), "B connected again", || {
        is_connected(&b.addr)
    });
    wait_until(Duration::from_secs(20), "B refused hub 1 again", || {
        b.proc.log()[before..].contains(refused)
    });
    let after = b.proc.log()[before..].to_string();
    assert!(
        !after.contains(&format!("connected to hub {}", h1.addr)),
        "B connected to the revoked hub after a restart:\n{after}"
    );
    wait_until(
        Duration::from_secs(20),
        "the tunnel works again",
        tunnel_works,
    );
}

/// A hub refuses to start, before connecting anywhere, when its CA is not on loopback and it
/// was given no way to know the CA, or would talk to it in plain HTTP.
#[test]
fn a_hub_refuses_a_remote_ca_it_cannot_authenticate() {
    let dir = TempDir::new("attack-ca-remote");
    let fingerprint = "ab".repeat(32);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--ca", "198.51.100.1:9999"], "--ca-cert"),
        (vec!["--ca", "https://198.51.100.1:9999"], "--ca-cert"),
        (vec!["--ca", "ca.example.com:9999"], "--ca-cert"),
        (
            vec![
                "--ca",
                "http://198.51.100.1:9999",
                "--ca-fingerprint",
                &fingerprint,
            ],
            "https://",
        ),
        (
            vec![
                "--ca",
                "198.51.100.1:9999",
                "--ca-fingerprint",
                &fingerprint,
            ],
            "https://",
        ),
    ];
    for (flags, words) in cases {
        // It refuses before it listens.
        let mut args = vec!["hub", "--listen", "127.0.0.1:0"];
        args.extend(&flags);
        let mut hub = ztm!().spawn("hub-remote", dir.path(), &args);
        let code = hub.wait_exit(Duration::from_secs(5));
        let log = hub.log();
        let _ = std::fs::remove_file(&hub.log_path);
        assert!(
            matches!(code, Some(c) if c != 0),
            "{flags:?}: the hub did not refuse to start ({code:?}):\n{log}"
        );
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{flags:?}: one line:\n{log}");
        assert!(lines[0].contains(words), "{flags:?}: {log}");
        assert!(!log.contains("cannot get a certificate"), "{log}");
    }
}
