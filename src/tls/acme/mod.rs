//! Automatic certificates (ACME, RFC 8555) for `tls: { acme: [names] }`.
//!
//! A serving generation runs one orderer ([`run`]). Each certificate lives
//! in `storage/certs/FIRST-NAME/` (`cert.pem`, `key.pem`, owner-only). The
//! orderer checks them on a timer; one that is missing, or has less than
//! `renew_before` left, is ordered, under an exclusive lock on
//! `storage/lock`, so that old generations still draining, a supervisor's
//! workers, or several machines sharing `storage` never order twice: whoever
//! does not get the lock waits and then finds the certificate done.
//!
//! Challenges are answered from files in `storage/challenges/` (a token's
//! key authorization for http-01, a certificate for tls-alpn-01), so any
//! process serving the listener, or any machine sharing `storage`, answers
//! them, whichever of them the validation reaches.
//!
//! A new certificate reaches clients through a restart, the same path as a
//! rotation by HUP: the new generation loads it, and no request is lost.
//! (Swapping it inside the running generation would save a process start
//! every 60 days at the cost of a second way for certificates to change.)
//! Failures back off (1 min doubling to 1 h), are logged with the ACME
//! problem document, and are in `storage/status.json`, which `status`
//! shows.

mod fleet;
mod order;
mod status;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tracing::{error, info, warn};

use crate::config::{AcmeConfig, Config};
use crate::observe::logging::{causes, Chain};

/// One certificate the config asks for: the names of a listener.
#[derive(Clone, Debug)]
struct Wanted {
    names: Vec<String>,
    cert: PathBuf,
    key: PathBuf,
    /// What this generation loaded (`None`: the placeholder).
    loaded: Option<Vec<u8>>,
}

pub(crate) use status::{CertStatus, Status};

use order::{account, order};
use status::write_status;

const FIRST_BACKOFF: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// How often certificates are looked at when nothing is due.
const CHECK: Duration = Duration::from_secs(3600);
/// How often storage is looked at for what `status` shows (and for a
/// certificate another process stored).
const SHOWN: Duration = Duration::from_secs(60);
/// How often a process that did not get the lock looks again.
const LOCK_RETRY: Duration = Duration::from_secs(2);

/// The certificates `config` asks ACME for, with what this process loaded.
fn wanted(config: &Config) -> Vec<Wanted> {
    config
        .listeners
        .iter()
        .filter_map(|l| l.tls.as_ref())
        .filter(|t| !t.acme.is_empty())
        .map(|t| Wanted {
            names: t.acme.clone(),
            cert: t.cert.path.clone(),
            key: t.key.path.clone(),
            loaded: std::fs::read(&t.cert.path).ok(),
        })
        .collect()
}

/// Seconds of validity `cert` (PEM) has left; `None` if unreadable.
fn remaining(pem: &[u8]) -> Option<i64> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .next()?
        .ok()?;
    let (_, not_after) = crate::tls::validity(&der)?;
    Some(not_after - unix_now())
}

