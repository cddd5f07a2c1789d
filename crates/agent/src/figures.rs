//! A mapped port's live figures, as the REST API shows them (`stats` of a port): tunnels open
//! now, opened and failed so far, bytes each way, and the last error. They count from the
//! moment the port was mapped (or the agent started), and each counts in the agent's totals
//! for Prometheus too ([`crate::metrics`]).
//!
//! Counting costs an atomic add: the relays add bytes as they move them, through the counters
//! [`PortFigures::meters`] hands out (`ztm_relay::Meter`), so a long-lived connection's bytes
//! show while it is open. Only the last error takes a lock, once per failure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use ztm_proto::model::{PortStats, TimedMessage};

use crate::metrics::{Metrics, OpenTunnel, Tunnels};

/// The figures of one mapped port.
pub struct PortFigures {
    active: AtomicU64,
    total: AtomicU64,
    failed: AtomicU64,
    to_service: AtomicU64,
    from_service: AtomicU64,
    last_error: Mutex<Option<TimedMessage>>,
    metrics: Arc<Metrics>,
}

/// The longest error message kept (longer ones are cut, on a character boundary).
pub const ERROR_MAX: usize = 1024;

/// `message` cut to at most [`ERROR_MAX`] bytes.
fn shortened(message: &str) -> String {
    if message.len() <= ERROR_MAX {
        return message.to_string();
    }
    let mut end = ERROR_MAX - '…'.len_utf8();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

/// One more tunnel open on a port (and in the agent's totals) while it lives.
pub struct Open<'a> {
    port: &'a AtomicU64,
    _agent: OpenTunnel,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.port.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PortFigures {
    pub fn new(metrics: Arc<Metrics>) -> PortFigures {
        PortFigures {
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            to_service: AtomicU64::new(0),
            from_service: AtomicU64::new(0),
            last_error: Mutex::new(None),
            metrics,
        }
    }

    fn agent(&self) -> &Tunnels {
        &self.metrics.port
    }

    /// A tunnel opened after `took`; it counts as active until the guard is dropped.
    pub fn opened(&self, took: Duration) -> Open<'_> {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        Open {
            port: &self.active,
            _agent: self.agent().opened(took),
        }
    }

    /// A connection or flow whose tunnel could not be opened, and why, at `now` (ms since the
    /// epoch).
    pub fn failed(&self, message: &str, now: u64) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.agent().failed();
        self.error(message, now);
    }

    /// An error that is not a failure to open (an open tunnel that broke), at `now`.
    pub fn error(&self, message: &str, now: u64) {
        *self.last_error.lock() = Some(TimedMessage::new(now, shortened(message)));
    }

    /// The counters a relay adds bytes to, (to the service, from it): this port's and the
    /// agent's.
    pub fn meters(&self) -> ([&AtomicU64; 2], [&AtomicU64; 2]) {
        let agent = self.agent();
        (
            [&self.to_service, &agent.to_service],
            [&self.from_service, &agent.from_service],
        )
    }

    /// The figures now.
    pub fn stats(&self) -> PortStats {
        let last = self.last_error.lock().clone();
        PortStats {
            active: self.active.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            bytes_to_service: self.to_service.load(Ordering::Relaxed),
            bytes_from_service: self.from_service.load(Ordering::Relaxed),
            last_error: last,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures() -> (PortFigures, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new().unwrap());
        (PortFigures::new(metrics.clone()), metrics)
    }

    #[test]
    fn tunnels_count_while_open_and_in_total() {
        let (f, metrics) = figures();
        let a = f.opened(Duration::from_millis(2));
        let b = f.opened(Duration::from_millis(2));
        assert_eq!((f.stats().active, f.stats().total), (2, 2));
        drop(a);
        assert_eq!((f.stats().active, f.stats().total), (1, 2));
        drop(b);
        let c = f.opened(Duration::from_millis(2));
        assert_eq!((f.stats().active, f.stats().total), (1, 3));
        drop(c);
        assert_eq!(f.stats().active, 0);
        let text = metrics.render(&Default::default());
        assert!(text.contains("ztm_agent_tunnels_opened_total{side=\"port\"} 3"));
        assert!(text.contains("ztm_agent_tunnels_active{side=\"port\"} 0"));
    }

    #[test]
    fn bytes_count_in_the_port_and_in_the_agent() {
        let (f, metrics) = figures();
        let other = PortFigures::new(metrics.clone());
        for (port, up, down) in [(&f, 100, 5), (&other, 20, 1), (&f, 3, 0)] {
            let (to, from) = port.meters();
            for c in to {
                c.fetch_add(up, Ordering::Relaxed);
            }
            for c in from {
                c.fetch_add(down, Ordering::Relaxed);
            }
        }
        let s = f.stats();
        assert_eq!((s.bytes_to_service, s.bytes_from_service), (103, 5));
        let s = other.stats();
        assert_eq!((s.bytes_to_service, s.bytes_from_service), (20, 1));
        assert_eq!(metrics.port.to_service.load(Ordering::Relaxed), 123);
        assert_eq!(metrics.port.from_service.load(Ordering::Relaxed), 6);
        assert_eq!(metrics.service.to_service.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn failures_count_and_the_last_error_is_kept_with_its_time() {
        let (f, metrics) = figures();
        assert_eq!(f.stats().last_error, None);
        f.failed("no provider", 1_000);
        f.failed("refused", 2_000);
        let s = f.stats();
        assert_eq!((s.failed, s.total, s.active), (2, 0, 0));
        assert_eq!(s.last_error, Some(TimedMessage::new(2_000, "refused")));
        // A tunnel that broke once open is the last error, not a failure to open.
        f.error("connection reset", 3_000);
        let s = f.stats();
        assert_eq!(s.failed, 2);
        assert_eq!(
            s.last_error,
            Some(TimedMessage::new(3_000, "connection reset"))
        );
        let text = metrics.render(&Default::default());
        assert!(text.contains("ztm_agent_tunnels_failed_total{side=\"port\"} 2"));
    }

    #[test]
    fn long_errors_are_cut_on_a_character_boundary() {
        assert_eq!(shortened("short"), "short");
        let exact = "x".repeat(ERROR_MAX);
        assert_eq!(shortened(&exact), exact);
        for long in ["é".repeat(ERROR_MAX), "ab€".repeat(ERROR_MAX)] {
            let cut = shortened(&long);
            assert!(cut.len() <= ERROR_MAX, "{}", cut.len());
            assert!(cut.ends_with('…'));
            assert!(long.starts_with(cut.trim_end_matches('…')));
        }
    }

    #[test]
    fn stats_serialise_in_the_style_of_the_api() {
        let (f, _) = figures();
        let _open = f.opened(Duration::ZERO);
        f.failed("no answer", 42);
        let json = serde_json::to_value(f.stats()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "active": 1,
                "total": 1,
                "failed": 1,
                "bytesToService": 0,
                "bytesFromService": 0,
                "lastError": {"time": 42, "message": "no answer"},
            })
        );
    }
}
