//! Randomised tests, in memory (`tokio::io::duplex`), every step polled by hand so that the
//! interleaving is the test's: (a) byte-exact round trips with random chunking, buffer sizes
//! and key updates from either side, against ourselves and against tokio-rustls; (b) a peer
//! holding the traffic keys that seals arbitrary inner plaintexts, checked against a small
//! model of what PROTOCOL.md "Records" says is accepted and refused.
//!
//! `PROPTEST_CASES` sets the number of cases (10,000 per property by default).

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tokio::io::{duplex, AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

use super::{name, pki, Pki};
use crate::records::{
    alert, CONTENT_ALERT, CONTENT_APPLICATION_DATA, CONTENT_HANDSHAKE, HANDSHAKE_KEY_UPDATE,
    HANDSHAKE_NEW_SESSION_TICKET, HEADER, MAX_BODY, MAX_EMPTY_RECORDS, MAX_HANDSHAKE_MESSAGE,
    MAX_INNER, MAX_KEY_UPDATES, READ_BUFFER, TAG,
};
use crate::stream::OwnStream;
use crate::{accept_with, connect_with, Inner, Records, TlsStream};

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

fn shared_pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| pki("alice"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn cx() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

/// One read of at most `max` bytes: `None` if it would wait, `Some(empty)` at the end.
fn try_read<T: AsyncRead + Unpin>(s: &mut T, max: usize) -> Option<io::Result<Vec<u8>>> {
    let mut buf = vec![0u8; max];
    let mut rb = ReadBuf::new(&mut buf);
    match Pin::new(s).poll_read(&mut cx(), &mut rb) {
        Poll::Ready(Ok(())) => Some(Ok(rb.filled().to_vec())),
        Poll::Ready(Err(e)) => Some(Err(e)),
        Poll::Pending => None,
    }
}

fn try_write<T: AsyncWrite + Unpin>(s: &mut T, data: &[u8]) -> usize {
    match Pin::new(s).poll_write(&mut cx(), data) {
        Poll::Ready(Ok(n)) => n,
        Poll::Ready(Err(e)) => panic!("write failed: {e}"),
        Poll::Pending => 0,
    }
}

/// Whether everything written so far is out.
fn try_flush<T: AsyncWrite + Unpin>(s: &mut T) -> bool {
    match Pin::new(s).poll_flush(&mut cx()) {
        Poll::Ready(Ok(())) => true,
        Poll::Ready(Err(e)) => panic!("flush failed: {e}"),
        Poll::Pending => false,
    }
}

fn try_shutdown<T: AsyncWrite + Unpin>(s: &mut T) -> bool {
    match Pin::new(s).poll_shutdown(&mut cx()) {
        Poll::Ready(Ok(())) => true,
        Poll::Ready(Err(e)) => panic!("shutdown failed: {e}"),
        Poll::Pending => false,
    }
}

// ---------------------------------------------------------------------------------------
// (a) Round trips

/// Who is at each end: our record layer or tokio-rustls'.
const PAIRS: [(Records, Records); 3] = [
    (Records::Own, Records::Own),
    (Records::Own, Records::Rustls),
    (Records::Rustls, Records::Own),
];

#[derive(Clone, Debug)]
enum Op {
    Write(usize, usize),
    Read(usize, usize),
    Flush(usize),
    Update(usize),
}

fn side() -> impl Strategy<Value = usize> {
    0..2usize
}

fn op() -> impl Strategy<Value = Op> {
    let len = prop_oneof![8 => 1..2_000usize, 1 => 1..70_000usize];
    prop_oneof![
        4 => (side(), len).prop_map(|(s, n)| Op::Write(s, n)),
        4 => (side(), 1..70_000usize).prop_map(|(s, n)| Op::Read(s, n)),
        2 => side().prop_map(Op::Flush),
        1 => side().prop_map(Op::Update),
    ]
}

/// Byte `i` of what side `s` sends.
fn byte(s: usize, i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9) ^ (s * 0x55)) as u8
}

struct End {
    tls: TlsStream<DuplexStream>,
    written: usize,
    read: usize,
    updates: usize,
}

impl End {
    fn write(&mut self, s: usize, n: usize) {
        let data: Vec<u8> = (self.written..self.written + n)
            .map(|i| byte(s, i))
            .collect();
        self.written += try_write(&mut self.tls, &data);
    }

