//! What the hub gives one source address, one user and the whole process, and the counters
//! that enforce it. The bounds are in docs/security.md and PROTOCOL.md ("Limits").

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};

/// The hub's bounds. Defaults suit a hub of 10,000 endpoints; every one is a number an
/// operator may change (`ztm hub --help`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Endpoints one user may have online at this hub (and offline entries kept for it).
    pub endpoints_per_user: usize,
    /// Services one user's online endpoints may publish together.
    pub services_per_user: usize,
    /// Endpoints the hub keeps (online and recently offline together).
    pub endpoints: usize,
    /// Authenticated connections one user may hold (an endpoint uses two).
    pub connections_per_user: usize,
    /// Connections one source address may hold before its TLS handshake is done (IPv6: one
    /// /64 counts as one address).
    pub unauthenticated_per_source: usize,
    /// Connections the hub holds before their TLS handshakes are done, from all sources.
    pub unauthenticated: usize,
    /// TLS handshakes computed at once.
    pub handshakes: usize,
    /// Requests with a body (registrations, service lists, management) one user may have in
    /// progress at once, over all its connections.
    pub bodies_per_user: usize,
    /// Requests with a body in progress on one connection.
    pub bodies_per_connection: usize,
    /// Requests with a body in progress in the whole hub.
    pub bodies: usize,
    /// Tunnels one user may have open through this hub at once.
    pub tunnels_per_user: usize,
    /// Tunnels open through the hub at once.
    pub tunnels: usize,
    /// How long a reverse connection started on demand keeps its HTTP/2 (its buffers in the
    /// hub) with no request asking for it and no tunnel open, before it goes back to dormant.
    pub reverse_idle: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            endpoints_per_user: 1_000,
            services_per_user: 10_000,
            endpoints: 100_000,
            connections_per_user: 2_048,
            unauthenticated_per_source: 64,
            unauthenticated: 4_096,
            handshakes: 256,
            bodies_per_user: 32,
            bodies_per_connection: 8,
            bodies: 256,
            tunnels_per_user: 20_000,
            tunnels: 200_000,
            reverse_idle: ztm_proto::wire::REVERSE_IDLE,
        }
    }
}

/// A connection must send the first bytes of its ClientHello within this...
pub const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// ...and read a request body (registration, service list, management) within this.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest registration or service-list body.
pub const MAX_CONTROL_BODY: usize = 256 * 1024;
/// Most services one endpoint may publish.
pub const MAX_SERVICES: usize = 1_000;
/// Most names in one service's `users` list.
pub const MAX_SERVICE_USERS: usize = 1_000;
/// Most names in all `users` lists of one endpoint's services together.
pub const MAX_USER_ENTRIES: usize = 10_000;

/// Open files the hub keeps for itself whatever connects: its listener, its connections to the
/// CA (certificates, revocations), its log, the runtime's own.
pub const FILE_RESERVE: u64 = 64;

/// What the hub's open-file limit leaves for connections (each connection is a file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileBudget {
    /// Connections the hub holds at once; one more is accepted and closed at once, so that
    /// its agent hears "no" instead of waiting in the kernel's queue.
    pub connections: usize,
    /// Of those, connections still in their TLS handshake (every stranger's): at most a
    /// quarter, so that strangers can never take the files honest agents need.
    pub unauthenticated: usize,
}

impl FileBudget {
    /// The budget for an open-file limit of `files` (`None`: unknown, the OS bounds it).
    pub fn of(files: Option<u64>, limits: &Limits) -> FileBudget {
        let Some(files) = files else {
            return FileBudget {
                connections: usize::MAX,
                unauthenticated: limits.unauthenticated,
            };
        };
        let connections = usize::try_from(files.saturating_sub(FILE_RESERVE)).unwrap_or(usize::MAX);
        FileBudget {
            connections,
            unauthenticated: limits.unauthenticated.min(connections / 4),
        }
    }
}

/// The address a per-source bound counts: IPv4 addresses one by one, IPv6 by /64 (one host
/// usually has a whole /64).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Counts what each key (a source address, a user) holds, up to a bound per key and a bound
/// over all keys. A slot is held by the [`Slot`] it hands out and given back when that is
/// dropped.
pub struct Counter<K: Eq + Hash + Clone + Send + 'static> {
    inner: Arc<Mutex<Counts<K>>>,
}

