//! A running `ztm` process with its output in a log file; killed when dropped, and its log's
//! end printed if that happens during a panic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::poll::poll;

pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log_path: PathBuf,
    /// Where this run's output starts in the log: a process started again under the same
    /// name appends to the log of the earlier run.
    log_start: usize,
}

impl Proc {
    /// Starts `bin ARGS` in `dir` (also its `HOME`) with `env`; stdout and stderr go to
    /// `dir/{name}.log`.
    pub fn spawn(
        bin: &Path,
        name: &str,
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Proc> {
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let log_start = log.metadata().map(|m| m.len() as usize).unwrap_or(0);
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .current_dir(dir)
            .env("HOME", dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} {args:?}", bin.display()))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log_path,
            log_start,
        })
    }

    /// The process id (0 once it has been reaped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The whole log file (earlier runs under the same name included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// What this run has logged so far.
    pub fn log_of_this_run(&self) -> String {
        let log = self.log();
        log.get(self.log_start..).unwrap_or_default().to_string()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log(), lines)
    }

    /// Sends signal `sig` (a name, as `kill -SIG` takes it).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{sig} {}", self.name);
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for exit (bounded: kill -9 after 10 s); returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let pid = self.child.as_ref()?.id();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        match self.wait_exit(Duration::from_secs(10)) {
            Some(code) => Some(code),
            None => {
                self.kill9();
                None
            }
        }
    }

    /// Waits (bounded) for the process to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let status = poll(within, || self.exited())?;
        status.code()
    }

    /// The exit status if the process has exited (it is reaped then), without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Waits until this run's log holds `words` at least `times` times.
    pub fn wait_log(&self, words: &str, times: usize, within: Duration) {
        crate::poll::wait_until(
            within,
            &format!("{words:?} {times} times in the log of {}", self.name),
            || self.log_of_this_run().matches(words).count() >= times,
        );
    }

    /// The address right after `marker` in the first line of this run's log that has one
    /// (`HOST:PORT`, or a URL `http://HOST:PORT/...`). An error if the process exits first or
    /// `within` passes.
    pub fn wait_address(&mut self, marker: &str, within: Duration) -> anyhow::Result<String> {
        let mut found = self.wait_addresses(marker, 1, within)?;
        Ok(found.remove(0))
    }

    /// The addresses right after `marker` in the first `count` lines of this run's log that
    /// have one, in order; waits for them as [`Proc::wait_address`] does.
    pub fn wait_addresses(
        &mut self,
        marker: &str,
        count: usize,
        within: Duration,
    ) -> anyhow::Result<Vec<String>> {
        let mut gone = None;
        let found = poll(within, || {
            let found = addresses_after(&self.log_of_this_run(), marker);
            if found.len() >= count {
                return Some(found);
            }
            // Once it has exited, nothing more is coming.
            gone = self.exited();
            gone.map(|_| Vec::new())
        });
        match (found, gone) {
            (Some(mut found), _) if found.len() >= count => {
                found.truncate(count);
                Ok(found)
            }
            (_, Some(status)) => bail!(
                "{} exited ({status}) before logging {marker:?}; end of its log:\n{}",
                self.name,
                self.log_tail(30)
            ),
            _ => bail!(
                "{} logged no {marker:?} within {within:?}; end of its log:\n{}",
                self.name,
                self.log_tail(30)
            ),
        }
    }
}

/// The address right after `marker` in each line of `log` that has one.
fn addresses_after(log: &str, marker: &str) -> Vec<String> {
    log.lines()
        .filter_map(|line| {
            let rest = &line[line.find(marker)? + marker.len()..];
            let word = rest.split_whitespace().next()?;
            let word = word
                .strip_prefix("http://")
                .or_else(|| word.strip_prefix("https://"))
                .unwrap_or(word);
            let addr = word.split('/').next()?.trim_end_matches([',', ';', ')']);
            addr.parse::<SocketAddr>().ok()?;
            Some(addr.to_string())
        })
        .collect()
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.name, self.log_tail(80));
        }
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::addresses_after;

    fn address_after(log: &str, marker: &str) -> Option<String> {
        addresses_after(log, marker).into_iter().next()
    }

    #[test]
    fn addresses_in_listen_lines() {
        let log = "2026-01-01T00:00:00Z  INFO ztm::roles: CA listening on http://127.0.0.1:41234 \
                   (database /tmp/x/ca.db; CA certificate SHA-256 fingerprint ab)\n\
                   2026-01-01T00:00:00Z  INFO ztm::roles: agent listening on http://127.0.0.1:5 \
                   (database a.db)\n\
                   2026-01-01T00:00:00Z  INFO ztm_hub::server: hub hub/127.0.0.1-9 listening on \
                   127.0.0.1:9 (CA 127.0.0.1:41234, names: localhost); open-file limit 1024\n\
                   CA listening on https://[::1]:443 (database)\n";
        assert_eq!(
            address_after(log, "CA listening on ").as_deref(),
            Some("127.0.0.1:41234")
        );
        assert_eq!(
            address_after(log, "agent listening on ").as_deref(),
            Some("127.0.0.1:5")
        );
        assert_eq!(
            address_after(log, "listening on 127").as_deref(),
            None,
            "no address right after the marker"
        );
        assert_eq!(
            address_after(
                &log.replace("http://127.0.0.1:41234", "soon"),
                "CA listening on "
            )
            .as_deref(),
            Some("[::1]:443")
        );
        assert_eq!(
            address_after("hub hub/x listening on", " listening on"),
            None
        );
        assert_eq!(
            addresses_after(log, "listening on "),
            ["127.0.0.1:41234", "127.0.0.1:5", "127.0.0.1:9", "[::1]:443"]
        );
    }
}
