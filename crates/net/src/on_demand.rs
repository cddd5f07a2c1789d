//! The reverse connection whose HTTP/2 starts on demand (PROTOCOL.md, "Reverse connection",
//! ALPN `ztm-reverse-on-demand`): the agent's hello line and the hub's answer line before any
//! HTTP/2, and the byte stream that hands HTTP/2 the first bytes the agent read while it waited
//! for the hub's first request.
//!
//! Lines are read a byte at a time so that nothing after the line is taken from the stream: the
//! hub's HTTP/2 preface may follow its answer at once.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use ztm_proto::wire::{Hello, ReverseAnswer, REQUEST_TIMEOUT};

/// The longest hello or answer line, its `\n` included.
pub const LINE_MAX: usize = 4096;

/// Reads one line ending in `\n` (at most [`LINE_MAX`] bytes) and parses it as JSON.
pub async fn read_line<R, T>(io: &mut R) -> io::Result<T>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut line = Vec::with_capacity(256);
    loop {
        let byte = io.read_u8().await?;
        if byte == b'\n' {
            break;
        }
        if line.len() + 1 >= LINE_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a line longer than {LINE_MAX} bytes"),
            ));
        }
        line.push(byte);
    }
    serde_json::from_slice(&line)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("not a JSON line: {e}")))
}

/// Writes `value` as one JSON line and flushes it.
pub async fn write_line<W, T>(io: &mut W, value: &T) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    io.write_all(&line).await?;
    io.flush().await
}

/// Writes `value` as the last line of a connection and ends it (TLS `close_notify`), giving up
/// after `within`.
pub async fn last_line<W, T>(io: &mut W, value: &T, within: std::time::Duration)
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let _ = tokio::time::timeout(within, async {
        write_line(io, value).await?;
        io.shutdown().await
    })
    .await;
}

/// Why a hub did not take an agent's on-demand reverse connection.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("the hub refused the reverse connection ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the hub did not answer the reverse connection's hello within {REQUEST_TIMEOUT:?}")]
    Timeout,
    #[error("the reverse connection's hello failed: {0}")]
    Io(#[from] io::Error),
}

/// The agent's side: says `hello` and waits for the hub's answer.
pub async fn say_hello<S>(io: &mut S, hello: &Hello) -> Result<(), HelloError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let exchange = async {
        write_line(io, hello).await?;
        read_line::<_, ReverseAnswer>(io).await
    };
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| HelloError::Timeout)??;
    if answer.status == 200 {
        Ok(())
    } else {
        Err(HelloError::Refused {
            status: answer.status,
            message: answer.message.unwrap_or_default(),
        })
    }
}

/// The agent's side, once bound: waits for the hub's first bytes (its HTTP/2 preface) and
/// returns the stream with them put back in front. `None` if the hub closed it first.
pub async fn await_first_bytes<S>(mut io: S) -> Option<Prefixed<S>>
where
    S: AsyncRead + Unpin,
{
    let mut first = vec![0u8; 64];
    match io.read(&mut first).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            first.truncate(n);
            Some(Prefixed {
                prefix: Bytes::from(first),
                io,
            })
        }
    }
}

/// A byte stream with bytes already read from it put back in front.
pub struct Prefixed<S> {
    prefix: Bytes,
    io: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, io: S) -> Self {
        Prefixed { prefix, io }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Keeps an idle TCP connection known to middleboxes, and finds a peer that vanished: a probe
/// after 30 s of silence, then every 10 s, and the connection ends after 3 unanswered. A
/// dormant reverse connection carries no bytes at all, so this is all that keeps it alive.
pub fn keepalive(tcp: &tokio::net::TcpStream) -> io::Result<()> {
    use std::time::Duration;
    let params = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    socket2::SockRef::from(tcp).set_tcp_keepalive(&params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_line_is_read_without_what_follows_it() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"{\"status\":200}\nPRI * HTTP/2.0")
            .await
            .unwrap();
        let answer: ReverseAnswer = read_line(&mut b).await.unwrap();
        assert_eq!(answer.status, 200);
        let mut rest = [0u8; 3];
        b.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"PRI");
    }

    #[tokio::test]
    async fn bad_lines_are_errors() {
        let long = vec![b'x'; LINE_MAX + 10];
        let cases: [(&[u8], io::ErrorKind); 3] = [
            (&long, io::ErrorKind::InvalidData),
            (b"not json\n", io::ErrorKind::InvalidData),
            (b"{\"status\":", io::ErrorKind::UnexpectedEof),
        ];
        for (input, kind) in cases {
            let (mut a, mut b) = tokio::io::duplex(LINE_MAX * 2);
            a.write_all(input).await.unwrap();
            drop(a);
            let err = read_line::<_, ReverseAnswer>(&mut b).await.unwrap_err();
            assert_eq!(err.kind(), kind, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[tokio::test]
    async fn the_hello_is_refused_with_the_hubs_words() {
        let (mut agent, mut hub) = tokio::io::duplex(1024);
        let hub = tokio::spawn(async move {
            let hello: Hello = read_line(&mut hub).await.unwrap();
            let answer = ReverseAnswer::refused(400, format!("no session {}", hello.session));
            write_line(&mut hub, &answer).await.unwrap();
        });
        let hello = Hello {
            endpoint: "e".into(),
            session: "s1".into(),
        };
        let err = say_hello(&mut agent, &hello).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "the hub refused the reverse connection (400): no session s1"
        );
        hub.await.unwrap();
    }

    #[tokio::test]
    async fn first_bytes_are_given_back() {
        let (mut hub, agent) = tokio::io::duplex(1024);
        hub.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let mut io = await_first_bytes(agent).await.unwrap();
        hub.write_all(b"\r\nSM\r\n\r\n").await.unwrap();
        let mut preface = [0u8; 24];
        io.read_exact(&mut preface).await.unwrap();
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let (hub, agent) = tokio::io::duplex(8);
        drop(hub);
        let closed = await_first_bytes(agent).await;
        assert!(closed.is_none());
    }
}
