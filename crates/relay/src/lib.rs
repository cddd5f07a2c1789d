//! Moving tunnel bytes: between a socket and an HTTP/2 stream (agents) and between two HTTP/2
//! streams (hub). Memory per tunnel is bounded: data is read from a source only when the
//! destination has flow-control capacity, and window is released to the sender only after the
//! bytes were written on. A [`StallGuard`] resets tunnels whose next hop stopped taking bytes
//! once a process holds too much for them.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};
use ztm_proto::wire::{STALL_AFTER, STALL_LIMIT, STALL_MIN};

/// Largest socket read, and so the largest DATA payload we hand to h2 at once.
pub const READ_SIZE: usize = 64 * 1024;

/// A tunnel's first socket read. Reads double, up to [`READ_SIZE`], while they come back
/// full: a bulk transfer soon reads 64 KiB at a time, while idle and chatty tunnels keep a
/// small buffer (an agent may hold thousands of them).
pub const FIRST_READ: usize = 4 * 1024;

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

/// Sends `data`, waiting for capacity so that h2 never buffers more than the window allows.
pub async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> io::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(h2_io(e)),
            None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")),
        };
        if cap == 0 {
            continue;
        }
        let chunk = data.split_to(cap.min(data.len()));
        send.send_data(chunk, false).map_err(h2_io)?;
    }
    Ok(())
}

/// Queues `data` on a stream without waiting for capacity, so that a stream still being
/// opened sends its HEADERS and this DATA in one write. For small, bounded amounts only (the
/// first bytes of a tunnel): h2 holds them until the window allows.
pub fn send_eager(send: &mut SendStream<Bytes>, data: Bytes) -> io::Result<()> {
    // An empty DATA frame carries nothing and counts against the peer's patience (h2 ends a
    // connection that receives too many).
    if data.is_empty() {
        return Ok(());
    }
    send.send_data(data, false).map_err(h2_io)
}

/// Sends one datagram (capsule) if the stream has room for it now; otherwise drops it and
/// returns `false`, as a congested UDP path would. A flow never waits here, so it keeps taking
/// DATA off its own stream: two flow ends that each waited for the other to read would stall,
/// and unread small frames would end the connection (see [`Backlog`]).
///
/// Room is asked for this datagram only (beyond what the stream has queued), so an idle flow
/// holds none of the connection's window: flows that each kept a reserve would take it all
/// between them, and the flows beyond could send nothing. What a flow may queue is bounded by
/// its stream's window.
pub fn send_datagram(send: &mut SendStream<Bytes>, capsule: Bytes) -> io::Result<bool> {
    if send.capacity() < capsule.len() {
        send.reserve_capacity(capsule.len());
    }
    if send.capacity() < capsule.len() {
        return Ok(false);
    }
    send.send_data(capsule, false).map_err(h2_io)?;
    Ok(true)
}

/// Most first bytes of a tunnel queued eagerly (see [`send_eager`]): what agent A sends with its
/// CONNECT, and what the hub passes on while the far end is still opening.
pub const EAGER_BYTES: usize = 16 * 1024;

