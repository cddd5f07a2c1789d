//! Mutual TLS 1.3 between agents and hubs.
//!
//! rustls runs the handshake, so it alone decides who is admitted: certificate chains,
//! revocation, ALPN, cipher suites. Once the handshake is done, rustls hands over the traffic
//! keys (its "kernel connection" API, made for kernel TLS) and [`TlsStream`] moves the records
//! itself: it reads the socket straight into one buffer, decrypts each record in place and
//! gives the plaintext to the reader, and it seals outgoing bytes into records in one reused
//! buffer. rustls' own stream copies every received record twice more and allocates for each;
//! on the tunnel's path, which crosses TLS four times, that was a tenth of the relay CPU
//! (PROTOCOL.md, "Records").
//!
//! What the record layer does is RFC 8446 §5 and §4.6.3: AEAD records with a per-direction
//! sequence number, content type and padding inside the encryption, alerts, and key updates in
//! both directions (ours before the cipher's confidentiality limit, the peer's whenever it
//! sends one). Anything else after the handshake ends the connection with an error.

use std::io::{self, IoSlice};
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, ConnectionTrafficSecrets, ServerConfig, SupportedCipherSuite};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

/// Record header: content type, legacy version, length.
const HEADER: usize = 5;
/// AEAD tag of every cipher suite rustls offers for TLS 1.3.
const TAG: usize = 16;
/// Largest plaintext of one record (RFC 8446 §5.1).
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// Largest encrypted body of one record (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const MAX_RECORD: usize = HEADER + MAX_CIPHERTEXT;

/// Bytes asked of the socket per read, at least: a read takes several 16 KiB records at once.
pub const READ_SIZE: usize = 64 * 1024;
/// Plaintext one write call seals at most (eight full records).
const WRITE_BATCH: usize = 8 * MAX_PLAINTEXT;
/// Sealed bytes a write call leaves for the flush: above this it sends them itself.
const WRITE_HIGH: usize = 64 * 1024;
/// Largest handshake flight accepted (certificate chains are a few KiB).
const HANDSHAKE_LIMIT: usize = 256 * 1024;

const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
const HANDSHAKE_KEY_UPDATE: u8 = 24;
const ALERT_CLOSE_NOTIFY: u8 = 0;

/// Runs the server side of a handshake on `tcp`.
pub async fn accept(config: Arc<ServerConfig>, mut tcp: TcpStream) -> io::Result<TlsStream> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let leftover = handshake(&mut conn, &mut tcp).await?;
    let peer = Peer::of(&conn);
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    TlsStream::new(tcp, Kernel::Server(kernel), secrets, peer, leftover)
}

/// Runs the client side of a handshake with the server `name` on `tcp`.
pub async fn connect(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    mut tcp: TcpStream,
) -> io::Result<TlsStream> {
    let mut conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    let leftover = handshake(&mut conn, &mut tcp).await?;
    let peer = Peer::of(&conn);
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    TlsStream::new(tcp, Kernel::Client(kernel), secrets, peer, leftover)
}

/// A TLS 1.3 connection after its handshake: read and write plaintext.
pub struct TlsStream {
    tcp: TcpStream,
    kernel: Kernel,
    rx: Rx,
    tx: Tx,
    peer: Peer,
}

