//! TLS 1.3 records after the handshake (RFC 8446 §5): opening what the peer sent, following
//! its key updates, sealing what we send. No I/O here: [`Rx`] works on bytes already read,
//! [`Tx`] leaves sealed records in its buffer; `stream.rs` moves them. What is accepted and
//! refused is listed in PROTOCOL.md, "Records".

use std::io::{self, IoSlice};
use std::ops::Range;

use bytes::{Buf, BytesMut};
use ring::aead::Aad;

use crate::cipher::{Cipher, Kernel};

/// Record header: content type, legacy version, length.
pub(crate) const HEADER: usize = 5;
/// AEAD tag of every cipher suite rustls offers for TLS 1.3.
pub(crate) const TAG: usize = 16;
/// Largest plaintext of one record (RFC 8446 §5.1).
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// Largest inner plaintext: content, content type and padding together (RFC 8446 §5.4).
pub(crate) const MAX_INNER: usize = MAX_PLAINTEXT + 1;
/// Largest record body accepted: the inner plaintext sealed.
pub(crate) const MAX_BODY: usize = MAX_INNER + TAG;
pub(crate) const MAX_RECORD: usize = HEADER + MAX_BODY;

/// Bytes asked of the socket per read, at least: a read takes several 16 KiB records at once.
pub const READ_SIZE: usize = 64 * 1024;
/// Room a read buffer is given: [`READ_SIZE`] plus a whole record.
pub(crate) const READ_BUFFER: usize = READ_SIZE + MAX_RECORD;
/// Plaintext one write call seals at most (eight full records).
pub(crate) const WRITE_BATCH: usize = 8 * MAX_PLAINTEXT;

/// Largest post-handshake handshake message accepted, its header aside (the limit rustls
/// puts on handshake messages).
pub(crate) const MAX_HANDSHAKE_MESSAGE: usize = 0xffff;
/// Key updates accepted between two records of application data (rustls and BoringSSL allow
/// as many).
pub(crate) const MAX_KEY_UPDATES: u32 = 32;
/// Records in a row that carry nothing (empty application data, user_canceled alerts).
pub(crate) const MAX_EMPTY_RECORDS: u32 = 32;

pub(crate) const CONTENT_ALERT: u8 = 21;
pub(crate) const CONTENT_HANDSHAKE: u8 = 22;
pub(crate) const CONTENT_APPLICATION_DATA: u8 = 23;
pub(crate) const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
pub(crate) const HANDSHAKE_KEY_UPDATE: u8 = 24;

/// Alert descriptions (RFC 8446 §6).
pub(crate) mod alert {
    pub(crate) const CLOSE_NOTIFY: u8 = 0;
    pub(crate) const UNEXPECTED_MESSAGE: u8 = 10;
    pub(crate) const BAD_RECORD_MAC: u8 = 20;
    pub(crate) const RECORD_OVERFLOW: u8 = 22;
    pub(crate) const ILLEGAL_PARAMETER: u8 = 47;
    pub(crate) const DECODE_ERROR: u8 = 50;
    pub(crate) const INTERNAL_ERROR: u8 = 80;
    pub(crate) const USER_CANCELED: u8 = 90;
}

/// Why reading failed, and the alert that tells the peer (none when the peer's alert or the
/// transport ended the connection).
#[derive(Debug)]
pub(crate) struct Fatal {
    pub(crate) kind: io::ErrorKind,
    pub(crate) message: String,
    pub(crate) alert: Option<u8>,
    /// The fatal alert the peer sent, if that is what ended the connection.
    pub(crate) received: Option<u8>,
}

impl Fatal {
    /// The peer broke the protocol: we answer with `alert`.
    pub(crate) fn protocol(alert: u8, message: impl Into<String>) -> Self {
        Self {
            kind: io::ErrorKind::InvalidData,
            message: format!(
                "{} (sent alert {:?})",
                message.into(),
                rustls::AlertDescription::from(alert)
            ),
            alert: Some(alert),
            received: None,
        }
    }

