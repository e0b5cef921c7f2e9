//! Server connection IDs that say which generation owns a connection.
//!
//! A CID is one AES-128 block (QUIC-LB's single-pass scheme): `"gs" ‖ pid
//! (4 bytes) ‖ 10 random bytes`, encrypted with a key every generation of
//! the service derives from the ticket secret (`tickets`). An observer sees
//! 16 random-looking bytes (RFC 9000 section 5.1 forbids CIDs that link a
//! connection's paths); any generation decrypts one and learns whose it is.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::cipher::{
    DecryptingKey, DecryptionContext, EncryptingKey, EncryptionContext, UnboundCipherKey, AES_128,
};
use quinn::{ConnectionId, ConnectionIdGenerator};

/// Length of every server CID gracesrv issues.
pub(crate) const LEN: usize = 16;
const MAGIC: &[u8; 2] = b"gs";

pub(crate) struct Key {
    enc: EncryptingKey,
    dec: DecryptingKey,
}

impl Key {
    /// The key, if aws-lc-rs makes one (it fails only without AES).
    pub(crate) fn new(secret: &[u8; 16]) -> Option<Key> {
        let key = || UnboundCipherKey::new(&AES_128, secret).ok();
        Some(Key {
            enc: EncryptingKey::ecb(key()?).ok()?,
            dec: DecryptingKey::ecb(key()?).ok()?,
        })
    }

    /// A new CID of generation `pid`.
    fn generate(&self, pid: u32) -> ConnectionId {
        let mut block = [0u8; LEN];
        block[..2].copy_from_slice(MAGIC);
        block[2..6].copy_from_slice(&pid.to_be_bytes());
        // Without randomness the CID would still be unique per call
        // (quinn retries on a collision), only guessable.
        let _ = aws_lc_rs::rand::fill(&mut block[6..]);
        let _ = self
            .enc
            .less_safe_encrypt(&mut block, EncryptionContext::None);
        ConnectionId::new(&block)
    }

    /// The generation that issued `cid`, if gracesrv did.
    pub(crate) fn owner(&self, cid: &[u8]) -> Option<u32> {
        let mut block: [u8; LEN] = cid.try_into().ok()?;
        self.dec.decrypt(&mut block, DecryptionContext::None).ok()?;
        (&block[..2] == MAGIC).then(|| u32::from_be_bytes([block[2], block[3], block[4], block[5]]))
    }
}

/// Where a datagram belongs, from its header.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Owner<'a> {
    /// This generation, or nobody's (quinn answers or drops it).
    Me,
    /// Another generation's connection.
    Generation(u32),
    /// A handshake's first flight: the client chose this CID.
    Client(&'a [u8]),
}

/// Whose is `datagram` (RFC 9000 section 17: a short header's destination CID
/// follows the first byte, and has our length; a long header's has its
/// length in front).
pub(crate) fn owner<'a>(key: &Key, me: u32, datagram: &'a [u8]) -> Owner<'a> {
    let Some(&first) = datagram.first() else {
        return Owner::Me;
    };
    let dcid = if first & 0x80 == 0 {
        match datagram.get(1..1 + LEN) {
            Some(d) => d,
            None => return Owner::Me,
        }
    } else {
        let Some(&len) = datagram.get(5) else {
            return Owner::Me;
        };
        match datagram.get(6..6 + len as usize) {
            Some(d) => d,
            None => return Owner::Me,
        }
    };
    match key.owner(dcid) {
        Some(pid) if pid == me => Owner::Me,
        Some(pid) => Owner::Generation(pid),
        None if first & 0x80 != 0 => Owner::Client(dcid),
        None => Owner::Me,
    }
}

/// The CIDs of one generation, for quinn.
pub(crate) struct Generator {
    pub(crate) key: Arc<Key>,
    pub(crate) pid: u32,
}

impl ConnectionIdGenerator for Generator {
    fn generate_cid(&mut self) -> ConnectionId {
        self.key.generate(self.pid)
    }

    fn cid_len(&self) -> usize {
        LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cid_names_its_generation_and_only_to_the_key() {
        let key = Key::new(&[7; 16]).unwrap();
        let a = key.generate(4242);
        let b = key.generate(4242);
        assert_ne!(a, b, "random part");
        assert_eq!(key.owner(&a), Some(4242));
        assert!(!a.windows(4).any(|w| w == 4242u32.to_be_bytes()));
        let other = Key::new(&[8; 16]).unwrap();
        assert_eq!(other.owner(&a), None);
        assert_eq!(
            key.owner(&[1, 2, 3, 4, 5, 6, 7, 8]),
            None,
            "a client's 8-byte CID"
        );
    }

    #[test]
    fn datagrams_are_routed_by_their_destination_cid() {
        let key = Key::new(&[1; 16]).unwrap();
        let theirs = key.generate(10);
        let mine = key.generate(20);
        let mut short = vec![0x40];
        short.extend_from_slice(&theirs);
        short.extend_from_slice(&[0; 30]);
        assert_eq!(owner(&key, 20, &short), Owner::Generation(10));
        short[1..17].copy_from_slice(&mine);
        assert_eq!(owner(&key, 20, &short), Owner::Me);
        // A long header (Initial) with a client-chosen CID of 8 bytes.
        let mut initial = vec![0xc0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0];
        assert_eq!(
            owner(&key, 20, &initial),
            Owner::Client(&[1, 2, 3, 4, 5, 6, 7, 8])
        );
        // A Handshake packet to another generation's CID.
        initial.truncate(5);
        initial.push(16);
        initial.extend_from_slice(&theirs);
        assert_eq!(owner(&key, 20, &initial), Owner::Generation(10));
        assert_eq!(owner(&key, 20, &[0x40, 1]), Owner::Me, "truncated");
        assert_eq!(owner(&key, 20, &[]), Owner::Me);
    }
}
