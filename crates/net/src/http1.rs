//! A small HTTP/1.1 client (one request per connection) for talking to the CA and to an
//! agent's REST API.

use std::time::Duration;

use anyhow::{anyhow, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Why [`request`] got no answer at all; its other failures are untyped.
#[derive(Debug)]
pub enum NoAnswer {
    /// The connection to `addr` could not be made.
    Connect {
        addr: String,
        source: std::io::Error,
    },
    /// `addr` gave no whole answer within `deadline`.
    Timeout { addr: String, deadline: Duration },
}

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoAnswer::Connect { addr, .. } => write!(f, "cannot connect to {addr}"),
            NoAnswer::Timeout { addr, deadline } => {
                write!(f, "{addr} did not answer within {deadline:?}")
            }
        }
    }
}

impl std::error::Error for NoAnswer {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NoAnswer::Connect { source, .. } => Some(source),
            NoAnswer::Timeout { .. } => None,
        }
    }
}

/// Sends `method path` to `addr` (HOST:PORT) with optional bearer token and body. When no
/// answer comes at all, the error is a [`NoAnswer`].
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Bytes,
    deadline: Duration,
) -> Result<Reply> {
    let work = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| NoAnswer::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        exchange(stream, addr, method, path, token, content_type, body).await
    };
    tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| NoAnswer::Timeout {
            addr: addr.to_string(),
            deadline,
        })?
}

/// Sends `method path` on a connection already made to `addr` (a TLS stream, say) and reads
/// the answer; the connection is used for this one request.
pub async fn exchange<IO>(
    io: IO,
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<Reply>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr);
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if let Some(ct) = content_type {
        req = req.header(http::header::CONTENT_TYPE, ct);
    }
    let resp = sender.send_request(req.body(Full::new(body))?).await?;
    let status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, 16 << 20)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the answer from {addr}: {e}"))?
        .to_bytes();
    Ok(Reply {
        status,
        headers: parts.headers,
        body,
    })
}

/// Polls `GET path` on `addr` until it answers with a status below 500, for at most `within`.
pub async fn wait_ready(addr: &str, path: &str, within: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let answer = request(
            addr,
            "GET",
            path,
            None,
            None,
            Bytes::new(),
            Duration::from_secs(2),
        )
        .await;
        if answer.is_ok_and(|r| r.status < 500) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(anyhow!("{addr} did not answer within {within:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
