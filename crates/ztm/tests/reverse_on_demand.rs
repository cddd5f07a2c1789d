//! Reverse connections started on demand (PROTOCOL.md, "Reverse connection"): bound by a hello
//! line, dormant — nothing on the wire, no HTTP/2 in the hub — until a request for the endpoint
//! needs them, then HTTP/2 as any reverse connection. Hand-made agents speak the protocol byte
//! by byte against a real hub, beside real agents; hostile ones try to bind what is not theirs
//! and to speak out of turn.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztm_net::on_demand::{self, HelloError};
use ztm_proto::wire::Hello;
use ztm_testkit::hostile::*;
use ztm_testkit::prelude::*;

/// The hub's count of dormant reverse connections.
fn dormant(metrics: &str) -> f64 {
    metric(metrics, "ztm_hub_reverse_connections_dormant")
}

/// Bob's endpoint, registered on a control connection of its own: the connection, its
/// identity and its session token.
async fn registered(hub: &str, pem: &str, bob: &User) -> (Control, Ident, String) {
    let control = control(hub, pem, bob).await;
    let ident = Ident::of(&bob.name);
    let r = register(&control.sender, &ident, "bobs", json!([]))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let token = r.json()["session"].as_str().unwrap().to_string();
    (control, ident, token)
}

/// The same, with a reverse connection started on demand, bound by its hello line.
async fn bound(hub: &str, pem: &str, bob: &User) -> (Control, Ident, Tls) {
    let (control, ident, token) = registered(hub, pem, bob).await;
    let mut reverse = dial(hub, pem, bob, ztm_pki::ALPN_REVERSE_ON_DEMAND).await;
    let hello = Hello {
        endpoint: ident.id.clone(),
        session: token,
    };
    on_demand::say_hello(&mut reverse, &hello).await.unwrap();
    (control, ident, reverse)
}

/// The hub leaves a reverse connection silent until a request needs it, then starts HTTP/2
/// on it and sends the request; real agents' reverse connections do the same.
#[test]
fn reverse_connections_start_only_when_a_request_needs_them() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let honest = Honest::start(&ztm!(), "on-demand", &["--metrics", &metrics]);
    let bob = honest.user("bob");
    let hub = honest.hub.addr.clone();
    runtime().block_on(async {
        // B publishes nothing and nobody asked it anything: its reverse connection is dormant.
        // A's started when B's tunnel reached A's echo service.
        until(
            Duration::from_secs(10),
            "B's reverse connection dormant",
            || dormant(&metrics) == 1.0,
        )
        .await;

        let (control, ident, mut reverse) = bound(&hub, &honest.pem, &bob).await;
        until(
            Duration::from_secs(10),
            "bob's reverse connection dormant",
            || dormant(&metrics) == 2.0,
        )
        .await;

        // Bob manages his endpoint through the hub: the hub starts HTTP/2 on the dormant
        // connection, and the first bytes on it are the HTTP/2 client preface.
        let manage = tokio::spawn({
            let sender = control.sender.clone();
            let path = format!("/api/endpoints/{}/manage/services", ident.id);
            async move { call(&sender, "GET", &path, &[], Bytes::new()).await }
        });
        let mut preface = [0u8; 24];
        tokio::time::timeout(Duration::from_secs(10), reverse.read_exact(&mut preface))
            .await
            .expect("the hub starts HTTP/2 when the request comes")
            .unwrap();
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let io = on_demand::Prefixed::new(Bytes::copy_from_slice(&preface), reverse);
        let mut server = h2::server::Builder::new()
            .enable_connect_protocol()
            .handshake::<_, Bytes>(io)
            .await
            .expect("h2 server");
        let serving = tokio::spawn(async move {
            while let Some(Ok((req, mut respond))) = server.accept().await {
                let body = if req.uri().path() == "/api/services" {
                    "[{\"name\":\"made-by-hand\"}]"
                } else {
                    "[]"
                };
                let resp = http::Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(())
                    .unwrap();
                let mut send = respond.send_response(resp, false).unwrap();
                let _ = send.send_data(Bytes::from(body), true);
            }
        });
        let answer = manage.await.unwrap().unwrap();
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert!(answer.body.contains("made-by-hand"), "{}", answer.body);
        until(Duration::from_secs(10), "bob's connection started", || {
            dormant(&metrics) == 1.0
        })
        .await;

        // A real agent's dormant connection starts the same way: A manages B through the hub.
        let b_id = local_id(&honest.b.addr);
        let r = get(
            &honest.a.addr,
            &format!("/api/meshes/{MESH}/endpoints/{b_id}/services"),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        until(Duration::from_secs(10), "B's connection started", || {
            dormant(&metrics) == 0.0
        })
        .await;
        assert!(honest.tunnel_works());
        serving.abort();
    });
}

