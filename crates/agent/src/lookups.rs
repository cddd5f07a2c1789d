//! Name lookups an exit has in flight, per user and in all. The system resolver runs on the
//! runtime's blocking threads, one lookup each, until it answers or gives up (after the
//! timeouts of resolv.conf, however soon the tunnel stops waiting for it). Without a bound, a
//! user the exit admits could ask for names that no server answers and hold every one of those
//! threads, and the agent's own lookups (services named by host) would wait behind them.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

/// Lookups one user may have in flight at one exit.
pub const PER_USER: usize = 8;
/// Lookups one exit may have in flight, for all users.
pub const TOTAL: usize = 32;

/// Why a lookup may not start now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Busy {
    /// The user has this many in flight already.
    User(usize),
    /// The exit has this many in flight already.
    All(usize),
}

impl fmt::Display for Busy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Busy::User(n) => write!(f, "{n} name lookups of this user are already in progress"),
            Busy::All(n) => write!(f, "{n} name lookups are already in progress at the exit"),
        }
    }
}

/// Whether one more lookup may start while `user` of the asking user's and `total` in all are
/// in flight.
pub fn admit(user: usize, total: usize) -> Result<(), Busy> {
    if user >= PER_USER {
        return Err(Busy::User(PER_USER));
    }
    if total >= TOTAL {
        return Err(Busy::All(TOTAL));
    }
    Ok(())
}

/// The lookups in flight at one exit.
#[derive(Default)]
pub struct Lookups {
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    by_user: HashMap<String, usize>,
    total: usize,
}

impl Lookups {
    /// Room for one lookup of `user`'s, until the slot is dropped.
    pub fn try_take(self: &Arc<Self>, user: &str) -> Result<Slot, Busy> {
        let mut c = self.counts.lock();
        admit(c.by_user.get(user).copied().unwrap_or(0), c.total)?;
        *c.by_user.entry(user.to_string()).or_default() += 1;
        c.total += 1;
        Ok(Slot {
            lookups: self.clone(),
            user: user.to_string(),
        })
    }

    /// Lookups in flight: `user`'s, and in all.
    pub fn in_flight(&self, user: &str) -> (usize, usize) {
        let c = self.counts.lock();
        (c.by_user.get(user).copied().unwrap_or(0), c.total)
    }
}

/// One lookup in flight; dropping it ends it.
pub struct Slot {
    lookups: Arc<Lookups>,
    user: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.lookups.counts.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_user.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.by_user.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_bounds() {
        for (user, total, want) in [
            (0, 0, Ok(())),
            (PER_USER - 1, TOTAL - 1, Ok(())),
            (PER_USER, 0, Err(Busy::User(PER_USER))),
            (PER_USER, TOTAL, Err(Busy::User(PER_USER))),
            (0, TOTAL, Err(Busy::All(TOTAL))),
            (PER_USER - 1, TOTAL + 5, Err(Busy::All(TOTAL))),
        ] {
            assert_eq!(
                admit(user, total),
                want,
                "{user} of the user's, {total} in all"
            );
        }
    }

    #[test]
    fn slots_count_until_dropped() {
        let l = Arc::new(Lookups::default());
        let mallory: Vec<Slot> = (0..PER_USER)
            .map(|_| l.try_take("mallory").unwrap())
            .collect();
        assert_eq!(l.try_take("mallory").err(), Some(Busy::User(PER_USER)));
        // Others still get theirs, up to the exit's bound.
        let others: Vec<Slot> = (0..TOTAL - PER_USER)
            .map(|i| l.try_take(&format!("u{}", i % 4)).unwrap())
            .collect();
        assert_eq!(l.try_take("alice").err(), Some(Busy::All(TOTAL)));
        drop(mallory);
        assert_eq!(l.in_flight("mallory"), (0, TOTAL - PER_USER));
        assert!(l.try_take("alice").is_ok());
        drop(others);
        assert_eq!(l.in_flight("u0"), (0, 0));
        assert!(l.counts.lock().by_user.is_empty());
    }
}
