//! Closing an HTTP/2 connection with a reason, and hearing the peer's (RFC 9113 §6.8).
//!
//! The `h2` crate closes a server connection with a GOAWAY that carries no debug data, has no
//! way at all to close a client connection while streams are open, and tells its user nothing
//! of a GOAWAY it received with `NO_ERROR`. [`Goaway`] sits between h2 and the byte stream it
//! drives and follows the frames that pass both ways (their 9-byte headers: payloads are
//! skipped, except those of GOAWAY frames), so that:
//!
//! - when told to ([`Farewell::close`]), it writes one GOAWAY frame with a code and a debug text
//!   after what h2 has queued: at h2's next flush, where h2 has written whole frames only, so
//!   never inside one of them. Its last-stream-id is no higher than that of a GOAWAY h2 sent
//!   before it (RFC 9113 allows several), and otherwise the highest stream the peer opened. It
//!   then ends the stream below (TLS `close_notify`), drops whatever h2 writes after it, lets h2
//!   read the rest of the frame it is in, reads and drops what the peer still sends until the
//!   peer closes (closing a socket with unread bytes resets it, and the peer could lose the
//!   GOAWAY), and tells h2 the connection ended; h2 then fails what is still open on it and
//!   finishes cleanly. Callers bound that wait (the peer may never close).
//! - the last GOAWAY the peer sent is kept, debug text included ([`Farewell::heard`]).
//!
//! PROTOCOL.md ("Closing connections") lists the codes and texts ZTM sends.

use std::fmt;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use h2::Reason;
use parking_lot::{Mutex, MutexGuard};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 §3.4) that precedes the client's first frame.
const PREFACE_LEN: usize = 24;
const HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_GOAWAY: u8 = 0x7;
/// Longest debug text sent or kept.
pub const MAX_TEXT: usize = 256;

/// What one side said when it closed a connection: a GOAWAY's error code and debug text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Goodbye {
    pub code: Reason,
    pub text: String,
}

impl Goodbye {
    pub fn new(code: Reason, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
        }
    }
}

impl fmt::Display for Goodbye {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text.is_empty() {
            write!(f, "{:?}", self.code)
        } else {
            write!(f, "{} ({:?})", self.text, self.code)
        }
    }
}

/// Which side of the HTTP/2 connection we are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

#[derive(Default)]
struct Shared {
    /// Set once `say` is: read without the lock on every I/O call.
    asked: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    say: Option<Goodbye>,
    heard: Option<Goodbye>,
    /// The task driving the connection, woken when `say` is set.
    waker: Option<Waker>,
}

/// The handle of a [`Goaway`] stream: closes its connection with a reason, and tells what the
/// peer said when it closed.
#[derive(Clone, Default)]
pub struct Farewell(Arc<Shared>);

