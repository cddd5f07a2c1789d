//! A peer that holds the traffic keys and seals whatever it likes: floods, bad records,
//! records the RFC forbids, a padded handshake. Over TCP on 127.0.0.1. Each of these failed
//! on the record layer before its limits and alerts (see the commit that added them).

use super::*;
use std::time::Instant;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use tokio::io::AsyncRead;

use crate::cipher::Cipher;
use crate::records::{
    alert::CLOSE_NOTIFY as ALERT_CLOSE_NOTIFY, CONTENT_ALERT, CONTENT_APPLICATION_DATA,
    CONTENT_HANDSHAKE, HANDSHAKE_KEY_UPDATE, HANDSHAKE_NEW_SESSION_TICKET, HEADER,
    MAX_HANDSHAKE_MESSAGE, MAX_KEY_UPDATES, READ_BUFFER, TAG,
};
use crate::stream::OwnStream;

type TlsStream = OwnStream<TcpStream>;

/// The most a victim may hold in buffers while it is attacked: a read buffer and a split
/// handshake message, its write buffer empty but for an answer and an alert.
const BOUND: usize = 2 * READ_BUFFER + MAX_HANDSHAKE_MESSAGE;

/// The attacking side: a record layer of our own whose sealing we drive by hand.
struct Hostile {
    tls: TlsStream,
}

impl Hostile {
    /// Seals `inner` (content, content type, padding) as one record, as is.
    fn seal(&mut self, inner: &[u8]) {
        let tx = &mut self.tls.tx;
        let at = tx.out.len();
        tx.out
            .extend_from_slice(&[CONTENT_APPLICATION_DATA, 3, 3, 0, 0]);
        tx.out.extend_from_slice(inner);
        tx.seal_record(at).unwrap();
    }
    /// Our next records use the next sending key.
    fn rotate(&mut self) {
        self.tls.tx.cipher = Cipher::new(self.tls.kernel.update_tx().unwrap()).unwrap();
    }
    async fn send(&mut self) {
        self.tls.flush().await.unwrap();
    }
    /// What the victim sent back, until its alert or end.
    async fn read_answer(&mut self) -> io::Result<Vec<u8>> {
        let mut got = Vec::new();
        self.tls.read_to_end(&mut got).await.map(|_| got)
    }
}

fn victim_pending(victim: &TlsStream) -> usize {
    assert!(
        victim.rx.held() <= BOUND,
        "{} bytes of read buffers",
        victim.rx.held()
    );
    victim.tx.pending()
}

/// A connected pair over TCP: our client (the victim) and a hostile server.
async fn pair() -> (TlsStream, Hostile) {
    let pki = pki("alice");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = pki.server.clone();
    let hostile = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        accept(server, tcp).await.unwrap()
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let victim = connect(pki.client.clone(), name(), tcp).await.unwrap();
    let tls = hostile.await.unwrap();
    (victim, Hostile { tls })
}

const KEY_UPDATE_REQUESTED: [u8; 5] = [HANDSHAKE_KEY_UPDATE, 0, 0, 1, 1];