    /// Reads and checks; whether anything came.
    fn read(&mut self, s: usize, max: usize) -> bool {
        match try_read(&mut self.tls, max) {
            None => false,
            Some(Ok(got)) => {
                assert!(!got.is_empty(), "side {s}: end of stream before close");
                for (k, b) in got.iter().enumerate() {
                    let i = self.read + k;
                    assert_eq!(*b, byte(1 - s, i), "side {s}: byte {i} changed");
                }
                self.read += got.len();
                true
            }
            Some(Err(e)) => panic!("side {s}: read failed: {e}"),
        }
    }
}

fn round_trip(
    rt: &tokio::runtime::Runtime,
    pair: usize,
    capacity: usize,
    limits: (u64, u64),
    ops: &[Op],
) {
    let pki = shared_pki();
    let (a, b) = duplex(capacity);
    let (client, server) = rt.block_on(async {
        tokio::join!(
            connect_with(PAIRS[pair].0, pki.client.clone(), name(), a),
            accept_with(PAIRS[pair].1, pki.server.clone(), b),
        )
    });
    let mut ends = [client.unwrap(), server.unwrap()].map(|tls| End {
        tls,
        written: 0,
        read: 0,
        updates: 0,
    });
    // Small confidentiality limits: our own key updates come by themselves too.
    for (end, limit) in ends.iter_mut().zip([limits.0, limits.1]) {
        if let Inner::Own(s) = &mut end.tls.inner {
            s.tx.limit = limit;
        }
    }
    for op in ops {
        match *op {
            Op::Write(s, n) => ends[s].write(s, n),
            Op::Read(s, n) => {
                ends[s].read(s, n);
            }
            Op::Flush(s) => {
                try_flush(&mut ends[s].tls);
            }
            // Fewer than the peer's limit of updates without data.
            Op::Update(s) if ends[s].updates < 16 => {
                ends[s].updates += 1;
                ends[s].tls.update_keys().unwrap();
            }
            Op::Update(_) => {}
        }
    }
    // Everything sent arrives, whatever the order above left pending.
    let mut idle = 0;
    while ends[0].read < ends[1].written || ends[1].read < ends[0].written {
        let mut moved = false;
        for end in &mut ends {
            try_flush(&mut end.tls);
        }
        for (s, end) in ends.iter_mut().enumerate() {
            moved |= end.read(s, 65_536);
        }
        // A round may only move bytes into a pipe smaller than a record.
        idle = if moved { 0 } else { idle + 1 };
        assert!(
            idle < 100_000,
            "stuck: {} of {} and {} of {} read",
            ends[0].read,
            ends[1].written,
            ends[1].read,
            ends[0].written
        );
    }
    // close_notify both ways: each side reads a clean end.
    for s in 0..2 {
        let (mut done, mut end, mut idle) = (false, false, 0);
        while !(done && end) {
            let mut moved = false;
            if !done {
                done = try_shutdown(&mut ends[s].tls);
                moved |= done;
            }
            if !end {
                match try_read(&mut ends[1 - s].tls, 1024) {
                    Some(Ok(got)) if got.is_empty() => (end, moved) = (true, true),
                    Some(Ok(got)) => panic!("{} bytes after the end", got.len()),
                    Some(Err(e)) => panic!("no clean end: {e}"),
                    None => {}
                }
            }
            idle = if moved { 0 } else { idle + 1 };
            assert!(idle < 100_000, "close_notify stuck");
        }
    }
}