    /// A failure on our side while reading (key derivation, sequence numbers).
    pub(crate) fn internal(e: io::Error) -> Self {
        Self::protocol(alert::INTERNAL_ERROR, e.to_string())
    }

    /// The transport failed or ended: nothing to tell the peer.
    pub(crate) fn transport(e: io::Error) -> Self {
        Self {
            kind: e.kind(),
            message: e.to_string(),
            alert: None,
            received: None,
        }
    }

    /// The error a reader gets: a received alert as rustls' own error for it (what
    /// tokio-rustls' stream gives too), so callers can tell which alert it was.
    pub(crate) fn error(&self) -> io::Error {
        match self.received {
            Some(d) => io::Error::new(
                self.kind,
                rustls::Error::AlertReceived(rustls::AlertDescription::from(d)),
            ),
            None => io::Error::new(self.kind, self.message.clone()),
        }
    }
}

/// What opening the next buffered record gave.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opened {
    /// No complete record is buffered.
    Incomplete,
    /// Application data, now in [`Rx::plain`].
    Data,
    /// A record for the record layer alone (empty data, a session ticket, part of a handshake
    /// message, user_canceled).
    Control,
    /// The peer switched to its next key; `requested`: it asks us to switch too.
    KeyUpdate { requested: bool },
    /// close_notify: the end of the peer's data.
    Closed,
}

/// The receiving direction: `buf` holds what was read from the socket. `plain` is decrypted
/// application data not yet read, `start..` bytes not yet decrypted. The buffer is let go
/// whenever everything in it has been read and the socket has nothing more, so an idle
/// connection holds no buffer.
pub(crate) struct Rx {
    pub(crate) cipher: Cipher,
    pub(crate) buf: BytesMut,
    pub(crate) plain: Range<usize>,
    start: usize,
    /// The peer sent close_notify: end of stream.
    pub(crate) closed: bool,
    /// The beginning of a handshake message whose rest is in records still to come.
    partial: Vec<u8>,
    /// Key updates since the last record of application data.
    key_updates: u32,
    /// Records in a row that carried nothing.
    empty: u32,
    /// Key updates followed since the handshake (for tests and statistics).
    pub(crate) updates_followed: u64,
}

impl Rx {
    /// Starts with what the handshake read past its end: application data that came with it,
    /// then whatever followed it.
    pub(crate) fn new(cipher: Cipher, plaintext: &[u8], ciphertext: &[u8]) -> Self {
        let mut buf = BytesMut::new();
        if plaintext.len() + ciphertext.len() > 0 {
            buf.reserve(plaintext.len() + ciphertext.len() + READ_BUFFER);
            buf.extend_from_slice(plaintext);
            buf.extend_from_slice(ciphertext);
        }
        Self {
            cipher,
            buf,
            plain: 0..plaintext.len(),
            start: plaintext.len(),
            closed: false,
            partial: Vec::new(),
            key_updates: 0,
            empty: 0,
            updates_followed: 0,
        }
    }

    /// Bytes of a record started but not complete.
    pub(crate) fn mid_record(&self) -> bool {
        self.start < self.buf.len() || !self.partial.is_empty()
    }

    /// Makes room for a socket read and lends the buffer for it. Called only when no
    /// decrypted data is waiting and no complete record is buffered (so what is not decrypted
    /// yet is less than a record).
    pub(crate) fn room(&mut self) -> &mut BytesMut {
        self.plain = 0..0;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        if self.buf.capacity() - self.buf.len() < MAX_RECORD {
            // Less than a record's room left: the partial record moves to the front.
            self.buf.advance(self.start);
            self.start = 0;
        }
        // The handshake may have left more than a read buffer's worth: then there is room
        // already.
        self.buf.reserve(READ_BUFFER.saturating_sub(self.buf.len()));
        &mut self.buf
    }

