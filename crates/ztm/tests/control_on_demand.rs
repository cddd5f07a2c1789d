//! Control connections that carry lines until HTTP/2 is needed (PROTOCOL.md, "Control
//! connection on demand"): registration, heartbeats, publishing and the CRL as JSON lines, and
//! HTTP/2 from the agent's first need on, with the same session. Hand-made agents speak it
//! byte by byte against a real hub, beside real agents; hostile ones send what is not theirs,
//! what is not a line, lines too long, and more long lines than a user may.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztm_net::lines::{self, LineReader};
use ztm_net::on_demand::{self, Prefixed};
use ztm_proto::wire::{LineAnswer, CONTROL_LINE_MAX};
use ztm_testkit::hostile::*;
use ztm_testkit::prelude::*;

/// The hub's count of control connections that carry lines.
fn carrying_lines(metrics: &str) -> f64 {
    metric(metrics, "ztm_hub_control_connections_dormant")
}

/// A control connection that carries lines, dialled as `user`.
struct Lines {
    tls: Tls,
    reader: LineReader,
}

impl Lines {
    async fn dial(hub: &str, pem: &str, user: &User) -> Lines {
        let tls = dial(hub, pem, user, ztm_pki::ALPN_CONTROL_ON_DEMAND).await;
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(ztm_pki::ALPN_CONTROL_ON_DEMAND)
        );
        Lines {
            tls,
            reader: LineReader::new(),
        }
    }

    /// Sends `line` (a JSON value, or raw bytes with their `\n`) and reads the answer.
    async fn ask(&mut self, line: &Value) -> LineAnswer {
        on_demand::write_line(&mut self.tls, line).await.unwrap();
        self.answer().await
    }

    async fn ask_raw(&mut self, bytes: &[u8]) -> LineAnswer {
        self.tls.write_all(bytes).await.unwrap();
        self.tls.flush().await.unwrap();
        self.answer().await
    }

    async fn answer(&mut self) -> LineAnswer {
        let read = lines::read_answer(&mut self.tls, &mut self.reader, 32 << 20);
        tokio::time::timeout(Duration::from_secs(15), read)
            .await
            .expect("an answer within 15 s")
            .expect("an answer line")
    }

    /// Whether the hub closed the connection (within 5 s).
    async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        let read = self.tls.read_to_end(&mut rest);
        matches!(
            tokio::time::timeout(Duration::from_secs(5), read).await,
            Ok(Ok(_)) | Ok(Err(_))
        )
    }
}

fn registration(ident: &Ident, name: &str, services: Value) -> Value {
    json!({
        "op": "register", "id": ident.id, "protocol": "1", "name": name,
        "services": services, "nonce": ident.nonce,
    })
}

