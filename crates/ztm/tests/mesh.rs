//! End-to-end tests of the control plane: a real CA, hub(s) and agents on loopback, driven
//! through the agents' REST API (and curl/openssl against the hub).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ztm_testkit::prelude::*;

const S: fn(u64) -> Duration = Duration::from_secs;

/// 1. Two agents join through the REST API with PEMs from the CA and see each other online.
#[test]
fn two_agents_join_and_see_each_other() {
    let dir = TempDir::new("mesh-join");
    let ca = ztm!().start_ca(dir.path());
    let ca_cert = ca_pem(&ca.addr);
    let root = create_user(&ca.addr, "root");
    let bob = create_user(&ca.addr, "bob");
    let hub = ztm!().start_hub(dir.path(), "hub", &ca.addr);
    let a = ztm!().start_agent(dir.path(), "a");
    let b = ztm!().start_agent(dir.path(), "b");

    let ma = join_ok(&a.addr, &ca_cert, "a", &root, &[&hub.addr]);
    let mb = join_ok(&b.addr, &ca_cert, "b", &bob, &[&hub.addr]);
    let joined = Instant::now();
    assert_eq!(ma["name"], MESH, "{ma}");
    assert_eq!(mb["agent"]["name"], "b", "{mb}");

    let a_id = local_id(&a.addr);
    let b_id = local_id(&b.addr);
    assert_ne!(a_id, b_id);
    let all_online = || {
        is_online(&a.addr, &a_id)
            && is_online(&a.addr, &b_id)
            && is_online(&b.addr, &a_id)
            && is_online(&b.addr, &b_id)
    };
    let took = time_until(S(5), all_online);
    assert!(
        took.is_some(),
        "A and B not both online as seen from both agents within 5 s of the join:\nA: {:?}\nB: {:?}",
        endpoints(&a.addr),
        endpoints(&b.addr)
    );
    eprintln!(
        "both online {:?} after the second join ({:?} since)",
        took.unwrap(),
        joined.elapsed()
    );

    // Both meshes connected, with the right identity and nothing secret in them.
    for (agent, user, name, id) in [(&a, "root", "a", &a_id), (&b, "bob", "b", &b_id)] {
        wait_until(S(5), "mesh connected", || is_connected(&agent.addr));
        let m = get(&agent.addr, &format!("/api/meshes/{MESH}"));
        assert_eq!(m.status, 200);
        assert!(!m.text().contains("PRIVATE KEY"), "{}", m.text());
        assert!(!m.text().contains("privateKey"), "{}", m.text());
        let m = m.json();
        assert_eq!(m["name"], MESH, "{m}");
        assert_eq!(m["connected"], true, "{m}");
        assert_eq!(m["agent"]["username"], user, "{m}");
        assert_eq!(m["agent"]["name"], name, "{m}");
        assert_eq!(m["agent"]["id"], **id, "{m}");
        assert_eq!(
            pem_norm(m["ca"].as_str().unwrap()),
            pem_norm(&ca_cert),
            "{m}"
        );
        assert_eq!(
            pem_norm(m["agent"]["certificate"].as_str().unwrap()),
            pem_norm(user_cert(&root, &bob, user)),
            "{m}"
        );
        assert_eq!(m["bootstraps"], serde_json::json!([hub.addr]), "{m}");
        let list = get(&agent.addr, "/api/meshes");
        assert_eq!(list.status, 200);
        assert!(!list.text().contains("PRIVATE KEY"), "{}", list.text());
        assert!(
            list.json()
                .as_array()
                .is_some_and(|l| l.iter().any(|m| m["name"] == MESH)),
            "{}",
            list.text()
        );
        let log = get(&agent.addr, &format!("/api/meshes/{MESH}/log"));
        assert_eq!(log.status, 200, "{}", log.text());
        assert!(log.json().is_array(), "{}", log.text());
        assert!(!log.text().contains("PRIVATE KEY"));
    }

    // Each agent's view: itself local, the other remote, with user names. Addresses are
    // shown to root and to the endpoint's own user only: root sees bob's, bob not root's.
    for (agent, local, remote, local_user, remote_user, remote_ip) in [
        (&a, &a_id, &b_id, "root", "bob", "127.0.0.1"),
        (&b, &b_id, &a_id, "bob", "root", ""),
    ] {
        let me = endpoint(&agent.addr, local).unwrap();
        let other = endpoint(&agent.addr, remote).unwrap();
        assert_eq!(me["isLocal"], true, "{me}");
        assert_eq!(other["isLocal"], false, "{other}");
        assert_eq!(me["username"], local_user, "{me}");
        assert_eq!(other["username"], remote_user, "{other}");
        assert_eq!(other["ip"], remote_ip, "{other}");
        assert!(other["heartbeat"].as_i64().unwrap_or(0) > 0, "{other}");
        let one = get(
            &agent.addr,
            &format!("/api/meshes/{MESH}/endpoints/{remote}"),
        );
        assert_eq!(one.status, 200, "{}", one.text());
        assert_eq!(one.json()["id"], **remote);
    }
}

