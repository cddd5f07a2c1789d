//! End-to-end tests of tunnels (port mappings, docs/requirements.md §5, §7, §8, §11): a CA, a hub and agents as
//! real processes on loopback (or in network namespaces the test creates), small TCP and UDP
//! servers written here as the services, and clients that push data through the agents' ports.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ztm_testkit::prelude::*;
use ztm_testkit::procfs::{fds, status_field, threads, PeakRss};
use ztm_testkit::stack::Stack;
use ztm_testkit::traffic::*;

// ---------------------------------------------------------------------------------------------
// Services: small blocking servers, one thread per connection (more in ztm_testkit::traffic).

/// Reads everything, at most `rate` bytes per second, counting into `received`; at the
/// client's end of stream answers the count as a decimal line.
fn slow_sink(rate: u64, received: Arc<AtomicU64>) -> Backend {
    serve(bind_local(), move |mut s| {
        let started = Instant::now();
        let mut buf = vec![0u8; 16 * 1024];
        let mut total = 0u64;
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            total += n as u64;
            received.fetch_add(n as u64, Ordering::SeqCst);
            let due = Duration::from_secs_f64(total as f64 / rate as f64);
            let spent = started.elapsed();
            if due > spent {
                std::thread::sleep(due - spent);
            }
        }
        let _ = s.write_all(format!("{total}\n").as_bytes());
        let _ = s.shutdown(Shutdown::Write);
    })
}

/// Transfers: the client sends `op` (b'U' or b'D'), a length and a seed (u64 LE each). `U`:
/// the server reads that many bytes of the stream and answers `OK n` or `BAD why`; `D`: the
/// server sends that many bytes of the stream and closes.
fn transfer_server() -> Backend {
    serve(bind_local(), |mut s| {
        let mut head = [0u8; 17];
        if s.read_exact(&mut head).is_err() {
            return;
        }
        let len = u64::from_le_bytes(head[1..9].try_into().unwrap());
        let seed = u64::from_le_bytes(head[9..17].try_into().unwrap());
        match head[0] {
            b'U' => {
                let mut v = Verifier::new(seed);
                let mut buf = vec![0u8; BLOCK];
                let mut answer = String::new();
                while v.total() < len {
                    let want = ((len - v.total()) as usize).min(BLOCK);
                    match s.read(&mut buf[..want]) {
                        Ok(0) => {
                            answer = format!("BAD early end after {} bytes\n", v.total());
                            break;
                        }
                        Err(e) => {
                            answer = format!("BAD read after {} bytes: {e}\n", v.total());
                            break;
                        }
                        Ok(n) => {
                            if let Err(at) = v.push(&buf[..n]) {
                                answer = format!("BAD wrong byte at {at}\n");
                                break;
                            }
                        }
                    }
                }
                if answer.is_empty() {
                    answer = match v.finish() {
                        Ok(n) => format!("OK {n}\n"),
                        Err(at) => format!("BAD wrong byte at {at}\n"),
                    };
                }
                let _ = s.write_all(answer.as_bytes());
            }
            b'D' => {
                let _ = write_stream(&mut s, seed, len);
            }
            _ => {}
        }
        let _ = s.shutdown(Shutdown::Write);
    })
}

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

/// 30 connections through `port`, 100 ms apart (3 s: longer than an agent keeps its list of
/// providers), all answered by the server tagged `tag`.
fn every_connection_reaches(port: u16, tag: &str) {
    for i in 0..30 {
        let got = roundtrip(port, &format!("n{i}"));
        assert_eq!(
            got.as_deref().ok(),
            Some(format!("{tag}:n{i}").as_str()),
            "{got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// 100 MB each way through one tunnel arrive intact; 200 concurrent connections through the
/// same port all work.
#[test]
fn bulk_echo_and_200_concurrent_connections() {
    let st = Stack::start(&ztm!(), "tun-bulk", &["root", "bob"]);
    let echo = echo_server();
    let (lines, echo_port, lines_port) = st.map_beside_lines("echo", echo.port);

    // 100 MB up, echoed back down, read concurrently.
    let size = 100 * MB;
    let seed = rand_u64();
    let s = connect(echo_port).unwrap();
    let mut w = s.try_clone().unwrap();
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        let r = write_stream(&mut w, seed, size);
        let _ = w.shutdown(Shutdown::Write);
        r
    });
    let mut r = s;
    let got = read_verify(&mut r, seed);
    let wrote = writer.join().unwrap();
    let took = started.elapsed();
    assert!(wrote.is_ok(), "writing into the tunnel failed: {wrote:?}");
    assert_eq!(
        got,
        Ok(size),
        "the echo through the tunnel came back wrong or short"
    );
    eprintln!(
        "100 MB each way through one tunnel in {took:?} ({:.1} MB/s each way)",
        size as f64 / 1e6 / took.as_secs_f64()
    );

    // 200 connections open at once, each with its own request and answer.
    let n = 200;
    let before = lines.accepted.load(Ordering::SeqCst);
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let c = connect(lines_port);
                barrier.wait();
                // All are connected now; each asks and holds its connection until all asked.
                let result = match c {
                    Err(e) => Err(format!("connect {i}: {e}")),
                    Ok(mut c) => match line_on(&mut c, &format!("hello {i}")) {
                        Ok(got) if got == format!("B:hello {i}") => Ok(c),
                        Ok(got) => Err(format!("connection {i}: answer {got:?}")),
                        Err(e) => Err(format!("connection {i}: {e}")),
                    },
                };
                barrier.wait();
                result.map(drop)
            })
        })
        .collect();
    let results: Vec<Result<(), String>> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
        .collect();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {n} concurrent connections failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(10)]
    );
    assert!(
        lines.accepted.load(Ordering::SeqCst) - before >= n,
        "the backend saw fewer than {n} connections"
    );
}