    /// After a read that found nothing: an empty buffer is let go.
    pub(crate) fn idle(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// Decrypts and handles the next buffered record if it is complete.
    pub(crate) fn open_record(&mut self, kernel: &mut Kernel) -> Result<Opened, Fatal> {
        let available = &self.buf[self.start..];
        let Some(header) = available.get(..HEADER) else {
            return Ok(Opened::Incomplete);
        };
        let header = [header[0], header[1], header[2], header[3], header[4]];
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if header[0] != CONTENT_APPLICATION_DATA {
            return Err(Fatal::protocol(
                alert::UNEXPECTED_MESSAGE,
                format!("TLS record of type {} after the handshake", header[0]),
            ));
        }
        if len > MAX_BODY {
            return Err(Fatal::protocol(
                alert::RECORD_OVERFLOW,
                format!("TLS record of {len} bytes (at most {MAX_BODY})"),
            ));
        }
        if len < TAG {
            return Err(Fatal::protocol(
                alert::BAD_RECORD_MAC,
                format!("TLS record of {len} bytes, too short to authenticate"),
            ));
        }
        if available.len() < HEADER + len {
            return Ok(Opened::Incomplete);
        }
        let body = self.start + HEADER..self.start + HEADER + len;
        self.start = body.end;
        let plain = self
            .cipher
            .open(header, &mut self.buf[body.clone()])
            .map_err(Fatal::internal)?
            .ok_or_else(|| {
                Fatal::protocol(alert::BAD_RECORD_MAC, "TLS record failed authentication")
            })?;
        // The content type is the last byte that is not padding.
        let Some(at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(Fatal::protocol(
                alert::UNEXPECTED_MESSAGE,
                "TLS record without a content type",
            ));
        };
        let content_type = plain[at];
        let content = body.start..body.start + at;
        if !self.partial.is_empty() && content_type != CONTENT_HANDSHAKE {
            return Err(Fatal::protocol(
                alert::UNEXPECTED_MESSAGE,
                format!("TLS record of type {content_type} inside a split handshake message"),
            ));
        }
        match content_type {
            CONTENT_APPLICATION_DATA if content.is_empty() => self.nothing(),
            CONTENT_APPLICATION_DATA => {
                self.key_updates = 0;
                self.empty = 0;
                self.plain = content;
                Ok(Opened::Data)
            }
            CONTENT_ALERT => match self.buf[content] {
                [_, alert::CLOSE_NOTIFY] => {
                    self.closed = true;
                    Ok(Opened::Closed)
                }
                // A closure alert that close_notify should follow (RFC 8446 §6.1).
                [_, alert::USER_CANCELED] => self.nothing(),
                [_, description] => Err(Fatal {
                    kind: io::ErrorKind::ConnectionAborted,
                    message: format!(
                        "received fatal TLS alert: {:?}",
                        rustls::AlertDescription::from(description)
                    ),
                    alert: None,
                    received: Some(description),
                }),
                _ => Err(Fatal::protocol(alert::DECODE_ERROR, "malformed TLS alert")),
            },
            CONTENT_HANDSHAKE if content.is_empty() => Err(Fatal::protocol(
                alert::UNEXPECTED_MESSAGE,
                "empty TLS handshake record",
            )),
            CONTENT_HANDSHAKE => {
                self.empty = 0;
                self.post_handshake(kernel, content)
            }
            other => Err(Fatal::protocol(
                alert::UNEXPECTED_MESSAGE,
                format!("TLS content type {other} after the handshake"),
            )),
        }
    }

    /// A record that carried nothing: counted, to refuse an endless run of them.
    fn nothing(&mut self) -> Result<Opened, Fatal> {
        self.empty += 1;
        if self.empty > MAX_EMPTY_RECORDS {
            return Err(Fatal::protocol(
                alert::UNEXPECTED_MESSAGE,
                format!("more than {MAX_EMPTY_RECORDS} TLS records in a row without data"),
            ));
        }
        Ok(Opened::Control)
    }

    /// Handshake messages after the handshake, in the record's `content` and, for a message
    /// split across records, the ones before: key updates, and session tickets (ignored: we do
    /// not resume sessions).
    fn post_handshake(
        &mut self,
        kernel: &mut Kernel,
        content: Range<usize>,
    ) -> Result<Opened, Fatal> {
        let mut messages = std::mem::take(&mut self.partial);
        messages.extend_from_slice(&self.buf[content]);
        let mut rest = &messages[..];
        let mut update = None;
        while let [kind, a, b, c, body @ ..] = rest {
            let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            if len > MAX_HANDSHAKE_MESSAGE {
                return Err(Fatal::protocol(
                    alert::DECODE_ERROR,
                    format!("TLS handshake message of {len} bytes"),
                ));
            }
            let Some(body) = body.get(..len) else {
                break;
            };
            rest = &rest[4 + len..];
            match (*kind, body) {
                (HANDSHAKE_KEY_UPDATE, [requested]) => {
                    let requested = match requested {
                        0 => false,
                        1 => true,
                        _ => {
                            return Err(Fatal::protocol(
                                alert::ILLEGAL_PARAMETER,
                                format!("TLS KeyUpdate request {requested}"),
                            ))
                        }
                    };
                    // A key change: nothing of the old key's may follow (RFC 8446 §5.1).
                    if !rest.is_empty() {
                        return Err(Fatal::protocol(
                            alert::UNEXPECTED_MESSAGE,
                            "TLS KeyUpdate not at the end of its record",
                        ));
                    }
                    update = Some(requested);
                }
                (HANDSHAKE_KEY_UPDATE, _) => {
                    return Err(Fatal::protocol(
                        alert::DECODE_ERROR,
                        "malformed TLS KeyUpdate",
                    ))
                }
                (HANDSHAKE_NEW_SESSION_TICKET, _) if kernel.is_client() => {}
                (kind, _) => {
                    return Err(Fatal::protocol(
                        alert::UNEXPECTED_MESSAGE,
                        format!("TLS handshake message {kind} after the handshake"),
                    ))
                }
            }
        }
        self.partial = rest.to_vec();
        let Some(requested) = update else {
            return Ok(Opened::Control);
        };
        self.key_updates += 1;
        if self.key_updates > MAX_KEY_UPDATES {
            return Err(Fatal::protocol(
                alert::UNEXPECTED_MESSAGE,
                format!("more than {MAX_KEY_UPDATES} TLS key updates without data"),
            ));
        }
        self.cipher =
            Cipher::new(kernel.update_rx().map_err(Fatal::internal)?).map_err(Fatal::internal)?;
        self.updates_followed += 1;
        Ok(Opened::KeyUpdate { requested })
    }

    /// Capacity held by the buffers (for tests).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.buf.capacity() + self.partial.capacity()
    }
}

