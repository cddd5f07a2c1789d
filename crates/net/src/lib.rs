//! I/O helpers shared by the hub, the agent and the command-line client: HTTP/2 request and
//! response plumbing, GOAWAY with a reason, a small HTTP/1.1 client, reconnect backoff and
//! wall-clock time. The tunnel relay is its own crate, `ztm-relay`.

pub mod backoff;
pub mod goaway;
pub mod h2io;
pub mod http1;
pub mod lines;
pub mod on_demand;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A millisecond timestamp as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A millisecond timestamp's date, `YYYY-MM-DD` (UTC).
pub fn date(ms: u64) -> String {
    utc(ms).chars().take(10).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_800_000_000_000), "2027-01-15 08:00:00");
        assert_eq!(super::date(951_782_400_000), "2000-02-29");
    }
}
