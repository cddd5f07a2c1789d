//! `ztm bench`: starts a CA, a hub and two agents (A and B) on loopback as child processes,
//! publishes in-process target servers (sink, source, 64 B echo) as services on B, maps ports
//! to them on A, and measures each scenario directly (client → target) and through the tunnel
//! (client → A → hub → B → target), interleaved (the latency scenarios slice by slice). A
//! third reference runs each scenario through three plain TCP relays (no TLS, no HTTP/2; see
//! `plain.rs`): what three relay hops cost on this machine whatever the protocol. A fourth
//! path goes through a proxy on A to B as an exit (client → SOCKS5 proxy on A → hub → B's
//! exit → target); its client does the SOCKS5 handshake on every connection, so a fresh
//! connection's time includes it. Prints a
//! table with the ratios and the targets (docs/requirements.md §10's quality bars in figures,
//! `Report::targets`) and can write every figure as JSON.

mod load;
mod plain;
mod scale;
mod scrape;
mod stack;

pub use plain::{run_relay, RelayArgs};

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use load::{Concurrent, Dest, Direction, Latency, Throughput};
use ztm_testkit::procfs;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    other: Option<Other>,
    /// Seconds each throughput phase is measured (direct and tunnel each)
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Write every figure to this file as JSON
    #[arg(long)]
    json: Option<PathBuf>,
    /// Shrink everything for a smoke test (2 s phases, 200 fresh connections, 2,000
    /// ping-pongs, 100 concurrent connections)
    #[arg(long)]
    quick: bool,
    /// Scrape the hub's metrics listener and both agents' /metrics every second while the
    /// benchmark runs, as Prometheus would, and report the scrapes
    #[arg(long)]
    scrape: bool,
}

/// The benchmarks besides the tunnel's.
#[derive(Subcommand)]
enum Other {
    /// One hub with many simulated endpoints: memory, a join storm, heartbeat CPU, lists and a
    /// fresh tunnel, for each endpoint count
    Scale(scale::ScaleArgs),
}

/// How much of everything.
struct Plan {
    duration: Duration,
    warmup: Duration,
    fresh: usize,
    pings: usize,
    concurrent: usize,
    rounds: usize,
    streams: usize,
    settle: Duration,
}

impl Plan {
    fn of(args: &BenchArgs) -> Plan {
        if args.quick {
            Plan {
                duration: Duration::from_secs(2),
                warmup: Duration::from_millis(300),
                fresh: 200,
                pings: 2_000,
                concurrent: 100,
                rounds: 20,
                streams: 8,
                settle: Duration::from_secs(1),
            }
        } else {
            Plan {
                duration: Duration::from_secs(args.duration.max(1)),
                warmup: Duration::from_millis(500),
                fresh: 1_000,
                pings: 10_000,
                concurrent: 500,
                rounds: 20,
                streams: 8,
                settle: Duration::from_secs(3),
            }
        }
    }
}

/// Longest any latency scenario may run (it then counts the rest as errors).
const MAX_SCENARIO: Duration = Duration::from_secs(120);

const RELAYS: [&str; 3] = ["hub", "agent-a", "agent-b"];
const MIB: f64 = 1024.0 * 1024.0;

/// Runs the benchmark. Ctrl-C or SIGTERM stops it, and the stack's processes are stopped with it.
pub async fn run_bench(args: BenchArgs) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let run = async {
        match &args.other {
            Some(Other::Scale(scale)) => scale::run_scale(scale).await,
            None => bench(&args).await,
        }
    };
    tokio::select! {
        r = run => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        _ = term.recv() => anyhow::bail!("terminated"),
    }
}

