//! The hub says why it closes a connection (a GOAWAY's debug text, PROTOCOL.md "Closing
//! connections"), and the agent tells its user: real CA, hub and agents on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ztm_testkit::prelude::*;

/// The messages of an agent's mesh log.
fn mesh_log(agent: &str) -> Vec<String> {
    try_json(agent, &format!("/api/meshes/{MESH}/log"))
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect()
}

/// Whether one message of the agent's mesh log holds all of `words`.
fn logged(agent: &str, words: &[&str]) -> bool {
    mesh_log(agent)
        .iter()
        .any(|m| words.iter().all(|w| m.contains(w)))
}

/// A revoked certificate and a hub that stops: each agent's mesh log says what the hub said,
/// instead of a connection that merely closed.
#[test]
fn agents_hear_why_the_hub_closed_their_connections() {
    let dir = TempDir::new("goaway");
    let ca = ztm!().start_ca(dir.path());
    let pem = ca_pem(&ca.addr);
    let root = create_user(&ca.addr, "root");
    let alice = create_user(&ca.addr, "alice");
    let mut hub = ztm!().start_hub(dir.path(), "hub", &ca.addr);
    let a = ztm!().start_agent(dir.path(), "a");
    let b = ztm!().start_agent(dir.path(), "b");
    join_ok(&a.addr, &pem, "a", &root, &[&hub.addr]);
    join_ok(&b.addr, &pem, "b", &alice, &[&hub.addr]);
    wait_until(Duration::from_secs(20), "both agents connected", || {
        is_connected(&a.addr) && is_connected(&b.addr)
    });

    let revoked = delete(&ca.addr, "/api/certificates/alice");
    assert_eq!(revoked.status, 204, "{}", revoked.text());
    wait_until(
        Duration::from_secs(20),
        "alice's agent says its certificate was revoked",
        // On the control or the reverse connection, whichever the agent hears first.
        || logged(&b.addr, &["the hub closed the ", "certificate revoked"]),
    );

    hub.proc.stop();
    wait_until(
        Duration::from_secs(10),
        "root's agent says the hub stopped",
        || logged(&a.addr, &["the hub closed the ", "hub shutting down"]),
    );
    assert!(
        !logged(&a.addr, &["certificate revoked"]),
        "{:?}",
        mesh_log(&a.addr)
    );
}
