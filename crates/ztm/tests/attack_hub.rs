//! Attacks on the hub, by a hostile mesh user (a modified agent with a valid certificate,
//! speaking raw HTTP/2) and by strangers on the internet, with real processes. Each test
//! performs the attack, checks that it fails, and that honest agents beside it keep working.
//! docs/security.md describes the attacker and the bounds these tests hold the hub to.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use ztm_testkit::hostile::*;
use ztm_testkit::prelude::*;

fn services(n: usize) -> serde_json::Value {
    json!((0..n)
        .map(|i| json!({"protocol": "tcp", "name": format!("s{i}")}))
        .collect::<Vec<_>>())
}

/// A user keeps a spare control connection (handshaken, never registered) and registers on
/// it once the hub has dropped its sessions for the revocation. The hub must close every
/// connection of a revoked certificate, registered or not, within 30 s, and refuse anything
/// asked on one meanwhile.
#[test]
fn a_revoked_user_keeps_no_connection() {
    let honest = Honest::start(&ztm!(), "attack-revoked", &[]);
    let bob = honest.user("bob");
    let hub = honest.hub.addr.clone();
    runtime().block_on(async {
        let registered = control(&hub, &honest.pem, &bob).await;
        let id = Ident::of("bob");
        let r = register(&registered.sender, &id, "bobs", json!([]))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let spare = control(&hub, &honest.pem, &bob).await;
        let r = call(&spare.sender, "GET", "/api/endpoints", &[], Bytes::new()).await;
        assert_eq!(r.map(|a| a.status), Ok(200), "the spare connection works");

        let revoked = delete(&honest.ca.addr, "/api/certificates/bob");
        assert_eq!(revoked.status, 204, "{}", revoked.text());
        let t0 = Instant::now();
        until(
            Duration::from_secs(30),
            "the registered session closed",
            || registered.is_closed(),
        )
        .await;
        // The attack: register on the spare connection after the hub dropped the session.
        let late = register(&spare.sender, &Ident::of("bob"), "again", json!([])).await;
        assert!(
            !matches!(&late, Ok(a) if a.status == 200),
            "a revoked certificate registered an endpoint: {late:?}"
        );
        let left = Duration::from_secs(30).saturating_sub(t0.elapsed());
        until(left, "the spare connection closed", || spare.is_closed()).await;
        // And a new connection is refused in the handshake.
        assert!(
            try_dial(&hub, &honest.pem, &bob, ztm_pki::ALPN_CONTROL)
                .await
                .map(|_| ())
                .is_err()
                || {
                    // TLS 1.3 clients learn of a refused certificate on first use.
                    let c = control(&hub, &honest.pem, &bob).await;
                    call(&c.sender, "GET", "/api/endpoints", &[], Bytes::new())
                        .await
                        .is_err()
                }
        );
    });
    assert!(honest.tunnel_works(), "the honest tunnel broke");
    let log = honest.hub.proc.log();
    assert!(log.contains("revoked"), "{log}");
}

/// A stranger holds 2,000 idle TCP connections and opens 200 slow TLS handshakes a second
/// from one address. Registered agents keep their tunnels and a new agent joins within 5 s.
#[test]
fn a_flood_of_strangers_locks_nobody_out() {
    let honest = Honest::start(&ztm!(), "attack-flood", &[]);
    let rt = runtime();
    let from = "127.0.0.2".parse().unwrap();
    let flood = rt.block_on(async { Flood::start(from, honest.hub_addr(), 2_000, 200) });
    // Let the flood build up: its connections fill whatever the hub gives them.
    std::thread::sleep(Duration::from_secs(3));

    let fresh = (0..20).filter(|_| honest.tunnel_works()).count();
    assert_eq!(fresh, 20, "fresh tunnels during the flood");

    let c = ztm!().start_agent(honest.dir.path(), "c");
    let carol = honest.user("carol");
    let started = Instant::now();
    join_ok(&c.addr, &honest.pem, "c", &carol, &[&honest.hub.addr]);
    let joined = time_until(Duration::from_secs(5), || is_connected(&c.addr));
    let opened = rt.block_on(flood.stop());
    assert!(
        joined.is_some(),
        "a new agent did not join within 5 s of the join request during the flood \
         ({:?} so far; the flood opened {opened} connections)\n{}",
        started.elapsed(),
        c.proc.log()
    );
    assert!(
        opened >= 2_000,
        "the flood opened only {opened} connections"
    );
    assert!(honest.tunnel_works(), "the honest tunnel broke");
    let log = honest.hub.proc.log();
    assert!(log.contains("refused a connection from 127.0.0.2"), "{log}");
}