/// Counters a relay adds the bytes it moves to as it moves them (a port's figures, the whole
/// agent's), so that a tunnel's bytes show while it is open. One relaxed atomic add each per
/// chunk read or written: no lock, nothing the relay waits for. Empty: nothing counted.
pub type Meter<'a> = &'a [&'a AtomicU64];

/// Adds `n` bytes to every counter of `meter`: for bytes moved outside this crate's relays
/// (UDP flows' datagrams, a tunnel's first bytes sent with its CONNECT).
pub fn count(meter: Meter<'_>, n: usize) {
    for counter in meter {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The counters of both directions of a [`pump`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Meters<'a> {
    /// Bytes read from the socket and handed on to the stream.
    pub sent: Meter<'a>,
    /// Bytes taken off the stream and written to the socket.
    pub received: Meter<'a>,
}

/// Copies a reader into an h2 stream until EOF, then ends the stream (half-close). Each chunk
/// counts in `meter` once h2 has taken it.
pub async fn read_to_h2<R: AsyncRead + Unpin>(
    r: &mut R,
    send: &mut SendStream<Bytes>,
    meter: Meter<'_>,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut size = FIRST_READ;
    let mut buf = BytesMut::new();
    loop {
        if buf.capacity() < size / 4 {
            buf.reserve(size);
        }
        let room = buf.capacity();
        let n = r.read_buf(&mut buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        if n == room {
            size = (size * 2).min(READ_SIZE);
        }
        total += n as u64;
        send_all(send, buf.split().freeze()).await?;
        count(meter, n);
    }
}

/// Keeps a process's memory bounded when tunnel readers stop reading, without letting such
/// tunnels hold up the others.
///
/// A relay releases HTTP/2 window only for bytes its next hop took, so a tunnel whose reader
/// stopped holds up to a stream window per hop. Every relay of a process adds what it holds
/// here. While the total is over the limit, a tunnel that holds at least [`STALL_MIN`] and
/// whose next hop took nothing for a whole period is reset; tunnels that move, however
/// slowly, are left alone. The connection window is several times the limit, so stalled
/// tunnels are reset long before they could fill it (PROTOCOL.md, "Stalled tunnels").
#[derive(Debug)]
pub struct StallGuard {
    held: AtomicUsize,
    /// Tunnels reset so far.
    reset_total: std::sync::atomic::AtomicU64,
    resets: Mutex<ResetLog>,
    limit: usize,
    after: Duration,
}

impl Default for StallGuard {
    fn default() -> Self {
        StallGuard::new(STALL_LIMIT, STALL_AFTER)
    }
}

impl StallGuard {
    /// A guard that resets stalled tunnels while its relays hold more than `limit` bytes and
    /// counts a tunnel as stalled after `after` (at least a millisecond) without progress.
    pub fn new(limit: usize, after: Duration) -> StallGuard {
        StallGuard {
            held: AtomicUsize::new(0),
            reset_total: std::sync::atomic::AtomicU64::new(0),
            resets: Mutex::new(ResetLog::default()),
            limit,
            after: after.max(Duration::from_millis(1)),
        }
    }

    /// Stalled tunnels reset so far.
    pub fn resets(&self) -> u64 {
        self.reset_total.load(Ordering::Relaxed)
    }

    /// Bytes the relays hold right now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Counts a reset at `now`. Some(n) when it is to be logged, `n` being the resets not
    /// logged since the last warning; resets are logged at most once per [`RESET_LOG_EVERY`],
    /// so that many tunnels stalling at once cannot flood the log.
    fn note_reset(&self, now: Instant) -> Option<u64> {
        self.reset_total.fetch_add(1, Ordering::Relaxed);
        let mut log = self.resets.lock();
        if log.last.is_some_and(|last| now < last + RESET_LOG_EVERY) {
            log.unlogged += 1;
            return None;
        }
        log.last = Some(now);
        Some(std::mem::take(&mut log.unlogged))
    }

    fn add(&self, n: usize) {
        self.held.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Stalled-tunnel resets are logged at most once per this period.
pub const RESET_LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct ResetLog {
    last: Option<Instant>,
    unlogged: u64,
}

/// Should a tunnel that holds `mine` bytes be reset, when its next hop took nothing during the
/// last period (`moved` false) and the process holds `total`?
fn must_reset(total: usize, limit: usize, mine: usize, moved: bool) -> bool {
    !moved && mine >= STALL_MIN && total > limit
}

/// One direction of a relay, watched for a stall while it waits on its next hop.
struct StallWatch<'a> {
    guard: &'a StallGuard,
    /// Fires at the end of each period; armed the first time the relay waits holding
    /// [`STALL_MIN`] or more.
    timer: Option<Pin<Box<Sleep>>>,
    /// Bytes written on when the period began.
    mark: u64,
}

impl<'a> StallWatch<'a> {
    fn new(guard: &'a StallGuard) -> StallWatch<'a> {
        StallWatch {
            guard,
            timer: None,
            mark: 0,
        }
    }

    /// Called when the relay is about to wait on its next hop, holding `held` bytes and
    /// having written `written` so far. Ready with the error to end the tunnel with once it
    /// must be reset.
    fn poll_stalled(&mut self, cx: &mut Context<'_>, held: usize, written: u64) -> Poll<io::Error> {
        if held < STALL_MIN {
            return Poll::Pending;
        }
        let after = self.guard.after;
        if self.timer.is_none() {
            self.mark = written;
        }
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
        while timer.as_mut().poll(cx).is_ready() {
            let total = self.guard.held();
            if must_reset(total, self.guard.limit, held, written != self.mark) {
                let why = format!(
                    "tunnel stalled: its next hop took nothing for {after:?} while {} MiB \
                     waited for such hops (limit {} MiB)",
                    total >> 20,
                    self.guard.limit >> 20
                );
                match self.guard.note_reset(Instant::now()) {
                    Some(0) => tracing::warn!("{why}; resetting it"),
                    Some(n) => tracing::warn!(
                        "{why}; resetting it ({n} more reset since the last such warning)"
                    ),
                    None => {}
                }
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, why));
            }
            self.mark = written;
            timer.as_mut().reset(Instant::now() + after);
        }
        Poll::Pending
    }
}

/// Chunks below this size are joined into one buffer while they wait in a [`Backlog`].
const JOIN_BELOW: usize = 4 * 1024;

/// Tunnel bytes taken off an h2 stream and not yet written on.
///
/// A relay takes DATA off its stream as soon as it arrives, even while the next hop has no
/// room. h2 ends a whole connection (GOAWAY `ENHANCE_YOUR_CALM`) when it holds too many
/// small DATA frames unread. Without this, one tunnel towards a stalled reader could
/// collect them and cut off every other tunnel on that connection. Small chunks are joined
/// here, so a one-byte frame costs one byte. Memory stays bounded by the stream window: the
/// relay releases window only for bytes it has written on. What it holds counts towards its
/// [`StallGuard`].
#[derive(Default)]
struct Backlog<'a> {
    /// Oldest first; `tail` follows the last of them.
    chunks: VecDeque<Bytes>,
    /// Small chunks joined, after `chunks`.
    tail: BytesMut,
    len: usize,
    guard: Option<&'a StallGuard>,
}

impl Drop for Backlog<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.guard {
            g.sub(self.len);
        }
    }
}

impl<'a> Backlog<'a> {
    fn counted_in(guard: &'a StallGuard) -> Backlog<'a> {
        let mut backlog = Backlog::default();
        backlog.guard = Some(guard);
        backlog
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, chunk: Bytes) {
        let n = chunk.len();
        if n == 0 {
            return;
        }
        if self.len == 0 {
            // Nothing waiting (the usual case): keep the chunk as it came, uncopied.
            self.chunks.push_back(chunk);
        } else if n < JOIN_BELOW {
            self.tail.extend_from_slice(&chunk);
        } else {
            if !self.tail.is_empty() {
                self.chunks.push_back(self.tail.split().freeze());
            }
            self.chunks.push_back(chunk);
        }
        self.len += n;
        if let Some(g) = self.guard {
            g.add(n);
        }
    }

    /// The oldest bytes, as one slice.
    fn front(&self) -> &[u8] {
        self.chunks.front().map_or(&self.tail[..], |c| &c[..])
    }

    /// Drops the first `n` bytes of [`Backlog::front`].
    fn advance(&mut self, n: usize) {
        match self.chunks.front_mut() {
            Some(c) => {
                c.advance(n);
                if c.is_empty() {
                    self.chunks.pop_front();
                }
            }
            None => self.tail.advance(n),
        }
        self.len -= n;
        if let Some(g) = self.guard {
            g.sub(n);
        }
    }

    /// Removes and returns up to `max` of the oldest bytes.
    fn take(&mut self, max: usize) -> Bytes {
        let out = match self.chunks.front_mut() {
            Some(c) if c.len() <= max => self.chunks.pop_front().unwrap_or_default(),
            Some(c) => c.split_to(max),
            None => {
                let n = max.min(self.tail.len());
                self.tail.split_to(n).freeze()
            }
        };
        self.len -= out.len();
        if let Some(g) = self.guard {
            g.sub(out.len());
        }
        out
    }
}

/// Moves all DATA that `recv` has ready into `backlog` (and registers for more).
fn take_ready(
    recv: &mut RecvStream,
    cx: &mut Context<'_>,
    backlog: &mut Backlog,
    ended: &mut bool,
) -> io::Result<()> {
    while !*ended {
        match recv.poll_data(cx) {
            Poll::Ready(Some(Ok(chunk))) => backlog.push(chunk),
            Poll::Ready(Some(Err(e))) => return Err(h2_io(e)),
            Poll::Ready(None) => *ended = true,
            Poll::Pending => break,
        }
    }
    Ok(())
}

/// Copies an h2 stream into a writer until the stream ends, then shuts the writer down.
/// DATA is taken off the stream while the writer is blocked (see [`Backlog`]); a writer that
/// stalls may get the tunnel reset (see [`StallGuard`]). Bytes count in `meter` as the writer
/// takes them.
pub async fn h2_to_write<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    w: &mut W,
    guard: &StallGuard,
    meter: Meter<'_>,
) -> io::Result<u64> {
    let mut backlog = Backlog::counted_in(guard);
    let mut watch = StallWatch::new(guard);
    let mut ended = false;
    let mut total = 0u64;
    poll_fn(|cx| loop {
        if let Err(e) = take_ready(recv, cx, &mut backlog, &mut ended) {
            return Poll::Ready(Err(e));
        }
        if backlog.is_empty() {
            return if ended {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            };
        }
        // The writer is a tokio socket: it takes part in tokio's cooperative budget, so this
        // loop yields to other tasks after a while.
        match Pin::new(&mut *w).poll_write(cx, backlog.front()) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                backlog.advance(n);
                total += n as u64;
                count(meter, n);
                let _ = recv.flow_control().release_capacity(n);
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return watch.poll_stalled(cx, backlog.len, total).map(Err),
        }
    })
    .await?;
    w.shutdown().await?;
    Ok(total)
}

