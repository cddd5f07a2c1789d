//! Target servers (sink, source, echo) and the load generator. Every loop is bounded in count
//! and in time. The client connects to a [`Dest`]: straight to an address, or through a SOCKS5
//! proxy.

use std::fmt;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Size of every bulk read and write buffer.
pub const BUF: usize = 256 * 1024;
/// Size of an echo message.
pub const MSG: usize = 64;
/// Longest a single connect or round trip may take before it counts as an error.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// The in-process targets: where they listen and what the sink has received.
pub struct Targets {
    pub sink: String,
    pub source: String,
    pub echo: String,
    pub sunk: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Targets {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A listener with a deep accept queue, so that bursts of connections (500 at once) are not
/// dropped and retried by the client's kernel a second later.
async fn listen() -> Result<(TcpListener, String)> {
    let socket = tokio::net::TcpSocket::new_v4().context("creating a target server socket")?;
    socket.bind(([127, 0, 0, 1], 0).into())?;
    let l = socket.listen(4096).context("binding a target server")?;
    let addr = l.local_addr()?.to_string();
    Ok((l, addr))
}

fn pattern() -> Vec<u8> {
    (0..BUF).map(|i| (i * 7 + 13) as u8).collect()
}

/// Accepts forever, handing each connection to `serve` on its own task.
fn accept_loop<F, Fut>(l: TcpListener, serve: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(serve(s));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
}

impl Targets {
    pub async fn start() -> Result<Targets> {
        let (sink_l, sink) = listen().await?;
        let (source_l, source) = listen().await?;
        let (echo_l, echo) = listen().await?;
        let sunk = Arc::new(AtomicU64::new(0));
        let counter = sunk.clone();
        let sink_task = accept_loop(sink_l, move |mut s| {
            let counter = counter.clone();
            async move {
                let mut buf = vec![0u8; BUF];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        });
        let data = Arc::new(pattern());
        let source_task = accept_loop(source_l, move |mut s| {
            let data = data.clone();
            async move { while s.write_all(&data).await.is_ok() {} }
        });
        let echo_task = accept_loop(echo_l, |mut s| async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        Ok(Targets {
            sink,
            source,
            echo,
            sunk,
            tasks: vec![sink_task, source_task, echo_task],
        })
    }
}

/// Where the client connects.
#[derive(Clone)]
pub enum Dest {
    /// Straight to this address (a target, a tunnel's port, a plain relay).
    Tcp(String),
    /// To `proxy`, which is asked (SOCKS5, no authentication, CONNECT) for `target`. The
    /// handshake is part of connecting, so a fresh connection's time includes it.
    Socks5 { proxy: String, target: SocketAddrV4 },
}

impl Dest {
    /// `target` (an IPv4 address and port) through the SOCKS5 proxy at `proxy`.
    pub fn socks5(proxy: &str, target: &str) -> Result<Dest> {
        Ok(Dest::Socks5 {
            proxy: proxy.to_string(),
            target: target
                .parse()
                .with_context(|| format!("{target} is not an IPv4 address and port"))?,
        })
    }

    /// The address the client's TCP connection goes to.
    fn addr(&self) -> &str {
        match self {
            Dest::Tcp(a) => a,
            Dest::Socks5 { proxy, .. } => proxy,
        }
    }
}

impl fmt::Display for Dest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dest::Tcp(a) => f.write_str(a),
            Dest::Socks5 { proxy, target } => write!(f, "{target} through SOCKS5 proxy {proxy}"),
        }
    }
}

impl From<&str> for Dest {
    fn from(addr: &str) -> Dest {
        Dest::Tcp(addr.to_string())
    }
}

impl From<&String> for Dest {
    fn from(addr: &String) -> Dest {
        Dest::Tcp(addr.clone())
    }
}

impl From<&Dest> for Dest {
    fn from(to: &Dest) -> Dest {
        to.clone()
    }
}

async fn connect(to: &Dest) -> Result<TcpStream> {
    tokio::time::timeout(OP_TIMEOUT, async {
        let addr = to.addr();
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        if let Dest::Socks5 { target, .. } = to {
            socks5_connect(&mut s, *target)
                .await
                .with_context(|| format!("SOCKS5 CONNECT to {target}"))?;
        }
        Ok(s)
    })
    .await
    .map_err(|_| anyhow!("connecting to {to} timed out"))?
}

/// The client's side of a SOCKS5 handshake, as an ordinary client does it: the greeting
/// (no authentication), its answer, then CONNECT to `target` and the reply.
async fn socks5_connect(s: &mut TcpStream, target: SocketAddrV4) -> Result<()> {
    s.write_all(&[5, 1, 0]).await?;
    let mut chosen = [0u8; 2];
    s.read_exact(&mut chosen).await?;
    if chosen != [5, 0] {
        bail!("the proxy answered the greeting with {chosen:?}");
    }
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&target.ip().octets());
    req.extend_from_slice(&target.port().to_be_bytes());
    s.write_all(&req).await?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await?;
    if head[0] != 5 || head[1] != 0 {
        bail!("the proxy refused with reply {head:?}");
    }
    // The bound address and port, unused.
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await?;
            usize::from(len[0]) + 2
        }
        t => bail!("the proxy replied with address type {t}"),
    };
    let mut bound = vec![0u8; rest];
    s.read_exact(&mut bound).await?;
    Ok(())
}