fn not_after(pem: &[u8]) -> Option<String> {
    remaining(pem).map(|left| {
        crate::config::rfc3339(SystemTime::now() + Duration::from_secs(left.max(0) as u64))
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Does `w` need ordering: missing, inside `renew_before`, or past the time
/// picked in the server's renewal window (`ari`)?
fn due(w: &Wanted, acme: &AcmeConfig, ari: &HashMap<Vec<String>, Ari>) -> bool {
    let left = std::fs::read(&w.cert).ok().as_deref().and_then(remaining);
    renew_now(
        left,
        acme.renew_before,
        ari.get(&w.names).map(|a| a.renew_at),
        SystemTime::now(),
    )
}

/// The renewal rule: no certificate (or an unreadable one), less than
/// `renew_before` left, or `now` past the time picked in the ACME Renewal
/// Information window (RFC 9773).
fn renew_now(
    left: Option<i64>,
    renew_before: Duration,
    ari_at: Option<SystemTime>,
    now: SystemTime,
) -> bool {
    match left {
        None => true,
        Some(left) => left < renew_before.as_secs() as i64 || ari_at.is_some_and(|at| now >= at),
    }
}

/// What the server's renewal information says of a certificate.
struct Ari {
    /// A time picked at random in the suggested window (RFC 9773 4.2).
    renew_at: SystemTime,
    /// When to ask again (the server's Retry-After).
    next_check: tokio::time::Instant,
}

/// Asks the directory's renewal information for the stored certificates
/// that are not due yet, when their last answer has expired. A directory
/// without ARI is asked once.
async fn refresh_ari(
    acme: &AcmeConfig,
    wanted: &[Wanted],
    ari: &mut HashMap<Vec<String>, Ari>,
    unsupported: &mut bool,
) {
    if *unsupported || !acme.storage.join("account.json").exists() {
        return;
    }
    let now = tokio::time::Instant::now();
    let mut account = None;
    for w in wanted {
        if ari.get(&w.names).is_some_and(|a| a.next_check > now) {
            continue;
        }
        let Some(der) = std::fs::read(&w.cert).ok().and_then(|pem| {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::CertificateDer::from_pem_slice(&pem).ok()
        }) else {
            continue;
        };
        if account.is_none() {
            match self::account(acme, None).await {
                Ok(a) => account = Some(a),
                Err(e) => {
                    warn!("renewal information: {}", causes(&e));
                    return;
                }
            }
        }
        let Some(account) = &account else { return };
        let Ok(id) = instant_acme::CertificateIdentifier::try_from(&der) else {
            continue;
        };
        match account.renewal_info(&id).await {
            Ok((info, retry)) => {
                let (start, end) = (
                    SystemTime::from(info.suggested_window.start),
                    SystemTime::from(info.suggested_window.end),
                );
                let span = end.duration_since(start).unwrap_or_default();
                let mut r = [0u8; 4];
                let _ = aws_lc_rs::rand::fill(&mut r);
                let renew_at =
                    start + span.mul_f64(f64::from(u32::from_be_bytes(r)) / f64::from(u32::MAX));
                ari.insert(
                    w.names.clone(),
                    Ari {
                        renew_at,
                        next_check: now + retry.clamp(Duration::from_secs(60), CHECK * 6),
                    },
                );
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                *unsupported = true;
                return;
            }
            Err(e) => {
                warn!(names = ?w.names, "renewal information: {}", causes(&e));
                ari.insert(
                    w.names.clone(),
                    Ari {
                        renew_at: SystemTime::now() + Duration::from_secs(u32::MAX.into()),
                        next_check: now + CHECK,
                    },
                );
            }
        }
    }
}

/// Runs the orderer of this generation until it is dropped. `restart` is
/// called when storage holds a certificate other than the one loaded (this
/// process obtained it, or another one sharing `storage` did), and again,
/// with back-off, while this generation is still the one serving.
pub(crate) async fn run(config: Config, shown: Option<std::sync::Arc<Status>>, restart: impl Fn()) {
    let Some(acme) = config.acme.clone() else {
        return;
    };
    let wanted = wanted(&config);
    if wanted.is_empty() {
        warn!("acme: no listener has tls: {{ acme: [...] }}; nothing is ordered");
        return;
    }
    if let Err(e) = prepare_storage(&acme.storage) {
        error!(storage = %acme.storage.display(), "ACME storage unusable: {e}", e = Chain(&e));
        return;
    }
    let fleet = match fleet::Fleet::open(&acme) {
        Ok(f) => f,
        Err(e) => {
            error!("ACME store unusable: {e}", e = Chain(&e));
            return;
        }
    };
    if let (Some(f), Some(shown)) = (&fleet, &shown) {
        shown.set_store(f.store());
    }
    let orderer = Orderer {
        acme: &acme,
        wanted: &wanted,
        shown: shown.as_deref(),
        fleet: fleet.as_ref(),
    };
    match &fleet {
        Some(f) => {
            info!(store = f.shown(), cache = %acme.storage.display(), "acme: sharing certificates, challenges and the order lock through the store");
            tokio::join!(f.listen(), orderer.run(restart));
        }
        None => orderer.run(restart).await,
    }
}

/// The lock an orderer holds while it orders.
enum Lock {
    /// `storage/lock`, for the processes and machines sharing a directory.
    File(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>),
    /// `acme:lock` in the fleet's store.
    Lease(crate::store::lease::Lease),
}

struct Orderer<'a> {
    acme: &'a AcmeConfig,
    wanted: &'a [Wanted],
    shown: Option<&'a Status>,
    fleet: Option<&'a fleet::Fleet>,
}

impl Orderer<'_> {
    async fn run(&self, restart: impl Fn()) {
        let (acme, wanted, shown) = (self.acme, self.wanted, self.shown);
        let mut backoff: HashMap<Vec<String>, (Duration, tokio::time::Instant)> = HashMap::new();
        let mut status: HashMap<Vec<String>, CertStatus> = HashMap::new();
        let mut ari: HashMap<Vec<String>, Ari> = HashMap::new();
        let mut no_ari = false;
        let mut retry_restart = FIRST_BACKOFF;
        loop {
            if let Some(fleet) = self.fleet {
                fleet.sync(wanted).await;
            }
            if let Some(shown) = shown {
                shown.refresh(&acme.storage, wanted);
            }
            refresh_ari(acme, wanted, &mut ari, &mut no_ari).await;
            // Someone (this process or another) stored a newer certificate.
            if wanted
                .iter()
                .any(|w| std::fs::read(&w.cert).ok() != w.loaded && !due(w, acme, &HashMap::new()))
            {
                info!("a new certificate is in storage: restarting to serve it");
                restart();
                // A successful restart stops this orderer; if this generation is
                // still here (the restart failed), ask again later.
                tokio::time::sleep(retry_restart).await;
                retry_restart = (retry_restart * 2).min(MAX_BACKOFF);
                continue;
            }
            let now = tokio::time::Instant::now();
            let due_now: Vec<&Wanted> = wanted
                .iter()
                .filter(|w| due(w, acme, &ari))
                .filter(|w| backoff.get(&w.names).is_none_or(|(_, at)| *at <= now))
                .collect();
            if due_now.is_empty() {
                let next = backoff
                    .values()
                    .map(|(_, at)| *at)
                    .chain(ari.values().map(|a| a.next_check))
                    .min()
                    .unwrap_or(now + CHECK)
                    .min(now + SHOWN);
                match self.fleet {
                    Some(f) => {
                        tokio::select! {
                            _ = tokio::time::sleep_until(next) => {}
                            _ = f.news.notified() => {}
                        }
                    }
                    None => tokio::time::sleep_until(next).await,
                }
                continue;
            }
            let Some(lock) = self.lock().await else {
                // Another process orders; look again shortly.
                tokio::time::sleep(LOCK_RETRY).await;
                continue;
            };
            if let Some(fleet) = self.fleet {
                // Another host may have just finished it.
                fleet.sync(wanted).await;
            }
            let orders = async {
                for w in due_now {
                    // Under the lock: another process may have just finished it.
                    if !due(w, acme, &ari) {
                        continue;
                    }
                    info!(names = ?w.names, "ordering a certificate");
                    let s = status.entry(w.names.clone()).or_default();
                    s.names = w.names.clone();
                    match order(acme, w, self.fleet).await {
                        Ok(()) => {
                            info!(names = ?w.names, "certificate obtained");
                            if let Some(fleet) = self.fleet {
                                // A store down now gets it when it is back (`sync`).
                                let _ = fleet.push(w).await;
                            }
                            backoff.remove(&w.names);
                            ari.remove(&w.names);
                            s.last_error = None;
                            s.next_attempt = None;
                        }
                        Err(e) => {
                            // The reason, with what the libraries know of it.
                            let e = causes(&e);
                            let delay = backoff
                                .get(&w.names)
                                .map(|(d, _)| (*d * 2).min(MAX_BACKOFF))
                                .unwrap_or(FIRST_BACKOFF);
                            backoff.insert(
                                w.names.clone(),
                                (delay, tokio::time::Instant::now() + delay),
                            );
                            s.last_error = Some(e.clone());
                            s.next_attempt =
                                Some(crate::config::rfc3339(SystemTime::now() + delay));
                            // `status` says so before the log does.
                            if let Some(shown) = shown {
                                shown.failed(s);
                            }
                            error!(names = ?w.names, "cannot obtain the certificate, trying again in {delay:?}: {e}");
                        }
                    }
                    s.not_after = std::fs::read(&w.cert).ok().as_deref().and_then(not_after);
                }
            };
            match &lock {
                Lock::Lease(lease) => {
                    tokio::select! {
                        _ = orders => {}
                        _ = lease.keep() => warn!("acme: lost the order lock (the store was unreachable too long, or another host took it); the order is abandoned and tried again"),
                    }
                }
                Lock::File(_) => orders.await,
            }
            let json = write_status(&acme.storage, &status);
            if let (Some(fleet), Some(json)) = (self.fleet, json) {
                fleet.put_status(&json).await;
            }
            if let Lock::Lease(lease) = lock {
                lease.release().await;
            }
            if let Some(shown) = shown {
                shown.refresh(&acme.storage, wanted);
            }
        }
    }

    async fn lock(&self) -> Option<Lock> {
        match self.fleet {
            Some(f) => f.lock().await.map(Lock::Lease),
            None => try_lock(&self.acme.storage).map(Lock::File),
        }
    }
}

/// The lock file, held until dropped; `None` if another process holds it.
fn try_lock(storage: &Path) -> Option<nix::fcntl::Flock<std::fs::File>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(storage.join("lock"))
        .ok()?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).ok()
}

fn prepare_storage(storage: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    for dir in ["", "certs", "challenges/http-01", "challenges/tls-alpn-01"] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(storage.join(dir))?;
    }
    Ok(())
}

/// The file that holds the http-01 answer for `token` (if a challenge for
/// it is pending); `None` for a token that is not one.
pub(crate) fn http_answer_file(dir: &Path, token: &str) -> Option<PathBuf> {
    let valid = !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    valid.then(|| dir.join(token))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    #[test]
    fn renewal_is_due_when_missing_close_to_expiry_or_in_the_ari_window() {
        let now = SystemTime::now();
        let day = 86400;
        let before = Duration::from_secs(30 * day as u64);
        assert!(super::renew_now(None, before, None, now), "missing");
        assert!(super::renew_now(Some(29 * day), before, None, now));
        assert!(!super::renew_now(Some(31 * day), before, None, now));
        let past = now - Duration::from_secs(1);
        let future = now + Duration::from_secs(3600);
        assert!(
            super::renew_now(Some(60 * day), before, Some(past), now),
            "ARI window reached"
        );
        assert!(!super::renew_now(Some(60 * day), before, Some(future), now));
    }
}