/// A PEM without its whitespace (an agent may re-wrap it).
fn pem_norm(p: &str) -> String {
    p.chars().filter(|c| !c.is_whitespace()).collect()
}

fn user_cert<'a>(root: &'a User, bob: &'a User, name: &str) -> &'a str {
    if name == "root" {
        &root.cert
    } else {
        &bob.cert
    }
}

/// Test 2. Remote management: root on A creates, lists and deletes services on B; B keeps them
/// across a restart.
#[test]
fn root_manages_services_on_a_remote_endpoint() {
    let mut net = setup(&ztm!(), "mesh-remote", NetOpts::default());
    let (a, b_id) = (net.a.addr.clone(), net.b_id.clone());

    for (name, port) in [("web", 8080), ("tmp", 8081)] {
        let r = create_service(&a, &b_id, name, port);
        assert!(
            is_2xx(&r),
            "create {name} on B via A: {} {}",
            r.status,
            r.text()
        );
    }
    // A sees them on B (through the hub), and B's own API has them.
    let via_a = services_on(&a, &b_id).expect("list B's services via A");
    assert!(
        has_service(&via_a, "web") && has_service(&via_a, "tmp"),
        "{via_a:?}"
    );
    let one = get(&a, &svc_path(&b_id, "web"));
    assert_eq!(one.status, 200, "{}", one.text());
    let one = one.json();
    assert_eq!(one["name"], "web", "{one}");
    assert_eq!(one["port"], 8080, "{one}");
    assert_eq!(one["host"], "127.0.0.1", "{one}");
    let on_b = services_on(&net.b.addr, &b_id).expect("B's own services");
    assert!(
        has_service(&on_b, "web") && has_service(&on_b, "tmp"),
        "{on_b:?}"
    );
    // A's own services are not touched.
    let on_a = services_on(&a, &net.a_id).expect("A's services");
    assert!(!has_service(&on_a, "web"), "{on_a:?}");

    // Discovery: A's mesh-wide list shows B as the provider.
    wait_until(S(10), "A discovers B's web service", || {
        discovers(&a, "web", &b_id)
    });

    // Delete one through A.
    let r = delete(&a, &svc_path(&b_id, "tmp"));
    assert!(is_2xx(&r), "delete tmp: {} {}", r.status, r.text());
    let on_b = services_on(&net.b.addr, &b_id).unwrap();
    assert!(
        !has_service(&on_b, "tmp") && has_service(&on_b, "web"),
        "{on_b:?}"
    );
    assert_eq!(get(&a, &svc_path(&b_id, "tmp")).status, 404);
    assert_eq!(get(&net.b.addr, &svc_path(&b_id, "tmp")).status, 404);

    // Restart B on the same database: the service is still there and visible again from A.
    assert_eq!(net.b.proc.stop(), Some(0), "B exits cleanly on SIGTERM");
    net.b.restart();
    assert_eq!(local_id(&net.b.addr), b_id, "B keeps its endpoint id");
    let on_b = services_on(&net.b.addr, &b_id).expect("B's services after restart");
    assert!(
        has_service(&on_b, "web") && !has_service(&on_b, "tmp"),
        "{on_b:?}"
    );
    wait_until(S(15), "B online again as seen from A", || {
        is_online(&a, &b_id)
    });
    wait_until(S(15), "A lists B's web service again (remote)", || {
        services_on(&a, &b_id).is_some_and(|l| has_service(&l, "web") && !has_service(&l, "tmp"))
    });
    wait_until(S(15), "A discovers B's web service again", || {
        discovers(&a, "web", &b_id)
    });
    assert!(
        !discovers(&a, "tmp", &b_id),
        "a deleted service is discovered"
    );
}