#[test]
fn random_round_trips_arrive_byte_exact() {
    let rt = runtime();
    let mut runner = TestRunner::new(config());
    let strategy = (
        0..PAIRS.len(),
        // The handshake writes a flight, then reads: a pipe must hold what both sides may
        // write at once (a ChangeCipherSpec record, 6 bytes).
        prop_oneof![1 => 16..256usize, 3 => 256..70_000usize],
        (2..200u64, 2..200u64),
        proptest::collection::vec(op(), 0..40),
    );
    runner
        .run(&strategy, |(pair, capacity, limits, ops)| {
            round_trip(&rt, pair, capacity, limits, &ops);
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// (b) Hostile records

/// A handshake message as the hostile peer writes it.
#[derive(Clone, Debug)]
enum Msg {
    KeyUpdate(u8),
    Ticket(Vec<u8>),
    Other(u8, Vec<u8>),
    /// A header announcing `len` bytes, and only `body` of them.
    Announced(u32, Vec<u8>),
}

impl Msg {
    fn bytes(&self) -> Vec<u8> {
        let (kind, body) = match self {
            Msg::KeyUpdate(r) => (HANDSHAKE_KEY_UPDATE, vec![*r]),
            Msg::Ticket(b) => (HANDSHAKE_NEW_SESSION_TICKET, b.clone()),
            Msg::Other(k, b) => (*k, b.clone()),
            Msg::Announced(len, b) => {
                let mut out = vec![HANDSHAKE_NEW_SESSION_TICKET];
                out.extend_from_slice(&len.to_be_bytes()[1..]);
                out.extend_from_slice(b);
                return out;
            }
        };
        let mut out = vec![kind];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&body);
        out
    }
}

/// What the hostile peer sends next.
#[derive(Clone, Debug)]
enum Item {
    /// Application data (possibly empty).
    Data(Vec<u8>, usize),
    /// An alert record's content.
    Alert(Vec<u8>, usize),
    /// Handshake messages, cut into records after the given byte counts.
    Handshake(Vec<Msg>, Vec<usize>, usize),
    /// A record of another content type.
    Other(u8, Vec<u8>, usize),
    /// An inner plaintext of zeros only: no content type.
    Zeros(usize),
    /// A record not sealed with the keys: its type and body.
    Garbage(u8, Vec<u8>),
    /// The peer moves to its next key without telling.
    Rotate,
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn padding() -> impl Strategy<Value = usize> {
    prop_oneof![8 => Just(0usize), 4 => 0..64usize, 1 => 16_000..16_400usize]
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        6 => prop_oneof![5 => 0..2u8, 1 => any::<u8>()].prop_map(Msg::KeyUpdate),
        3 => bytes(300).prop_map(Msg::Ticket),
        1 => (any::<u8>(), bytes(20)).prop_map(|(k, b)| Msg::Other(k, b)),
        1 => (prop_oneof![Just(2u32), 60_000..70_000u32], bytes(40))
            .prop_map(|(n, b)| Msg::Announced(n, b)),
    ]
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        10 => (prop_oneof![1 => Just(Vec::new()), 3 => bytes(100)], padding())
            .prop_map(|(d, p)| Item::Data(d, p)),
        2 => (prop_oneof![
            4 => (0..3u8, prop_oneof![Just(0u8), Just(90u8), any::<u8>()]).prop_map(|(l, d)| vec![l, d]),
            1 => bytes(5),
        ], padding()).prop_map(|(a, p)| Item::Alert(a, p)),
        8 => (
            proptest::collection::vec(msg(), 1..4),
            proptest::collection::vec(0..400usize, 0..4),
            padding(),
        )
            .prop_map(|(m, c, p)| Item::Handshake(m, c, p)),
        1 => (any::<u8>(), bytes(20), padding()).prop_map(|(t, b, p)| Item::Other(t, b, p)),
        1 => (0..40usize).prop_map(Item::Zeros),
        1 => (prop_oneof![Just(CONTENT_APPLICATION_DATA), any::<u8>()], bytes(40))
            .prop_map(|(t, b)| Item::Garbage(t, b)),
        1 => Just(Item::Rotate),
    ]
}

/// How the hostile peer ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ending {
    CloseNotify,
    /// It closes the transport without close_notify.
    Eof,
    /// It stops sending and keeps the connection open.
    Silence,
}

/// What goes on the wire, record by record.
enum Wire {
    Sealed(Vec<u8>),
    Raw(Vec<u8>),
    Rotate,
}

fn inner(content: &[u8], content_type: u8, padding: usize) -> Vec<u8> {
    let mut inner = content.to_vec();
    inner.push(content_type);
    inner.resize(inner.len() + padding, 0);
    inner
}

fn wire(items: &[Item]) -> Vec<Wire> {
    let mut out = Vec::new();
    for item in items {
        match item {
            Item::Data(d, p) => out.push(Wire::Sealed(inner(d, CONTENT_APPLICATION_DATA, *p))),
            Item::Alert(a, p) => out.push(Wire::Sealed(inner(a, CONTENT_ALERT, *p))),
            Item::Handshake(msgs, cuts, p) => {
                let all: Vec<u8> = msgs.iter().flat_map(Msg::bytes).collect();
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c % all.len()).collect();
                cuts.push(all.len());
                cuts.sort_unstable();
                cuts.dedup();
                let mut from = 0;
                for to in cuts.into_iter().filter(|c| *c > 0) {
                    out.push(Wire::Sealed(inner(&all[from..to], CONTENT_HANDSHAKE, *p)));
                    from = to;
                }
            }
            Item::Other(t, b, p) => out.push(Wire::Sealed(inner(b, *t, *p))),
            Item::Zeros(n) => out.push(Wire::Sealed(vec![0; *n])),
            Item::Garbage(t, body) => {
                let mut raw = vec![*t, 3, 3];
                raw.extend_from_slice(&(body.len() as u16).to_be_bytes());
                raw.extend_from_slice(body);
                out.push(Wire::Raw(raw));
            }
            Item::Rotate => out.push(Wire::Rotate),
        }
    }
    out
}

