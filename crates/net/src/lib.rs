//! I/O helpers shared by the hub, the agent and the command-line client: HTTP/2 request and
//! response plumbing, a small HTTP/1.1 client, reconnect backoff and wall-clock time.

pub mod backoff;
pub mod h2io;
pub mod http1;
pub mod relay;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The socket under TLS: rustls reads the socket 4 KiB at a time, so a read buffer in between
/// turns the several reads each 16 KiB record would cost into one.
pub type TlsIo = tokio::io::BufReader<tokio::net::TcpStream>;

/// Size of [`TlsIo`]'s read buffer.
pub const TLS_READ_BUFFER: usize = 64 * 1024;

pub fn tls_io(tcp: tokio::net::TcpStream) -> TlsIo {
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, tcp)
}