/// What a modified agent registers is checked: names by the CA's rules, bounded lists,
/// bounded bodies; every refusal says why.
/// Strangers from many addresses flood a hub whose open-file limit is small (256 files; 1,024
/// is a common default): idle TCP connections and stalled handshakes, more together than the
/// hub may open. The hub must never run out of files — it would stop polling the CA, and a
/// revoked user would keep its session — and must keep serving the agents it has.
#[test]
fn strangers_cannot_take_the_files_a_hub_needs() {
    let honest = Honest::start(&ztm!().with_files(256), "attack-files", &[]);
    let bob = honest.user("bob");
    let hub = honest.hub.addr.clone();
    let rt = runtime();
    let session = rt.block_on(async {
        let c = control(&hub, &honest.pem, &bob).await;
        let r = register(&c.sender, &Ident::of("bob"), "bobs", json!([]))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        c
    });
    // Eight addresses, each as many handshakes as the hub allows one address, and more.
    let floods: Vec<Flood> = (2..10)
        .map(|i| {
            let from = format!("127.0.0.{i}").parse().unwrap();
            rt.block_on(async { Flood::start(from, honest.hub_addr(), 100, 5) })
        })
        .collect();
    // Let the floods build up: their connections fill whatever the hub gives them.
    std::thread::sleep(Duration::from_secs(3));

    let fresh = (0..10).filter(|_| honest.tunnel_works()).count();
    assert_eq!(fresh, 10, "fresh tunnels during the flood");
    // The CA revokes bob: the hub hears it at its next poll and ends his session.
    let revoked = delete(&honest.ca.addr, "/api/certificates/bob");
    assert_eq!(revoked.status, 204, "{}", revoked.text());
    let closed = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), async {
            while !session.is_closed() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .is_ok()
    });
    let opened: u64 = rt.block_on(async {
        let mut n = 0;
        for f in floods {
            n += f.stop().await;
        }
        n
    });
    let log = honest.hub.proc.log();
    assert!(
        closed,
        "a revoked user kept his session during the flood ({opened} connections opened)\n{log}"
    );
    assert!(
        !log.contains("Too many open files"),
        "the hub ran out of files ({opened} connections opened)\n{log}"
    );
    assert!(honest.tunnel_works(), "the honest tunnel broke");
    // After the flood, a new agent joins at once.
    let c = ztm!().start_agent(honest.dir.path(), "c");
    let carol = honest.user("carol");
    join_ok(&c.addr, &honest.pem, "c", &carol, &[&honest.hub.addr]);
    assert!(
        time_until(Duration::from_secs(10), || is_connected(&c.addr)).is_some(),
        "a new agent did not join after the flood\n{}",
        c.proc.log()
    );
}

#[test]
fn hostile_registrations_are_refused_with_reasons() {
    let honest = Honest::start(&ztm!(), "attack-register", &[]);
    let bob = honest.user("bob");
    let hub = honest.hub.addr.clone();
    runtime().block_on(async {
        let c = control(&hub, &honest.pem, &bob).await;
        let cases: Vec<(serde_json::Value, u16, &str)> = vec![
            (services(1_001), 400, "at most 1000"),
            (
                json!([{"protocol": "tcp", "name": "ssh", "users": ["evil\u{1b}[2J"]}]),
                400,
                "not a valid user name",
            ),
            (
                json!([{"protocol": "tcp", "name": "ssh",
                        "users": (0..1001).map(|i| format!("u{i}")).collect::<Vec<_>>()}]),
                400,
                "at most 1000",
            ),
            (
                json!([{"protocol": "tcp", "name": "ssh"}, {"protocol": "tcp", "name": "ssh"}]),
                400,
                "listed twice",
            ),
        ];
        for (list, status, words) in cases {
            let r = register(&c.sender, &Ident::of("bob"), "bobs", list)
                .await
                .unwrap();
            assert_eq!(r.status, status, "{}", r.body);
            assert!(r.body.contains(words), "{}", r.body);
            assert_eq!(r.json()["status"], status, "{}", r.body);
        }
        // A body over the bound: 10,000 services, or padding.
        let r = register(&c.sender, &Ident::of("bob"), "bobs", services(10_000))
            .await
            .unwrap();
        assert_eq!(r.status, 413, "{}", r.body);
        let big = format!(
            "{{\"name\":\"bobs\",\"services\":[],\"pad\":\"{}\"}}",
            "x".repeat(300 * 1024)
        );
        let r = call(
            &c.sender,
            "POST",
            &format!("/api/endpoints/{}", Ident::of("bob").id),
            &[],
            Bytes::from(big),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 413, "{}", r.body);
        // An id in upper case is another spelling of someone's id, not an id.
        let mut upper = Ident::of("bob");
        upper.id = upper.id.to_uppercase();
        let r = register(&c.sender, &upper, "bobs", json!([]))
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{}", r.body);
        // Nothing of it was registered.
        let r = call(&c.sender, "GET", "/api/endpoints", &[], Bytes::new())
            .await
            .unwrap();
        assert!(!r.body.contains("bobs"), "{}", r.body);

        // Other users' public addresses are not shown to bob; root sees them.
        let list = r.json();
        let a = list
            .as_array()
            .and_then(|l| l.iter().find(|e| e["id"] == honest.a_id))
            .cloned()
            .unwrap_or_default();
        assert_eq!(a["ip"], "", "{a}");
        let as_root = control(&hub, &honest.pem, &honest.root).await;
        let r = call(&as_root.sender, "GET", "/api/endpoints", &[], Bytes::new())
            .await
            .unwrap();
        assert!(r.body.contains("127.0.0.1"), "{}", r.body);
    });
    assert!(honest.tunnel_works(), "the honest tunnel broke");
}

