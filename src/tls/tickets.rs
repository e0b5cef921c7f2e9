//! TLS session tickets that survive restarts, and a fleet.
//!
//! A process holds one 32-byte secret. Without a shared store, every ticket
//! key derives from it and the current 12-hour period: key =
//! HMAC-SHA256(secret, "gracesrv ticket key" ‖ period). Any process holding
//! the secret computes the same key at the same time, so:
//! - a new generation (or a supervisor's new worker) is handed the secret
//!   (`GRACESRV_TICKET_SECRET`) and decrypts the tickets the old one issued;
//! - keys rotate every 12 hours without anyone coordinating, and a ticket of
//!   the previous period is still accepted (so a ticket lives 12 to 24 h);
//! - `tls_tickets: { key_file: FILE }` makes the secret the SHA-256 of the
//!   file (e.g. `openssl rand 80 > FILE`, nginx's format, works as is), so
//!   machines behind one load balancer resume each other's sessions.
//!
//! With `tls_tickets: { storage: redis://... }` the keys are random, one per
//! period, in the store (`tickets:PERIOD`): whichever host comes first for a
//! period writes it (`SET NX`), every host reads it ([`share`]), the next
//! period's key is fetched ahead (so a store down for up to 12 hours changes
//! nothing), and the previous period's is kept to decrypt. A compromised
//! key opens 24 hours of tickets, not every ticket ever issued. The keys a
//! process has are handed to its next generation with the secret, so a
//! restart with the store down keeps them. A period the store could not
//! give a key for falls back to the derived key (that host's tickets then
//! resume on that host only).
//!
//! A ticket is `kind (1) ‖ period (8) ‖ nonce (12) ‖ AES-256-GCM(state)`,
//! the first nine bytes as associated data; kind 0 is a derived key, 1 a
//! shared one.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::hmac;

/// How long one key encrypts new tickets.
const PERIOD: u64 = 12 * 3600;

pub(crate) struct Tickets {
    secret: [u8; 32],
    /// The fleet's keys (period, key), from the store or handed over.
    shared: std::sync::RwLock<Vec<(u64, [u8; 32])>>,
}

/// A ticket sealed with a key derived from the secret.
const DERIVED: u8 = 0;
/// A ticket sealed with a fleet key from the store.
const SHARED: u8 = 1;
/// The header of a ticket: kind and period.
const HEADER: usize = 9;

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
        Ok(Tickets::new(secret))
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
        Ok(Tickets::new(secret))
    }

    fn new(secret: [u8; 32]) -> Tickets {
        Tickets {
            secret,
            shared: std::sync::RwLock::new(Vec::new()),
        }
    }

    /// The secret and fleet keys as handed over (`SECRET;PERIOD:KEY;...`,
    /// hex), if well-formed.
    pub(crate) fn from_handover(text: &str) -> Option<Tickets> {
        let mut parts = text.trim().split(';');
        let tickets = Tickets::new(from_hex(parts.next()?)?);
        for part in parts {
            let (period, key) = part.split_once(':')?;
            tickets.adopt(period.parse().ok()?, from_hex(key)?);
        }
        Some(tickets)
    }

    /// The secret and fleet keys, for the next process's environment.
    pub(crate) fn handover(&self) -> String {
        let mut out = hex(&self.secret);
        for (period, key) in self.shared.read().unwrap_or_else(|p| p.into_inner()).iter() {
            out.push_str(&format!(";{period}:{}", hex(key)));
        }
        out
    }

    /// Takes `key` as the fleet's key of `period` (keeping the periods
    /// around now only).
    fn adopt(&self, period: u64, key: [u8; 32]) {
        let now = period_now();
        let mut shared = self.shared.write().unwrap_or_else(|p| p.into_inner());
        shared.retain(|(p, _)| *p != period && p.saturating_add(1) >= now && *p <= now + 1);
        if period.saturating_add(1) >= now && period <= now + 1 {
            shared.push((period, key));
        }
    }

    /// For `status`: the periods whose fleet key this process has, and
    /// whether new tickets are sealed with the fleet's key now.
    pub(crate) fn json(&self) -> serde_json::Value {
        let shared = self.shared.read().unwrap_or_else(|p| p.into_inner());
        let mut periods: Vec<u64> = shared.iter().map(|(p, _)| *p).collect();
        periods.sort_unstable();
        let now = period_now();
        serde_json::json!({
            "period": now,
            "shared_periods": periods,
            "issuing_with": if periods.contains(&now) { "shared" } else { "derived" },
        })
    }

    fn shared_key(&self, period: u64) -> Option<LessSafeKey> {
        let shared = self.shared.read().unwrap_or_else(|p| p.into_inner());
        let (_, key) = shared.iter().find(|(p, _)| *p == period)?;
        UnboundKey::new(&AES_256_GCM, key)
            .ok()
            .map(LessSafeKey::new)
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

    fn derived_key(&self, period: u64) -> Option<LessSafeKey> {
        let mut msg = b"gracesrv ticket key".to_vec();
        msg.extend_from_slice(&period.to_be_bytes());
        UnboundKey::new(&AES_256_GCM, &self.derive(&msg))
            .ok()
            .map(LessSafeKey::new)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
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
        let (kind, key) = match self.shared_key(period) {
            Some(key) => (SHARED, key),
            None => (DERIVED, self.derived_key(period)?),
        };
        let mut header = [0u8; HEADER];
        header[0] = kind;
        header[1..].copy_from_slice(&period.to_be_bytes());
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut sealed = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&header),
            &mut sealed,
        )
        .ok()?;
        let mut ticket = Vec::with_capacity(HEADER + NONCE_LEN + sealed.len());
        ticket.extend_from_slice(&header);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let header: [u8; HEADER] = cipher.get(..HEADER)?.try_into().ok()?;
        let period = u64::from_be_bytes(header[1..].try_into().ok()?);
        let now = period_now();
        let key = match header[0] {
            // The previous period's, or (from a host whose clock is ahead)
            // the next one's.
            SHARED if period.saturating_add(1) >= now && period <= now + 1 => {
                self.shared_key(period)?
            }
            DERIVED if period == now || period.checked_add(1) == Some(now) => {
                self.derived_key(period)?
            }
            _ => return None,
        };
        let nonce: [u8; NONCE_LEN] = cipher.get(HEADER..HEADER + NONCE_LEN)?.try_into().ok()?;
        let mut sealed = cipher.get(HEADER + NONCE_LEN..)?.to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&header),
                &mut sealed,
            )
            .ok()?;
        Some(plain.to_vec())
    }
}

