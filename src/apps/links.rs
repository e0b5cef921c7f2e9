//! The supervisor's side of the links to its workers (see [`super::link`]):
//! every update goes to every worker, and a retired instance is released
//! once each worker that could have sent to it says so, or is gone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::figures::Figures;
use super::link::{self, Released, Report, Update};
use crate::observe::logging::Chain;

#[derive(Clone, Default)]
pub(crate) struct Links {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    /// Each worker's queue of lines to send.
    workers: HashMap<u64, mpsc::UnboundedSender<String>>,
    /// The latest update of each app, for a worker that starts later.
    latest: BTreeMap<String, Update>,
    /// Retired instances, by app and id: the workers yet to release them,
    /// and who waits for that.
    retiring: HashMap<(String, u64), Waiting>,
    /// What the workers reported of each instance, by app and id, since
    /// the app's runner last took it (kept only while it asks).
    figures: HashMap<(String, u64), Figures>,
    /// Apps whose instances' figures are wanted (a canary deploy).
    counting: HashSet<String>,
}

struct Waiting {
    workers: HashSet<u64>,
    done: Vec<oneshot::Sender<()>>,
}

impl Links {
    /// A link for a worker about to start: returns the worker's end, to be
    /// passed at `GRACESRV_APPS_FD`. The worker hears the latest update of
    /// every app first.
    pub(crate) fn open(&self) -> Result<OwnedFd, std::io::Error> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let (mut lines, tx) = link::open(ours)?;
        let id = {
            let mut inner = self.lock();
            inner.next += 1;
            let id = inner.next;
            for u in inner.latest.values() {
                let _ = tx.send(link::line(u));
            }
            inner.workers.insert(id, tx);
            id
        };
        let links = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                // A release, or a report (not an untagged enum: the
                // histogram's number keys do not survive serde's buffering).
                if let Ok(r) = serde_json::from_str::<Released>(&l) {
                    links.released(id, &r.released, r.id);
                    continue;
                }
                match serde_json::from_str::<Report>(&l) {
                    Ok(r) => links.reported(r),
                    Err(e) => warn!(
                        worker_link = id,
                        "apps: unreadable message from a worker: {e}",
                        e = Chain(&e)
                    ),
                }
            }
            debug!(worker_link = id, "apps: a worker's link closed");
            links.gone(id);
        });
        Ok(theirs.into())
    }

    /// Sends `update` to every worker. Resolves once each of them has
    /// released the instances it retires.
    pub(crate) fn publish(&self, update: Update) -> impl Future<Output = ()> + Send + 'static {
        let mut waits = Vec::new();
        let mut inner = self.lock();
        for id in &update.retire {
            let (tx, rx) = oneshot::channel();
            let workers: HashSet<u64> = inner.workers.keys().copied().collect();
            if workers.is_empty() {
                continue;
            }
            waits.push(rx);
            inner
                .retiring
                .entry((update.app.clone(), *id))
                .or_insert_with(|| Waiting {
                    workers,
                    done: Vec::new(),
                })
                .done
                .push(tx);
        }
        let l = link::line(&update);
        inner.workers.retain(|_, w| w.send(l.clone()).is_ok());
        let latest = Update {
            retire: Vec::new(),
            ..update
        };
        inner.latest.insert(latest.app.clone(), latest);
        async move {
            for w in waits {
                let _ = w.await;
            }
        }
    }

    /// Starts (or stops) keeping what the workers report of `app`.
    pub(crate) fn count(&self, app: &str, on: bool) {
        let mut inner = self.lock();
        if on {
            inner.counting.insert(app.to_string());
        } else {
            inner.counting.remove(app);
            inner.figures.retain(|(a, _), _| a != app);
        }
    }

    /// What the workers reported of instance `id` of `app` since the last
    /// call.
    pub(crate) fn take_figures(&self, app: &str, id: u64) -> Figures {
        self.lock()
            .figures
            .remove(&(app.to_string(), id))
            .unwrap_or_default()
    }

    fn reported(&self, r: Report) {
        let mut inner = self.lock();
        if inner.counting.contains(&r.report) {
            inner
                .figures
                .entry((r.report, r.id))
                .or_default()
                .add(&r.figures);
        }
    }

    /// An app is gone from the config: a worker started from now on does
    /// not hear of it.
    pub(crate) fn forget(&self, app: &str) {
        self.lock().latest.remove(app);
    }

    fn released(&self, worker: u64, app: &str, id: u64) {
        let mut inner = self.lock();
        let key = (app.to_string(), id);
        if let Some(w) = inner.retiring.get_mut(&key) {
            w.workers.remove(&worker);
            if w.workers.is_empty() {
                if let Some(w) = inner.retiring.remove(&key) {
                    w.done.into_iter().for_each(|d| {
                        let _ = d.send(());
                    });
                }
            }
        }
    }

    /// A worker exited: it holds nothing anywhere.
    fn gone(&self, worker: u64) {
        let mut inner = self.lock();
        inner.workers.remove(&worker);
        let keys: Vec<(String, u64)> = inner.retiring.keys().cloned().collect();
        drop(inner);
        for (app, id) in keys {
            self.released(worker, &app, id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
