//! Nothing piles up: after many tunnels opened and closed, the hub's and the agents'
//! descriptors and threads are back where they were.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use ztm_testkit::prelude::*;
use ztm_testkit::procfs::{fds, threads};
use ztm_testkit::stack::Stack;
use ztm_testkit::traffic::*;

/// After 1,000 tunnels opened and closed, the hub's and the agents' open descriptors and
/// threads are back to where they were.
#[test]
fn no_descriptor_or_thread_leak_after_1000_tunnels() {
    let st = Stack::start(&ztm!(), "tun-leak", &["root", "bob"]);
    let lines = tagged_server("B");
    st.add_service(1, "tcp", "lines", lines.port, None);
    st.wait_service(0, "tcp", "lines", &[1]);
    let port = free_port();
    st.map_port(0, "tcp", port, "lines", None);
    wait_tunnel(port, "B", Duration::from_secs(20));
    // Warm up (lazily created state), then let it settle.
    for i in 0..20 {
        assert_eq!(
            roundtrip(port, &format!("w{i}")).unwrap(),
            format!("B:w{i}")
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let pids = st.pids();
    let snapshot = |pids: &[(String, u32)]| -> Vec<(String, usize, u64)> {
        pids.iter()
            .map(|(n, p)| (n.clone(), fds(*p).unwrap_or(0), threads(*p).unwrap_or(0)))
            .collect()
    };
    let baseline = snapshot(&pids);

    let workers = 20;
    let per = 50;
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            std::thread::spawn(move || -> Result<(), String> {
                for i in 0..per {
                    let msg = format!("t{w}-{i}");
                    let got = roundtrip(port, &msg).map_err(|e| format!("{msg}: {e}"))?;
                    if got != format!("B:{msg}") {
                        return Err(format!("{msg}: answer {got:?}"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    let errors: Vec<String> = handles
        .into_iter()
        .filter_map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())).err())
        .collect();
    assert!(errors.is_empty(), "tunnels failed: {errors:?}");
    assert!(lines.accepted.load(Ordering::SeqCst) >= 1000 + 20);

    let mut last = Vec::new();
    let settled = time_until(Duration::from_secs(40), || {
        last = snapshot(&pids);
        last.iter()
            .zip(&baseline)
            .all(|((_, f, t), (_, f0, t0))| *f <= f0 + 5 && *t <= t0 + 2)
    });
    assert!(
        settled.is_some(),
        "descriptors/threads did not return to the baseline\n(name, fds, threads) before: \
         {baseline:?}\nafter: {last:?}"
    );
    eprintln!("baseline {baseline:?}, after {last:?}");
}