/// Bytes moved by a finished tunnel: (towards the h2 peer, from the h2 peer).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub sent: u64,
    pub received: u64,
}

/// Runs both directions between a socket and an h2 stream until both ended, or either failed
/// (then the stream is reset and the socket dropped). Bytes count in `meters` as they move.
pub async fn pump(
    socket: tokio::net::TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    guard: &StallGuard,
    meters: Meters<'_>,
) -> io::Result<Moved> {
    // Owned halves: no lock shared between the two directions.
    let (mut rd, mut wr) = socket.into_split();
    let up = read_to_h2(&mut rd, &mut send, meters.sent);
    let down = h2_to_write(&mut recv, &mut wr, guard, meters.received);
    tokio::pin!(up, down);
    let mut moved = Moved::default();
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(n) => { moved.sent = n; up_done = true; }
                Err(e) => { return Err(e); }
            },
            r = &mut down, if !down_done => match r {
                Ok(n) => { moved.received = n; down_done = true; }
                Err(e) => { return Err(e); }
            },
        }
    }
    Ok(moved)
}

/// Resets a stream whose tunnel failed.
pub fn cancel(send: &mut SendStream<Bytes>) {
    send.send_reset(h2::Reason::CANCEL);
}

/// Rounds of [`forward`]'s loop before it lets other tasks run.
const FORWARD_ROUNDS: usize = 32;

