//! A compromised hub for attack tests: a TLS server with a genuine hub certificate of the test
//! CA that speaks just enough of the wire protocol (PROTOCOL.md) for a real `ztm agent` to
//! join through it, and then sends the agent whatever the test wants over the reverse
//! connection (tunnels and management requests for any user, with any headers).
//!
//! It accepts every registration, heartbeat and publication, answers discovery with the lists
//! the test gives it, and hands each reverse connection to the test once the agent answered
//! `GET /api/hello`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Has the CA at `ca_addr` sign a new hub key for `hub/{name}`; returns (certificate, key) PEM.
pub fn sign_hub(ca_addr: &str, name: &str) -> (String, String) {
    let (key, public) = ztm_pki::generate_key().expect("hub key");
    let r = crate::http::post(
        ca_addr,
        &format!("/api/sign/hub/{name}?names=127.0.0.1"),
        &public,
    );
    assert_eq!(r.status, 200, "sign hub: {}", r.text());
    (r.text(), key)
}

/// What the fake hub has been told by agents, and what it answers to discovery.
#[derive(Default)]
pub struct Seen {
    /// Bodies of `POST /api/endpoints/{id}`, with the id.
    pub registrations: Vec<(String, Value)>,
    /// Bodies of `POST /api/endpoints/{id}/services`.
    pub publications: Vec<Value>,
    /// The answer to `GET /api/endpoints` (default `[]`).
    pub endpoints: Option<Value>,
    /// The answer to `GET /api/services` (default `[]`).
    pub services: Option<Value>,
}

/// A reverse connection an agent dialled: the hub is the HTTP/2 client on it.
pub struct Reverse {
    pub sender: h2::client::SendRequest<Bytes>,
    /// The agent's answer to `GET /api/hello`.
    pub hello: Value,
}

/// What the agent answered.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
}

impl Reverse {
    /// Sends one request (a forwarded management request, say) on the reverse connection,
    /// with `ztm-user: user` when given, and reads the whole answer.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        user: Option<&str>,
        body: &str,
    ) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("https://ztm{path}"));
        if let Some(u) = user {
            req = req.header("ztm-user", u);
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(()).expect("request");
        let mut sender = self.sender.clone().ready().await.expect("reverse ready");
        let (resp, mut send) = sender
            .send_request(req, body.is_empty())
            .expect("send request");
        if !body.is_empty() {
            // The agent may answer (a refusal, say) and end the stream before it reads the body.
            let _ = send.send_data(Bytes::from(body.to_string()), true);
        }
        let resp = tokio::time::timeout(Duration::from_secs(15), resp)
            .await
            .expect("the agent did not answer")
            .expect("response");
        read_answer(resp).await
    }

    /// Opens a tunnel (extended CONNECT, `:protocol: ztm-tunnel`) to `path` for `user`. On 200
    /// the stream is returned open; otherwise the error answer.
    pub async fn tunnel(
        &self,
        path: &str,
        user: Option<&str>,
    ) -> (Answer, Option<(h2::SendStream<Bytes>, h2::RecvStream)>) {
        self.tunnel_with(path, user, &[]).await
    }

    /// Like [`Reverse::tunnel`], with more headers (an exit's `ztm-destination`).
    pub async fn tunnel_with(
        &self,
        path: &str,
        user: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (Answer, Option<(h2::SendStream<Bytes>, h2::RecvStream)>) {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("https://ztm{path}"));
        if let Some(u) = user {
            req = req.header("ztm-user", u);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut req = req.body(()).expect("request");
        req.extensions_mut()
            .insert(h2::ext::Protocol::from_static("ztm-tunnel"));
        let mut sender = self.sender.clone().ready().await.expect("reverse ready");
        let (resp, send) = sender.send_request(req, false).expect("send CONNECT");
        let resp = tokio::time::timeout(Duration::from_secs(15), resp)
            .await
            .expect("the agent did not answer the CONNECT")
            .expect("response");
        if resp.status() == StatusCode::OK {
            let answer = Answer {
                status: 200,
                content_type: None,
                body: String::new(),
            };
            return (answer, Some((send, resp.into_body())));
        }
        (read_answer(resp).await, None)
    }
}

async fn read_answer(resp: Response<h2::RecvStream>) -> Answer {
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
    }
    Answer {
        status,
        content_type,
        body: String::from_utf8_lossy(&buf).into_owned(),
    }
}

