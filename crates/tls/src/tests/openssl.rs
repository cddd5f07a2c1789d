//! Our record layer against OpenSSL's `s_server` and `s_client` on 127.0.0.1, with client
//! certificates both ways: key updates the other side starts (`k` and `K` on its standard
//! input, without and with update_requested), OpenSSL sending 512-byte records, and 100 MB each
//! way compared byte for byte. Ignored by default (they need the `openssl` command and take
//! seconds); scripts/test runs them with `--ignored`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::name;
use crate::handshake::{accept, connect};
use crate::stream::OwnStream;

/// Longest wait for OpenSSL to show something.
const PATIENCE: Duration = Duration::from_secs(20);
const BIG: usize = 100_000_000;

/// The mesh's certificates, as files for OpenSSL and as configurations for us.
struct Files {
    dir: PathBuf,
    server: std::sync::Arc<rustls::ServerConfig>,
    client: std::sync::Arc<rustls::ClientConfig>,
}

impl Files {
    fn new(test: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("ztm-tls-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = ztm_pki::create_ca().unwrap();
        let signer = ztm_pki::CaSigner::load(&ca.cert_pem, &ca.key_pem).unwrap();
        let (hub_key, public) = ztm_pki::generate_key().unwrap();
        let (hub_cert, _) = signer
            .sign_hub(
                "h1",
                &public,
                &["127.0.0.1".into()],
                Duration::from_secs(3600),
            )
            .unwrap();
        let user = signer.issue_user("alice").unwrap();
        for (file, pem) in [
            ("ca.pem", &ca.cert_pem),
            ("hub.pem", &hub_cert),
            ("hub.key", &hub_key),
            ("user.pem", &user.cert_pem),
            ("user.key", &user.key_pem),
        ] {
            std::fs::write(dir.join(file), pem).unwrap();
        }
        let server =
            ztm_pki::hub_server_config(&ca.cert_pem, &hub_cert, &hub_key, Default::default())
                .unwrap();
        let client = ztm_pki::agent_client_config(
            &ca.cert_pem,
            &user.cert_pem,
            &user.key_pem,
            ztm_pki::ALPN_CONTROL,
        )
        .unwrap();
        Files {
            dir,
            server: server.into(),
            client: client.into(),
        }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An OpenSSL process: its standard input, and its standard output as chunks.
struct OpenSsl {
    child: Child,
    stdin: Option<ChildStdin>,
    out: mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl OpenSsl {
    fn spawn(args: &[&str]) -> OpenSsl {
        let mut child = Command::new("openssl")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the openssl command");
        let mut stdout = child.stdout.take().unwrap();
        let (tx, out) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        OpenSsl {
            stdin: child.stdin.take(),
            child,
            out,
            seen: Vec::new(),
        }
    }

    fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits until `text` has appeared on its standard output since the last wait.
    fn wait_for(&mut self, text: &str) {
        loop {
            if let Some(at) = find(&self.seen, text.as_bytes()) {
                self.seen.drain(..at + text.len());
                return;
            }
            match self.out.recv_timeout(PATIENCE) {
                Ok(chunk) => self.seen.extend_from_slice(&chunk),
                Err(_) => panic!(
                    "openssl never printed {text:?}; it printed {:?}",
                    String::from_utf8_lossy(&self.seen)
                ),
            }
        }
    }

    /// Waits for the process to end by itself: its standard output closes.
    fn wait_exit(&mut self) {
        drop(self.stdin.take());
        loop {
            match self.out.recv_timeout(PATIENCE) {
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("openssl did not end"),
            }
        }
        let status = self.child.wait().unwrap();
        assert!(status.success(), "openssl ended with {status}");
    }
}

impl Drop for OpenSsl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `openssl s_server` with the hub's certificate, requiring a client certificate of the CA,
/// on `accept` (`127.0.0.1:0`: it prints the port it got, unless `-quiet`).
fn s_server(files: &Files, accept: &str, extra: &[&str]) -> OpenSsl {
    let (cert, key, ca) = (
        files.path("hub.pem"),
        files.path("hub.key"),
        files.path("ca.pem"),
    );
    let mut args = vec![
        "s_server", "-accept", accept, "-naccept", "1", "-tls1_3", "-cert", &cert, "-key", &key,
        "-CAfile", &ca, "-Verify", "1", "-alpn", "h2",
    ];
    args.extend_from_slice(extra);
    OpenSsl::spawn(&args)
}

/// `openssl s_client` with the user's certificate, to our server on `port`.
fn s_client(files: &Files, port: u16, extra: &[&str]) -> OpenSsl {
    let (cert, key, ca) = (
        files.path("user.pem"),
        files.path("user.key"),
        files.path("ca.pem"),
    );
    let connect = format!("127.0.0.1:{port}");
    let mut args = vec![
        "s_client", "-connect", &connect, "-tls1_3", "-cert", &cert, "-key", &key, "-CAfile", &ca,
        "-alpn", "h2",
    ];
    args.extend_from_slice(extra);
    OpenSsl::spawn(&args)
}

/// Starts `s_server` on a port of its choosing; it and the address it listens on.
fn start_s_server(files: &Files, extra: &[&str]) -> (OpenSsl, String) {
    let mut server = s_server(files, "127.0.0.1:0", extra);
    let addr = loop {
        if let Some(at) = find(&server.seen, b"ACCEPT ") {
            if let Some(end) = server.seen[at..].iter().position(|b| *b == b'\n') {
                let addr = String::from_utf8_lossy(&server.seen[at + 7..at + end]).to_string();
                server.seen.drain(..at + end + 1);
                break addr;
            }
        }
        match server.out.recv_timeout(PATIENCE) {
            Ok(chunk) => server.seen.extend_from_slice(&chunk),
            Err(_) => panic!("s_server did not start"),
        }
    };
    (server, addr.trim().to_string())
}

/// Reads exactly `want` and checks it.
async fn expect(tls: &mut OwnStream<TcpStream>, want: &str) {
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(PATIENCE, tls.read_exact(&mut got))
        .await
        .expect("no data from openssl")
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got), want);
}

/// Waits until our side has followed `n` key updates of the peer. A key update alone gives
/// the reader no data: we read with short timeouts and look.
async fn followed(tls: &mut OwnStream<TcpStream>, n: u64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tls.rx.updates_followed < n {
        let read = tokio::time::timeout(Duration::from_millis(20), tls.read(&mut [0u8; 1])).await;
        assert!(
            read.is_err(),
            "data or an end instead of a key update: {read:?}"
        );
        assert!(tokio::time::Instant::now() < deadline, "no key update came");
    }
}

async fn send(tls: &mut OwnStream<TcpStream>, line: &str) {
    tls.write_all(line.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
}

#[tokio::test]
#[ignore = "needs openssl; scripts/test runs it"]
async fn openssl_server_updates_keys_and_sends_small_records() {
    let files = Files::new("s-server-keys");
    let (mut server, addr) = start_s_server(&files, &["-max_send_frag", "512"]);
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let mut tls = connect(files.client.clone(), name(), tcp).await.unwrap();
    send(&mut tls, "hello from ztm\n").await;
    server.wait_for("hello from ztm\n");
    // A line of 3,000 bytes comes in 512-byte records.
    let line = "x".repeat(3000) + "\n";
    server.type_line(&line);
    expect(&mut tls, &line).await;
    for (n, command) in [(1, "k"), (2, "K")] {
        server.type_line(&format!("{command}\n"));
        followed(&mut tls, n).await;
        // K asks for an update of ours: it was sealed (fresh key, sequence 0) and sent.
        assert_eq!(tls.tx.cipher.seq == 0, command == "K");
        server.type_line(&format!("after {command}\n"));
        expect(&mut tls, &format!("after {command}\n")).await;
        // With K, our answer (a key update of ours) goes first: OpenSSL reads this line with
        // our next key.
        send(&mut tls, &format!("ours after {command}\n")).await;
        server.wait_for(&format!("ours after {command}\n"));
    }
    tls.shutdown().await.unwrap();
    server.wait_exit();
}

#[tokio::test]
#[ignore = "needs openssl; scripts/test runs it"]
async fn openssl_client_updates_keys_and_sends_small_records() {
    let files = Files::new("s-client-keys");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut client = s_client(&files, port, &["-max_send_frag", "512"]);
    let (tcp, _) = listener.accept().await.unwrap();
    let mut tls = accept(files.server.clone(), tcp).await.unwrap();
    let alice = ztm_pki::cert_info(tls.peer_certificates()[0].as_ref()).unwrap();
    assert_eq!(alice.common_name, "alice");
    assert_eq!(tls.alpn_protocol(), Some(&b"h2"[..]));
    send(&mut tls, "hello from ztm\n").await;
    client.wait_for("hello from ztm\n");
    let line = "x".repeat(3000) + "\n";
    client.type_line(&line);
    expect(&mut tls, &line).await;
    for (n, command) in [(1, "k"), (2, "K")] {
        client.type_line(&format!("{command}\n"));
        followed(&mut tls, n).await;
        // K asks for an update of ours: it was sealed (fresh key, sequence 0) and sent.
        assert_eq!(tls.tx.cipher.seq == 0, command == "K");
        client.type_line(&format!("after {command}\n"));
        expect(&mut tls, &format!("after {command}\n")).await;
        send(&mut tls, &format!("ours after {command}\n")).await;
        client.wait_for(&format!("ours after {command}\n"));
    }
    tls.shutdown().await.unwrap();
    client.wait_exit();
}

/// Byte `i` of what `side` sends in the 100 MB tests.
fn big_byte(side: u8, i: usize) -> u8 {
    (i as u8) ^ ((i >> 13) as u8).wrapping_mul(side | 1)
}

fn big_chunk(side: u8, from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|i| big_byte(side, i)).collect()
}

/// Feeds OpenSSL's standard input `BIG` bytes of side 1 and checks that its standard output
/// carries `BIG` bytes of side 0; returns its standard input (kept open: at its end OpenSSL
/// would spin) once both are done.
fn openssl_side(openssl: &mut OpenSsl) -> std::thread::JoinHandle<ChildStdin> {
    let mut stdin = openssl.stdin.take().unwrap();
    let feed = std::thread::spawn(move || {
        let mut at = 0;
        while at < BIG {
            let chunk = big_chunk(1, at, (BIG - at).min(1 << 20));
            stdin.write_all(&chunk).unwrap();
            at += chunk.len();
        }
        stdin
    });
    let out = std::mem::replace(&mut openssl.out, mpsc::channel().1);
    std::thread::spawn(move || {
        let mut at = 0;
        while at < BIG {
            let chunk = out
                .recv_timeout(PATIENCE)
                .expect("openssl stopped printing");
            assert!(
                chunk
                    .iter()
                    .enumerate()
                    .all(|(k, b)| *b == big_byte(0, at + k)),
                "openssl received other bytes near byte {at}"
            );
            at += chunk.len();
        }
        assert_eq!(at, BIG);
        feed.join().unwrap()
    })
}

/// Sends `BIG` bytes of side 0 and reads `BIG` bytes of side 1 at the same time.
async fn ours_side(tls: OwnStream<TcpStream>) -> OwnStream<TcpStream> {
    let (mut reader, mut writer) = tokio::io::split(tls);
    let write = async {
        let mut at = 0;
        while at < BIG {
            let chunk = big_chunk(0, at, (BIG - at).min(1 << 20));
            writer.write_all(&chunk).await.unwrap();
            at += chunk.len();
        }
        writer.flush().await.unwrap();
    };
    let read = async {
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < BIG {
            let n = reader.read(&mut buf).await.unwrap();
            assert!(n > 0, "the end after {at} bytes");
            assert!(
                buf[..n]
                    .iter()
                    .enumerate()
                    .all(|(k, b)| *b == big_byte(1, at + k)),
                "we received other bytes near byte {at}"
            );
            at += n;
        }
    };
    tokio::join!(write, read);
    reader.unsplit(writer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs openssl; scripts/test runs it"]
async fn a_hundred_megabytes_each_way_with_openssl_server() {
    let files = Files::new("s-server-big");
    // -quiet prints nothing but the data, not even the port: take a free one.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let accept_on = format!("127.0.0.1:{port}");
    let mut server = s_server(&files, &accept_on, &["-quiet", "-max_send_frag", "512"]);
    let started = std::time::Instant::now();
    let tcp = loop {
        match TcpStream::connect(&accept_on).await {
            Ok(tcp) => break tcp,
            Err(_) if started.elapsed() < PATIENCE => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("s_server did not listen: {e}"),
        }
    };
    let tls = connect(files.client.clone(), name(), tcp).await.unwrap();
    let theirs = openssl_side(&mut server);
    let mut tls = ours_side(tls).await;
    let stdin = tokio::task::spawn_blocking(move || theirs.join().unwrap())
        .await
        .unwrap();
    eprintln!("100 MB each way with s_server in {:?}", started.elapsed());
    tls.shutdown().await.unwrap();
    drop(stdin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs openssl; scripts/test runs it"]
async fn a_hundred_megabytes_each_way_with_openssl_client() {
    let files = Files::new("s-client-big");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut client = s_client(&files, port, &["-quiet"]);
    let started = std::time::Instant::now();
    let (tcp, _) = listener.accept().await.unwrap();
    let tls = accept(files.server.clone(), tcp).await.unwrap();
    let theirs = openssl_side(&mut client);
    let mut tls = ours_side(tls).await;
    let stdin = tokio::task::spawn_blocking(move || theirs.join().unwrap())
        .await
        .unwrap();
    eprintln!("100 MB each way with s_client in {:?}", started.elapsed());
    tls.shutdown().await.unwrap();
    drop(stdin);
}