/// A hand-made agent registers, heartbeats, publishes and reads the CRL over lines; then starts
/// HTTP/2 on the same connection and its session goes on. Real agents carry lines while idle,
/// and start HTTP/2 when they first need it.
#[test]
fn control_connections_carry_lines_until_http2_is_needed() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let honest = Honest::start(&ztm!(), "control-lines", &["--metrics", &metrics]);
    let bob = honest.user("bob");
    let hub = honest.hub.addr.clone();
    runtime().block_on(async {
        // B listed services and opened a tunnel to A: its control connection speaks HTTP/2.
        // A has needed nothing: its connection still carries lines.
        until(Duration::from_secs(10), "A carries lines", || {
            carrying_lines(&metrics) == 1.0
        })
        .await;

        let mut lines = Lines::dial(&hub, &honest.pem, &bob).await;
        let ident = Ident::of(&bob.name);
        let services = json!([{"protocol": "tcp", "name": "bobs-web"}]);
        let r = lines.ask(&registration(&ident, "bobs", services)).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.protocol.as_deref(), Some("1"));
        assert!(r.session.as_deref().is_some_and(|s| s.len() == 32), "{r:?}");
        until(Duration::from_secs(10), "bob carries lines", || {
            carrying_lines(&metrics) == 2.0
        })
        .await;

        // A heartbeat names the hub's newest CRL; the CRL comes as the CA signed it.
        let r = lines.ask(&json!({"op": "heartbeat", "id": ident.id})).await;
        assert_eq!(r.status, 204, "{r:?}");
        let number = r.crl_number.expect("the hub holds a CRL");
        let r = lines.ask(&json!({"op": "crl"})).await;
        assert_eq!(r.status, 200, "{r:?}");
        let crl = ztm_pki::parse_crl(&honest.pem, r.crl.as_deref().unwrap()).unwrap();
        assert_eq!(crl.number, number);
        let r = lines.ask(&json!({"op": "crl", "after": number})).await;
        assert_eq!((r.status, r.crl), (204, None));

        // Publishing replaces the list others discover.
        let services = json!([{"protocol": "tcp", "name": "bobs-ssh"}]);
        let r = lines
            .ask(&json!({"op": "publish", "id": ident.id, "services": services}))
            .await;
        assert_eq!(r.status, 204, "{r:?}");
        let other = control(&hub, &honest.pem, &bob).await;
        let list = call(&other.sender, "GET", "/api/services", &[], Bytes::new())
            .await
            .unwrap();
        assert!(list.body.contains("bobs-ssh"), "{}", list.body);
        assert!(!list.body.contains("bobs-web"), "{}", list.body);

        // Bob starts HTTP/2 on the same connection: the same session, now over HTTP/2.
        let Lines { tls, reader } = lines;
        let io = Prefixed::new(reader.into_rest(), tls);
        let (sender, conn) = h2::client::handshake(io)
            .await
            .expect("h2 on the connection");
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let path = format!("/api/endpoints/{}/heartbeat", ident.id);
        let r = call(&sender, "POST", &path, &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status, 204, "{}", r.body);
        until(Duration::from_secs(10), "bob's connection started", || {
            carrying_lines(&metrics) == 1.0
        })
        .await;
        // Another connection's heartbeat for bob's endpoint is not bob's session's.
        let r = call(&other.sender, "POST", &path, &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status, 404, "{}", r.body);

        // A real agent starts HTTP/2 when it needs it: A lists the mesh's endpoints.
        let r = get(&honest.a.addr, &format!("/api/meshes/{MESH}/endpoints"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("bobs"), "{}", r.text());
        until(Duration::from_secs(10), "A's connection started", || {
            carrying_lines(&metrics) == 0.0
        })
        .await;
        assert!(honest.tunnel_works());
        driver.abort();
    });
}

