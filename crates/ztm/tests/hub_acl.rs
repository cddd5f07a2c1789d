//! The hub's own access checks, exercised by a hand-made HTTP/2 client with a user's
//! certificate (an agent would not even ask for what its user may not do).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use ztm_testkit::prelude::*;

/// A backend answering one line per connection.
fn backend() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut w = s.try_clone().unwrap();
            let mut line = String::new();
            if BufReader::new(s).read_line(&mut line).is_ok() {
                let _ = w.write_all(format!("secret:{line}").as_bytes());
            }
        }
    });
    port
}

/// Dials the hub as `user` with ALPN `alpn`: the TLS stream, ready for HTTP/2 either way.
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

/// A control connection to the hub as `user`; it stays open while the sender lives.
async fn control(hub: &str, ca: &str, user: &User) -> h2::client::SendRequest<Bytes> {
    let tls = dial(hub, ca, user, ztm_pki::ALPN_CONTROL).await;
    let (sender, conn) = h2::client::handshake(tls).await.expect("h2");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// Dials the hub's control connection as `user` and sends one request.
async fn ask(
    hub: &str,
    ca: &str,
    user: &User,
    method: http::Method,
    path: &str,
    tunnel: bool,
) -> (u16, String, Option<(h2::SendStream<Bytes>, h2::RecvStream)>) {
    let sender = control(hub, ca, user).await;
    ask_on(sender, method, path, Bytes::new(), tunnel, None).await
}

/// Sends one request on a control connection.
async fn ask_on(
    sender: h2::client::SendRequest<Bytes>,
    method: http::Method,
    path: &str,
    body: Bytes,
    tunnel: bool,
    endpoint_user: Option<&str>,
) -> (u16, String, Option<(h2::SendStream<Bytes>, h2::RecvStream)>) {
    let mut sender = sender.ready().await.expect("ready");
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("https://hub{path}"))
        .body(())
        .unwrap();
    if let Some(user) = endpoint_user {
        req.headers_mut()
            .insert("ztm-endpoint-user", user.parse().unwrap());
    }
    if tunnel {
        req.extensions_mut()
            .insert(h2::ext::Protocol::from_static("ztm-tunnel"));
    }
    let (resp, mut send) = sender
        .send_request(req, !tunnel && body.is_empty())
        .expect("send");
    if !body.is_empty() {
        // The hub may answer (a refusal, say) and end the stream before it reads the body.
        let _ = send.send_data(body, true);
    }
    let resp = resp.await.expect("response");
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    if status == 200 && tunnel {
        return (status, String::new(), Some((send, body)));
    }
    let mut text = Vec::new();
    while let Some(Ok(chunk)) = body.data().await {
        text.extend_from_slice(&chunk);
    }
    (status, String::from_utf8_lossy(&text).into_owned(), None)
}

#[test]
fn hub_refuses_tunnels_and_management_to_users_without_rights() {
    let dir = TempDir::new("hub-acl");
    let ca = ztm!().start_ca(dir.path());
    let pem = ca_pem(&ca.addr);
    let root = create_user(&ca.addr, "root");
    let bob = create_user(&ca.addr, "bob");
    let alice = create_user(&ca.addr, "alice");
    let hub = ztm!().start_hub(dir.path(), "hub", &ca.addr);
    let b = ztm!().start_agent(dir.path(), "b");
    join_ok(&b.addr, &pem, "b", &root, &[&hub.addr]);
    let b_id = local_id(&b.addr);
    wait_until(Duration::from_secs(10), "B online", || {
        is_online(&b.addr, &b_id)
    });
    let port = backend();
    let r = post_json(
        &b.addr,
        &format!("/api/meshes/m/endpoints/{b_id}/services/tcp/secret"),
        &json!({"host": "127.0.0.1", "port": port, "users": ["alice"]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until(Duration::from_secs(10), "the service published", || {
        discovers(&b.addr, "secret", &b_id)
    });

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let path = format!("/api/endpoints/{b_id}/services/tcp/secret");
        // bob is not on the list: refused by the hub.
        let (status, body, _) =
            ask(&hub.addr, &pem, &bob, http::Method::CONNECT, &path, true).await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("may not connect"), "{body}");
        // alice is: the tunnel opens and reaches the backend.
        let (status, body, stream) =
            ask(&hub.addr, &pem, &alice, http::Method::CONNECT, &path, true).await;
        assert_eq!(status, 200, "{body}");
        let (mut send, mut recv) = stream.unwrap();
        send.send_data(Bytes::from_static(b"hello\n"), false)
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"\n") {
            match tokio::time::timeout(Duration::from_secs(10), recv.data()).await {
                Ok(Some(Ok(chunk))) => got.extend_from_slice(&chunk),
                other => panic!("no reply through the tunnel: {other:?}"),
            }
        }
        assert_eq!(got, b"secret:hello\n");
        // A caller that knows this endpoint id as another user's is told it is not here,
        // tunnel or management alike; as root's, it gets through.
        for (method, path, tunnel) in [
            (http::Method::CONNECT, path.as_str(), true),
            (
                http::Method::GET,
                &format!("/api/endpoints/{b_id}/manage/services"),
                false,
            ),
        ] {
            let sender = control(&hub.addr, &pem, &root).await;
            let (status, body, _) = ask_on(
                sender,
                method.clone(),
                path,
                Bytes::new(),
                tunnel,
                Some("bob"),
            )
            .await;
            assert_eq!(status, 404, "{body}");
            assert!(
                body.contains("of user bob is not online at this hub"),
                "{body}"
            );
            let sender = control(&hub.addr, &pem, &root).await;
            let (status, body, _) =
                ask_on(sender, method, path, Bytes::new(), tunnel, Some("root")).await;
            assert_eq!(status, 200, "{body}");
        }
        // Unknown services and endpoints are 404s.
        let (status, _, _) = ask(
            &hub.addr,
            &pem,
            &alice,
            http::Method::CONNECT,
            &format!("/api/endpoints/{b_id}/services/tcp/nothing"),
            true,
        )
        .await;
        assert_eq!(status, 404);
        // bob may not manage root's endpoint through the hub; root may.
        let manage = format!("/api/endpoints/{b_id}/manage/services");
        let (status, body, _) = ask(&hub.addr, &pem, &bob, http::Method::GET, &manage, false).await;
        assert_eq!(status, 403, "{body}");
        let (status, body, _) =
            ask(&hub.addr, &pem, &root, http::Method::GET, &manage, false).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("secret"), "{body}");
    });
}

