//! What a process uses, from /proc: memory (RSS), CPU time, threads, open descriptors; and a
//! sampler of peak RSS.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The first number of line `field:` of /proc/PID/status (`VmRSS`, `Threads`, `Uid`, ...).
pub fn status_field(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// VmRSS of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS")
}

/// Threads of `pid`.
pub fn threads(pid: u32) -> Option<u64> {
    status_field(pid, "Threads")
}

/// Open file descriptors of `pid`.
pub fn fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// utime + stime of `pid`, in clock ticks (see [`clock_ticks`]).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it start at `state`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second of /proc/PID/stat times (`getconf CLK_TCK`, else 100).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Samples the RSS of some processes every `period` on a thread of its own, keeping each one's
/// maximum, until finished or dropped.
pub struct PeakRss {
    peaks: Arc<Vec<AtomicU64>>,
    stop: Arc<AtomicBool>,
}

impl PeakRss {
    pub fn start(pids: Vec<u32>, period: Duration) -> PeakRss {
        let peaks: Arc<Vec<AtomicU64>> = Arc::new(pids.iter().map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peaks.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for (i, pid) in pids.iter().enumerate() {
                    if let Some(kib) = rss_kib(*pid) {
                        p[i].fetch_max(kib, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(period);
            }
        });
        PeakRss { peaks, stop }
    }

    /// Stops sampling (the thread ends within a period); the peak of each process in KiB, in
    /// the order given to `start` (0 for one never seen).
    pub fn finish(self) -> Vec<u64> {
        self.peaks
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process() {
        let me = std::process::id();
        assert!(rss_kib(me).is_some_and(|k| k > 0));
        assert!(threads(me).is_some_and(|t| t >= 1));
        assert!(fds(me).is_some_and(|n| n >= 3));
        assert!(cpu_ticks(me).is_some());
        assert!(status_field(me, "Vm").is_none(), "a field is matched whole");
        let peaks = PeakRss::start(vec![me, 0], Duration::from_millis(10));
        crate::poll::wait_until(Duration::from_secs(5), "a sample", || {
            peaks.peaks[0].load(Ordering::Relaxed) > 0
        });
        let got = peaks.finish();
        assert!(got[0] > 0 && got[1] == 0, "{got:?}");
    }
}
