//! A lease: a lock in the store that lapses by itself. Taken with
//! `SET NX PX ttl` under a token only its holder knows, renewed every third
//! of its TTL while the holder works, released at the end. A holder that
//! dies stops renewing it, and the lock is free again within the TTL; a
//! holder that could not renew it for a whole TTL (the store unreachable)
//! gives up before it lapses, since another may take it then.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Store, StoreError};

/// Renews only the holder's own lease.
const RENEW: &str = r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("PEXPIRE", KEYS[1], ARGV[2]) else return 0 end"#;
/// Releases only the holder's own lease.
const RELEASE: &str = r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end"#;

pub(crate) struct Lease {
    store: Arc<Store>,
    key: String,
    token: String,
    ttl: Duration,
}

impl Lease {
    /// Takes the lease `name` for `ttl`, if nobody holds it. The token
    /// starts with who holds it (`store::holder`), for people reading the
    /// store.
    pub(crate) async fn take(
        store: &Arc<Store>,
        name: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let mut random = [0u8; 12];
        let _ = aws_lc_rs::rand::fill(&mut random);
        let token = format!(
            "{} {}",
            super::holder(),
            random
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let key = store.key(name);
        let taken: Option<String> = store
            .query(
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis() as u64),
            )
            .await?;
        Ok(taken.map(|_| Lease {
            store: store.clone(),
            key,
            token,
            ttl,
        }))
    }

    /// Renews the lease: `false` if it is not this holder's any more.
    async fn renew(&self) -> Result<bool, StoreError> {
        let ttl = self.ttl.as_millis().to_string();
        let n: i64 = self
            .store
            .script(
                &redis::Script::new(RENEW),
                &[&self.key],
                &[&self.token, &ttl],
            )
            .await?;
        Ok(n == 1)
    }

    /// Keeps the lease while the caller works; returns when it is lost:
    /// someone else holds it, or it could not be renewed for a whole TTL.
    pub(crate) async fn keep(&self) {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.ttl / 3).await;
            match self.renew().await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => return,
                // Before it lapses: past that, another may hold it.
                Err(_) if renewed.elapsed() >= self.ttl * 2 / 3 => return,
                Err(_) => {}
            }
        }
    }

    /// Gives the lease up (if still this holder's).
    pub(crate) async fn release(self) {
        let _ = self
            .store
            .script::<i64>(&redis::Script::new(RELEASE), &[&self.key], &[&self.token])
            .await;
    }
}
