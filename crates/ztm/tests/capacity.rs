//! No tunnel dies because of the number of tunnels: one agent holds more concurrent tunnels
//! through one hub than the old one-connection limit of 1,000 streams, its heartbeats go on
//! meanwhile (they never wait for a stream), and every tunnel still works afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ztm_testkit::hostile::*;
use ztm_testkit::ztm;

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