/// Hello lines that name another user's endpoint, a stale session, or nothing readable are
/// answered with why and bind nothing; a connection that never says hello is closed.
#[test]
fn hello_lines_that_bind_nothing_are_refused_with_reasons() {
    let honest = Honest::start(&ztm!(), "on-demand-hello", &[]);
    let bob = honest.user("bob");
    let mallory = honest.user("mallory");
    let hub = honest.hub.addr.clone();
    let pem = honest.pem.clone();
    runtime().block_on(async {
        // Silent from the start: refused after 10 s, checked last.
        let silent = {
            let (hub, pem, mallory) = (hub.clone(), pem.clone(), mallory.clone());
            tokio::spawn(async move {
                let mut tls = dial(&hub, &pem, &mallory, ztm_pki::ALPN_REVERSE_ON_DEMAND).await;
                let started = Instant::now();
                let answer: ztm_proto::wire::ReverseAnswer =
                    on_demand::read_line(&mut tls).await.unwrap();
                (answer, started.elapsed())
            })
        };
        let (_control, ident, token) = registered(&hub, &pem, &bob).await;
        let hello = |endpoint: &str, session: &str| Hello {
            endpoint: endpoint.to_string(),
            session: session.to_string(),
        };
        let refused = |r: Result<(), HelloError>| match r {
            Err(HelloError::Refused { status, message }) => (status, message),
            other => panic!("not refused: {other:?}"),
        };

        // Mallory presents bob's endpoint and token with her own certificate.
        let mut tls = dial(&hub, &pem, &mallory, ztm_pki::ALPN_REVERSE_ON_DEMAND).await;
        let r = on_demand::say_hello(&mut tls, &hello(&ident.id, &token)).await;
        assert_eq!(refused(r), (400, "bad hello: no such session".to_string()));
        // Bob with a token that is not his session's.
        let mut tls = dial(&hub, &pem, &bob, ztm_pki::ALPN_REVERSE_ON_DEMAND).await;
        let r = on_demand::say_hello(&mut tls, &hello(&ident.id, "not-the-token")).await;
        assert_eq!(refused(r), (400, "bad hello: no such session".to_string()));
        // Lines that are not hellos.
        for (line, said) in [
            (b"GET / HTTP/1.1\n".to_vec(), "bad hello: not a JSON line"),
            (
                vec![b'{'; on_demand::LINE_MAX + 100],
                "bad hello: a line longer than 4096 bytes",
            ),
        ] {
            let mut tls = dial(&hub, &pem, &bob, ztm_pki::ALPN_REVERSE_ON_DEMAND).await;
            tls.write_all(&line).await.unwrap();
            let answer: ztm_proto::wire::ReverseAnswer =
                on_demand::read_line(&mut tls).await.unwrap();
            assert_eq!(answer.status, 400, "{answer:?}");
            let message = answer.message.unwrap_or_default();
            assert!(message.starts_with(said), "{message}");
        }
        // None of it bound anything: bob's own hello still binds his endpoint.
        let mut tls = dial(&hub, &pem, &bob, ztm_pki::ALPN_REVERSE_ON_DEMAND).await;
        on_demand::say_hello(&mut tls, &hello(&ident.id, &token))
            .await
            .unwrap();

        let (answer, took) = silent.await.unwrap();
        assert_eq!(answer.status, 400, "{answer:?}");
        assert_eq!(
            answer.message.as_deref(),
            Some("bad hello: no hello within 10s")
        );
        assert!(took < Duration::from_secs(15), "{took:?}");
        assert!(honest.tunnel_works());
    });
}

