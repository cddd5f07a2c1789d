//! `ztm status`: healthy when all is well (exit 0), with each hub and the round-trip time to
//! it, and what is wrong otherwise (exit 1): a port that cannot listen, a port whose service
//! has no provider online, a hub that is down, an agent that does not answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use ztm_testkit::hostile::Honest;
use ztm_testkit::prelude::*;

/// `ztm status [ARGS] --agent AGENT`: exit code, stdout and stderr.
fn status(ztm: &Ztm, dir: &TempDir, agent: &str, args: &[&str]) -> (i32, String, String) {
    let out = ztm
        .command(dir.path())
        .arg("status")
        .args(args)
        .args(["--agent", agent])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn status_is_healthy_or_says_what_is_wrong() {
    let ztm = ztm!();
    let honest = Honest::start(&ztm, "status", &[]);
    let cli = TempDir::new("status-cli");
    let b = honest.b.addr.clone();

    // All well: B's mesh is connected and its port's service has a provider.
    let (code, out, err) = status(&ztm, &cli, &b, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("All is well") && out.contains(" yes "),
        "{out}"
    );
    assert!(out.contains("1/1"), "{out}");
    // B's hub, connected, with the round-trip time to it: in the API and on screen.
    let hub = honest.hub.addr.clone();
    let mesh = mesh_info(&b);
    let rtt = hub_rtt_ms(&mesh["hubs"], &hub).unwrap_or_else(|| panic!("no RTT: {mesh}"));
    assert!(plausible_rtt_ms(rtt), "{rtt} ms: {mesh}");
    let row = out
        .lines()
        .find(|l| l.starts_with(&hub))
        .unwrap_or_else(|| panic!("no row for hub {hub}: {out}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells.get(2), Some(&"yes"), "{row}");
    assert_eq!(cells.get(4), Some(&"ms"), "{row}");
    let shown: f64 = cells[3].parse().unwrap_or_else(|_| panic!("RTT: {row}"));
    assert!(plausible_rtt_ms(shown), "{row}");

    // A port whose service nobody provides, and a port that cannot listen (taken).
    let ep = local_id(&b);
    let orphan = free_port();
    let r = post_json(
        &b,
        &format!("/api/meshes/{MESH}/endpoints/{ep}/ports/127.0.0.1/tcp/{orphan}"),
        &json!({"target": {"service": "nobody-has-it"}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let r = post_json(
        &b,
        &format!("/api/meshes/{MESH}/endpoints/{ep}/ports/127.0.0.1/tcp/{taken_port}"),
        &json!({"target": {"service": "echo"}}),
    );
    // The agent keeps a port it cannot listen on, as not open, with the reason.
    assert_eq!(r.status, 200, "{}", r.text());
    let (code, out, err) = status(&ztm, &cli, &b, &[]);
    assert!(
        out.contains(&format!("port 127.0.0.1:{taken_port}/tcp is not open")),
        "{out}"
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!(
            "port 127.0.0.1:{orphan}/tcp: no provider of tcp/nobody-has-it is online"
        )),
        "{out}"
    );
    assert!(err.contains("need attention"), "{err}");
    let (code, json_out, _) = status(&ztm, &cli, &b, &["-o", "json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(v["healthy"], false, "{json_out}");
    assert!(
        v["problems"].as_array().is_some_and(|p| !p.is_empty()),
        "{json_out}"
    );
    drop(taken);

    // The hub goes down: B's mesh is no longer connected, and has no RTT to show.
    let mut hub_proc = honest.hub;
    hub_proc.proc.kill9();
    wait_until(
        Duration::from_secs(30),
        "status says the hub is gone",
        || {
            status(&ztm, &cli, &b, &[])
                .1
                .contains("not connected to any of its hubs")
        },
    );
    let out = status(&ztm, &cli, &b, &[]).1;
    let row = out.lines().find(|l| l.starts_with(&hub)).unwrap_or("");
    assert_eq!(
        row.split_whitespace().skip(2).collect::<Vec<_>>(),
        ["no", "-"],
        "{out}"
    );
    let mesh = mesh_info(&b);
    assert_eq!(mesh["hubs"][0]["connected"], false, "{mesh}");
    assert!(mesh["hubs"][0].get("rttMs").is_none(), "{mesh}");

    // No agent at all.
    let (code, out, err) = status(&ztm, &cli, &format!("127.0.0.1:{}", free_port()), &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("not answering"), "{out}");
}