/// 3. A non-root user may not manage someone else's endpoint.
#[test]
fn non_root_user_cannot_manage_another_users_endpoint() {
    let net = setup(&ztm!(), "mesh-403", NetOpts::default());
    let (a, b) = (&net.a.addr, &net.b.addr);
    // A (root) has a service of its own.
    let r = create_service(a, &net.a_id, "a-svc", 9000);
    assert!(is_2xx(&r), "{} {}", r.status, r.text());
    let before = services_on(a, &net.a_id).unwrap();
    assert!(has_service(&before, "a-svc"), "{before:?}");

    // bob, on B, tries to create and delete services on A through B's API.
    let r = create_service(b, &net.a_id, "evil", 9001);
    assert_eq!(r.status, 403, "create on A as bob: {}", r.text());
    let body = r.json();
    assert_eq!(body["status"], 403, "{body}");
    assert!(!body["message"].as_str().unwrap_or("").is_empty(), "{body}");
    let r = delete(b, &svc_path(&net.a_id, "a-svc"));
    assert_eq!(r.status, 403, "delete on A as bob: {}", r.text());

    // Nothing changed on A.
    let after = services_on(a, &net.a_id).unwrap();
    assert_eq!(before, after);
    assert!(!has_service(&after, "evil"));
    assert_eq!(get(a, &svc_path(&net.a_id, "evil")).status, 404);

    // Reading A's hubs is managing A too: refused.
    let r = get(
        b,
        &format!("/api/meshes/{MESH}/endpoints/{}/hubs", net.a_id),
    );
    assert_eq!(r.status, 403, "A's hubs read by bob: {}", r.text());

    // bob may still manage his own endpoint, and root may manage bob's.
    let r = create_service(b, &net.b_id, "bob-svc", 9002);
    assert!(is_2xx(&r), "bob on B: {} {}", r.status, r.text());
    let r = create_service(a, &net.b_id, "root-svc", 9003);
    assert!(is_2xx(&r), "root on B: {} {}", r.status, r.text());
    let on_b = services_on(b, &net.b_id).unwrap();
    assert!(
        has_service(&on_b, "bob-svc") && has_service(&on_b, "root-svc"),
        "{on_b:?}"
    );
    // Root reads B's hubs: B answers with its own link, connected, and its round-trip time.
    let r = get(
        a,
        &format!("/api/meshes/{MESH}/endpoints/{}/hubs", net.b_id),
    );
    assert_eq!(r.status, 200, "B's hubs read by root: {}", r.text());
    let hubs = r.json();
    let rtt = hub_rtt_ms(&hubs, &net.hubs[0].addr).unwrap_or_else(|| panic!("{hubs}"));
    assert!(plausible_rtt_ms(rtt), "{hubs}");
}