/// A running fake hub. Dropping it stops accepting; connections end with the runtime.
pub struct FakeHub {
    pub addr: String,
    pub seen: Arc<Mutex<Seen>>,
    reverse: mpsc::UnboundedReceiver<Reverse>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FakeHub {
    /// Listens on a fresh port of 127.0.0.1 with the given hub certificate and key.
    pub async fn start(ca_pem: &str, cert_pem: &str, key_pem: &str) -> FakeHub {
        let mut config = ztm_pki::hub_server_config(ca_pem, cert_pem, key_pem, Default::default())
            .expect("hub TLS config");
        // A hub from before connections started on demand (PROTOCOL.md): agents that offer
        // both kinds get HTTP/2 at once, and must still work with it.
        config.alpn_protocols.retain(|a| {
            a.as_slice() != ztm_pki::ALPN_REVERSE_ON_DEMAND
                && a.as_slice() != ztm_pki::ALPN_CONTROL_ON_DEMAND
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (tx, reverse) = mpsc::unbounded_channel();
        let accept = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    let seen = seen.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let reverse =
                            tls.get_ref().1.alpn_protocol() == Some(ztm_pki::ALPN_REVERSE);
                        if reverse {
                            serve_reverse(tls, tx).await;
                        } else {
                            serve_control(tls, seen).await;
                        }
                    });
                }
            }
        });
        FakeHub {
            addr,
            seen,
            reverse,
            accept,
        }
    }

    /// The next reverse connection an agent dials (after its hello), within `within`.
    pub async fn next_reverse(&mut self, within: Duration) -> Reverse {
        tokio::time::timeout(within, self.reverse.recv())
            .await
            .expect("no reverse connection came")
            .expect("the fake hub stopped")
    }

    /// Sets the answer to `GET /api/endpoints`.
    pub fn set_endpoints(&self, list: Value) {
        self.seen.lock().unwrap().endpoints = Some(list);
    }

    /// Sets the answer to `GET /api/services`.
    pub fn set_services(&self, list: Value) {
        self.seen.lock().unwrap().services = Some(list);
    }
}

type Tls = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// The control connection: the agent registers, heartbeats, publishes and asks for lists.
async fn serve_control(tls: Tls, seen: Arc<Mutex<Seen>>) {
    let Ok(mut conn) = ztm_net::h2io::server_builder()
        .handshake::<_, Bytes>(tls)
        .await
    else {
        return;
    };
    while let Some(Ok((req, respond))) = conn.accept().await {
        let seen = seen.clone();
        tokio::spawn(async move {
            let (parts, mut body) = req.into_parts();
            let body = ztm_net::h2io::read_body(&mut body, 1 << 20)
                .await
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let path = parts.uri.path().to_string();
            let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            let (status, answer) = match (&parts.method, segments.as_slice()) {
                (&Method::POST, ["api", "endpoints", id]) => {
                    seen.lock()
                        .unwrap()
                        .registrations
                        .push((id.to_string(), body));
                    (200, Some(json!({"session": "t", "hub": "hub/fake"})))
                }
                (&Method::POST, ["api", "endpoints", _, "heartbeat"]) => (204, None),
                (&Method::POST, ["api", "endpoints", _, "services"]) => {
                    seen.lock().unwrap().publications.push(body);
                    (204, None)
                }
                (&Method::GET, ["api", "endpoints"]) => (
                    200,
                    Some(seen.lock().unwrap().endpoints.clone().unwrap_or(json!([]))),
                ),
                (&Method::GET, ["api", "services"]) => (
                    200,
                    Some(seen.lock().unwrap().services.clone().unwrap_or(json!([]))),
                ),
                _ => (404, Some(json!({"status": 404, "message": "no such API"}))),
            };
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            match answer {
                Some(v) => ztm_net::h2io::respond_json(respond, status, &v),
                None => ztm_net::h2io::respond(respond, status, None, Bytes::new()),
            }
        });
    }
}

/// The reverse connection: say hello, then hand the connection to the test.
async fn serve_reverse(tls: Tls, tx: mpsc::UnboundedSender<Reverse>) {
    let Ok((sender, conn)) = ztm_net::h2io::client_builder()
        .handshake::<_, Bytes>(tls)
        .await
    else {
        return;
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut reverse = Reverse {
        sender,
        hello: Value::Null,
    };
    let hello = reverse.request(Method::GET, "/api/hello", None, "").await;
    if hello.status != 200 {
        return;
    }
    reverse.hello = serde_json::from_str(&hello.body).unwrap_or(Value::Null);
    let _ = tx.send(reverse);
}
