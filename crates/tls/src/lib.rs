//! Mutual TLS 1.3 between agents and hubs.
//!
//! rustls runs the handshake, so it alone decides who is admitted: certificate chains,
//! revocation, ALPN, cipher suites. Once the handshake is done, rustls hands over the traffic
//! keys (its "kernel connection" API, made for kernel TLS) and [`TlsStream`] moves the records
//! itself: it reads the socket straight into one buffer, decrypts each record in place and
//! gives the plaintext to the reader, and it seals outgoing bytes into records in one reused
//! buffer. rustls' own stream copies every received record twice more and allocates for each;
//! on the tunnel's path, which crosses TLS four times, that was a fifth of the relay CPU
//! (PROTOCOL.md, "Records").
//!
//! What the record layer does is RFC 8446 §5 and §4.6.3: AEAD records with a per-direction
//! sequence number, content type and padding inside the encryption, alerts, and key updates in
//! both directions (ours before the cipher's confidentiality limit, the peer's whenever it
//! sends one, within limits). Anything else after the handshake ends the connection with an
//! alert and an error. PROTOCOL.md, "Records", lists what is accepted and refused.
//!
//! `ZTM_TLS=rustls` ([`Records::Rustls`]) moves the records with tokio-rustls' stream instead,
//! behind the same [`TlsStream`]: a way back, and the reference the benchmark compares with.
//!
//! The parts: `handshake.rs` drives rustls' handshake, `cipher.rs` holds traffic keys,
//! `records.rs` opens and seals records, `stream.rs` moves them over the byte stream.

mod cipher;
mod handshake;
mod records;
mod stream;

#[cfg(test)]
mod tests;

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub use records::{MAX_PLAINTEXT, READ_SIZE};

use stream::OwnStream;

/// Who moves the records after the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Records {
    /// Our own record layer (the default).
    Own,
    /// tokio-rustls' stream, as before the record layer of our own (`ZTM_TLS=rustls`).
    Rustls,
}

impl Records {
    /// The environment variable that chooses.
    pub const VAR: &'static str = "ZTM_TLS";

    /// What `ZTM_TLS` asks for: unset, empty or `own` for our own record layer, `rustls` for
    /// tokio-rustls' stream. Anything else is an error.
    pub fn from_env() -> Result<Records, String> {
        match std::env::var(Self::VAR) {
            Err(std::env::VarError::NotPresent) => Ok(Records::Own),
            Ok(v) if v.is_empty() || v == "own" => Ok(Records::Own),
            Ok(v) if v == "rustls" => Ok(Records::Rustls),
            Ok(v) => Err(format!("{}={v}: expected \"own\" or \"rustls\"", Self::VAR)),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(format!("{}: expected \"own\" or \"rustls\"", Self::VAR))
            }
        }
    }

    /// What [`accept`] and [`connect`] use: `ZTM_TLS`, read once (a value that is not valid
    /// counts as unset; processes check it at start with [`Records::from_env`]).
    pub fn configured() -> Records {
        static CONFIGURED: OnceLock<Records> = OnceLock::new();
        *CONFIGURED.get_or_init(|| Records::from_env().unwrap_or(Records::Own))
    }
}

/// Runs the server side of a handshake on `io`, records as [`Records::configured`].
pub async fn accept<S>(config: Arc<ServerConfig>, io: S) -> io::Result<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    accept_with(Records::configured(), config, io).await
}

/// Runs the client side of a handshake with the server `name` on `io`, records as
/// [`Records::configured`].
pub async fn connect<S>(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    io: S,
) -> io::Result<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    connect_with(Records::configured(), config, name, io).await
}

/// [`accept`] with the records moved by `records`.
pub async fn accept_with<S>(
    records: Records,
    config: Arc<ServerConfig>,
    io: S,
) -> io::Result<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let inner = match records {
        Records::Own => Inner::Own(handshake::accept(config, io).await?),
        Records::Rustls => {
            let tls = tokio_rustls::TlsAcceptor::from(config).accept(io).await?;
            Inner::Rustls(Box::new(tls.into()))
        }
    };
    Ok(TlsStream {
        inner,
        failure: Failure::default(),
    })
}

