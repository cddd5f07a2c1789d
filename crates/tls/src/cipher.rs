//! Traffic keys: what rustls hands over after the handshake, one direction's AEAD key with its
//! record sequence number, and the key schedule that derives the next keys (RFC 8446 §7.2).

use std::io;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, SupportedCipherSuite};
use zeroize::Zeroize;

use crate::tls_error;

/// What rustls leaves after the handshake: the key schedule, for key updates.
pub(crate) enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

/// A sequence number and the keys that start there.
pub(crate) type Secrets = (u64, ConnectionTrafficSecrets);

impl Kernel {
    pub(crate) fn suite(&self) -> SupportedCipherSuite {
        match self {
            Self::Client(k) => k.negotiated_cipher_suite(),
            Self::Server(k) => k.negotiated_cipher_suite(),
        }
    }

    pub(crate) fn is_client(&self) -> bool {
        matches!(self, Self::Client(_))
    }

    /// The next sending keys (rustls drops and wipes the traffic secret they replace).
    pub(crate) fn update_tx(&mut self) -> io::Result<Secrets> {
        match self {
            Self::Client(k) => k.update_tx_secret(),
            Self::Server(k) => k.update_tx_secret(),
        }
        .map_err(tls_error)
    }

    /// The next receiving keys.
    pub(crate) fn update_rx(&mut self) -> io::Result<Secrets> {
        match self {
            Self::Client(k) => k.update_rx_secret(),
            Self::Server(k) => k.update_rx_secret(),
        }
        .map_err(tls_error)
    }
}

/// One direction's AEAD key and record sequence number.
///
/// Old keys do not outlive their use: rustls wipes the raw key bytes it hands over when they
/// are dropped (its `AeadKey`), and the traffic secrets it keeps. Our copy of the IV is wiped
/// here. ring's expanded key (AES round keys and GHASH table, or the ChaCha20 key) cannot be
/// wiped through ring's API, so it is overwritten instead: by the next key, which a key update
/// moves into the same place, and by a key expanded from zeros when the connection ends. What
/// stays unwiped: copies that ring or the compiler make on the stack while a key is built, and
/// rustls' copy of each IV (its `Iv` type is not wiped on drop).
pub(crate) struct Cipher {
    pub(crate) key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    pub(crate) seq: u64,
}

impl Cipher {
    pub(crate) fn new((seq, secrets): Secrets) -> io::Result<Self> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(io::Error::other("unsupported TLS cipher suite")),
        };
        let key = UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| io::Error::other("bad TLS traffic key"))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| io::Error::other("bad TLS traffic IV"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The nonce of the next record (RFC 8446 §5.3), counting it.
    pub(crate) fn next_nonce(&mut self) -> io::Result<Nonce> {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| io::Error::other("TLS record sequence number exhausted"))?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }

    /// Decrypts `body` in place with the record `header` as additional data; the plaintext.
    pub(crate) fn open<'b>(
        &mut self,
        header: [u8; 5],
        body: &'b mut [u8],
    ) -> io::Result<Option<&'b mut [u8]>> {
        let nonce = self.next_nonce()?;
        Ok(self.key.open_in_place(nonce, Aad::from(header), body).ok())
    }
}

impl Drop for Cipher {
    fn drop(&mut self) {
        self.iv.zeroize();
        let algorithm = self.key.algorithm();
        if let Ok(zero) = UnboundKey::new(algorithm, &[0u8; 32][..algorithm.key_len()]) {
            self.key = LessSafeKey::new(zero);
            // The overwrite is what this is for: keep it from being optimised away as a store
            // to memory about to be freed.
            std::hint::black_box(&self.key);
        }
    }
}