impl TlsStream {
    fn new(
        tcp: TcpStream,
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
            tcp,
            kernel,
            rx: Rx::new(Cipher::new(secrets.rx)?, leftover),
            tx: Tx {
                cipher: Cipher::new(secrets.tx)?,
                limit,
                out: Vec::new(),
                sent: 0,
                shut: false,
            },
            peer,
        })
    }

    /// The peer's certificate chain, its own certificate first (empty if it sent none).
    pub fn peer_certificates(&self) -> &[CertificateDer<'static>] {
        &self.peer.certificates
    }

    /// The application protocol agreed by ALPN.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.peer.alpn.as_deref()
    }

    /// Switches to fresh sending keys now and asks the peer to do the same (a TLS 1.3 key
    /// update; it also happens by itself before the cipher's limit). Sent with the next flush.
    pub fn update_keys(&mut self) -> io::Result<()> {
        self.tx.key_update(&mut self.kernel, true)
    }

    /// Fills `out` from buffered records, reading the socket when none is complete.
    fn poll_read_records(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut produced = false;
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
            if self.open_record()? {
                if std::mem::take(&mut self.rx.answered) {
                    // Our answer to a key update goes out even if nothing else is written.
                    if let Poll::Ready(Err(e)) = self.tx.poll_send(&mut self.tcp, cx) {
                        return Poll::Ready(Err(e));
                    }
                }
                continue;
            }
            match self.rx.poll_fill(&mut self.tcp, cx) {
                Poll::Ready(Ok(true)) => {}
                Poll::Ready(Ok(false)) if produced => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(false)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection without a TLS close_notify",
                    )))
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if produced => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Decrypts the next buffered record if it is complete. `Ok(false)`: more bytes needed.
    fn open_record(&mut self) -> io::Result<bool> {
        let rx = &mut self.rx;
        let available = &rx.buf[rx.start..];
        let Some(header) = available.get(..HEADER) else {
            return Ok(false);
        };
        let header = [header[0], header[1], header[2], header[3], header[4]];
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if header[0] != CONTENT_APPLICATION_DATA {
            return Err(invalid(format!(
                "TLS record of type {} after the handshake",
                header[0]
            )));
        }
        if !(TAG + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(invalid(format!("TLS record of {len} bytes")));
        }
        if available.len() < HEADER + len {
            return Ok(false);
        }
        let body = rx.start + HEADER..rx.start + HEADER + len;
        rx.start = body.end;
        let nonce = rx.cipher.next_nonce()?;
        let plain = rx
            .cipher
            .key
            .open_in_place(nonce, Aad::from(header), &mut rx.buf[body.clone()])
            .map_err(|_| invalid("TLS record failed authentication"))?;
        // The content type is the last byte that is not padding.
        let Some(at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(invalid("TLS record without a content type"));
        };
        if at > MAX_PLAINTEXT {
            return Err(invalid("TLS record longer than 16 KiB"));
        }
        match plain[at] {
            CONTENT_APPLICATION_DATA => rx.plain = body.start..body.start + at,
            CONTENT_ALERT => match plain[..at] {
                [_, ALERT_CLOSE_NOTIFY] => rx.closed = true,
                [_, description] => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!(
                            "received fatal TLS alert: {:?}",
                            rustls::AlertDescription::from(description)
                        ),
                    ))
                }
                _ => return Err(invalid("malformed TLS alert")),
            },
            CONTENT_HANDSHAKE => {
                let messages = plain[..at].to_vec();
                self.post_handshake(&messages)?;
            }
            other => return Err(invalid(format!("TLS content type {other}"))),
        }
        Ok(true)
    }

    /// Handshake messages after the handshake: key updates, and session tickets (ignored: we
    /// do not resume sessions).
    fn post_handshake(&mut self, mut messages: &[u8]) -> io::Result<()> {
        while !messages.is_empty() {
            let [kind, a, b, c, rest @ ..] = messages else {
                return Err(invalid("truncated TLS handshake message"));
            };
            let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            let Some(body) = rest.get(..len) else {
                return Err(invalid("truncated TLS handshake message"));
            };
            match (*kind, body) {
                (HANDSHAKE_KEY_UPDATE, [requested @ (0 | 1)]) => {
                    self.rx.cipher = Cipher::new(self.kernel.update_rx().map_err(tls_error)?)?;
                    if *requested == 1 && !self.tx.shut {
                        self.tx.key_update(&mut self.kernel, false)?;
                        self.rx.answered = true;
                    }
                }
                (HANDSHAKE_NEW_SESSION_TICKET, _) if self.kernel.is_client() => {}
                (kind, _) => {
                    return Err(invalid(format!(
                        "TLS handshake message {kind} after the handshake"
                    )))
                }
            }
            messages = &rest[len..];
        }
        Ok(())
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.rx.failed {
            return Poll::Ready(Err(invalid("the TLS connection failed earlier")));
        }
        let result = ready!(this.poll_read_records(cx, out));
        // Nothing after a bad record is trusted: every later read fails too.
        this.rx.failed = result.is_err();
        Poll::Ready(result)
    }
}