/// Lines that are not a request, not the sender's endpoint, or too long are refused with why,
/// and change nothing: bob's session goes on through all of mallory's attempts.
#[test]
fn hostile_lines_are_refused_and_change_nothing() {
    let honest = Honest::start(&ztm!(), "control-lines-hostile", &[]);
    let bob = honest.user("bob");
    let mallory = honest.user("mallory");
    let hub = honest.hub.addr.clone();
    runtime().block_on(async {
        let mut bobs = Lines::dial(&hub, &honest.pem, &bob).await;
        let ident = Ident::of(&bob.name);
        let r = bobs.ask(&registration(&ident, "bobs", json!([]))).await;
        assert_eq!(r.status, 200, "{r:?}");
        let beat = json!({"op": "heartbeat", "id": ident.id});

        let mut m = Lines::dial(&hub, &honest.pem, &mallory).await;
        // Bob's id, with mallory's certificate: not derived from her user.
        let r = m.ask(&registration(&Ident::claim(&ident.id), "bobs", json!([]))).await;
        assert_eq!(r.status, 403, "{r:?}");
        // Heartbeats and publishing for bob's endpoint on her connection.
        assert_eq!(m.ask(&beat).await.status, 404);
        let publish = json!({"op": "publish", "id": ident.id, "services": [
            {"protocol": "tcp", "name": "trap"}
        ]});
        assert_eq!(m.ask(&publish).await.status, 404);
        // Lines that are not requests: each answered 400, and the connection goes on.
        for bad in [
            &b"not json\n"[..],
            b"{\"op\":\"shutdown\"}\n",
            b"{\"op\":\"heartbeat\"}\n",
            b"[1,2,3]\n",
            b"\n",
        ] {
            let r = m.ask_raw(bad).await;
            assert_eq!(r.status, 400, "{:?}: {r:?}", String::from_utf8_lossy(bad));
            assert!(!r.closing, "{r:?}");
        }
        let r = m
            .ask(&json!({"op": "register", "id": Ident::of("mallory").id, "protocol": "99", "name": "m"}))
            .await;
        assert_eq!((r.status, r.protocol.as_deref()), (400, Some("1")), "{r:?}");
        // Her own endpoint registers after all that.
        let own = Ident::of(&mallory.name);
        let r = m.ask(&registration(&own, "mallorys", json!([]))).await;
        assert_eq!(r.status, 200, "{r:?}");

        // A line longer than any request: 413, and the connection closes.
        let mut long = Lines::dial(&hub, &honest.pem, &mallory).await;
        let mut line = vec![b' '; CONTROL_LINE_MAX + 10];
        line.push(b'\n');
        let r = long.ask_raw(&line).await;
        assert_eq!((r.status, r.closing), (413, true), "{r:?}");
        assert!(long.closed().await, "the hub closes the connection");

        // Bob's session went on, and nothing of mallory's reached his services.
        let r = bobs.ask(&beat).await;
        assert_eq!(r.status, 204, "{r:?}");
        let other = control(&hub, &honest.pem, &bob).await;
        let list = call(&other.sender, "GET", "/api/services", &[], Bytes::new())
            .await
            .unwrap();
        assert!(!list.body.contains("trap"), "{}", list.body);
        assert!(honest.tunnel_works());
    });
}

/// A long line (a registration or service list) holds one of the places for requests with a
/// body, as its HTTP/2 request would: a user who starts more long lines at once than it may
/// is refused (429), and one that stalls is closed after 10 s (408). Other users go on.
#[test]
fn long_lines_take_a_users_places_for_bodies() {
    let honest = Honest::start(&ztm!(), "control-lines-long", &[]);
    let mallory = honest.user("mallory");
    let bob = honest.user("bob");
    let hub = honest.hub.addr.clone();
    runtime().block_on(async {
        // 32 places per user (docs/security.md, "Bounds"): each of these connections starts a
        // line longer than 4 KiB and stops.
        let partial = {
            let mut p = b"{\"op\":\"publish\",\"id\":\"x\",\"services\":[".to_vec();
            p.resize(8 * 1024, b' ');
            p
        };
        // Forty of them: whichever 32 the hub reads first take the places, and the other
        // eight are refused at once (the hub reads connections in its own order).
        let (tx, mut answers) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..40 {
            let mut l = Lines::dial(&hub, &honest.pem, &mallory).await;
            l.tls.write_all(&partial).await.unwrap();
            l.tls.flush().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(l.answer().await);
            });
        }
        drop(tx);
        for _ in 0..8 {
            let refused = answers.recv().await.unwrap();
            assert_eq!(
                (refused.status, refused.closing),
                (429, true),
                "{refused:?}"
            );
            assert!(refused.message.unwrap().contains("mallory"));
        }

        // Bob's registration is a long line too, and bob's places are his own.
        let mut bobs = Lines::dial(&hub, &honest.pem, &bob).await;
        let ident = Ident::of(&bob.name);
        let many: Vec<Value> = (0..200)
            .map(|i| json!({"protocol": "tcp", "name": format!("bobs-service-{i:04}")}))
            .collect();
        let r = bobs.ask(&registration(&ident, "bobs", json!(many))).await;
        assert_eq!(r.status, 200, "{r:?}");

        // Mallory's stalled lines are closed after 10 s, each with why.
        let mut stalled = 0;
        while let Some(r) = answers.recv().await {
            assert_eq!((r.status, r.closing), (408, true), "{r:?}");
            stalled += 1;
        }
        assert_eq!(stalled, 32);
        assert!(honest.tunnel_works());
    });
}