/// A UDP echo service on agent 1, mapped to a port on agent 0, and a client socket connected to
/// that port. Also returns the service's count of datagrams.
fn udp_echo_client(st: &Stack) -> (UdpSocket, Arc<AtomicUsize>) {
    let (svc_port, served) = udp_echo_server();
    st.add_service(1, "udp", "uecho", svc_port, None);
    st.wait_service(0, "udp", "uecho", &[1]);
    let port = free_port();
    st.map_port(0, "udp", port, "uecho", None);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.connect(local(port)).unwrap();
    (client, served)
}

/// 1,000 datagrams of mixed sizes up to 8 KiB through a UDP port come back intact.
#[test]
fn udp_echo_through_a_port() {
    let st = Stack::start(&ztm!(), "tun-udp", &["root", "bob"]);
    let (client, served) = udp_echo_client(&st);
    let mut rng = Rng::new();
    let mut buf = vec![0u8; 65_536];
    let mut resent = 0usize;
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
    }
    eprintln!(
        "1000 datagrams echoed in {:?}, {resent} resent",
        started.elapsed()
    );
    assert!(
        resent <= 50,
        "too many datagrams were lost: {resent} resent"
    );
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
    let (client, served) = udp_echo_client(&st);
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

/// A client pushes up to 1 GB into a tunnel whose service reads slowly: the hub and both
/// agents stay under 64 MiB RSS throughout and every byte arrives.
#[test]
fn slow_reader_keeps_memory_bounded() {
    let st = Stack::start(&ztm!(), "tun-slow", &["root", "bob"]);
    // The service reads at most 16 MB/s: far slower than the tunnel, so windows fill.
    let rate = 16 * MB;
    let received = Arc::new(AtomicU64::new(0));
    let sink = slow_sink(rate, received.clone());
    let (_lines, port, lines_port) = st.map_beside_lines("sink", sink.port);

    let pids = st.pids();
    let sampler = PeakRss::start(
        pids.iter().map(|(_, pid)| *pid).collect(),
        Duration::from_millis(200),
    );
    let limit = 1000 * MB;
    let budget = Duration::from_secs(65);
    let chunk = block(rand_u64(), 0);
    let mut s = connect(port).unwrap();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut max_in_flight = 0u64;
    while sent < limit && started.elapsed() < budget {
        if let Err(e) = s.write_all(&chunk) {
            panic!(
                "write failed after {sent} bytes ({} received by the service): {e}",
                received.load(Ordering::SeqCst)
            );
        }
        sent += chunk.len() as u64;
        max_in_flight = max_in_flight.max(sent - received.load(Ordering::SeqCst));
    }
    let push_time = started.elapsed();
    s.shutdown(Shutdown::Write).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut answer = String::new();
    let read = s.read_to_string(&mut answer);
    let maxima: Vec<(String, u64)> = pids
        .into_iter()
        .map(|(name, _)| name)
        .zip(sampler.finish())
        .collect();
    eprintln!(
        "pushed {sent} bytes in {push_time:?}; at most {max_in_flight} bytes in flight; \
         max RSS (KiB): {maxima:?}"
    );
    assert!(
        read.is_ok(),
        "no answer from the slow service: {read:?} ({} received)",
        received.load(Ordering::SeqCst)
    );
    assert_eq!(
        answer.trim(),
        sent.to_string(),
        "the service did not get every byte"
    );
    assert!(
        sent >= 400 * MB,
        "only {sent} bytes could be pushed in {budget:?}"
    );
    // Nothing absorbed the stream without bound: the sender was held back by the reader.
    assert!(
        max_in_flight < 256 * MB,
        "{max_in_flight} bytes were in flight between the client and the slow reader"
    );
    for (name, kib) in &maxima {
        assert!(*kib > 0, "no RSS sample of {name}");
        assert!(
            *kib < 64 * 1024,
            "{name} reached {kib} KiB RSS under a slow reader (limit 64 MiB): {maxima:?}"
        );
    }
    // The tunnels still work.
    wait_tunnel(lines_port, "B", Duration::from_secs(10));
}

/// Twenty saturating 50 MB transfers in a row (alternately up and down) on one stack, then a
/// fresh connection still works.
/// Sends `count` bytes one write at a time, a little apart, so that each becomes its own
/// DATA frame, then closes; `done` counts the bytes written.
fn drip_server(count: usize, done: Arc<AtomicUsize>) -> Backend {
    serve(bind_local(), move |mut s| {
        let _ = s.set_nodelay(true);
        for _ in 0..count {
            if s.write_all(b"x").is_err() {
                break;
            }
            done.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(20));
        }
        let _ = s.shutdown(Shutdown::Write);
    })
}

/// A client that stops reading while a service trickles one-byte writes: tens of thousands of
/// tiny DATA frames cross the relays towards a reader that takes nothing. No byte may be lost,
/// and another tunnel over the same agents and hub must keep working throughout (h2 closes a
/// connection on which too many small frames sit unread, or that receives empty ones).
#[test]
fn tiny_writes_to_a_stalled_reader_lose_nothing() {
    let st = Stack::start(&ztm!(), "tun-drip", &["root", "bob"]);
    let count = 60_000;
    let written = Arc::new(AtomicUsize::new(0));
    let drip = drip_server(count, written.clone());
    let (_lines, port, lines_port) = st.map_beside_lines("drip", drip.port);

    // Connect with a small receive buffer and read nothing until the service has written
    // everything: the kernel holds little, the rest waits in the relays.
    let mut client = on_tokio(async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.set_recv_buffer_size(4096)?;
        sock.connect(local(port)).await?.into_std()
    });
    client.set_nonblocking(false).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut probes = 0;
    while written.load(Ordering::SeqCst) < count {
        assert!(
            Instant::now() < deadline,
            "the service wrote only {} bytes",
            written.load(Ordering::SeqCst)
        );
        let msg = format!("p{probes}");
        assert_eq!(
            roundtrip(lines_port, &msg).map_err(|e| format!("{msg}: {e}")),
            Ok(format!("B:{msg}")),
            "another tunnel failed while the reader was stalled ({} bytes written)",
            written.load(Ordering::SeqCst)
        );
        probes += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    client
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), count, "bytes lost on the way");
    assert!(got.iter().all(|b| *b == b'x'));
    assert_eq!(roundtrip(lines_port, "after").unwrap(), "B:after");
}

