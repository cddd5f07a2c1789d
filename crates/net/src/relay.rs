//! Moving tunnel bytes: between a socket and an HTTP/2 stream (agents) and between two HTTP/2
//! streams (hub). Memory per tunnel is bounded: data is read from a source only when the
//! destination has flow-control capacity, and window is released to the sender only after the
//! bytes were written on.

use std::future::poll_fn;
use std::io;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Size of a socket read, and so the largest DATA payload we hand to h2 at once.
pub const READ_SIZE: usize = 64 * 1024;

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

/// Most first bytes of a tunnel queued eagerly (see [`send_eager`]): what agent A sends with its
/// CONNECT, and what the hub passes on while the far end is still opening.
pub const EAGER_BYTES: usize = 16 * 1024;

/// Copies a reader into an h2 stream until EOF, then ends the stream (half-close).
pub async fn read_to_h2<R: AsyncRead + Unpin>(
    r: &mut R,
    send: &mut SendStream<Bytes>,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    loop {
        if buf.capacity() < READ_SIZE / 4 {
            buf.reserve(READ_SIZE);
        }
        let n = r.read_buf(&mut buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        total += n as u64;
        send_all(send, buf.split().freeze()).await?;
    }
}

/// Copies an h2 stream into a writer until the stream ends, then shuts the writer down.
pub async fn h2_to_write<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    w: &mut W,
) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        let n = chunk.len();
        w.write_all(&chunk).await?;
        total += n as u64;
        let _ = recv.flow_control().release_capacity(n);
    }
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
/// (then the stream is reset and the socket dropped).
pub async fn pump(
    socket: tokio::net::TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> io::Result<Moved> {
    // Owned halves: no lock shared between the two directions.
    let (mut rd, mut wr) = socket.into_split();
    let up = read_to_h2(&mut rd, &mut send);
    let down = h2_to_write(&mut recv, &mut wr);
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

/// Moves one direction of a relayed tunnel. The first `eager` bytes go out with
/// [`send_eager`] (a destination stream still opening sends them with its HEADERS).
async fn forward(
    recv: &mut RecvStream,
    send: &mut SendStream<Bytes>,
    mut eager: usize,
) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        let n = chunk.len();
        if n <= eager {
            eager -= n;
            send_eager(send, chunk)?;
        } else {
            eager = 0;
            send_all(send, chunk).await?;
        }
        total += n as u64;
        let _ = recv.flow_control().release_capacity(n);
    }
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
    opened: impl std::future::Future<Output = Result<(SendStream<Bytes>, RecvStream), E>>,
) -> Result<io::Result<(u64, u64)>, E> {
    // (a_send, b_recv), once `b` accepted.
    let mut open: Option<(SendStream<Bytes>, RecvStream)> = None;
    let outcome = 'relay: {
        let ab = forward(&mut a_recv, &mut b_send, EAGER_BYTES);
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
        let ba = forward(b_recv, a_send, 0);
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