/// [`connect`] with the records moved by `records`.
pub async fn connect_with<S>(
    records: Records,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    io: S,
) -> io::Result<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let inner = match records {
        Records::Own => Inner::Own(handshake::connect(config, name, io).await?),
        Records::Rustls => {
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, io)
                .await?;
            Inner::Rustls(Box::new(tls.into()))
        }
    };
    Ok(TlsStream {
        inner,
        failure: Failure::default(),
    })
}

/// A TLS 1.3 connection after its handshake, on the byte stream `S`: read and write
/// plaintext.
pub struct TlsStream<S = TcpStream> {
    inner: Inner<S>,
    failure: Failure,
}

/// What ended a [`TlsStream`], as rustls tells it (a certificate refused, an alert received),
/// once it is known: kept apart from the stream because the owner of the stream (an HTTP/2
/// library) may pass read errors on without their type.
#[derive(Clone, Debug, Default)]
pub struct Failure(Arc<OnceLock<rustls::Error>>);

impl Failure {
    pub fn get(&self) -> Option<&rustls::Error> {
        self.0.get()
    }
}

// Our stream, on the data path, stays inline as it was before the choice existed; the other
// is boxed.
#[allow(clippy::large_enum_variant)]
enum Inner<S> {
    Own(OwnStream<S>),
    Rustls(Box<tokio_rustls::TlsStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// A handle on what will have ended this stream, if TLS ended it.
    pub fn failure(&self) -> Failure {
        self.failure.clone()
    }

    /// The peer's certificate chain, its own certificate first (empty if it sent none).
    pub fn peer_certificates(&self) -> &[CertificateDer<'static>] {
        match &self.inner {
            Inner::Own(s) => s.peer_certificates(),
            Inner::Rustls(s) => s.get_ref().1.peer_certificates().unwrap_or_default(),
        }
    }

    /// The peer's certificate chain, taken out of the stream (a copy, if rustls moves the
    /// records): a server that has read what it needs from it does not keep it for as long as
    /// the connection lasts. [`TlsStream::peer_certificates`] is empty afterwards.
    pub fn take_peer_certificates(&mut self) -> Vec<CertificateDer<'static>> {
        match &mut self.inner {
            Inner::Own(s) => s.take_peer_certificates(),
            Inner::Rustls(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .map(<[_]>::to_vec)
                .unwrap_or_default(),
        }
    }

    /// The application protocol agreed by ALPN.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        match &self.inner {
            Inner::Own(s) => s.alpn_protocol(),
            Inner::Rustls(s) => s.get_ref().1.alpn_protocol(),
        }
    }

    /// Who moves the records.
    pub fn records(&self) -> Records {
        match &self.inner {
            Inner::Own(_) => Records::Own,
            Inner::Rustls(_) => Records::Rustls,
        }
    }

    /// Switches to fresh sending keys now and asks the peer to do the same (a TLS 1.3 key
    /// update; it also happens by itself before the cipher's limit). Sent with the next flush.
    pub fn update_keys(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Inner::Own(s) => s.update_keys(),
            Inner::Rustls(s) => match &mut **s {
                tokio_rustls::TlsStream::Client(s) => s.get_mut().1.refresh_traffic_keys(),
                tokio_rustls::TlsStream::Server(s) => s.get_mut().1.refresh_traffic_keys(),
            }
            .map_err(tls_error),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let read = match &mut this.inner {
            Inner::Own(s) => Pin::new(s).poll_read(cx, out),
            Inner::Rustls(s) => Pin::new(&mut **s).poll_read(cx, out),
        };
        if let Poll::Ready(Err(e)) = &read {
            if let Some(tls) = tls_failure(e) {
                let _ = this.failure.0.set(tls.clone());
            }
        }
        read
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Own(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Rustls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Own(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Inner::Rustls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Inner::Own(s) => s.is_write_vectored(),
            Inner::Rustls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Own(s) => Pin::new(s).poll_flush(cx),
            Inner::Rustls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Own(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Rustls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// The TLS error under an I/O error from a [`TlsStream`] or its handshake, if it has one: what
/// rustls decided in the handshake (a certificate refused, an alert received), or the fatal
/// alert the peer sent afterwards.
pub fn tls_failure(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

pub(crate) fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

pub(crate) fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}
