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

use super::figures::Figures;
use super::link::{self, InstanceInfo, Released, Report, Update};
use crate::observe::logging::Chain;

/// Every app of this generation's config, by name.
#[derive(Default)]
pub(crate) struct Table {
    apps: HashMap<String, Entry>,
}

struct Entry {
    /// The instance new requests go to.
    serving: watch::Sender<Option<Arc<Instance>>>,
    /// A canary deploy under way: the new instance, and its share (percent).
    canary: Mutex<Option<(Arc<Instance>, u32)>>,
    /// What `status` shows of it.
    deploy: Mutex<Option<serde_json::Value>>,
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
    /// A canary deploy compares it: what was sent to it since the last
    /// report to the supervisor.
    counting: std::sync::atomic::AtomicBool,
    figures: Mutex<Figures>,
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
                        canary: Mutex::default(),
                        deploy: Mutex::default(),
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
    /// for one to be ready. During a canary deploy, the new instance takes
    /// its share: of requests at random, or of clients by `key` (the
    /// route's hash key), so that a client stays on the version it got
    /// while the share grows.
    pub(crate) async fn pick(
        &self,
        app: &str,
        except: Option<u64>,
        wait: Duration,
        key: Option<u64>,
    ) -> Option<Arc<Instance>> {
        let entry = self.apps.get(app)?;
        if let Some((canary, share)) = &*entry.canary.lock().unwrap_or_else(|p| p.into_inner()) {
            let roll = key.unwrap_or_else(crate::sys::hash::random) % 100;
            if Some(canary.id) != except && roll < u64::from(*share) {
                return Some(canary.clone());
            }
        }
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
        let reports = queue.clone();
        let reporter = tokio::spawn(async move {
            let mut every = tokio::time::interval(REPORT);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                table.report(&reports);
            }
        });
        let table = self.clone();
        tokio::spawn(async move {
            let _reporter = AbortOnDrop(reporter);
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
        let canary = update.canary.map(|c| {
            let s = link::Serving {
                id: c.id,
                addr: c.addr,
            };
            let instance = known
                .entry(c.id)
                .or_insert_with(|| Arc::new(Instance::new(s)));
            (instance.clone(), c.share)
        });
        // While a canary deploy runs, every instance of the app is counted.
        for i in known.values() {
            i.counting.store(canary.is_some(), Ordering::Relaxed);
        }
        *entry.canary.lock().unwrap_or_else(|p| p.into_inner()) = canary;
        *entry.deploy.lock().unwrap_or_else(|p| p.into_inner()) = update.deploy;
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
            let mut app = serde_json::json!({ "serving": serving, "instances": instances });
            if let Some(d) = &*entry.deploy.lock().unwrap_or_else(|p| p.into_inner()) {
                app["deploy"] = d.clone();
            }
            out.insert(name.clone(), app);
        }
        serde_json::Value::Object(out)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    /// Tells the supervisor what was sent to each counted instance since
    /// the last report.
    fn report(&self, link: &mpsc::UnboundedSender<String>) {
        for (app, entry) in &self.apps {
            let known = entry.known.lock().unwrap_or_else(|p| p.into_inner());
            for i in known.values() {
                if !i.counting.load(Ordering::Relaxed) {
                    continue;
                }
                let figures =
                    std::mem::take(&mut *i.figures.lock().unwrap_or_else(|p| p.into_inner()));
                if !figures.is_empty() {
                    let report = Report {
                        report: app.clone(),
                        id: i.id,
                        figures,
                    };
                    let _ = link.send(link::line(&report));
                }
            }
        }
    }
}

/// A canary deploy under way, in the metrics: its step and share, and both
/// versions' figures of the step, as the supervisor adds them up from
/// every worker (`version` is `old` or `new`).
impl crate::observe::metrics::Source for Table {
    fn counters(&self, _: &mut Vec<crate::observe::metrics::Series>) {}

    fn gauges(&self, out: &mut Vec<crate::observe::metrics::Series>) {
        use crate::observe::metrics::label;
        for (app, entry) in &self.apps {
            let deploy = entry.deploy.lock().unwrap_or_else(|p| p.into_inner());
            let Some(d) = deploy.as_ref() else {
                continue;
            };
            let app = label(app);
            let number = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
            out.push((
                format!("gracesrv_app_canary_share{{app=\"{app}\"}}"),
                number(&d["share"]),
            ));
            out.push((
                format!("gracesrv_app_canary_step{{app=\"{app}\"}}"),
                number(&d["step"]),
            ));
            for (version, id) in [("old", "previous"), ("new", "canary")] {
                let f = &d[version];
                let labels = format!(
                    "app=\"{app}\",version=\"{version}\",instance=\"{}\"",
                    number(&d[id])
                );
                for (family, key) in [
                    ("gracesrv_app_canary_requests", "requests"),
                    ("gracesrv_app_canary_errors", "errors_5xx"),
                    ("gracesrv_app_canary_upstream_errors", "upstream_errors"),
                ] {
                    out.push((format!("{family}{{{labels}}}"), number(&f[key])));
                }
                if let Some(ms) = f["p99_ms"].as_f64() {
                    let us = (ms * 1000.0) as u64;
                    out.push((format!("gracesrv_app_canary_p99_seconds{{{labels}}}"), us));
                }
            }
        }
    }
}

/// How often a worker reports what it sent to the instances a canary
/// deploy compares.
const REPORT: Duration = Duration::from_millis(500);

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
            counting: std::sync::atomic::AtomicBool::new(false),
            figures: Mutex::default(),
        }
    }

    /// A request sent here: its status, or `None` if it got no answer.
    /// Kept only while a canary deploy compares the app's instances.
    pub(crate) fn record(&self, status: Option<u16>, took: Duration) {
        if self.counting.load(Ordering::Relaxed) {
            self.figures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(status, took);
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
