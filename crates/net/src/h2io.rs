//! HTTP/2 plumbing over the `h2` crate: bounded body reads, small responses, and one-shot
//! requests with a deadline.

use std::time::Duration;

use anyhow::{anyhow, Result};
use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use serde::Serialize;
use ztm_proto::model::ApiError;
use ztm_proto::wire::{
    CONNECTION_WINDOW, MAX_FRAME, MAX_HEADER_LIST, MAX_STREAMS, SEND_BUFFER, STREAM_WINDOW,
};

/// HTTP/2 server settings every ZTM connection uses (PROTOCOL.md, "HTTP/2 settings"), with
/// extended CONNECT enabled for tunnels.
pub fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .max_send_buffer_size(SEND_BUFFER)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .enable_connect_protocol();
    b
}

/// HTTP/2 client settings every ZTM connection uses. Push is off (`SETTINGS_ENABLE_PUSH` = 0):
/// a PUSH_PROMISE from the server is then a connection error (PROTOCOL_ERROR).
pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .max_send_buffer_size(SEND_BUFFER)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST);
    b
}

/// The `message` of an error answer's body (or its status), for a response whose body has not
/// been read yet.
pub async fn error_message_of(resp: http::Response<RecvStream>) -> String {
    error_of(resp).await.message
}

/// The error body of a response (its status and words, and a `reason` if it has a valid
/// one), or one made of its status.
pub async fn error_of(resp: http::Response<RecvStream>) -> ApiError {
    let status = resp.status();
    let mut body = resp.into_body();
    let error = read_body(&mut body, 64 * 1024)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice::<ApiError>(&b).ok());
    match error {
        Some(e) => ApiError {
            status: status.as_u16(),
            message: e.message,
            // A reason is a short token; anything else is not passed on.
            reason: e.reason.filter(|r| {
                r.len() <= 64 && r.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
            }),
        },
        None => ApiError::new(status.as_u16(), status.to_string()),
    }
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the body: {0}")]
    Stream(#[from] h2::Error),
}

/// Reads a whole body, refusing more than `limit` bytes.
pub async fn read_body(body: &mut RecvStream, limit: usize) -> Result<Bytes, BodyError> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if buf.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Sends a complete response with an optional content type.
pub fn respond(
    send: SendResponse<Bytes>,
    status: StatusCode,
    content_type: Option<&str>,
    body: Bytes,
) {
    respond_with(send, status, content_type, &[], body)
}

