//! Prometheus metrics. The hub's (`ztm hub --metrics`): known traffic through a tunnel shows in
//! them (bytes within 1%, tunnel counts exact), the exposition passes `promtool check
//! metrics`, and a real Prometheus (Debian's `prometheus` package) scrapes the hub every
//! second and answers a PromQL query for the relayed bytes. The agents' (`GET /metrics` on
//! their API) and a port's live figures in the REST API: a held connection counts as active
//! while it is open, its bytes show while they move, a tunnel that cannot open counts as
//! failed with its error, and the exposition passes `promtool check metrics`.
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

/// `promtool check metrics` accepts `text`.
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
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
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

/// A port's figures in B's REST API, from the port list (the one-port GET must agree).
fn port_stats(agent: &str, ep: &str, port: u16) -> serde_json::Value {
    let list = get(agent, &format!("/api/meshes/{MESH}/endpoints/{ep}/ports")).json();
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["listen"]["port"] == port)
        .unwrap_or_else(|| panic!("no port {port} in {list}"))["stats"]
        .clone();
    let one = get(
        agent,
        &format!("/api/meshes/{MESH}/endpoints/{ep}/ports/127.0.0.1/tcp/{port}"),
    )
    .json();
    assert!(listed.is_object(), "no stats: {list}");
    // Both read the same counters; only traffic in between could part them.
    assert_eq!(one["stats"]["total"], listed["total"], "{one} vs {listed}");
    listed
}

fn n(v: &serde_json::Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {field} in {v}"))
}

/// Within 1% of `want`.
fn near(got: f64, want: f64) -> bool {
    (got - want).abs() <= want / 100.0
}

