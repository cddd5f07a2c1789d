//! The CA's HTTPS listener: TCP connections are accepted and their TLS handshakes run in the
//! background, bounded (in time, per source address and in all), and the finished ones are
//! handed to the HTTP server. A stranger who can reach the CA's port can hold a few
//! handshakes for a few seconds, not the CA.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use ztm_pki::rustls::ServerConfig;

/// A handshake must be done within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress from one address ...
pub const HANDSHAKES_PER_SOURCE: usize = 8;
/// ... and from all of them.
pub const HANDSHAKES: usize = 256;

/// Counts handshakes in progress by source address.
#[derive(Clone, Default)]
struct InProgress(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// A place taken in [`InProgress`]; given back when dropped.
struct Place(InProgress, IpAddr);

impl InProgress {
    fn take(&self, ip: IpAddr) -> Option<Place> {
        let mut map = self.0.lock();
        let total: usize = map.values().sum();
        let mine = map.entry(ip).or_insert(0);
        if *mine >= HANDSHAKES_PER_SOURCE || total >= HANDSHAKES {
            return None;
        }
        *mine += 1;
        Some(Place(self.clone(), ip))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut map = self.0 .0.lock();
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// A listener whose connections are TLS streams, for `axum::serve`.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let in_progress = InProgress::default();
        let task = tokio::spawn(async move {
            loop {
                let (tcp, addr) = match listener.accept().await {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::debug!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(place) = in_progress.take(addr.ip()) else {
                    tracing::debug!("refused a connection from {addr}: too many handshakes");
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            drop(place);
                            let _ = tx.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!("TLS handshake with {addr} failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake with {addr} timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local, task })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept task ended (it only does when aborted): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_are_bounded_per_source() {
        let p = InProgress::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let held: Vec<Place> = (0..HANDSHAKES_PER_SOURCE)
            .map(|_| p.take(a).unwrap())
            .collect();
        assert!(p.take(a).is_none());
        let other = p.take(b);
        assert!(other.is_some());
        drop(held);
        assert!(p.take(a).is_some());
    }
}