/// How the victim's reading ends.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// close_notify.
    End,
    /// An error, and the alert the victim sends (`None`: it sends none).
    Fail(Option<u8>),
    /// The peer closed the transport without close_notify.
    Truncated,
    /// Nothing more to read, connection open.
    Waiting,
}

/// The model: what the record layer makes of each record, as PROTOCOL.md lists it.
struct Model {
    client: bool,
    partial: Vec<u8>,
    key_updates: u32,
    empty: u32,
    /// The peer rotated its key without a KeyUpdate: its next record does not authenticate.
    desync: bool,
    data: Vec<u8>,
}

enum Step {
    Next { rotate: bool },
    Stop(Outcome),
}

impl Model {
    fn nothing(&mut self) -> Step {
        self.empty += 1;
        if self.empty > MAX_EMPTY_RECORDS {
            return Step::Stop(Outcome::Fail(Some(alert::UNEXPECTED_MESSAGE)));
        }
        Step::Next { rotate: false }
    }

    fn raw(&mut self, raw: &[u8]) -> Step {
        let len = raw.len() - HEADER;
        Step::Stop(Outcome::Fail(Some(if raw[0] != CONTENT_APPLICATION_DATA {
            alert::UNEXPECTED_MESSAGE
        } else if len > MAX_BODY {
            alert::RECORD_OVERFLOW
        } else {
            alert::BAD_RECORD_MAC
        })))
    }

    fn sealed(&mut self, inner: &[u8]) -> Step {
        let fail = |a| Step::Stop(Outcome::Fail(Some(a)));
        if inner.len() > MAX_INNER {
            return fail(alert::RECORD_OVERFLOW);
        }
        if self.desync {
            return fail(alert::BAD_RECORD_MAC);
        }
        let Some(at) = inner.iter().rposition(|b| *b != 0) else {
            return fail(alert::UNEXPECTED_MESSAGE);
        };
        let (content, kind) = (&inner[..at], inner[at]);
        if !self.partial.is_empty() && kind != CONTENT_HANDSHAKE {
            return fail(alert::UNEXPECTED_MESSAGE);
        }
        match kind {
            CONTENT_APPLICATION_DATA if content.is_empty() => self.nothing(),
            CONTENT_APPLICATION_DATA => {
                self.key_updates = 0;
                self.empty = 0;
                self.data.extend_from_slice(content);
                Step::Next { rotate: false }
            }
            CONTENT_ALERT => match content {
                [_, 0] => Step::Stop(Outcome::End),
                [_, 90] => self.nothing(),
                [_, _] => Step::Stop(Outcome::Fail(None)),
                _ => fail(alert::DECODE_ERROR),
            },
            CONTENT_HANDSHAKE if content.is_empty() => fail(alert::UNEXPECTED_MESSAGE),
            CONTENT_HANDSHAKE => {
                self.empty = 0;
                let mut all = std::mem::take(&mut self.partial);
                all.extend_from_slice(content);
                let mut rest = &all[..];
                let mut rotate = false;
                while rest.len() >= 4 {
                    let len = u32::from_be_bytes([0, rest[1], rest[2], rest[3]]) as usize;
                    if len > MAX_HANDSHAKE_MESSAGE {
                        return fail(alert::DECODE_ERROR);
                    }
                    if rest.len() < 4 + len {
                        break;
                    }
                    let (kind, body) = (rest[0], &rest[4..4 + len]);
                    rest = &rest[4 + len..];
                    match kind {
                        HANDSHAKE_KEY_UPDATE if len != 1 => return fail(alert::DECODE_ERROR),
                        HANDSHAKE_KEY_UPDATE if body[0] > 1 => {
                            return fail(alert::ILLEGAL_PARAMETER)
                        }
                        HANDSHAKE_KEY_UPDATE if !rest.is_empty() => {
                            return fail(alert::UNEXPECTED_MESSAGE)
                        }
                        HANDSHAKE_KEY_UPDATE => rotate = true,
                        HANDSHAKE_NEW_SESSION_TICKET if self.client => {}
                        _ => return fail(alert::UNEXPECTED_MESSAGE),
                    }
                }
                self.partial = rest.to_vec();
                if rotate {
                    self.key_updates += 1;
                    if self.key_updates > MAX_KEY_UPDATES {
                        return fail(alert::UNEXPECTED_MESSAGE);
                    }
                }
                Step::Next { rotate }
            }
            _ => fail(alert::UNEXPECTED_MESSAGE),
        }
    }
}