/// Runs `f` (setting up a socket with tokio's options, such as kernel buffer sizes or the
/// listen backlog) to completion and hands its result to a std test.
fn on_tokio<T>(f: impl std::future::Future<Output = std::io::Result<T>>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
        .unwrap()
}

/// Accepts connections and never reads from them; keeps them open as long as the test runs.
fn black_hole() -> Backend {
    let listener = on_tokio(async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.set_recv_buffer_size(16 * 1024)?;
        sock.bind(local(0))?;
        sock.listen(1024)?.into_std()
    });
    listener.set_nonblocking(false).unwrap();
    let kept = Arc::new(Mutex::new(Vec::new()));
    serve(listener, move |s| kept.lock().unwrap().push(s))
}

/// How one client of [`stalled_tunnels_neither_block_others_nor_pile_up`] fared.
#[derive(Default)]
struct Pusher {
    pushed: AtomicU64,
    /// A write found no room for a while: the tunnel is full.
    blocked: AtomicBool,
    /// A write failed: the tunnel was closed under the client.
    closed: AtomicBool,
}

/// Connects to `port` and writes until the connection fails or `stop` is set.
fn push_until_closed(port: u16, me: Arc<Pusher>, stop: Arc<AtomicBool>) {
    let s = on_tokio(async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.set_send_buffer_size(16 * 1024)?;
        sock.connect(local(port)).await?.into_std()
    });
    s.set_nonblocking(false).unwrap();
    s.set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut s = s;
    let chunk = vec![b'z'; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        match s.write(&chunk) {
            Ok(n) => {
                me.pushed.fetch_add(n as u64, Ordering::SeqCst);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                me.blocked.store(true, Ordering::SeqCst)
            }
            Err(_) => {
                me.closed.store(true, Ordering::SeqCst);
                return;
            }
        }
    }
}

/// Many tunnels into a service that reads nothing: other tunnels through the same agents
/// and hub keep working (the stalled ones cannot fill a connection's window), and once the
/// relays hold more than their limit for such tunnels, stalled tunnels are reset.
#[test]
fn stalled_tunnels_neither_block_others_nor_pile_up() {
    use ztm_proto::wire::{STALL_LIMIT, STREAM_WINDOW};
    let st = Stack::start(&ztm!(), "tun-stall", &["root", "bob"]);
    let hole = black_hole();
    let (_lines, port, lines_port) = st.map_beside_lines("hole", hole.port);

    // Each stalled tunnel holds about a stream window in agent B and one in the hub: more
    // tunnels than fit under the limit, and more than filled a 16 MiB connection window.
    let fit = STALL_LIMIT / STREAM_WINDOW as usize;
    let count = fit + 8;
    let stop = Arc::new(AtomicBool::new(false));
    let pushers: Vec<Arc<Pusher>> = (0..count).map(|_| Arc::default()).collect();
    let threads: Vec<_> = pushers
        .iter()
        .map(|p| {
            let (p, stop) = (p.clone(), stop.clone());
            std::thread::spawn(move || push_until_closed(port, p, stop))
        })
        .collect();
    let stuck =
        |p: &Arc<Pusher>| p.blocked.load(Ordering::SeqCst) || p.closed.load(Ordering::SeqCst);
    wait_until(
        Duration::from_secs(60),
        "every client of the black hole stuck",
        || pushers.iter().all(stuck),
    );
    let pushed: u64 = pushers
        .iter()
        .map(|p| p.pushed.load(Ordering::SeqCst))
        .sum();
    eprintln!("{count} clients pushed {pushed} bytes before they got stuck");

    // Another tunnel on the same connections answers at once.
    let mut witness = connect(lines_port).unwrap();
    witness
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        line_on(&mut witness, "during").map_err(|e| e.to_string()),
        Ok("B:during".to_string()),
        "a tunnel beside {count} stalled ones got no answer"
    );

    // The relays reset stalled tunnels until they hold no more than the limit: several of
    // them, as each holds at most a window (a little less when its last frame did not fit).
    let closed = || {
        pushers
            .iter()
            .filter(|p| p.closed.load(Ordering::SeqCst))
            .count()
    };
    wait_until(
        Duration::from_secs(30),
        "stalled tunnels reset by the relays",
        || closed() >= (count - fit) / 2,
    );
    eprintln!("{} of {count} stalled tunnels were reset", closed());
    assert_eq!(line_on(&mut witness, "after").unwrap(), "B:after");
    assert_eq!(roundtrip(lines_port, "fresh").unwrap(), "B:fresh");
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
}

/// A listening port whose accept queue is full, with the connections that fill it: further
/// connections hang (the kernel drops their SYNs), as towards a service behind a firewall
/// that drops packets.
fn deaf_service() -> (TcpListener, Vec<TcpStream>) {
    let listener = on_tokio(async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(local(0))?;
        sock.listen(0)?.into_std()
    });
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    for _ in 0..8 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => queued.push(s),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
                return (listener, queued);
            }
        }
    }
    panic!("the accept queue of {addr} never filled");
}

/// A mapped service that never accepts: agent B gives up first and says why, and that reason
/// (not a bare timeout of agent A) is what A reports. Each hop waits less than the one before.
#[test]
fn a_service_that_never_accepts_is_reported_with_the_far_agents_reason() {
    let st = Stack::start(&ztm!(), "tun-deaf", &["root", "bob"]);
    let (deaf, _queued) = deaf_service();
    let deaf_port = deaf.local_addr().unwrap().port();
    let (_lines, port, lines_port) = st.map_beside_lines("deaf", deaf_port);

    let started = Instant::now();
    let mut s = connect(port).unwrap();
    s.write_all(b"hello\n").unwrap();
    let mut buf = [0u8; 16];
    let read = s.read(&mut buf);
    let waited = started.elapsed();
    assert!(
        matches!(read, Ok(0))
            || matches!(&read, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut),
        "the client's connection was not closed: {read:?} after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(15),
        "closed only after {waited:?}"
    );

    let want = format!("at 127.0.0.1:{deaf_port} did not accept");
    let mut log = Vec::new();
    let found = time_until(Duration::from_secs(5), || {
        log = try_json(st.api(0), &format!("/api/meshes/{MESH}/log"))
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default();
        log.iter()
            .any(|e| e["message"].as_str().is_some_and(|m| m.contains(&want)))
    });
    assert!(
        found.is_some(),
        "A's mesh log does not say {want:?}: {log:#?}"
    );
    eprintln!("the client's connection closed after {waited:?}");
    assert_eq!(roundtrip(lines_port, "after").unwrap(), "B:after");
}