/// Moves one direction of a relayed tunnel. The first `eager` bytes go out with
/// [`send_eager`] (a destination stream still opening sends them with its HEADERS); the rest
/// as `send` gets capacity. DATA is taken off `recv` while `send` has none (see [`Backlog`]);
/// if `send` stalls, the tunnel may be reset (see [`StallGuard`]).
async fn forward(
    recv: &mut RecvStream,
    send: &mut SendStream<Bytes>,
    mut eager: usize,
    guard: &StallGuard,
) -> io::Result<u64> {
    let mut backlog = Backlog::counted_in(guard);
    let mut watch = StallWatch::new(guard);
    let mut ended = false;
    let mut total = 0u64;
    poll_fn(|cx| {
        for _ in 0..FORWARD_ROUNDS {
            if let Err(e) = take_ready(recv, cx, &mut backlog, &mut ended) {
                return Poll::Ready(Err(e));
            }
            let mut cap = 0;
            if eager > 0 {
                cap = eager.min(backlog.len);
                eager -= cap;
            }
            let eager_now = cap > 0;
            if !eager_now {
                if backlog.is_empty() {
                    return if ended {
                        Poll::Ready(Ok(()))
                    } else {
                        Poll::Pending
                    };
                }
                send.reserve_capacity(backlog.len);
                cap = send.capacity();
                if cap == 0 {
                    match send.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(c))) => cap = c,
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_io(e))),
                        Poll::Ready(None) => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::BrokenPipe,
                                "stream closed",
                            )))
                        }
                        Poll::Pending => {
                            return watch.poll_stalled(cx, backlog.len, total).map(Err)
                        }
                    }
                }
            }
            while cap > 0 && !backlog.is_empty() {
                let chunk = backlog.take(cap);
                let n = chunk.len();
                cap -= n;
                let sent = if eager_now {
                    send_eager(send, chunk)
                } else {
                    send.send_data(chunk, false).map_err(h2_io)
                };
                if let Err(e) = sent {
                    return Poll::Ready(Err(e));
                }
                total += n as u64;
                let _ = recv.flow_control().release_capacity(n);
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await?;
    send.send_data(Bytes::new(), true).map_err(h2_io)?;
    Ok(total)
}

