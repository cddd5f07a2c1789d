//! Where a port's connections may go: to the endpoint its target names (pinned to that
//! endpoint's id, whatever other users call their endpoints or claim at other hubs), and only
//! for users a service admits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use ztm_testkit::prelude::*;
use ztm_testkit::stack::Stack;
use ztm_testkit::traffic::*;

/// 30 connections through `port`, 100 ms apart (3 s: longer than an agent keeps its list of
/// providers), all answered by the server tagged `tag`.
fn every_connection_reaches(port: u16, tag: &str) {
    for i in 0..30 {
        let got = roundtrip(port, &format!("n{i}"));
        assert_eq!(
            got.as_deref().ok(),
            Some(format!("{tag}:n{i}").as_str()),
            "{got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A port whose target names an endpoint goes there only. Endpoint names are not unique (any
/// user may call an endpoint anything), so a name is pinned to that endpoint's id when the port
/// is created: another user's endpoint taking the same name later, and publishing the same
/// service, must not receive the port's connections. A name two endpoints share is refused,
/// naming both.
#[test]
fn a_target_endpoint_given_by_name_is_pinned_to_its_id() {
    let st = Stack::start(&ztm!(), "tun-pin", &["root", "bob"]);
    let b_srv = tagged_server("B");
    st.add_service(1, "tcp", "svc", b_srv.port, None);
    st.wait_service(0, "tcp", "svc", &[1]);
    let port = free_port();
    let v = st.map_port(0, "tcp", port, "svc", Some("b"));
    assert_eq!(v["target"]["endpoint"], st.ids[1], "pinned to B's id: {v}");
    wait_tunnel(port, "B", Duration::from_secs(20));

    // Carol's endpoint, also named "b", publishes the same service.
    let carol = create_user(&st.ca.addr, "carol");
    let c = st.ztm.start_agent(st.dir.path(), "c");
    join_ok(&c.addr, &ca_pem(&st.ca.addr), "b", &carol, &[&st.hub.addr]);
    let c_id = local_id(&c.addr);
    let c_srv = tagged_server("C");
    add_service_at(&c.addr, &c_id, "tcp", "svc", c_srv.port, None);
    wait_until(
        Duration::from_secs(20),
        "A to discover svc on B and C",
        || discovered(st.api(0), "tcp", "svc", &[&st.ids[1], &c_id]),
    );

    // Every connection through the pinned port still reaches B, over 3 s: longer than A
    // keeps its list of providers (2 s), so the list that includes C is used too.
    every_connection_reaches(port, "B");
    // A new port naming "b" is refused: the name is ambiguous now.
    let path = format!(
        "/api/meshes/{MESH}/endpoints/{}/ports/127.0.0.1/tcp/{}",
        st.ids[0],
        free_port()
    );
    let r = post_json(
        st.api(0),
        &path,
        &json!({"target": {"service": "svc", "endpoint": "b"}}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let msg = r.json()["message"].as_str().unwrap_or("").to_string();
    assert!(
        msg.contains(&st.ids[1]) && msg.contains(&c_id) && msg.contains("carol"),
        "{msg}"
    );
    assert_eq!(
        get(st.api(0), &path).status,
        404,
        "a refused port was not created"
    );
    // By id, either is fine.
    let by_id = free_port();
    let v = st.map_port(0, "tcp", by_id, "svc", Some(&c_id));
    assert_eq!(v["target"]["endpoint"], c_id.as_str(), "{v}");
    wait_tunnel(by_id, "C", Duration::from_secs(20));
}

/// A service that lists `users` admits them (and root and its owner) but not others: a
/// connection of bob's gets no data and is closed, and never reaches the backend.
#[test]
fn service_users_list_refuses_others() {
    // A: bob, B: root (provides), C: alice.
    let st = Stack::start(&ztm!(), "tun-acl", &["bob", "root", "alice"]);
    let secret = tagged_server("S");
    let open = tagged_server("O");
    st.add_service(1, "tcp", "secret", secret.port, Some(&["alice"]));
    st.add_service(1, "tcp", "open", open.port, None);
    st.wait_service(2, "tcp", "secret", &[1]);
    st.wait_service(0, "tcp", "open", &[1]);

    // alice gets through.
    let alice_port = free_port();
    st.map_port(2, "tcp", alice_port, "secret", None);
    wait_tunnel(alice_port, "S", Duration::from_secs(20));
    // bob's agent works for a service with no list ...
    let open_port = free_port();
    st.map_port(0, "tcp", open_port, "open", None);
    wait_tunnel(open_port, "O", Duration::from_secs(20));
    // ... but not for alice's service, by name or with B named as the endpoint.
    let bob_port = free_port();
    let bob_port2 = free_port();
    st.map_port(0, "tcp", bob_port, "secret", None);
    st.map_port(0, "tcp", bob_port2, "secret", Some(st.ids[1].as_str()));
    let before = secret.accepted.load(Ordering::SeqCst);
    for p in [bob_port, bob_port2] {
        for i in 0..3 {
            let mut s = connect(p).unwrap_or_else(|e| panic!("connect to bob's port: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let _ = s.write_all(format!("let me in {i}\n").as_bytes());
            let mut got = Vec::new();
            match s.read_to_end(&mut got) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("bob's connection was not closed: {e} (got {got:?})"),
            }
            assert!(
                got.is_empty(),
                "bob got data from alice's service: {:?}",
                String::from_utf8_lossy(&got)
            );
        }
    }
    assert_eq!(
        secret.accepted.load(Ordering::SeqCst),
        before,
        "a connection of bob's reached the backend of alice's service"
    );
    // alice still does.
    assert_eq!(roundtrip(alice_port, "again").unwrap(), "S:again");
}

/// An endpoint id is derived from its user's name, so no other user can hold it on any hub.
/// Mallory writes Bob's endpoint id into her agent's database and starts it against a second
/// hub Bob does not use: her agent takes an id of its own instead, a hand-made registration of
/// Bob's id is refused, and A's port to Bob's endpoint reaches only Bob.
#[test]
fn another_user_claiming_an_endpoint_id_at_another_hub_gets_nothing() {
    let st = Stack::start(&ztm!(), "tun-claim", &["root", "bob"]);
    let hub2 = st.ztm.start_hub(st.dir.path(), "hub2", &st.ca.addr);
    let pem = ca_pem(&st.ca.addr);
    let root = st.users.iter().find(|u| u.name == "root").unwrap();
    // A uses both hubs, the second one first; Bob only the first.
    join_ok(st.api(0), &pem, "a", root, &[&hub2.addr, &st.hub.addr]);
    let b_srv = tagged_server("B");
    st.add_service(1, "tcp", "svc", b_srv.port, None);
    st.wait_service(0, "tcp", "svc", &[1]);
    let port = free_port();
    let v = st.map_port(0, "tcp", port, "svc", Some(&st.ids[1]));
    assert_eq!(v["target"]["endpoint"], st.ids[1], "{v}");
    assert_eq!(v["target"]["user"], "bob", "pinned to Bob's endpoint: {v}");
    wait_tunnel(port, "B", Duration::from_secs(20));

    // Mallory's agent, on the second hub only, is given Bob's id (written into its database).
    let mallory = create_user(&st.ca.addr, "mallory");
    let mut m = st.ztm.start_agent(st.dir.path(), "m");
    join_ok(&m.addr, &pem, "m", &mallory, &[&hub2.addr]);
    m.proc.stop();
    rusqlite::Connection::open(&m.db)
        .unwrap()
        .execute("UPDATE meshes SET endpoint_id = ?1", [&st.ids[1]])
        .unwrap();
    m.restart();
    let m_id = local_id(&m.addr);
    assert_ne!(m_id, st.ids[1], "Mallory's agent took Bob's id");
    wait_until(Duration::from_secs(20), "Mallory's agent connected", || {
        is_connected(&m.addr)
    });
    let m_srv = tagged_server("M");
    add_service_at(&m.addr, &m_id, "tcp", "svc", m_srv.port, None);

    // A modified agent registering Bob's id as Mallory, at either hub, is refused.
    let rt = tokio::runtime::Runtime::new().unwrap();
    for hub in [&hub2.addr, &st.hub.addr] {
        let refused = rt.block_on(async {
            use ztm_testkit::hostile::*;
            let c = control(hub, &pem, &mallory).await;
            register(&c.sender, &Ident::claim(&st.ids[1]), "b", json!([])).await
        });
        let refused = refused.unwrap();
        assert_eq!(refused.status, 403, "{}", refused.body);
    }
    assert!(
        !endpoints(st.api(0)).is_some_and(|l| l
            .iter()
            .any(|e| e["id"] == st.ids[1].as_str() && e["username"] == "mallory")),
        "A lists a claim of Bob's id by Mallory"
    );
    // Every connection through the port still reaches Bob, over 3 s.
    every_connection_reaches(port, "B");
}