/// One user cannot take more than its share of the hub: endpoints, connections, requests in
/// progress; another user is not affected.
#[test]
fn one_user_cannot_take_more_than_its_share() {
    let honest = Honest::start(
        &ztm!(),
        "attack-share",
        &[
            "--max-endpoints-per-user",
            "3",
            "--max-connections-per-user",
            "8",
        ],
    );
    let bob = honest.user("bob");
    let hub = honest.hub.addr.clone();
    runtime().block_on(async {
        let c = control(&hub, &honest.pem, &bob).await;
        // Endpoints: a connection registers one each; the fourth of bob's is refused.
        let mut conns = vec![];
        for i in 0..4 {
            let conn = if i == 0 {
                &c
            } else {
                conns.push(control(&hub, &honest.pem, &bob).await);
                conns.last().unwrap()
            };
            let r = register(
                &conn.sender,
                &Ident::of("bob"),
                &format!("bob{i}"),
                json!([]),
            )
            .await
            .unwrap();
            if i < 3 {
                assert_eq!(r.status, 200, "{}", r.body);
            } else {
                assert_eq!(r.status, 429, "{}", r.body);
                assert!(r.body.contains("3 endpoints online"), "{}", r.body);
            }
        }
        // Connections: 4 held; 4 more are admitted, the ninth is told why and closed.
        for _ in 0..4 {
            conns.push(control(&hub, &honest.pem, &bob).await);
        }
        // Each is answered, so admitted, before the ninth comes: the hub admits connections
        // as their handshakes finish, which under load need not be the order they were made.
        for conn in &conns[3..] {
            let r = call(&conn.sender, "GET", "/api/endpoints", &[], Bytes::new())
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
        }
        let ninth = control(&hub, &honest.pem, &bob).await;
        let r = call(&ninth.sender, "GET", "/api/endpoints", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status, 429, "{}", r.body);
        assert!(r.body.contains("connections"), "{}", r.body);
        until(
            Duration::from_secs(5),
            "the refused connection closed",
            || ninth.is_closed(),
        )
        .await;

        // Requests with a body in progress on one connection are bounded: bodies that never
        // finish hold their place until they time out, and the next is refused at once.
        let slow = &conns[4];
        let mut held = vec![];
        for _ in 0..8 {
            let mut sender = slow.sender.clone().ready().await.unwrap();
            let req = http::Request::builder()
                .method("POST")
                .uri(format!("https://hub/api/endpoints/{}", Ident::of("bob").id))
                .body(())
                .unwrap();
            let (resp, mut send) = sender.send_request(req, false).unwrap();
            send.send_data(Bytes::from_static(b"{\"name\":"), false)
                .unwrap();
            held.push((resp, send));
        }
        // Give the hub the moment it needs to start reading them.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = register(&slow.sender, &Ident::of("bob"), "more", json!([]))
            .await
            .unwrap();
        assert_eq!(r.status, 429, "{}", r.body);
        // The slow ones are cut off after the body timeout with 408.
        let started = Instant::now();
        let (resp, _send) = held.remove(0);
        let resp = tokio::time::timeout(Duration::from_secs(15), resp)
            .await
            .expect("a body that never ends was waited for forever")
            .unwrap();
        assert_eq!(resp.status(), 408);
        assert!(started.elapsed() < Duration::from_secs(12));
        // A header list larger than the hub accepts is refused (HTTP/2 ends the connection
        // that sent one way over the bound); the hub goes on.
        for size in [20 * 1024, 64 * 1024] {
            let pad = "x".repeat(size);
            let r = call(
                &c.sender,
                "GET",
                "/api/endpoints",
                &[("x-pad", &pad)],
                Bytes::new(),
            )
            .await;
            assert!(
                !matches!(&r, Ok(a) if a.status == 200),
                "a {size}-byte header list was accepted: {r:?}"
            );
        }
        let fresh = control(&hub, &honest.pem, &honest.root).await;
        let r = call(&fresh.sender, "GET", "/api/services", &[], Bytes::new()).await;
        assert_eq!(r.map(|a| a.status), Ok(200));
    });
    // Another user is not affected by bob's share being used up.
    assert!(honest.tunnel_works(), "the honest tunnel broke");
}