#[test]
fn twenty_transfers_in_a_row() {
    let st = Stack::start(&ztm!(), "tun-20x", &["root", "bob"]);
    let xfer = transfer_server();
    let (_lines, port, lines_port) = st.map_beside_lines("xfer", xfer.port);

    let size = 50 * MB;
    let started = Instant::now();
    for i in 0..20 {
        let t = Instant::now();
        let seed = rand_u64();
        let up = i % 2 == 0;
        let mut s = connect(port).unwrap_or_else(|e| panic!("transfer {i}: connect: {e}"));
        let mut head = vec![if up { b'U' } else { b'D' }];
        head.extend(size.to_le_bytes());
        head.extend(seed.to_le_bytes());
        s.write_all(&head).unwrap();
        if up {
            write_stream(&mut s, seed, size)
                .unwrap_or_else(|e| panic!("transfer {i} (up): write: {e}"));
            let mut answer = String::new();
            s.read_to_string(&mut answer)
                .unwrap_or_else(|e| panic!("transfer {i} (up): no answer: {e}"));
            assert_eq!(answer, format!("OK {size}\n"), "transfer {i} (up)");
        } else {
            let got = read_verify(&mut s, seed);
            assert_eq!(got, Ok(size), "transfer {i} (down)");
        }
        eprintln!(
            "transfer {i} ({}) took {:?}",
            if up { "up" } else { "down" },
            t.elapsed()
        );
    }
    eprintln!("20 x 50 MB in {:?}", started.elapsed());
    let got = roundtrip(lines_port, "after").expect("a fresh connection after the transfers");
    assert_eq!(got, "B:after");
    // And the transfer port too.
    let mut s = connect(port).unwrap();
    let mut head = vec![b'D'];
    head.extend(1000u64.to_le_bytes());
    head.extend(7u64.to_le_bytes());
    s.write_all(&head).unwrap();
    assert_eq!(read_verify(&mut s, 7), Ok(1000));
}

/// An idle tunnelled connection still works after ten minutes (only with ZTM_SLOW_TESTS=1).
#[test]
fn idle_tunnel_survives_ten_minutes() {
    if std::env::var("ZTM_SLOW_TESTS").as_deref() != Ok("1") {
        eprintln!("idle_tunnel_survives_ten_minutes: skipped (set ZTM_SLOW_TESTS=1 to run it)");
        return;
    }
    let st = Stack::start(&ztm!(), "tun-idle", &["root", "bob"]);
    let lines = tagged_server("B");
    st.add_service(1, "tcp", "lines", lines.port, None);
    st.wait_service(0, "tcp", "lines", &[1]);
    let port = free_port();
    st.map_port(0, "tcp", port, "lines", None);
    wait_tunnel(port, "B", Duration::from_secs(20));
    let mut s = connect(port).unwrap();
    assert_eq!(line_on(&mut s, "before").unwrap(), "B:before");
    std::thread::sleep(Duration::from_secs(600));
    assert_eq!(
        line_on(&mut s, "after ten minutes").expect("the idle connection broke"),
        "B:after ten minutes"
    );
    assert_eq!(roundtrip(port, "fresh").unwrap(), "B:fresh");
}

/// Two providers of one service may admit different users. Each user discovers, and is sent
/// to, exactly the providers whose own list admits it, whichever provider the hub happens to
/// list first; the others see each provider's list.
#[test]
fn each_provider_admits_users_by_its_own_list() {
    let st = Stack::start(&ztm!(), "tun-users", &["dave", "bob", "carol"]);
    let (b_srv, c_srv) = (tagged_server("B"), tagged_server("C"));
    let erin: &[&str] = &["erin"];
    // s1: B admits only erin, C everyone; s2 the other way round.
    st.add_service(1, "tcp", "s1", b_srv.port, Some(erin));
    st.add_service(2, "tcp", "s1", c_srv.port, None);
    st.add_service(1, "tcp", "s2", b_srv.port, None);
    st.add_service(2, "tcp", "s2", c_srv.port, Some(erin));
    // Bob owns B's providers and may use C's s1: he sees both, each with its own list.
    st.wait_service(1, "tcp", "s1", &[1, 2]);
    let s1 = service_seen(st.api(1), "tcp", "s1").unwrap();
    assert!(
        s1.get("users").is_none(),
        "the providers' lists differ: {s1}"
    );
    for e in s1["endpoints"].as_array().unwrap() {
        let want = if e["id"] == st.ids[1].as_str() {
            json!(["erin"])
        } else {
            Value::Null
        };
        assert_eq!(e["users"], want, "{s1}");
    }
    // Dave sees exactly the provider that admits him, for each service.
    let (mut only_c, mut only_b) = (vec![st.ids[2].clone()], vec![st.ids[1].clone()]);
    only_c.sort();
    only_b.sort();
    wait_until(
        Duration::from_secs(20),
        "dave to discover s1 at C and s2 at B",
        || {
            providers_seen(st.api(0), "tcp", "s1") == only_c
                && providers_seen(st.api(0), "tcp", "s2") == only_b
        },
    );
    let (p1, p2) = (free_port(), free_port());
    st.map_port(0, "tcp", p1, "s1", None);
    st.map_port(0, "tcp", p2, "s2", None);
    wait_tunnel(p1, "C", Duration::from_secs(20));
    wait_tunnel(p2, "B", Duration::from_secs(20));
    for i in 0..10 {
        assert_eq!(
            roundtrip(p1, &format!("n{i}")).ok(),
            Some(format!("C:n{i}"))
        );
        assert_eq!(
            roundtrip(p2, &format!("n{i}")).ok(),
            Some(format!("B:n{i}"))
        );
    }
}