async fn bench(args: &BenchArgs) -> Result<()> {
    let plan = Plan::of(args);
    let targets = load::Targets::start().await?;
    eprintln!("bench: starting CA, hub and agents A and B ...");
    let services = [
        stack::Mapping {
            service: "sink",
            target: targets.sink.clone(),
        },
        stack::Mapping {
            service: "source",
            target: targets.source.clone(),
        },
        stack::Mapping {
            service: "echo",
            target: targets.echo.clone(),
        },
    ];
    let allows = [&targets.sink, &targets.source, &targets.echo].map(|t| t.to_string());
    let (mut st, ports, proxy) = stack::start_with_proxy(&services, &[], &allows).await?;
    let Some(proxy) = proxy else {
        anyhow::bail!("no proxy on agent A");
    };
    let plain = match st.start_plain(&[
        targets.sink.clone(),
        targets.source.clone(),
        targets.echo.clone(),
    ]) {
        Ok(p) => p,
        Err(e) => return Err(st.explain(e)),
    };
    let mut scrapes = args.scrape.then(scrape::Scrapes::default);
    let scraper = start_scraper(&mut st, args.scrape)?;
    let result = measure(&plan, &mut st, &targets, &ports, &plain, &proxy).await;
    let scraped = scraper.map(scrape::Scraper::finish);
    let mut report = match result {
        Ok(r) => r,
        Err(e) => return Err(st.explain(e)),
    };
    st.check_alive()?;
    drop(st);
    // The same throughput phases with tokio-rustls moving the records (ZTM_TLS=rustls): what
    // our own record layer saves.
    eprintln!("bench: restarting the stack with ZTM_TLS=rustls for the relay CPU ...");
    let (mut st, ports) = stack::start(&services, &[(ztm_tls::Records::VAR, "rustls")]).await?;
    let scraper = start_scraper(&mut st, args.scrape)?;
    let result = relay_cpu(&plan, &mut st, &targets, &ports).await;
    if let Some(all) = scrapes.as_mut() {
        all.add(scraped.unwrap_or_default());
        all.add(scraper.map(scrape::Scraper::finish).unwrap_or_default());
    }
    match result {
        Ok((secs, bytes)) => (report.rustls_cpu_secs, report.rustls_bytes) = (secs, bytes),
        Err(e) => return Err(st.explain(e)),
    }
    st.check_alive()?;
    drop(st);
    report.scrapes = scrapes;
    print!("{}", report.table(&plan));
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.json(&plan))?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

/// With `--scrape`: a scraper of the stack's metrics, running until it is finished.
fn start_scraper(st: &mut stack::Stack, on: bool) -> Result<Option<scrape::Scraper>> {
    if !on {
        return Ok(None);
    }
    let targets = match st.scrape_targets() {
        Ok(t) => t,
        Err(e) => return Err(st.explain(e)),
    };
    eprintln!(
        "bench: scraping the metrics of the hub and both agents every {} s",
        scrape::EVERY.as_secs()
    );
    Ok(Some(
        scrape::Scraper::start(targets).context("starting the scraper")?,
    ))
}

/// Per-relay memory, bytes.
#[derive(Default, Clone)]
struct Mem {
    idle: u64,
    peak_throughput: u64,
    peak_load: u64,
    after: u64,
}

/// One scenario's figure on each path.
struct Pair<T> {
    direct: T,
    tunnel: T,
    /// Through three plain relays.
    plain: T,
    /// Through the SOCKS5 proxy on A to B's exit.
    proxy: T,
}

impl<T> Pair<T> {
    fn each_mut(&mut self) -> [&mut T; 4] {
        [
            &mut self.direct,
            &mut self.tunnel,
            &mut self.plain,
            &mut self.proxy,
        ]
    }

    fn map<U>(self, f: impl Fn(T) -> U) -> Pair<U> {
        Pair {
            direct: f(self.direct),
            tunnel: f(self.tunnel),
            plain: f(self.plain),
            proxy: f(self.proxy),
        }
    }

    /// Direct, plain, tunnel and proxy: the table's order.
    fn columns(&self) -> [&T; 4] {
        [&self.direct, &self.plain, &self.tunnel, &self.proxy]
    }
}

/// The fresh-connection and ping-pong scenarios on the echo `to` (direct, tunnel, plain,
/// proxy), the paths taking turns slice by slice (see [`load::Series`]), with the CPU time of
/// the tunnel's (and the proxy's) relays `pids` and of the plain ones `plain_pids`.
async fn latencies(
    plan: &Plan,
    to: &Pair<Dest>,
    pids: &[u32],
    plain_pids: &[u32],
    hz: f64,
) -> (Pair<Latency>, Pair<Latency>) {
    let series = || Pair {
        direct: load::Series::new(&to.direct, Vec::new()),
        tunnel: load::Series::new(&to.tunnel, pids.to_vec()),
        plain: load::Series::new(&to.plain, plain_pids.to_vec()),
        proxy: load::Series::new(&to.proxy, pids.to_vec()),
    };
    let (mut fresh, mut pings) = (series(), series());
    for turn in 0..load::TURNS {
        for s in fresh.each_mut() {
            load::fresh_connections(s, load::slice_of(plan.fresh, turn), MAX_SCENARIO).await;
        }
    }
    for turn in 0..load::TURNS {
        for s in pings.each_mut() {
            load::ping_pong(s, load::slice_of(plan.pings, turn), MAX_SCENARIO).await;
        }
    }
    (
        fresh.map(|s| s.into_latency(hz)),
        pings.map(|s| s.into_latency(hz)),
    )
}