fn message(seed: usize) -> [u8; MSG] {
    let mut m = [0u8; MSG];
    for (i, b) in m.iter_mut().enumerate() {
        *b = (seed.wrapping_mul(31).wrapping_add(i)) as u8;
    }
    m
}

/// One 64 B round trip, checked.
async fn round_trip(s: &mut TcpStream, seed: usize) -> Result<()> {
    let msg = message(seed);
    let mut back = [0u8; MSG];
    tokio::time::timeout(OP_TIMEOUT, async {
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(())
    })
    .await
    .map_err(|_| anyhow!("round trip timed out"))??;
    if back != msg {
        bail!("echo answered different bytes");
    }
    Ok(())
}

/// A 64 B echo through `to` works; retried for up to `within` (the tunnel may need a moment).
pub async fn echo_works(to: impl Into<Dest>, within: Duration) -> Result<()> {
    let to = to.into();
    let deadline = Instant::now() + within;
    loop {
        let r = async {
            let mut s = connect(&to).await?;
            round_trip(&mut s, 1).await
        }
        .await;
        match r {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("no echo through {to} within {within:?}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The client writes to the sink.
    Upload,
    /// The client reads from the source.
    Download,
}

/// Result of one throughput phase.
pub struct Throughput {
    pub bytes: u64,
    pub secs: f64,
    pub errors: u64,
    /// CPU ticks each watched process used during the measured window.
    pub cpu_ticks: Vec<u64>,
}

impl Throughput {
    pub fn mb_per_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs / 1e6
        } else {
            0.0
        }
    }
}

fn ticks(pids: &[u32]) -> Vec<u64> {
    pids.iter()
        .map(|p| ztm_testkit::procfs::cpu_ticks(*p).unwrap_or(0))
        .collect()
}

/// `streams` connections to `to` move bulk data for `warmup` + `duration`; bytes are counted
/// over `duration` only (by the sink for uploads, by the client for downloads), along with the
/// CPU time of `pids` over the same window.
pub async fn throughput(
    to: &Dest,
    dir: Direction,
    streams: usize,
    warmup: Duration,
    duration: Duration,
    sunk: &Arc<AtomicU64>,
    pids: &[u32],
) -> Result<Throughput> {
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        conns.push(connect(to).await?);
    }
    let counter = match dir {
        Direction::Upload => sunk.clone(),
        Direction::Download => Arc::new(AtomicU64::new(0)),
    };
    let errors = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let end = start + warmup + duration;
    let data = Arc::new(pattern());
    let mut tasks = Vec::with_capacity(streams);
    for mut s in conns {
        let (data, counter, errors) = (data.clone(), counter.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let work = async {
                match dir {
                    Direction::Upload => loop {
                        s.write_all(&data).await?;
                    },
                    Direction::Download => {
                        let mut buf = vec![0u8; BUF];
                        loop {
                            let n = s.read(&mut buf).await?;
                            if n == 0 {
                                return Err(std::io::Error::new(
                                    std::io::ErrorKind::UnexpectedEof,
                                    "source closed",
                                ));
                            }
                            counter.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
            };
            // Ends at the deadline (Err(Elapsed)) unless the connection fails first.
            if let Ok(Err::<(), std::io::Error>(_)) = tokio::time::timeout_at(end, work).await {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep_until(start + warmup).await;
    let (b0, c0, t0) = (counter.load(Ordering::Relaxed), ticks(pids), Instant::now());
    tokio::time::sleep_until(end).await;
    let (b1, c1, secs) = (
        counter.load(Ordering::Relaxed),
        ticks(pids),
        t0.elapsed().as_secs_f64(),
    );
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    settle(sunk).await;
    Ok(Throughput {
        bytes: b1.saturating_sub(b0),
        secs,
        errors: errors.load(Ordering::Relaxed),
        cpu_ticks: c1
            .iter()
            .zip(&c0)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect(),
    })
}

/// Waits (at most 5 s) until the sink has stopped receiving: data still in flight through the
/// relays would otherwise spill into the next phase.
async fn settle(sunk: &Arc<AtomicU64>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = sunk.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = sunk.load(Ordering::Relaxed);
        if now == last || Instant::now() > deadline {
            return;
        }
        last = now;
    }
}

/// Latencies of a series of operations, in microseconds.
pub struct Latency {
    pub samples: Vec<f64>,
    pub errors: u64,
    /// CPU seconds the path's relays used while the operations ran (0 when nothing was
    /// watched, as for direct connections).
    pub relay_cpu_secs: f64,
}

impl Latency {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.samples.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }

    pub fn percentile(&self, p: f64) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    pub fn mean(&self) -> f64 {
        if self.samples.is_empty() {
            return 0.0;
        }
        self.samples.iter().sum::<f64>() / self.samples.len() as f64
    }

    /// Relay CPU per successful operation, microseconds: what each round trip costs the
    /// processes on the path, apart from the time it waits for them to be woken.
    pub fn relay_cpu_us_per_op(&self) -> f64 {
        if self.samples.is_empty() {
            return 0.0;
        }
        self.relay_cpu_secs * 1e6 / self.samples.len() as f64
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A latency scenario on one path, measured a slice at a time: the paths take turns (see
/// [`TURNS`]), so that this machine's slow drifts in wake-up latency fall on all of them alike
/// and the differences between paths stay meaningful.
pub struct Series {
    to: Dest,
    lat: Latency,
    /// The ping-pong connection, kept from one slice to the next.
    conn: Option<TcpStream>,
    /// Time spent in this path's operations so far, checked against the scenario's limit.
    spent: Duration,
    /// The relays on this path, and the CPU ticks they used during its slices.
    pids: Vec<u32>,
    cpu_ticks: u64,
}

/// How many slices each latency scenario is split into.
pub const TURNS: usize = 10;

/// The operations of slice `turn` when `total` are split over [`TURNS`] slices.
pub fn slice_of(total: usize, turn: usize) -> usize {
    total / TURNS + usize::from(turn < total % TURNS)
}

impl Series {
    /// A series on `to`, watching the CPU time of the relays `pids` on its path.
    pub fn new(to: impl Into<Dest>, pids: Vec<u32>) -> Series {
        Series {
            to: to.into(),
            lat: Latency {
                samples: Vec::new(),
                errors: 0,
                relay_cpu_secs: 0.0,
            },
            conn: None,
            spent: Duration::ZERO,
            pids,
            cpu_ticks: 0,
        }
    }

    /// The latencies, with the relays' CPU time converted at `hz` ticks per second.
    pub fn into_latency(mut self, hz: f64) -> Latency {
        self.lat.relay_cpu_secs = self.cpu_ticks as f64 / hz;
        self.lat
    }

    fn relay_ticks(&self) -> u64 {
        ticks(&self.pids).iter().sum()
    }

    /// Adds the relays' CPU time since `before` (from [`Series::relay_ticks`]).
    fn add_relay_ticks(&mut self, before: u64) {
        self.cpu_ticks += self.relay_ticks().saturating_sub(before);
    }

    /// Whether the scenario's time on this path is up; if so, the `left` operations not run
    /// count as errors.
    fn out_of_time(&mut self, max_time: Duration, left: usize) -> bool {
        let out = self.spent > max_time;
        if out {
            self.lat.errors += left as u64;
        }
        out
    }

    /// Records an operation that began at `t`.
    fn record(&mut self, t: Instant, r: &Result<()>) {
        let took = t.elapsed();
        self.spent += took;
        match r {
            Ok(()) => self.lat.samples.push(us(took)),
            Err(_) => self.lat.errors += 1,
        }
    }

    fn seed(&self) -> usize {
        self.lat.samples.len() + self.lat.errors as usize
    }
}

/// `count` more sequential fresh connections on `series`, each connect + one 64 B echo.
pub async fn fresh_connections(series: &mut Series, count: usize, max_time: Duration) {
    let before = series.relay_ticks();
    for i in 0..count {
        if series.out_of_time(max_time, count - i) {
            break;
        }
        let seed = series.seed();
        let t = Instant::now();
        let r = async {
            let mut s = connect(&series.to).await?;
            round_trip(&mut s, seed).await
        }
        .await;
        series.record(t, &r);
    }
    series.add_relay_ticks(before);
}

/// `count` more 64 B ping-pongs on `series`'s connection (connecting first, untimed, and
/// again after a failure).
pub async fn ping_pong(series: &mut Series, count: usize, max_time: Duration) {
    let before = series.relay_ticks();
    for i in 0..count {
        if series.out_of_time(max_time, count - i) {
            break;
        }
        let mut s = match series.conn.take() {
            Some(s) => s,
            None => {
                let t = Instant::now();
                let c = connect(&series.to).await;
                series.spent += t.elapsed();
                match c {
                    Ok(s) => s,
                    Err(_) => {
                        series.lat.errors += 1;
                        continue;
                    }
                }
            }
        };
        let seed = series.seed();
        let t = Instant::now();
        let r = round_trip(&mut s, seed).await;
        series.record(t, &r);
        if r.is_ok() {
            series.conn = Some(s);
        }
    }
    series.add_relay_ticks(before);
}

/// Result of the concurrent-connections scenario.
pub struct Concurrent {
    /// Time from the start until each connection finished its round trips, microseconds.
    pub finish: Latency,
    pub connections: usize,
    pub rounds: usize,
    pub wall: Duration,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// `connections` connections at once, each doing `rounds` 64 B round trips; each connection
/// must finish within 30 s.
pub async fn concurrent(to: &Dest, connections: usize, rounds: usize) -> Concurrent {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(connections);
    for c in 0..connections {
        let to = to.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(30), async {
                let mut s = connect(&to).await?;
                for r in 0..rounds {
                    round_trip(&mut s, c * rounds + r).await?;
                }
                Ok::<_, anyhow::Error>(us(start.elapsed()))
            })
            .await
            .map_err(|_| anyhow!("connection did not finish within 30 s"))?
        }));
    }
    let mut errors = 0;
    let mut first_error = None;
    let mut finish = Latency {
        relay_cpu_secs: 0.0,
        samples: Vec::with_capacity(connections),
        errors: 0,
    };
    for t in tasks {
        let r = match t.await {
            Ok(r) => r,
            Err(e) => Err(anyhow!("task failed: {e}")),
        };
        match r {
            Ok(t) => finish.samples.push(t),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    finish.errors = errors;
    Concurrent {
        finish,
        connections,
        rounds,
        wall: start.elapsed(),
        errors,
        first_error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_add_up_to_the_total_and_differ_by_at_most_one() {
        for total in [0, 1, 9, 10, 11, 200, 1_000, 2_000, 10_000, 10_007] {
            let slices: Vec<usize> = (0..TURNS).map(|t| slice_of(total, t)).collect();
            assert_eq!(slices.iter().sum::<usize>(), total, "{total}: {slices:?}");
            let (min, max) = (slices.iter().min(), slices.iter().max());
            assert!(
                max.zip(min).is_some_and(|(a, b)| a - b <= 1),
                "{total}: {slices:?}"
            );
        }
    }
}
