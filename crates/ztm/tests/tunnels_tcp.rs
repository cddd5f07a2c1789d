//! End-to-end tests of TCP tunnels (port mappings, docs/requirements.md §5, §7): bulk data both
//! ways, many connections at once, transfers in a row, a port created remotely, and an idle
//! connection that must survive ten minutes (ignored by default: scripts/test runs it).
//! A CA, a hub and agents run as real processes on loopback (see ztm-testkit).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use ztm_testkit::prelude::*;
use ztm_testkit::stack::Stack;
use ztm_testkit::traffic::*;

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

/// Twenty saturating 50 MB transfers in a row (alternately up and down) on one stack, then a
/// fresh connection still works.
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

/// An idle tunnelled connection still works after ten minutes.
#[test]
#[ignore = "slow (ten minutes); scripts/test runs it"]
fn idle_tunnel_survives_ten_minutes() {
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
