//! The agent's open files. Every connection through the agent holds one: a client of one of
//! its ports or proxies, or the connection it opens to a local service or to an exit's
//! destination for a tunnel. They all draw on one budget, the process's open-file limit less a
//! reserve, so that however many connections local programs or mesh users open, the agent
//! keeps files for its own work: its hub connections, its REST API and web UI, its database,
//! name lookups. And no one party holds all of the budget: the tunnels of one mesh user, or
//! the clients of this computer's ports and proxies, hold at most three quarters of it, so
//! that others still get in. A connection past either bound is refused at once (a port's
//! client is closed, a tunnel answered 503) and the refusal counted in the port's figures,
//! instead of the agent failing wherever it next needs a file.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The fewest and the most files kept back for the agent's own work.
const RESERVE_MIN: u64 = 64;
const RESERVE_MAX: u64 = 1024;
/// A refusal is worth a warning in the log and the event log at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// How many of a process's `limit` open files connections may hold: all but a reserve of an
/// eighth, at least 64 and at most 1,024.
pub fn budget(limit: u64) -> usize {
    let reserve = (limit / 8).clamp(RESERVE_MIN, RESERVE_MAX);
    let budget = usize::try_from(limit.saturating_sub(reserve)).unwrap_or(usize::MAX);
    budget.min(Semaphore::MAX_PERMITS)
}

/// How many of a `budget` one party may hold: three quarters of it (at least one).
pub fn share(budget: usize) -> usize {
    (budget / 4).saturating_mul(3).max(budget.min(1))
}

/// Whether a refusal at `now` is worth a warning, the last one having been at `last`.
pub fn warn_due(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|l| now.saturating_duration_since(l) >= WARN_EVERY)
}

/// Whom a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Party<'a> {
    /// A client of one of this computer's ports or proxies.
    Local,
    /// A tunnel of this mesh user into this endpoint.
    User(&'a str),
}

impl Party<'_> {
    /// Its key among the holders: user names are never empty.
    fn key(&self) -> &str {
        match self {
            Party::Local => "",
            Party::User(u) => u,
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spent {
    /// All of the budget is held.
    Budget,
    /// The party holds its share.
    Share { share: usize, budget: usize },
}

impl std::fmt::Display for Spent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Spent::Budget => {
                f.write_str("the agent holds as many connections as its open-file limit allows")
            }
            Spent::Share { share, budget } => write!(
                f,
                "the agent holds as many connections for one user as it allows ({share} of \
                 the {budget} its open-file limit allows)"
            ),
        }
    }
}

/// A refusal, and whether it is the one to tell about (at most one every 10 s).
#[derive(Debug)]
pub struct Refused {
    pub why: Spent,
    pub warn: bool,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.why.fmt(f)
    }
}

/// The budget of open files for connections, shared by every mesh of the agent.
pub struct Files {
    slots: Arc<Semaphore>,
    budget: usize,
    share: usize,
    /// How many connections each party holds; a party holding none has no entry.
    held: Arc<Mutex<HashMap<String, usize>>>,
    refused: AtomicU64,
    warned: Mutex<Option<Instant>>,
}

/// One connection's file, given back (to the budget and its party's share) when dropped.
pub struct FileSlot {
    _permit: OwnedSemaphorePermit,
    held: Arc<Mutex<HashMap<String, usize>>>,
    party: String,
}

impl Drop for FileSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock();
        if let Some(n) = held.get_mut(&self.party) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.party);
            }
        }
    }
}

impl Files {
    /// A budget for a process that may open `limit` files.
    pub fn new(limit: u64) -> Files {
        let budget = budget(limit);
        Files {
            slots: Arc::new(Semaphore::new(budget)),
            budget,
            share: share(budget),
            held: Arc::new(Mutex::new(HashMap::new())),
            refused: AtomicU64::new(0),
            warned: Mutex::new(None),
        }
    }

    /// The budget of this process, from its open-file limit now: raise the limit first.
    pub fn for_this_process() -> Files {
        let limit = rlimit::Resource::NOFILE
            .get()
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        Files::new(limit)
    }

