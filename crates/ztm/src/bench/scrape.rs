//! `ztm bench --scrape`: while the benchmark runs, a scraper reads the hub's metrics listener
//! and both agents' `GET /metrics` every second, as a Prometheus watching the mesh would
//! (README, "Metrics"), so that what being watched costs shows in the benchmark's own figures.
//! It runs on a thread of its own, off the runtime that drives the load.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How often each target is scraped.
pub const EVERY: Duration = Duration::from_secs(1);

/// What the scrapes of one target came to.
#[derive(Clone, Debug, Default)]
pub struct Scraped {
    pub name: &'static str,
    /// Scrapes answered 200.
    pub ok: u64,
    /// Scrapes that failed or were answered otherwise.
    pub failed: u64,
    /// Bytes of the answers, and the time they took, summed.
    pub bytes: u64,
    pub time: Duration,
    /// The slowest answer.
    pub max: Duration,
    /// What the first failure was.
    pub first_error: Option<String>,
}

impl Scraped {
    fn record(&mut self, took: Duration, answer: std::io::Result<ztm_testkit::http::Resp>) {
        match answer {
            Ok(r) if r.status == 200 => {
                self.ok += 1;
                self.bytes += r.body.len() as u64;
                self.time += took;
                self.max = self.max.max(took);
            }
            other => {
                self.failed += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(match other {
                        Ok(r) => format!("{} {}", r.status, r.text().trim()),
                        Err(e) => e.to_string(),
                    });
                }
            }
        }
    }

    fn mean_ms(&self) -> f64 {
        if self.ok == 0 {
            return 0.0;
        }
        self.time.as_secs_f64() * 1e3 / self.ok as f64
    }

    fn mean_bytes(&self) -> u64 {
        self.bytes.checked_div(self.ok).unwrap_or(0)
    }

    /// Adds the scrapes of another run on the same target.
    fn add(&mut self, other: &Scraped) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.bytes += other.bytes;
        self.time += other.time;
        self.max = self.max.max(other.max);
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }
}

/// The scrapes of every target, over every stack the benchmark ran.
#[derive(Clone, Debug, Default)]
pub struct Scrapes(pub Vec<Scraped>);

impl Scrapes {
    /// Adds `run` to the totals, target by target.
    pub fn add(&mut self, run: Vec<Scraped>) {
        for s in run {
            match self.0.iter_mut().find(|t| t.name == s.name) {
                Some(t) => t.add(&s),
                None => self.0.push(s),
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|s| s.ok).sum()
    }

    /// One line for the benchmark's table.
    pub fn line(&self) -> String {
        let each: Vec<String> = self
            .0
            .iter()
            .map(|s| {
                format!(
                    "{} {} ({:.0} KiB, {:.2} ms mean, {:.1} ms max{})",
                    s.name,
                    s.ok,
                    s.mean_bytes() as f64 / 1024.0,
                    s.mean_ms(),
                    s.max.as_secs_f64() * 1e3,
                    if s.failed == 0 {
                        String::new()
                    } else {
                        format!(
                            ", {} failed: {}",
                            s.failed,
                            s.first_error.as_deref().unwrap_or("")
                        )
                    }
                )
            })
            .collect();
        format!(
            "metrics scrapes every {} s during the run: {} in all; {}",
            EVERY.as_secs(),
            self.total(),
            each.join("; ")
        )
    }

    pub fn json(&self) -> Value {
        let targets: serde_json::Map<String, Value> = self
            .0
            .iter()
            .map(|s| {
                (
                    s.name.to_string(),
                    json!({
                        "scrapes": s.ok,
                        "failed": s.failed,
                        "first_error": s.first_error,
                        "mean_bytes": s.mean_bytes(),
                        "mean_ms": s.mean_ms(),
                        "max_ms": s.max.as_secs_f64() * 1e3,
                    }),
                )
            })
            .collect();
        json!({
            "interval_s": EVERY.as_secs_f64(),
            "scrapes": self.total(),
            "targets": targets,
        })
    }
}

/// Scrapes its targets every [`EVERY`] until [`Scraper::finish`].
pub struct Scraper {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<Vec<Scraped>>,
}

impl Scraper {
    /// Starts scraping `targets` (a name, and the address whose `/metrics` to read).
    pub fn start(targets: Vec<(&'static str, String)>) -> std::io::Result<Scraper> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-scrape".into())
            .spawn(move || {
                let mut scraped: Vec<Scraped> = targets
                    .iter()
                    .map(|(name, _)| Scraped {
                        name,
                        ..Scraped::default()
                    })
                    .collect();
                let mut next = Instant::now();
                loop {
                    for ((_, addr), s) in targets.iter().zip(scraped.iter_mut()) {
                        let started = Instant::now();
                        let answer = ztm_testkit::http::http(addr, "GET", "/metrics", &[], b"");
                        s.record(started.elapsed(), answer);
                    }
                    next += EVERY;
                    let wait = next.saturating_duration_since(Instant::now());
                    // A message, or the benchmark gone: stop.
                    if !matches!(
                        stopped.recv_timeout(wait),
                        Err(mpsc::RecvTimeoutError::Timeout)
                    ) {
                        return scraped;
                    }
                }
            })?;
        Ok(Scraper { stop, thread })
    }

    /// Stops scraping; what the scrapes came to, by target.
    pub fn finish(self) -> Vec<Scraped> {
        let _ = self.stop.send(());
        self.thread.join().unwrap_or_default()
    }
}
