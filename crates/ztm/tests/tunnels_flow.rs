//! Flow control and stalls (docs/requirements.md §8, §11): a slow reader holds the sender back
//! with bounded memory, tiny writes towards a stalled reader lose nothing, stalled tunnels
//! neither block others nor pile up, and a service that never accepts is reported with the
//! far agent's reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ztm_testkit::prelude::*;
use ztm_testkit::procfs::PeakRss;
use ztm_testkit::stack::Stack;
use ztm_testkit::traffic::*;

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
