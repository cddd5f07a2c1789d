//! The agent's REST API against bad input and hostile callers: clear 4xx errors in JSON, and
//! nothing changed by any of it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use std::time::Duration;
use ztm_testkit::prelude::*;

#[test]
fn bad_input_gets_clear_errors_and_changes_nothing() {
    let dir = TempDir::new("agent-bad");
    let ca = ztm!().start_ca(dir.path());
    let pem = ca_pem(&ca.addr);
    let root = create_user(&ca.addr, "root");
    let agent = ztm!().start_agent(dir.path(), "a");
    // A working mesh to compare against (its hub does not exist: that is fine here).
    let hub = format!("127.0.0.1:{}", free_port());
    join_ok(&agent.addr, &pem, "a", &root, &[&hub]);
    let id = local_id(&agent.addr);
    let before = get(&agent.addr, "/api/meshes/m").json();

    let good = join_body(&pem, "x", &root, &[&hub]);
    let mut bad_ca = good.clone();
    bad_ca["ca"] = json!("not a certificate");
    let mut bad_cert = good.clone();
    bad_cert["agent"]["certificate"] =
        json!("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
    let mut bad_key = good.clone();
    bad_key["agent"]["privateKey"] = json!("garbage");
    let mut no_hubs = good.clone();
    no_hubs["bootstraps"] = json!([]);
    let mut bad_hub = good.clone();
    bad_hub["bootstraps"] = json!(["no-port-here"]);
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("agent");
    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        (
            "POST",
            "/api/meshes/n".into(),
            b"{not json".to_vec(),
            400,
            "malformed JSON",
        ),
        (
            "POST",
            "/api/meshes/n".into(),
            missing.to_string().into_bytes(),
            400,
            "agent",
        ),
        (
            "POST",
            "/api/meshes/n".into(),
            bad_ca.to_string().into_bytes(),
            400,
            "ca",
        ),
        (
            "POST",
            "/api/meshes/n".into(),
            bad_cert.to_string().into_bytes(),
            400,
            "agent.certificate",
        ),
        (
            "POST",
            "/api/meshes/n".into(),
            bad_key.to_string().into_bytes(),
            400,
            "agent.privateKey",
        ),
        (
            "POST",
            "/api/meshes/n".into(),
            no_hubs.to_string().into_bytes(),
            400,
            "bootstraps",
        ),
        (
            "POST",
            "/api/meshes/n".into(),
            bad_hub.to_string().into_bytes(),
            400,
            "bootstraps",
        ),
        (
            "POST",
            "/api/meshes/..".into(),
            good.to_string().into_bytes(),
            400,
            "mesh name",
        ),
        (
            "POST",
            "/api/meshes/m/ca".into(),
            b"junk".to_vec(),
            400,
            "ca",
        ),
        (
            "POST",
            "/api/meshes/m/agent/key".into(),
            b"junk".to_vec(),
            400,
            "agent.privateKey",
        ),
        ("GET", "/api/meshes/nope".into(), vec![], 404, "no mesh"),
        (
            "GET",
            "/api/meshes/nope/endpoints".into(),
            vec![],
            404,
            "no mesh",
        ),
        (
            "POST",
            format!("/api/meshes/m/endpoints/{id}/services/tcp/web"),
            b"[]".to_vec(),
            400,
            "malformed",
        ),
        (
            "POST",
            format!("/api/meshes/m/endpoints/{id}/services/tcp/web"),
            br#"{"host":"127.0.0.1","port":0}"#.to_vec(),
            400,
            "port",
        ),
        (
            "POST",
            format!("/api/meshes/m/endpoints/{id}/services/tcp/web"),
            br#"{"host":"a b","port":80}"#.to_vec(),
            400,
            "host",
        ),
        (
            "POST",
            format!("/api/meshes/m/endpoints/{id}/services/tcp/web"),
            br#"{"host":"h","port":70000}"#.to_vec(),
            400,
            "malformed",
        ),
        (
            "POST",
            format!("/api/meshes/m/endpoints/{id}/services/sctp/web"),
            br#"{"host":"h","port":80}"#.to_vec(),
            400,
            "protocol",
        ),
        (
            "POST",
            format!("/api/meshes/m/endpoints/{id}/services/tcp/a%2Fb"),
            br#"{"host":"h","port":80}"#.to_vec(),
            400,
            "service name",
        ),
        (
            "POST",
            format!("/api/meshes/m/endpoints/{id}/ports/1.2.3/tcp/80"),
            br#"{"target":{"service":"web"}}"#.to_vec(),
            400,
            "listen ip",
        ),
        (
            "POST",
            format!("/api/meshes/m/endpoints/{id}/ports/127.0.0.1/tcp/0"),
            br#"{"target":{"service":"web"}}"#.to_vec(),
            400,
            "listen port",
        ),
        (
            "POST",
            format!("/api/meshes/m/endpoints/{id}/ports/127.0.0.1/tcp/80"),
            br#"{"target":{}}"#.to_vec(),
            400,
            "malformed",
        ),
        (
            "DELETE",
            format!("/api/meshes/m/endpoints/{id}/services/tcp/none"),
            vec![],
            404,
            "no service",
        ),
        ("PUT", "/api/meshes/m".into(), vec![], 405, "method"),
        ("GET", "/api/nothing".into(), vec![], 404, "no such"),
    ];
    for (method, path, body, want, says) in &cases {
        let r = http(
            &agent.addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            body,
        )
        .unwrap();
        assert_eq!(r.status, *want, "{method} {path}: {}", r.text());
        let err = r.json();
        assert_eq!(err["status"], *want, "{method} {path}");
        let message = err["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(says),
            "{method} {path}: {message:?} should mention {says:?}"
        );
    }
    // A body over the limit.
    let huge = vec![b'x'; 2 << 20];
    let r = http(&agent.addr, "POST", "/api/meshes/n", &[], &huge).unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["status"], 413);

    // Nothing changed.
    assert_eq!(
        get(&agent.addr, "/api/meshes")
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(get(&agent.addr, "/api/meshes/m").json()["ca"], before["ca"]);
    let services = get(
        &agent.addr,
        &format!("/api/meshes/m/endpoints/{id}/services"),
    )
    .json();
    assert_eq!(services, json!([]));
    let ports = get(&agent.addr, &format!("/api/meshes/m/endpoints/{id}/ports")).json();
    assert_eq!(ports, json!([]));
}

