//! A hand-made hostile agent: raw HTTP/2 over TLS with a valid user certificate, speaking the
//! wire protocol however a test wants (PROTOCOL.md), and a flood of strangers. The attack
//! tests use it to do what a modified agent or an internet host could do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use crate::dir::{rand_u64, TempDir};
use crate::http::{free_port, post_json};
use crate::mesh::*;
use crate::poll::wait_until;
use crate::roles::{AgentProc, CaProc, HubProc};
use crate::traffic::echo_server;
use crate::Ztm;

pub type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Dials the hub as `user` with ALPN `alpn`.
pub async fn try_dial(hub: &str, ca: &str, user: &User, alpn: &[u8]) -> std::io::Result<Tls> {
    let config = ztm_pki::agent_client_config(ca, &user.cert, &user.key, alpn)
        .map_err(std::io::Error::other)?;
    let tcp = tokio::net::TcpStream::connect(hub).await?;
    let name = ztm_pki::rustls::pki_types::ServerName::try_from("127.0.0.1")
        .map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

pub async fn dial(hub: &str, ca: &str, user: &User, alpn: &[u8]) -> Tls {
    try_dial(hub, ca, user, alpn).await.expect("TLS to the hub")
}

/// A control connection: its sender, and a task that ends when the connection does.
pub struct Control {
    pub sender: h2::client::SendRequest<Bytes>,
    pub driver: tokio::task::JoinHandle<()>,
}

impl Control {
    pub fn is_closed(&self) -> bool {
        self.driver.is_finished()
    }
}

pub async fn control(hub: &str, ca: &str, user: &User) -> Control {
    let tls = dial(hub, ca, user, ztm_pki::ALPN_CONTROL).await;
    let (sender, conn) = h2::client::handshake(tls).await.expect("h2");
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Control { sender, driver }
}

/// An answer: status and body text.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// Sends one request; `Err` if the connection or the stream failed.
pub async fn call(
    sender: &h2::client::SendRequest<Bytes>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Answer, String> {
    let mut sender = sender.clone().ready().await.map_err(|e| e.to_string())?;
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("https://hub{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(()).map_err(|e| e.to_string())?;
    let end = body.is_empty();
    let (resp, mut send) = sender.send_request(req, end).map_err(|e| e.to_string())?;
    if !end {
        // The hub may answer (and end the stream) before it has read the body.
        let _ = send.send_data(body, true);
    }
    let resp = resp.await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    Ok(Answer {
        status,
        content_type,
        headers,
        body: String::from_utf8_lossy(&text).into_owned(),
    })
}

/// An endpoint identity: an id and the nonce it is derived from with its user's name.
#[derive(Clone, Debug)]
pub struct Ident {
    pub id: String,
    pub nonce: String,
}

impl Ident {
    /// A fresh endpoint identity of `user`.
    pub fn of(user: &str) -> Ident {
        let nonce = ztm_proto::wire::new_id_nonce();
        Ident {
            id: ztm_proto::wire::endpoint_id(user, &nonce),
            nonce,
        }
    }

    /// Another user's id `id`, claimed with a nonce of our own.
    pub fn claim(id: &str) -> Ident {
        Ident {
            id: id.to_string(),
            nonce: ztm_proto::wire::new_id_nonce(),
        }
    }
}

/// Registers endpoint `ident` named `name` with the services in `services` (a JSON array).
pub async fn register(
    sender: &h2::client::SendRequest<Bytes>,
    ident: &Ident,
    name: &str,
    services: Value,
) -> Result<Answer, String> {
    let body =
        serde_json::json!({"name": name, "services": services, "nonce": ident.nonce}).to_string();
    call(
        sender,
        "POST",
        &format!("/api/endpoints/{}", ident.id),
        &[("content-type", "application/json")],
        Bytes::from(body),
    )
    .await
}

/// What a hostile reverse connection answers to a request the hub sends it (other than
/// the hello): status, content type and body.
pub type Answerer =
    Arc<dyn Fn(&http::Request<h2::RecvStream>) -> (u16, &'static str, String) + Send + Sync>;

/// Dials the reverse connection of endpoint `id` (registered with `token`) and serves it with
/// `answer` in the background.
pub async fn serve_reverse(
    hub: &str,
    ca: &str,
    user: &User,
    id: &str,
    token: &str,
    answer: Answerer,
) -> tokio::task::JoinHandle<()> {
    let tls = dial(hub, ca, user, ztm_pki::ALPN_REVERSE).await;
    // As an agent must (RFC 8441): the hub sends tunnels as extended CONNECT.
    let mut server = h2::server::Builder::new()
        .enable_connect_protocol()
        .handshake(tls)
        .await
        .expect("h2 server");
    let hello = serde_json::json!({"endpoint": id, "session": token}).to_string();
    tokio::spawn(async move {
        while let Some(Ok((req, mut respond))) = server.accept().await {
            let (status, ct, body) = if req.uri().path() == "/api/hello" {
                (200, "application/json", hello.clone())
            } else {
                answer(&req)
            };
            let resp = http::Response::builder()
                .status(status)
                .header("content-type", ct)
                .body(())
                .expect("response");
            if let Ok(mut send) = respond.send_response(resp, body.is_empty()) {
                if !body.is_empty() {
                    let _ = send.send_data(Bytes::from(body), true);
                }
            }
        }
    })
}

/// A stranger on the internet: connections from `from` (an address of this machine's
/// loopback, e.g. 127.0.0.2) to `to` that never finish a TLS handshake.
pub struct Flood {
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<u64>>,
}

impl Flood {
    /// Keeps `idle` TCP connections open (reopening those the hub closes), and opens `slow`
    /// connections a second that each send the first bytes of a ClientHello and then stall.
    pub fn start(from: std::net::IpAddr, to: SocketAddr, idle: usize, slow: usize) -> Flood {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        // Idle connections: a few tasks, each holding its share.
        let workers = 8;
        for w in 0..workers {
            let stop = stop.clone();
            let share = idle / workers + usize::from(w < idle % workers);
            tasks.push(tokio::spawn(async move {
                let mut opened = 0u64;
                let mut held: Vec<tokio::net::TcpStream> = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Drop the ones the hub closed, open new ones up to the share.
                    held.retain(|s| {
                        let mut b = [0u8; 1];
                        match s.try_read(&mut b) {
                            Ok(0) => false,
                            Ok(_) => true,
                            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                        }
                    });
                    // At most 10 new ones a tick: the flood holds connections, it does not
                    // hammer the accept queue.
                    for _ in 0..share.saturating_sub(held.len()).min(10) {
                        match connect_from(from, to).await {
                            Ok(s) => {
                                held.push(s);
                                opened += 1;
                            }
                            Err(_) => break,
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                opened
            }));
        }
        // Slow handshakes: `slow` a second, each sending half a ClientHello and stalling.
        {
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut opened = 0u64;
                let mut held: Vec<tokio::net::TcpStream> = Vec::new();
                let period = Duration::from_secs(1) / slow.max(1) as u32;
                let mut tick = tokio::time::interval(period);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tick.tick().await;
                    if let Ok(s) = connect_from(from, to).await {
                        use tokio::io::AsyncWriteExt;
                        let mut s = s;
                        // A TLS record header announcing a 512-byte handshake message, and a
                        // few of its bytes: the rest never comes.
                        let _ = s
                            .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
                            .await;
                        held.push(s);
                        opened += 1;
                        if held.len() > 4_000 {
                            held.drain(..1_000);
                        }
                    }
                }
                opened
            }));
        }
        Flood { stop, tasks }
    }

    /// Stops the flood; how many connections it opened.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = 0;
        for t in self.tasks {
            total += t.await.unwrap_or(0);
        }
        total
    }
}

async fn connect_from(
    from: std::net::IpAddr,
    to: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    tokio::time::timeout(Duration::from_secs(2), socket.connect(to))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// Honest users beside the attack: a CA, a hub, root's agent A publishing an echo service,
/// and alice's agent B with a port mapped to it.
pub struct Honest {
    pub ca: CaProc,
    pub pem: String,
    pub root: User,
    pub alice: User,
    pub hub: HubProc,
    pub a: AgentProc,
    pub b: AgentProc,
    pub a_id: String,
    /// B's port that reaches A's echo service.
    pub port: u16,
    /// Last, so that processes are gone (and their logs printed) before it is removed.
    pub dir: TempDir,
}

impl Honest {
    /// Starts them in a new directory; the hub gets `hub_flags`.
    pub fn start(ztm: &Ztm, tag: &str, hub_flags: &[&str]) -> Honest {
        Honest::start_with_a(ztm, ztm, tag, hub_flags)
    }

    /// The same, with agent A started from `a_ztm` (under its own open-file limit, say).
    pub fn start_with_a(ztm: &Ztm, a_ztm: &Ztm, tag: &str, hub_flags: &[&str]) -> Honest {
        let dir = TempDir::new(tag);
        let ca = ztm.start_ca(dir.path());
        let pem = ca_pem(&ca.addr);
        let root = create_user(&ca.addr, "root");
        let alice = create_user(&ca.addr, "alice");
        let hub = ztm.start_hub_with(dir.path(), "hub", &ca.addr, hub_flags);
        let a = a_ztm.start_agent(dir.path(), "a");
        let b = ztm.start_agent(dir.path(), "b");
        join_ok(&a.addr, &pem, "a", &root, &[&hub.addr]);
        join_ok(&b.addr, &pem, "b", &alice, &[&hub.addr]);
        let a_id = local_id(&a.addr);
        let echo = echo_server();
        let r = create_service(&a.addr, &a_id, "echo", echo.port);
        assert_eq!(r.status, 200, "{}", r.text());
        wait_until(Duration::from_secs(20), "B sees A's echo service", || {
            discovers(&b.addr, "echo", &a_id)
        });
        let port = free_port();
        let r = post_json(
            &b.addr,
            &format!(
                "/api/meshes/{MESH}/endpoints/{}/ports/127.0.0.1/tcp/{port}",
                local_id(&b.addr)
            ),
            &serde_json::json!({"target": {"service": "echo", "endpoint": a_id}}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let honest = Honest {
            ca,
            pem,
            root,
            alice,
            hub,
            a,
            b,
            a_id,
            port,
            dir,
        };
        wait_until(Duration::from_secs(20), "the honest tunnel works", || {
            honest.tunnel_works()
        });
        honest
    }

    pub fn hub_addr(&self) -> SocketAddr {
        self.hub.addr.parse().expect("hub address")
    }

    /// A fresh connection through B's port gets its line echoed by A's service.
    pub fn tunnel_works(&self) -> bool {
        use std::io::{BufRead, BufReader, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let msg = format!("hello {}\n", rand_u64());
        if s.write_all(msg.as_bytes()).is_err() {
            return false;
        }
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).is_ok() && line == msg
    }

    /// A user issued by this mesh's CA.
    pub fn user(&self, name: &str) -> User {
        create_user(&self.ca.addr, name)
    }
}
