//! `ztm bench scale`: how one hub holds many endpoints. For each endpoint count N it starts a
//! fresh mesh (a CA, a hub and two real agents A and B with a tunnel from A to B's echo
//! service, as `ztm bench` does), then N simulated endpoints in this process
//! (`ztm_testkit::sim`: real TLS and HTTP/2 on loopback, two connections each, one service,
//! heartbeats every 15 s), all at once, and measures the hub's memory, how long the storm of
//! registrations took, the hub's CPU under steady heartbeats, the lists at the hub and at an
//! agent, and a fresh tunnel through A. The figures for N = 0 are the reference for the others
//! (docs/requirements.md §10 gives the targets).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use ztm_testkit::mesh::MESH;
use ztm_testkit::procfs;
use ztm_testkit::sim::{self, Fleet, SimUser};

use super::{load, stack};

#[derive(Args)]
pub struct ScaleArgs {
    /// Endpoint counts to measure, each on a fresh mesh (comma-separated)
    #[arg(long, value_delimiter = ',', default_value = "0,1000,10000")]
    endpoints: Vec<usize>,
    /// Seconds of steady heartbeats over which the hub's CPU is measured
    #[arg(long, default_value_t = 30)]
    steady: u64,
    /// Seconds the simulated endpoints have to register before the run fails
    #[arg(long, default_value_t = 300)]
    join_within: u64,
    /// Write every figure to this file as JSON
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Simulated endpoints per user (the hub's default bound is 1,000 per user).
const PER_USER: usize = 500;
/// Fresh tunnel connections timed per N.
const FRESH: usize = 200;
/// Fresh tunnels timed with the agent's provider cache cold, each after...
const COLD: usize = 5;
/// ...longer than an agent keeps the providers of a service it asked for.
const PROVIDERS_KEPT_FOR: Duration = Duration::from_millis(2_500);
/// Times each list request is repeated (the median is reported).
const LIST_REPEATS: usize = 5;

/// The figures for one endpoint count.
#[derive(Default)]
struct Row {
    endpoints: usize,
    hub_rss_idle: u64,
    hub_rss: u64,
    hub_fds: usize,
    join_secs: f64,
    retries: u64,
    hub_cpu_per_min: f64,
    heartbeat_p50_ms: f64,
    heartbeat_p99_ms: f64,
    heartbeats_missed: u64,
    hub_services_ms: f64,
    hub_services_bytes: usize,
    hub_page_ms: f64,
    agent_services_ms: f64,
    agent_services_bytes: usize,
    agent_page_ms: f64,
    tunnel_cold_ms: f64,
    tunnel_p50_ms: f64,
    tunnel_errors: u64,
}

impl Row {
    fn per_endpoint_kib(&self) -> Option<f64> {
        (self.endpoints > 0).then(|| {
            self.hub_rss.saturating_sub(self.hub_rss_idle) as f64 / 1024.0 / self.endpoints as f64
        })
    }

    fn json(&self) -> Value {
        json!({
            "endpoints": self.endpoints,
            "hub_rss_idle_bytes": self.hub_rss_idle,
            "hub_rss_bytes": self.hub_rss,
            "hub_kib_per_endpoint": self.per_endpoint_kib(),
            "hub_open_files": self.hub_fds,
            "join_secs": self.join_secs,
            "join_retries": self.retries,
            "hub_cpu_secs_per_min": self.hub_cpu_per_min,
            "heartbeat_p50_ms": self.heartbeat_p50_ms,
            "heartbeat_p99_ms": self.heartbeat_p99_ms,
            "heartbeats_missed": self.heartbeats_missed,
            "hub_services_ms": self.hub_services_ms,
            "hub_services_bytes": self.hub_services_bytes,
            "hub_services_page_ms": self.hub_page_ms,
            "agent_services_ms": self.agent_services_ms,
            "agent_services_bytes": self.agent_services_bytes,
            "agent_services_page_ms": self.agent_page_ms,
            "tunnel_cold_ms": self.tunnel_cold_ms,
            "tunnel_fresh_p50_ms": self.tunnel_p50_ms,
            "tunnel_errors": self.tunnel_errors,
        })
    }
}

pub async fn run_scale(args: &ScaleArgs) -> Result<()> {
    if args.endpoints.is_empty() {
        bail!("--endpoints: give at least one count");
    }
    let most = args.endpoints.iter().copied().max().unwrap_or(0);
    let files = raise_file_limit(most);
    let need = files_needed(most);
    if files < need {
        bail!(
            "{most} endpoints need about {need} open files in the hub and as many in this \
             process (two connections each); the limit here is {files} and may not be raised \
             (`ulimit -Hn`, as root): measure fewer with --endpoints"
        );
    }
    eprintln!("bench scale: the hub and this process may open {files} files each");
    let targets = load::Targets::start().await?;
    let mut rows = Vec::new();
    for &n in &args.endpoints {
        eprintln!("bench scale: {n} endpoints: starting CA, hub and agents A and B ...");
        let services = [stack::Mapping {
            service: "echo",
            target: targets.echo.clone(),
        }];
        let (mut st, ports) = stack::start(&services, &[]).await?;
        let row = match measure(args, n, &mut st, &ports[0]).await {
            Ok(row) => row,
            Err(e) => return Err(st.explain(e)),
        };
        st.check_alive()?;
        drop(st);
        rows.push(row);
    }
    print!("{}", table(&rows));
    if let Some(path) = &args.json {
        let all = json!({"rows": rows.iter().map(Row::json).collect::<Vec<_>>()});
        let text = serde_json::to_string_pretty(&all)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench scale: wrote {}", path.display());
    }
    Ok(())
}

/// Open files `n` simulated endpoints need in the hub (and in this process): two connections
/// each, and what the hub keeps for itself.
fn files_needed(n: usize) -> u64 {
    n as u64 * 2 + ztm_hub::limits::FILE_RESERVE + 64
}

/// Raises this process's open-file limit (inherited by the hub it starts) to what `n`
/// endpoints need, two connections each on both sides: the hard limit too, when allowed.
fn raise_file_limit(n: usize) -> u64 {
    let want = (files_needed(n) + 4_096).max(20_000);
    let (_, hard) = rlimit::Resource::NOFILE.get().unwrap_or((0, 0));
    if hard < want && rlimit::Resource::NOFILE.set(want, want).is_ok() {
        return want;
    }
    rlimit::increase_nofile_limit(want).unwrap_or(0)
}

async fn measure(args: &ScaleArgs, n: usize, st: &mut stack::Stack, tunnel: &str) -> Result<Row> {
    let mut row = Row {
        endpoints: n,
        ..Row::default()
    };
    let mesh = st.mesh();
    let hub_pid = st
        .proc("hub")
        .map(|p| p.pid())
        .ok_or_else(|| anyhow!("no hub"))?;
    let hub: std::net::SocketAddr = mesh.hub.addr.parse().context("hub address")?;
    let agent = mesh.api(0).to_string();
    let ca = mesh.ca.addr.clone();
    load::echo_works(tunnel, Duration::from_secs(30)).await?;
    row.hub_rss_idle = procfs::rss_kib(hub_pid).unwrap_or(0) * 1024;

    // Users for the simulated endpoints, and one to list with.
    let users = n.div_ceil(PER_USER) + 1;
    let issued = tokio::task::spawn_blocking(move || -> Result<Vec<SimUser>> {
        let pem = ztm_testkit::mesh::try_ca_pem(&ca)?;
        (0..users)
            .map(|k| {
                let user = ztm_testkit::mesh::try_create_user(&ca, &format!("sim{k}"))?;
                SimUser::new(&pem, &user)
            })
            .collect()
    })
    .await??;
    let issued: Vec<Arc<SimUser>> = issued.into_iter().map(Arc::new).collect();

    // The storm: every endpoint starts at once.
    let fleet = Arc::new(Fleet::default());
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let user = issued[1 + i / PER_USER].clone();
        tasks.push(tokio::spawn(sim::run(i, user, hub, fleet.clone())));
    }
    let deadline = started + Duration::from_secs(args.join_within);
    let mut last_report = Instant::now();
    while fleet.ready.load(Ordering::SeqCst) < n {
        if Instant::now() > deadline {
            fleet.stop();
            bail!(
                "{} of {n} simulated endpoints registered within {} s ({} retries; last error: {})",
                fleet.ready.load(Ordering::SeqCst),
                args.join_within,
                fleet.retries.load(Ordering::Relaxed),
                fleet.last_error().unwrap_or_default()
            );
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "bench scale: {} of {n} registered after {:.0} s",
                fleet.ready.load(Ordering::SeqCst),
                started.elapsed().as_secs_f64()
            );
        }
        st.check_alive()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    row.join_secs = started.elapsed().as_secs_f64();
    row.retries = fleet.retries.load(Ordering::Relaxed);
    eprintln!(
        "bench scale: {n} registered in {:.1} s ({} retries); steady heartbeats for {} s ...",
        row.join_secs, row.retries, args.steady
    );
    for (reason, count) in fleet.top_reasons(3) {
        eprintln!("bench scale:   {count} sessions started again after: {reason}");
    }

    // Steady state: heartbeats only. The hub's CPU and the heartbeats' round trips.
    let hz = procfs::clock_ticks();
    let steady = Duration::from_secs(args.steady.max(1));
    fleet.recording.store(true, Ordering::Relaxed);
    let ticks = procfs::cpu_ticks(hub_pid).unwrap_or(0);
    let t = Instant::now();
    tokio::time::sleep(steady).await;
    let used = procfs::cpu_ticks(hub_pid)
        .unwrap_or(0)
        .saturating_sub(ticks) as f64
        / hz;
    row.hub_cpu_per_min = used * 60.0 / t.elapsed().as_secs_f64();
    fleet.recording.store(false, Ordering::Relaxed);
    let beats = fleet.take_heartbeats();
    row.heartbeat_p50_ms = percentile_ms(&beats, 50.0);
    row.heartbeat_p99_ms = percentile_ms(&beats, 99.0);
    row.hub_rss = procfs::rss_kib(hub_pid).unwrap_or(0) * 1024;
    row.hub_fds = procfs::fds(hub_pid).unwrap_or(0);

    // Lists at the hub, as one user sees them: the whole service list and one page.
    let lister = sim::Lister::connect(&issued[0], hub).await?;
    let (ms, bytes) = median_of(|| lister.get("/api/services")).await?;
    (row.hub_services_ms, row.hub_services_bytes) = (ms, bytes);
    row.hub_page_ms = median_of(|| lister.get("/api/services?q=svc-&limit=100"))
        .await?
        .0;

    // The same at agent A's REST API (what the web UI and the CLI ask).
    let base = format!("/api/meshes/{MESH}/services");
    let (ms, bytes) = median_of(|| agent_get(&agent, base.clone())).await?;
    (row.agent_services_ms, row.agent_services_bytes) = (ms, bytes);
    let page = format!("{base}?q=svc-&limit=100");
    row.agent_page_ms = median_of(|| agent_get(&agent, page.clone())).await?.0;

    // A fresh tunnel through A with the mesh this size: with A's providers for the service
    // forgotten (each after longer than A keeps them), then a series in a row.
    let mut cold = load::Series::new(tunnel, Vec::new());
    for _ in 0..COLD {
        tokio::time::sleep(PROVIDERS_KEPT_FOR).await;
        load::fresh_connections(&mut cold, 1, Duration::from_secs(30)).await;
    }
    row.tunnel_cold_ms = cold.into_latency(hz).percentile(50.0) / 1000.0;
    let mut fresh = load::Series::new(tunnel, Vec::new());
    load::fresh_connections(&mut fresh, FRESH, Duration::from_secs(60)).await;
    let fresh = fresh.into_latency(hz);
    row.tunnel_p50_ms = fresh.percentile(50.0) / 1000.0;
    row.tunnel_errors = fresh.errors;
    row.heartbeats_missed = fleet.missed.load(Ordering::Relaxed);

    fleet.stop();
    for t in tasks {
        let _ = t.await;
    }
    Ok(row)
}

/// `GET path` on an agent's API: how long it took and the body's size.
async fn agent_get(agent: &str, path: String) -> Result<(Duration, usize)> {
    let agent = agent.to_string();
    tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let r = ztm_testkit::http::http(&agent, "GET", &path, &[], b"")?;
        if r.status != 200 {
            bail!("GET {path} on {agent}: {} {}", r.status, r.text());
        }
        Ok((t.elapsed(), r.body.len()))
    })
    .await?
}

