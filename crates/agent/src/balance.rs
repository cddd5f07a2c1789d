//! Load balancing over the endpoints that provide a service (docs/requirements.md §8): least connections,
//! ties broken round-robin. Pure logic plus a small counter guard.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// The order in which to try `providers`: fewest active connections first; among equals,
/// rotating from `cursor` so that new connections spread round-robin.
pub fn order(providers: &[String], active: &HashMap<String, usize>, cursor: usize) -> Vec<String> {
    let n = providers.len();
    let mut ranked: Vec<(usize, usize, &String)> = providers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let rotation = (i + n - cursor % n.max(1)) % n.max(1);
            (active.get(p).copied().unwrap_or(0), rotation, p)
        })
        .collect();
    ranked.sort();
    ranked.into_iter().map(|(_, _, p)| p.clone()).collect()
}

/// Per-port balancing state: active connections per endpoint and the round-robin cursor.
#[derive(Default)]
pub struct Balancer {
    active: Mutex<HashMap<String, usize>>,
    cursor: AtomicUsize,
}

impl Balancer {
    pub fn order(&self, providers: &[String]) -> Vec<String> {
        let cursor = self.cursor.fetch_add(1, Ordering::Relaxed);
        let active = self.active.lock();
        order(providers, &active, cursor)
    }

    /// Counts a connection to `endpoint` until the guard is dropped.
    pub fn track(self: &Arc<Self>, endpoint: &str) -> Active {
        *self.active.lock().entry(endpoint.to_string()).or_default() += 1;
        Active {
            balancer: self.clone(),
            endpoint: endpoint.to_string(),
        }
    }
}

pub struct Active {
    balancer: Arc<Balancer>,
    endpoint: String,
}

impl Drop for Active {
    fn drop(&mut self) {
        let mut active = self.balancer.active.lock();
        if let Some(n) = active.get_mut(&self.endpoint) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                active.remove(&self.endpoint);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn round_robin_among_equals() {
        let p = names(&["a", "b", "c"]);
        let idle = HashMap::new();
        let firsts: Vec<String> = (0..6).map(|c| order(&p, &idle, c)[0].clone()).collect();
        assert_eq!(firsts, names(&["a", "b", "c", "a", "b", "c"]));
        // Every provider is still tried, once.
        let mut all = order(&p, &idle, 1);
        all.sort();
        assert_eq!(all, p);
    }

    #[test]
    fn least_connections_first() {
        let p = names(&["a", "b"]);
        let active: HashMap<String, usize> = [("a".to_string(), 3)].into();
        for c in 0..4 {
            assert_eq!(order(&p, &active, c), names(&["b", "a"]));
        }
        assert!(order(&[], &active, 5).is_empty());
    }

    #[test]
    fn guard_counts() {
        let b = Arc::new(Balancer::default());
        let g1 = b.track("a");
        let _g2 = b.track("a");
        assert_eq!(b.order(&names(&["a", "b"]))[0], "b");
        drop(g1);
        assert_eq!(b.active.lock().get("a"), Some(&1));
    }
}