#[test]
fn agent_metrics_and_port_figures_follow_known_traffic() {
    let honest = Honest::start(&ztm!(), "agent-metrics", &[]);
    let (a, b) = (honest.a.addr.clone(), honest.b.addr.clone());
    let b_id = local_id(&b);
    let port = honest.port;
    let port_active = "ztm_agent_tunnels_active{side=\"port\"}";
    let served_active = "ztm_agent_tunnels_active{side=\"service\"}";

    // The tunnels that showed the mesh working have ended at both ends.
    wait_until(Duration::from_secs(20), "no tunnel open", || {
        n(&port_stats(&b, &b_id, port), "active") == 0.0
            && figure(&scrape(&b), port_active) == 0.0
            && figure(&scrape(&a), served_active) == 0.0
    });
    let (stats0, b0, a0) = (port_stats(&b, &b_id, port), scrape(&b), scrape(&a));

    // A connection held open through B's port: one tunnel active, at both ends.
    let mut held = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let hello = b"hello\n";
    held.write_all(hello).unwrap();
    let mut back = [0u8; 6];
    held.read_exact(&mut back).unwrap();
    assert_eq!(&back, hello);
    wait_until(Duration::from_secs(10), "one tunnel active", || {
        n(&port_stats(&b, &b_id, port), "active") == 1.0
            && figure(&scrape(&b), port_active) == 1.0
            && figure(&scrape(&a), served_active) == 1.0
    });

    // Known traffic through it, counted while the connection is still open.
    const N: usize = 4 << 20;
    let data: Vec<u8> = (0..N).map(|i| (i % 251) as u8).collect();
    let mut reader = held.try_clone().unwrap();
    let echoed = std::thread::spawn(move || {
        let mut got = vec![0u8; N];
        reader.read_exact(&mut got).map(|_| got)
    });
    held.write_all(&data).unwrap();
    assert!(echoed.join().unwrap().unwrap() == data, "the echo differs");
    let sent = (N + hello.len()) as f64;
    let moved = |now: &serde_json::Value, field: &str| n(now, field) - n(&stats0, field);
    wait_until(
        Duration::from_secs(10),
        "the bytes show while the connection is open",
        || {
            let now = port_stats(&b, &b_id, port);
            moved(&now, "bytesToService") >= sent && moved(&now, "bytesFromService") >= sent
        },
    );
    let open = port_stats(&b, &b_id, port);
    assert_eq!(n(&open, "active"), 1.0, "{open}");
    for field in ["bytesToService", "bytesFromService"] {
        assert!(
            near(moved(&open, field), sent),
            "{field}: {open}, {sent} sent"
        );
    }

    // Closed: none active, one more opened, none failed; the same in the metrics.
    drop(held);
    wait_until(Duration::from_secs(20), "the tunnel ended", || {
        n(&port_stats(&b, &b_id, port), "active") == 0.0
            && figure(&scrape(&b), port_active) == 0.0
            && figure(&scrape(&a), served_active) == 0.0
    });
    let stats = port_stats(&b, &b_id, port);
    assert_eq!(moved(&stats, "total"), 1.0, "{stats}");
    assert_eq!(moved(&stats, "failed"), 0.0, "{stats}");
    for field in ["bytesToService", "bytesFromService"] {
        assert!(near(moved(&stats, field), sent), "{field}: {stats}");
    }
    let (b1, a1) = (scrape(&b), scrape(&a));
    for (agent, side, before, after) in [("B", "port", &b0, &b1), ("A", "service", &a0, &a1)] {
        let delta = |name: &str| {
            let name = name.replace("SIDE", side);
            figure(after, &name) - figure(before, &name)
        };
        let what = format!("{agent}'s {side} side:\n{after}");
        assert_eq!(
            delta("ztm_agent_tunnels_opened_total{side=\"SIDE\"}"),
            1.0,
            "{what}"
        );
        assert_eq!(
            delta("ztm_agent_tunnels_failed_total{side=\"SIDE\"}"),
            0.0,
            "{what}"
        );
        assert_eq!(
            delta("ztm_agent_tunnel_open_seconds_count{side=\"SIDE\"}"),
            1.0,
            "{what}"
        );
        for direction in ["to_service", "from_service"] {
            let bytes = delta(&format!(
                "ztm_agent_tunnel_bytes_total{{direction=\"{direction}\",side=\"SIDE\"}}"
            ));
            assert!(near(bytes, sent), "{direction}: {bytes} of {sent}, {what}");
        }
    }
    for (text, ports) in [(&b1, 1.0), (&a1, 0.0)] {
        assert_eq!(
            figure(text, &format!("ztm_agent_hubs{{mesh=\"{MESH}\"}}")),
            1.0,
            "{text}"
        );
        assert_eq!(
            figure(
                text,
                &format!("ztm_agent_hubs_connected{{mesh=\"{MESH}\"}}")
            ),
            1.0,
            "{text}"
        );
        assert_eq!(figure(text, "ztm_agent_ports_open"), ports, "{text}");
    }

    // A port to a service its endpoint does not have: the connection's tunnel fails, counted
    // with its error.
    let nowhere = free_port();
    let r = post_json(
        &b,
        &format!("/api/meshes/{MESH}/endpoints/{b_id}/ports/127.0.0.1/tcp/{nowhere}"),
        &serde_json::json!({"target": {"service": "nothing", "endpoint": honest.a_id}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Listening as soon as it is mapped, with figures from zero.
    assert_eq!(r.json()["open"], true, "{}", r.text());
    assert_eq!(r.json()["stats"]["failed"], 0, "{}", r.text());
    let tried = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", nowhere)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut rest = Vec::new();
    // The agent closes the connection once the tunnel failed.
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    wait_until(Duration::from_secs(10), "the failure is counted", || {
        n(&port_stats(&b, &b_id, nowhere), "failed") >= 1.0
    });
    let failed = port_stats(&b, &b_id, nowhere);
    assert_eq!(
        (
            n(&failed, "failed"),
            n(&failed, "total"),
            n(&failed, "active")
        ),
        (1.0, 0.0, 0.0),
        "{failed}"
    );
    let error = &failed["lastError"];
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("nothing")),
        "{failed}"
    );
    assert!(n(error, "time") >= tried - 1000.0, "{failed}");
    let b2 = scrape(&b);
    assert_eq!(
        figure(&b2, "ztm_agent_tunnels_failed_total{side=\"port\"}")
            - figure(&b1, "ztm_agent_tunnels_failed_total{side=\"port\"}"),
        1.0,
        "{b2}"
    );
    assert_eq!(figure(&b2, "ztm_agent_ports_open"), 2.0, "{b2}");
    // The first port's figures are its own.
    assert_eq!(port_stats(&b, &b_id, port)["failed"], stats["failed"]);

    // Well formed, at both agents; and behind the API's guard like the rest of it.
    promtool_accepts(&b2);
    promtool_accepts(&scrape(&a));
    let refused = http(&b, "GET", "/metrics", &[("Host", "evil.example")], b"").unwrap();
    assert_eq!(refused.status, 403, "{}", refused.text());
}

/// With `--metrics-token`, the hub's and the CA's metrics answer only a scrape that carries it.
#[test]
fn metrics_with_a_token_refuse_scrapes_without_it() {
    let dir = TempDir::new("metrics-auth");
    let (ca_metrics, hub_metrics) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let token = ["--metrics-token", "s3cret"];
    let ca = ztm!().start_ca_with(dir.path(), &["--metrics", &ca_metrics, token[0], token[1]]);
    let _hub = ztm!().start_hub_with(
        dir.path(),
        "hub",
        &ca.addr,
        &["--metrics", &hub_metrics, token[0], token[1]],
    );
    for addr in [&ca_metrics, &hub_metrics] {
        for (auth, status) in [
            (None, 401),
            (Some("Bearer wrong"), 401),
            (Some("s3cret"), 401),
            (Some("Bearer s3cret"), 200),
        ] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("Authorization", a)).into_iter().collect();
            let r = http(addr, "GET", "/metrics", &headers, b"").unwrap();
            assert_eq!(r.status, status, "{addr} with {auth:?}: {}", r.text());
            if status == 200 {
                assert!(r.text().contains("# TYPE ztm_"), "{}", r.text());
            }
        }
    }
}
