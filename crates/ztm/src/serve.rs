//! Process plumbing shared by the long-running roles: listening sockets with clear errors,
//! `~` in paths, and the shutdown signal.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{anyhow, Result};
use tokio::net::TcpListener;

/// Expands a leading `~` to the home directory.
pub fn expand_home(path: &str) -> PathBuf {
    if path == "~" || path.starts_with("~/") {
        if let Some(home) = std::env::var_os("HOME") {
            return PathBuf::from(home).join(path.trim_start_matches('~').trim_start_matches('/'));
        }
    }
    PathBuf::from(path)
}

/// Parses `HOST:PORT` (host may be a name such as `localhost`) into the first address it
/// resolves to.
pub fn parse_listen(s: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| anyhow!("bad listen address {s:?}: {e} (expected HOST:PORT)"))?
        .next()
        .ok_or_else(|| anyhow!("bad listen address {s:?}: it resolves to nothing"))
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            anyhow!("cannot listen on {addr}: the port is already in use")
        }
        std::io::ErrorKind::PermissionDenied => {
            anyhow!("cannot listen on {addr}: permission denied")
        }
        _ => anyhow!("cannot listen on {addr}: {e}"),
    })
}

/// Resolves when the process gets SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