/// The median time of [`LIST_REPEATS`] runs of `f`, in milliseconds, and the last size.
async fn median_of<F, Fut>(mut f: F) -> Result<(f64, usize)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(Duration, usize)>>,
{
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..LIST_REPEATS {
        let (took, bytes) = f().await?;
        times.push(took.as_secs_f64() * 1000.0);
        size = bytes;
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok((times[times.len() / 2], size))
}

/// Percentile `p` of sorted microsecond samples, in milliseconds.
fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1]) / 1000.0
}

const MIB: f64 = 1024.0 * 1024.0;

fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let cols = |out: &mut String, label: &str, f: &dyn Fn(&Row) -> String| {
        out.push_str(&format!("{label:<44}"));
        for r in rows {
            out.push_str(&format!("{:>16}", f(r)));
        }
        out.push('\n');
    };
    cols(&mut out, "endpoints on one hub", &|r| {
        r.endpoints.to_string()
    });
    cols(&mut out, "hub RSS (MiB)", &|r| {
        format!("{:.1}", r.hub_rss as f64 / MIB)
    });
    cols(&mut out, "  per endpoint (KiB; target <= 30)", &|r| {
        r.per_endpoint_kib()
            .map(|k| format!("{k:.1}"))
            .unwrap_or_else(|| "-".into())
    });
    cols(&mut out, "  open files", &|r| r.hub_fds.to_string());
    cols(&mut out, "all registered at once (s; target <= 60)", &|r| {
        format!("{:.1}", r.join_secs)
    });
    cols(&mut out, "  sessions started again", &|r| {
        r.retries.to_string()
    });
    cols(&mut out, "hub CPU, steady heartbeats (s/min; <= 3)", &|r| {
        format!("{:.2}", r.hub_cpu_per_min)
    });
    cols(&mut out, "heartbeat round trip p50 / p99 (ms)", &|r| {
        format!("{:.1} / {:.1}", r.heartbeat_p50_ms, r.heartbeat_p99_ms)
    });
    cols(&mut out, "  heartbeats missed", &|r| {
        r.heartbeats_missed.to_string()
    });
    cols(&mut out, "GET /api/services at the hub (ms)", &|r| {
        format!("{:.1}", r.hub_services_ms)
    });
    cols(&mut out, "  its size (KiB)", &|r| {
        format!("{:.0}", r.hub_services_bytes as f64 / 1024.0)
    });
    cols(&mut out, "  a page of 100 with a search (ms)", &|r| {
        format!("{:.1}", r.hub_page_ms)
    });
    cols(&mut out, "agent's GET .../services, whole (ms)", &|r| {
        format!("{:.1}", r.agent_services_ms)
    });
    cols(
        &mut out,
        "  a page of 100 with a search (ms; <= 100)",
        &|r| format!("{:.1}", r.agent_page_ms),
    );
    cols(
        &mut out,
        "fresh tunnel + 64 B echo, cold cache (ms)",
        &|r| format!("{:.2}", r.tunnel_cold_ms),
    );
    cols(&mut out, "  p50 of the next ones (ms; <= N=0 + 1)", &|r| {
        format!("{:.2}", r.tunnel_p50_ms)
    });
    cols(&mut out, "  errors", &|r| r.tunnel_errors.to_string());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        for (p, ms) in [
            (50.0, 50.0),
            (99.0, 99.0),
            (100.0, 100.0),
            (1.0, 1.0),
            (0.0, 1.0),
        ] {
            assert_eq!(percentile_ms(&v, p), ms, "p{p}");
        }
        assert_eq!(percentile_ms(&[], 50.0), 0.0);
    }

    #[test]
    fn per_endpoint_memory() {
        let row = Row {
            endpoints: 4,
            hub_rss_idle: 1 << 20,
            hub_rss: (1 << 20) + 4 * 10 * 1024,
            ..Row::default()
        };
        assert_eq!(row.per_endpoint_kib(), Some(10.0));
        let empty = Row::default();
        assert_eq!(empty.per_endpoint_kib(), None);
        assert!(table(&[empty, row]).contains("10.0"));
    }
}