/// Two registrations of different ids raced on one connection: one wins, the other is told
/// the connection is taken, and only one endpoint is online.
#[test]
fn registrations_racing_on_one_connection_leave_one_endpoint() {
    let honest = Honest::start(&ztm!(), "attack-race", &[]);
    let bob = honest.user("bob");
    let hub = honest.hub.addr.clone();
    runtime().block_on(async {
        for round in 0..20 {
            let c = control(&hub, &honest.pem, &bob).await;
            let (x, y) = (Ident::of("bob"), Ident::of("bob"));
            let (nx, ny) = (format!("x{round}"), format!("y{round}"));
            let (rx, ry) = tokio::join!(
                register(&c.sender, &x, &nx, services(200)),
                register(&c.sender, &y, &ny, services(200)),
            );
            let mut statuses = [rx.unwrap().status, ry.unwrap().status];
            statuses.sort();
            assert_eq!(statuses, [200, 409], "round {round}");
            let r = call(&c.sender, "GET", "/api/endpoints", &[], Bytes::new())
                .await
                .unwrap();
            let online: Vec<_> = r
                .json()
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| (e["id"] == x.id || e["id"] == y.id) && e["online"] == true)
                .cloned()
                .collect();
            assert_eq!(online.len(), 1, "round {round}: {online:?}");
        }
    });
}

/// A hostile endpoint answers a forwarded management request with HTML and a script: the hub
/// relays JSON only.
#[test]
fn the_hub_relays_only_json_from_managed_endpoints() {
    let honest = Honest::start(&ztm!(), "attack-html", &[]);
    let bob = honest.user("bob");
    let hub = honest.hub.addr.clone();
    runtime().block_on(async {
        let c = control(&hub, &honest.pem, &bob).await;
        let id = Ident::of("bob");
        let r = register(&c.sender, &id, "trap", json!([])).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let token = r.json()["session"].as_str().unwrap().to_string();
        let id = id.id;
        let answer: Answerer = Arc::new(|_req| {
            (
                200,
                "text/html",
                "<script>fetch('/api/meshes')</script>".to_string(),
            )
        });
        let _reverse = serve_reverse(&hub, &honest.pem, &bob, &id, &token, answer).await;
        // Root manages bob's endpoint.
        let root = control(&hub, &honest.pem, &honest.root).await;
        let r = call(
            &root.sender,
            "GET",
            &format!("/api/endpoints/{id}/manage/services"),
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 502, "{}", r.body);
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        assert!(!r.body.contains("<script>"), "{}", r.body);
        assert!(r.body.contains("not JSON"), "{}", r.body);
    });
    assert!(honest.tunnel_works(), "the honest tunnel broke");
}

/// When the CA stops answering, the hub cannot know of new revocations: after the staleness
/// the operator allows, it refuses new sessions (and says why) and keeps the ones it has.
#[test]
fn stale_revocations_stop_new_sessions() {
    let mut honest = Honest::start(&ztm!(), "attack-stale", &["--revocation-max-age", "10"]);
    let bob = honest.user("bob");
    let hub = honest.hub.addr.clone();
    honest.ca.proc.kill9();
    runtime().block_on(async {
        let started = Instant::now();
        loop {
            let c = control(&hub, &honest.pem, &bob).await;
            let r = register(&c.sender, &Ident::of("bob"), "late", json!([]))
                .await
                .unwrap();
            if r.status == 503 {
                assert!(r.body.contains("revocations"), "{}", r.body);
                break;
            }
            assert_eq!(r.status, 200, "{}", r.body);
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the hub kept admitting sessions without revocations"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    assert!(honest.tunnel_works(), "sessions already admitted broke");
    let log = honest.hub.proc.log();
    assert!(log.contains("refusing new sessions"), "{log}");
}
