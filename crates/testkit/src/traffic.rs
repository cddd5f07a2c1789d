//! Traffic through tunnels: backends that services point at, clients that connect through
//! ports, and data streams a receiver checks without keeping a copy of what was sent.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::poll::time_until;

// ---------------------------------------------------------------------------------------------
// Deterministic data streams: block `k` of stream `seed` is 64 KiB of xorshift output, so a
// receiver can check any amount of data without keeping a copy of what was sent.

pub const BLOCK: usize = 64 * 1024;
pub const MB: u64 = 1_000_000;

/// Block `k` of stream `seed`.
pub fn block(seed: u64, k: u64) -> Vec<u8> {
    // splitmix64 of (seed, k) as the xorshift state.
    let mut z = seed
        .wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let mut x = (z ^ (z >> 31)) | 1;
    let mut out = Vec::with_capacity(BLOCK);
    while out.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Writes `len` bytes of stream `seed` to `w`.
pub fn write_stream(w: &mut impl Write, seed: u64, len: u64) -> std::io::Result<()> {
    let mut sent = 0u64;
    let mut k = 0u64;
    while sent < len {
        let b = block(seed, k);
        let n = (len - sent).min(BLOCK as u64) as usize;
        w.write_all(&b[..n])?;
        sent += n as u64;
        k += 1;
    }
    Ok(())
}

/// Checks bytes against stream `seed` as they arrive.
pub struct Verifier {
    seed: u64,
    k: u64,
    pending: Vec<u8>,
    checked: u64,
}

impl Verifier {
    pub fn new(seed: u64) -> Verifier {
        Verifier {
            seed,
            k: 0,
            pending: Vec::with_capacity(2 * BLOCK),
            checked: 0,
        }
    }

    pub fn total(&self) -> u64 {
        self.checked + self.pending.len() as u64
    }

    /// Err(offset of the first wrong byte).
    pub fn push(&mut self, data: &[u8]) -> Result<(), u64> {
        self.pending.extend_from_slice(data);
        while self.pending.len() >= BLOCK {
            self.check(BLOCK)?;
        }
        Ok(())
    }

    pub fn check(&mut self, n: usize) -> Result<(), u64> {
        let want = block(self.seed, self.k);
        if self.pending[..n] != want[..n] {
            let at = (0..n).find(|&i| self.pending[i] != want[i]).unwrap_or(0);
            return Err(self.checked + at as u64);
        }
        self.pending.drain(..n);
        self.checked += n as u64;
        self.k += 1;
        Ok(())
    }

    /// Checks the trailing partial block.
    pub fn finish(&mut self) -> Result<u64, u64> {
        let n = self.pending.len();
        if n > 0 {
            self.check(n)?;
        }
        Ok(self.checked)
    }
}

/// Reads `r` to its end, checking it against stream `seed`; returns the byte count.
pub fn read_verify(r: &mut impl Read, seed: u64) -> Result<u64, String> {
    let mut v = Verifier::new(seed);
    let mut buf = vec![0u8; BLOCK];
    loop {
        let n = r
            .read(&mut buf)
            .map_err(|e| format!("read failed after {} bytes: {e}", v.total()))?;
        if n == 0 {
            break;
        }
        v.push(&buf[..n])
            .map_err(|at| format!("wrong byte at offset {at}"))?;
    }
    v.finish()
        .map_err(|at| format!("wrong byte at offset {at}"))
}

// ---------------------------------------------------------------------------------------------
// Services: small blocking servers, one thread per connection.

/// A server the test runs as a service's backend.
pub struct Backend {
    pub port: u16,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
}

/// A listener on a port of 127.0.0.1 the kernel chooses.
pub fn bind_local() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0")
}

/// Runs `handler` for every connection `listener` accepts, each on its own thread.
pub fn serve(
    listener: TcpListener,
    handler: impl Fn(TcpStream) + Send + Sync + 'static,
) -> Backend {
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            let h = handler.clone();
            std::thread::spawn(move || {
                // No read timeout: an idle client may stay quiet for many minutes.
                let _ = s.set_write_timeout(Some(Duration::from_secs(120)));
                h(s)
            });
        }
    });
    Backend { port, accepted }
}

/// Echoes every byte back.
pub fn echo_server() -> Backend {
    serve(bind_local(), |s| {
        let mut r = s.try_clone().unwrap();
        let mut w = s;
        let _ = std::io::copy(&mut r, &mut w);
        let _ = w.shutdown(Shutdown::Write);
    })
}

/// Answers every line `L` with `{tag}:L`, until the client closes.
pub fn tagged_handler(tag: &str) -> impl Fn(TcpStream) + Send + Sync + 'static {
    let tag = tag.to_string();
    move |s: TcpStream| {
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if w.write_all(format!("{tag}:{}\n", line.trim_end()).as_bytes())
                .is_err()
            {
                break;
            }
        }
        let _ = w.shutdown(Shutdown::Write);
    }
}

/// A backend answering every line `L` with `{tag}:L`.
pub fn tagged_server(tag: &str) -> Backend {
    serve(bind_local(), tagged_handler(tag))
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// 127.0.0.1:`port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A connection to `addr` with 30 s timeouts for reads and writes, and no Nagle delay.
pub fn connect_addr(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// [`connect_addr`] to 127.0.0.1:`port`.
pub fn connect(port: u16) -> std::io::Result<TcpStream> {
    connect_addr(local(port))
}

/// Sends one line on `s` and reads one line back (without its newline).
pub fn line_on(s: &mut TcpStream, msg: &str) -> std::io::Result<String> {
    s.write_all(format!("{msg}\n").as_bytes())?;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte)? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "closed after {:?} without a full line",
                        String::from_utf8_lossy(&got)
                    ),
                ))
            }
            _ if byte[0] == b'\n' => break,
            _ => got.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

/// A fresh connection to `addr`, one line there and back, closed.
pub fn roundtrip_addr(addr: SocketAddr, msg: &str) -> std::io::Result<String> {
    let mut s = connect_addr(addr)?;
    line_on(&mut s, msg)
}

/// [`roundtrip_addr`] to 127.0.0.1:`port`.
pub fn roundtrip(port: u16, msg: &str) -> std::io::Result<String> {
    roundtrip_addr(local(port), msg)
}

/// Waits until a fresh connection through `port` gets `{tag}:ping` back.
pub fn wait_tunnel(port: u16, tag: &str, within: Duration) {
    let want = format!("{tag}:ping");
    let mut last = String::new();
    let ok = time_until(within, || match roundtrip(port, "ping") {
        Ok(got) if got == want => true,
        Ok(got) => {
            last = format!("answer {got:?}");
            false
        }
        Err(e) => {
            last = e.to_string();
            false
        }
    });
    assert!(
        ok.is_some(),
        "no working tunnel through port {port} within {within:?}; last attempt: {last}"
    );
}