struct Counts<K> {
    per_key: HashMap<K, usize>,
    total: usize,
    max_per_key: usize,
    max_total: usize,
}

/// Why a [`Counter`] refused a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// This key holds its bound.
    Key(usize),
    /// All keys together hold the overall bound.
    Total(usize),
}

impl<K: Eq + Hash + Clone + Send + 'static> Clone for Counter<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<K: Eq + Hash + Clone + Send + 'static> Counter<K> {
    pub fn new(max_per_key: usize, max_total: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Counts {
                per_key: HashMap::new(),
                total: 0,
                max_per_key,
                max_total,
            })),
        }
    }

    fn counts(&self) -> MutexGuard<'_, Counts<K>> {
        self.inner.lock()
    }

    /// A slot for `key`, if it and the total are under their bounds.
    pub fn try_take(&self, key: K) -> Result<Slot<K>, Refused> {
        let mut c = self.counts();
        if c.total >= c.max_total {
            return Err(Refused::Total(c.max_total));
        }
        let max_per_key = c.max_per_key;
        let held = c.per_key.entry(key.clone()).or_insert(0);
        if *held >= max_per_key {
            return Err(Refused::Key(max_per_key));
        }
        *held += 1;
        c.total += 1;
        Ok(Slot {
            counter: self.clone(),
            key: Some(key),
        })
    }

    /// Slots `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        self.counts().per_key.get(key).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.counts().total
    }

    fn give_back(&self, key: &K) {
        let mut c = self.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(held) = c.per_key.get_mut(key) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                c.per_key.remove(key);
            }
        }
    }
}

/// One slot of a [`Counter`], given back when dropped.
pub struct Slot<K: Eq + Hash + Clone + Send + 'static> {
    counter: Counter<K>,
    key: Option<K>,
}

impl<K: Eq + Hash + Clone + Send + 'static> Drop for Slot<K> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.counter.give_back(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_bounds_connections_and_strangers() {
        let limits = Limits::default();
        let cases = [
            // files, connections, of them still handshaking
            (None, usize::MAX, 4_096),
            (Some(1_024), 960, 240),
            (Some(20_000), 19_936, 4_096),
            (Some(1_048_576), 1_048_512, 4_096),
            (Some(256), 192, 48),
            (Some(64), 0, 0),
            (Some(10), 0, 0),
        ];
        for (files, connections, unauthenticated) in cases {
            assert_eq!(
                FileBudget::of(files, &limits),
                FileBudget {
                    connections,
                    unauthenticated
                },
                "{files:?}"
            );
        }
        let few = Limits {
            unauthenticated: 100,
            ..Limits::default()
        };
        assert_eq!(FileBudget::of(Some(20_000), &few).unauthenticated, 100);
    }

    #[test]
    fn sources_are_counted_by_address_or_by_64() {
        let cases = [
            ("127.0.0.1", "127.0.0.1"),
            ("203.0.113.7", "203.0.113.7"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"),
            ("2001:db8:1:2:ffff::1", "2001:db8:1:2::"),
            ("::ffff:198.51.100.1", "198.51.100.1"),
            ("::1", "::"),
        ];
        for (ip, key) in cases {
            let ip: IpAddr = ip.parse().unwrap();
            let key: IpAddr = key.parse().unwrap();
            assert_eq!(source_key(ip), key, "{ip}");
        }
    }

    #[test]
    fn counters_bound_each_key_and_the_total() {
        let c: Counter<&str> = Counter::new(2, 3);
        let a1 = c.try_take("a").unwrap();
        let a2 = c.try_take("a").unwrap();
        assert_eq!(c.try_take("a").err(), Some(Refused::Key(2)));
        let b1 = c.try_take("b").unwrap();
        assert_eq!(c.try_take("c").err(), Some(Refused::Total(3)));
        assert_eq!((c.held(&"a"), c.held(&"b"), c.total()), (2, 1, 3));
        drop(a1);
        assert_eq!(c.held(&"a"), 1);
        let c1 = c.try_take("c").unwrap();
        drop((a2, b1, c1));
        assert_eq!(c.total(), 0);
        assert_eq!(c.held(&"a"), 0);
        assert!(
            c.counts().per_key.is_empty(),
            "no key is kept once it holds nothing"
        );
    }
}
