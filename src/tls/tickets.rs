//! TLS session tickets that survive restarts, and a fleet.
//!
//! Every ticket key derives from one 32-byte secret and the current 12-hour
//! period: key = HMAC-SHA256(secret, "gracesrv ticket key" ‖ period). Any
//! process holding the secret computes the same key at the same time, so:
//! - a new generation (or a supervisor's new worker) is handed the secret
//!   (`GRACESRV_TICKET_SECRET`) and decrypts the tickets the old one issued;
//! - keys rotate every 12 hours without anyone coordinating, and a ticket of
//!   the previous period is still accepted (so a ticket lives 12 to 24 h);
//! - `tls_tickets: { key_file: FILE }` makes the secret the SHA-256 of the
//!   file (e.g. `openssl rand 80 > FILE`, nginx's format, works as is), so
//!   machines behind one load balancer resume each other's sessions.
//!
//! A ticket is `period (8 bytes) ‖ nonce (12) ‖ AES-256-GCM(state)`.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::hmac;

/// How long one key encrypts new tickets.
const PERIOD: u64 = 12 * 3600;

pub(crate) struct Tickets {
    secret: [u8; 32],
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tickets")
    }
}

/// Why there is no ticket secret.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TicketError {
    #[error("no randomness for ticket keys")]
    NoRandomness,
    #[error("holds {0} bytes; a ticket key file needs at least 32 random bytes (openssl rand 80 > FILE)")]
    ShortKeyFile(usize),
}

impl Tickets {
    /// A fresh random secret (the first generation of a service).
    pub(crate) fn random() -> Result<Tickets, TicketError> {
        let mut secret = [0u8; 32];
        aws_lc_rs::rand::fill(&mut secret).map_err(|_| TicketError::NoRandomness)?;
        Ok(Tickets { secret })
    }

    /// The secret of a key file: the SHA-256 of its contents (at least 32
    /// bytes, so that it holds enough randomness).
    pub(crate) fn from_key_file(bytes: &[u8]) -> Result<Tickets, TicketError> {
        if bytes.len() < 32 {
            return Err(TicketError::ShortKeyFile(bytes.len()));
        }
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
        let mut secret = [0u8; 32];
        secret.copy_from_slice(digest.as_ref());
        Ok(Tickets { secret })
    }

    /// The secret as handed over (hex), if well-formed.
    pub(crate) fn from_hex(hex: &str) -> Option<Tickets> {
        let hex = hex.trim();
        if hex.len() != 64 {
            return None;
        }
        let mut secret = [0u8; 32];
        for (i, b) in secret.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Tickets { secret })
    }

    /// The secret, for the next process's environment.
    pub(crate) fn to_hex(&self) -> String {
        self.secret.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A key derived from the secret for `label`: HMAC-SHA256(secret,
    /// label). The ticket keys, and HTTP/3's keys (connection IDs,
    /// stateless resets, address tokens), so every generation agrees.
    pub(crate) fn derive(&self, label: &[u8]) -> [u8; 32] {
        let mac = hmac::Key::new(hmac::HMAC_SHA256, &self.secret);
        let tag = hmac::sign(&mac, label);
        let mut out = [0u8; 32];
        out.copy_from_slice(&tag.as_ref()[..32]);
        out
    }

    fn key(&self, period: u64) -> Option<LessSafeKey> {
        let mut msg = b"gracesrv ticket key".to_vec();
        msg.extend_from_slice(&period.to_be_bytes());
        UnboundKey::new(&AES_256_GCM, &self.derive(&msg))
            .ok()
            .map(LessSafeKey::new)
    }
}

fn period_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        / PERIOD
}

impl rustls::server::ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        PERIOD as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let period = period_now();
        let key = self.key(period)?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut sealed = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&period.to_be_bytes()),
            &mut sealed,
        )
        .ok()?;
        let mut ticket = Vec::with_capacity(8 + NONCE_LEN + sealed.len());
        ticket.extend_from_slice(&period.to_be_bytes());
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let period = u64::from_be_bytes(cipher.get(..8)?.try_into().ok()?);
        let now = period_now();
        if period != now && period.checked_add(1) != Some(now) {
            return None;
        }
        let nonce: [u8; NONCE_LEN] = cipher.get(8..8 + NONCE_LEN)?.try_into().ok()?;
        let mut sealed = cipher.get(8 + NONCE_LEN..)?.to_vec();
        let key = self.key(period)?;
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&period.to_be_bytes()),
                &mut sealed,
            )
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    #[test]
    fn a_ticket_opens_with_the_same_secret_only() {
        let a = Tickets::random().unwrap();
        let t = a.encrypt(b"session state").unwrap();
        let handed = Tickets::from_hex(&a.to_hex()).unwrap();
        assert_eq!(handed.decrypt(&t).as_deref(), Some(&b"session state"[..]));
        let other = Tickets::random().unwrap();
        assert_eq!(other.decrypt(&t), None);
        let mut tampered = t.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(a.decrypt(&tampered), None);
        assert_eq!(a.decrypt(&t[..10]), None);
        assert_eq!(a.decrypt(&[]), None);
        // A ticket of an older period is refused.
        let mut old = t.clone();
        old[..8].copy_from_slice(&(period_now() - 2).to_be_bytes());
        assert_eq!(a.decrypt(&old), None);
        let file = [7u8; 80];
        let (x, y) = (
            Tickets::from_key_file(&file).unwrap(),
            Tickets::from_key_file(&file).unwrap(),
        );
        assert_eq!(
            y.decrypt(&x.encrypt(b"s").unwrap()).as_deref(),
            Some(&b"s"[..])
        );
        assert!(Tickets::from_key_file(&[1; 16]).is_err());
        assert!(Tickets::from_hex("zz").is_none());
    }
}