impl Farewell {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.state.lock()
    }

    /// Closes the connection with a GOAWAY saying `bye`. The first call decides what is said;
    /// later ones change nothing and return false.
    pub fn close(&self, bye: Goodbye) -> bool {
        let waker = {
            let mut state = self.lock();
            if state.say.is_some() {
                return false;
            }
            state.say = Some(bye);
            self.0.asked.store(true, Ordering::Release);
            state.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// What we said, if we closed the connection.
    pub fn said(&self) -> Option<Goodbye> {
        self.lock().say.clone()
    }

    /// What the peer said in the last GOAWAY it sent, if it sent one.
    pub fn heard(&self) -> Option<Goodbye> {
        self.lock().heard.clone()
    }
}

/// Follows the frames of one direction of a connection.
struct Frames {
    /// Bytes of the client preface still to pass.
    preface: usize,
    head: [u8; HEADER_LEN],
    /// Header bytes of the current frame seen; a whole header means its payload is passing.
    have: usize,
    /// Payload bytes of the current frame still to pass.
    left: usize,
    kind: u8,
    stream: u32,
    /// The start of a GOAWAY's payload (last-stream-id, code, debug text).
    body: Vec<u8>,
}

impl Frames {
    fn new(preface: bool) -> Self {
        Self {
            preface: if preface { PREFACE_LEN } else { 0 },
            head: [0; HEADER_LEN],
            have: 0,
            left: 0,
            kind: 0,
            stream: 0,
            body: Vec::new(),
        }
    }

    /// Between two frames: nothing of a frame has passed without the rest.
    fn at_boundary(&self) -> bool {
        self.preface == 0 && self.have == 0
    }

    /// Bytes until the end of the current frame header, or of the current frame's payload.
    fn rest(&self) -> usize {
        if self.preface > 0 {
            self.preface
        } else if self.have < HEADER_LEN {
            HEADER_LEN - self.have
        } else {
            self.left
        }
    }

    /// Follows `bytes`; `seen(type, stream, body)` is called for each frame completed, `body`
    /// holding the start of its payload if it is a GOAWAY (empty otherwise).
    fn feed(&mut self, mut bytes: &[u8], seen: &mut impl FnMut(u8, u32, &[u8])) {
        while !bytes.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len());
                self.preface -= n;
                bytes = &bytes[n..];
            } else if self.have < HEADER_LEN {
                let n = (HEADER_LEN - self.have).min(bytes.len());
                self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == HEADER_LEN {
                    let h = &self.head;
                    self.left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    self.kind = h[3];
                    self.stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    self.body.clear();
                    if self.left == 0 {
                        self.finish(seen);
                    }
                }
            } else {
                let n = self.left.min(bytes.len());
                if self.kind == TYPE_GOAWAY {
                    let room = (8 + MAX_TEXT).saturating_sub(self.body.len());
                    self.body.extend_from_slice(&bytes[..n.min(room)]);
                }
                self.left -= n;
                bytes = &bytes[n..];
                if self.left == 0 {
                    self.finish(seen);
                }
            }
        }
    }

    fn finish(&mut self, seen: &mut impl FnMut(u8, u32, &[u8])) {
        seen(self.kind, self.stream, &self.body);
        self.have = 0;
    }
}

/// A GOAWAY frame on stream 0.
fn goaway_frame(last_stream: u32, bye: &Goodbye) -> Vec<u8> {
    let mut end = bye.text.len().min(MAX_TEXT);
    while !bye.text.is_char_boundary(end) {
        end -= 1;
    }
    let text = &bye.text.as_bytes()[..end];
    let len = 8 + text.len();
    let mut frame = Vec::with_capacity(HEADER_LEN + len);
    frame.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(&[TYPE_GOAWAY, 0, 0, 0, 0, 0]);
    frame.extend_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    frame.extend_from_slice(&u32::from(bye.code).to_be_bytes());
    frame.extend_from_slice(text);
    frame
}

/// The code and text of a GOAWAY payload (text made printable).
fn parse_goaway(body: &[u8]) -> Option<Goodbye> {
    let code = u32::from_be_bytes(body.get(4..8)?.try_into().ok()?);
    let text: String = String::from_utf8_lossy(&body[8..])
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    Some(Goodbye::new(Reason::from(code), text))
}

/// Where our own GOAWAY is.
enum Out {
    /// Not asked to close: h2's bytes pass.
    Open,
    /// Writing our GOAWAY frame (how much of it is written).
    Sending(Vec<u8>, usize),
    /// Ending the stream below after it.
    Ending,
    /// Our GOAWAY is out and the stream ended: h2's writes are dropped.
    Done,
}

/// A byte stream for h2 that can close its connection with a GOAWAY of our own (see the
/// module's documentation).
pub struct Goaway<T> {
    io: T,
    shared: Farewell,
    role: Role,
    tx: Frames,
    rx: Frames,
    /// The highest stream the peer opened.
    peer_last: u32,
    /// The lowest last-stream-id of the GOAWAY frames h2 wrote.
    h2_last: Option<u32>,
    out: Out,
    /// Whether a read woke the task once for a close it may have missed.
    kicked: bool,
}

/// Wraps `io`, to be driven by h2 in `role`; the handle closes it.
pub fn wrap<T>(io: T, role: Role) -> (Goaway<T>, Farewell) {
    let shared = Farewell::default();
    (wrap_with(io, role, shared.clone()), shared)
}