impl AsyncWrite for TlsStream {
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
        if this.tx.shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS stream already shut down",
            )));
        }
        if this.tx.pending() >= WRITE_HIGH {
            ready!(this.tx.poll_send(&mut this.tcp, cx))?;
        }
        let n = this.tx.seal_data(&mut this.kernel, bufs)?;
        if this.tx.pending() >= WRITE_HIGH {
            // The bytes are taken: if the socket is full, the next write or flush waits.
            if let Poll::Ready(Err(e)) = this.tx.poll_send(&mut this.tcp, cx) {
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
        ready!(this.tx.poll_send(&mut this.tcp, cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.tx.shut {
            this.tx
                .seal_control(CONTENT_ALERT, &[1, ALERT_CLOSE_NOTIFY])?;
            this.tx.shut = true;
        }
        ready!(this.tx.poll_send(&mut this.tcp, cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// Who the peer is, as the handshake established.
struct Peer {
    certificates: Vec<CertificateDer<'static>>,
    alpn: Option<Vec<u8>>,
}

impl Peer {
    fn of(conn: &rustls::CommonState) -> Self {
        Self {
            certificates: conn
                .peer_certificates()
                .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default(),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        }
    }
}

/// What rustls leaves for the key updates after the handshake.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

type Secrets = (u64, ConnectionTrafficSecrets);

impl Kernel {
    fn suite(&self) -> SupportedCipherSuite {
        match self {
            Self::Client(k) => k.negotiated_cipher_suite(),
            Self::Server(k) => k.negotiated_cipher_suite(),
        }
    }
    fn is_client(&self) -> bool {
        matches!(self, Self::Client(_))
    }
    fn update_tx(&mut self) -> Result<Secrets, rustls::Error> {
        match self {
            Self::Client(k) => k.update_tx_secret(),
            Self::Server(k) => k.update_tx_secret(),
        }
    }
    fn update_rx(&mut self) -> Result<Secrets, rustls::Error> {
        match self {
            Self::Client(k) => k.update_rx_secret(),
            Self::Server(k) => k.update_rx_secret(),
        }
    }
}

/// One direction's AEAD key and record sequence number.
struct Cipher {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Cipher {
    fn new((seq, secrets): Secrets) -> io::Result<Self> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(io::Error::other("unsupported TLS cipher suite")),
        };
        let key = UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| io::Error::other("bad TLS traffic key"))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| io::Error::other("bad TLS traffic IV"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The nonce of the next record (RFC 8446 §5.3), counting it.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| io::Error::other("TLS record sequence number exhausted"))?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// The receiving direction: `buf` holds what was read from the socket. `plain` is decrypted
/// application data not yet read, `start..` bytes not yet decrypted. The buffer is let go
/// whenever everything in it has been read and the socket has nothing more, so an idle
/// connection holds no buffer.
struct Rx {
    cipher: Cipher,
    buf: BytesMut,
    plain: Range<usize>,
    start: usize,
    /// The peer sent close_notify: end of stream.
    closed: bool,
    /// A key update of ours answering the peer's is waiting to be sent.
    answered: bool,
    /// A read failed (a record did not authenticate, the socket broke): nothing more is read.
    failed: bool,
}

/// Room a read buffer is given: [`READ_SIZE`] plus a whole record.
const READ_BUFFER: usize = READ_SIZE + MAX_RECORD;

impl Rx {
    /// Starts with what the handshake read past its end: application data that came with it,
    /// then the beginning of the next record.
    fn new(cipher: Cipher, leftover: Leftover) -> Self {
        let plain = leftover.plaintext.len();
        let mut buf = BytesMut::new();
        if plain + leftover.ciphertext.len() > 0 {
            buf.reserve(plain + leftover.ciphertext.len() + READ_BUFFER);
            buf.extend_from_slice(&leftover.plaintext);
            buf.extend_from_slice(&leftover.ciphertext);
        }
        Self {
            cipher,
            buf,
            plain: 0..plain,
            start: plain,
            closed: false,
            answered: false,
            failed: false,
        }
    }

    /// Reads more bytes from the socket; `Ok(false)` at its end. Called only when no
    /// decrypted data is waiting and no complete record is buffered.
    fn poll_fill(&mut self, tcp: &mut TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        self.plain = 0..0;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        if self.buf.capacity() - self.buf.len() < MAX_RECORD {
            // Less than a record's room left: the partial record moves to the front.
            self.buf.advance(self.start);
            self.start = 0;
        }
        self.buf.reserve(READ_BUFFER - self.buf.len());
        let n = match poll_read_buf(Pin::new(tcp), cx, &mut self.buf) {
            Poll::Ready(result) => result?,
            Poll::Pending => {
                if self.buf.is_empty() {
                    self.buf = BytesMut::new();
                }
                return Poll::Pending;
            }
        };
        Poll::Ready(Ok(n > 0))
    }
}

/// The sending direction: sealed records in `out`, of which `sent` bytes are written.
struct Tx {
    cipher: Cipher,
    /// Records to seal with one key (the cipher's confidentiality limit).
    limit: u64,
    out: Vec<u8>,
    sent: usize,
    /// close_notify is sealed: nothing more may be written.
    shut: bool,
}

impl Tx {
    fn pending(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Seals up to [`WRITE_BATCH`] bytes of `bufs` into records; returns how many it took.
    fn seal_data(&mut self, kernel: &mut Kernel, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let total = bufs.iter().map(|b| b.len()).sum::<usize>().min(WRITE_BATCH);
        let records = total.div_ceil(MAX_PLAINTEXT);
        self.out.reserve(total + records * (HEADER + 1 + TAG));
        let mut parts = bufs.iter().map(|b| &b[..]);
        let mut part: &[u8] = &[];
        let mut taken = 0;
        while taken < total {
            if self.cipher.seq.saturating_add(1) >= self.limit {
                self.key_update(kernel, false)?;
            }
            let at = self.out.len();
            self.out
                .extend_from_slice(&[CONTENT_APPLICATION_DATA, 3, 3, 0, 0]);
            let mut want = (total - taken).min(MAX_PLAINTEXT);
            taken += want;
            while want > 0 {
                if part.is_empty() {
                    part = parts.next().unwrap_or_default();
                    continue;
                }
                let n = want.min(part.len());
                self.out.extend_from_slice(&part[..n]);
                part = &part[n..];
                want -= n;
            }
            self.seal_record(at, CONTENT_APPLICATION_DATA)?;
        }
        Ok(taken)
    }

    /// Seals one record of a content type other than application data.
    fn seal_control(&mut self, content_type: u8, body: &[u8]) -> io::Result<()> {
        let at = self.out.len();
        self.out
            .extend_from_slice(&[CONTENT_APPLICATION_DATA, 3, 3, 0, 0]);
        self.out.extend_from_slice(body);
        self.seal_record(at, content_type)
    }

    /// Encrypts the record whose header starts at `at` and whose plaintext follows it.
    fn seal_record(&mut self, at: usize, content_type: u8) -> io::Result<()> {
        self.out.push(content_type);
        let len = self.out.len() - at - HEADER + TAG;
        let len = u16::try_from(len).map_err(|_| io::Error::other("TLS record too long"))?;
        self.out[at + 3..at + HEADER].copy_from_slice(&len.to_be_bytes());
        let header = [
            self.out[at],
            self.out[at + 1],
            self.out[at + 2],
            self.out[at + 3],
            self.out[at + 4],
        ];
        let nonce = self.cipher.next_nonce()?;
        let tag = self
            .cipher
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut self.out[at + HEADER..])
            .map_err(|_| io::Error::other("TLS encryption failed"))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Tells the peer our next records use fresh keys (asking it to update too, if
    /// `request`), then switches to them.
    fn key_update(&mut self, kernel: &mut Kernel, request: bool) -> io::Result<()> {
        self.seal_control(
            CONTENT_HANDSHAKE,
            &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, u8::from(request)],
        )?;
        self.cipher = Cipher::new(kernel.update_tx().map_err(tls_error)?)?;
        Ok(())
    }

    fn poll_send(&mut self, tcp: &mut TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut *tcp).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        // Sent: an idle connection keeps no buffer.
        self.out = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

/// Bytes the handshake read beyond its last message.
struct Leftover {
    /// Application data that arrived with the handshake's last flight, decrypted.
    plaintext: Vec<u8>,
    /// The beginning of the next record.
    ciphertext: Vec<u8>,
}

/// rustls' unbuffered client and server connections, driven alike.
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

enum Step {
    Again,
    Read,
    Done,
}

/// Drives a handshake to its end. rustls keeps no bytes of its own: what it has not consumed
/// when the handshake ends stays in our buffer and is returned.
async fn handshake<C: Unbuffered>(conn: &mut C, tcp: &mut TcpStream) -> io::Result<Leftover> {
    let mut incoming = vec![0u8; 16 * 1024];
    let mut filled = 0;
    let mut outgoing = Vec::new();
    let mut plaintext = Vec::new();
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[..filled]);
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                incoming.copy_within(discard..filled, 0);
                send_alert(conn, tcp, &mut incoming[..filled - discard]).await;
                return Err(tls_error(e));
            }
        };
        let step = match state {
            ConnectionState::EncodeTlsData(mut data) => {
                let at = outgoing.len();
                outgoing.resize(at + 4096, 0);
                let n = match data.encode(&mut outgoing[at..]) {
                    Ok(n) => n,
                    Err(EncodeError::InsufficientSize(e)) => {
                        outgoing.resize(at + e.required_size, 0);
                        data.encode(&mut outgoing[at..]).map_err(io::Error::other)?
                    }
                    Err(e) => return Err(io::Error::other(e)),
                };
                outgoing.truncate(at + n);
                Step::Again
            }
            ConnectionState::TransmitTlsData(data) => {
                tcp.write_all(&outgoing).await?;
                outgoing.clear();
                data.done();
                Step::Again
            }
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    plaintext.extend_from_slice(record.payload);
                }
                Step::Again
            }
            ConnectionState::BlockedHandshake => Step::Read,
            ConnectionState::WriteTraffic(_) => Step::Done,
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ))
            }
            other => {
                return Err(io::Error::other(format!(
                    "unexpected TLS handshake state {other:?}"
                )))
            }
        };
        incoming.copy_within(discard..filled, 0);
        filled -= discard;
        match step {
            Step::Again => {}
            Step::Done => {
                incoming.truncate(filled);
                return Ok(Leftover {
                    plaintext,
                    ciphertext: incoming,
                });
            }
            Step::Read => {
                if filled == incoming.len() {
                    if incoming.len() >= HANDSHAKE_LIMIT {
                        return Err(invalid("TLS handshake flight too large"));
                    }
                    incoming.resize(incoming.len() * 2, 0);
                }
                let n = tcp.read(&mut incoming[filled..]).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection during the TLS handshake",
                    ));
                }
                filled += n;
            }
        }
    }
}