/// The hostile peer's sealing: inner plaintexts as they are.
fn seal(peer: &mut OwnStream<DuplexStream>, inner: &[u8]) {
    let at = peer.tx.out.len();
    peer.tx
        .out
        .extend_from_slice(&[CONTENT_APPLICATION_DATA, 3, 3, 0, 0]);
    peer.tx.out.extend_from_slice(inner);
    peer.tx.seal_record(at).unwrap();
}

fn rotate(peer: &mut OwnStream<DuplexStream>) {
    peer.tx.cipher = crate::cipher::Cipher::new(peer.kernel.update_tx().unwrap()).unwrap();
}

/// The most the victim may hold: a read buffer, a split handshake message; in its write
/// buffer an answer to a key update and an alert.
const HELD: usize = READ_BUFFER + 2 * (MAX_HANDSHAKE_MESSAGE + 4) + MAX_BODY;
const PENDING: usize = 2 * (HEADER + 5 + 1 + TAG);

fn hostile(
    rt: &tokio::runtime::Runtime,
    victim_is_client: bool,
    capacity: usize,
    items: &[Item],
    ending: Ending,
    reads: &[usize],
) {
    let pki = shared_pki();
    let (a, b) = duplex(capacity);
    let (client, server) = rt.block_on(async {
        tokio::join!(
            crate::handshake::connect(pki.client.clone(), name(), a),
            crate::handshake::accept(pki.server.clone(), b),
        )
    });
    let (mut victim, mut peer) = match victim_is_client {
        true => (client.unwrap(), server.unwrap()),
        false => (server.unwrap(), client.unwrap()),
    };
    let mut model = Model {
        client: victim_is_client,
        partial: Vec::new(),
        key_updates: 0,
        empty: 0,
        desync: false,
        data: Vec::new(),
    };
    let mut expected = None;
    for w in wire(items) {
        let step = match &w {
            Wire::Sealed(inner) => {
                seal(&mut peer, inner);
                model.sealed(inner)
            }
            Wire::Raw(raw) => {
                peer.tx.out.extend_from_slice(raw);
                model.raw(raw)
            }
            Wire::Rotate => {
                rotate(&mut peer);
                model.desync = true;
                Step::Next { rotate: false }
            }
        };
        match step {
            Step::Next { rotate: true } => rotate(&mut peer),
            Step::Next { rotate: false } => {}
            Step::Stop(outcome) => {
                expected = Some(outcome);
                break;
            }
        }
    }
    let expected = expected.unwrap_or_else(|| match ending {
        Ending::CloseNotify => {
            let close = [1, alert::CLOSE_NOTIFY, CONTENT_ALERT];
            seal(&mut peer, &close);
            match model.sealed(&close) {
                Step::Stop(outcome) => outcome,
                Step::Next { .. } => unreachable!("an alert ends the model's reading"),
            }
        }
        Ending::Eof => Outcome::Truncated,
        Ending::Silence => Outcome::Waiting,
    });

    // The victim reads while the peer pushes its records, never reading itself.
    let mut got = Vec::new();
    let mut shut = false;
    let mut idle = 0;
    let mut turn = 0;
    let outcome = loop {
        let flushed = try_flush(&mut peer);
        if flushed && ending == Ending::Eof && !shut {
            shut = try_shutdown(&mut peer.io);
        }
        let max = reads[turn % reads.len()];
        turn += 1;
        match try_read(&mut victim, max) {
            Some(Ok(d)) if d.is_empty() => break Ok(()),
            Some(Ok(d)) => {
                got.extend_from_slice(&d);
                idle = 0;
            }
            Some(Err(e)) => break Err(e),
            None if flushed && (ending != Ending::Eof || shut) => {
                idle += 1;
                if idle > 2 {
                    break Ok(());
                }
            }
            None => {}
        }
        assert!(victim.rx.held() <= HELD, "{} bytes held", victim.rx.held());
        assert!(
            victim.tx.pending() <= PENDING,
            "{} bytes to send",
            victim.tx.pending()
        );
        assert!(turn < 100_000, "the victim never finished reading");
    };
    assert!(
        got == model.data,
        "read {} bytes, {} expected",
        got.len(),
        model.data.len()
    );
    match (&expected, &outcome) {
        (Outcome::End, Ok(())) => assert!(victim.rx.closed, "no close_notify seen"),
        (Outcome::Waiting, Ok(())) => assert!(!victim.rx.closed),
        (Outcome::Truncated, Err(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}"),
        (Outcome::Fail(None), Err(e)) => {
            assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}")
        }
        (Outcome::Fail(Some(a)), Err(e)) => {
            let name = format!("{:?}", rustls::AlertDescription::from(*a));
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            assert!(e.to_string().contains(&name), "{e}, expected {name}");
        }
        _ => panic!("expected {expected:?}, the victim's reading ended with {outcome:?}"),
    }
    if outcome.is_err() {
        // Failed for good: reads fail again, writes too.
        assert!(try_read(&mut victim, 10).is_some_and(|r| r.is_err()));
        let write = Pin::new(&mut victim).poll_write(&mut cx(), b"x");
        assert!(matches!(write, Poll::Ready(Err(_))), "{write:?}");
        // The peer reads what the victim sent: an alert if one is due, else nothing.
        let mut turns = 0;
        let told = loop {
            let flushed = try_flush(&mut victim) && try_shutdown(&mut victim);
            match try_read(&mut peer, 4096) {
                Some(Ok(d)) if d.is_empty() => break None,
                Some(Ok(_)) => {}
                Some(Err(e)) => break Some(e),
                None if flushed => break None,
                None => {}
            }
            turns += 1;
            assert!(turns < 10_000, "the alert did not get through");
        };
        match expected {
            Outcome::Fail(Some(a)) => {
                let name = format!("{:?}", rustls::AlertDescription::from(a));
                let told = told.expect("no alert came");
                assert!(told.to_string().contains(&name), "{told}, expected {name}");
            }
            _ => {
                if let Some(e) = told {
                    assert!(!e.to_string().contains("alert"), "{e}");
                }
            }
        }
    }
}

