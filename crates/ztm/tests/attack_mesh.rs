//! Attacks through the mesh's own features, by a hostile user with a real agent: publishing
//! a service under a name others use, to receive their connections. docs/security.md
//! describes the attacker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use serde_json::json;
use ztm_testkit::hostile::*;
use ztm_testkit::prelude::*;

/// A TCP server on 127.0.0.1 answering each connection's first line with `tag`.
fn tagged(tag: &'static str) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut line = String::new();
                if BufReader::new(s).read_line(&mut line).is_ok() {
                    let _ = w.write_all(format!("{tag}\n").as_bytes());
                }
            });
        }
    });
    port
}

/// Who answers a fresh connection to `port` on 127.0.0.1 (None if it fails).
fn who(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"who?\n").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    Some(line.trim().to_string())
}

/// Mallory publishes a service under the name root's service has. Alice's port that names no
/// endpoint spreads connections over providers, but only those of users it trusts (alice and
/// root by default): none reaches Mallory. A port that trusts every user (`*`) reaches both.
#[test]
fn a_service_published_under_anothers_name_gets_no_connections() {
    let honest = Honest::start(&ztm!(), "attack-samename", &[]);
    let mallory = honest.user("mallory");
    let m = ztm!().start_agent(honest.dir.path(), "m");
    join_ok(&m.addr, &honest.pem, "m", &mallory, &[&honest.hub.addr]);
    let m_id = local_id(&m.addr);
    let r = create_service(&m.addr, &m_id, "db", tagged("mallory"));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = create_service(&honest.a.addr, &honest.a_id, "db", tagged("root"));
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until(
        Duration::from_secs(20),
        "B sees both providers of db",
        || discovers(&honest.b.addr, "db", &honest.a_id) && discovers(&honest.b.addr, "db", &m_id),
    );
    let b_id = local_id(&honest.b.addr);
    let map = |trust: Option<&[&str]>| {
        let port = free_port();
        let mut target = json!({"service": "db"});
        if let Some(t) = trust {
            target["trust"] = json!(t);
        }
        let r = post_json(
            &honest.b.addr,
            &format!("/api/meshes/{MESH}/endpoints/{b_id}/ports/127.0.0.1/tcp/{port}"),
            &json!({ "target": target }),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        wait_until(Duration::from_secs(20), "the port answers", || {
            who(port).is_some()
        });
        port
    };

    let default = map(None);
    let answers: Vec<_> = (0..20).map(|_| who(default)).collect();
    assert!(
        answers.iter().all(|a| a.as_deref() == Some("root")),
        "alice's port reached a provider she does not trust: {answers:?}"
    );

    let everyone = map(Some(&["*"]));
    let answers: Vec<_> = (0..20).map(|_| who(everyone)).collect();
    assert!(answers.iter().all(Option::is_some), "{answers:?}");
    assert!(
        answers.iter().any(|a| a.as_deref() == Some("mallory"))
            && answers.iter().any(|a| a.as_deref() == Some("root")),
        "a port trusting every user spreads over both: {answers:?}"
    );

    // A trust list is for ports without an endpoint, and holds user names or `*`.
    let bad = post_json(
        &honest.b.addr,
        &format!(
            "/api/meshes/{MESH}/endpoints/{b_id}/ports/127.0.0.1/tcp/{}",
            free_port()
        ),
        &json!({"target": {"service": "db", "trust": ["evil\u{1b}[2J"]}}),
    );
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(honest.tunnel_works());
}

/// Opens an exit tunnel at the hub by hand, as `user`'s own client would: to endpoint `ep` of
/// `ep_user`, service `svc`, with `destination`. The hub's status.
async fn exit_tunnel(
    sender: &h2::client::SendRequest<bytes::Bytes>,
    ep: &str,
    ep_user: &str,
    svc: &str,
    destination: &str,
) -> u16 {
    let mut req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("https://hub/api/endpoints/{ep}/services/tcp/{svc}"))
        .header("ztm-endpoint-user", ep_user)
        .header("ztm-destination", destination)
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("ztm-tunnel"));
    let mut sender = sender.clone().ready().await.unwrap();
    let (resp, _send) = sender.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(15), resp)
        .await
        .expect("the hub did not answer")
        .unwrap();
    resp.status().as_u16()
}

/// Mallory, with a hand-made client, asks the hub for a tunnel through an exit that admits
/// only alice, and slips a destination onto a tunnel to an ordinary service: the hub refuses
/// both, and the exit's network sees nothing.
#[test]
fn the_hub_keeps_users_out_of_exits_that_do_not_admit_them() {
    let honest = Honest::start(&ztm!(), "attack-exit-hub", &[]);
    let mallory = honest.user("mallory");
    let alice = honest.alice.clone();
    let ztm_testkit::traffic::Backend {
        port: target,
        accepted: hits,
    } = ztm_testkit::traffic::serve(ztm_testkit::traffic::bind_local(), drop);
    let r = post_json(
        &honest.a.addr,
        &format!("/api/meshes/{MESH}/endpoints/{}/exit", honest.a_id),
        &json!({"allow": [format!("127.0.0.1:{target}")], "users": ["alice"]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let svc = create_service(&honest.a.addr, &honest.a_id, "web", target);
    assert_eq!(svc.status, 200, "{}", svc.text());
    let owner = get(&honest.a.addr, &format!("/api/meshes/{MESH}")).json()["agent"]["username"]
        .as_str()
        .unwrap_or("root")
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dest = format!("127.0.0.1:{target}");
    // Until the exit is published, and then for good: mallory is refused by the hub.
    let m = rt.block_on(control(&honest.hub.addr, &honest.pem, &mallory));
    let a = rt.block_on(control(&honest.hub.addr, &honest.pem, &alice));
    wait_until(Duration::from_secs(20), "alice to be let through", || {
        rt.block_on(exit_tunnel(&a.sender, &honest.a_id, &owner, "~exit", &dest)) == 200
    });
    // Alice's one tunnel that opened made one connection (counted by the listener's thread).
    wait_until(
        Duration::from_secs(5),
        "alice's connection at the target",
        || hits.load(std::sync::atomic::Ordering::SeqCst) == 1,
    );
    let alice_hits = hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        rt.block_on(exit_tunnel(&m.sender, &honest.a_id, &owner, "~exit", &dest)),
        403,
        "mallory was let into an exit that admits only alice"
    );
    assert_eq!(
        rt.block_on(exit_tunnel(&m.sender, &honest.a_id, &owner, "web", &dest)),
        400,
        "a destination on a tunnel to a service"
    );
    assert_eq!(
        rt.block_on(exit_tunnel(
            &a.sender,
            &honest.a_id,
            &owner,
            "~exit",
            "no port"
        )),
        400
    );
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        alice_hits,
        "the exit connected for mallory"
    );
}