    /// How many connections may hold a file at once.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// How many connections hold one now.
    pub fn in_use(&self) -> usize {
        self.budget.saturating_sub(self.slots.available_permits())
    }

    /// How many connections were refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// A file for one more connection of `party`, or why not.
    pub fn take(&self, party: Party<'_>) -> Result<FileSlot, Refused> {
        let taken = {
            let mut held = self.held.lock();
            let mine = held.get(party.key()).copied().unwrap_or(0);
            if mine >= self.share {
                Err(Spent::Share {
                    share: self.share,
                    budget: self.budget,
                })
            } else if let Ok(permit) = self.slots.clone().try_acquire_owned() {
                held.insert(party.key().to_string(), mine + 1);
                Ok(FileSlot {
                    _permit: permit,
                    held: self.held.clone(),
                    party: party.key().to_string(),
                })
            } else {
                Err(Spent::Budget)
            }
        };
        taken.map_err(|why| self.refuse(why))
    }

    fn refuse(&self, why: Spent) -> Refused {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut warned = self.warned.lock();
        let warn = warn_due(*warned, now);
        if warn {
            *warned = Some(now);
            tracing::warn!(
                "{why} ({} refused so far): raise the limit (ulimit -n, LimitNOFILE=) to hold more",
                self.refused()
            );
        }
        Refused { why, warn }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_keeps_a_reserve_for_the_agent_itself() {
        for (limit, budget_) in [
            (0, 0),
            (64, 0),
            (100, 36),
            (256, 192),
            (1_024, 896),
            (8_192, 7_168),
            (20_000, 18_976),
            (1_048_576, 1_047_552),
        ] {
            assert_eq!(budget(limit), budget_, "limit {limit}");
        }
        assert_eq!(budget(u64::MAX), Semaphore::MAX_PERMITS);
    }

    #[test]
    fn one_party_holds_three_quarters_at_most() {
        for (budget_, share_) in [
            (0, 0),
            (1, 1),
            (3, 1),
            (4, 3),
            (192, 144),
            (896, 672),
            (18_976, 14_232),
        ] {
            assert_eq!(share(budget_), share_, "budget {budget_}");
        }
    }

    #[test]
    fn a_refusal_warns_at_most_every_ten_seconds() {
        let t = Instant::now();
        for (last, now, due) in [
            (None, t, true),
            (Some(t), t, false),
            (Some(t), t + Duration::from_secs(9), false),
            (Some(t), t + WARN_EVERY, true),
            (Some(t + Duration::from_secs(1)), t, false),
        ] {
            assert_eq!(warn_due(last, now), due, "{last:?} → {now:?}");
        }
    }

    #[test]
    fn connections_past_a_share_or_the_budget_are_refused_until_one_ends() {
        // 72 files: a budget of 8, a share of 6.
        let files = Files::new(72);
        assert_eq!((files.budget(), files.share), (8, 6));
        let mut alices: Vec<_> = (0..6)
            .map(|_| files.take(Party::User("alice")).unwrap())
            .collect();
        let refused = files.take(Party::User("alice")).err().unwrap();
        assert_eq!(
            refused.why,
            Spent::Share {
                share: 6,
                budget: 8
            }
        );
        assert!(refused.warn, "the first refusal is told");
        // Others still get in, up to the budget.
        let bob = files.take(Party::User("bob")).unwrap();
        let local = files.take(Party::Local).unwrap();
        assert_eq!(files.in_use(), 8);
        let refused = files.take(Party::Local).err().unwrap();
        assert_eq!(refused.why, Spent::Budget);
        assert!(!refused.warn, "the next is not told");
        assert_eq!(files.refused(), 2);
        // A connection that ends gives its file back, and its party's share.
        alices.pop();
        assert!(files.take(Party::Local).is_ok());
        drop((bob, local));
        assert!(files.take(Party::User("alice")).is_ok());
        drop(alices);
        assert_eq!(
            files.held.lock().len(),
            0,
            "no entry for parties that hold nothing"
        );
    }
}