/// Reads until an error or the end; the bytes read and how it ended.
async fn read_all(victim: &mut TlsStream) -> (Vec<u8>, io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match victim.read(&mut buf).await {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

/// Expects the victim's read to have failed and the hostile peer to get `alert`.
async fn expect_alert(
    victim: &mut TlsStream,
    hostile: &mut Hostile,
    outcome: (Vec<u8>, io::Result<()>),
    alert: &str,
) {
    let (got, result) = outcome;
    let error = result.err().unwrap_or_else(|| {
        panic!(
            "the victim read {} bytes and a clean end instead of an error",
            got.len()
        )
    });
    assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    let write = victim.write_all(b"more").await;
    assert!(write.is_err(), "the victim still writes after {error}");
    let _ = victim.shutdown().await;
    let answer = hostile.read_answer().await;
    let told = answer.expect_err("the victim sent no alert");
    assert!(told.to_string().contains(alert), "{told}, expected {alert}");
}

/// Sends `batches` batches of records that `batch` seals, then "end" and close_notify,
/// while the victim reads; stops sending when the victim's reading ends (the victim reads
/// nothing more then, and the peer's socket fills). What the victim read, how it ended, and
/// how long it took.
async fn flood(
    victim: &mut TlsStream,
    hostile: &mut Hostile,
    batches: usize,
    mut batch: impl FnMut(&mut Hostile),
) -> ((Vec<u8>, io::Result<()>), std::time::Duration) {
    let started = Instant::now();
    let outcome = {
        let read = read_all(victim);
        let send = async {
            for _ in 0..batches {
                batch(hostile);
                hostile.send().await;
            }
            hostile.seal(b"end\x17");
            hostile.seal(&[1, ALERT_CLOSE_NOTIFY, CONTENT_ALERT]);
            hostile.send().await;
        };
        tokio::pin!(read, send);
        tokio::select! {
            outcome = &mut read => outcome,
            () = &mut send => read.await,
        }
    };
    // What the victim did not read is not sent.
    hostile.tls.tx.out.clear();
    hostile.tls.tx.sent = 0;
    (outcome, started.elapsed())
}

#[tokio::test]
async fn a_record_packed_with_key_updates_is_refused() {
    // 3,276 KeyUpdate(update_requested) messages per record, 100 records.
    let (mut victim, mut hostile) = pair().await;
    let per_record = MAX_PLAINTEXT / KEY_UPDATE_REQUESTED.len();
    let mut inner = KEY_UPDATE_REQUESTED.repeat(per_record);
    inner.push(CONTENT_HANDSHAKE);
    let (outcome, took) = flood(&mut victim, &mut hostile, 100, |h| {
        h.seal(&inner);
        for _ in 0..per_record {
            h.rotate();
        }
    })
    .await;
    let pending = victim_pending(&victim);
    eprintln!(
        "{} key updates sent in {took:?}; the victim followed {}, {pending} bytes of sealed \
         records wait in it",
        100 * per_record,
        victim.rx.updates_followed
    );
    assert!(pending < 4096, "{pending} bytes waiting to be sent");
    assert_eq!(victim.rx.updates_followed, 0);
    expect_alert(&mut victim, &mut hostile, outcome, "UnexpectedMessage").await;
}

#[tokio::test]
async fn a_key_update_flood_is_cut_off() {
    // One KeyUpdate(update_requested) per record, 100,000 records, never reading.
    let (mut victim, mut hostile) = pair().await;
    let mut inner = KEY_UPDATE_REQUESTED.to_vec();
    inner.push(CONTENT_HANDSHAKE);
    let (outcome, took) = flood(&mut victim, &mut hostile, 100, |h| {
        for _ in 0..1000 {
            h.seal(&inner);
            h.rotate();
        }
    })
    .await;
    let pending = victim_pending(&victim);
    eprintln!(
        "the victim followed {} key updates and stopped ({took:?}); {pending} bytes of sealed \
         records wait in it",
        victim.rx.updates_followed
    );
    assert!(pending < 4096, "{pending} bytes waiting to be sent");
    assert_eq!(victim.rx.updates_followed, MAX_KEY_UPDATES as u64);
    expect_alert(&mut victim, &mut hostile, outcome, "UnexpectedMessage").await;
}

#[tokio::test]
async fn key_updates_between_data_get_one_answer_from_a_silent_side() {
    // KeyUpdate(update_requested) after every byte of data, 100,000 times, never reading:
    // allowed, but the victim, which sends nothing, answers once.
    let (mut victim, mut hostile) = pair().await;
    let mut inner = KEY_UPDATE_REQUESTED.to_vec();
    inner.push(CONTENT_HANDSHAKE);
    let (outcome, took) = flood(&mut victim, &mut hostile, 100, |h| {
        for _ in 0..1000 {
            h.seal(b"x\x17");
            h.seal(&inner);
            h.rotate();
        }
    })
    .await;
    let pending = victim_pending(&victim);
    eprintln!(
        "the victim followed {} key updates in {took:?}; {pending} bytes of sealed records \
         wait in it",
        victim.rx.updates_followed
    );
    let (got, result) = outcome;
    result.unwrap();
    assert_eq!(got.len(), 100_000 + 3);
    assert_eq!(victim.rx.updates_followed, 100_000);
    assert!(pending <= 27, "{pending} bytes waiting to be sent");
    // It still writes, and the one answer goes first.
    victim.write_all(b"still here").await.unwrap();
    victim.flush().await.unwrap();
    let mut back = [0u8; 10];
    hostile.tls.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
    assert_eq!(hostile.tls.rx.updates_followed, 1);
}

#[tokio::test]
async fn an_empty_record_flood_is_cut_off() {
    // 1,000,000 records of empty application data (one byte of inner plaintext each).
    let (mut victim, mut hostile) = pair().await;
    let (outcome, took) = flood(&mut victim, &mut hostile, 1000, |h| {
        for _ in 0..1000 {
            h.seal(&[CONTENT_APPLICATION_DATA]);
        }
    })
    .await;
    eprintln!("the victim stopped reading after {took:?}: {:?}", outcome.1);
    victim_pending(&victim);
    expect_alert(&mut victim, &mut hostile, outcome, "UnexpectedMessage").await;
}

/// Keeps the client's handshake traffic secret (what SSLKEYLOGFILE would show).
#[derive(Debug, Default)]
struct HandshakeSecret(parking_lot::Mutex<Option<Vec<u8>>>);

impl rustls::KeyLog for HandshakeSecret {
    fn log(&self, label: &str, _: &[u8], secret: &[u8]) {
        if label == "CLIENT_HANDSHAKE_TRAFFIC_SECRET" {
            *self.0.lock() = Some(secret.to_vec());
        }
    }
    fn will_log(&self, label: &str) -> bool {
        label == "CLIENT_HANDSHAKE_TRAFFIC_SECRET"
    }
}

/// HKDF-Expand-Label with SHA-256 and an empty context (RFC 8446 §7.1).
fn expand_label(secret: &[u8], label: &str, len: usize) -> Vec<u8> {
    struct Len(usize);
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let prk = ring::hkdf::Prk::new_less_safe(ring::hkdf::HKDF_SHA256, secret);
    let mut info = (len as u16).to_be_bytes().to_vec();
    info.push((6 + label.len()) as u8);
    info.extend_from_slice(b"tls13 ");
    info.extend_from_slice(label.as_bytes());
    info.push(0);
    let mut out = vec![0u8; len];
    prk.expand(&[&info], Len(len))
        .unwrap()
        .fill(&mut out)
        .unwrap();
    out
}

/// Reads one whole record from `from`; `None` at the end.
async fn next_record(from: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let mut record = vec![0u8; HEADER];
    from.read_exact(&mut record).await.ok()?;
    let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
    record.resize(HEADER + len, 0);
    from.read_exact(&mut record[HEADER..]).await.ok()?;
    Some(record)
}

/// Between a client and a server: re-seals each encrypted handshake record of the client
/// with as much padding as a record may hold (RFC 8446 §5.4 allows any amount), and holds
/// what the client sends after its ClientHello until `hold` bytes have come, to send them in
/// one write. Server to client: at once.
async fn padding_proxy(
    client: TcpStream,
    server: TcpStream,
    secret: Arc<HandshakeSecret>,
    hold: usize,
) {
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_r, &mut client_w).await;
    });
    let mut held = Vec::new();
    let mut cipher: Option<(LessSafeKey, [u8; NONCE_LEN], u64)> = None;
    let mut finished = false;
    let mut messages = Vec::new();
    while let Some(mut record) = next_record(&mut client_r).await {
        if record[0] != CONTENT_APPLICATION_DATA && cipher.is_none() {
            // The ClientHello: the server answers it before the client sends the rest.
            server_w.write_all(&record).await.unwrap();
            continue;
        }
        if record[0] == CONTENT_APPLICATION_DATA && !finished {
            let (key, iv, seq) = cipher.get_or_insert_with(|| {
                let secret = secret.0.lock().clone().unwrap();
                let key = expand_label(&secret, "key", 16);
                let iv = expand_label(&secret, "iv", NONCE_LEN);
                let key = UnboundKey::new(&aead::AES_128_GCM, &key).unwrap();
                (LessSafeKey::new(key), iv.try_into().unwrap(), 0)
            });
            let nonce = |seq: u64| {
                let mut n = *iv;
                for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
                    *b ^= s;
                }
                Nonce::assume_unique_for_key(n)
            };
            let header: [u8; HEADER] = record[..HEADER].try_into().unwrap();
            let mut body = record[HEADER..].to_vec();
            let inner = key
                .open_in_place(nonce(*seq), Aad::from(header), &mut body)
                .unwrap()
                .to_vec();
            // Finished (handshake type 20) is the client's last handshake message.
            messages.extend_from_slice(&inner[..inner.len() - 1]);
            while let [kind, a, b, c, ..] = messages[..] {
                let len = 4 + u32::from_be_bytes([0, a, b, c]) as usize;
                if messages.len() < len {
                    break;
                }
                finished |= kind == 20;
                messages.drain(..len);
            }
            let mut padded = inner;
            padded.resize(MAX_PLAINTEXT + 1, 0);
            let len = (padded.len() + TAG) as u16;
            let header = [CONTENT_APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
            let tag = key
                .seal_in_place_separate_tag(nonce(*seq), Aad::from(header), &mut padded)
                .unwrap();
            *seq += 1;
            record = header.to_vec();
            record.extend_from_slice(&padded);
            record.extend_from_slice(tag.as_ref());
        }
        held.extend_from_slice(&record);
        if held.len() >= hold {
            server_w.write_all(&held).await.unwrap();
            break;
        }
    }
    let _ = tokio::io::copy(&mut client_r, &mut server_w).await;
}