/// The sending direction: sealed records in `out`, of which `sent` bytes are written.
pub(crate) struct Tx {
    pub(crate) cipher: Cipher,
    /// Records to seal with one key (the cipher's confidentiality limit).
    pub(crate) limit: u64,
    pub(crate) out: Vec<u8>,
    pub(crate) sent: usize,
    /// close_notify or a fatal alert is sealed: no more records.
    pub(crate) closed: bool,
    /// The peer asked for a key update that we have not answered yet.
    answer_owed: bool,
    /// We answered a key update request since our last application data: further requests
    /// until then need no answer (RFC 8446 §4.6.3: a side that is silent answers several
    /// requests with a single update).
    answered_since_data: bool,
}

impl Tx {
    pub(crate) fn new(cipher: Cipher, limit: u64) -> Self {
        Self {
            cipher,
            limit,
            out: Vec::new(),
            sent: 0,
            closed: false,
            answer_owed: false,
            answered_since_data: false,
        }
    }

    pub(crate) fn pending(&self) -> usize {
        self.out.len() - self.sent
    }

    /// The peer asked us to update our sending key.
    pub(crate) fn key_update_requested(&mut self) {
        if !self.answered_since_data && !self.closed {
            self.answer_owed = true;
        }
    }

    /// Seals the answer to the peer's key update if one is owed.
    pub(crate) fn answer(&mut self, kernel: &mut Kernel) -> io::Result<()> {
        if self.answer_owed && !self.closed {
            self.key_update(kernel, false)?;
            self.answered_since_data = true;
        }
        Ok(())
    }

