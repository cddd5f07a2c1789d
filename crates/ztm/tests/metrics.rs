//! The hub's Prometheus metrics (`ztm hub --metrics`): known traffic through a tunnel shows in
//! them (bytes within 1%, tunnel counts exact), the exposition passes `promtool check
//! metrics`, and a real Prometheus (Debian's `prometheus` package) scrapes the hub every
//! second and answers a PromQL query for the relayed bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ztm_testkit::hostile::Honest;
use ztm_testkit::prelude::*;

/// One figure of a text exposition: the value of the line `name` (labels included) starts.
fn figure(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn scrape(addr: &str) -> String {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.header("content-type")
    );
    r.text()
}

/// `promtool check metrics` finds nothing wrong with `text`.
fn promtool_accepts(text: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) runs");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn hub_metrics_count_tunnels_and_bytes_and_prometheus_reads_them() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let honest = Honest::start(&ztm!(), "metrics", &["--metrics", &metrics]);
    let before = scrape(&metrics);

    // Known traffic: 4 MiB to A's echo service through B's port and all of it back.
    const N: usize = 4 << 20;
    let data: Vec<u8> = (0..N).map(|i| (i % 251) as u8).collect();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", honest.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = s.try_clone().unwrap();
    let back = std::thread::spawn(move || {
        let mut got = vec![0u8; N];
        reader.read_exact(&mut got).map(|_| got)
    });
    s.write_all(&data).unwrap();
    let got = back.join().unwrap().unwrap();
    assert!(got == data, "the echo differs");
    drop(s);

    // Counted when the tunnel has ended.
    let active = "ztm_hub_tunnels_active";
    wait_until(
        Duration::from_secs(20),
        "the tunnel ended at the hub",
        || {
            let text = scrape(&metrics);
            figure(&text, active) == 0.0
                && figure(&text, "ztm_hub_tunnels_opened_total")
                    > figure(&before, "ztm_hub_tunnels_opened_total")
        },
    );
    let after = scrape(&metrics);
    let delta = |name: &str| figure(&after, name) - figure(&before, name);
    assert_eq!(delta("ztm_hub_tunnels_opened_total"), 1.0, "{after}");
    for direction in ["to_provider", "to_client"] {
        let moved = delta(&format!(
            "ztm_hub_relayed_bytes_total{{direction=\"{direction}\"}}"
        ));
        assert!(
            (moved - N as f64).abs() <= N as f64 / 100.0,
            "{direction}: {moved} bytes counted, {N} sent\n{after}"
        );
    }
    assert_eq!(figure(&after, "ztm_hub_endpoints"), 2.0);
    assert_eq!(figure(&after, "ztm_hub_connections{kind=\"control\"}"), 2.0);
    assert_eq!(figure(&after, "ztm_hub_connections{kind=\"reverse\"}"), 2.0);
    assert!(figure(&after, "ztm_hub_tls_handshakes_total{outcome=\"ok\"}") >= 4.0);
    assert_eq!(
        figure(&after, "ztm_hub_tunnel_open_seconds_count"),
        figure(&after, "ztm_hub_tunnels_opened_total")
    );
    assert!(
        figure(&after, "ztm_hub_ca_poll_age_seconds") < 30.0,
        "{after}"
    );

    // A stranger without a certificate: counted by the outcome of its handshake.
    let stranger = Command::new("openssl")
        .args(["s_client", "-connect", &honest.hub.addr, "-alpn", "h2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs");
    let _ = stranger;
    let refused = "ztm_hub_tls_handshakes_total{outcome=\"no_certificate\"}";
    wait_until(
        Duration::from_secs(10),
        "the refused handshake is counted",
        || figure(&scrape(&metrics), refused) >= 1.0,
    );

    // The exposition is well formed.
    promtool_accepts(&after);

    // A real Prometheus scrapes the hub every second and answers PromQL.
    let web = format!("127.0.0.1:{}", free_port());
    let config = write_file(
        honest.dir.path(),
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: hub\n    \
             static_configs:\n      - targets: ['{metrics}']\n"
        ),
    );
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={config}"))
            .arg(format!(
                "--storage.tsdb.path={}",
                honest.dir.join("prometheus").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian's package) runs"),
    );
    let query = "/api/v1/query?query=sum(ztm_hub_relayed_bytes_total)";
    let mut last = String::new();
    let answered = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        let Some(v) = try_json(&web, query) else {
            return false;
        };
        last = v.to_string();
        let value = v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|x| x.parse::<f64>().ok());
        value.is_some_and(|x| x >= 2.0 * N as f64)
    });
    assert!(
        answered,
        "Prometheus did not report the relayed bytes within 30 s: {last}"
    );
}

#[test]
fn metrics_off_loopback_need_a_token() {
    let dir = TempDir::new("metrics-token");
    let out = ztm!()
        .command(dir.path())
        .args([
            "hub",
            "--listen",
            "127.0.0.1:0",
            "--ca",
            "127.0.0.1:1",
            "--metrics",
            "0.0.0.0:0",
        ])
        .env_remove("ZTM_METRICS_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--metrics-token"), "{err}");
}

/// The CA's metrics (`ztm ca --metrics`): certificates issued and revoked, requests by status,
/// in a form promtool accepts.
#[test]
fn ca_metrics_count_certificates_and_requests() {
    let dir = TempDir::new("ca-metrics");
    let metrics = format!("127.0.0.1:{}", free_port());
    let ca = ztm!().start_ca_with(dir.path(), &["--metrics", &metrics]);
    create_user(&ca.addr, "alice");
    create_user(&ca.addr, "bob");
    let revoked = delete(&ca.addr, "/api/certificates/bob");
    assert_eq!(revoked.status, 204, "{}", revoked.text());
    let missing = get(&ca.addr, "/api/certificates/nobody");
    assert_eq!(missing.status, 404, "{}", missing.text());
    let text = scrape(&metrics);
    assert_eq!(
        figure(&text, "ztm_ca_certificates_issued_total{kind=\"user\"}"),
        2.0,
        "{text}"
    );
    assert_eq!(
        figure(&text, "ztm_ca_certificates_revoked_total{kind=\"user\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        figure(&text, "ztm_ca_certificates_issued_total{kind=\"hub\"}"),
        0.0,
        "{text}"
    );
    assert!(
        figure(&text, "ztm_ca_requests_total{status=\"404\"}") >= 1.0,
        "{text}"
    );
    assert!(
        figure(&text, "ztm_ca_requests_total{status=\"200\"}") >= 2.0,
        "{text}"
    );
    promtool_accepts(&text);
}