struct Report {
    throughput: Vec<(&'static str, String, Pair<Throughput>)>,
    fresh: Pair<Latency>,
    pings: Pair<Latency>,
    concurrent: Pair<Concurrent>,
    /// CPU seconds each relay used during the tunnel throughput windows.
    cpu_secs: Vec<f64>,
    tunnel_bytes: u64,
    /// The same for the plain relays during theirs.
    plain_cpu_secs: Vec<f64>,
    plain_bytes: u64,
    /// The same for the tunnel's relays during the proxy's.
    proxy_cpu_secs: Vec<f64>,
    proxy_bytes: u64,
    /// The same for the tunnel's relays with tokio-rustls moving the TLS records.
    rustls_cpu_secs: Vec<f64>,
    rustls_bytes: u64,
    mem: Vec<Mem>,
    /// With `--scrape`: the scrapes of the metrics while the benchmark ran.
    scrapes: Option<scrape::Scrapes>,
}

/// VmRSS of each of `pids`, bytes.
fn rss_all(pids: &[u32]) -> Vec<u64> {
    pids.iter()
        .map(|p| procfs::rss_kib(*p).unwrap_or(0) * 1024)
        .collect()
}

/// Samples the RSS of `pids` every 100 ms until [`peak_bytes`].
fn peak_sampler(pids: &[u32]) -> procfs::PeakRss {
    procfs::PeakRss::start(pids.to_vec(), Duration::from_millis(100))
}

/// The peak RSS of each process the sampler watched, bytes.
fn peak_bytes(sampler: procfs::PeakRss) -> Vec<u64> {
    sampler.finish().into_iter().map(|kib| kib * 1024).collect()
}

async fn measure(
    plan: &Plan,
    st: &mut stack::Stack,
    targets: &load::Targets,
    ports: &[String],
    plain: &[String],
    proxy: &str,
) -> Result<Report> {
    // The sink, the source and the echo on each path.
    let path = |i: usize, target: &String| -> Result<Pair<Dest>> {
        Ok(Pair {
            direct: Dest::from(target),
            tunnel: Dest::from(&ports[i]),
            plain: Dest::from(&plain[i]),
            proxy: Dest::socks5(proxy, target)?,
        })
    };
    let sink = path(0, &targets.sink)?;
    let source = path(1, &targets.source)?;
    let echo = path(2, &targets.echo)?;
    let pids_of = |names: &[&str]| -> Vec<u32> {
        names
            .iter()
            .map(|n| st.proc(n).map(|p| p.pid()).unwrap_or(0))
            .collect()
    };
    let pids = pids_of(&RELAYS);
    let plain_pids = pids_of(&stack::PLAIN);
    let hz = procfs::clock_ticks();

    load::echo_works(&echo.direct, Duration::from_secs(5)).await?;
    load::echo_works(&echo.tunnel, Duration::from_secs(30)).await?;
    load::echo_works(&echo.plain, Duration::from_secs(10)).await?;
    load::echo_works(&echo.proxy, Duration::from_secs(30)).await?;
    eprintln!("bench: tunnel and proxy up; letting the stack idle");
    tokio::time::sleep(plan.settle).await;
    let idle = rss_all(&pids);
    let load_peak = peak_sampler(&pids);
    let tp_peak = peak_sampler(&pids);

    let mut throughput = Vec::new();
    let phases = [
        ("upload_1", Direction::Upload, 1usize),
        ("upload_n", Direction::Upload, plan.streams),
        ("download_1", Direction::Download, 1),
    ];
    let mut cpu_ticks = vec![0u64; pids.len()];
    let mut plain_ticks = vec![0u64; plain_pids.len()];
    let mut proxy_ticks = vec![0u64; pids.len()];
    let (mut tunnel_bytes, mut plain_bytes, mut proxy_bytes) = (0, 0, 0);
    for (name, dir, streams) in phases {
        let to = match dir {
            Direction::Upload => &sink,
            Direction::Download => &source,
        };
        let label = format!(
            "{}, {streams} stream{} (MB/s)",
            if dir == Direction::Upload {
                "upload"
            } else {
                "download"
            },
            if streams == 1 { "" } else { "s" }
        );
        eprintln!("bench: {label} ...");
        let run = |to: &Dest, way: &'static str, pids: Vec<u32>| {
            let (sunk, to) = (&targets.sunk, to.clone());
            async move {
                load::throughput(&to, dir, streams, plan.warmup, plan.duration, sunk, &pids)
                    .await
                    .with_context(|| format!("{name} {way}"))
            }
        };
        let direct = run(&to.direct, "direct", Vec::new()).await?;
        let tunnel = run(&to.tunnel, "through the tunnel", pids.clone()).await?;
        let plain = run(&to.plain, "through the plain relays", plain_pids.clone()).await?;
        let proxy = run(&to.proxy, "through the proxy", pids.clone()).await?;
        st.check_alive()?;
        for (ticks, t) in [
            (&mut cpu_ticks, &tunnel),
            (&mut plain_ticks, &plain),
            (&mut proxy_ticks, &proxy),
        ] {
            for (acc, t) in ticks.iter_mut().zip(&t.cpu_ticks) {
                *acc += t;
            }
        }
        tunnel_bytes += tunnel.bytes;
        plain_bytes += plain.bytes;
        proxy_bytes += proxy.bytes;
        throughput.push((
            name,
            label,
            Pair {
                direct,
                tunnel,
                plain,
                proxy,
            },
        ));
    }
    let tp_peak = peak_bytes(tp_peak);

