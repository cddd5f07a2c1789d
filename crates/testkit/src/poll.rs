//! Waiting for a condition, with a deadline: processes and their APIs tell their state only
//! when asked, so the kit asks again every [`EVERY`] until the answer comes or time is up.

use std::time::{Duration, Instant};

/// How often a condition is checked again.
pub const EVERY: Duration = Duration::from_millis(50);

/// Checks `f` every [`EVERY`] until it yields a value; None once `within` has passed.
pub fn poll<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        let now = Instant::now();
        if now > deadline {
            return None;
        }
        std::thread::sleep(EVERY.min(deadline - now).max(Duration::from_millis(1)));
    }
}

/// Polls `f` until it returns true; panics with `what` after `within`.
pub fn wait_until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    if poll(within, || f().then_some(())).is_none() {
        panic!("timed out after {within:?} waiting for: {what}");
    }
}

/// Like [`wait_until`], but returns the time it took, or None on timeout.
pub fn time_until(within: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    poll(within, || f().then(|| start.elapsed()))
}

/// [`wait_until`] for async tests: checks `f` every [`EVERY`] without blocking the runtime;
/// panics with `what` after `within`, else returns the time it took.
pub async fn until(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(EVERY).await;
    }
    start.elapsed()
}

/// The runtime of a test that drives hand-made clients: two worker threads, as many as the
/// machine the tests are measured on has cores.
pub fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("a tokio runtime: {e}"),
    }
}
