//! `ztm bench --quick --json FILE` runs end to end (real processes, real tunnels) and reports
//! every scenario with positive figures direct, through the tunnel, through the plain
//! reference relays and through a SOCKS5 proxy to an exit, the proxy without errors. No
//! performance thresholds here: the figures are the benchmark's
//! business, not the test's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SCENARIOS: [&str; 6] = [
    "upload_1",
    "upload_n",
    "download_1",
    "fresh_conn_echo",
    "ping_pong",
    "concurrent",
];

fn positive(v: &Value, field: &str, what: &str) {
    let x = v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: no number {field}: {v}"));
    assert!(x > 0.0, "{what}: {field} = {x} is not positive: {v}");
}

/// What a bounded run of `ztm` printed, and its process id.
struct Run {
    pid: u32,
    output: std::process::Output,
}

/// Runs `ztm args` with HOME in `dir`; kills it if it runs longer than `within`.
fn run_bounded(args: &[&str], dir: &std::path::Path, within: Duration) -> Run {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ztm"))
        .args(args)
        .env("HOME", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Read both pipes while waiting, so that a chatty child cannot block on a full one.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut v);
        v
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > within {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Run {
        pid,
        output: std::process::Output {
            status,
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
        },
    }
}

#[test]
fn quick_bench_reports_every_scenario() {
    let dir = std::env::temp_dir().join(format!("ztm-test-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("bench.json");
    let out = run_bounded(
        &["bench", "--quick", "--json", json_path.to_str().unwrap()],
        &dir,
        Duration::from_secs(600),
    );
    let pid = out.pid;
    let out = out.output;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ztm bench --quick failed ({:?}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("direct")
            && stdout.contains("tunnel")
            && stdout.contains("plain")
            && stdout.contains("proxy ×")
            && (stdout.contains("PASS") || stdout.contains("MISS")),
        "no table printed:\n{stdout}"
    );

    let text = std::fs::read_to_string(&json_path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let report: Value = serde_json::from_str(&text).unwrap();
    let scenarios = report["scenarios"].as_array().expect("scenarios array");
    for name in SCENARIOS {
        let s = scenarios
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("scenario {name} missing: {text}"));
        if matches!(name, "fresh_conn_echo" | "ping_pong") {
            // What each operation cost the relays on the path, in CPU time.
            positive(s, "relay_cpu_us_per_op", name);
            positive(s, "plain_relay_cpu_us_per_op", name);
            positive(s, "proxy_relay_cpu_us_per_op", name);
        }
        for side in ["direct", "tunnel", "plain", "proxy"] {
            let v = &s[side];
            let what = format!("{name} {side}");
            positive(v, "value", &what);
            if side == "proxy" {
                assert_eq!(v["errors"], 0, "{what}: errors through the proxy: {v}");
            }
            match name {
                "upload_1" | "upload_n" | "download_1" => {
                    positive(v, "mb_per_s", &what);
                    positive(v, "bytes", &what);
                }
                "fresh_conn_echo" | "ping_pong" => {
                    positive(v, "p50_us", &what);
                    positive(v, "p99_us", &what);
                    positive(v, "count", &what);
                }
                _ => {
                    positive(v, "wall_ms", &what);
                    assert_eq!(
                        v["errors"], 0,
                        "{what}: errors in the concurrent scenario: {v}"
                    );
                    assert_eq!(v["connections"], 100, "{what}: {v}");
                }
            }
        }
    }
    positive(&report["relay"], "cpu_s_per_gb", "relay CPU");
    positive(&report["relay"], "plain_cpu_s_per_gb", "plain relay CPU");
    positive(&report["relay"], "proxy_cpu_s_per_gb", "relay CPU, proxy");
    positive(&report["relay"], "proxy_bytes", "bytes through the proxy");
    // The same tunnel phases again with ZTM_TLS=rustls: both record layers stay measured.
    positive(
        &report["relay"],
        "rustls_cpu_s_per_gb",
        "relay CPU, rustls records",
    );
    positive(&report["relay"], "rustls_bytes", "bytes, rustls records");
    assert!(
        stdout.contains("relay CPU per GB (rustls records)"),
        "no rustls row:\n{stdout}"
    );
    for p in ["hub", "agent-a", "agent-b"] {
        let m = &report["rss"][p];
        for f in ["idle_mib", "peak_throughput_mib", "after_load_mib"] {
            positive(m, f, &format!("RSS of {p}"));
        }
    }
    assert!(
        report["targets"].as_array().is_some_and(|t| !t.is_empty()),
        "no targets judged: {text}"
    );
    // Nobody scrapes the metrics unless asked.
    assert!(report["scrape"].is_null(), "{}", report["scrape"]);
    assert!(!stdout.contains("metrics scrapes"), "{stdout}");
    // The temporary directory of the bench (databases, logs) is gone.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("ztm-bench-{pid}-"))
        })
        .collect();
    assert!(leftovers.is_empty(), "bench left {leftovers:?} behind");
}

/// `ztm bench --quick --scrape`: the hub's metrics listener and both agents' /metrics are
/// scraped every second while the benchmark runs, every scrape answered, and the count is in
/// the table and the JSON.
#[test]
fn quick_bench_scrapes_the_metrics() {
    let dir = std::env::temp_dir().join(format!("ztm-test-bench-scrape-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("bench.json");
    let args = [
        "bench",
        "--quick",
        "--scrape",
        "--json",
        json_path.to_str().unwrap(),
    ];
    let out = run_bounded(&args, &dir, Duration::from_secs(600)).output;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ztm bench --quick --scrape failed ({:?}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let text = std::fs::read_to_string(&json_path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let report: Value = serde_json::from_str(&text).unwrap();
    let scrape = &report["scrape"];
    assert_eq!(scrape["interval_s"], 1.0, "{scrape}");
    // The quick run lasts well over ten seconds: so many scrapes of each, at least.
    for target in ["hub", "agent-a", "agent-b"] {
        let t = &scrape["targets"][target];
        let n = t["scrapes"].as_u64().unwrap_or(0);
        assert!(n >= 10, "{target}: {n} scrapes: {scrape}");
        assert_eq!(t["failed"], 0, "{target}: {scrape}");
        positive(t, "mean_bytes", target);
        positive(t, "mean_ms", target);
    }
    let total = scrape["scrapes"].as_u64().unwrap_or(0);
    assert!(
        stdout.contains(&format!(
            "metrics scrapes every 1 s during the run: {total} in all"
        )),
        "no scrape line for {total} scrapes:\n{stdout}"
    );
}

/// Child processes of `pid`, from /proc.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path().join("children");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out
}

#[test]
fn terminated_bench_stops_its_processes() {
    use std::io::{BufRead, BufReader};
    let dir = std::env::temp_dir().join(format!("ztm-test-bench-term-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ztm"))
        .args(["bench", "--quick"])
        .env("HOME", &dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait (bounded by the bench's own start-up timeouts) until the stack is up.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    let up = lines.by_ref().map_while(Result::ok).any(|l| {
        seen.push_str(&l);
        seen.push('\n');
        l.contains("up; letting the stack idle")
    });
    assert!(up, "the bench never came up:\n{seen}");
    let stack = children(pid);
    assert_eq!(
        stack.len(),
        7,
        "expected CA, hub, two agents and three plain relays: {stack:?}"
    );

    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    std::thread::spawn(move || lines.for_each(drop));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the bench did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !status.success(),
        "a terminated bench must not report success"
    );
    for p in stack {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists(),
            "process {p} outlived the bench"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ztm bench scale` with a small mesh: each count measured on its own mesh, every endpoint
/// registered and heartbeating, the lists growing with the mesh, the tunnel working.
#[test]
fn scale_bench_measures_each_count() {
    let dir = std::env::temp_dir().join(format!("ztm-test-bench-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("scale.json");
    let args = [
        "bench",
        "scale",
        "--endpoints",
        "0,40",
        "--steady",
        "2",
        "--join-within",
        "120",
        "--json",
        json_path.to_str().unwrap(),
    ];
    let out = run_bounded(&args, &dir, Duration::from_secs(300)).output;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ztm bench scale failed ({:?}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("endpoints on one hub"),
        "no table:\n{stdout}"
    );
    let text = std::fs::read_to_string(&json_path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let report: Value = serde_json::from_str(&text).unwrap();
    let rows = report["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{text}");
    let (empty, full) = (&rows[0], &rows[1]);
    assert_eq!(
        (empty["endpoints"].as_u64(), full["endpoints"].as_u64()),
        (Some(0), Some(40))
    );
    for row in rows {
        let what = format!("{} endpoints", row["endpoints"]);
        positive(row, "hub_rss_bytes", &what);
        positive(row, "tunnel_fresh_p50_ms", &what);
        positive(row, "tunnel_cold_ms", &what);
        positive(row, "agent_services_page_ms", &what);
        assert_eq!(row["tunnel_errors"], 0, "{what}: {row}");
        assert_eq!(row["heartbeats_missed"], 0, "{what}: {row}");
    }
    positive(full, "join_secs", "40 endpoints");
    positive(full, "hub_kib_per_endpoint", "40 endpoints");
    // Each simulated endpoint holds two connections to the hub.
    let files = |r: &Value| r["hub_open_files"].as_u64().unwrap();
    assert!(files(full) >= files(empty) + 80, "{text}");
    let size = |r: &Value, f: &str| r[f].as_u64().unwrap();
    for f in ["hub_services_bytes", "agent_services_bytes"] {
        assert!(size(full, f) > size(empty, f) + 40 * 20, "{f}: {text}");
    }
}