    eprintln!(
        "bench: {} fresh connections + 64 B echo, {} ping-pongs on one connection ...",
        plan.fresh, plan.pings
    );
    let (fresh, pings) = latencies(plan, &echo, &pids, &plain_pids, hz).await;
    st.check_alive()?;
    eprintln!(
        "bench: {} concurrent connections × {} round trips ...",
        plan.concurrent, plan.rounds
    );
    let concurrent = Pair {
        direct: load::concurrent(&echo.direct, plan.concurrent, plan.rounds).await,
        tunnel: load::concurrent(&echo.tunnel, plan.concurrent, plan.rounds).await,
        plain: load::concurrent(&echo.plain, plan.concurrent, plan.rounds).await,
        proxy: load::concurrent(&echo.proxy, plan.concurrent, plan.rounds).await,
    };
    st.check_alive()?;
    let load_peak = peak_bytes(load_peak);
    eprintln!("bench: letting the stack settle");
    tokio::time::sleep(plan.settle).await;
    let after = rss_all(&pids);

    let mem = (0..pids.len())
        .map(|i| Mem {
            idle: idle[i],
            peak_throughput: tp_peak[i],
            peak_load: load_peak[i],
            after: after[i],
        })
        .collect();
    Ok(Report {
        throughput,
        fresh,
        pings,
        concurrent,
        cpu_secs: cpu_ticks.iter().map(|t| *t as f64 / hz).collect(),
        tunnel_bytes,
        plain_cpu_secs: plain_ticks.iter().map(|t| *t as f64 / hz).collect(),
        plain_bytes,
        proxy_cpu_secs: proxy_ticks.iter().map(|t| *t as f64 / hz).collect(),
        proxy_bytes,
        rustls_cpu_secs: Vec::new(),
        rustls_bytes: 0,
        mem,
        scrapes: None,
    })
}