/// Relays a tunnel between two h2 streams (the hub's job) that is still being opened: bytes
/// from `a` (the client's side) flow on to `b` at once, before `b` has answered, so a client's
/// first bytes travel with the CONNECT instead of a round trip after it. `opened` is `b`'s
/// answer: `Ok((a_send, b_recv))` once the tunnel is open (the caller has told `a`), or an
/// error (the caller has told `a` why), which stops `a → b` and resets `b`.
///
/// Runs until both directions ended; a failure on either side resets both. Returns the byte
/// counts (a → b, b → a).
pub async fn relay_opening<E>(
    mut a_recv: RecvStream,
    mut b_send: SendStream<Bytes>,
    opened: impl Future<Output = Result<(SendStream<Bytes>, RecvStream), E>>,
    guard: &StallGuard,
) -> Result<io::Result<(u64, u64)>, E> {
    // (a_send, b_recv), once `b` accepted.
    let mut open: Option<(SendStream<Bytes>, RecvStream)> = None;
    let outcome = 'relay: {
        let ab = forward(&mut a_recv, &mut b_send, EAGER_BYTES, guard);
        tokio::pin!(ab, opened);
        let mut n_ab = None;
        while open.is_none() {
            tokio::select! {
                r = &mut opened => match r {
                    Ok(v) => open = Some(v),
                    Err(e) => break 'relay Err(e),
                },
                r = &mut ab, if n_ab.is_none() => match r {
                    Ok(n) => n_ab = Some(n),
                    Err(e) => break 'relay Ok(Err(e)),
                },
            }
        }
        let Some((a_send, b_recv)) = open.as_mut() else {
            break 'relay Ok(Err(io::Error::other("tunnel not open")));
        };
        let ba = forward(b_recv, a_send, 0, guard);
        tokio::pin!(ba);
        let mut n_ba = None;
        loop {
            if let (Some(x), Some(y)) = (n_ab, n_ba) {
                break 'relay Ok(Ok((x, y)));
            }
            tokio::select! {
                r = &mut ab, if n_ab.is_none() => match r {
                    Ok(n) => n_ab = Some(n),
                    Err(e) => break 'relay Ok(Err(e)),
                },
                r = &mut ba, if n_ba.is_none() => match r {
                    Ok(n) => n_ba = Some(n),
                    Err(e) => break 'relay Ok(Err(e)),
                },
            }
        }
    };
    if !matches!(outcome, Ok(Ok(_))) {
        cancel(&mut b_send);
        if let Some((a_send, _)) = open.as_mut() {
            cancel(a_send);
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use h2::client::SendRequest;
    use http::{Request, Response, StatusCode};
    use tokio::io::{duplex, DuplexStream};

    use super::*;
    use ztm_net::h2io::{client_builder, server_builder};

    const STREAM_WINDOW_BYTES: usize = ztm_proto::wire::STREAM_WINDOW as usize;

    /// More one-byte DATA frames than h2's budget for small frames held unread (half the
    /// connection window, 255 bytes charged for each): about 263,000 for our 128 MiB window.
    const TINY_FRAMES: usize = ztm_proto::wire::CONNECTION_WINDOW as usize / 2 / 255 * 6 / 5;

    /// An h2 connection over memory: the client's handle and the server's connection.
    async fn connected() -> (
        SendRequest<Bytes>,
        h2::server::Connection<DuplexStream, Bytes>,
    ) {
        let (c, s) = duplex(1 << 20);
        let server = tokio::spawn(async move { server_builder().handshake(s).await });
        let (client, conn) = client_builder().handshake(c).await.unwrap();
        tokio::spawn(conn);
        (client, server.await.unwrap().unwrap())
    }

    fn request(path: &str) -> Request<()> {
        Request::post(format!("http://t{path}")).body(()).unwrap()
    }

    /// Sends `bulk` bytes in large frames, then [`TINY_FRAMES`] one-byte frames, then ends.
    /// The one-byte frames trickle: other tasks run between them, as they do when a client
    /// writes byte by byte through agents and hubs.
    async fn bulk_then_tiny(send: &mut SendStream<Bytes>, bulk: usize) {
        send_all(send, Bytes::from(vec![b'b'; bulk])).await.unwrap();
        for _ in 0..TINY_FRAMES {
            send_all(send, Bytes::from_static(b"t")).await.unwrap();
            tokio::task::yield_now().await;
        }
        send.send_data(Bytes::new(), true).unwrap();
    }

    /// A new stream on `client` gets its answer: the connection is still in service.
    async fn still_serving(client: &mut SendRequest<Bytes>) {
        let fresh = async {
            let mut client = client.clone().ready().await?;
            let (resp, _) = client.send_request(request("/ping"), true)?;
            resp.await
        };
        let resp = tokio::time::timeout(Duration::from_secs(10), fresh)
            .await
            .expect("no answer")
            .expect("connection ended");
        assert_eq!(resp.status(), StatusCode::OK);
    }

    fn assert_bulk_then_tiny(got: &[u8], bulk: usize) {
        assert_eq!(got.len(), bulk + TINY_FRAMES);
        assert!(got[..bulk].iter().all(|&b| b == b'b'));
        assert!(got[bulk..].iter().all(|&b| b == b't'));
    }

    /// Answers `/ping` with 200 and hands the first other stream to `tunnel`.
    fn serve<F, Fut>(mut conn: h2::server::Connection<DuplexStream, Bytes>, tunnel: F)
    where
        F: FnOnce(RecvStream, SendStream<Bytes>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        tokio::spawn(async move {
            let mut tunnel = Some(tunnel);
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let ping = req.uri().path() == "/ping";
                let send = respond.send_response(Response::new(()), ping).unwrap();
                if let (false, Some(tunnel)) = (ping, tunnel.take()) {
                    tokio::spawn(tunnel(req.into_body(), send));
                }
            }
        });
    }

    #[test]
    fn backlog_keeps_bytes_in_order_whatever_the_chunk_sizes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let mut backlog = Backlog::default();
            let (mut sent, mut got) = (Vec::new(), Vec::new());
            let mut next = 0u8;
            for _ in 0..rng.gen_range(1..60) {
                // Chunks on both sides of JOIN_BELOW, and empty ones.
                let n = match rng.gen_range(0..4) {
                    0 => 0,
                    1 => rng.gen_range(1..8),
                    2 => rng.gen_range(JOIN_BELOW - 2..JOIN_BELOW + 2),
                    _ => rng.gen_range(1..20_000),
                };
                let chunk: Vec<u8> = (0..n)
                    .map(|_| {
                        next = next.wrapping_add(1);
                        next
                    })
                    .collect();
                sent.extend_from_slice(&chunk);
                backlog.push(Bytes::from(chunk));
                assert_eq!(backlog.len, sent.len() - got.len());
                // Drain some, either way a relay does.
                if rng.gen_bool(0.5) && !backlog.is_empty() {
                    let front = backlog.front();
                    assert!(!front.is_empty());
                    let n = rng.gen_range(1..=front.len());
                    got.extend_from_slice(&front[..n]);
                    backlog.advance(n);
                } else {
                    got.extend_from_slice(&backlog.take(rng.gen_range(1..30_000)));
                }
            }
            while !backlog.is_empty() {
                got.extend_from_slice(&backlog.take(4096));
            }
            assert_eq!(got, sent);
        }
    }

    #[test]
    fn backlog_joins_small_chunks_that_wait() {
        let mut backlog = Backlog::default();
        for _ in 0..10_000 {
            backlog.push(Bytes::from_static(b"x"));
        }
        // The first stays as it came; the rest wait as one buffer.
        assert_eq!(backlog.chunks.len(), 1);
        assert_eq!(backlog.take(usize::MAX).len(), 1);
        assert_eq!(backlog.take(usize::MAX).len(), 9_999);
        assert!(backlog.is_empty());
    }

    #[tokio::test]
    async fn reads_grow_from_small_to_full_size_during_a_bulk_transfer() {
        let (client, conn) = connected().await;
        let (sizes_tx, sizes_rx) = tokio::sync::oneshot::channel();
        serve(conn, move |mut recv, _send| async move {
            let mut sizes = Vec::new();
            while let Some(Ok(chunk)) = recv.data().await {
                let _ = recv.flow_control().release_capacity(chunk.len());
                sizes.push(chunk.len());
            }
            let _ = sizes_tx.send(sizes);
        });
        let mut client = client.ready().await.unwrap();
        let (_resp, mut send) = client.send_request(request("/bulk"), false).unwrap();
        // The whole transfer is waiting in the source: every read fills its buffer.
        let total = 1 << 20;
        let (mut src_w, mut src_r) = duplex(total);
        src_w.write_all(&vec![b'b'; total]).await.unwrap();
        drop(src_w);
        assert_eq!(
            read_to_h2(&mut src_r, &mut send, &[]).await.unwrap(),
            total as u64
        );

        let sizes = sizes_rx.await.unwrap();
        assert_eq!(sizes.iter().sum::<usize>(), total);
        // 4, 8, 16, 32 KiB, then 64 KiB reads (h2 may split a read when its window is short).
        let growth: Vec<usize> = (0..5).map(|i| FIRST_READ << i).collect();
        assert_eq!(sizes[..5], growth[..], "{sizes:?}");
        assert_eq!(growth[4], READ_SIZE);
        assert!(sizes.iter().all(|&n| n <= READ_SIZE), "{sizes:?}");
    }

    /// Waits (at most 10 s) until `counter` reads `want`.
    async fn reaches(counter: &AtomicU64, want: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while counter.load(Ordering::Relaxed) != want {
            assert!(
                std::time::Instant::now() < deadline,
                "counted {} of {want}",
                counter.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn bytes_count_as_they_move_while_the_tunnel_is_open() {
        let (client, conn) = connected().await;
        // Every byte counts twice in each direction: in a port's counter and in a total.
        let [port_up, total_up, port_down, total_down] =
            [(); 4].map(|_| Arc::new(AtomicU64::new(0)));
        let (mut sink_w, mut sink_r) = duplex(1 << 20);
        let (down_done_tx, down_done_rx) = tokio::sync::oneshot::channel();
        {
            let (port_down, total_down) = (port_down.clone(), total_down.clone());
            serve(conn, move |mut recv, _send| async move {
                let meter = [&*port_down, &*total_down];
                let r = h2_to_write(&mut recv, &mut sink_w, &StallGuard::default(), &meter).await;
                let _ = down_done_tx.send(r.map_err(|e| e.to_string()));
            });
        }
        let mut client = client.ready().await.unwrap();
        let (_resp, mut send) = client.send_request(request("/tunnel"), false).unwrap();
        let (mut src_w, mut src_r) = duplex(1 << 20);
        let up = {
            let (port_up, total_up) = (port_up.clone(), total_up.clone());
            tokio::spawn(async move {
                let meter = [&*port_up, &*total_up];
                read_to_h2(&mut src_r, &mut send, &meter).await
            })
        };

        // Neither direction has ended: what moved so far shows.
        let first = 300 * 1024 + 7;
        src_w.write_all(&vec![b'a'; first]).await.unwrap();
        let mut got = vec![0u8; first];
        sink_r.read_exact(&mut got).await.unwrap();
        for c in [&port_up, &total_up, &port_down, &total_down] {
            reaches(c, first as u64).await;
        }
        assert!(!up.is_finished());

        // More, then the end: the counters agree with what the relays return.
        src_w.write_all(&vec![b'b'; 5000]).await.unwrap();
        drop(src_w);
        let sent = up.await.unwrap().unwrap();
        assert_eq!(sent, first as u64 + 5000);
        let mut rest = Vec::new();
        sink_r.read_to_end(&mut rest).await.unwrap();
        assert_eq!(down_done_rx.await.unwrap(), Ok(sent));
        for c in [&port_up, &total_up, &port_down, &total_down] {
            assert_eq!(c.load(Ordering::Relaxed), sent);
        }
    }

    #[tokio::test]
    async fn tiny_frames_towards_a_blocked_writer_keep_the_connection() {
        let (mut client, conn) = connected().await;
        // The writer takes 64 KiB and then nothing until the test reads it.
        let (mut sink_w, mut sink_r) = duplex(64 * 1024);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        serve(conn, move |mut recv, _send| async move {
            let r = h2_to_write(&mut recv, &mut sink_w, &StallGuard::default(), &[]).await;
            let _ = done_tx.send(r.map_err(|e| e.to_string()));
        });

        let (_resp, mut send) = client.send_request(request("/tunnel"), false).unwrap();
        bulk_then_tiny(&mut send, 128 * 1024).await;
        still_serving(&mut client).await;

        let mut got = Vec::new();
        sink_r.read_to_end(&mut got).await.unwrap();
        assert_bulk_then_tiny(&got, 128 * 1024);
        assert_eq!(done_rx.await.unwrap(), Ok(128 * 1024 + TINY_FRAMES as u64));
    }

    #[tokio::test]
    async fn tiny_frames_towards_a_full_stream_keep_the_hubs_connection() {
        // client → (a) → hub → (b) → far end, as in `relay_opening`'s use by a hub.
        let (mut client, conn_a) = connected().await;
        let (to_far, conn_b) = connected().await;
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (got_tx, got_rx) = tokio::sync::oneshot::channel();
        // The far end reads nothing until told: its stream window fills.
        serve(conn_b, move |mut recv, mut send| async move {
            send.send_data(Bytes::new(), true).unwrap();
            let _ = go_rx.await;
            let mut got = Vec::new();
            while let Some(Ok(chunk)) = recv.data().await {
                let _ = recv.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            let _ = got_tx.send(got);
        });
        let (relayed_tx, relayed_rx) = tokio::sync::oneshot::channel();
        serve(conn_a, move |a_recv, a_send| async move {
            let mut to_far = to_far.ready().await.unwrap();
            let (resp, b_send) = to_far.send_request(request("/far"), false).unwrap();
            let opened = async move { Ok::<_, h2::Error>((a_send, resp.await?.into_body())) };
            let r = relay_opening(a_recv, b_send, opened, &StallGuard::default()).await;
            let _ = relayed_tx.send(r.map(|r| r.map_err(|e| e.to_string())));
        });

        // Enough to fill the far stream's window, and 64 KiB more that the hub holds.
        let bulk = ztm_proto::wire::STREAM_WINDOW as usize + 64 * 1024;
        let (_resp, mut send) = client.send_request(request("/tunnel"), false).unwrap();
        bulk_then_tiny(&mut send, bulk).await;
        still_serving(&mut client).await;

        go_tx.send(()).unwrap();
        assert_bulk_then_tiny(&got_rx.await.unwrap(), bulk);
        let relayed = relayed_rx.await.unwrap().unwrap().unwrap();
        assert_eq!(relayed.0, (bulk + TINY_FRAMES) as u64);
    }

    #[tokio::test]
    async fn datagrams_are_dropped_not_waited_for_when_the_stream_is_full() {
        let (mut client, conn) = connected().await;
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (got_tx, got_rx) = tokio::sync::oneshot::channel();
        serve(conn, move |mut recv, _send| async move {
            let _ = go_rx.await;
            let mut got = 0usize;
            while let Some(Ok(chunk)) = recv.data().await {
                let _ = recv.flow_control().release_capacity(chunk.len());
                got += chunk.len();
            }
            let _ = got_tx.send(got);
        });
        let (resp, mut send) = client.send_request(request("/udp"), false).unwrap();
        let _resp = resp.await.unwrap();

        let datagram = Bytes::from(vec![b'd'; 1200]);
        let (mut sent, mut dropped_in_a_row) = (0usize, 0);
        // The peer reads nothing: its window fills, and from then on datagrams are dropped.
        for _ in 0..20_000 {
            if send_datagram(&mut send, datagram.clone()).unwrap() {
                sent += datagram.len();
                dropped_in_a_row = 0;
            } else {
                dropped_in_a_row += 1;
                if dropped_in_a_row == 200 {
                    break;
                }
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(dropped_in_a_row, 200, "datagrams were never dropped");
        let window = ztm_proto::wire::STREAM_WINDOW as usize;
        assert!(
            sent <= window && sent > window - 2 * datagram.len(),
            "sent {sent}"
        );

        // Once the peer reads, datagrams go through again.
        go_tx.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !send_datagram(&mut send, datagram.clone()).unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "the stream never had room again"
            );
            tokio::task::yield_now().await;
        }
        sent += datagram.len();
        send.send_data(Bytes::new(), true).unwrap();
        assert_eq!(got_rx.await.unwrap(), sent);
    }

    #[test]
    fn only_stalled_tunnels_holding_enough_are_reset_and_only_over_the_limit() {
        let limit = 10 * STALL_MIN;
        // Over the limit, holding enough, nothing moved: reset.
        assert!(must_reset(limit + 1, limit, STALL_MIN, false));
        // Moved during the period, however little: kept.
        assert!(!must_reset(limit + 1, limit, STALL_MIN, true));
        // Holding little: kept.
        assert!(!must_reset(limit + 1, limit, STALL_MIN - 1, false));
        // At or under the limit: kept.
        assert!(!must_reset(limit, limit, STALL_MIN, false));
    }

    #[test]
    fn resets_are_logged_at_most_once_per_period_with_a_count_of_the_others() {
        let guard = StallGuard::default();
        let t0 = Instant::now();
        // The first is logged at once, with none before it.
        assert_eq!(guard.note_reset(t0), Some(0));
        // Three more within the period are counted, not logged.
        for ms in [1, 500, 9_999] {
            assert_eq!(guard.note_reset(t0 + Duration::from_millis(ms)), None);
        }
        // The first after the period is logged with the three it stood for.
        assert_eq!(guard.note_reset(t0 + RESET_LOG_EVERY), Some(3));
        // And the count starts again.
        assert_eq!(guard.note_reset(t0 + RESET_LOG_EVERY * 2), Some(0));
    }

    /// A stream of `len` bytes into `h2_to_write` towards a writer that takes 64 KiB and then
    /// only what `sink` reads. Returns the relay's result and the sink's reading end.
    async fn relay_towards(
        guard: Arc<StallGuard>,
        len: usize,
    ) -> (
        tokio::sync::oneshot::Receiver<io::Result<u64>>,
        DuplexStream,
    ) {
        let (client, conn) = connected().await;
        let (mut sink_w, sink_r) = duplex(64 * 1024);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        serve(conn, move |mut recv, _send| async move {
            let _ = done_tx.send(h2_to_write(&mut recv, &mut sink_w, &guard, &[]).await);
        });
        tokio::spawn(async move {
            let mut client = client.ready().await.unwrap();
            let (_resp, mut send) = client.send_request(request("/tunnel"), false).unwrap();
            // Fails once the relay resets the stream.
            if send_all(&mut send, Bytes::from(vec![b's'; len]))
                .await
                .is_ok()
            {
                let _ = send.send_data(Bytes::new(), true);
            }
            // Keep the connection until the test is done.
            std::future::pending::<()>().await
        });
        (done_rx, sink_r)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_tunnel_is_reset_once_the_process_holds_too_much() {
        let guard = Arc::new(StallGuard::new(1 << 20, Duration::from_millis(500)));
        let (done, _sink) = relay_towards(guard.clone(), 3 << 20).await;
        let started = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(60), done)
            .await
            .expect("the stalled tunnel was kept")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        // The first check finds it over the limit, having moved nothing for a period.
        assert!(
            started.elapsed() <= Duration::from_millis(1100),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(guard.held(), 0, "what the tunnel held was not given back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_tunnel_under_the_limit_is_kept() {
        let guard = Arc::new(StallGuard::new(64 << 20, Duration::from_millis(500)));
        let len = 3 << 20;
        let (mut done, mut sink) = relay_towards(guard.clone(), len).await;
        // A minute of (paused) time with nothing read: the relay holds a window and waits.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            done.try_recv().is_err(),
            "the tunnel ended while under the limit"
        );
        let held = guard.held();
        assert!(
            (STALL_MIN..=STREAM_WINDOW_BYTES).contains(&held),
            "held {held}"
        );
        let mut got = Vec::new();
        sink.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), len);
        assert_eq!(done.await.unwrap().unwrap(), len as u64);
        assert_eq!(guard.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_tunnel_over_the_limit_is_kept() {
        let guard = Arc::new(StallGuard::new(1 << 20, Duration::from_millis(500)));
        let len = 4 << 20;
        let (done, mut sink) = relay_towards(guard.clone(), len).await;
        // 16 KiB every 100 ms: far slower than the sender, with a full window held, but never
        // a whole period without progress.
        let mut buf = vec![0u8; 16 * 1024];
        let (mut got, mut over) = (0, false);
        while got < len {
            over |= guard.held() > 1 << 20;
            sink.read_exact(&mut buf).await.unwrap();
            got += buf.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(over, "the relay never held more than the limit");
        assert_eq!(done.await.unwrap().unwrap(), len as u64);
    }
}