/// Like [`wrap`], with a handle made before the stream was (for a connection whose HTTP/2
/// starts later than the handle is needed).
pub fn wrap_with<T>(io: T, role: Role, shared: Farewell) -> Goaway<T> {
    Goaway {
        io,
        shared: shared.clone(),
        role,
        tx: Frames::new(role == Role::Client),
        rx: Frames::new(role == Role::Server),
        peer_last: 0,
        h2_last: None,
        out: Out::Open,
        kicked: false,
    }
}

impl<T> Goaway<T> {
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Starts our GOAWAY if we were asked to and h2 is between two frames (it always is when it
    /// flushes or shuts down, where this is called).
    fn maybe_start(&mut self) {
        if !matches!(self.out, Out::Open)
            || !self.shared.0.asked.load(Ordering::Acquire)
            || !self.tx.at_boundary()
        {
            return;
        }
        if let Some(bye) = self.shared.said() {
            let last = self
                .h2_last
                .map_or(self.peer_last, |l| l.min(self.peer_last));
            self.out = Out::Sending(goaway_frame(last, &bye), 0);
        }
    }

    fn saw_written(&mut self, bytes: &[u8]) {
        let h2_last = &mut self.h2_last;
        self.tx.feed(bytes, &mut |kind, _, body| {
            if kind == TYPE_GOAWAY && body.len() >= 4 {
                let last = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) & 0x7fff_ffff;
                *h2_last = Some(h2_last.map_or(last, |l| l.min(last)));
            }
        });
    }

    fn saw_read(&mut self, bytes: &[u8]) {
        let (peer_last, shared, role) = (&mut self.peer_last, &self.shared, self.role);
        self.rx.feed(bytes, &mut |kind, stream, body| {
            let theirs = match role {
                Role::Server => stream % 2 == 1,
                Role::Client => stream != 0 && stream % 2 == 0,
            };
            if kind == TYPE_HEADERS && theirs {
                *peer_last = (*peer_last).max(stream);
            } else if kind == TYPE_GOAWAY {
                if let Some(bye) = parse_goaway(body) {
                    shared.lock().heard = Some(bye);
                }
            }
        });
    }