    /// Seals up to [`WRITE_BATCH`] bytes of `bufs` into records; returns how many it took.
    pub(crate) fn seal_data(
        &mut self,
        kernel: &mut Kernel,
        bufs: &[IoSlice<'_>],
    ) -> io::Result<usize> {
        let total = bufs.iter().map(|b| b.len()).sum::<usize>().min(WRITE_BATCH);
        if total == 0 {
            return Ok(0);
        }
        // Our answer to the peer's key update precedes our next data (RFC 8446 §4.6.3).
        self.answer(kernel)?;
        let records = total.div_ceil(MAX_PLAINTEXT);
        self.out.reserve(total + records * (HEADER + 1 + TAG));
        let mut parts = bufs.iter().map(|b| &b[..]);
        let mut part: &[u8] = &[];
        let mut taken = 0;
        while taken < total {
            if self.cipher.seq.saturating_add(1) >= self.limit {
                self.key_update(kernel, false)?;
            }
            let at = self.out.len();
            self.out
                .extend_from_slice(&[CONTENT_APPLICATION_DATA, 3, 3, 0, 0]);
            let mut want = (total - taken).min(MAX_PLAINTEXT);
            taken += want;
            while want > 0 {
                if part.is_empty() {
                    part = parts.next().unwrap_or_default();
                    continue;
                }
                let n = want.min(part.len());
                self.out.extend_from_slice(&part[..n]);
                part = &part[n..];
                want -= n;
            }
            self.out.push(CONTENT_APPLICATION_DATA);
            self.seal_record(at)?;
        }
        self.answered_since_data = false;
        Ok(taken)
    }

    /// Seals one record of a content type other than application data.
    pub(crate) fn seal_control(&mut self, content_type: u8, body: &[u8]) -> io::Result<()> {
        let at = self.out.len();
        self.out
            .extend_from_slice(&[CONTENT_APPLICATION_DATA, 3, 3, 0, 0]);
        self.out.extend_from_slice(body);
        self.out.push(content_type);
        self.seal_record(at)
    }

    /// Seals an alert and closes the sending direction: nothing may follow it.
    pub(crate) fn seal_alert(&mut self, description: u8) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        // TLS 1.3 sends every alert but close_notify as fatal (RFC 8446 §6).
        let level = if description == alert::CLOSE_NOTIFY {
            1
        } else {
            2
        };
        self.seal_control(CONTENT_ALERT, &[level, description])
    }

    /// Encrypts the record whose header starts at `at` and whose inner plaintext (content,
    /// content type, padding) follows it up to the end of `out`.
    pub(crate) fn seal_record(&mut self, at: usize) -> io::Result<()> {
        let len = self.out.len() - at - HEADER + TAG;
        let len = u16::try_from(len).map_err(|_| io::Error::other("TLS record too long"))?;
        self.out[at + 3..at + HEADER].copy_from_slice(&len.to_be_bytes());
        let header = [
            self.out[at],
            self.out[at + 1],
            self.out[at + 2],
            self.out[at + 3],
            self.out[at + 4],
        ];
        let nonce = self.cipher.next_nonce()?;
        let tag = self
            .cipher
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut self.out[at + HEADER..])
            .map_err(|_| io::Error::other("TLS encryption failed"))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Tells the peer our next records use fresh keys (asking it to update too, if
    /// `request`), then switches to them.
    pub(crate) fn key_update(&mut self, kernel: &mut Kernel, request: bool) -> io::Result<()> {
        self.seal_control(
            CONTENT_HANDSHAKE,
            &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, u8::from(request)],
        )?;
        self.cipher = Cipher::new(kernel.update_tx()?)?;
        // Any update of ours after the peer's request answers it.
        self.answer_owed = false;
        Ok(())
    }

    /// After everything sealed is written: an idle connection keeps no buffer.
    pub(crate) fn all_sent(&mut self) {
        self.out = Vec::new();
        self.sent = 0;
    }
}