#[tokio::test]
async fn a_padded_final_flight_followed_by_data_is_read_whole() {
    // A certificate holder pads its handshake records: the server's handshake buffer grows
    // to hold the flight and, in the same read, takes in the application data after it.
    let pki = pki("alice");
    let secret = Arc::new(HandshakeSecret::default());
    let mut client = (*pki.client).clone();
    client.key_log = secret.clone();
    // Several records for the client's certificate, each padded to 16 KiB.
    client.max_fragment_size = Some(64);
    let data: Vec<u8> = (0..400_000u32).map(|i| (i % 253) as u8).collect();

    // Room in the server's socket for the whole clump.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4 << 20).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (server_addr, front_addr) = (listener.local_addr().unwrap(), front.local_addr().unwrap());
    tokio::spawn(async move {
        let (client, _) = front.accept().await.unwrap();
        let server = TcpStream::connect(server_addr).await.unwrap();
        padding_proxy(client, server, secret, 300_000).await;
    });
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        let tcp = TcpStream::connect(front_addr).await.unwrap();
        let mut tls = connect(Arc::new(client), name(), tcp).await.unwrap();
        tls.write_all(&sent).await.unwrap();
        tls.shutdown().await.unwrap();
        tls
    });
    let (tcp, _) = listener.accept().await.unwrap();
    let mut tls = accept(pki.server.clone(), tcp).await.unwrap();
    let leftover = tls.rx.buf.len();
    eprintln!("the handshake left {leftover} bytes in the read buffer");
    let mut got = Vec::new();
    tls.read_to_end(&mut got).await.unwrap();
    assert!(got == data, "{} bytes read, {} sent", got.len(), data.len());
    drop(writer.await.unwrap());
}

