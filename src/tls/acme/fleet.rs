//! ACME shared by a fleet through a store (`acme.storage: redis://...`).
//!
//! The store holds what every host needs: the account
//! (`acme:account:DIRECTORY-HASH`), each certificate with its key in one
//! value (`acme:cert:NAMES`, so no reader sees a certificate without its
//! key), the orderers' records (`acme:status`), the pending challenge
//! answers (`acme:challenge:KIND:ID`, for ten minutes) and the order lock,
//! a lease (`acme:lock`, see `store::lease`). Keys and certificates are
//! sealed when `storage_key_file` is given.
//!
//! Each host keeps a copy in `acme.cache`, the directory a single host's
//! storage would be: the listeners load certificates from it and answer
//! challenges from it, so the store is never on the serving path, and a
//! host with the store down serves and restarts with what it has.
//!
//! - A certificate reaches every host within a minute: the orderer that got
//!   it publishes it (channel `acme`), every host's orderer looks at the
//!   store at least once a minute ([`Fleet::sync`]), copies a newer one into
//!   its cache and restarts to serve it. A host that renewed while the store
//!   was down puts its certificate back when the store returns.
//! - A challenge answer is written to the store and published; every host
//!   subscribed copies it into its cache and acknowledges it
//!   (`acme:ack:KIND:ID`). The orderer tells the CA to validate once as
//!   many hosts acknowledged as received the message (at most 10 s), so the
//!   validation, whichever host the load balancer gives it to, finds it.
//!   No order starts before the store has answered for 5 s: hosts
//!   subscribe again every 2 s while it is away, so after a start of the
//!   whole fleet, or the store's return, every host hears of the answers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::{AcmeConfig, Challenge};
use crate::observe::logging::Chain;
use crate::store::lease::Lease;
use crate::store::{OpenError, Store, StoreError};

use super::{remaining, Wanted};

/// How long a challenge answer stays in the store.
const CHALLENGE_TTL: Duration = Duration::from_secs(600);
/// How long an orderer waits for the hosts to have a challenge answer.
const ACKS: Duration = Duration::from_secs(10);
/// The channel hosts hear of new certificates and challenges on.
const CHANNEL: &str = "acme";
/// How long the store must have answered before an order starts: every
/// host's listener, trying again every `RESUBSCRIBE`, is back by then, so
/// none misses a challenge answer (after a start of the whole fleet, or
/// the store's return).
const SETTLED: Duration = Duration::from_secs(5);
/// How often a host tries to subscribe again while the store is away.
const RESUBSCRIBE: Duration = Duration::from_secs(2);

/// A certificate as stored: both halves in one value.
#[derive(Serialize, Deserialize)]
struct Stored {
    names: Vec<String>,
    cert: String,
    key: String,
}

pub(super) struct Fleet {
    store: Arc<Store>,
    /// This host's copy (`acme.cache`).
    cache: PathBuf,
    directory: String,
    lock_ttl: Duration,
    /// Told when another host published a certificate, or the
    /// subscription came back (there may be news to catch up on).
    pub(super) news: tokio::sync::Notify,
}

impl Fleet {
    pub(super) fn open(acme: &AcmeConfig) -> Result<Option<Fleet>, OpenError> {
        let Some(shared) = &acme.shared else {
            return Ok(None);
        };
        Ok(Some(Fleet {
            store: Store::open(shared)?,
            cache: acme.storage.clone(),
            directory: acme.directory.clone(),
            lock_ttl: acme.lock_ttl,
            news: tokio::sync::Notify::new(),
        }))
    }

    pub(super) fn shown(&self) -> &str {
        self.store.shown()
    }

