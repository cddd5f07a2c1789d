//! `ztm up`, the README's first command: a CA, a hub and an agent joined as root on one
//! machine, with the web UI answering; a second run reuses the same mesh.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ztm_testkit::prelude::*;

fn start_up(dir: &TempDir, ca: &str, hub: &str, agent: &str) -> Proc {
    let state = dir.join("state");
    ztm!().spawn(
        "up",
        dir.path(),
        &[
            "up",
            "--dir",
            state.to_str().unwrap(),
            "--ca-listen",
            ca,
            "--hub-listen",
            hub,
            "--agent-listen",
            agent,
        ],
    )
}

#[test]
fn up_brings_a_working_mesh_with_the_web_ui() {
    let dir = TempDir::new("up");
    // Fixed ports: `ztm up` runs the three roles in one process and tells each the others'
    // addresses as configured, so it cannot be given port 0; and the second run reuses them.
    let (ca, hub, agent) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let mut up = start_up(&dir, &ca, &hub, &agent);
    wait_until(
        Duration::from_secs(30),
        "ztm up to print the web UI address",
        || up.log().contains(&format!("Web UI:  http://{agent}/")),
    );
    let log = up.log();
    assert!(log.contains("To add another computer"), "{log}");
    let page = get(&agent, "/");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<title>ZTM agent</title>"));
    assert_eq!(get(&agent, "/ui/app.js").status, 200);
    wait_until(Duration::from_secs(10), "the agent online as root", || {
        let eps = get(&agent, "/api/meshes/default/endpoints");
        eps.status == 200
            && eps.json().as_array().is_some_and(|a| {
                a.iter()
                    .any(|e| e["isLocal"] == true && e["online"] == true && e["username"] == "root")
            })
    });
    // root's identity was kept for the next run and for adding computers.
    let key = std::fs::read_to_string(dir.join("state/root.key")).unwrap();
    assert!(key.contains("PRIVATE KEY"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("state/root.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "root.key is owner-only");
    assert_eq!(up.stop(), Some(0), "clean exit on SIGTERM");

    // Again: the same mesh, still joined, comes back.
    let id = {
        let mut up = start_up(&dir, &ca, &hub, &agent);
        wait_until(Duration::from_secs(30), "the second run", || {
            up.log().matches("Web UI").count() >= 2
        });
        let mesh = get(&agent, "/api/meshes/default").json();
        let id = mesh["agent"]["id"].as_str().unwrap().to_string();
        wait_until(Duration::from_secs(10), "connected again", || {
            get(&agent, "/api/meshes/default").json()["connected"] == true
        });
        assert_eq!(
            get(&agent, "/api/meshes").json().as_array().unwrap().len(),
            1
        );
        assert_eq!(up.stop(), Some(0));
        id
    };
    assert!(!id.is_empty());
}