    fn register(&self, cx: &Context<'_>) {
        let mut state = self.shared.lock();
        match &state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Goaway<T> {
    /// Moves our GOAWAY on: writes it, then ends the stream below. Ready once done (or when
    /// there is nothing to send).
    fn poll_farewell(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.out {
                Out::Open | Out::Done => return Poll::Ready(Ok(())),
                Out::Sending(frame, at) => {
                    while *at < frame.len() {
                        match ready!(Pin::new(&mut self.io).poll_write(cx, &frame[*at..])) {
                            Ok(0) => {
                                self.out = Out::Done;
                                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                            }
                            Ok(n) => *at += n,
                            Err(e) => {
                                self.out = Out::Done;
                                return Poll::Ready(Err(e));
                            }
                        }
                    }
                    self.out = Out::Ending;
                }
                Out::Ending => {
                    let ended = ready!(Pin::new(&mut self.io).poll_shutdown(cx));
                    self.out = Out::Done;
                    return Poll::Ready(ended);
                }
            }
        }
    }

    /// After our GOAWAY, while h2 has only part of a frame: passes on at most the rest of it.
    fn poll_rest_of_frame(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut scratch = [0u8; 4096];
        let want = self.rx.rest().min(scratch.len()).min(buf.remaining());
        let mut part = ReadBuf::new(&mut scratch[..want]);
        // Closed (an error): h2 sees the end.
        if let Ok(()) = ready!(Pin::new(&mut self.io).poll_read(cx, &mut part)) {
            let n = part.filled().len();
            self.saw_read(&scratch[..n]);
            buf.put_slice(&scratch[..n]);
        }
        Poll::Ready(Ok(()))
    }

    /// After our GOAWAY: reads and drops what the peer sends until it closes (closing a
    /// socket with unread bytes would reset it, and the peer could lose our GOAWAY), then
    /// tells h2 the connection ended.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut scratch = [0u8; 4096];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf)) {
                Ok(()) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Ok(()) => {
                    let n = buf.filled().len();
                    self.saw_read(&scratch[..n]);
                }
                // Closed either way.
                Err(_) => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Goaway<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !matches!(this.out, Out::Open) {
            // Errors of our own GOAWAY's writing end the connection all the same.
            let _ = ready!(this.poll_farewell(cx));
            if !this.rx.at_boundary() {
                // h2 has part of a frame: it gets the rest, and so sees the end between frames.
                return this.poll_rest_of_frame(cx, buf);
            }
            return this.poll_drain(cx);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.saw_read(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                this.register(cx);
                // Asked to close before the registration: h2 goes round once more, and its
                // flush at the end of the round sends our GOAWAY.
                if this.shared.0.asked.load(Ordering::Acquire) && !this.kicked {
                    this.kicked = true;
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Goaway<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !matches!(this.out, Out::Open) {
            // The connection is going away: what h2 still writes is dropped.
            let _ = ready!(this.poll_farewell(cx));
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let take = left.min(b.len());
            this.saw_written(&b[..take]);
            left -= take;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    /// h2 flushes at the end of every round of writing, so what it had queued (an answer
    /// sent just before the close, say) goes out before our GOAWAY.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.out, Out::Open) {
            ready!(Pin::new(&mut this.io).poll_flush(cx))?;
            this.maybe_start();
            if matches!(this.out, Out::Open) {
                return Poll::Ready(Ok(()));
            }
        }
        let sent = ready!(this.poll_farewell(cx));
        // h2 reads next: what the peer still sends is drained, then the end is passed on.
        cx.waker().wake_by_ref();
        Poll::Ready(sent)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.maybe_start();
        if matches!(this.out, Out::Open) {
            Pin::new(&mut this.io).poll_shutdown(cx)
        } else {
            this.poll_farewell(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;

    fn frames_of(bytes: &[u8], preface: bool, split: usize) -> Vec<(u8, u32, Vec<u8>)> {
        let mut f = Frames::new(preface);
        let mut out = vec![];
        for chunk in bytes.chunks(split) {
            f.feed(chunk, &mut |k, s, b| out.push((k, s, b.to_vec())));
        }
        assert!(f.at_boundary());
        out
    }

    #[test]
    fn frames_are_followed_however_the_bytes_are_split() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS (empty), HEADERS on stream 3 (5 bytes), GOAWAY.
        bytes.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 0, 5, 1, 4, 0, 0, 0, 3, 1, 2, 3, 4, 5]);
        let bye = Goodbye::new(Reason::NO_ERROR, "session replaced");
        bytes.extend_from_slice(&goaway_frame(3, &bye));
        for split in [1, 2, 7, 9, 10, 1000] {
            let frames = frames_of(&bytes, true, split);
            assert_eq!(frames.len(), 3, "split {split}");
            assert_eq!((frames[1].0, frames[1].1), (TYPE_HEADERS, 3));
            assert_eq!(frames[2].0, TYPE_GOAWAY);
            assert_eq!(parse_goaway(&frames[2].2), Some(bye.clone()));
            assert_eq!(&frames[2].2[..4], &[0, 0, 0, 3]);
        }
        let mut f = Frames::new(false);
        f.feed(&bytes[24..30], &mut |_, _, _| {});
        assert!(!f.at_boundary(), "inside a frame header");
        f.feed(&bytes[30..33], &mut |_, _, _| {});
        assert!(f.at_boundary());
        f.feed(&bytes[33..44], &mut |_, _, _| {});
        assert!(!f.at_boundary(), "inside a frame's payload");
    }

    #[test]
    fn texts_are_bounded_and_made_printable() {
        let long = Goodbye::new(Reason::PROTOCOL_ERROR, "é".repeat(MAX_TEXT));
        let frame = goaway_frame(0, &long);
        assert!(frame.len() <= HEADER_LEN + 8 + MAX_TEXT);
        let heard = parse_goaway(&frame[HEADER_LEN..]).unwrap();
        assert_eq!(heard.code, Reason::PROTOCOL_ERROR);
        assert_eq!(heard.text, "é".repeat(MAX_TEXT / 2));
        let evil = Goodbye::new(Reason::NO_ERROR, "a\u{1b}[2Jb");
        let heard = parse_goaway(&goaway_frame(0, &evil)[HEADER_LEN..]).unwrap();
        assert_eq!(heard.text, "a?[2Jb");
        assert_eq!(
            Goodbye::new(Reason::NO_ERROR, "session replaced").to_string(),
            "session replaced (NO_ERROR)"
        );
    }

    type Side = Goaway<tokio::io::DuplexStream>;

    /// A client and a server h2 connection over a duplex pipe of `capacity` bytes, each side
    /// wrapped; the server answers every request with `size` bytes of body.
    async fn pair(
        capacity: usize,
        size: usize,
    ) -> (
        h2::client::SendRequest<Bytes>,
        tokio::task::JoinHandle<Result<(), h2::Error>>,
        Farewell,
        tokio::task::JoinHandle<()>,
        Farewell,
    ) {
        let (a, b) = tokio::io::duplex(capacity);
        let (client_io, client_bye) = wrap(a, Role::Client);
        let (server_io, server_bye) = wrap(b, Role::Server);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake::<Side>(server_io).await.unwrap();
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                // A request that crossed the GOAWAY cannot be answered.
                let Ok(mut send) = respond.send_response(http::Response::new(()), false) else {
                    continue;
                };
                let body = Bytes::from(vec![7u8; size]);
                tokio::spawn(async move {
                    let _ = ztm_relay::send_all(&mut send, body).await;
                });
            }
        });
        let (sender, conn) = h2::client::handshake::<Side>(client_io).await.unwrap();
        let driver = tokio::spawn(conn);
        (sender, driver, client_bye, server, server_bye)
    }