/// Answers to single hostile records after 3 bytes of good data: what the victim reads,
/// and the alert it sends.
async fn after_hostile(
    records: &[&[u8]],
    rotate_after: Option<usize>,
) -> (TlsStream, Hostile, (Vec<u8>, io::Result<()>)) {
    let (mut victim, mut hostile) = pair().await;
    hostile.seal(b"abc\x17");
    for (i, r) in records.iter().enumerate() {
        hostile.seal(r);
        if rotate_after == Some(i) {
            hostile.rotate();
        }
    }
    hostile.seal(b"xyz\x17");
    hostile.seal(&[1, ALERT_CLOSE_NOTIFY, CONTENT_ALERT]);
    hostile.send().await;
    let outcome = read_all(&mut victim).await;
    (victim, hostile, outcome)
}

#[tokio::test]
async fn a_bad_record_is_answered_with_bad_record_mac_and_ends_writes() {
    let (mut victim, mut hostile) = pair().await;
    hostile.seal(b"abc\x17");
    hostile.seal(b"def\x17");
    let last = hostile.tls.tx.out.len() - 1;
    hostile.tls.tx.out[last] ^= 1;
    hostile.send().await;
    let outcome = read_all(&mut victim).await;
    assert_eq!(String::from_utf8_lossy(&outcome.0), "abc");
    expect_alert(&mut victim, &mut hostile, outcome, "BadRecordMac").await;
}

#[tokio::test]
async fn an_inner_plaintext_over_the_limit_is_refused() {
    // 16 KiB of content, its type and one byte of padding: one byte more than RFC 8446 §5.4
    // allows.
    let mut inner = vec![b'a'; MAX_PLAINTEXT];
    inner.extend_from_slice(&[CONTENT_APPLICATION_DATA, 0]);
    let (mut victim, mut hostile, outcome) = after_hostile(&[&inner], None).await;
    assert_eq!(String::from_utf8_lossy(&outcome.0), "abc");
    expect_alert(&mut victim, &mut hostile, outcome, "RecordOverflow").await;
}

#[tokio::test]
async fn an_empty_handshake_record_is_refused() {
    let (mut victim, mut hostile, outcome) =
        after_hostile(&[&[CONTENT_HANDSHAKE, 0, 0]], None).await;
    assert_eq!(String::from_utf8_lossy(&outcome.0), "abc");
    expect_alert(&mut victim, &mut hostile, outcome, "UnexpectedMessage").await;
}

#[tokio::test]
async fn a_key_update_not_ending_its_record_is_refused() {
    let mut inner = KEY_UPDATE_REQUESTED.to_vec();
    inner.extend_from_slice(&[HANDSHAKE_NEW_SESSION_TICKET, 0, 0, 0]);
    inner.push(CONTENT_HANDSHAKE);
    let (mut victim, mut hostile, outcome) = after_hostile(&[&inner], Some(0)).await;
    assert_eq!(String::from_utf8_lossy(&outcome.0), "abc");
    expect_alert(&mut victim, &mut hostile, outcome, "UnexpectedMessage").await;
}

#[tokio::test]
async fn a_key_update_split_across_records_is_followed() {
    let (_victim, _hostile, outcome) = after_hostile(
        &[
            &[HANDSHAKE_KEY_UPDATE, 0, CONTENT_HANDSHAKE],
            &[0, 1, 0, CONTENT_HANDSHAKE, 0, 0],
        ],
        Some(1),
    )
    .await;
    outcome.1.unwrap();
    assert_eq!(String::from_utf8_lossy(&outcome.0), "abcxyz");
}
