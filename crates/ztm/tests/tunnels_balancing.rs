//! Several providers of one service (docs/requirements.md §7): connections spread over them,
//! fail over when one dies, keep their first bytes when a provider refuses, and go only to
//! providers whose own user list admits the user.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ztm_testkit::prelude::*;
use ztm_testkit::stack::Stack;
use ztm_testkit::traffic::*;

/// Two endpoints provide one service: connections through a port with no fixed endpoint reach
/// both; with one provider killed, every next connection still succeeds.
#[test]
fn balancing_over_two_providers_and_failover() {
    let mut st = Stack::start(&ztm!(), "tun-lb", &["root", "bob", "carol"]);
    let b_srv = tagged_server("B");
    let c_srv = tagged_server("C");
    st.add_service(1, "tcp", "web", b_srv.port, None);
    st.add_service(2, "tcp", "web", c_srv.port, None);
    st.wait_service(0, "tcp", "web", &[1, 2]);
    let port = free_port();
    st.map_port(0, "tcp", port, "web", None);
    // Until both providers answered once (the agent's view of providers may lag a moment).
    let (mut seen_b, mut seen_c) = (false, false);
    wait_until(Duration::from_secs(20), "both providers to answer", || {
        match roundtrip(port, "ping").as_deref() {
            Ok("B:ping") => seen_b = true,
            Ok("C:ping") => seen_c = true,
            _ => {}
        }
        seen_b && seen_c
    });

    let mut counts = [0usize; 2];
    let mut failures = Vec::new();
    for i in 0..100 {
        match roundtrip(port, &format!("n{i}")) {
            Ok(got) if got == format!("B:n{i}") => counts[0] += 1,
            Ok(got) if got == format!("C:n{i}") => counts[1] += 1,
            Ok(got) => failures.push(format!("{i}: answer {got:?}")),
            Err(e) => failures.push(format!("{i}: {e}")),
        }
    }
    eprintln!("100 connections: {} to B, {} to C", counts[0], counts[1]);
    assert!(failures.is_empty(), "failed connections: {failures:?}");
    assert!(
        counts[0] >= 30 && counts[1] >= 30,
        "connections were not spread over both providers: B {}, C {}",
        counts[0],
        counts[1]
    );

    // kill -9 C, then at once 100 more connections: all must succeed, at B.
    st.agents[2].proc.kill9();
    let killed = Instant::now();
    let mut failures = Vec::new();
    let mut to_b = 0;
    for i in 0..100 {
        let t = Instant::now();
        match roundtrip(port, &format!("k{i}")) {
            Ok(got) if got == format!("B:k{i}") => to_b += 1,
            Ok(got) => failures.push(format!(
                "{i} ({:?} after the kill): answer {got:?}",
                t - killed
            )),
            Err(e) => failures.push(format!("{i} ({:?} after the kill): {e}", t - killed)),
        }
    }
    let log: Vec<String> = try_json(st.api(0), &format!("/api/meshes/{MESH}/log"))
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .rev()
        .take(10)
        .map(|e| e.to_string())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of 100 connections failed after the kill of a provider: {failures:?}\n\
         A's latest mesh log entries: {log:#?}",
        failures.len()
    );
    assert_eq!(to_b, 100);
}

/// A client's first bytes travel with the tunnel's CONNECT. When the provider tried first
/// refuses (its backend is down), the next provider must still get those bytes; and a client
/// that sends and half-closes at once still gets its whole answer.
#[test]
fn first_bytes_reach_the_next_provider_after_a_refusal() {
    let st = Stack::start(&ztm!(), "tun-first", &["root", "bob", "carol"]);
    let dead = free_port(); // nothing listens here
    let c_srv = tagged_server("C");
    st.add_service(1, "tcp", "web", dead, None);
    st.add_service(2, "tcp", "web", c_srv.port, None);
    st.wait_service(0, "tcp", "web", &[1, 2]);
    let port = free_port();
    st.map_port(0, "tcp", port, "web", None);
    wait_tunnel(port, "C", Duration::from_secs(20));

    // Lost first bytes would leave a client waiting: give up on a connection after 5 s.
    let quick = || {
        let s = connect(port)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok::<_, std::io::Error>(s)
    };
    for i in 0..40 {
        let got = quick().and_then(|mut s| line_on(&mut s, &format!("f{i}")));
        assert_eq!(got.ok(), Some(format!("C:f{i}")), "connection {i}");
    }
    // Two lines and a half-close in one go: both answers, then the end of the stream.
    for i in 0..10 {
        let mut s = quick().unwrap();
        s.write_all(format!("h{i}a\nh{i}b\n").as_bytes()).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        assert_eq!(got, format!("C:h{i}a\nC:h{i}b\n"));
    }
}

/// Two providers of one service may admit different users. Each user discovers, and is sent
/// to, exactly the providers whose own list admits it, whichever provider the hub happens to
/// list first; the others see each provider's list.
#[test]
fn each_provider_admits_users_by_its_own_list() {
    let st = Stack::start(&ztm!(), "tun-users", &["dave", "bob", "carol"]);
    let (b_srv, c_srv) = (tagged_server("B"), tagged_server("C"));
    let erin: &[&str] = &["erin"];
    // s1: B admits only erin, C everyone; s2 the other way round.
    st.add_service(1, "tcp", "s1", b_srv.port, Some(erin));
    st.add_service(2, "tcp", "s1", c_srv.port, None);
    st.add_service(1, "tcp", "s2", b_srv.port, None);
    st.add_service(2, "tcp", "s2", c_srv.port, Some(erin));
    // Bob owns B's providers and may use C's s1: he sees both, each with its own list.
    st.wait_service(1, "tcp", "s1", &[1, 2]);
    let s1 = service_seen(st.api(1), "tcp", "s1").unwrap();
    assert!(
        s1.get("users").is_none(),
        "the providers' lists differ: {s1}"
    );
    for e in s1["endpoints"].as_array().unwrap() {
        let want = if e["id"] == st.ids[1].as_str() {
            json!(["erin"])
        } else {
            Value::Null
        };
        assert_eq!(e["users"], want, "{s1}");
    }
    // Dave sees exactly the provider that admits him, for each service.
    let (mut only_c, mut only_b) = (vec![st.ids[2].clone()], vec![st.ids[1].clone()]);
    only_c.sort();
    only_b.sort();
    wait_until(
        Duration::from_secs(20),
        "dave to discover s1 at C and s2 at B",
        || {
            providers_seen(st.api(0), "tcp", "s1") == only_c
                && providers_seen(st.api(0), "tcp", "s2") == only_b
        },
    );
    let (p1, p2) = (free_port(), free_port());
    st.map_port(0, "tcp", p1, "s1", None);
    st.map_port(0, "tcp", p2, "s2", None);
    wait_tunnel(p1, "C", Duration::from_secs(20));
    wait_tunnel(p2, "B", Duration::from_secs(20));
    for i in 0..10 {
        assert_eq!(
            roundtrip(p1, &format!("n{i}")).ok(),
            Some(format!("C:n{i}"))
        );
        assert_eq!(
            roundtrip(p2, &format!("n{i}")).ok(),
            Some(format!("B:n{i}"))
        );
    }
}