    async fn get(sender: &h2::client::SendRequest<Bytes>) -> h2::client::ResponseFuture {
        let mut sender = sender.clone().ready().await.unwrap();
        let req = http::Request::get("https://ztm/x").body(()).unwrap();
        sender.send_request(req, true).unwrap().0
    }

    #[tokio::test]
    async fn a_server_closes_with_a_reason_the_client_hears() {
        let (sender, driver, client_bye, server, server_bye) = pair(64 * 1024, 10).await;
        let resp = get(&sender).await.await.unwrap();
        assert_eq!(resp.status(), 200);
        let bye = Goodbye::new(Reason::NO_ERROR, "session replaced");
        assert!(server_bye.close(bye.clone()));
        assert!(!server_bye.close(Goodbye::new(Reason::CANCEL, "other")));
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server's connection ends")
            .unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), driver)
            .await
            .expect("the client's connection ends")
            .unwrap();
        assert!(ended.is_ok(), "{ended:?}");
        assert_eq!(client_bye.heard(), Some(bye.clone()));
        assert_eq!(server_bye.said(), Some(bye));
        assert_eq!(server_bye.heard(), None);
    }

    /// An answer sent just before the close goes out before the GOAWAY.
    #[tokio::test]
    async fn what_was_answered_before_the_close_arrives() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (client_io, client_bye) = wrap(a, Role::Client);
        let (server_io, server_bye) = wrap(b, Role::Server);
        let bye = Goodbye::new(Reason::INADEQUATE_SECURITY, "certificate revoked");
        let said = bye.clone();
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake::<Side>(server_io).await.unwrap();
            let (_req, mut respond) = conn.accept().await.unwrap().unwrap();
            let resp = http::Response::builder().status(403).body(()).unwrap();
            let mut send = respond.send_response(resp, false).unwrap();
            send.send_data(Bytes::from_static(b"revoked"), true)
                .unwrap();
            server_bye.close(said);
            while conn.accept().await.is_some() {}
        });
        let (sender, conn) = h2::client::handshake::<Side>(client_io).await.unwrap();
        let driver = tokio::spawn(conn);
        let resp = get(&sender).await.await.unwrap();
        assert_eq!(resp.status(), 403);
        let mut body = resp.into_body();
        assert_eq!(body.data().await.unwrap().unwrap(), "revoked");
        let ended = tokio::time::timeout(Duration::from_secs(5), driver)
            .await
            .expect("the client's connection ends")
            .unwrap();
        assert!(ended.is_err(), "h2 reports a GOAWAY with an error code");
        assert_eq!(client_bye.heard(), Some(bye));
        server.await.unwrap();
    }

    /// The client side of h2 has no call that closes a connection with streams open; the
    /// wrapper does it, in the middle of a large response whose frames cross the small pipe
    /// in pieces: the GOAWAY never lands inside one of them (the server's h2 would see a
    /// malformed frame and say so with a GOAWAY of its own).
    #[tokio::test]
    async fn a_client_closes_between_frames_while_data_flows() {
        let (sender, driver, client_bye, server, server_bye) = pair(1000, 4 << 20).await;
        let mut body = get(&sender).await.await.unwrap().into_body();
        let mut got = 0;
        while got < 100_000 {
            let chunk = body.data().await.unwrap().unwrap();
            got += chunk.len();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        // A request in flight when the GOAWAY goes fails.
        let pending = get(&sender).await;
        let bye = Goodbye::new(Reason::PROTOCOL_ERROR, "extended CONNECT not enabled");
        client_bye.close(bye.clone());
        let ended = tokio::time::timeout(Duration::from_secs(5), driver)
            .await
            .expect("the client's connection ends")
            .unwrap();
        assert!(ended.is_ok(), "{ended:?}");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server's connection ends")
            .unwrap();
        assert_eq!(server_bye.heard(), Some(bye));
        let _ = pending.await;
        while let Some(chunk) = body.data().await {
            if chunk.is_err() {
                break;
            }
        }
    }

    /// A GOAWAY after one h2 sent never raises its last-stream-id.
    #[tokio::test]
    async fn the_last_stream_id_never_increases() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (server_io, server_bye) = wrap(b, Role::Server);
        let (seen_tx, mut seen_rx) = tokio::sync::oneshot::channel::<()>();
        let mut seen_tx = Some(seen_tx);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake::<Side>(server_io).await.unwrap();
            let (_req, mut respond) = conn.accept().await.unwrap().unwrap();
            respond
                .send_response(http::Response::new(()), true)
                .unwrap();
            conn.graceful_shutdown();
            // h2 sends GOAWAY(2^31-1) and a PING (this client never answers it); once the
            // client has it, ours goes out and says 1, the stream the client opened.
            loop {
                tokio::select! {
                    _ = &mut seen_rx => break,
                    next = conn.accept() => if next.is_none() { break },
                }
            }
            server_bye.close(Goodbye::new(Reason::NO_ERROR, "bye"));
            while conn.accept().await.is_some() {}
        });
        // The client: raw frames, to see every GOAWAY.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut a = a;
        a.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        a.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
        // HEADERS on stream 1: :method GET, :scheme https, :path /, :authority a.
        a.write_all(&[
            0, 0, 6, 1, 5, 0, 0, 0, 1, 0x82, 0x87, 0x84, 0x01, 0x01, b'a',
        ])
        .await
        .unwrap();
        let mut buf = [0u8; 4096];
        let mut frames = Frames::new(false);
        let mut goaways = vec![];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            if n == 0 {
                break;
            }
            frames.feed(&buf[..n], &mut |kind, _, body| {
                if kind == TYPE_GOAWAY {
                    goaways.push(body.to_vec());
                }
            });
            if !goaways.is_empty() {
                if let Some(tx) = seen_tx.take() {
                    let _ = tx.send(());
                }
            }
        }
        drop(a);
        server.await.unwrap();
        let last: Vec<u32> = goaways
            .iter()
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert!(last.len() >= 2, "{last:?}");
        assert!(last.windows(2).all(|w| w[1] <= w[0]), "{last:?}");
        assert_eq!(last.last(), Some(&1));
        let ours = parse_goaway(goaways.last().unwrap()).unwrap();
        assert_eq!(ours.text, "bye");
    }
}
