//! A worker's view of the apps: which instance of each serves, and what of
//! this process is in flight on each instance.
//!
//! The supervisor says which instance serves ([`link::Update`]); `proxy:
//! { app }` routes pick it here ([`Table::pick`]), waiting while none is
//! ready, and hold an [`InFlight`] guard until the response (or tunnel)
//! ends. When the supervisor retires an instance, this process stops
//! sending to it at once and answers [`link::Released`] when its last guard
//! on it is gone; tunnels still open at `shutdown_timeout` are cut, each
//! side told "going away" (1001), as in a restart.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, warn};

use super::link::{self, InstanceInfo, Released, Update};
use crate::observe::logging::Chain;

/// Every app of this generation's config, by name.
#[derive(Default)]
pub(crate) struct Table {
    apps: HashMap<String, Entry>,
}

struct Entry {
    /// The instance new requests go to.
    serving: watch::Sender<Option<Arc<Instance>>>,
    /// Instances this process may send to or still has requests on, by id.
    known: Mutex<HashMap<u64, Arc<Instance>>>,
    /// The supervisor's account of every instance, for `status`.
    info: Mutex<Vec<InstanceInfo>>,
}

/// One running instance of an app, as this process sends to it.
pub(crate) struct Instance {
    pub(crate) id: u64,
    /// Connections to this instance only: retiring it closes its pool.
    pub(crate) pool: crate::wire::upstream::Pool,
    in_flight: AtomicU64,
    idle: Notify,
    /// Set when its tunnels are to be cut (see the module doc).
    pub(crate) cut: watch::Sender<bool>,
}

/// A request (or tunnel) of this process on an instance, until dropped.
pub(crate) struct InFlight(Arc<Instance>);

impl InFlight {
    pub(crate) fn new(instance: Arc<Instance>) -> InFlight {
        instance.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(instance)
    }
}

impl InFlight {
    /// Fires when this instance's tunnels are to be cut.
    pub(crate) fn cut(&self) -> watch::Receiver<bool> {
        self.0.cut.subscribe()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Table {
    pub(crate) fn new(config: &crate::config::Config) -> Table {
        Table {
            apps: config
                .apps
                .iter()
                .map(|a| {
                    let entry = Entry {
                        serving: watch::Sender::new(None),
                        known: Mutex::default(),
                        info: Mutex::default(),
                    };
                    (a.name.clone(), entry)
                })
                .collect(),
        }
    }

    /// The instance of `app` to send to: the serving one, other than
    /// `except` (one that just refused a connection), waiting up to `wait`
    /// for one to be ready.
    pub(crate) async fn pick(
        &self,
        app: &str,
        except: Option<u64>,
        wait: Duration,
    ) -> Option<Arc<Instance>> {
        let entry = self.apps.get(app)?;
        let usable = |s: &Option<Arc<Instance>>| s.as_ref().is_some_and(|i| Some(i.id) != except);
        let mut rx = entry.serving.subscribe();
        // Bound, so the borrow of `rx` ends before `rx` does.
        let picked = match tokio::time::timeout(wait, rx.wait_for(usable)).await {
            Ok(Ok(serving)) => serving.clone(),
            _ => None,
        };
        picked
    }

    /// Follows the supervisor's updates on `link` (this worker's end),
    /// answering releases on it, for as long as it is open.
    pub(crate) fn follow(self: &Arc<Self>, fd: OwnedFd, shutdown_timeout: Duration) {
        let (mut lines, queue) = match link::open(fd.into()) {
            Ok(l) => l,
            Err(e) => {
                warn!(
                    "apps: cannot use the link to the supervisor: {e}",
                    e = Chain(&e)
                );
                return;
            }
        };
        let table = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Update>(&line) {
                    Ok(update) => table.apply(update, &queue, shutdown_timeout),
                    Err(e) => warn!(
                        "apps: unreadable update from the supervisor: {e}",
                        e = Chain(&e)
                    ),
                }
            }
            debug!("apps: the link to the supervisor closed");
        });
    }

    /// Takes on `update`, answering releases on `link`.
    fn apply(&self, update: Update, link: &mpsc::UnboundedSender<String>, grace: Duration) {
        let release = |link: &mpsc::UnboundedSender<String>, app: String, id: u64| {
            let _ = link.send(link::line(&Released { released: app, id }));
        };
        let Some(entry) = self.apps.get(&update.app) else {
            // Not an app of this generation's config: nothing of it here.
            for id in &update.retire {
                release(link, update.app.clone(), *id);
            }
            return;
        };
        let mut known = entry.known.lock().unwrap_or_else(|p| p.into_inner());
        // An instance that is gone (it died) takes its pooled connections
        // with it; requests still on it hold their own handle.
        known.retain(|id, _| update.instances.iter().any(|i| i.id == *id));
        *entry.info.lock().unwrap_or_else(|p| p.into_inner()) = update.instances;
        let serving = update.serving.map(|s| {
            known
                .entry(s.id)
                .or_insert_with(|| Arc::new(Instance::new(s)))
                .clone()
        });
        entry.serving.send_replace(serving);
        for id in &update.retire {
            let Some(instance) = known.remove(id) else {
                release(link, update.app.clone(), *id);
                continue;
            };
            let (link, app) = (link.clone(), update.app.clone());
            tokio::spawn(async move {
                instance.retire(grace).await;
                release(&link, app, instance.id);
            });
        }
    }

    /// For `status`: each app's instances, with this process's requests in
    /// flight on each.
    pub(crate) fn status(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (name, entry) in &self.apps {
            let known = entry.known.lock().unwrap_or_else(|p| p.into_inner());
            let info = entry.info.lock().unwrap_or_else(|p| p.into_inner());
            let instances: Vec<serde_json::Value> = info
                .iter()
                .map(|i| {
                    let mut v = serde_json::to_value(i).unwrap_or_default();
                    v["in_flight"] = known
                        .get(&i.id)
                        .map_or(0, |k| k.in_flight.load(Ordering::Relaxed))
                        .into();
                    v
                })
                .collect();
            let serving = entry.serving.borrow().as_ref().map(|i| i.id);
            out.insert(
                name.clone(),
                serde_json::json!({ "serving": serving, "instances": instances }),
            );
        }
        serde_json::Value::Object(out)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }
}

impl Instance {
    fn new(s: link::Serving) -> Instance {
        Instance {
            id: s.id,
            pool: crate::wire::upstream::Pool::new(crate::wire::upstream::Endpoint {
                addr: s.addr.to_string(),
                tls: None,
                h2: false,
                connect_timeout: Duration::from_secs(5),
            }),
            in_flight: AtomicU64::new(0),
            idle: Notify::new(),
            cut: watch::Sender::new(false),
        }
    }

    /// Resolves once nothing of this process is in flight here.
    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Resolves once nothing of this process is in flight here; at `grace`,
    /// what is left (tunnels) is cut and given a moment to close.
    async fn retire(&self, grace: Duration) {
        if tokio::time::timeout(grace, self.idle()).await.is_err() {
            let left = self.in_flight.load(Ordering::Relaxed);
            warn!(instance = self.id, left, "shutdown_timeout ({grace:?}) reached on a retired app instance: cutting what is left");
            self.cut.send_replace(true);
            let _ = tokio::time::timeout(Duration::from_secs(2), self.idle()).await;
        }
    }
}