/// Sends a complete response with an optional content type and extra headers.
pub fn respond_with(
    mut send: SendResponse<Bytes>,
    status: StatusCode,
    content_type: Option<&str>,
    headers: &[(&'static str, &str)],
    body: Bytes,
) {
    let mut builder = Response::builder().status(status);
    if let Some(ct) = content_type {
        builder = builder.header(http::header::CONTENT_TYPE, ct);
    }
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let Ok(resp) = builder.body(()) else {
        return;
    };
    let end = body.is_empty();
    if let Ok(mut stream) = send.send_response(resp, end) {
        if !end {
            let _ = stream.send_data(body, true);
        }
    }
}

pub fn respond_json<T: Serialize>(send: SendResponse<Bytes>, status: StatusCode, value: &T) {
    respond_json_with(send, status, &[], value)
}

/// Sends a JSON response with the extra headers `headers`.
pub fn respond_json_with<T: Serialize>(
    mut send: SendResponse<Bytes>,
    status: StatusCode,
    headers: &[(&'static str, &str)],
    value: &T,
) {
    let Ok(body) = serde_json::to_vec(value) else {
        return respond(send, StatusCode::INTERNAL_SERVER_ERROR, None, Bytes::new());
    };
    let mut builder = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let Ok(resp) = builder.body(()) else {
        return respond(send, StatusCode::INTERNAL_SERVER_ERROR, None, Bytes::new());
    };
    if let Ok(mut stream) = send.send_response(resp, false) {
        let _ = stream.send_data(body.into(), true);
    }
}

pub fn respond_error(send: SendResponse<Bytes>, status: StatusCode, message: impl Into<String>) {
    respond_json(send, status, &ApiError::new(status.as_u16(), message));
}

/// A complete response read from the peer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body).map_err(|e| anyhow!("bad JSON from peer: {e}"))
    }

    /// The `message` of an error body, or the status.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<ApiError>(&self.body)
            .map(|e| e.message)
            .unwrap_or_else(|_| self.status.to_string())
    }
}

/// Sends one request with a complete body and reads the complete answer, within `deadline`.
pub async fn request(
    sender: &h2::client::SendRequest<Bytes>,
    req: Request<()>,
    body: Bytes,
    limit: usize,
    deadline: Duration,
) -> Result<Answer> {
    let work = async {
        let mut sender = sender.clone().ready().await?;
        let end = body.is_empty();
        let (resp, mut stream) = sender.send_request(req, end)?;
        if !end {
            stream.send_data(body, true)?;
        }
        let resp = resp.await?;
        let (parts, mut recv) = resp.into_parts();
        let body = read_body(&mut recv, limit).await?;
        Ok::<_, anyhow::Error>(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| anyhow!("no answer within {deadline:?}"))?
}

/// Builds a request whose URI is only a path (HTTP/2 needs scheme and authority; we set
/// `https://ztm`, which both ends ignore).
pub fn build(method: http::Method, path: &str) -> Result<http::request::Builder> {
    let uri: http::Uri = format!("https://ztm{path}")
        .parse()
        .map_err(|e| anyhow!("bad path {path:?}: {e}"))?;
    Ok(Request::builder().method(method).uri(uri))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    async fn frame(io: &mut DuplexStream) -> (u8, u32, Vec<u8>) {
        let mut head = [0u8; 9];
        io.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut body = vec![0u8; len];
        io.read_exact(&mut body).await.unwrap();
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        (head[3], stream, body)
    }

    /// A client says it takes no pushes, and a server that pushes anyway has made a connection
    /// error (RFC 9113 §6.5.2, §8.4).
    #[tokio::test]
    async fn clients_refuse_server_push() {
        let (a, mut server) = tokio::io::duplex(64 * 1024);
        let (sender, conn) = client_builder().handshake::<_, Bytes>(a).await.unwrap();
        let driver = tokio::spawn(conn);
        let mut preface = [0u8; 24];
        server.read_exact(&mut preface).await.unwrap();
        let (kind, _, settings) = frame(&mut server).await;
        assert_eq!(kind, 4);
        let push: Vec<_> = settings
            .chunks(6)
            .filter(|s| s[..2] == [0, 2])
            .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
            .collect();
        assert_eq!(push, [0], "SETTINGS_ENABLE_PUSH = 0");
        server
            .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        let req = build(http::Method::GET, "/x").unwrap().body(()).unwrap();
        let mut ready = sender.ready().await.unwrap();
        let (resp, _) = ready.send_request(req, true).unwrap();
        let stream = loop {
            let (kind, stream, _) = frame(&mut server).await;
            if kind == 1 {
                break stream;
            }
        };
        // PUSH_PROMISE on the request's stream, promising stream 2 (GET /, https, authority a).
        let mut push = vec![0, 0, 10, 5, 4];
        push.extend_from_slice(&stream.to_be_bytes());
        push.extend_from_slice(&[0, 0, 0, 2, 0x82, 0x87, 0x84, 0x01, 0x01, b'a']);
        server.write_all(&push).await.unwrap();
        let goaway = async {
            loop {
                let (kind, _, body) = frame(&mut server).await;
                if kind == 7 {
                    break u32::from_be_bytes([body[4], body[5], body[6], body[7]]);
                }
            }
        };
        let code = tokio::time::timeout(Duration::from_secs(5), goaway)
            .await
            .expect("a GOAWAY for the push");
        assert_eq!(h2::Reason::from(code), h2::Reason::PROTOCOL_ERROR);
        assert!(resp.await.is_err());
        drop(server);
        let _ = driver.await;
    }
}
