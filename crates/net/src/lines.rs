//! The control connection before its HTTP/2 starts (PROTOCOL.md, "Control connection on
//! demand", ALPN `ztm-control-on-demand`): JSON lines, each request answered by one line, until
//! the agent sends HTTP/2's connection preface.
//!
//! [`LineReader`] reads whole chunks, so a connection keeps no buffer between lines beyond a
//! small one to read into, and its reads can be raced against other events: bytes read are
//! never lost when a read is dropped.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use ztm_proto::wire::{ControlLine, LineAnswer, REQUEST_TIMEOUT};

use crate::on_demand::write_line;

/// What a read buffer holds room for while it waits.
const READ_CHUNK: usize = 256;

/// What came next on the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A whole line, without its `\n`.
    Line(Bytes),
    /// The first bytes of HTTP/2's connection preface (`PRI * HTTP/2.0…`): what follows is
    /// HTTP/2, starting with what [`LineReader::into_rest`] holds.
    Preface,
    /// More than the longest line allowed without a `\n`.
    TooLong,
}

/// Reads lines of a byte stream, keeping what it read past the last one.
#[derive(Debug, Default)]
pub struct LineReader {
    buf: BytesMut,
}

impl LineReader {
    pub fn new() -> Self {
        LineReader::default()
    }

    /// Reads what has arrived: how many bytes (0 at the end of the stream). Dropping it before
    /// it finishes loses nothing.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> io::Result<usize> {
        let want = self.buf.len().clamp(READ_CHUNK, 64 << 10);
        self.buf.reserve(want);
        io.read_buf(&mut self.buf).await
    }

    /// The next thing in what was read: a whole line, the HTTP/2 preface (bytes that cannot
    /// start a JSON line but start the preface), a line longer than `max` bytes with its `\n`,
    /// or `None` while a line is still partial.
    pub fn next(&mut self, max: usize) -> Option<Next> {
        if self.buf.first() == Some(&b'P') {
            return Some(Next::Preface);
        }
        match self.buf.iter().position(|b| *b == b'\n') {
            Some(end) if end < max => {
                let mut line = self.buf.split_to(end + 1);
                line.truncate(end);
                if self.buf.is_empty() {
                    // Nothing kept while the connection waits for its next line.
                    self.buf = BytesMut::new();
                }
                Some(Next::Line(line.freeze()))
            }
            Some(_) => Some(Next::TooLong),
            None if self.buf.len() >= max => Some(Next::TooLong),
            None => None,
        }
    }

    /// How many bytes are read and not yet taken.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The bytes read and not taken as lines.
    pub fn into_rest(self) -> Bytes {
        self.buf.freeze()
    }

    /// Reads the next line, the preface or the end (`None`).
    pub async fn read<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        max: usize,
    ) -> io::Result<Option<Next>> {
        loop {
            if let Some(next) = self.next(max) {
                return Ok(Some(next));
            }
            if self.fill(io).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// Why a request line got no answer to act on.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("the hub did not answer within {REQUEST_TIMEOUT:?}")]
    Timeout,
    /// The hub closed the connection, saying why (its `closing` line).
    #[error("the hub closed the connection: {0}")]
    Closed(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl AskError {
    /// The hub's closing line as an error.
    pub fn closed(answer: &LineAnswer) -> AskError {
        let why = answer.message.as_deref().unwrap_or("no reason given");
        AskError::Closed(why.to_string())
    }
}

/// An agent's request on a control connection before its HTTP/2 starts, and the hub's answer
/// (at most `max` bytes; a CRL can be large) within [`REQUEST_TIMEOUT`]. The hub's closing
/// line is an error.
pub async fn ask<S>(
    io: &mut S,
    reader: &mut LineReader,
    request: &ControlLine,
    max: usize,
) -> Result<LineAnswer, AskError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let exchange = async {
        write_line(io, request).await?;
        read_answer(io, reader, max).await
    };
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| AskError::Timeout)??;
    if answer.closing {
        return Err(AskError::closed(&answer));
    }
    Ok(answer)
}

/// The hub's next line.
pub async fn read_answer<S>(
    io: &mut S,
    reader: &mut LineReader,
    max: usize,
) -> io::Result<LineAnswer>
where
    S: AsyncRead + Unpin,
{
    let bad = |words: String| io::Error::new(io::ErrorKind::InvalidData, words);
    match reader.read(io, max).await? {
        Some(Next::Line(line)) => serde_json::from_slice(&line).map_err(|e| {
            bad(format!(
                "the hub answered with a line that is not an answer: {e}"
            ))
        }),
        Some(Next::Preface) => Err(bad(
            "the hub answered with something that is not a line".into()
        )),
        Some(Next::TooLong) => Err(bad(format!(
            "the hub answered with a line over {max} bytes"
        ))),
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the hub closed the connection",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn lines_preface_and_bounds() {
        let cases: [(&[u8], usize, Option<Next>, usize); 7] = [
            (
                b"{\"a\":1}\n{\"b\"",
                64,
                Some(Next::Line(Bytes::from_static(b"{\"a\":1}"))),
                4,
            ),
            (b"{\"a\":1", 64, None, 6),
            (b"PRI * HTTP/2.0\r\n", 64, Some(Next::Preface), 16),
            (b"P", 64, Some(Next::Preface), 1),
            (b"0123456789\n", 10, Some(Next::TooLong), 11),
            (b"0123456789", 10, Some(Next::TooLong), 10),
            (
                b"012345678\n",
                10,
                Some(Next::Line(Bytes::from_static(b"012345678"))),
                0,
            ),
        ];
        for (input, max, want, left) in cases {
            let mut r = LineReader {
                buf: BytesMut::from(input),
            };
            assert_eq!(r.next(max), want, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(r.buffered(), left, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[tokio::test]
    async fn reads_lines_in_pieces_and_gives_back_the_rest() {
        let (mut a, mut b) = tokio::io::duplex(16);
        let writer = tokio::spawn(async move {
            a.write_all(b"{\"status\":204}\n").await.unwrap();
            a.write_all(b"{\"status\":200,\"message\":\"a longer line\"}\nPRI * HTTP/2.0")
                .await
                .unwrap();
        });
        let mut r = LineReader::new();
        assert_eq!(read_answer(&mut b, &mut r, 1024).await.unwrap().status, 204);
        let second = read_answer(&mut b, &mut r, 1024).await.unwrap();
        assert_eq!(second.message.as_deref(), Some("a longer line"));
        writer.await.unwrap();
        assert_eq!(r.read(&mut b, 1024).await.unwrap(), Some(Next::Preface));
        let mut rest = r.into_rest().to_vec();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"PRI * HTTP/2.0");
    }

    #[tokio::test]
    async fn the_end_and_a_cut_line() {
        let (a, mut b) = tokio::io::duplex(16);
        drop(a);
        assert_eq!(LineReader::new().read(&mut b, 64).await.unwrap(), None);
        let (mut a, mut b) = tokio::io::duplex(16);
        a.write_all(b"{\"sta").await.unwrap();
        drop(a);
        let err = LineReader::new().read(&mut b, 64).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
