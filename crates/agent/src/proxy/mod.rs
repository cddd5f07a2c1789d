//! Proxies: a port whose target is an exit (docs/exits.md). Each connection says where it
//! wants to go, in SOCKS5 or as an HTTP proxy request ([`protocol`], by its first byte), and
//! is carried through a hub to an exit that connects there (`crate::tunnel::open` with a
//! destination). Refusals are answered in the client's own protocol and kept in the port's
//! figures and the mesh's log.

pub mod protocol;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use ztm_net::now_ms;
use ztm_proto::exit::Destination;
use ztm_proto::model::PortTarget;
use ztm_proto::wire::Proto;

use crate::balance::Balancer;
use crate::figures::PortFigures;
use crate::mesh::Mesh;
use crate::tunnel::{self, FirstBytes, OpenError};
use protocol::{Dialect, Parsed};

/// A client must have said where it wants to go within this.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Reads from `socket` into `buf` until `parse` is done with it (or finds it malformed). Bytes
/// after what it took stay in `buf`.
async fn read_until<T>(
    socket: &mut TcpStream,
    buf: &mut BytesMut,
    parse: impl Fn(&[u8]) -> Parsed<T>,
) -> Result<T, (Bytes, String)> {
    loop {
        match parse(buf) {
            Parsed::Done(v, n) => {
                let _ = buf.split_to(n);
                return Ok(v);
            }
            Parsed::Bad(reply, why) => return Err((reply, why)),
            Parsed::Partial => {}
        }
        if buf.len() >= protocol::MAX_HEAD {
            return Err((Bytes::new(), "too long a request".into()));
        }
        buf.reserve(4096);
        match socket.read_buf(buf).await {
            Ok(0) => return Err((Bytes::new(), "the client closed before its request".into())),
            Ok(_) => {}
            Err(e) => return Err((Bytes::new(), format!("reading the request: {e}"))),
        }
    }
}

/// What a client asked for, and how to answer it.
struct Asked {
    dialect: Dialect,
    /// Told that the tunnel opened (SOCKS5, HTTP CONNECT); a forwarded request is not.
    answer_open: bool,
    destination: Destination,
    /// Bytes to go to the destination first (a forwarded request's head, anything the client
    /// sent after its request).
    first: Bytes,
}

/// Reads the client's request in its dialect. Errors carry the reply to send, if any.
async fn handshake(socket: &mut TcpStream) -> Result<Asked, (Bytes, String)> {
    let mut buf = BytesMut::with_capacity(1024);
    let first = socket
        .read_buf(&mut buf)
        .await
        .map_err(|e| (Bytes::new(), format!("reading the request: {e}")))?;
    let Some(&byte) = buf.first().filter(|_| first > 0) else {
        return Err((Bytes::new(), "the client closed before its request".into()));
    };
    match protocol::dialect(byte) {
        Some(Dialect::Socks5) => {
            read_until(socket, &mut buf, protocol::socks_greeting).await?;
            socket
                .write_all(&protocol::NO_AUTH)
                .await
                .map_err(|e| (Bytes::new(), format!("answering the greeting: {e}")))?;
            let destination = read_until(socket, &mut buf, protocol::socks_request).await?;
            Ok(Asked {
                dialect: Dialect::Socks5,
                answer_open: true,
                destination,
                first: buf.freeze(),
            })
        }
        Some(Dialect::Http) => {
            let req = read_until(socket, &mut buf, protocol::http_request).await?;
            let answer_open = req.forward.is_none();
            let first = match req.forward {
                Some(head) => [head, buf.freeze()].concat().into(),
                None => buf.freeze(),
            };
            Ok(Asked {
                dialect: Dialect::Http,
                answer_open,
                destination: req.destination,
                first,
            })
        }
        None => Err((
            Bytes::new(),
            format!("neither SOCKS5 nor HTTP (first byte {byte:#04x})"),
        )),
    }
}

/// What the client is told when its tunnel did not open.
fn refusal(dialect: Dialect, e: &OpenError) -> Bytes {
    let outcome = protocol::outcome(
        e.refusal.as_ref().map(|r| r.status),
        e.refusal.as_ref().and_then(|r| r.reason.as_deref()),
        e.no_provider,
    );
    match dialect {
        Dialect::Socks5 => protocol::socks_reply(protocol::socks_code(outcome)),
        Dialect::Http => protocol::http_error(protocol::http_status(outcome), &e.message),
    }
}

/// Serves one client of proxy port `target` (an exit target).
pub async fn serve(
    rt: &Arc<Mesh>,
    mut socket: TcpStream,
    client: SocketAddr,
    target: &PortTarget,
    balancer: &Arc<Balancer>,
    figures: &Arc<PortFigures>,
    stop: &CancellationToken,
) {
    let asked = tokio::select! {
        a = tokio::time::timeout(HANDSHAKE, handshake(&mut socket)) => a,
        _ = stop.cancelled() => return,
    };
    let asked = match asked {
        Ok(Ok(a)) => a,
        Ok(Err((reply, why))) => {
            let _ = socket.write_all(&reply).await;
            tracing::debug!("proxy client {client}: {why}");
            figures.failed(&format!("proxy client {client}: {why}"), now_ms());
            return;
        }
        Err(_) => {
            figures.failed(
                &format!("proxy client {client} did not say where to within {HANDSHAKE:?}"),
                now_ms(),
            );
            return;
        }
    };
    let opening = Instant::now();
    let destination = asked.destination.to_string();
    let first = FirstBytes::given(&socket, asked.first.clone());
    let opened = tokio::select! {
        o = tunnel::open(rt, Proto::Tcp, target, balancer, Some(first), Some(&destination)) => o,
        _ = stop.cancelled() => return,
    };
    let opened = match opened {
        Ok(o) => o,
        Err(e) => {
            let _ = socket.write_all(&refusal(asked.dialect, &e)).await;
            figures.failed(&e.to_string(), now_ms());
            rt.event(
                "error",
                &format!("proxy connection from {client} to {destination}: {e}"),
            );
            return;
        }
    };
    let _open = figures.opened(opening.elapsed());
    if asked.answer_open {
        let yes = match asked.dialect {
            Dialect::Socks5 => protocol::socks_reply(protocol::reply::SUCCEEDED),
            Dialect::Http => Bytes::from_static(protocol::HTTP_CONNECTED),
        };
        if socket.write_all(&yes).await.is_err() {
            return;
        }
    }
    tunnel::carry(rt, socket, opened, figures, stop, &destination).await;
}