    pub(super) fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    fn account_key(&self) -> String {
        let digest =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, self.directory.as_bytes());
        let hex: String = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("acme:account:{hex}")
    }

    fn cert_key(names: &[String]) -> String {
        format!("acme:cert:{}", names.join(","))
    }

    /// Takes the order lock (`None`: another host holds it, or the store
    /// cannot be reached, or came back less than `SETTLED` ago).
    pub(super) async fn lock(&self) -> Option<Lease> {
        if self.store.up_for() < SETTLED {
            // Asks it something, so that `up_for` counts from its return.
            let _ = self.store.query::<String>(&redis::cmd("PING")).await;
            return None;
        }
        Lease::take(&self.store, "acme:lock", self.lock_ttl)
            .await
            .ok()
            .flatten()
    }

    /// Brings this host's copy and the store in step: the account, a newer
    /// certificate either way, the orderers' records.
    pub(super) async fn sync(&self, wanted: &[Wanted]) {
        let account = self.cache.join("account.json");
        match self.store.get(&self.account_key()).await {
            Ok(Some(creds)) => {
                if std::fs::read(&account).ok().as_deref() != Some(&creds[..]) {
                    let _ = super::order::write_private(&account, &creds);
                }
            }
            Ok(None) => {
                if let Ok(creds) = std::fs::read(&account) {
                    self.put_account(&creds).await;
                }
            }
            Err(e) => return self.complain(e),
        }
        for w in wanted {
            if let Err(e) = self.sync_cert(w).await {
                return self.complain(e);
            }
        }
        match self.store.get("acme:status").await {
            Ok(Some(json)) => {
                let file = self.cache.join("status.json");
                if std::fs::read(&file).ok().as_deref() != Some(&json[..]) {
                    let _ = crate::sys::atomic::write_atomically(&file, &json);
                }
            }
            Ok(None) => {}
            Err(e) => self.complain(e),
        }
    }

    /// A value the store holds but this host cannot use is said (once a
    /// minute at most); an unreachable store was said by the store.
    fn complain(&self, e: StoreError) {
        self.store.complain("acme", &e);
    }

    async fn sync_cert(&self, w: &Wanted) -> Result<(), StoreError> {
        let stored: Option<Stored> = self
            .store
            .get(&Self::cert_key(&w.names))
            .await?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .filter(|s: &Stored| s.names == w.names);
        let local = std::fs::read(&w.cert).ok();
        let local_left = local.as_deref().and_then(remaining);
        match stored {
            Some(s) if local.as_deref() != Some(s.cert.as_bytes()) => {
                if remaining(s.cert.as_bytes()) > local_left {
                    info!(names = ?w.names, "a newer certificate is in the store: copying it");
                    if let Err(e) = super::order::store_pair(w, &s.key, &s.cert) {
                        warn!(names = ?w.names, "cannot copy the certificate from the store: {e}", e = Chain(&e));
                    }
                } else if local_left > remaining(s.cert.as_bytes()) {
                    self.push(w).await?;
                }
            }
            Some(_) => {}
            None if local.is_some() => self.push(w).await?,
            None => {}
        }
        Ok(())
    }

    /// Puts this host's certificate of `w` in the store and tells the
    /// other hosts.
    pub(super) async fn push(&self, w: &Wanted) -> Result<(), StoreError> {
        let (Ok(cert), Ok(key)) = (
            std::fs::read_to_string(&w.cert),
            std::fs::read_to_string(&w.key),
        ) else {
            return Ok(());
        };
        let value = serde_json::to_vec(&Stored {
            names: w.names.clone(),
            cert,
            key,
        })
        .unwrap_or_default();
        self.store
            .set(&Self::cert_key(&w.names), &value, None, false)
            .await?;
        info!(names = ?w.names, store = self.store.shown(), "certificate put in the store");
        self.store.publish(CHANNEL, "cert").await.map(drop)
    }

    pub(super) async fn put_account(&self, creds: &[u8]) {
        let _ = self
            .store
            .set(&self.account_key(), creds, None, false)
            .await;
    }

    pub(super) async fn put_status(&self, json: &[u8]) {
        let _ = self.store.set("acme:status", json, None, false).await;
    }

    /// Puts a challenge answer in the store and waits (at most `ACKS`)
    /// until every host that heard of it has it in its cache.
    pub(super) async fn offer(
        &self,
        kind: Challenge,
        id: &str,
        answer: &[u8],
    ) -> Result<(), StoreError> {
        let name = challenge_key(kind, id);
        let acks = ack_key(kind, id);
        self.store.del(&acks).await?;
        self.store
            .set(&name, answer, Some(CHALLENGE_TTL), false)
            .await?;
        let heard = self
            .store
            .publish(CHANNEL, &format!("challenge {} {id}", kind_name(kind)))
            .await?;
        let start = Instant::now();
        loop {
            let have: i64 = self
                .store
                .query(redis::cmd("SCARD").arg(self.store.key(&acks)))
                .await?;
            if have as usize >= heard {
                return Ok(());
            }
            if start.elapsed() > ACKS {
                warn!(challenge = %name, "{have} of the {heard} hosts that heard of the challenge have it after {ACKS:?}; going on");
                return Ok(());
            }
            // Polled: acknowledgements come from other hosts.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Takes a challenge answer out of the store (and, as they hear of it,
    /// out of every host's cache).
    pub(super) async fn withdraw(&self, kind: Challenge, id: &str) {
        let _ = self.store.del(&challenge_key(kind, id)).await;
        let _ = self
            .store
            .publish(CHANNEL, &format!("challenge {} {id}", kind_name(kind)))
            .await;
    }

    /// Listens on the store for as long as it runs: copies challenge
    /// answers into this host's cache (acknowledging them), and wakes the
    /// orderer on a new certificate. Subscribes again after a lost
    /// connection, catching up on what it missed.
    pub(super) async fn listen(&self) {
        loop {
            let pubsub = match self.store.subscribe(CHANNEL).await {
                Ok(p) => p,
                Err(_) => {
                    tokio::time::sleep(RESUBSCRIBE).await;
                    continue;
                }
            };
            self.catch_up().await;
            self.news.notify_one();
            let mut messages = std::pin::pin!(pubsub.into_on_message());
            loop {
                // A connection the server left without a word (a host gone)
                // says nothing: the store's commands failing end it too.
                let next = std::future::poll_fn(|cx| {
                    futures_core::Stream::poll_next(messages.as_mut(), cx)
                });
                let msg = tokio::select! {
                    msg = next => msg,
                    _ = self.store.lost() => None,
                };
                let Some(msg) = msg else { break };
                let text = String::from_utf8_lossy(msg.get_payload_bytes()).into_owned();
                let mut words = text.split(' ');
                match (words.next(), words.next(), words.next()) {
                    (Some("cert"), None, None) => self.news.notify_one(),
                    (Some("challenge"), Some(kind), Some(id)) => {
                        if let Some(kind) = kind_of(kind) {
                            self.mirror(kind, id, true).await;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Every pending challenge answer in the store, into the cache.
    async fn catch_up(&self) {
        let Ok(keys) = self.store.keys("acme:challenge:*").await else {
            return;
        };
        for key in keys {
            let mut parts = key.splitn(4, ':');
            if let (Some(_), Some(_), Some(kind), Some(id)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            {
                if let Some(kind) = kind_of(kind) {
                    self.mirror(kind, id, false).await;
                }
            }
        }
    }

    /// Copies the store's answer of a challenge into the cache, or removes
    /// the cached one when the store has none any more.
    async fn mirror(&self, kind: Challenge, id: &str, acknowledge: bool) {
        let Some(file) = challenge_file(&self.cache, kind, id) else {
            return;
        };
        match self.store.get(&challenge_key(kind, id)).await {
            Ok(Some(answer)) => {
                if let Err(e) = super::order::write_private(&file, &answer) {
                    warn!(file = %file.display(), "cannot keep a challenge answer: {e}", e = Chain(&e));
                    return;
                }
                if acknowledge {
                    let acks = self.store.key(&ack_key(kind, id));
                    let mut pipe = redis::pipe();
                    pipe.cmd("SADD")
                        .arg(&acks)
                        .arg(crate::store::holder())
                        .cmd("EXPIRE")
                        .arg(&acks)
                        .arg(CHALLENGE_TTL.as_secs());
                    let _ = self.store.pipeline(&pipe).await;
                }
            }
            Ok(None) => {
                let _ = std::fs::remove_file(&file);
            }
            Err(e) => self.complain(e),
        }
    }
}

fn kind_name(kind: Challenge) -> &'static str {
    match kind {
        Challenge::Http01 => "http-01",
        Challenge::TlsAlpn01 => "tls-alpn-01",
    }
}

fn kind_of(name: &str) -> Option<Challenge> {
    match name {
        "http-01" => Some(Challenge::Http01),
        "tls-alpn-01" => Some(Challenge::TlsAlpn01),
        _ => None,
    }
}

fn challenge_key(kind: Challenge, id: &str) -> String {
    format!("acme:challenge:{}:{id}", kind_name(kind))
}

/// The set of hosts that have a challenge's answer.
fn ack_key(kind: Challenge, id: &str) -> String {
    format!("acme:ack:{}:{id}", kind_name(kind))
}

/// Where this host keeps the answer of a challenge (`None` for an id that
/// is not a token or a DNS name: nothing from the store names a path).
pub(super) fn challenge_file(
    cache: &std::path::Path,
    kind: Challenge,
    id: &str,
) -> Option<PathBuf> {
    match kind {
        Challenge::Http01 => super::http_answer_file(&cache.join("challenges/http-01"), id),
        Challenge::TlsAlpn01 => {
            let valid = !id.is_empty()
                && !id.starts_with('.')
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            valid.then(|| {
                cache
                    .join("challenges/tls-alpn-01")
                    .join(format!("{id}.pem"))
            })
        }
    }
}
