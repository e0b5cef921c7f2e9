//! Values sealed at rest (`storage_key_file`): AES-256-GCM with a key
//! derived from the file, the value's key name as associated data (a value
//! copied under another key does not open), a random nonce per write.
//!
//! A sealed value is `MAGIC ‖ nonce (12) ‖ ciphertext ‖ tag`. `MAGIC`
//! starts with a zero byte, which no PEM or JSON value does, so a store
//! holding plain values is told apart from one holding sealed ones.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

const MAGIC: &[u8] = b"\0gracesrv-sealed-1";

#[derive(Debug, thiserror::Error)]
pub(crate) enum SealError {
    #[error("holds {0} bytes; a storage key file needs at least 32 random bytes (openssl rand 32 > FILE)")]
    ShortKeyFile(usize),
    #[error("does not open with this storage_key_file (sealed with another, or damaged)")]
    WrongKey,
    #[error("is sealed; this host needs the fleet's storage_key_file")]
    Sealed,
    #[error("is not sealed, and storage_key_file is set: refused (written without the key file?)")]
    NotSealed,
}

pub(crate) struct Sealer {
    key: LessSafeKey,
}

impl Sealer {
    /// The key of a key file: HMAC-SHA256 of its contents under a label
    /// (at least 32 bytes, so that it holds enough randomness).
    pub(crate) fn from_key_file(bytes: &[u8]) -> Result<Sealer, SealError> {
        if bytes.len() < 32 {
            return Err(SealError::ShortKeyFile(bytes.len()));
        }
        let mac = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, bytes);
        let tag = aws_lc_rs::hmac::sign(&mac, b"gracesrv storage key");
        let key = UnboundKey::new(&AES_256_GCM, tag.as_ref()).map_err(|_| SealError::WrongKey)?;
        Ok(Sealer {
            key: LessSafeKey::new(key),
        })
    }
}

/// How a store's values are written and read: sealed with a key, or plain.
pub(crate) struct Sealing(Option<Sealer>);

impl Sealing {
    pub(crate) fn new(sealer: Option<Sealer>) -> Sealing {
        Sealing(sealer)
    }

    /// `plain` as stored under `name`.
    pub(crate) fn seal(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        let Some(s) = &self.0 else {
            return plain.to_vec();
        };
        let mut nonce = [0u8; NONCE_LEN];
        // Without randomness there is nothing safe to write: an empty
        // value, which `open` refuses.
        if aws_lc_rs::rand::fill(&mut nonce).is_err() {
            return Vec::new();
        }
        let mut sealed = plain.to_vec();
        if s.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut sealed,
            )
            .is_err()
        {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + sealed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// The value stored under `name`, opened.
    pub(crate) fn open(&self, name: &str, stored: &[u8]) -> Result<Vec<u8>, SealError> {
        let sealed = stored.strip_prefix(MAGIC);
        match (&self.0, sealed) {
            (None, None) => Ok(stored.to_vec()),
            (None, Some(_)) => Err(SealError::Sealed),
            (Some(_), None) => Err(SealError::NotSealed),
            (Some(s), Some(rest)) => {
                let nonce: [u8; NONCE_LEN] = rest
                    .get(..NONCE_LEN)
                    .and_then(|n| n.try_into().ok())
                    .ok_or(SealError::WrongKey)?;
                let mut body = rest[NONCE_LEN..].to_vec();
                let plain = s
                    .key
                    .open_in_place(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(name.as_bytes()),
                        &mut body,
                    )
                    .map_err(|_| SealError::WrongKey)?;
                Ok(plain.to_vec())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_under_its_name_with_its_key_only() {
        let a = Sealing::new(Some(Sealer::from_key_file(&[1u8; 32]).unwrap()));
        let b = Sealing::new(Some(Sealer::from_key_file(&[2u8; 32]).unwrap()));
        let plain = Sealing::new(None);
        let v = a.seal("gracesrv:k", b"-----BEGIN PRIVATE KEY-----");
        assert!(
            !v.windows(10).any(|w| w == b"BEGIN PRIV"),
            "not in the clear"
        );
        assert_eq!(
            a.open("gracesrv:k", &v).unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        assert!(matches!(
            a.open("gracesrv:other", &v),
            Err(SealError::WrongKey)
        ));
        assert!(matches!(b.open("gracesrv:k", &v), Err(SealError::WrongKey)));
        assert!(matches!(
            plain.open("gracesrv:k", &v),
            Err(SealError::Sealed)
        ));
        assert!(matches!(
            a.open("gracesrv:k", b"plain"),
            Err(SealError::NotSealed)
        ));
        assert_eq!(plain.open("gracesrv:k", b"plain").unwrap(), b"plain");
        let mut damaged = v.clone();
        *damaged.last_mut().unwrap() ^= 1;
        assert!(matches!(
            a.open("gracesrv:k", &damaged),
            Err(SealError::WrongKey)
        ));
        assert!(matches!(
            a.open("gracesrv:k", MAGIC),
            Err(SealError::WrongKey)
        ));
        assert!(Sealer::from_key_file(&[0u8; 31]).is_err());
    }
}
