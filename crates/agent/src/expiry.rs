//! When a mesh's certificates expire, and when to say so: from 30 days before an expiry the
//! mesh carries a warning (UI, CLI) and its log gets one entry.

use ztm_proto::model::TimedMessage;

/// Warnings start this long before an expiry.
pub const WARN_BEFORE_MS: u64 = 30 * 24 * 3600 * 1000;
const DAY_MS: u64 = 24 * 3600 * 1000;

/// The warnings for an agent certificate expiring at `cert` and a CA certificate at `ca`
/// (ms since the epoch; 0: unknown), at `now`.
pub fn warnings(now: u64, cert: u64, ca: u64) -> Vec<TimedMessage> {
    [
        (cert, "this agent's certificate"),
        (ca, "the mesh's CA certificate"),
    ]
    .into_iter()
    .filter_map(|(at, what)| warning(now, at, what))
    .map(|message| TimedMessage::new(now, message))
    .collect()
}

fn warning(now: u64, at: u64, what: &str) -> Option<String> {
    if at == 0 || now.saturating_add(WARN_BEFORE_MS) < at {
        return None;
    }
    let date = ztm_net::date(at);
    Some(if at <= now {
        format!("{what} expired on {date}: no hub admits it; get a new one from the CA's operator")
    } else {
        let days = (at - now).div_ceil(DAY_MS);
        let days = if days == 1 {
            "1 day".to_string()
        } else {
            format!("{days} days")
        };
        format!("{what} expires on {date} (in {days}): get a new one from the CA's operator")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_start_thirty_days_before() {
        let now = 1_800_000_000_000; // 2027-01-15
        let day = DAY_MS;
        let cases: Vec<(u64, u64, Vec<&str>)> = vec![
            (now + 31 * day, now + 400 * day, vec![]),
            (
                now + 30 * day,
                0,
                vec!["this agent's certificate expires on 2027-02-14 (in 30 days)"],
            ),
            (now + day, 0, vec!["(in 1 day)"]),
            (now + 1, 0, vec!["(in 1 day)"]),
            (
                now,
                0,
                vec!["this agent's certificate expired on 2027-01-15"],
            ),
            (
                now - day,
                now + 10 * day,
                vec!["expired on 2027-01-14", "the mesh's CA certificate expires"],
            ),
            (0, 0, vec![]),
        ];
        for (cert, ca, want) in cases {
            let got = warnings(now, cert, ca);
            assert_eq!(got.len(), want.len(), "{got:?}");
            for (g, w) in got.iter().zip(&want) {
                assert!(g.message.contains(w), "{} / {w}", g.message);
            }
        }
    }
}