/// An agent whose started control connection has had no request for `--control-idle` (and
/// no tunnel open) moves its session to a new connection that carries lines; the hub closes
/// the old one, and the session, its reverse connection and its tunnels go on. The next need
/// starts HTTP/2 again.
#[test]
fn an_unused_control_connection_goes_back_to_lines() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let a_ztm = ztm!().with_env("ZTM_CONTROL_IDLE", "1");
    let honest = Honest::start_with_a(&ztm!(), &a_ztm, "control-idle", &["--metrics", &metrics]);
    assert_eq!(connections_made(&honest.a.addr), 1, "A connected once");
    runtime().block_on(async {
        for round in 0..2 {
            // A starts HTTP/2 for a list; unused for 1 s, it carries lines again (it looks at
            // each heartbeat, every 15 s), B's connection speaking HTTP/2 all along.
            let r = get(&honest.a.addr, &format!("/api/meshes/{MESH}/endpoints"));
            assert_eq!(r.status, 200, "{}", r.text());
            until(Duration::from_secs(10), "A's connection started", || {
                carrying_lines(&metrics) == 0.0
            })
            .await;
            until(
                Duration::from_secs(25),
                &format!("A carries lines again (round {round})"),
                || carrying_lines(&metrics) == 1.0,
            )
            .await;
            // The session went on: no new connection in A's log, and B's tunnel to A's echo
            // service (over A's reverse connection) works.
            assert!(honest.tunnel_works());
            assert_eq!(
                connections_made(&honest.a.addr),
                1,
                "A never connected again"
            );
        }
    });
}

/// Only the holder of a session moves it: another user with its id and token, or a wrong
/// token, is refused and changes nothing; the holder's move closes the old connection with
/// why, and heartbeats follow the session to the new one.
#[test]
fn sessions_move_only_for_their_holder() {
    let honest = Honest::start(&ztm!(), "control-resume", &[]);
    let bob = honest.user("bob");
    let mallory = honest.user("mallory");
    let hub = honest.hub.addr.clone();
    runtime().block_on(async {
        let mut first = Lines::dial(&hub, &honest.pem, &bob).await;
        let ident = Ident::of(&bob.name);
        let r = first.ask(&registration(&ident, "bobs", json!([]))).await;
        assert_eq!(r.status, 200, "{r:?}");
        let token = r.session.unwrap();
        let resume = |session: &str| json!({"op": "resume", "id": ident.id, "session": session});
        let beat = json!({"op": "heartbeat", "id": ident.id});

        // Mallory has bob's id and token, but not his certificate.
        let mut m = Lines::dial(&hub, &honest.pem, &mallory).await;
        assert_eq!(m.ask(&resume(&token)).await.status, 404);
        assert_eq!(m.ask(&beat).await.status, 404);
        // Bob with a wrong token; and on a connection that holds a session already.
        let mut second = Lines::dial(&hub, &honest.pem, &bob).await;
        assert_eq!(
            second
                .ask(&resume("0123456789abcdef0123456789abcdef"))
                .await
                .status,
            404
        );
        assert_eq!(first.ask(&resume(&token)).await.status, 409);
        assert_eq!(first.ask(&beat).await.status, 204, "nothing moved");

        // Bob moves it: the old connection is closed with why, heartbeats go on here.
        assert_eq!(second.ask(&resume(&token)).await.status, 200);
        let bye = first.answer().await;
        assert_eq!(
            (bye.closing, bye.message.as_deref()),
            (true, Some("session moved")),
            "{bye:?}"
        );
        assert!(first.closed().await);
        let r = second.ask(&beat).await;
        assert_eq!(r.status, 204, "{r:?}");
        // The endpoint stayed online when the old connection closed.
        let other = control(&hub, &honest.pem, &bob).await;
        let list = call(
            &other.sender,
            "GET",
            "/api/endpoints?q=bobs",
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
        let online = list.json()[0]["online"].as_bool();
        assert_eq!(online, Some(true), "{}", list.body);
        assert!(honest.tunnel_works());
    });
}