#[test]
fn only_local_callers_and_same_origin_pages() {
    let dir = TempDir::new("agent-guard");
    let agent = ztm!().start_agent(dir.path(), "a");
    let port = agent.addr.rsplit(':').next().unwrap().to_string();
    // DNS rebinding: a request addressed to another name is refused, the metrics' too.
    for path in ["/api/meshes", "/metrics"] {
        let raw = raw_request(
            &agent.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"),
        );
        assert!(raw.starts_with("HTTP/1.1 403"), "{path}: {raw}");
        let ok = raw_request(
            &agent.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"),
        );
        assert!(ok.starts_with("HTTP/1.1 200"), "{path}: {ok}");
    }
    // CSRF: a state-changing request from another origin is refused, same origin is not.
    let body = "{}";
    let cross = raw_request(
        &agent.addr,
        &format!("POST /api/meshes/x HTTP/1.1\r\nHost: localhost:{port}\r\nOrigin: https://evil.example\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()),
    );
    assert!(cross.starts_with("HTTP/1.1 403"), "{cross}");
    let same = raw_request(
        &agent.addr,
        &format!("POST /api/meshes/x HTTP/1.1\r\nHost: localhost:{port}\r\nOrigin: http://localhost:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()),
    );
    assert!(
        same.starts_with("HTTP/1.1 400"),
        "same origin reaches the API: {same}"
    );
    assert_eq!(get(&agent.addr, "/api/meshes").json(), json!([]));
}

/// An agent told to listen off loopback refuses to start without an API token (its API has
/// no login otherwise); with one, it gets past that check. The addresses are TEST-NET ones no
/// interface has, so nothing is ever bound off loopback.
#[test]
fn an_agent_off_loopback_needs_a_token() {
    let dir = TempDir::new("agent-no-token");
    let db = dir.join("a.db");
    let db = db.to_str().unwrap();
    for (listen, env) in [
        ("192.0.2.1:7777", &[][..]),
        ("192.0.2.1:7777", &[("ZTM_AGENT_TOKEN", "")][..]),
        ("[2001:db8::1]:7777", &[][..]),
    ] {
        let mut p = ztm!().spawn_env(
            "agent",
            dir.path(),
            &["agent", "--listen", listen, "--database", db],
            env,
        );
        let code = p.wait_exit(Duration::from_secs(10));
        let log = p.log();
        assert_eq!(code, Some(1), "{listen} {env:?}: {log}");
        assert!(
            log.contains(&format!(
                "ztm agent: error: listening on {listen} (not loopback) needs an API token: \
                 pass --token or set ZTM_AGENT_TOKEN"
            )),
            "{listen} {env:?}: {log}"
        );
        assert_eq!(log.trim().lines().count(), 1, "{log}");
        std::fs::remove_file(p.log_path.clone()).unwrap();
    }
    // With a token it goes on, and fails only because no interface has that address.
    for (args, env) in [
        (&["--token", "s3cret"][..], &[][..]),
        (&[][..], &[("ZTM_AGENT_TOKEN", "s3cret")][..]),
    ] {
        let mut all = vec!["agent", "--listen", "192.0.2.1:7777", "--database", db];
        all.extend_from_slice(args);
        let mut p = ztm!().spawn_env("agent", dir.path(), &all, env);
        assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(1));
        let log = p.log();
        assert!(log.contains("cannot listen on 192.0.2.1:7777"), "{log}");
        assert!(!log.contains("token"), "{log}");
        std::fs::remove_file(p.log_path.clone()).unwrap();
    }
}

/// With a token, every API request must carry it, on any address; the UI's files load without
/// it (the UI then asks for it). The token replaces the Host and Origin checks: a page of
/// another origin cannot read it or attach it to a request.
#[test]
fn a_token_guards_every_api_request() {
    let dir = TempDir::new("agent-token");
    let token = "correct horse battery staple";
    let agent = ztm!().start_agent_with(dir.path(), "a", &["--token", token]);
    let bearer = format!("Bearer {token}");
    let refused = |r: &Resp, what: &str| {
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        assert_eq!(r.json()["status"], 401, "{what}");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"ztm-agent\""),
            "{what}"
        );
    };
    for (method, path, body) in [
        ("GET", "/api/meshes", ""),
        ("GET", "/api/meshes/m/endpoints", ""),
        ("POST", "/api/meshes/m", "{}"),
        ("DELETE", "/api/meshes/m", ""),
        ("GET", "/api/nothing", ""),
        ("GET", "/nothing", ""),
        ("GET", "/metrics", ""),
    ] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Bearer correct horse battery stapl"),
            Some("Bearer correct horse battery staple2"),
            Some("correct horse battery staple"),
            Some("Basic Y29ycmVjdA=="),
        ] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("Authorization", a)).into_iter().collect();
            let r = http(&agent.addr, method, path, &headers, body.as_bytes()).unwrap();
            refused(&r, &format!("{method} {path} with {auth:?}"));
        }
    }
    let with = |method: &str, path: &str, extra: &[(&str, &str)], body: &str| {
        let mut headers = vec![("Authorization", bearer.as_str())];
        headers.extend_from_slice(extra);
        http(&agent.addr, method, path, &headers, body.as_bytes()).unwrap()
    };
    let r = with("GET", "/api/meshes", &[], "");
    assert_eq!((r.status, r.json()), (200, json!([])));
    // Prometheus sends the token as a bearer token too.
    let r = with("GET", "/metrics", &[], "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("ztm_agent_ports_open 0"), "{}", r.text());
    let r = with(
        "GET",
        "/api/meshes/m",
        &[("Host", "agent.example:7777")],
        "",
    );
    assert_eq!(
        r.status,
        404,
        "the token, not the Host, decides: {}",
        r.text()
    );
    let r = with(
        "POST",
        "/api/meshes/m",
        &[
            ("Origin", "http://agent.example:7777"),
            ("Content-Type", "application/json"),
        ],
        "{}",
    );
    assert_eq!(
        r.status,
        400,
        "the token, not the Origin, decides: {}",
        r.text()
    );
    // The UI's own files load without it.
    for path in ["/", "/ui/app.js", "/ui/lib.js", "/ui/style.css"] {
        let r = get(&agent.addr, path);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    assert!(get(&agent.addr, "/").text().contains("token-form"));
}

fn raw_request(addr: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A certificate or a key alone must match what the mesh has; the two together, in one PEM
/// body, change the agent's identity. Updating a joined mesh does not need the key again.
#[test]
fn an_agent_changes_its_identity_in_one_step() {
    let dir = TempDir::new("agent-identity");
    let ca = ztm!().start_ca(dir.path());
    let pem = ca_pem(&ca.addr);
    let alice = create_user(&ca.addr, "alice");
    let bob = create_user(&ca.addr, "bob");
    let hub = ztm!().start_hub(dir.path(), "hub", &ca.addr);
    let agent = ztm!().start_agent(dir.path(), "a");
    join_ok(&agent.addr, &pem, "a", &alice, &[&hub.addr]);
    let id = local_id(&agent.addr);
    // An endpoint id belongs to its user: the agent's id, online at the hub as `want`.
    let user_at_hub = |want: &str| {
        let id = local_id(&agent.addr);
        endpoint(&agent.addr, &id).is_some_and(|e| e["username"] == want && e["online"] == true)
    };
    wait_until(Duration::from_secs(15), "alice online", || {
        user_at_hub("alice")
    });

    // Bob's certificate alone does not match alice's key: refused, nothing changed.
    let r = post(&agent.addr, "/api/meshes/m/agent/certificate", &bob.cert);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("together"), "{}", r.text());
    let r = post(&agent.addr, "/api/meshes/m/agent/key", &bob.key);
    assert_eq!(r.status, 400, "{}", r.text());
    let r = post(&agent.addr, "/api/meshes/m/agent/certificate", "junk");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("no PEM certificate"), "{}", r.text());
    assert_eq!(mesh_info(&agent.addr)["agent"]["username"], "alice");
    // Both in one body: the agent is bob's now, at the hub too.
    let r = post(
        &agent.addr,
        "/api/meshes/m/agent/certificate",
        &format!("{}{}", bob.cert, bob.key),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["agent"]["username"], "bob");
    assert!(!r.text().contains("PRIVATE KEY"), "{}", r.text());
    wait_until(Duration::from_secs(15), "bob online", || user_at_hub("bob"));
    assert_ne!(
        local_id(&agent.addr),
        id,
        "alice's endpoint id is not bob's"
    );

    // An update without the key keeps the key; joining without one is refused.
    let mut update = join_body(&pem, "renamed", &bob, &[&hub.addr]);
    update["agent"]
        .as_object_mut()
        .unwrap()
        .remove("privateKey");
    let r = post_json(&agent.addr, "/api/meshes/m", &update);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["agent"]["name"], "renamed");
    assert_eq!(r.json()["agent"]["username"], "bob");
    let r = post_json(&agent.addr, "/api/meshes/n", &update);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("privateKey"), "{}", r.text());
    assert_eq!(get(&agent.addr, "/api/meshes/n").status, 404);
}
