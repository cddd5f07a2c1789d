//! HTTP Datagram capsules (RFC 9297 §3.5): how UDP datagrams ride a tunnel stream. A capsule
//! is `type (varint) | length (varint) | value`; a datagram is type 0x00 whose value is the UDP
//! payload. Unknown capsule types are skipped, as the RFC requires.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const DATAGRAM: u64 = 0x00;
/// Largest capsule value accepted (a UDP payload is at most 65,527 bytes).
pub const MAX_VALUE: usize = 65_535;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapsuleError {
    TooLarge(u64),
}

impl std::fmt::Display for CapsuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CapsuleError::TooLarge(n) => write!(f, "capsule of {n} bytes is over the limit"),
        }
    }
}

impl std::error::Error for CapsuleError {}

/// QUIC variable-length integer encoding (RFC 9000 §16).
pub fn put_varint(buf: &mut BytesMut, v: u64) {
    if v < 1 << 6 {
        buf.put_u8(v as u8);
    } else if v < 1 << 14 {
        buf.put_u16(0x4000 | v as u16);
    } else if v < 1 << 30 {
        buf.put_u32(0x8000_0000 | v as u32);
    } else {
        buf.put_u64(0xc000_0000_0000_0000 | v);
    }
}

/// Decodes a varint from the front of `buf` without consuming it: (value, length) or None if
/// more bytes are needed.
pub fn peek_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    if buf.len() < len {
        return None;
    }
    let mut v = u64::from(first & 0x3f);
    for b in &buf[1..len] {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, len))
}

/// Encodes one datagram capsule.
pub fn encode_datagram(payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 10);
    put_varint(&mut buf, DATAGRAM);
    put_varint(&mut buf, payload.len() as u64);
    buf.put_slice(payload);
    buf.freeze()
}

/// Reassembles capsules from stream chunks; memory is bounded by one capsule.
#[derive(Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete datagram payload, if any.
    pub fn next_datagram(&mut self) -> Result<Option<Bytes>, CapsuleError> {
        loop {
            let Some((kind, a)) = peek_varint(&self.buf) else {
                return Ok(None);
            };
            let Some((len, b)) = peek_varint(&self.buf[a..]) else {
                return Ok(None);
            };
            if len > MAX_VALUE as u64 {
                return Err(CapsuleError::TooLarge(len));
            }
            let total = a + b + len as usize;
            if self.buf.len() < total {
                return Ok(None);
            }
            self.buf.advance(a + b);
            let value = self.buf.split_to(len as usize).freeze();
            if kind == DATAGRAM {
                return Ok(Some(value));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for v in [
            0u64,
            37,
            63,
            64,
            15293,
            16383,
            16384,
            494_878_333,
            (1 << 30) - 1,
            1 << 30,
            (1 << 62) - 1,
        ] {
            let mut b = BytesMut::new();
            put_varint(&mut b, v);
            assert_eq!(peek_varint(&b), Some((v, b.len())), "{v}");
        }
        // RFC 9000 examples.
        assert_eq!(peek_varint(&[0x7b, 0xbd]), Some((15293, 2)));
        assert_eq!(peek_varint(&[0x25]), Some((37, 1)));
        assert_eq!(peek_varint(&[0x40]), None);
    }

    #[test]
    fn datagrams_split_anywhere() {
        let payloads: Vec<Vec<u8>> = vec![
            vec![],
            vec![1],
            vec![7; 100],
            vec![9; 8192],
            vec![3; 65_000],
        ];
        let mut stream = Vec::new();
        for p in &payloads {
            stream.extend_from_slice(&encode_datagram(p));
        }
        // An unknown capsule type in the middle is skipped.
        let mut unknown = BytesMut::new();
        put_varint(&mut unknown, 0x1234);
        put_varint(&mut unknown, 3);
        unknown.put_slice(b"abc");
        stream.splice(0..0, unknown.iter().copied());
        for step in [1usize, 7, 1000, stream.len()] {
            let mut d = Decoder::default();
            let mut out = Vec::new();
            for chunk in stream.chunks(step) {
                d.push(chunk);
                while let Some(p) = d.next_datagram().unwrap() {
                    out.push(p.to_vec());
                }
            }
            assert_eq!(out, payloads, "step {step}");
        }
    }

    #[test]
    fn oversized_capsule_is_an_error() {
        let mut b = BytesMut::new();
        put_varint(&mut b, 0);
        put_varint(&mut b, 1 << 20);
        let mut d = Decoder::default();
        d.push(&b);
        assert_eq!(d.next_datagram(), Err(CapsuleError::TooLarge(1 << 20)));
    }
}