/// The tunnel throughput phases alone on the stack `st`: CPU seconds of each relay and the
/// bytes moved.
async fn relay_cpu(
    plan: &Plan,
    st: &mut stack::Stack,
    targets: &load::Targets,
    ports: &[String],
) -> Result<(Vec<f64>, u64)> {
    let pids: Vec<u32> = RELAYS
        .iter()
        .map(|n| st.proc(n).map(|p| p.pid()).unwrap_or(0))
        .collect();
    load::echo_works(&ports[2], Duration::from_secs(30)).await?;
    let mut ticks = vec![0u64; pids.len()];
    let mut bytes = 0;
    for (dir, streams) in [
        (Direction::Upload, 1usize),
        (Direction::Upload, plan.streams),
        (Direction::Download, 1),
    ] {
        let addr = match dir {
            Direction::Upload => &ports[0],
            Direction::Download => &ports[1],
        };
        let t = load::throughput(
            &Dest::from(addr),
            dir,
            streams,
            plan.warmup,
            plan.duration,
            &targets.sunk,
            &pids,
        )
        .await?;
        st.check_alive()?;
        for (acc, t) in ticks.iter_mut().zip(&t.cpu_ticks) {
            *acc += t;
        }
        bytes += t.bytes;
    }
    let hz = procfs::clock_ticks();
    Ok((ticks.iter().map(|t| *t as f64 / hz).collect(), bytes))
}

/// One judged target.
struct Target {
    name: String,
    value: String,
    goal: &'static str,
    pass: bool,
}

fn mark(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "MISS"
    }
}

fn ratio(tunnel: f64, direct: f64) -> f64 {
    if direct > 0.0 {
        tunnel / direct
    } else {
        0.0
    }
}

/// CPU seconds per GB moved.
fn per_gb(secs: &[f64], bytes: u64) -> f64 {
    if bytes == 0 {
        return 0.0;
    }
    secs.iter().sum::<f64>() / (bytes as f64 / 1e9)
}

impl Report {
    fn cpu_per_gb(&self) -> f64 {
        per_gb(&self.cpu_secs, self.tunnel_bytes)
    }

    fn plain_cpu_per_gb(&self) -> f64 {
        per_gb(&self.plain_cpu_secs, self.plain_bytes)
    }

    fn proxy_cpu_per_gb(&self) -> f64 {
        per_gb(&self.proxy_cpu_secs, self.proxy_bytes)
    }

    fn rustls_cpu_per_gb(&self) -> f64 {
        per_gb(&self.rustls_cpu_secs, self.rustls_bytes)
    }

    fn targets(&self) -> Vec<Target> {
        let mut out = Vec::new();
        for (name, label, p) in &self.throughput {
            if name.starts_with("upload") {
                let r = ratio(p.tunnel.mb_per_s(), p.direct.mb_per_s());
                out.push(Target {
                    name: label.clone(),
                    value: format!("{r:.3}×"),
                    goal: "≥ 0.25× direct",
                    pass: r >= 0.25,
                });
            }
        }
        let cpu = self.cpu_per_gb();
        out.push(Target {
            name: "relay CPU, hub + agents".into(),
            value: format!("{cpu:.2} s/GB"),
            goal: "≤ 4 s/GB",
            pass: cpu > 0.0 && cpu <= 4.0,
        });
        let d = (self.fresh.tunnel.percentile(50.0) - self.fresh.direct.percentile(50.0)) / 1e3;
        out.push(Target {
            name: "fresh conn + echo p50".into(),
            value: format!("{d:+.3} ms"),
            goal: "≤ direct + 0.5 ms",
            pass: d <= 0.5 && self.fresh.tunnel.errors == 0,
        });
        let d = self.pings.tunnel.percentile(50.0) - self.pings.direct.percentile(50.0);
        out.push(Target {
            name: "ping-pong p50".into(),
            value: format!("{d:+.1} µs"),
            goal: "≤ direct + 200 µs",
            pass: d <= 200.0 && self.pings.tunnel.errors == 0,
        });
        let c = &self.concurrent.tunnel;
        out.push(Target {
            name: format!("{} conns × {} round trips", c.connections, c.rounds),
            value: format!("{:.0} ms, {} errors", c.wall.as_secs_f64() * 1e3, c.errors),
            goal: "≤ 1 s, 0 errors",
            pass: c.wall <= Duration::from_secs(1) && c.errors == 0,
        });
        for (i, m) in self.mem.iter().enumerate() {
            out.push(Target {
                name: format!("{} peak RSS (throughput)", RELAYS[i]),
                value: format!("{:.1} MiB", m.peak_throughput as f64 / MIB),
                goal: "≤ 64 MiB",
                pass: m.peak_throughput as f64 <= 64.0 * MIB,
            });
            out.push(Target {
                name: format!("{} idle RSS (before load)", RELAYS[i]),
                value: format!("{:.1} MiB", m.idle as f64 / MIB),
                goal: "≤ 15 MiB",
                pass: m.idle as f64 <= 15.0 * MIB,
            });
            out.push(Target {
                name: format!("{} idle RSS (after load)", RELAYS[i]),
                value: format!("{:.1} MiB", m.after as f64 / MIB),
                goal: "≤ 15 MiB",
                pass: m.after as f64 <= 15.0 * MIB,
            });
        }
        out
    }

