//! Our record layer against rustls' own (a peer in a thread with blocking sockets): data
//! both ways, key updates from either side, close_notify, tampering, refused handshakes.

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;

use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::handshake::{accept, connect};
use crate::records::MAX_PLAINTEXT;

mod hostile;
mod openssl;
mod properties;

struct Pki {
    ca_pem: String,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

fn pki(user: &str) -> Pki {
    let ca = ztm_pki::create_ca().unwrap();
    let signer = ztm_pki::CaSigner::load(&ca.cert_pem, &ca.key_pem).unwrap();
    let (key, public) = ztm_pki::generate_key().unwrap();
    let (hub_cert, _) = signer
        .sign_hub(
            "h1",
            &public,
            &["127.0.0.1".into()],
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
    let revoked = ztm_pki::Revoked::default();
    let server = ztm_pki::hub_server_config(&ca.cert_pem, &hub_cert, &key, revoked).unwrap();
    let alice = signer.issue_user(user).unwrap();
    let client = ztm_pki::agent_client_config(
        &ca.cert_pem,
        &alice.cert_pem,
        &alice.key_pem,
        ztm_pki::ALPN_CONTROL,
    )
    .unwrap();
    Pki {
        ca_pem: ca.cert_pem,
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

fn name() -> ServerName<'static> {
    ServerName::try_from("127.0.0.1").unwrap()
}

/// Chunk sizes from 1 byte to a little over four records, reproducibly.
fn chunks(count: usize) -> Vec<Vec<u8>> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..count)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 1 + (x % (4 * MAX_PLAINTEXT as u64 + 100)) as usize;
            (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
        })
        .collect()
}

#[tokio::test]
async fn our_client_talks_to_a_rustls_server_across_key_updates() {
    let pki = pki("alice");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server_config = pki.server.clone();
    let peer = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let conn = rustls::ServerConnection::new(server_config).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        let mut buf = vec![0u8; 100_000];
        let mut echoed = 0usize;
        let mut updated = false;
        let clean = loop {
            match tls.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => {
                    tls.write_all(&buf[..n]).unwrap();
                    tls.flush().unwrap();
                    echoed += n;
                    if !updated && echoed > 1_000_000 {
                        tls.conn.refresh_traffic_keys().unwrap();
                        updated = true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break false,
                Err(e) => panic!("rustls server: {e}"),
            }
        };
        tls.conn.send_close_notify();
        tls.flush().unwrap();
        (clean, echoed, updated)
    });

    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connect(pki.client.clone(), name(), tcp).await.unwrap();
    assert_eq!(tls.alpn_protocol(), Some(ztm_pki::ALPN_CONTROL));
    let hub = ztm_pki::cert_info(tls.peer_certificates()[0].as_ref()).unwrap();
    assert_eq!(hub.common_name, "hub/h1");
    // Our own key updates: one asked for, then automatic ones every 50 records.
    tls.tx.limit = 50;
    let mut sent = 0;
    for (i, chunk) in chunks(120).iter().enumerate() {
        if i == 60 {
            tls.update_keys().unwrap();
        }
        tls.write_all(chunk).await.unwrap();
        tls.flush().await.unwrap();
        let mut back = vec![0u8; chunk.len()];
        tls.read_exact(&mut back).await.unwrap();
        assert!(back == *chunk, "chunk {i} came back changed");
        sent += chunk.len();
    }
    assert!(tls.tx.cipher.seq < 50, "no automatic key update");
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let (clean, echoed, updated) = peer.join().unwrap();
    assert!(clean, "rustls did not see our close_notify");
    assert!(updated);
    assert_eq!(echoed, sent);
}

#[tokio::test]
async fn our_server_talks_to_a_rustls_client_across_key_updates() {
    let pki = pki("alice");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client_config = pki.client.clone();
    let peer = std::thread::spawn(move || {
        let sock = std::net::TcpStream::connect(addr).unwrap();
        let conn = rustls::ClientConnection::new(client_config, name()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        for (i, chunk) in chunks(120).iter().enumerate() {
            if i == 40 {
                tls.conn.refresh_traffic_keys().unwrap();
            }
            tls.write_all(chunk).unwrap();
            tls.flush().unwrap();
            let mut back = vec![0u8; chunk.len()];
            tls.read_exact(&mut back).unwrap();
            assert!(back == *chunk, "chunk {i} came back changed");
        }
        tls.conn.send_close_notify();
        tls.flush().unwrap();
        let mut rest = Vec::new();
        // Ok only if our server ended with close_notify.
        tls.read_to_end(&mut rest).unwrap();
        rest.len()
    });

    let (tcp, _) = listener.accept().await.unwrap();
    let mut tls = accept(pki.server.clone(), tcp).await.unwrap();
    let alice = ztm_pki::cert_info(tls.peer_certificates()[0].as_ref()).unwrap();
    assert_eq!(alice.common_name, "alice");
    let mut buf = vec![0u8; 70_000];
    let mut echoed = 0usize;
    loop {
        let n = tls.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        tls.write_all(&buf[..n]).await.unwrap();
        tls.flush().await.unwrap();
        echoed += n;
        if echoed > 2_000_000 && tls.tx.cipher.seq > 20 {
            tls.update_keys().unwrap();
        }
    }
    tls.shutdown().await.unwrap();
    assert_eq!(peer.join().unwrap(), 0);
    assert_eq!(echoed, chunks(120).iter().map(Vec::len).sum::<usize>());
}

/// Forwards both ways between `from` and `to`, flipping one bit of the byte at
/// `flip_at` of what `from` sends.
async fn meddle(from: TcpStream, to: TcpStream, flip_at: usize) {
    let (mut from_r, mut from_w) = from.into_split();
    let (mut to_r, mut to_w) = to.into_split();
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut to_r, &mut from_w).await;
    });
    let mut seen = 0;
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match from_r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if (seen..seen + n).contains(&flip_at) {
            buf[flip_at - seen] ^= 0x20;
        }
        seen += n;
        if to_w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

