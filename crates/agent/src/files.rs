//! The agent's open files. Every connection through the agent holds one: a client of one of
//! its ports or proxies, or the connection it opens to a local service or to an exit's
//! destination for a tunnel. They all draw on one budget, the process's open-file limit less a
//! reserve, so that however many connections local programs or mesh users open, the agent
//! keeps files for its own work: its hub connections, its REST API and web UI, its database,
//! name lookups. A connection past the budget is refused at once (a port's client is closed, a
//! tunnel answered 503) and the refusal counted in the port's figures, instead of the agent
//! failing wherever it next needs a file.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The fewest and the most files kept back for the agent's own work.
const RESERVE_MIN: u64 = 64;
const RESERVE_MAX: u64 = 1024;
/// A spent budget is worth a warning in the log and the event log at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Why a connection was refused; its reason in figures, logs and a tunnel's answer.
pub const SPENT: &str = "the agent holds as many connections as its open-file limit allows";

/// How many of a process's `limit` open files connections may hold: all but a reserve of an
/// eighth, at least 64 and at most 1,024.
pub fn budget(limit: u64) -> usize {
    let reserve = (limit / 8).clamp(RESERVE_MIN, RESERVE_MAX);
    let budget = usize::try_from(limit.saturating_sub(reserve)).unwrap_or(usize::MAX);
    budget.min(Semaphore::MAX_PERMITS)
}

/// Whether a refusal at `now` is worth a warning, the last one having been at `last`.
pub fn warn_due(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|l| now.saturating_duration_since(l) >= WARN_EVERY)
}

/// The budget of open files for connections, shared by every mesh of the agent.
pub struct Files {
    slots: Arc<Semaphore>,
    budget: usize,
    refused: AtomicU64,
    warned: Mutex<Option<Instant>>,
}

/// One connection's file, given back to the budget when dropped.
pub struct FileSlot {
    _permit: OwnedSemaphorePermit,
}

/// The budget was spent; `warn` says whether this refusal is the one to tell about.
#[derive(Debug)]
pub struct Spent {
    pub warn: bool,
}

impl std::fmt::Display for Spent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(SPENT)
    }
}

impl Files {
    /// A budget for a process that may open `limit` files.
    pub fn new(limit: u64) -> Files {
        let budget = budget(limit);
        Files {
            slots: Arc::new(Semaphore::new(budget)),
            budget,
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

    /// A file for one more connection, or [`Spent`] when the budget is.
    pub fn take(&self) -> Result<FileSlot, Spent> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(FileSlot { _permit: permit });
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut warned = self.warned.lock();
        let warn = warn_due(*warned, now);
        if warn {
            *warned = Some(now);
            tracing::warn!(
                "{SPENT} ({} connections; {} refused so far): raise the limit (ulimit -n, \
                 LimitNOFILE=) to hold more",
                self.budget,
                self.refused()
            );
        }
        Err(Spent { warn })
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
    fn a_spent_budget_warns_at_most_every_ten_seconds() {
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
    fn connections_past_the_budget_are_refused_until_one_ends() {
        let files = Files::new(66);
        assert_eq!(files.budget(), 2);
        let a = files.take().unwrap();
        let _b = files.take().unwrap();
        assert_eq!(files.in_use(), 2);
        let spent = files.take().err().unwrap();
        assert!(spent.warn, "the first refusal is told");
        assert!(!files.take().err().unwrap().warn, "the next is not");
        assert_eq!(files.refused(), 2);
        drop(a);
        assert_eq!(files.in_use(), 1);
        assert!(files.take().is_ok());
    }
}