/// After a failed handshake: sends the alert rustls queued, so the peer learns why.
/// `incoming` must be what the failed call left (rustls keeps offsets into it).
async fn send_alert<C: Unbuffered>(conn: &mut C, tcp: &mut TcpStream, incoming: &mut [u8]) {
    let mut outgoing = vec![0u8; 1024];
    let mut filled = 0;
    // Each call yields one queued record, then the stored error again.
    for _ in 0..4 {
        let UnbufferedStatus { state, .. } = conn.process(incoming);
        let Ok(ConnectionState::EncodeTlsData(mut data)) = state else {
            break;
        };
        match data.encode(&mut outgoing[filled..]) {
            Ok(n) => filled += n,
            Err(_) => break,
        }
    }
    let _ = tcp.write_all(&outgoing[..filled]).await;
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

#[cfg(test)]
mod tests {
    //! Our record layer against rustls' own (a peer in a thread with blocking sockets): data
    //! both ways, key updates from either side, close_notify, tampering, refused handshakes.

    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    struct Pki {
        ca_pem: String,
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    }

    fn pki(user: &str) -> Pki {
        let ca = ztm_pki::create_ca().unwrap();
        let signer = ztm_pki::CaSigner::load(&ca.cert_pem, &ca.key_pem).unwrap();
        let (key, public) = ztm_pki::generate_key().unwrap();
        let (hub_cert, _) = signer
            .sign_hub(
                "h1",
                &public,
                &["127.0.0.1".into()],
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        let revoked = ztm_pki::Revoked::default();
        let server = ztm_pki::hub_server_config(&ca.cert_pem, &hub_cert, &key, revoked).unwrap();
        let alice = signer.issue_user(user).unwrap();
        let client = ztm_pki::agent_client_config(
            &ca.cert_pem,
            &alice.cert_pem,
            &alice.key_pem,
            ztm_pki::ALPN_CONTROL,
        )
        .unwrap();
        Pki {
            ca_pem: ca.cert_pem,
            server: Arc::new(server),
            client: Arc::new(client),
        }
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from("127.0.0.1").unwrap()
    }

    /// Chunk sizes from 1 byte to a little over four records, reproducibly.
    fn chunks(count: usize) -> Vec<Vec<u8>> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..count)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = 1 + (x % (4 * MAX_PLAINTEXT as u64 + 100)) as usize;
                (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
            })
            .collect()
    }

    #[tokio::test]
    async fn our_client_talks_to_a_rustls_server_across_key_updates() {
        let pki = pki("alice");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server_config = pki.server.clone();
        let peer = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let conn = rustls::ServerConnection::new(server_config).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, sock);
            let mut buf = vec![0u8; 100_000];
            let mut echoed = 0usize;
            let mut updated = false;
            let clean = loop {
                match tls.read(&mut buf) {
                    Ok(0) => break true,
                    Ok(n) => {
                        tls.write_all(&buf[..n]).unwrap();
                        tls.flush().unwrap();
                        echoed += n;
                        if !updated && echoed > 1_000_000 {
                            tls.conn.refresh_traffic_keys().unwrap();
                            updated = true;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break false,
                    Err(e) => panic!("rustls server: {e}"),
                }
            };
            tls.conn.send_close_notify();
            tls.flush().unwrap();
            (clean, echoed, updated)
        });

        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = connect(pki.client.clone(), name(), tcp).await.unwrap();
        assert_eq!(tls.alpn_protocol(), Some(ztm_pki::ALPN_CONTROL));
        let hub = ztm_pki::cert_info(tls.peer_certificates()[0].as_ref()).unwrap();
        assert_eq!(hub.common_name, "hub/h1");
        // Our own key updates: one asked for, then automatic ones every 50 records.
        tls.tx.limit = 50;
        let mut sent = 0;
        for (i, chunk) in chunks(120).iter().enumerate() {
            if i == 60 {
                tls.update_keys().unwrap();
            }
            tls.write_all(chunk).await.unwrap();
            tls.flush().await.unwrap();
            let mut back = vec![0u8; chunk.len()];
            tls.read_exact(&mut back).await.unwrap();
            assert!(back == *chunk, "chunk {i} came back changed");
            sent += chunk.len();
        }
        assert!(tls.tx.cipher.seq < 50, "no automatic key update");
        tls.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let (clean, echoed, updated) = peer.join().unwrap();
        assert!(clean, "rustls did not see our close_notify");
        assert!(updated);
        assert_eq!(echoed, sent);
    }

    #[tokio::test]
    async fn our_server_talks_to_a_rustls_client_across_key_updates() {
        let pki = pki("alice");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client_config = pki.client.clone();
        let peer = std::thread::spawn(move || {
            let sock = std::net::TcpStream::connect(addr).unwrap();
            let conn = rustls::ClientConnection::new(client_config, name()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, sock);
            for (i, chunk) in chunks(120).iter().enumerate() {
                if i == 40 {
                    tls.conn.refresh_traffic_keys().unwrap();
                }
                tls.write_all(chunk).unwrap();
                tls.flush().unwrap();
                let mut back = vec![0u8; chunk.len()];
                tls.read_exact(&mut back).unwrap();
                assert!(back == *chunk, "chunk {i} came back changed");
            }
            tls.conn.send_close_notify();
            tls.flush().unwrap();
            let mut rest = Vec::new();
            // Ok only if our server ended with close_notify.
            tls.read_to_end(&mut rest).unwrap();
            rest.len()
        });

        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = accept(pki.server.clone(), tcp).await.unwrap();
        let alice = ztm_pki::cert_info(tls.peer_certificates()[0].as_ref()).unwrap();
        assert_eq!(alice.common_name, "alice");
        let mut buf = vec![0u8; 70_000];
        let mut echoed = 0usize;
        loop {
            let n = tls.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            tls.write_all(&buf[..n]).await.unwrap();
            tls.flush().await.unwrap();
            echoed += n;
            if echoed > 2_000_000 && tls.tx.cipher.seq > 20 {
                tls.update_keys().unwrap();
            }
        }
        tls.shutdown().await.unwrap();
        assert_eq!(peer.join().unwrap(), 0);
        assert_eq!(echoed, chunks(120).iter().map(Vec::len).sum::<usize>());
    }

    /// Forwards both ways between `from` and `to`, flipping one bit of the byte at
    /// `flip_at` of what `from` sends.
    async fn meddle(from: TcpStream, to: TcpStream, flip_at: usize) {
        let (mut from_r, mut from_w) = from.into_split();
        let (mut to_r, mut to_w) = to.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut to_r, &mut from_w).await;
        });
        let mut seen = 0;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = match from_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (seen..seen + n).contains(&flip_at) {
                buf[flip_at - seen] ^= 0x20;
            }
            seen += n;
            if to_w.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    }

    #[tokio::test]
    async fn a_changed_record_is_refused_and_none_of_it_is_read() {
        let pki = pki("alice");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (server_addr, front_addr) =
            (listener.local_addr().unwrap(), front.local_addr().unwrap());
        tokio::spawn(async move {
            let (client, _) = front.accept().await.unwrap();
            let server = TcpStream::connect(server_addr).await.unwrap();
            meddle(client, server, 40_000).await;
        });
        let client_config = pki.client.clone();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(front_addr).await.unwrap();
            let mut tls = connect(client_config, name(), tcp).await.unwrap();
            let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
            tls.write_all(&data).await.unwrap();
            tls.flush().await.unwrap();
            tls
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = accept(pki.server.clone(), tcp).await.unwrap();
        let mut got = Vec::new();
        let error = loop {
            let mut buf = vec![0u8; 4096];
            match tls.read(&mut buf).await {
                Ok(0) => panic!("end of stream instead of an error"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        assert!(error.to_string().contains("authentication"), "{error}");
        // The records after it are intact, but nothing more is read.
        let again = tls
            .read(&mut [0u8; 4096])
            .await
            .expect_err("read after a bad record");
        assert_eq!(again.kind(), io::ErrorKind::InvalidData);
        // Every byte read is the sender's, and the record holding byte 40,000 is not among them.
        assert!(got.len() < 40_000, "{} bytes read", got.len());
        assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        let _ = client.await;
    }

    #[tokio::test]
    async fn a_client_of_another_ca_is_refused_and_told_why() {
        let ours = pki("alice");
        // Mallory trusts our hub but holds a certificate of another CA.
        let other = ztm_pki::create_ca().unwrap();
        let signer = ztm_pki::CaSigner::load(&other.cert_pem, &other.key_pem).unwrap();
        let mallory = signer.issue_user("mallory").unwrap();
        let config = ztm_pki::agent_client_config(
            &ours.ca_pem,
            &mallory.cert_pem,
            &mallory.key_pem,
            ztm_pki::ALPN_CONTROL,
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            // TLS 1.3: the client is done before the server has checked its certificate.
            let mut tls = connect(Arc::new(config), name(), tcp).await?;
            let mut buf = [0u8; 16];
            tls.read(&mut buf).await
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let refused = accept(ours.server.clone(), tcp)
            .await
            .err()
            .expect("accepted");
        assert!(
            refused.to_string().contains("invalid peer certificate"),
            "{refused}"
        );
        let told = client.await.unwrap().expect_err("the client read data");
        assert!(told.to_string().contains("alert"), "{told}");
    }

    /// A rustls server that, once the handshake is done, writes `raw` to the socket itself
    /// and closes it; what our client reads.
    async fn read_after_raw(raw: &'static [u8]) -> io::Error {
        let pki = pki("alice");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let config = pki.server.clone();
        let peer = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let conn = rustls::ServerConnection::new(config).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, sock);
            while tls.conn.is_handshaking() {
                tls.conn.complete_io(&mut tls.sock).unwrap();
            }
            tls.write_all(b"fine").unwrap();
            tls.flush().unwrap();
            tls.sock.write_all(raw).unwrap();
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = connect(pki.client.clone(), name(), tcp).await.unwrap();
        let mut got = [0u8; 4];
        tls.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"fine");
        peer.join().unwrap();
        tls.read(&mut [0u8; 64]).await.expect_err("read garbage")
    }

    #[tokio::test]
    async fn malformed_or_cut_records_are_errors() {
        // A record longer than TLS allows.
        let e = read_after_raw(&[23, 3, 3, 0x4f, 0xff, 0, 0]).await;
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("20479 bytes"), "{e}");
        // A plaintext record type after the handshake.
        let e = read_after_raw(&[22, 3, 3, 0, 4, 1, 2, 3, 4]).await;
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // The connection ends inside a record, or between records without close_notify.
        let e = read_after_raw(&[23, 3, 3, 0, 40, 1, 2]).await;
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        let e = read_after_raw(&[]).await;
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }
}