/// Keeps `tickets`' fleet keys in step with `store` for as long as it runs:
/// the previous, current and next period's keys, each written by whichever
/// host comes first, looked at again every minute (every 2 s while the
/// store does not answer).
pub(crate) async fn share(
    tickets: std::sync::Arc<Tickets>,
    store: std::sync::Arc<crate::store::Store>,
) {
    loop {
        let now = period_now();
        let mut done = true;
        for period in [now.saturating_sub(1), now, now + 1] {
            let name = format!("tickets:{period}");
            let mut mine = [0u8; 32];
            if aws_lc_rs::rand::fill(&mut mine).is_err() {
                done = false;
                break;
            }
            // Lives as long as a ticket of it may be presented.
            let ttl = std::time::Duration::from_secs(3 * PERIOD);
            let answer = match store
                .set(&name, hex(&mine).as_bytes(), Some(ttl), true)
                .await
            {
                Ok(_) => store.get(&name).await,
                Err(e) => Err(e),
            };
            match answer {
                Ok(Some(v)) => match std::str::from_utf8(&v).ok().and_then(from_hex) {
                    Some(key) => tickets.adopt(period, key),
                    None => tracing::warn!(
                        store = store.shown(),
                        key = name,
                        "not a ticket key; left alone"
                    ),
                },
                Ok(None) => {}
                Err(e) => {
                    store.complain("ticket key", &e);
                    done = false;
                    break;
                }
            }
        }
        // Soon again after a failure (the store away, a master being
        // replaced): the keys of now are what a fleet resumes with.
        let again = if done { 60 } else { 2 };
        tokio::time::sleep(std::time::Duration::from_secs(again)).await;
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
        let handed = Tickets::from_handover(&a.handover()).unwrap();
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
        old[1..HEADER].copy_from_slice(&(period_now() - 2).to_be_bytes());
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
        assert!(Tickets::from_handover("zz").is_none());
    }

    #[test]
    fn fleet_keys_are_used_handed_over_and_kept_to_the_periods_around_now() {
        let now = period_now();
        let (a, b) = (Tickets::random().unwrap(), Tickets::random().unwrap());
        // Different secrets: only a shared key lets b open a's ticket.
        let t = a.encrypt(b"s").unwrap();
        assert_eq!(b.decrypt(&t), None);
        a.adopt(now, [9; 32]);
        b.adopt(now, [9; 32]);
        let t = a.encrypt(b"s").unwrap();
        assert_eq!(t[0], SHARED);
        assert_eq!(b.decrypt(&t).as_deref(), Some(&b"s"[..]));
        // Handed over with the secret.
        let c = Tickets::from_handover(&a.handover()).unwrap();
        assert_eq!(c.decrypt(&t).as_deref(), Some(&b"s"[..]));
        // Periods far from now are not kept.
        a.adopt(now - 5, [1; 32]);
        a.adopt(now + 1, [2; 32]);
        a.adopt(now - 1, [3; 32]);
        let mut kept: Vec<u64> = a.shared.read().unwrap().iter().map(|(p, _)| *p).collect();
        kept.sort();
        assert_eq!(kept, vec![now - 1, now, now + 1]);
        // A new key for a period replaces the old one.
        a.adopt(now, [4; 32]);
        assert_eq!(a.decrypt(&t), None);
    }
}
