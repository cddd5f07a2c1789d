//! The handshake, run by rustls' unbuffered connections over our byte stream, up to the point
//! where rustls hands over the traffic keys (its kernel-connection API).

use std::io;
use std::sync::Arc;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::cipher::Kernel;
use crate::stream::{OwnStream, Peer};
use crate::{invalid, tls_error};

/// Largest handshake flight accepted (certificate chains are a few KiB).
const HANDSHAKE_LIMIT: usize = 256 * 1024;

/// Runs the server side of a handshake on `io`, then moves records with our record layer.
pub(crate) async fn accept<S>(config: Arc<ServerConfig>, mut io: S) -> io::Result<OwnStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let leftover = handshake(&mut conn, &mut io).await?;
    let peer = Peer::of(&conn);
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    OwnStream::new(io, Kernel::Server(kernel), secrets, peer, leftover)
}

/// Runs the client side of a handshake with the server `name` on `io`, then moves records
/// with our record layer.
pub(crate) async fn connect<S>(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    mut io: S,
) -> io::Result<OwnStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    let leftover = handshake(&mut conn, &mut io).await?;
    let peer = Peer::of(&conn);
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    OwnStream::new(io, Kernel::Client(kernel), secrets, peer, leftover)
}

/// Bytes the handshake read beyond its last message.
pub(crate) struct Leftover {
    /// Application data that arrived with the handshake's last flight, decrypted.
    pub(crate) plaintext: Vec<u8>,
    /// What followed it, not decrypted yet.
    pub(crate) ciphertext: Vec<u8>,
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
async fn handshake<C, S>(conn: &mut C, io: &mut S) -> io::Result<Leftover>
where
    C: Unbuffered,
    S: AsyncRead + AsyncWrite + Unpin,
{
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
                send_alert(conn, io, &mut incoming[..filled - discard]).await;
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
                io.write_all(&outgoing).await?;
                io.flush().await?;
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
                let n = io.read(&mut incoming[filled..]).await?;
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
async fn send_alert<C, S>(conn: &mut C, io: &mut S, incoming: &mut [u8])
where
    C: Unbuffered,
    S: AsyncWrite + Unpin,
{
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
    let _ = io.write_all(&outgoing[..filled]).await;
    let _ = io.flush().await;
}