#[test]
fn hostile_records_get_data_a_clean_error_and_alert_or_an_end() {
    let rt = runtime();
    let mut runner = TestRunner::new(config());
    let strategy = (
        any::<bool>(),
        prop_oneof![1 => 16..512usize, 2 => 512..70_000usize],
        proptest::collection::vec(item(), 0..24),
        prop_oneof![
            Just(Ending::CloseNotify),
            Just(Ending::Eof),
            Just(Ending::Silence)
        ],
        proptest::collection::vec(1..20_000usize, 1..4),
    );
    runner
        .run(&strategy, |(client, capacity, items, ending, reads)| {
            hostile(&rt, client, capacity, &items, ending, &reads);
            Ok(())
        })
        .unwrap();
}

#[test]
fn reading_waits_while_more_is_unsent_than_a_write_leaves() {
    // Side A queues more key updates than a write call could leave unsent, on a pipe its peer
    // does not read: A reads nothing, although data waits for it, until the pipe has taken
    // enough of A's records.
    let rt = runtime();
    let pki = shared_pki();
    let (a, b) = duplex(64 * 1024);
    let (a, mut b) = rt.block_on(async {
        tokio::join!(
            crate::handshake::connect(pki.client.clone(), name(), a),
            crate::handshake::accept(pki.server.clone(), b),
        )
    });
    let (mut a, b) = (a.unwrap(), b.as_mut().unwrap());
    assert_eq!(try_write(b, b"for a"), 5);
    assert!(try_flush(b));
    while a.tx.pending() <= crate::stream::READ_PAUSE {
        a.update_keys().unwrap();
    }
    let first = try_read(&mut a, 100);
    assert!(
        first.is_none(),
        "a read on while its records waited: {first:?}"
    );
    // The pipe took 64 KiB of them: under the mark, A reads again, with records still
    // waiting.
    let pending = a.tx.pending();
    assert!(pending > 0 && pending <= crate::stream::READ_PAUSE);
    assert_eq!(try_read(&mut a, 100).unwrap().unwrap(), b"for a");
}
