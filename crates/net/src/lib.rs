//! I/O helpers shared by the hub, the agent and the command-line client: HTTP/2 request and
//! response plumbing, a small HTTP/1.1 client, reconnect backoff and wall-clock time.

pub mod backoff;
pub mod goaway;
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