/// An agent registers on its control connection and dials its reverse connection a moment
/// later. A management request that reaches the hub in between waits for the reverse
/// connection instead of failing: right after joining, an endpoint is manageable.
#[test]
fn management_waits_for_a_late_reverse_connection() {
    let dir = TempDir::new("hub-late-reverse");
    let ca = ztm!().start_ca(dir.path());
    let pem = ca_pem(&ca.addr);
    let root = create_user(&ca.addr, "root");
    let hub = ztm!().start_hub(dir.path(), "hub", &ca.addr);
    // An id derived from root's name, as agents make them (PROTOCOL.md, Identity).
    let nonce = ztm_proto::wire::new_id_nonce();
    let id: &'static str = Box::leak(ztm_proto::wire::endpoint_id("root", &nonce).into_boxed_str());

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Register, as an agent would, but do not dial the reverse connection yet.
        let agent = control(&hub.addr, &pem, &root).await;
        let (status, body, _) = ask_on(
            agent.clone(),
            http::Method::POST,
            &format!("/api/endpoints/{id}"),
            Bytes::from(json!({"name": "late", "nonce": nonce}).to_string()),
            false,
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let registered: serde_json::Value = serde_json::from_str(&body).unwrap();
        let session = registered["session"].as_str().unwrap().to_string();

        // Someone manages the endpoint now.
        let asked = tokio::spawn({
            let (hub, pem, root) = (hub.addr.clone(), pem.clone(), root.clone());
            async move {
                let path = format!("/api/endpoints/{id}/manage/services");
                ask(&hub, &pem, &root, http::Method::GET, &path, false).await
            }
        });
        // The agent is slow to dial its reverse connection.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(
            !asked.is_finished(),
            "the hub answered before the endpoint could"
        );

        let tls = dial(&hub.addr, &pem, &root, ztm_pki::ALPN_REVERSE).await;
        // As an agent must (RFC 8441): the hub sends tunnels as extended CONNECT.
        let mut server = h2::server::Builder::new()
            .enable_connect_protocol()
            .handshake(tls)
            .await
            .expect("h2 server");
        let mut seen = Vec::new();
        while let Some(Ok((req, mut respond))) = server.accept().await {
            let path = req.uri().path().to_string();
            let who = req.headers().get("ztm-user").cloned();
            let answer = match path.as_str() {
                "/api/hello" => json!({"endpoint": id, "session": session}).to_string(),
                "/api/services" => "[]".to_string(),
                other => panic!("unexpected request {other}"),
            };
            let resp = http::Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(())
                .unwrap();
            let mut send = respond.send_response(resp, false).expect("respond");
            send.send_data(Bytes::from(answer), true).expect("body");
            seen.push((path.clone(), who));
            if path == "/api/services" {
                break;
            }
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[1].1.as_ref().map(|v| v.as_bytes()), Some(&b"root"[..]));
        // Keep serving the connection while the answer travels back.
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        let (status, body, _) = tokio::time::timeout(Duration::from_secs(10), asked)
            .await
            .expect("the management request never finished")
            .unwrap();
        assert_eq!((status, body.as_str()), (200, "[]"));
        drop(agent);
    });
}