/// 4. The hub is killed and restarted: agents reconnect by themselves.
#[test]
fn hub_restart_is_recovered_without_touching_agents() {
    let mut net = setup(&ztm!(), "mesh-hubkill", NetOpts::default());
    let r = create_service(&net.b.addr, &net.b_id, "web", 8080);
    assert!(is_2xx(&r), "{} {}", r.status, r.text());
    wait_until(S(10), "A discovers B's service", || {
        discovers(&net.a.addr, "web", &net.b_id)
    });

    net.hubs[0].proc.kill9();
    // The agents notice the hub is gone (so what follows is not a stale view).
    wait_until(S(15), "A's mesh not connected after the hub died", || {
        try_json(&net.a.addr, &format!("/api/meshes/{MESH}"))
            .is_some_and(|m| m["connected"] == false)
    });
    assert!(
        timed_list_meshes(&net.a.addr) < S(1),
        "A's API slow without a hub"
    );

    net.hubs[0].restart();
    let t = Instant::now();
    let took = time_until(S(15), || {
        net.all_online() && is_connected(&net.a.addr) && is_connected(&net.b.addr)
    });
    assert!(
        took.is_some(),
        "not both online within 15 s of the new hub accepting:{}",
        net.state()
    );
    eprintln!("online again {:?} after the hub came back", took.unwrap());
    let left = S(15).saturating_sub(t.elapsed()).max(S(3));
    wait_until(left, "A rediscovers B's service", || {
        discovers(&net.a.addr, "web", &net.b_id)
    });
    // And remote management goes through the new hub.
    let l = services_on(&net.a.addr, &net.b_id).expect("B's services via A after hub restart");
    assert!(has_service(&l, "web"), "{l:?}");
}

/// A hub renews its certificate before it expires, without restarting: with 30 s hub
/// certificates, an agent that first connects after the hub's first certificate expired is
/// served, and the agent that joined at the start is still online.
#[test]
fn hub_renews_its_certificate_before_it_expires() {
    let dir = TempDir::new("mesh-renew");
    let ca = ztm!().start_ca_with(dir.path(), &["--hub-cert-lifetime", "30"]);
    let pem = ca_pem(&ca.addr);
    let root = create_user(&ca.addr, "root");
    let hub = ztm!().start_hub(dir.path(), "hub", &ca.addr);
    let started = Instant::now();
    let a = ztm!().start_agent(dir.path(), "a");
    join_ok(&a.addr, &pem, "a", &root, &[&hub.addr]);
    let a_id = local_id(&a.addr);
    wait_until(S(20), "A online", || is_online(&a.addr, &a_id));

    // The hub's first certificate (valid for 30 s from before `started`) has expired.
    let expired = started + S(32);
    wait_until(S(40), "the hub's first certificate to expire", || {
        Instant::now() >= expired
    });
    let b = ztm!().start_agent(dir.path(), "b");
    join_ok(&b.addr, &pem, "b", &root, &[&hub.addr]);
    let b_id = local_id(&b.addr);
    wait_until(
        S(20),
        "B, joined after the first certificate expired, online",
        || is_online(&b.addr, &b_id) && is_online(&b.addr, &a_id),
    );
    assert!(is_online(&a.addr, &a_id) && is_online(&a.addr, &b_id));
}

/// 5. A hung agent (SIGSTOP) goes offline; it comes back after SIGCONT.
#[test]
fn stopped_agent_goes_offline_and_comes_back() {
    let net = setup(&ztm!(), "mesh-sigstop", NetOpts::default());
    net.b.proc.signal("STOP");
    let took = time_until(S(45), || is_offline(&net.a.addr, &net.b_id));
    if took.is_none() {
        net.b.proc.signal("CONT");
    }
    assert!(
        took.is_some(),
        "B still online as seen from A 45 s after SIGSTOP: {:?}",
        endpoint(&net.a.addr, &net.b_id)
    );
    eprintln!("B offline {:?} after SIGSTOP", took.unwrap());
    // A itself is unaffected (B is not queried: it is stopped).
    assert!(
        is_online(&net.a.addr, &net.a_id),
        "{:?}",
        endpoints(&net.a.addr)
    );

    net.b.proc.signal("CONT");
    let took = time_until(S(15), || {
        is_online(&net.a.addr, &net.b_id) && is_online(&net.b.addr, &net.a_id)
    });
    assert!(
        took.is_some(),
        "B not online again within 15 s of SIGCONT:{}",
        net.state()
    );
    eprintln!("B online {:?} after SIGCONT", took.unwrap());
    assert!(is_connected(&net.b.addr), "{}", net.state());
    // And it can be managed again.
    let r = create_service(&net.a.addr, &net.b_id, "after-cont", 8080);
    assert!(is_2xx(&r), "{} {}", r.status, r.text());
}

