//! Our record layer on a byte stream: reads records straight into one buffer and decrypts
//! them in place, seals outgoing bytes into records in one reused buffer.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

use crate::cipher::{Cipher, Kernel};
use crate::handshake::Leftover;
use crate::records::{alert, Fatal, Opened, Rx, Tx, WRITE_BATCH};

/// Sealed bytes a write call leaves for the flush: above this it sends them itself.
const WRITE_HIGH: usize = 64 * 1024;
/// Sealed bytes above which reading waits for the socket to take them. A write call leaves
/// at most [`WRITE_HIGH`] plus one batch; only records the read side adds (answers to key
/// updates, alerts) could pass it. Reads do not wait below it: a full-duplex peer that is
/// itself busy writing must still have its bytes read, or both sides would wait for each
/// other.
pub(crate) const READ_PAUSE: usize = WRITE_HIGH + WRITE_BATCH + 4096;

/// Who the peer is, as the handshake established.
pub(crate) struct Peer {
    pub(crate) certificates: Vec<CertificateDer<'static>>,
    pub(crate) alpn: Option<Vec<u8>>,
}

impl Peer {
    pub(crate) fn of(conn: &rustls::CommonState) -> Self {
        Self {
            certificates: conn
                .peer_certificates()
                .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default(),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        }
    }
}

/// A TLS 1.3 connection after its handshake, on the byte stream `S`.
pub(crate) struct OwnStream<S> {
    pub(crate) io: S,
    pub(crate) kernel: Kernel,
    pub(crate) rx: Rx,
    pub(crate) tx: Tx,
    peer: Peer,
    /// Reading failed: why. Every later read fails the same way, and writes end.
    failed: Option<Fatal>,
    /// Reading failed after data was handed out in the same call: the next read reports it.
    deferred: Option<Fatal>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> OwnStream<S> {
    pub(crate) fn new(
        io: S,
        kernel: Kernel,
        secrets: rustls::ExtractedSecrets,
        peer: Peer,
        leftover: Leftover,
    ) -> io::Result<Self> {
        let limit = kernel
            .suite()
            .tls13()
            .map(|suite| suite.common.confidentiality_limit)
            .ok_or_else(|| io::Error::other("TLS 1.3 was not negotiated"))?;
        Ok(Self {
            io,
            kernel,
            rx: Rx::new(
                Cipher::new(secrets.rx)?,
                &leftover.plaintext,
                &leftover.ciphertext,
            ),
            tx: Tx::new(Cipher::new(secrets.tx)?, limit),
            peer,
            failed: None,
            deferred: None,
        })
    }

    pub(crate) fn peer_certificates(&self) -> &[CertificateDer<'static>] {
        &self.peer.certificates
    }

    pub(crate) fn take_peer_certificates(&mut self) -> Vec<CertificateDer<'static>> {
        std::mem::take(&mut self.peer.certificates)
    }

    pub(crate) fn alpn_protocol(&self) -> Option<&[u8]> {
        self.peer.alpn.as_deref()
    }

    /// Switches to fresh sending keys now and asks the peer to do the same. Sent with the
    /// next flush.
    pub(crate) fn update_keys(&mut self) -> io::Result<()> {
        if self.tx.closed {
            return Err(closed_error(self.failed.as_ref()));
        }
        self.tx.key_update(&mut self.kernel, true)
    }

