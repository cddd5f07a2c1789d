//! Capped exponential backoff with jitter, for reconnect loops.

use std::time::Duration;

pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt: the current step ±25%, then the step doubles up to
    /// the cap.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter: f64 = rand::random::<f64>() * 0.5 + 0.75;
        base.mul_f64(jitter)
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(8));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(375) && delays[0] <= Duration::from_millis(625));
        for d in &delays {
            assert!(*d <= Duration::from_secs(10), "{d:?}");
        }
        assert!(delays[9] >= Duration::from_secs(6));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(625));
    }
}