/// 6. Revoking B's user certificate at the CA takes B off the mesh.
#[test]
fn revoked_user_is_dropped() {
    let net = setup(&ztm!(), "mesh-revoke", NetOpts::default());
    let r = delete(&net.ca.addr, "/api/certificates/bob");
    assert_eq!(r.status, 204, "{}", r.text());
    let took = time_until(S(30), || is_offline(&net.a.addr, &net.b_id));
    assert!(
        took.is_some(),
        "B still online 30 s after its certificate was revoked:{}",
        net.state()
    );
    eprintln!("B offline {:?} after revocation", took.unwrap());

    // B reports the problem.
    wait_until(S(20), "B's mesh not connected and showing an error", || {
        try_json(&net.b.addr, &format!("/api/meshes/{MESH}")).is_some_and(|m| {
            m["connected"] == false && m["errors"].as_array().is_some_and(|e| !e.is_empty())
        })
    });
    let m = mesh_info(&net.b.addr);
    for e in m["errors"].as_array().unwrap() {
        assert!(
            !e["message"].as_str().unwrap_or("").is_empty(),
            "empty error message: {m}"
        );
    }

    // B stays off (its reconnects are refused) while A carries on.
    let until = Instant::now() + S(6);
    while Instant::now() < until {
        assert!(
            is_offline(&net.a.addr, &net.b_id),
            "B came back with a revoked certificate:{}",
            net.state()
        );
        assert!(
            is_online(&net.a.addr, &net.a_id),
            "A went offline:{}",
            net.state()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(is_connected(&net.a.addr), "{}", net.state());
    assert!(timed_list_meshes(&net.a.addr) < S(1));
    let r = create_service(&net.a.addr, &net.a_id, "still-works", 8080);
    assert!(is_2xx(&r), "{} {}", r.status, r.text());
    // The refusal is B's own, not a mesh-wide outage: B's API still answers.
    assert!(timed_list_meshes(&net.b.addr) < S(1));
}

/// Test 7. Wrong CA, a key that does not match the certificate, an unreachable hub: clear errors,
/// and the agent's API stays responsive.
#[test]
fn misconfigured_meshes_report_errors() {
    let dir = TempDir::new("mesh-errors");
    let ca = ztm!().start_ca(dir.path());
    let other = ztm!().start_other_ca(dir.path(), "other-ca");
    let ca_cert = ca_pem(&ca.addr);
    let other_cert = ca_pem(&other.addr);
    assert_ne!(ca_cert, other_cert);
    let alice = create_user(&ca.addr, "alice");
    let carol = create_user(&ca.addr, "carol");
    let mallory = create_user(&other.addr, "mallory");
    let hub = ztm!().start_hub(dir.path(), "hub", &ca.addr);
    let agent = ztm!().start_agent(dir.path(), "x");
    let ag = agent.addr.as_str();
    let dead_hub = format!("127.0.0.1:{}", free_port());

    // Mismatched key: refused with a 400 naming it, or accepted with an error reported.
    let mismatched = User {
        name: "alice".into(),
        cert: alice.cert.clone(),
        key: carol.key.clone(),
    };
    let r = join(
        ag,
        "badkey",
        &join_body(&ca_cert, "x", &mismatched, &[&hub.addr]),
    );
    let badkey_accepted = match r.status {
        400 => {
            let body = r.json();
            assert_eq!(body["status"], 400, "{body}");
            let msg = body["message"].as_str().unwrap_or("").to_lowercase();
            assert!(
                msg.contains("key") || msg.contains("certificate"),
                "the 400 does not name the problem: {body}"
            );
            assert_eq!(
                get(ag, "/api/meshes/badkey").status,
                404,
                "a refused join must create nothing"
            );
            false
        }
        200 | 201 => true,
        s => panic!("join with a mismatched key: {s} {}", r.text()),
    };

    // A complete identity from another CA, pointed at this mesh's hub.
    let r = join(
        ag,
        "otherca",
        &join_body(&other_cert, "x", &mallory, &[&hub.addr]),
    );
    assert!(
        r.status == 200 || r.status == 201,
        "join with another CA's identity: {} {}",
        r.status,
        r.text()
    );
    // A hub address with nothing listening.
    let r = join(ag, "nohub", &join_body(&ca_cert, "x", &alice, &[&dead_hub]));
    assert!(
        r.status == 200 || r.status == 201,
        "join with an unreachable hub: {} {}",
        r.status,
        r.text()
    );

    let mut meshes = vec!["otherca", "nohub"];
    if badkey_accepted {
        meshes.push("badkey");
    }
    let has_errors = |mesh: &str| {
        try_json(ag, &format!("/api/meshes/{mesh}")).is_some_and(|m| {
            m["errors"].as_array().is_some_and(|e| {
                !e.is_empty()
                    && e.iter()
                        .all(|x| !x["message"].as_str().unwrap_or("").is_empty())
            })
        })
    };
    let start = Instant::now();
    wait_until(S(15), "errors reported for every broken mesh", || {
        // The API answers quickly all along.
        let took = timed_list_meshes(ag);
        assert!(took < S(1), "GET /api/meshes took {took:?}");
        meshes.iter().all(|m| has_errors(m))
    });
    eprintln!("errors reported after {:?}", start.elapsed());
    for mesh in &meshes {
        let m = get(ag, &format!("/api/meshes/{mesh}")).json();
        assert_eq!(m["connected"], false, "{mesh}: {m}");
        eprintln!("{mesh}: {}", m["errors"]);
        let log = get(ag, &format!("/api/meshes/{mesh}/log"));
        assert_eq!(log.status, 200, "{}", log.text());
        let log = log.json();
        let has_error_entry = log.as_array().is_some_and(|l| {
            l.iter().any(|e| {
                e["type"]
                    .as_str()
                    .is_some_and(|t| t.to_lowercase().contains("error"))
                    && !e["message"].as_str().unwrap_or("").is_empty()
            })
        });
        assert!(has_error_entry, "{mesh}: no error entry in the log: {log}");
        // Endpoints/services answer (possibly empty), not hang or 5xx.
        let t = Instant::now();
        let r = get(ag, &format!("/api/meshes/{mesh}/endpoints"));
        assert!(
            t.elapsed() < S(11),
            "{mesh}: endpoints took {:?}",
            t.elapsed()
        );
        assert!(
            serde_json::from_slice::<serde_json::Value>(&r.body).is_ok(),
            "{mesh}: endpoints answered {} {}",
            r.status,
            r.text()
        );
    }
    assert!(timed_list_meshes(ag) < S(1));
    let list = get(ag, "/api/meshes").json();
    assert!(!list.to_string().contains("PRIVATE KEY"));
}

/// Runs curl against the hub's HTTP/2 API; returns (exit code, http_code).
fn curl_hub(dir: &std::path::Path, hub: &str, cert: Option<(&str, &str)>) -> (i32, String, String) {
    let auth = cert
        .map(|(c, k)| format!("--cert {c} --key {k}"))
        .unwrap_or_default();
    let (code, out, err) = sh(
        dir,
        &format!(
            "curl --http2 -k -sS --max-time 10 -o /dev/null -w '%{{http_code}}' {auth} https://{hub}/api/endpoints"
        ),
    );
    (code, out.trim().to_string(), err)
}

/// Runs `openssl s_client -alpn h2`, sends the HTTP/2 preface and an empty SETTINGS frame,
/// and returns (exit code, bytes of application data received, stderr).
fn s_client_hub(
    dir: &std::path::Path,
    hub: &str,
    cert: Option<(&str, &str)>,
) -> (i32, usize, String) {
    let auth = cert
        .map(|(c, k)| format!("-cert {c} -key {k}"))
        .unwrap_or_default();
    let out = dir.join(format!("s_client-{}.out", rand_u64()));
    let (code, _, err) = sh(
        dir,
        &format!(
            "(printf 'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n\\000\\000\\000\\004\\000\\000\\000\\000\\000'; sleep 2) \
             | timeout 6 openssl s_client -quiet -connect {hub} -alpn h2 {auth} > {} ",
            out.display()
        ),
    );
    let n = std::fs::read(&out).map(|v| v.len()).unwrap_or(0);
    (code, n, err)
}

/// 8. The hub refuses TLS without a mesh certificate, and survives 1,000 junk connections.
#[test]
fn hub_refuses_strangers_and_survives_junk() {
    let net = setup(&ztm!(), "mesh-junk", NetOpts::default());
    let d = net.dir.path();
    let hub = net.hubs[0].addr.clone();
    let other = ztm!().start_other_ca(d, "other-ca");
    let stranger = create_user(&other.addr, "root");
    let (sc, sk) = (
        write_file(d, "stranger.crt", &stranger.cert),
        write_file(d, "stranger.key", &stranger.key),
    );
    let (rc, rk) = (
        write_file(d, "root.crt", &net.a_user.cert),
        write_file(d, "root.key", &net.a_user.key),
    );

    // Control: a mesh certificate gets an HTTP/2 answer.
    let (code, http_code, err) = curl_hub(d, &hub, Some((&rc, &rk)));
    assert!(
        code == 0 && http_code != "000",
        "curl with the mesh's root certificate: exit {code}, http {http_code}: {err}"
    );
    let (_, n, err) = s_client_hub(d, &hub, Some((&rc, &rk)));
    assert!(n > 0, "no HTTP/2 data with a valid certificate: {err}");

    // No certificate, or one from another CA: no HTTP exchange at all.
    for (what, cert) in [
        ("no certificate", None),
        ("another CA's certificate", Some((sc.as_str(), sk.as_str()))),
    ] {
        let (code, http_code, err) = curl_hub(d, &hub, cert);
        assert!(
            code != 0 && http_code == "000",
            "curl with {what} got through: exit {code}, http {http_code}: {err}"
        );
        let (_, n, err) = s_client_hub(d, &hub, cert);
        assert_eq!(
            n, 0,
            "openssl s_client with {what} received application data: {err}"
        );
    }

    // 1,000 junk connections from 4 threads: random bytes, a TLS ClientHello prefix left
    // hanging (some half-closed), idle sockets; each held one at most ~2 s.
    let hub_sa: SocketAddr = hub.parse().unwrap();
    let api_sa: SocketAddr = net.a.addr.parse().unwrap();
    let started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            std::thread::spawn(move || {
                let mut rng = Rng::new();
                let mut held: VecDeque<(Instant, TcpStream)> = VecDeque::new();
                let mut opened = 0usize;
                for i in 0..250usize {
                    // Every 10th connection goes to agent A's API instead of the hub.
                    let target = if i % 10 == 9 { api_sa } else { hub_sa };
                    while held.len() >= 60 || held.front().is_some_and(|(t, _)| t.elapsed() >= S(2))
                    {
                        let (t, _s) = held.pop_front().unwrap();
                        if let Some(wait) = S(2).checked_sub(t.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                    let Ok(mut s) = TcpStream::connect_timeout(&target, S(2)) else {
                        continue;
                    };
                    opened += 1;
                    let _ = s.set_write_timeout(Some(S(1)));
                    match (i + w) % 4 {
                        0 => {
                            let n = 1 + (rng.next() % 2048) as usize;
                            let _ = s.write_all(&rng.bytes(n));
                            // closed when dropped
                        }
                        1 | 2 => {
                            // TLS 1.2/1.3 record header + ClientHello header + random, cut short.
                            let mut hello = vec![
                                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
                            ];
                            hello.extend(rng.bytes(32));
                            hello.extend([0x20]);
                            let extra = (rng.next() % 32) as usize;
                            hello.extend(rng.bytes(extra));
                            let _ = s.write_all(&hello);
                            if (i + w) % 4 == 2 {
                                let _ = s.shutdown(Shutdown::Write);
                            }
                            held.push_back((Instant::now(), s));
                        }
                        _ => held.push_back((Instant::now(), s)),
                    }
                }
                while let Some((t, _s)) = held.pop_front() {
                    if let Some(wait) = S(2).checked_sub(t.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                opened
            })
        })
        .collect();
    let mut opened = 0;
    while workers.iter().any(|w| !w.is_finished()) {
        // The agents' APIs keep answering during the flood.
        assert!(
            timed_list_meshes(&net.b.addr) < S(2),
            "B's API slow during the junk"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for w in workers {
        opened += w.join().unwrap();
    }
    eprintln!("{opened} junk connections in {:?}", started.elapsed());
    assert!(
        opened >= 950,
        "only {opened} junk connections could be opened"
    );

    // Everything still works.
    assert!(port_open(&hub), "the hub stopped accepting");
    wait_until(S(10), "both endpoints online after the junk", || {
        net.all_online()
    });
    assert!(
        is_connected(&net.a.addr) && is_connected(&net.b.addr),
        "{}",
        net.state()
    );
    assert!(timed_list_meshes(&net.a.addr) < S(1));
    assert!(timed_list_meshes(&net.b.addr) < S(1));
    let r = create_service(&net.a.addr, &net.b_id, "after-junk", 8080);
    assert!(
        is_2xx(&r),
        "create on B via A after the junk: {} {}",
        r.status,
        r.text()
    );
    let on_b = services_on(&net.b.addr, &net.b_id).unwrap();
    assert!(has_service(&on_b, "after-junk"), "{on_b:?}");
    wait_until(S(10), "A discovers the new service", || {
        discovers(&net.a.addr, "after-junk", &net.b_id)
    });
    // Valid clients still get in.
    let (code, http_code, err) = curl_hub(d, &hub, Some((&rc, &rk)));
    assert!(
        code == 0 && http_code != "000",
        "exit {code}, http {http_code}: {err}"
    );
}

/// 9. Two hubs: one dies, the mesh carries on through the other.
#[test]
fn two_hubs_survive_losing_one() {
    // A lists [hub1, hub2], B lists [hub2, hub1]: they only see each other if agents keep
    // sessions to more than their first hub.
    let mut net = setup(
        &ztm!(),
        "mesh-2hubs",
        NetOpts {
            hubs: 2,
            b_reversed: true,
            ..NetOpts::default()
        },
    );
    let boots_a = mesh_info(&net.a.addr)["bootstraps"].clone();
    assert_eq!(
        boots_a,
        serde_json::json!([net.hubs[0].addr, net.hubs[1].addr]),
        "A's bootstraps"
    );
    let r = create_service(&net.a.addr, &net.b_id, "before", 8080);
    assert!(is_2xx(&r), "{} {}", r.status, r.text());

    net.hubs[0].proc.kill9();
    let killed = Instant::now();
    // B is still manageable from A (through hub2).
    let mut attempts = 0;
    let mut last = String::new();
    let ok = time_until(S(10), || {
        attempts += 1;
        match try_create_service(&net.a.addr, &net.b_id, "after", 8081) {
            Some(r) if is_2xx(&r) => true,
            Some(r) => {
                last = format!("{} {}", r.status, r.text());
                false
            }
            None => false,
        }
    });
    assert!(
        ok.is_some(),
        "could not manage B from A after hub1 died ({attempts} attempts, last: {last}):{}",
        net.state()
    );
    eprintln!(
        "managed B through hub2 {:?} after hub1 died ({attempts} attempts)",
        killed.elapsed()
    );
    let on_b = services_on(&net.b.addr, &net.b_id).unwrap();
    assert!(
        has_service(&on_b, "after") && has_service(&on_b, "before"),
        "{on_b:?}"
    );

    // Both stay online as seen from A, and both meshes remain connected, for a while.
    let until = Instant::now() + S(5);
    while Instant::now() < until {
        assert!(
            net.online_from_a(),
            "an endpoint went offline:{}",
            net.state()
        );
        assert!(
            is_connected(&net.a.addr) && is_connected(&net.b.addr),
            "a mesh lost its connection though hub2 is up:{}",
            net.state()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    wait_until(S(10), "A discovers B's services through hub2", || {
        discovers(&net.a.addr, "after", &net.b_id)
    });
}