    /// Writes sealed records until none is left.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tx.sent < self.tx.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.tx.out[self.tx.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tx.sent += n;
        }
        self.tx.all_sent();
        Poll::Ready(Ok(()))
    }

    /// Reading failed: tells the peer why if the failure is its doing, and ends both
    /// directions. The alert follows whatever was sealed before it; it is sent as far as the
    /// socket takes it now, and by a later flush or shutdown.
    fn fail(&mut self, fatal: Fatal, cx: &mut Context<'_>) -> io::Error {
        let error = fatal.error();
        match fatal.alert {
            Some(description) => {
                let _ = self.tx.seal_alert(description);
            }
            None => self.tx.closed = true,
        }
        let _ = self.poll_send(cx);
        self.failed = Some(fatal);
        error
    }

    /// Fills `out` from buffered records, reading the socket when none is complete.
    fn poll_read_records(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<Result<(), Fatal>> {
        let mut produced = false;
        // An error found once data is handed out waits for the next call.
        let wait = |fatal: Fatal, deferred: &mut Option<Fatal>| {
            *deferred = Some(fatal);
            Poll::Ready(Ok(()))
        };
        loop {
            if out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let rx = &mut self.rx;
            if !rx.plain.is_empty() {
                let n = rx.plain.len().min(out.remaining());
                out.put_slice(&rx.buf[rx.plain.start..rx.plain.start + n]);
                rx.plain.start += n;
                produced = true;
                continue;
            }
            if rx.closed {
                return Poll::Ready(Ok(()));
            }
            match rx.open_record(&mut self.kernel) {
                Ok(Opened::Incomplete) => {}
                Ok(Opened::KeyUpdate { requested: true }) => {
                    self.tx.key_update_requested();
                    // Answered now if nothing else waits to be sent (the answer then goes out
                    // even if nothing else is written), else with the next write or flush.
                    if self.tx.pending() == 0 {
                        if let Err(e) = self.tx.answer(&mut self.kernel) {
                            return Poll::Ready(Err(Fatal::internal(e)));
                        }
                        if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                            return Poll::Ready(Err(Fatal::transport(e)));
                        }
                    }
                    continue;
                }
                Ok(_) => continue,
                Err(fatal) if produced => return wait(fatal, &mut self.deferred),
                Err(fatal) => return Poll::Ready(Err(fatal)),
            }
            if self.tx.pending() > READ_PAUSE {
                match self.poll_send(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) if produced => {
                        return wait(Fatal::transport(e), &mut self.deferred)
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Fatal::transport(e))),
                    Poll::Pending if produced => return Poll::Ready(Ok(())),
                    Poll::Pending => return Poll::Pending,
                }
            }
            let read = poll_read_buf(Pin::new(&mut self.io), cx, self.rx.room());
            match read {
                Poll::Ready(Ok(n)) if n > 0 => {}
                Poll::Ready(Ok(_)) if produced => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {
                    let what = if self.rx.mid_record() {
                        "the peer closed the connection inside a TLS record"
                    } else {
                        "the peer closed the connection without a TLS close_notify"
                    };
                    return Poll::Ready(Err(Fatal::transport(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        what,
                    ))));
                }
                Poll::Ready(Err(e)) if produced => {
                    return wait(Fatal::transport(e), &mut self.deferred)
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Fatal::transport(e))),
                Poll::Pending => {
                    self.rx.idle();
                    if produced {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Why writing is no longer possible.
fn closed_error(failed: Option<&Fatal>) -> io::Error {
    match failed {
        Some(fatal) => io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!("TLS connection failed: {}", fatal.message),
        ),
        None => io::Error::new(io::ErrorKind::BrokenPipe, "TLS stream already shut down"),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for OwnStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(fatal) = &this.failed {
            return Poll::Ready(Err(fatal.error()));
        }
        let result = match this.deferred.take() {
            Some(fatal) => Err(fatal),
            None => ready!(this.poll_read_records(cx, out)),
        };
        // Nothing after a bad record is trusted: every later read fails too.
        Poll::Ready(result.map_err(|fatal| this.fail(fatal, cx)))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for OwnStream<S> {
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
        if this.tx.closed {
            return Poll::Ready(Err(closed_error(this.failed.as_ref())));
        }
        if this.tx.pending() >= WRITE_HIGH {
            ready!(this.poll_send(cx))?;
        }
        let n = this.tx.seal_data(&mut this.kernel, bufs)?;
        if this.tx.pending() >= WRITE_HIGH {
            // The bytes are taken: if the socket is full, the next write or flush waits.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.tx.answer(&mut this.kernel)?;
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // After a failure the alert, not close_notify, is the last record.
        this.tx.seal_alert(alert::CLOSE_NOTIFY)?;
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