    fn table(&self, plan: &Plan) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nztm bench: {:.0} s per throughput phase, {} fresh connections, {} ping-pongs, {} × {} concurrent\n",
            plan.duration.as_secs_f64(),
            plan.fresh,
            plan.pings,
            plan.concurrent,
            plan.rounds
        );
        let _ = writeln!(
            s,
            "plain: three plain TCP relays chained like the tunnel's hops (no TLS, no HTTP/2)"
        );
        let _ = writeln!(
            s,
            "proxy: SOCKS5 proxy on agent A to agent B as an exit, the handshake on every connection\n"
        );
        let _ = writeln!(
            s,
            "{:<36} {:>10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>9} {:>10} {:>9} {:>10}",
            "scenario",
            "direct",
            "plain",
            "tunnel",
            "proxy",
            "tunnel ×",
            "tunnel +",
            "plain ×",
            "plain +",
            "proxy ×",
            "proxy +"
        );
        let _ = writeln!(s, "{}", "-".repeat(152));
        // Figures direct, through the plain relays, through the tunnel and through the proxy;
        // ratios and differences to direct (differences only for latencies).
        let row = |s: &mut String, name: &str, [d, p, t, x]: [f64; 4], prec: usize, diff: bool| {
            let plus = |v: f64| {
                if diff {
                    format!("{:+.prec$}", v - d)
                } else {
                    String::new()
                }
            };
            let _ = writeln!(
                s,
                "{name:<36} {d:>10.prec$} {p:>10.prec$} {t:>10.prec$} {x:>10.prec$} {:>8.3}× {:>10} {:>8.3}× {:>10} {:>8.3}× {:>10}",
                ratio(t, d),
                plus(t),
                ratio(p, d),
                plus(p),
                ratio(x, d),
                plus(x)
            );
        };
        for (_, label, p) in &self.throughput {
            row(
                &mut s,
                label,
                p.columns().map(Throughput::mb_per_s),
                1,
                false,
            );
        }
        for (name, pair, scale, unit, prec) in [
            ("fresh conn + 64 B echo", &self.fresh, 1e3, "ms", 3),
            ("64 B ping-pong", &self.pings, 1.0, "µs", 1),
        ] {
            for p in [50.0, 99.0] {
                let f = pair.columns().map(|l| l.percentile(p) / scale);
                row(&mut s, &format!("{name} p{p:.0} ({unit})"), f, prec, true);
            }
            let _ = writeln!(
                s,
                "{:<36} {:>10} {:>10.1} {:>10.1} {:>10.1}",
                "  relay CPU per operation (µs)",
                "-",
                pair.plain.relay_cpu_us_per_op(),
                pair.tunnel.relay_cpu_us_per_op(),
                pair.proxy.relay_cpu_us_per_op()
            );
            let _ = writeln!(
                s,
                "{:<36} {:>10} {:>10} {:>10} {:>10}",
                format!("{name} errors"),
                pair.direct.errors,
                pair.plain.errors,
                pair.tunnel.errors,
                pair.proxy.errors
            );
        }
        let c = &self.concurrent;
        let all = c.columns();
        row(
            &mut s,
            &format!(
                "{} conns × {} round trips (ms)",
                c.direct.connections, c.direct.rounds
            ),
            all.map(|c| c.wall.as_secs_f64() * 1e3),
            1,
            true,
        );
        for p in [50.0, 99.0] {
            row(
                &mut s,
                &format!("  connection done by, p{p:.0} (ms)"),
                all.map(|c| c.finish.percentile(p) / 1e3),
                1,
                true,
            );
        }
        let _ = writeln!(
            s,
            "{:<36} {:>10} {:>10} {:>10} {:>10}",
            "  errors", c.direct.errors, c.plain.errors, c.tunnel.errors, c.proxy.errors
        );
        for (what, e) in [
            ("direct", &c.direct),
            ("plain", &c.plain),
            ("tunnel", &c.tunnel),
            ("proxy", &c.proxy),
        ] {
            if let Some(err) = &e.first_error {
                let _ = writeln!(s, "  first {what} error: {err}");
            }
        }

        let _ = writeln!(
            s,
            "\nrelay CPU during the tunnel throughput phases: {:.2} s/GB over {:.2} GB (hub {:.2} s, agent A {:.2} s, agent B {:.2} s)",
            self.cpu_per_gb(),
            self.tunnel_bytes as f64 / 1e9,
            self.cpu_secs.first().copied().unwrap_or(0.0),
            self.cpu_secs.get(1).copied().unwrap_or(0.0),
            self.cpu_secs.get(2).copied().unwrap_or(0.0),
        );
        let _ = writeln!(
            s,
            "three plain relays during theirs: {:.2} s/GB over {:.2} GB",
            self.plain_cpu_per_gb(),
            self.plain_bytes as f64 / 1e9,
        );
        let _ = writeln!(
            s,
            "hub and agents during the proxy throughput phases: {:.2} s/GB over {:.2} GB",
            self.proxy_cpu_per_gb(),
            self.proxy_bytes as f64 / 1e9,
        );
        let _ = writeln!(
            s,
            "relay CPU per GB (rustls records): {:.2} s/GB over {:.2} GB, the same phases with ZTM_TLS=rustls ({:+.0}% for our own records)",
            self.rustls_cpu_per_gb(),
            self.rustls_bytes as f64 / 1e9,
            (ratio(self.cpu_per_gb(), self.rustls_cpu_per_gb()) - 1.0) * 100.0,
        );
        if let Some(scrapes) = &self.scrapes {
            let _ = writeln!(s, "{}", scrapes.line());
        }
        let _ = writeln!(
            s,
            "\n{:<10} {:>12} {:>18} {:>14} {:>16}",
            "RSS (MiB)", "idle before", "peak throughput", "peak all load", "idle after load"
        );
        for (i, m) in self.mem.iter().enumerate() {
            let _ = writeln!(
                s,
                "{:<10} {:>12.1} {:>18.1} {:>14.1} {:>16.1}",
                RELAYS[i],
                m.idle as f64 / MIB,
                m.peak_throughput as f64 / MIB,
                m.peak_load as f64 / MIB,
                m.after as f64 / MIB
            );
        }

        let _ = writeln!(
            s,
            "\n{:<36} {:>20} {:>20}  result",
            "target", "measured", "goal"
        );
        let _ = writeln!(s, "{}", "-".repeat(86));
        for t in self.targets() {
            let _ = writeln!(
                s,
                "{:<36} {:>20} {:>20}  {}",
                t.name,
                t.value,
                t.goal,
                mark(t.pass)
            );
        }
        s
    }

    fn json(&self, plan: &Plan) -> Value {
        let tp = |t: &Throughput| {
            json!({
                "value": t.mb_per_s(),
                "mb_per_s": t.mb_per_s(),
                "bytes": t.bytes,
                "secs": t.secs,
                "errors": t.errors,
            })
        };
        let lat = |l: &Latency| {
            json!({
                "value": l.percentile(50.0),
                "count": l.samples.len(),
                "errors": l.errors,
                "p50_us": l.percentile(50.0),
                "p99_us": l.percentile(99.0),
                "mean_us": l.mean(),
                "max_us": l.percentile(100.0),
            })
        };
        let conc = |c: &Concurrent| {
            json!({
                "value": c.wall.as_secs_f64() * 1e3,
                "wall_ms": c.wall.as_secs_f64() * 1e3,
                "connections": c.connections,
                "rounds": c.rounds,
                "errors": c.errors,
                "first_error": c.first_error,
                "conn_done_p50_ms": c.finish.percentile(50.0) / 1e3,
                "conn_done_p99_ms": c.finish.percentile(99.0) / 1e3,
            })
        };
        let mut scenarios = Vec::new();
        for (name, label, p) in &self.throughput {
            scenarios.push(json!({
                "name": name,
                "label": label,
                "unit": "MB/s",
                "direct": tp(&p.direct),
                "tunnel": tp(&p.tunnel),
                "plain": tp(&p.plain),
                "proxy": tp(&p.proxy),
                "ratio": ratio(p.tunnel.mb_per_s(), p.direct.mb_per_s()),
                "plain_ratio": ratio(p.plain.mb_per_s(), p.direct.mb_per_s()),
                "proxy_ratio": ratio(p.proxy.mb_per_s(), p.direct.mb_per_s()),
                "proxy_tunnel_ratio": ratio(p.proxy.mb_per_s(), p.tunnel.mb_per_s()),
            }));
        }
        for (name, pair) in [("fresh_conn_echo", &self.fresh), ("ping_pong", &self.pings)] {
            let (d, t, p, x) = (&pair.direct, &pair.tunnel, &pair.plain, &pair.proxy);
            scenarios.push(json!({
                "name": name,
                "unit": "us",
                "direct": lat(d),
                "tunnel": lat(t),
                "plain": lat(p),
                "proxy": lat(x),
                "plain_p50_diff_us": p.percentile(50.0) - d.percentile(50.0),
                "proxy_p50_diff_us": x.percentile(50.0) - d.percentile(50.0),
                "proxy_p99_diff_us": x.percentile(99.0) - d.percentile(99.0),
                "relay_cpu_us_per_op": t.relay_cpu_us_per_op(),
                "plain_relay_cpu_us_per_op": p.relay_cpu_us_per_op(),
                "proxy_relay_cpu_us_per_op": x.relay_cpu_us_per_op(),
                "p50_diff_us": t.percentile(50.0) - d.percentile(50.0),
                "p99_diff_us": t.percentile(99.0) - d.percentile(99.0),
                "p50_ratio": ratio(t.percentile(50.0), d.percentile(50.0)),
            }));
        }
        let c = &self.concurrent;
        scenarios.push(json!({
            "name": "concurrent",
            "unit": "ms",
            "direct": conc(&c.direct),
            "tunnel": conc(&c.tunnel),
            "plain": conc(&c.plain),
            "proxy": conc(&c.proxy),
            "wall_diff_ms": (c.tunnel.wall.as_secs_f64() - c.direct.wall.as_secs_f64()) * 1e3,
        }));
        let mut rss = serde_json::Map::new();
        let mut cpu = serde_json::Map::new();
        for (i, m) in self.mem.iter().enumerate() {
            rss.insert(
                RELAYS[i].into(),
                json!({
                    "idle_mib": m.idle as f64 / MIB,
                    "peak_throughput_mib": m.peak_throughput as f64 / MIB,
                    "peak_load_mib": m.peak_load as f64 / MIB,
                    "after_load_mib": m.after as f64 / MIB,
                }),
            );
            cpu.insert(
                RELAYS[i].into(),
                json!(self.cpu_secs.get(i).copied().unwrap_or(0.0)),
            );
        }
        let targets: Vec<Value> = self
            .targets()
            .into_iter()
            .map(|t| json!({"name": t.name, "value": t.value, "goal": t.goal, "pass": t.pass}))
            .collect();
        json!({
            "config": {
                "duration_s": plan.duration.as_secs_f64(),
                "warmup_s": plan.warmup.as_secs_f64(),
                "streams": plan.streams,
                "fresh_connections": plan.fresh,
                "ping_pongs": plan.pings,
                "concurrent_connections": plan.concurrent,
                "concurrent_rounds": plan.rounds,
                "buffer_bytes": load::BUF,
                "message_bytes": load::MSG,
            },
            "scenarios": scenarios,
            "relay": {
                "cpu_s_per_gb": self.cpu_per_gb(),
                "tunnel_bytes": self.tunnel_bytes,
                "cpu_s": cpu,
                "plain_cpu_s_per_gb": self.plain_cpu_per_gb(),
                "plain_bytes": self.plain_bytes,
                "proxy_cpu_s_per_gb": self.proxy_cpu_per_gb(),
                "proxy_bytes": self.proxy_bytes,
                "rustls_cpu_s_per_gb": self.rustls_cpu_per_gb(),
                "rustls_bytes": self.rustls_bytes,
            },
            "rss": rss,
            "targets": targets,
            "scrape": self.scrapes.as_ref().map(scrape::Scrapes::json),
        })
    }
}