/// Only the hub may start a dormant connection: an agent that sends bytes on it loses its
/// session, told why on both connections, and honest agents beside it carry on.
#[test]
fn an_agent_that_speaks_on_a_dormant_connection_loses_its_session() {
    let honest = Honest::start(&ztm!(), "on-demand-speak", &[]);
    let bob = honest.user("bob");
    let hub = honest.hub.addr.clone();
    runtime().block_on(async {
        let (control, _, mut reverse) = bound(&hub, &honest.pem, &bob).await;
        // An HTTP/2 server's SETTINGS, sent before the hub spoke.
        reverse
            .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        reverse.flush().await.unwrap();
        // The hub starts HTTP/2 only to say why, and closes.
        let mut said = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), reverse.read_to_end(&mut said))
            .await
            .expect("the hub closes the connection")
            .ok();
        let said = String::from_utf8_lossy(&said);
        assert!(said.starts_with("PRI * HTTP/2.0"), "{said:?}");
        assert!(
            said.contains("the agent spoke before the hub started HTTP/2"),
            "{said:?}"
        );
        until(
            Duration::from_secs(10),
            "bob's control connection closed",
            || control.is_closed(),
        )
        .await;
        assert!(honest.tunnel_works());
    });
}

/// A started reverse connection that nothing has used for `--reverse-idle` goes back to
/// dormant: the hub closes it, the agent dials a new one for the same session (the session
/// and its control connection go on), and the next tunnel starts it again.
#[test]
fn an_unused_reverse_connection_goes_back_to_dormant_and_starts_again() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let honest = Honest::start(
        &ztm!(),
        "on-demand-idle",
        &["--metrics", &metrics, "--reverse-idle", "2"],
    );
    let connected = connections_made(&honest.a.addr);
    assert_eq!(connected, 1, "A connected once");
    runtime().block_on(async {
        for round in 0..2 {
            // A's reverse connection carried B's tunnel (the last one, in Honest::start or
            // below); unused for 2 s, it is dormant again, as B's has been all along.
            until(
                Duration::from_secs(15),
                &format!("A's reverse connection dormant again (round {round})"),
                || dormant(&metrics) == 2.0,
            )
            .await;
            assert!(honest.tunnel_works(), "a tunnel starts it again");
        }
        // A tunnel held open keeps it started however long nothing else asks for it.
        let mut held = std::net::TcpStream::connect(("127.0.0.1", honest.port)).unwrap();
        std::io::Write::write_all(&mut held, b"held\n").unwrap();
        let mut echoed = [0u8; 5];
        std::io::Read::read_exact(&mut held, &mut echoed).unwrap();
        until(Duration::from_secs(10), "A's connection started", || {
            dormant(&metrics) == 1.0
        })
        .await;
        // Nothing to wait for: the idle time passes twice over, and it must stay started.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            dormant(&metrics),
            1.0,
            "a connection with a tunnel open stays"
        );
        std::io::Write::write_all(&mut held, b"again\n").unwrap();
        let mut echoed = [0u8; 6];
        std::io::Read::read_exact(&mut held, &mut echoed).unwrap();
        assert_eq!(&echoed, b"again\n");
    });
    assert_eq!(
        connections_made(&honest.a.addr),
        connected,
        "A's session went on: it never connected again"
    );
}
