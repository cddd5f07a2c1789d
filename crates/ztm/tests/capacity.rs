//! No tunnel dies because of the number of tunnels: one agent holds more concurrent tunnels
//! through one hub than the old one-connection limit of 1,000 streams, its heartbeats go on
//! meanwhile (they never wait for a stream), and every tunnel still works afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ztm_testkit::hostile::*;
use ztm_testkit::prelude::*;

/// Sends a line on `s` and reads the echo.
fn roundtrip(s: &mut TcpStream, r: &mut BufReader<TcpStream>, line: &str) -> bool {
    let mut got = String::new();
    s.write_all(format!("{line}\n").as_bytes()).is_ok()
        && r.read_line(&mut got).is_ok()
        && got == format!("{line}\n")
}

#[test]
fn two_thousand_open_tunnels_through_one_agent_survive_heartbeats() {
    const N: usize = 2_000;
    let honest = Honest::start(&ztm!(), "capacity-tunnels", &[]);
    let started = Instant::now();
    let mut conns = Vec::with_capacity(N);
    for i in 0..N {
        let mut s = TcpStream::connect(("127.0.0.1", honest.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        assert!(
            roundtrip(&mut s, &mut r, &format!("open {i}")),
            "tunnel {i} did not open"
        );
        conns.push((s, r));
    }
    eprintln!("{N} tunnels open in {:?}", started.elapsed());
    // Past an agent heartbeat (every 10 s) and its timeout: the agent keeps its session.
    let hold_until = started + Duration::from_secs(25);
    while Instant::now() < hold_until {
        // A fresh tunnel opens too, and management still answers, while all are open.
        assert!(honest.tunnel_works(), "a fresh tunnel failed with {N} open");
        std::thread::sleep(Duration::from_millis(500));
    }
    for (i, (s, r)) in conns.iter_mut().enumerate() {
        assert!(roundtrip(s, r, &format!("still {i}")), "tunnel {i} died");
    }
    let log = honest.b.proc.log();
    assert_eq!(
        log.matches("connected to hub").count(),
        1,
        "the agent lost its session while {N} tunnels were open:\n{log}"
    );
    assert!(!log.contains("heartbeat failed"), "{log}");
}

/// A hub at its open-file limit (128 files here: room for 64 connections, 32 endpoints) is
/// full: seventy endpoints registering at once fill it, and a connection beyond is refused at
/// once (closed before its handshake, with a warning in the hub's log) instead of waiting in
/// the kernel's queue. The endpoints inside, and the honest tunnel, work throughout; when the
/// crowd leaves, a new agent joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_hub_refuses_at_once_and_serves_those_inside() {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use ztm_testkit::sim::{self, Fleet, SimUser};

    let honest = tokio::task::block_in_place(|| {
        Honest::start(&ztm!().with_files(128), "capacity-files", &[])
    });
    let (user, dave) = tokio::task::block_in_place(|| (honest.user("crowd"), honest.user("dave")));
    let user = Arc::new(SimUser::new(&honest.pem, &user).unwrap());
    let fleet = Arc::new(Fleet::default());
    let hub = honest.hub_addr();
    let tasks: Vec<_> = (0..70)
        .map(|i| tokio::spawn(sim::run(i, user.clone(), hub, fleet.clone())))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.ready.load(Ordering::SeqCst) < 20 {
        assert!(
            Instant::now() < deadline,
            "only {} endpoints got in (last error: {:?})",
            fleet.ready.load(Ordering::SeqCst),
            fleet.last_error()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Full: no endpoint got in for two seconds.
    let (mut last, mut since) = (0, Instant::now());
    while since.elapsed() < Duration::from_secs(2) {
        assert!(
            Instant::now() < deadline + Duration::from_secs(30),
            "the crowd never settled"
        );
        let now = fleet.ready.load(Ordering::SeqCst);
        if now != last {
            (last, since) = (now, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // More connections: each is taken or refused at once, none left to time out in the
    // kernel's queue (the endpoints inside come and go as others try again).
    for attempt in 0..5 {
        let started = Instant::now();
        let dialed = tokio::time::timeout(
            Duration::from_secs(5),
            try_dial(&hub.to_string(), &honest.pem, &dave, ztm_pki::ALPN_CONTROL),
        )
        .await;
        assert!(
            dialed.is_ok(),
            "connection {attempt} to the full hub was neither taken nor refused within 5 s \
             ({:?}; {} endpoints in)\n{}",
            started.elapsed(),
            fleet.ready.load(Ordering::SeqCst),
            honest.hub.proc.log()
        );
    }
    let ready = fleet.ready.load(Ordering::SeqCst);
    let log = honest.hub.proc.log();
    assert!(
        ready < 70,
        "all 70 endpoints got into a hub with room for 32"
    );
    assert!(log.contains("all its open-file limit allows"), "{log}");
    assert!(!log.contains("Too many open files"), "{log}");
    assert!(
        tokio::task::block_in_place(|| honest.tunnel_works()),
        "the honest tunnel broke"
    );
    assert_eq!(fleet.missed.load(Ordering::Relaxed), 0, "heartbeats missed");

    fleet.stop();
    for t in tasks {
        t.await.unwrap();
    }
    tokio::task::block_in_place(|| {
        let c = ztm!().start_agent(honest.dir.path(), "c");
        join_ok(&c.addr, &honest.pem, "c", &dave, &[&honest.hub.addr]);
        assert!(
            time_until(Duration::from_secs(15), || is_connected(&c.addr)).is_some(),
            "a new agent did not join once the crowd left\n{}",
            c.proc.log()
        );
    });
}