#[tokio::test]
async fn a_changed_record_is_refused_and_none_of_it_is_read() {
    let pki = pki("alice");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (server_addr, front_addr) = (listener.local_addr().unwrap(), front.local_addr().unwrap());
    tokio::spawn(async move {
        let (client, _) = front.accept().await.unwrap();
        let server = TcpStream::connect(server_addr).await.unwrap();
        meddle(client, server, 40_000).await;
    });
    let client_config = pki.client.clone();
    let client = tokio::spawn(async move {
        let tcp = TcpStream::connect(front_addr).await.unwrap();
        let mut tls = connect(client_config, name(), tcp).await.unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        tls.write_all(&data).await.unwrap();
        tls.flush().await.unwrap();
        tls
    });
    let (tcp, _) = listener.accept().await.unwrap();
    let mut tls = accept(pki.server.clone(), tcp).await.unwrap();
    let mut got = Vec::new();
    let error = loop {
        let mut buf = vec![0u8; 4096];
        match tls.read(&mut buf).await {
            Ok(0) => panic!("end of stream instead of an error"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    assert!(error.to_string().contains("authentication"), "{error}");
    // The records after it are intact, but nothing more is read.
    let again = tls
        .read(&mut [0u8; 4096])
        .await
        .expect_err("read after a bad record");
    assert_eq!(again.kind(), io::ErrorKind::InvalidData);
    // Every byte read is the sender's, and the record holding byte 40,000 is not among them.
    assert!(got.len() < 40_000, "{} bytes read", got.len());
    assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    let _ = client.await;
}

#[tokio::test]
async fn a_client_of_another_ca_is_refused_and_told_why() {
    let ours = pki("alice");
    // Mallory trusts our hub but holds a certificate of another CA.
    let other = ztm_pki::create_ca().unwrap();
    let signer = ztm_pki::CaSigner::load(&other.cert_pem, &other.key_pem).unwrap();
    let mallory = signer.issue_user("mallory").unwrap();
    let config = ztm_pki::agent_client_config(
        &ours.ca_pem,
        &mallory.cert_pem,
        &mallory.key_pem,
        ztm_pki::ALPN_CONTROL,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        // TLS 1.3: the client is done before the server has checked its certificate.
        let mut tls = connect(Arc::new(config), name(), tcp).await?;
        let mut buf = [0u8; 16];
        tls.read(&mut buf).await
    });
    let (tcp, _) = listener.accept().await.unwrap();
    let refused = accept(ours.server.clone(), tcp)
        .await
        .err()
        .expect("accepted");
    assert!(
        refused.to_string().contains("invalid peer certificate"),
        "{refused}"
    );
    let told = client.await.unwrap().expect_err("the client read data");
    assert!(told.to_string().contains("alert"), "{told}");
}

/// A rustls server that, once the handshake is done, writes `raw` to the socket itself
/// and closes it; what our client reads.
async fn read_after_raw(raw: &'static [u8]) -> io::Error {
    let pki = pki("alice");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let config = pki.server.clone();
    let peer = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let conn = rustls::ServerConnection::new(config).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).unwrap();
        }
        tls.write_all(b"fine").unwrap();
        tls.flush().unwrap();
        tls.sock.write_all(raw).unwrap();
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connect(pki.client.clone(), name(), tcp).await.unwrap();
    let mut got = [0u8; 4];
    tls.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"fine");
    peer.join().unwrap();
    tls.read(&mut [0u8; 64]).await.expect_err("read garbage")
}

#[tokio::test]
async fn malformed_or_cut_records_are_errors() {
    // A record longer than TLS allows.
    let e = read_after_raw(&[23, 3, 3, 0x4f, 0xff, 0, 0]).await;
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("20479 bytes"), "{e}");
    // A plaintext record type after the handshake.
    let e = read_after_raw(&[22, 3, 3, 0, 4, 1, 2, 3, 4]).await;
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    // The connection ends inside a record, or between records without close_notify.
    let e = read_after_raw(&[23, 3, 3, 0, 40, 1, 2]).await;
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    let e = read_after_raw(&[]).await;
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
}
