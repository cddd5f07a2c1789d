//! End-to-end tests of UDP ports (docs/requirements.md §5): datagrams of every size through a
//! port come back intact, counted in the port's figures, and a flood both ways does not stall
//! the flow.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::UdpSocket;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ztm_testkit::prelude::*;
use ztm_testkit::stack::Stack;
use ztm_testkit::traffic::local;

/// A UDP server that sends every datagram back to where it came from.
fn udp_echo_server() -> (u16, Arc<AtomicUsize>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    (port, count)
}

/// A UDP echo service on agent 1, mapped to a port on agent 0, and a client socket connected to
/// that port. Also returns the service's count of datagrams and the port.
fn udp_echo_client(st: &Stack) -> (UdpSocket, Arc<AtomicUsize>, u16) {
    let (svc_port, served) = udp_echo_server();
    st.add_service(1, "udp", "uecho", svc_port, None);
    st.wait_service(0, "udp", "uecho", &[1]);
    let port = free_port();
    st.map_port(0, "udp", port, "uecho", None);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.connect(local(port)).unwrap();
    (client, served, port)
}

/// 1,000 datagrams of mixed sizes up to 8 KiB through a UDP port come back intact.
#[test]
fn udp_echo_through_a_port() {
    let st = Stack::start(&ztm!(), "tun-udp", &["root", "bob"]);
    let (client, served, port) = udp_echo_client(&st);
    let mut rng = Rng::new();
    let mut buf = vec![0u8; 65_536];
    let mut resent = 0usize;
    let mut echoed_bytes = 0usize;
    let started = Instant::now();
    for i in 0..1000u64 {
        // Sizes: the edges (1 and 8 KiB) now and then, otherwise anything in between.
        let size = match i % 10 {
            0 => 8 + (i as usize % 4),
            1 => 8192,
            _ => 8 + (rng.next() as usize % (8192 - 8)) + 1,
        }
        .min(8192);
        let mut d = i.to_le_bytes().to_vec();
        d.extend(rng.bytes(size - 8));
        // The first datagram opens the flow (its tunnel); give it longer.
        let (tries, wait) = if i == 0 {
            (40, Duration::from_millis(500))
        } else {
            (5, Duration::from_secs(2))
        };
        let mut ok = false;
        'tries: for t in 0..tries {
            if t > 0 {
                resent += 1;
            }
            client.send(&d).unwrap();
            let until = Instant::now() + wait;
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                client.set_read_timeout(Some(left)).unwrap();
                match client.recv(&mut buf) {
                    Ok(n) if buf[..n] == d[..] => {
                        ok = true;
                        break 'tries;
                    }
                    // An answer to an earlier, resent datagram: must be one we sent.
                    Ok(n) => {
                        assert!(n >= 8, "a datagram of {n} bytes came back");
                        let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
                        assert!(seq < i, "datagram {seq} came back while sending {i}");
                    }
                    Err(_) => break,
                }
            }
        }
        assert!(
            ok,
            "datagram {i} ({size} bytes) did not come back intact after {tries} tries \
             (service got {} datagrams)",
            served.load(Ordering::SeqCst)
        );
        echoed_bytes += d.len();
    }
    eprintln!(
        "1000 datagrams echoed in {:?}, {resent} resent",
        started.elapsed()
    );
    assert!(
        resent <= 50,
        "too many datagrams were lost: {resent} resent"
    );

    // The port's figures: the client's one flow is open (until it idles out), and every
    // datagram that came back counted each way (resent ones may count twice).
    let stats = get(
        &st.agents[0].addr,
        &format!(
            "/api/meshes/{MESH}/endpoints/{}/ports/127.0.0.1/udp/{port}",
            st.ids[0]
        ),
    )
    .json()["stats"]
        .clone();
    assert_eq!(stats["active"], 1, "{stats}");
    assert!(stats["total"].as_u64() >= Some(1), "{stats}");
    let most = (echoed_bytes + resent * 8192) as u64;
    for field in ["bytesToService", "bytesFromService"] {
        let n = stats[field].as_u64().unwrap_or(0);
        assert!(
            (echoed_bytes as u64..=most).contains(&n),
            "{field}: {n}, {echoed_bytes} echoed: {stats}"
        );
    }
}

/// Sends `d` on `client` until it comes back (other datagrams may arrive first), at most
/// `tries` times, waiting `wait` for each. Returns whether it came back.
fn echoed(client: &UdpSocket, d: &[u8], tries: usize, wait: Duration) -> bool {
    let mut buf = vec![0u8; 65_536];
    for _ in 0..tries {
        client.send(d).unwrap();
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            client.set_read_timeout(Some(left)).unwrap();
            match client.recv(&mut buf) {
                Ok(n) if buf[..n] == *d => return true,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    false
}

/// A client floods a UDP echo service without reading the answers, so both directions of its
/// flow are full at once. Datagrams may be dropped, as UDP allows, but the flow must not stall:
/// it answers again as soon as the flood ends.
#[test]
fn udp_flood_both_ways_does_not_stall_the_flow() {
    let st = Stack::start(&ztm!(), "tun-udpflood", &["root", "bob"]);
    let (client, served, _) = udp_echo_client(&st);
    assert!(echoed(&client, b"open", 40, Duration::from_millis(500)));
    let flood = vec![0xAB; 1024];
    for _ in 0..50_000 {
        let _ = client.send(&flood);
    }
    let after = served.load(Ordering::SeqCst);
    assert!(
        echoed(&client, b"after the flood", 20, Duration::from_millis(500)),
        "the flow stalled (the service got {} datagrams of the flood)",
        after
    );
    eprintln!("service got {after} datagrams during the flood");
}