/// A port whose target names an endpoint goes there only. Endpoint names are not unique (any
/// user may call an endpoint anything), so a name is pinned to that endpoint's id when the port
/// is created: another user's endpoint taking the same name later, and publishing the same
/// service, must not receive the port's connections. A name two endpoints share is refused,
/// naming both.
#[test]
fn a_target_endpoint_given_by_name_is_pinned_to_its_id() {
    let st = Stack::start(&ztm!(), "tun-pin", &["root", "bob"]);
    let b_srv = tagged_server("B");
    st.add_service(1, "tcp", "svc", b_srv.port, None);
    st.wait_service(0, "tcp", "svc", &[1]);
    let port = free_port();
    let v = st.map_port(0, "tcp", port, "svc", Some("b"));
    assert_eq!(v["target"]["endpoint"], st.ids[1], "pinned to B's id: {v}");
    wait_tunnel(port, "B", Duration::from_secs(20));

    // Carol's endpoint, also named "b", publishes the same service.
    let carol = create_user(&st.ca.addr, "carol");
    let c = st.ztm.start_agent(st.dir.path(), "c");
    join_ok(&c.addr, &ca_pem(&st.ca.addr), "b", &carol, &[&st.hub.addr]);
    let c_id = local_id(&c.addr);
    let c_srv = tagged_server("C");
    add_service_at(&c.addr, &c_id, "tcp", "svc", c_srv.port, None);
    wait_until(
        Duration::from_secs(20),
        "A to discover svc on B and C",
        || discovered(st.api(0), "tcp", "svc", &[&st.ids[1], &c_id]),
    );

    // Every connection through the pinned port still reaches B, over 3 s: longer than A
    // keeps its list of providers (2 s), so the list that includes C is used too.
    every_connection_reaches(port, "B");
    // A new port naming "b" is refused: the name is ambiguous now.
    let path = format!(
        "/api/meshes/{MESH}/endpoints/{}/ports/127.0.0.1/tcp/{}",
        st.ids[0],
        free_port()
    );
    let r = post_json(
        st.api(0),
        &path,
        &json!({"target": {"service": "svc", "endpoint": "b"}}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let msg = r.json()["message"].as_str().unwrap_or("").to_string();
    assert!(
        msg.contains(&st.ids[1]) && msg.contains(&c_id) && msg.contains("carol"),
        "{msg}"
    );
    assert_eq!(
        get(st.api(0), &path).status,
        404,
        "a refused port was not created"
    );
    // By id, either is fine.
    let by_id = free_port();
    let v = st.map_port(0, "tcp", by_id, "svc", Some(&c_id));
    assert_eq!(v["target"]["endpoint"], c_id.as_str(), "{v}");
    wait_tunnel(by_id, "C", Duration::from_secs(20));
}

/// Two endpoints provide one service: connections through a port with no fixed endpoint reach
/// both; with one provider killed, every next connection still succeeds.
#[test]
fn balancing_over_two_providers_and_failover() {
    let mut st = Stack::start(&ztm!(), "tun-lb", &["root", "bob", "carol"]);
    let b_srv = tagged_server("B");
    let c_srv = tagged_server("C");
    st.add_service(1, "tcp", "web", b_srv.port, None);
    st.add_service(2, "tcp", "web", c_srv.port, None);
    st.wait_service(0, "tcp", "web", &[1, 2]);
    let port = free_port();
    st.map_port(0, "tcp", port, "web", None);
    // Until both providers answered once (the agent's view of providers may lag a moment).
    let (mut seen_b, mut seen_c) = (false, false);
    wait_until(Duration::from_secs(20), "both providers to answer", || {
        match roundtrip(port, "ping").as_deref() {
            Ok("B:ping") => seen_b = true,
            Ok("C:ping") => seen_c = true,
            _ => {}
        }
        seen_b && seen_c
    });

    let mut counts = [0usize; 2];
    let mut failures = Vec::new();
    for i in 0..100 {
        match roundtrip(port, &format!("n{i}")) {
            Ok(got) if got == format!("B:n{i}") => counts[0] += 1,
            Ok(got) if got == format!("C:n{i}") => counts[1] += 1,
            Ok(got) => failures.push(format!("{i}: answer {got:?}")),
            Err(e) => failures.push(format!("{i}: {e}")),
        }
    }
    eprintln!("100 connections: {} to B, {} to C", counts[0], counts[1]);
    assert!(failures.is_empty(), "failed connections: {failures:?}");
    assert!(
        counts[0] >= 30 && counts[1] >= 30,
        "connections were not spread over both providers: B {}, C {}",
        counts[0],
        counts[1]
    );

    // kill -9 C, then at once 100 more connections: all must succeed, at B.
    st.agents[2].proc.kill9();
    let killed = Instant::now();
    let mut failures = Vec::new();
    let mut to_b = 0;
    for i in 0..100 {
        let t = Instant::now();
        match roundtrip(port, &format!("k{i}")) {
            Ok(got) if got == format!("B:k{i}") => to_b += 1,
            Ok(got) => failures.push(format!(
                "{i} ({:?} after the kill): answer {got:?}",
                t - killed
            )),
            Err(e) => failures.push(format!("{i} ({:?} after the kill): {e}", t - killed)),
        }
    }
    let log: Vec<String> = try_json(st.api(0), &format!("/api/meshes/{MESH}/log"))
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .rev()
        .take(10)
        .map(|e| e.to_string())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of 100 connections failed after the kill of a provider: {failures:?}\n\
         A's latest mesh log entries: {log:#?}",
        failures.len()
    );
    assert_eq!(to_b, 100);
}

/// A client's first bytes travel with the tunnel's CONNECT. When the provider tried first
/// refuses (its backend is down), the next provider must still get those bytes; and a client
/// that sends and half-closes at once still gets its whole answer.
#[test]
fn first_bytes_reach_the_next_provider_after_a_refusal() {
    let st = Stack::start(&ztm!(), "tun-first", &["root", "bob", "carol"]);
    let dead = free_port(); // nothing listens here
    let c_srv = tagged_server("C");
    st.add_service(1, "tcp", "web", dead, None);
    st.add_service(2, "tcp", "web", c_srv.port, None);
    st.wait_service(0, "tcp", "web", &[1, 2]);
    let port = free_port();
    st.map_port(0, "tcp", port, "web", None);
    wait_tunnel(port, "C", Duration::from_secs(20));

    // Lost first bytes would leave a client waiting: give up on a connection after 5 s.
    let quick = || {
        let s = connect(port)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok::<_, std::io::Error>(s)
    };
    for i in 0..40 {
        let got = quick().and_then(|mut s| line_on(&mut s, &format!("f{i}")));
        assert_eq!(got.ok(), Some(format!("C:f{i}")), "connection {i}");
    }
    // Two lines and a half-close in one go: both answers, then the end of the stream.
    for i in 0..10 {
        let mut s = quick().unwrap();
        s.write_all(format!("h{i}a\nh{i}b\n").as_bytes()).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        assert_eq!(got, format!("C:h{i}a\nC:h{i}b\n"));
    }
}

/// From A's API, a port created on B targets a service on A: connections to B's port reach A's
/// backend; deleting it through A closes it on B.
#[test]
fn remote_port_mapping() {
    let st = Stack::start(&ztm!(), "tun-remote", &["root", "bob"]);
    let home = tagged_server("A");
    st.add_service(0, "tcp", "home", home.port, None);
    st.wait_service(1, "tcp", "home", &[0]);
    let port = free_port();
    let b_id = st.ids[1].clone();
    let a_id = st.ids[0].clone();
    // Created through A, on B.
    map_port_at(st.api(0), &b_id, "tcp", port, "home", Some(&a_id));
    // B's own API lists it.
    let listed = get(
        st.api(1),
        &format!("/api/meshes/{MESH}/endpoints/{b_id}/ports"),
    );
    assert_eq!(listed.status, 200, "{}", listed.text());
    let ports = listed.json();
    assert!(
        ports.as_array().is_some_and(|l| l
            .iter()
            .any(|p| p["listen"]["port"] == port && p["target"]["service"] == "home")),
        "B does not list the port: {ports}"
    );
    wait_tunnel(port, "A", Duration::from_secs(20));
    for i in 0..10 {
        assert_eq!(
            roundtrip(port, &format!("r{i}")).unwrap(),
            format!("A:r{i}")
        );
    }
    // Unmapped remotely: B stops listening.
    let path = format!("/api/meshes/{MESH}/endpoints/{b_id}/ports/127.0.0.1/tcp/{port}");
    let r = delete(st.api(0), &path);
    assert!(is_2xx(&r), "DELETE {path}: {} {}", r.status, r.text());
    wait_until(Duration::from_secs(10), "B to close the port", || {
        TcpStream::connect_timeout(&local(port), Duration::from_millis(200)).is_err()
    });
}

/// A service that lists `users` admits them (and root and its owner) but not others: a
/// connection of bob's gets no data and is closed, and never reaches the backend.
#[test]
fn service_users_list_refuses_others() {
    // A: bob, B: root (provides), C: alice.
    let st = Stack::start(&ztm!(), "tun-acl", &["bob", "root", "alice"]);
    let secret = tagged_server("S");
    let open = tagged_server("O");
    st.add_service(1, "tcp", "secret", secret.port, Some(&["alice"]));
    st.add_service(1, "tcp", "open", open.port, None);
    st.wait_service(2, "tcp", "secret", &[1]);
    st.wait_service(0, "tcp", "open", &[1]);

    // alice gets through.
    let alice_port = free_port();
    st.map_port(2, "tcp", alice_port, "secret", None);
    wait_tunnel(alice_port, "S", Duration::from_secs(20));
    // bob's agent works for a service with no list ...
    let open_port = free_port();
    st.map_port(0, "tcp", open_port, "open", None);
    wait_tunnel(open_port, "O", Duration::from_secs(20));
    // ... but not for alice's service, by name or with B named as the endpoint.
    let bob_port = free_port();
    let bob_port2 = free_port();
    st.map_port(0, "tcp", bob_port, "secret", None);
    st.map_port(0, "tcp", bob_port2, "secret", Some(st.ids[1].as_str()));
    let before = secret.accepted.load(Ordering::SeqCst);
    for p in [bob_port, bob_port2] {
        for i in 0..3 {
            let mut s = connect(p).unwrap_or_else(|e| panic!("connect to bob's port: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let _ = s.write_all(format!("let me in {i}\n").as_bytes());
            let mut got = Vec::new();
            match s.read_to_end(&mut got) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("bob's connection was not closed: {e} (got {got:?})"),
            }
            assert!(
                got.is_empty(),
                "bob got data from alice's service: {:?}",
                String::from_utf8_lossy(&got)
            );
        }
    }
    assert_eq!(
        secret.accepted.load(Ordering::SeqCst),
        before,
        "a connection of bob's reached the backend of alice's service"
    );
    // alice still does.
    assert_eq!(roundtrip(alice_port, "again").unwrap(), "S:again");
}

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

// ---------------------------------------------------------------------------------------------
// Network namespaces: hub, router and two agents behind NAT with inbound traffic dropped.

extern "C" {
    fn setns(fd: i32, nstype: i32) -> i32;
}
const CLONE_NEWNET: i32 = 0x4000_0000;

/// Runs `f` on a thread that has entered network namespace `ns`: sockets it creates, and
/// processes it spawns, live in that namespace.
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    let path = ["/run/netns", "/var/run/netns"]
        .iter()
        .map(|d| Path::new(d).join(ns))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("network namespace {ns} not found"));
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: setns only changes this thread's network namespace; `file` is open.
            let rc = unsafe { setns(file.as_raw_fd(), CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            f()
        });
        h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Removes the namespaces it names when dropped (also on panic).
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

fn run(dir: &Path, line: &str) {
    let (code, out, err) = sh(dir, line);
    assert_eq!(code, 0, "{line}: {out} {err}");
}

/// Why the namespace test cannot run here, if it cannot.
fn netns_unavailable(dir: &Path) -> Option<String> {
    if status_field(std::process::id(), "Uid") != Some(0) {
        return Some("not root".into());
    }
    for tool in ["ip", "nft"] {
        if sh(dir, &format!("command -v {tool}")).0 != 0 {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    let probe = format!("ztm-probe-{}-{:x}", std::process::id(), rand_u64() & 0xffff);
    let (code, _, err) = sh(dir, &format!("ip netns add {probe}"));
    if code != 0 {
        return Some(format!("`ip netns add` failed: {err}"));
    }
    let (code, _, err) = sh(
        dir,
        &format!(
            "ip netns exec {probe} nft add table inet probe && \
             ip netns exec {probe} nft add chain inet probe p \
             '{{ type nat hook postrouting priority 100; }}'"
        ),
    );
    let _ = sh(dir, &format!("ip netns del {probe}"));
    if code != 0 {
        return Some(format!("nftables does not work in a namespace: {err}"));
    }
    None
}

/// B's service is reachable through A's port although A and B are each behind NAT with all
/// inbound traffic dropped, while a direct connection from A to B's service fails.
#[test]
fn tunnel_crosses_nat_and_firewalls_in_namespaces() {
    let dir = TempDir::new("tun-netns");
    if let Some(why) = netns_unavailable(dir.path()) {
        eprintln!("tunnel_crosses_nat_and_firewalls_in_namespaces: SKIPPED: {why}");
        return;
    }
    let z = ztm!();
    let pid = std::process::id();
    let tag = format!("{pid}-{:x}", rand_u64() & 0xfff);
    let ns_hub = format!("ztm-t-{tag}-hub");
    let ns_rt = format!("ztm-t-{tag}-rt");
    let ns_a = format!("ztm-t-{tag}-a");
    let ns_b = format!("ztm-t-{tag}-b");
    // Dropped last: after every process below is gone.
    let _guard = Namespaces(vec![
        ns_hub.clone(),
        ns_rt.clone(),
        ns_a.clone(),
        ns_b.clone(),
    ]);
    for ns in [&ns_hub, &ns_rt, &ns_a, &ns_b] {
        run(dir.path(), &format!("ip netns add {ns}"));
        run(dir.path(), &format!("ip -n {ns} link set lo up"));
    }
    // Addresses that exist only inside these namespaces.
    let net = 10 + (pid % 200);
    let hub_ip = format!("10.{net}.1.2");
    let b_ip = format!("10.{net}.3.2");
    for (dev, ns, sub) in [("eh", &ns_hub, 1), ("ea", &ns_a, 2), ("eb", &ns_b, 3)] {
        run(
            dir.path(),
            &format!("ip -n {ns_rt} link add {dev} type veth peer name e0 netns {ns}"),
        );
        run(
            dir.path(),
            &format!("ip -n {ns_rt} addr add 10.{net}.{sub}.1/24 dev {dev}"),
        );
        run(dir.path(), &format!("ip -n {ns_rt} link set {dev} up"));
        run(
            dir.path(),
            &format!("ip -n {ns} addr add 10.{net}.{sub}.2/24 dev e0"),
        );
        run(dir.path(), &format!("ip -n {ns} link set e0 up"));
        run(
            dir.path(),
            &format!("ip -n {ns} route add default via 10.{net}.{sub}.1"),
        );
    }
    run(
        dir.path(),
        &format!("ip netns exec {ns_rt} sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'"),
    );
    // The router masquerades A and B towards the hub and forwards nothing inbound; A and B
    // drop every inbound connection.
    let router_rules = "table ip ztmnat {\n\
         chain post {\n\
         type nat hook postrouting priority 100; policy accept;\n\
         oifname \"eh\" masquerade\n\
         }\n\
         }\n\
         table inet ztmfw {\n\
         chain forward {\n\
         type filter hook forward priority 0; policy drop;\n\
         ct state established,related accept\n\
         iifname \"ea\" oifname \"eh\" accept\n\
         iifname \"eb\" oifname \"eh\" accept\n\
         }\n\
         chain input {\n\
         type filter hook input priority 0; policy drop;\n\
         iif \"lo\" accept\n\
         ct state established,related accept\n\
         }\n\
         }\n";
    let host_rules = "table inet ztmfw {\n\
         chain input {\n\
         type filter hook input priority 0; policy drop;\n\
         iif \"lo\" accept\n\
         ct state established,related accept\n\
         }\n\
         }\n";
    let rr = write_file(dir.path(), "router.nft", router_rules);
    let hr = write_file(dir.path(), "host.nft", host_rules);
    run(dir.path(), &format!("ip netns exec {ns_rt} nft -f {rr}"));
    run(dir.path(), &format!("ip netns exec {ns_a} nft -f {hr}"));
    run(dir.path(), &format!("ip netns exec {ns_b} nft -f {hr}"));

    // CA and hub in the hub's namespace.
    let hub_addr = format!("{hub_ip}:7443");
    let (ca, hub, pem, root, bob) = in_ns(&ns_hub, || {
        let ca = z.start_ca(dir.path());
        let pem = ca_pem(&ca.addr);
        let root = create_user(&ca.addr, "root");
        let bob = create_user(&ca.addr, "bob");
        let hub = z.start_hub_on(dir.path(), "hub", &ca.addr, &hub_addr, &[]);
        (ca, hub, pem, root, bob)
    });
    // Agents in theirs, each on 127.0.0.1 there.
    let a = in_ns(&ns_a, || {
        let a = z.start_agent(dir.path(), "a");
        join_ok(&a.addr, &pem, "a", &root, &[&hub_addr]);
        a
    });
    let b = in_ns(&ns_b, || {
        let b = z.start_agent(dir.path(), "b");
        join_ok(&b.addr, &pem, "b", &bob, &[&hub_addr]);
        b
    });
    let a_id = in_ns(&ns_a, || local_id(&a.addr));
    let b_id = in_ns(&ns_b, || local_id(&b.addr));
    wait_until(Duration::from_secs(30), "A and B online", || {
        in_ns(&ns_a, || {
            is_online(&a.addr, &a_id) && is_online(&a.addr, &b_id)
        })
    });

    // B's backend listens on every address of B's namespace, so only the firewall stands
    // between it and A.
    let listener = in_ns(&ns_b, || TcpListener::bind("0.0.0.0:0").unwrap());
    let backend = serve(listener, tagged_handler("B"));
    in_ns(&ns_b, || {
        add_service_at(&b.addr, &b_id, "tcp", "svc", backend.port, None)
    });
    wait_until(Duration::from_secs(20), "A to discover tcp/svc", || {
        in_ns(&ns_a, || discovered(&a.addr, "tcp", "svc", &[&b_id]))
    });
    let port = in_ns(&ns_a, free_port);
    in_ns(&ns_a, || {
        map_port_at(&a.addr, &a_id, "tcp", port, "svc", None)
    });
    let mut last = String::new();
    let through = time_until(Duration::from_secs(20), || {
        match in_ns(&ns_a, || roundtrip(port, "ping")) {
            Ok(got) if got == "B:ping" => true,
            other => {
                last = format!("{other:?}");
                false
            }
        }
    });
    assert!(
        through.is_some(),
        "B's service is not reachable through A's port; last attempt: {last}"
    );
    for i in 0..5 {
        assert_eq!(
            in_ns(&ns_a, || roundtrip(port, &format!("p{i}"))).unwrap(),
            format!("B:p{i}")
        );
    }

    // The backend is there (B reaches it on its own address) ...
    let direct: SocketAddr = format!("{b_ip}:{}", backend.port).parse().unwrap();
    assert_eq!(
        in_ns(&ns_b, || roundtrip_addr(direct, "self")).unwrap(),
        "B:self"
    );
    // ... but neither A nor the hub can open a connection to it.
    let accepted = backend.accepted.load(Ordering::SeqCst);
    for ns in [&ns_a, &ns_hub] {
        let r = in_ns(ns, || {
            TcpStream::connect_timeout(&direct, Duration::from_secs(2))
        });
        assert!(
            r.is_err(),
            "a direct connection from {ns} to B's service at {direct} got through"
        );
    }
    assert_eq!(backend.accepted.load(Ordering::SeqCst), accepted);
    // And the tunnel still works.
    assert_eq!(in_ns(&ns_a, || roundtrip(port, "end")).unwrap(), "B:end");
    drop((a, b, hub, ca));
}

/// An endpoint id is derived from its user's name, so no other user can hold it on any hub.
/// Mallory writes Bob's endpoint id into her agent's database and starts it against a second
/// hub Bob does not use: her agent takes an id of its own instead, a hand-made registration of
/// Bob's id is refused, and A's port to Bob's endpoint reaches only Bob.
#[test]
fn another_user_claiming_an_endpoint_id_at_another_hub_gets_nothing() {
    let st = Stack::start(&ztm!(), "tun-claim", &["root", "bob"]);
    let hub2 = st.ztm.start_hub(st.dir.path(), "hub2", &st.ca.addr);
    let pem = ca_pem(&st.ca.addr);
    let root = st.users.iter().find(|u| u.name == "root").unwrap();
    // A uses both hubs, the second one first; Bob only the first.
    join_ok(st.api(0), &pem, "a", root, &[&hub2.addr, &st.hub.addr]);
    let b_srv = tagged_server("B");
    st.add_service(1, "tcp", "svc", b_srv.port, None);
    st.wait_service(0, "tcp", "svc", &[1]);
    let port = free_port();
    let v = st.map_port(0, "tcp", port, "svc", Some(&st.ids[1]));
    assert_eq!(v["target"]["endpoint"], st.ids[1], "{v}");
    assert_eq!(v["target"]["user"], "bob", "pinned to Bob's endpoint: {v}");
    wait_tunnel(port, "B", Duration::from_secs(20));

    // Mallory's agent, on the second hub only, is given Bob's id (written into its database).
    let mallory = create_user(&st.ca.addr, "mallory");
    let mut m = st.ztm.start_agent(st.dir.path(), "m");
    join_ok(&m.addr, &pem, "m", &mallory, &[&hub2.addr]);
    m.proc.stop();
    rusqlite::Connection::open(&m.db)
        .unwrap()
        .execute("UPDATE meshes SET endpoint_id = ?1", [&st.ids[1]])
        .unwrap();
    m.restart();
    let m_id = local_id(&m.addr);
    assert_ne!(m_id, st.ids[1], "Mallory's agent took Bob's id");
    wait_until(Duration::from_secs(20), "Mallory's agent connected", || {
        is_connected(&m.addr)
    });
    let m_srv = tagged_server("M");
    add_service_at(&m.addr, &m_id, "tcp", "svc", m_srv.port, None);

    // A modified agent registering Bob's id as Mallory, at either hub, is refused.
    let rt = tokio::runtime::Runtime::new().unwrap();
    for hub in [&hub2.addr, &st.hub.addr] {
        let refused = rt.block_on(async {
            use ztm_testkit::hostile::*;
            let c = control(hub, &pem, &mallory).await;
            register(&c.sender, &Ident::claim(&st.ids[1]), "b", json!([])).await
        });
        let refused = refused.unwrap();
        assert_eq!(refused.status, 403, "{}", refused.body);
    }
    assert!(
        !endpoints(st.api(0)).is_some_and(|l| l
            .iter()
            .any(|e| e["id"] == st.ids[1].as_str() && e["username"] == "mallory")),
        "A lists a claim of Bob's id by Mallory"
    );
    // Every connection through the port still reaches Bob, over 3 s.
    every_connection_reaches(port, "B");
}
