//! One app's instances over time, run by the supervisor: one task per app,
//! one loop over explicit states, fed by events that small tasks send (an
//! instance exited, got ready, was released by the workers, ...).
//!
//! A deploy, top to bottom:
//!
//! 1. A new instance starts beside the serving one (`Starting`).
//! 2. Once ready, new requests go to it (`Serving`); the old one gets no new
//!    request and finishes what it has (`Standby`) while the new one proves
//!    itself for [`PROBATION`]. If the new one dies meanwhile, the old one
//!    serves again and the deploy fails.
//! 3. The old one is retired (`Retiring`): every worker stops sending to
//!    it and says when nothing of its own is in flight there.
//! 4. Only then is it stopped (`Stopping`): `stop_signal`, then SIGKILL to
//!    its process group after `stop_timeout`.
//!
//! A new instance that exits, or is not ready within `start_timeout`, is
//! stopped, and the serving one is left alone. A serving instance that dies
//! is replaced with back-off; requests wait meanwhile (see `table`).

use std::collections::BTreeMap;
use std::time::Duration;

use nix::sys::wait::WaitStatus;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::figures::{self, Figures};
use super::instance::{self, Process};
use super::link::{InstanceInfo, Serving, Update};
use super::links::Links;
use crate::config::AppConfig;
use crate::observe::logging::Chain;
use crate::sys::backoff::Backoff;
use crate::sys::reaper::{describe, Reaper};

/// How long a new instance must live after it is ready before the previous
/// one is let go: a version that dies on its first requests is caught here,
/// with the previous one still running.
pub(crate) const PROBATION: Duration = Duration::from_secs(2);

/// What a deploy ended in: a line for `gracesrv deploy` to print, or why it
/// failed.
pub(crate) type Outcome = Result<String, String>;

/// What `gracesrv deploy` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum How {
    /// Switch to the new instance once it is ready (plain `deploy`, a HUP
    /// with a new definition, a watched file).
    Switch,
    /// `--canary`: the new instance takes a share of the requests in
    /// steps, compared with the old one, promoted or rolled back by itself.
    Canary,
    /// `--abort`: roll the canary deploy under way back.
    Abort,
    /// `--promote`: the canary deploy under way takes everything now.
    Promote,
}

pub(crate) enum Command {
    /// A new definition (a HUP, or `deploy` after an edit): deploy it.
    Define {
        app: Box<AppConfig>,
        shutdown_timeout: Duration,
        reply: Option<oneshot::Sender<Outcome>>,
        how: How,
    },
    /// Retire and stop every instance, then end.
    Stop(oneshot::Sender<()>),
}

enum Event {
    Exited(u64, WaitStatus),
    Ready(u64),
    NotReady(u64, String),
    ProbationOver(u64),
    Released(u64),
    KillDue(u64),
    RestartDue,
    /// A canary deploy's look at the figures (each second).
    CanaryTick(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    /// A canary deploy's new instance, beside the serving one.
    Canary,
    Serving,
    Standby,
    Retiring,
    Stopping,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Canary => "canary",
            State::Serving => "serving",
            State::Standby => "standby",
            State::Retiring => "retiring",
            State::Stopping => "stopping",
        }
    }
}

struct Instance {
    process: Process,
    state: State,
    /// The readiness check, aborted if the instance exits first.
    check: Option<tokio::task::JoinHandle<()>>,
    /// Deploys that end when this instance has stopped, with their line.
    on_exit: Vec<(oneshot::Sender<Outcome>, Outcome)>,
}

/// A deploy (or a replacement) under way.
struct Start {
    id: u64,
    replies: Vec<oneshot::Sender<Outcome>>,
    /// Once ready, it goes through a canary deploy.
    canary: bool,
}

/// A canary deploy under way: the new instance takes `steps[step]` percent
/// of the requests, and is compared with the old one on this step's
/// requests.
struct CanaryRun {
    old: u64,
    new: u64,
    step: usize,
    since: tokio::time::Instant,
    old_figures: Figures,
    new_figures: Figures,
    replies: Vec<oneshot::Sender<Outcome>>,
}

impl CanaryRun {
    /// `step 2 (25%)`.
    fn step_name(&self, steps: &[u32]) -> String {
        format!("step {} ({}%)", self.step + 1, steps[self.step])
    }

    /// Both versions' figures of the step.
    fn figures(&self) -> String {
        format!(
            "old (instance {}): {}; new (instance {}): {}",
            self.old,
            self.old_figures.line(),
            self.new,
            self.new_figures.line()
        )
    }
}

/// How often a canary deploy looks at the figures.
const CANARY_TICK: Duration = Duration::from_secs(1);

/// A new instance serving on probation, and the one it replaced.
struct Probation {
    old: u64,
    new: u64,
    replies: Vec<oneshot::Sender<Outcome>>,
}

struct Runner {
    app: AppConfig,
    shutdown_timeout: Duration,
    links: Links,
    reaper: Reaper,
    events: mpsc::UnboundedSender<Event>,
    next_id: u64,
    instances: BTreeMap<u64, Instance>,
    serving: Option<u64>,
    starting: Option<Start>,
    probation: Option<Probation>,
    canary: Option<CanaryRun>,
    backoff: Backoff,
    stopping: Vec<oneshot::Sender<()>>,
    watch: Option<crate::sys::watch::Watch>,
}

/// Runs `app` until it is told to stop (or the supervisor drops `commands`).
pub(crate) async fn run(
    app: AppConfig,
    shutdown_timeout: Duration,
    links: Links,
    reaper: Reaper,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let (events, mut incoming) = mpsc::unbounded_channel();
    let mut r = Runner {
        watch: watch(&app),
        app,
        shutdown_timeout,
        links,
        reaper,
        events,
        next_id: 1,
        instances: BTreeMap::new(),
        serving: None,
        starting: None,
        probation: None,
        canary: None,
        backoff: Backoff::default(),
        stopping: Vec::new(),
    };
    r.start(Vec::new(), false);
    let mut commands_open = true;
    loop {
        tokio::select! {
            Some(event) = incoming.recv() => r.on(event),
            cmd = commands.recv(), if commands_open => match cmd {
                Some(cmd) => r.command(cmd),
                None => {
                    commands_open = false;
                    r.stop(None);
                }
            },
            _ = async { r.watch.as_mut().expect("guarded").changed().await }, if r.watch.is_some() && r.stopping.is_empty() && commands_open => {
                info!("a watched file changed: deploying");
                r.deploy(None, How::Switch);
            }
        }
        if (!r.stopping.is_empty() || !commands_open) && r.instances.is_empty() {
            info!("stopped");
            for s in r.stopping.drain(..) {
                let _ = s.send(());
            }
            return;
        }
    }
}

fn watch(app: &AppConfig) -> Option<crate::sys::watch::Watch> {
    if app.watch.is_empty() {
        return None;
    }
    let loaded = crate::sys::watch::fingerprint(&app.watch);
    crate::sys::watch::Watch::start(app.watch.clone(), loaded)
        .map_err(|e| {
            error!(
                "cannot watch the app's files, deploy with `gracesrv deploy` instead: {e}",
                e = Chain(&e)
            )
        })
        .ok()
}

impl Runner {
    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Define {
                app,
                shutdown_timeout,
                reply,
                how,
            } => {
                self.shutdown_timeout = shutdown_timeout;
                match how {
                    How::Abort => return self.abort(reply),
                    How::Promote => return self.promote(reply),
                    How::Switch | How::Canary => {}
                }
                // Not part of the definition: taken as it is now.
                self.app.canary = app.canary.clone();
                if *app == self.app {
                    // Unchanged: a HUP leaves it alone; a deploy deploys.
                    if reply.is_some() {
                        self.deploy(reply, how);
                    }
                    return;
                }
                info!("the app's definition changed: deploying it");
                let watch_changed = app.watch != self.app.watch;
                self.app = *app;
                if watch_changed {
                    self.watch = watch(&self.app);
                }
                self.deploy(reply, how);
            }
            Command::Stop(done) => self.stop(Some(done)),
        }
    }

    /// Starts a new instance, unless one is starting already (the deploy
    /// joins it).
    fn deploy(&mut self, reply: Option<oneshot::Sender<Outcome>>, how: How) {
        if !self.stopping.is_empty() {
            if let Some(r) = reply {
                let _ = r.send(Err("gracesrv is stopping".into()));
            }
            return;
        }
        if let Some(c) = &self.canary {
            let why = format!(
                "a canary deploy (instance {}) is under way: `gracesrv deploy --abort {app}` or `--promote {app}` first",
                c.new,
                app = self.app.name
            );
            match reply {
                Some(r) => {
                    let _ = r.send(Err(why));
                }
                // A HUP with a new definition, or a watched file: the
                // canary goes on; deploy again after it.
                None => warn!("not deployed: {why}"),
            }
            return;
        }
        if let Some(s) = &mut self.starting {
            s.replies.extend(reply);
            s.canary |= how == How::Canary;
            return;
        }
        // A deploy during the last one's probation ends that probation.
        if let Some(p) = &self.probation {
            let new = p.new;
            self.probation_over(new);
        }
        self.start(reply.into_iter().collect(), how == How::Canary);
    }

    fn start(&mut self, replies: Vec<oneshot::Sender<Outcome>>, canary: bool) {
        let id = self.next_id;
        self.next_id += 1;
        let mut process = match instance::start(&self.app, id, &self.reaper) {
            Ok(p) => p,
            Err(e) => {
                self.failed_start(
                    replies,
                    format!("cannot start a new instance: {e}", e = Chain(&e)),
                );
                return;
            }
        };
        info!(instance = id, pid = process.pid, addr = %process.addr, "instance starting");
        let (pid, events, reaper) = (process.pid, self.events.clone(), self.reaper.clone());
        tokio::spawn(async move {
            let status = reaper.wait(pid).await;
            let _ = events.send(Event::Exited(id, status));
        });
        let ready = process.ready(&self.app.ready);
        let (events, timeout) = (self.events.clone(), self.app.start_timeout);
        let check = tokio::spawn(async move {
            let event = match tokio::time::timeout(timeout, ready).await {
                Ok(Ok(())) => Event::Ready(id),
                Ok(Err(e)) => Event::NotReady(id, e.to_string()),
                Err(_) => {
                    Event::NotReady(id, format!("not ready within start_timeout ({timeout:?})"))
                }
            };
            let _ = events.send(event);
        });
        self.instances.insert(
            id,
            Instance {
                process,
                state: State::Starting,
                check: Some(check),
                on_exit: Vec::new(),
            },
        );
        self.starting = Some(Start {
            id,
            replies,
            canary,
        });
        self.announce();
    }

    fn on(&mut self, event: Event) {
        match event {
            Event::Ready(id) => self.ready(id),
            Event::NotReady(id, reason) => {
                if self.starting.as_ref().is_some_and(|s| s.id == id) {
                    let start = self.starting.take().expect("checked");
                    let pid = self.instances.get(&id).map_or(0, |i| i.process.pid);
                    let reason = format!("new instance (pid {pid}): {reason}");
                    self.stop_instance(id);
                    // `deploy` hears of it once the instance is gone.
                    let replies = match self.instances.get_mut(&id) {
                        Some(inst) => {
                            let failed =
                                start.replies.into_iter().map(|r| (r, Err(reason.clone())));
                            inst.on_exit.extend(failed);
                            Vec::new()
                        }
                        None => start.replies,
                    };
                    self.failed_start(replies, reason);
                }
            }
            Event::Exited(id, status) => self.exited(id, status),
            Event::ProbationOver(id) => self.probation_over(id),
            Event::Released(id) => {
                if self
                    .instances
                    .get(&id)
                    .is_some_and(|i| i.state == State::Retiring)
                {
                    self.stop_instance(id);
                }
            }
            Event::KillDue(id) => {
                if let Some(i) = self.instances.get(&id) {
                    warn!(
                        instance = id,
                        pid = i.process.pid,
                        "stop_timeout ({:?}) reached: killing the instance",
                        self.app.stop_timeout
                    );
                    i.process.kill();
                }
            }
            // Due unless something serves or starts by now (a deploy,
            // or a replacement whose back-off ended first).
            Event::RestartDue => {
                if self.serving.is_none() && self.starting.is_none() && self.stopping.is_empty() {
                    self.start(Vec::new(), false);
                }
            }
            Event::CanaryTick(id) => self.canary_tick(id),
        }
    }

    /// The instance being started is ready: it serves.
    fn ready(&mut self, id: u64) {
        if self.starting.as_ref().is_none_or(|s| s.id != id) {
            return;
        }
        let start = self.starting.take().expect("checked");
        let Some(inst) = self.instances.get_mut(&id) else {
            return;
        };
        inst.check = None;
        let (pid, took) = (inst.process.pid, inst.process.started.elapsed());
        if let Some(old) = self.serving.filter(|_| start.canary) {
            inst.state = State::Canary;
            let share = self.app.canary.steps[0];
            info!(
                instance = id,
                pid,
                took_ms = took.as_millis() as u64,
                previous = old,
                share,
                "instance ready: a canary deploy begins"
            );
            self.links.count(&self.app.name, true);
            self.canary = Some(CanaryRun {
                old,
                new: id,
                step: 0,
                since: tokio::time::Instant::now(),
                old_figures: Figures::default(),
                new_figures: Figures::default(),
                replies: start.replies,
            });
            self.tick_canary_in(id);
            self.announce();
            return;
        }
        inst.state = State::Serving;
        let old = self.serving.replace(id);
        info!(instance = id, pid, took_ms = took.as_millis() as u64, previous = ?old, "instance ready: it serves");
        match old.and_then(|o| self.instances.get_mut(&o).map(|i| (o, i))) {
            Some((old, inst)) => {
                inst.state = State::Standby;
                self.probation = Some(Probation {
                    old,
                    new: id,
                    replies: start.replies,
                });
                let events = self.events.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(PROBATION).await;
                    let _ = events.send(Event::ProbationOver(id));
                });
            }
            None => {
                for r in start.replies {
                    let _ = r.send(Ok(format!("instance {id} (pid {pid}) serves")));
                }
            }
        }
        self.announce();
    }

    /// The new instance proved itself: the old one is retired.
    fn probation_over(&mut self, new: u64) {
        if self.probation.as_ref().is_none_or(|p| p.new != new) {
            return;
        }
        let p = self.probation.take().expect("checked");
        let new_pid = self.instances.get(&new).map_or(0, |i| i.process.pid);
        let Some(old) = self.instances.get_mut(&p.old) else {
            for r in p.replies {
                let _ = r.send(Ok(format!("instance {new} (pid {new_pid}) serves")));
            }
            return;
        };
        old.state = State::Retiring;
        let line = format!(
            "instance {new} (pid {new_pid}) serves; instance {} (pid {}) stopped",
            p.old, old.process.pid
        );
        old.on_exit
            .extend(p.replies.into_iter().map(|r| (r, Ok(line.clone()))));
        self.retire(p.old);
    }

    /// Tells the workers to stop sending to `id`; it is stopped once they
    /// have nothing left there (or `shutdown_timeout` and a margin passed).
    fn retire(&mut self, id: u64) {
        info!(
            instance = id,
            "retiring the instance: waiting for its requests to finish"
        );
        let released = self.publish(vec![id]);
        let (events, within) = (
            self.events.clone(),
            self.shutdown_timeout + Duration::from_secs(3),
        );
        tokio::spawn(async move {
            let _ = tokio::time::timeout(within, released).await;
            let _ = events.send(Event::Released(id));
        });
    }

    /// Sends `stop_signal`, and SIGKILL after `stop_timeout`.
    fn stop_instance(&mut self, id: u64) {
        let Some(inst) = self.instances.get_mut(&id) else {
            return;
        };
        if inst.state == State::Stopping {
            return;
        }
        inst.state = State::Stopping;
        if let Some(c) = inst.check.take() {
            c.abort();
        }
        info!(instance = id, pid = inst.process.pid, signal = ?self.app.stop_signal, "stopping the instance");
        inst.process.signal(self.app.stop_signal);
        let (events, after) = (self.events.clone(), self.app.stop_timeout);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = events.send(Event::KillDue(id));
        });
        self.announce();
    }

    fn exited(&mut self, id: u64, status: WaitStatus) {
        let Some(inst) = self.instances.remove(&id) else {
            return;
        };
        if let Some(c) = inst.check {
            c.abort();
        }
        let pid = inst.process.pid;
        let how = describe(status);
        match inst.state {
            State::Canary => {
                if let Some(c) = self.end_canary() {
                    let reason = format!(
                        "new instance (pid {pid}) {how} during the canary deploy, at {}%; instance {} serves",
                        self.app.canary.steps[c.step], c.old
                    );
                    error!("deploy failed: {reason}");
                    for r in c.replies {
                        let _ = r.send(Err(reason.clone()));
                    }
                }
            }
            State::Starting => {
                if self.starting.as_ref().is_some_and(|s| s.id == id) {
                    let start = self.starting.take().expect("checked");
                    self.failed_start(
                        start.replies,
                        format!("new instance (pid {pid}) {how} before it was ready"),
                    );
                }
            }
            State::Serving if self.canary.as_ref().is_some_and(|c| c.old == id) => {
                // The old version died during a canary deploy: the new one
                // takes everything.
                warn!(
                    instance = id,
                    pid, "previous instance {how} during the canary deploy: the new one serves"
                );
                self.serving = None;
                self.promote_canary("the previous instance exited");
            }
            State::Serving => {
                self.serving = None;
                self.backoff.served(inst.process.started.elapsed());
                match self.probation.take() {
                    // The new version died on probation: the old one serves again.
                    Some(p) if p.new == id => {
                        self.serving = Some(p.old);
                        if let Some(old) = self.instances.get_mut(&p.old) {
                            old.state = State::Serving;
                        }
                        let reason = format!(
                            "new instance (pid {pid}) {how} {} ms after it was ready; instance {} serves again",
                            inst.process.started.elapsed().as_millis(),
                            p.old
                        );
                        error!("deploy failed: {reason}");
                        for r in p.replies {
                            let _ = r.send(Err(reason.clone()));
                        }
                    }
                    other => {
                        self.probation = other;
                        if self.stopping.is_empty() {
                            let delay = self.backoff.take();
                            error!(
                                instance = id,
                                pid, "instance {how}: starting another in {delay:?}"
                            );
                            self.restart_in(delay);
                        }
                    }
                }
            }
            State::Standby => {
                // The old one ended on its own during the probation.
                warn!(instance = id, pid, "previous instance {how}");
                if let Some(p) = self.probation.take() {
                    let new_pid = self.instances.get(&p.new).map_or(0, |i| i.process.pid);
                    for r in p.replies {
                        let _ = r.send(Ok(format!(
                            "instance {} (pid {new_pid}) serves; instance {id} (pid {pid}) {how}",
                            p.new
                        )));
                    }
                }
            }
            State::Retiring | State::Stopping => info!(instance = id, pid, "instance {how}"),
        }
        self.announce();
        // After the workers heard: whoever waited sees the instance gone.
        for (r, outcome) in inst.on_exit {
            let _ = r.send(outcome);
        }
    }

    /// A start failed: the serving instance (if any) is left alone; with
    /// none, another is tried after a back-off.
    fn failed_start(&mut self, replies: Vec<oneshot::Sender<Outcome>>, reason: String) {
        error!("{reason}");
        for r in replies {
            let _ = r.send(Err(reason.clone()));
        }
        if self.serving.is_none() && self.stopping.is_empty() {
            let delay = self.backoff.take();
            info!("no instance serves: trying again in {delay:?}");
            self.restart_in(delay);
        }
    }

    fn restart_in(&mut self, delay: Duration) {
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(Event::RestartDue);
        });
    }

    /// Retires and stops everything; `done` hears when all have exited.
    fn stop(&mut self, done: Option<oneshot::Sender<()>>) {
        let first = self.stopping.is_empty();
        self.stopping.extend(done);
        if !first {
            return;
        }
        if let Some(s) = self.starting.take() {
            for r in s.replies {
                let _ = r.send(Err("gracesrv is stopping".into()));
            }
        }
        if let Some(p) = self.probation.take() {
            for r in p.replies {
                let _ = r.send(Err("gracesrv is stopping".into()));
            }
        }
        if let Some(c) = self.end_canary() {
            for r in c.replies {
                let _ = r.send(Err("gracesrv is stopping".into()));
            }
        }
        self.serving = None;
        let ids: Vec<u64> = self.instances.keys().copied().collect();
        let mut retire = Vec::new();
        for id in ids {
            let inst = self.instances.get_mut(&id).expect("listed");
            match inst.state {
                State::Starting => self.stop_instance(id),
                State::Serving | State::Standby | State::Canary => {
                    inst.state = State::Retiring;
                    retire.push(id);
                }
                State::Retiring | State::Stopping => {}
            }
        }
        info!(instances = self.instances.len(), "stopping the app");
        let released = self.publish(retire.clone());
        let (events, within) = (
            self.events.clone(),
            self.shutdown_timeout + Duration::from_secs(3),
        );
        tokio::spawn(async move {
            let _ = tokio::time::timeout(within, released).await;
            for id in retire {
                let _ = events.send(Event::Released(id));
            }
        });
    }

    /// Tells every worker where this app stands (nothing retired: nothing
    /// to wait for).
    fn announce(&self) {
        drop(self.publish(Vec::new()));
    }

    /// Tells every worker where this app stands, retiring `retire`.
    fn publish(&self, retire: Vec<u64>) -> impl std::future::Future<Output = ()> + Send + 'static {
        let serving = self.serving.and_then(|id| {
            self.instances.get(&id).map(|i| Serving {
                id,
                addr: i.process.addr,
            })
        });
        let instances = self
            .instances
            .iter()
            .map(|(id, i)| InstanceInfo {
                id: *id,
                pid: i.process.pid,
                state: i.state.name().into(),
                started_at: crate::config::rfc3339(i.process.started_at),
                addr: i.process.addr,
            })
            .collect();
        let canary = self.canary.as_ref().and_then(|c| {
            self.instances.get(&c.new).map(|i| super::link::Canary {
                id: c.new,
                addr: i.process.addr,
                share: self.app.canary.steps[c.step],
            })
        });
        let deploy = self.canary.as_ref().map(|c| {
            let steps = &self.app.canary.steps;
            serde_json::json!({
                "canary": c.new,
                "previous": c.old,
                "step": c.step + 1,
                "steps": steps,
                "share": steps[c.step],
                "step_seconds": self.app.canary.step.as_secs_f64(),
                "in_step_seconds": (c.since.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                "old": c.old_figures.summary(),
                "new": c.new_figures.summary(),
            })
        });
        self.links.publish(Update {
            app: self.app.name.clone(),
            serving,
            retire,
            instances,
            canary,
            deploy,
        })
    }

    /// The canary deploy under way, ended: the workers' figures are no
    /// longer kept.
    fn end_canary(&mut self) -> Option<CanaryRun> {
        let c = self.canary.take()?;
        self.links.count(&self.app.name, false);
        Some(c)
    }

    fn tick_canary_in(&self, id: u64) {
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CANARY_TICK).await;
            let _ = events.send(Event::CanaryTick(id));
        });
    }

    /// A canary deploy's look at the figures: rolled back at once if the
    /// new version is worse, else on to the next step when this one has
    /// lasted, or promoted after the last.
    fn canary_tick(&mut self, id: u64) {
        let (app, links) = (&self.app, &self.links);
        let Some(c) = self.canary.as_mut().filter(|c| c.new == id) else {
            return;
        };
        c.old_figures.add(&links.take_figures(&app.name, c.old));
        c.new_figures.add(&links.take_figures(&app.name, c.new));
        let steps = &app.canary.steps;
        if let Some(why) = figures::worse(&c.old_figures, &c.new_figures, &app.canary) {
            let reason = format!(
                "rolled back at {}: {why}; {}",
                c.step_name(steps),
                c.figures()
            );
            self.rollback(reason);
            return;
        }
        if c.since.elapsed() >= app.canary.step {
            if c.step == steps.len() - 1 {
                self.promote_canary("every step passed");
                return;
            }
            info!(
                instance = id,
                old = %c.old_figures.line(),
                new = %c.new_figures.line(),
                "canary step {} passed: {}% now",
                c.step + 1,
                steps[c.step + 1]
            );
            c.step += 1;
            c.since = tokio::time::Instant::now();
            c.old_figures = Figures::default();
            c.new_figures = Figures::default();
        }
        self.tick_canary_in(id);
        self.announce();
    }

    /// The canary deploy's new version takes everything: it serves, and
    /// the old one is retired and stopped (the deploy's answer then).
    fn promote_canary(&mut self, why: &str) {
        let Some(c) = self.end_canary() else {
            return;
        };
        let new_pid = match self.instances.get_mut(&c.new) {
            Some(i) => {
                i.state = State::Serving;
                i.process.pid
            }
            None => 0,
        };
        self.serving = Some(c.new);
        info!(instance = c.new, "canary deploy promoted: {why}");
        let step = format!(
            "at {}: {}",
            c.step_name(&self.app.canary.steps),
            c.figures()
        );
        match self.instances.get_mut(&c.old) {
            Some(old) => {
                old.state = State::Retiring;
                let line = format!(
                    "instance {} (pid {new_pid}) serves ({why}); instance {} (pid {}) stopped; {step}",
                    c.new, c.old, old.process.pid
                );
                old.on_exit
                    .extend(c.replies.into_iter().map(|r| (r, Ok(line.clone()))));
                self.retire(c.old);
            }
            // It exited during the deploy.
            None => {
                for r in c.replies {
                    let _ = r.send(Ok(format!(
                        "instance {} (pid {new_pid}) serves ({why}); {step}",
                        c.new
                    )));
                }
                self.announce();
            }
        }
    }

    /// The canary deploy's new version is worse: it gets no new request
    /// at once, finishes what it has, and is stopped; the deploy fails
    /// with `reason` once it is gone.
    fn rollback(&mut self, reason: String) {
        let Some(c) = self.end_canary() else {
            return;
        };
        error!(instance = c.new, "canary deploy {reason}");
        match self.instances.get_mut(&c.new) {
            Some(inst) => {
                inst.state = State::Retiring;
                inst.on_exit
                    .extend(c.replies.into_iter().map(|r| (r, Err(reason.clone()))));
                self.retire(c.new);
            }
            None => {
                for r in c.replies {
                    let _ = r.send(Err(reason.clone()));
                }
                self.announce();
            }
        }
    }

    /// `deploy --abort`: the canary deploy under way is rolled back.
    fn abort(&mut self, reply: Option<oneshot::Sender<Outcome>>) {
        let Some(c) = &self.canary else {
            return no_canary(reply, &self.app.name);
        };
        let new = c.new;
        // The aborted deploy hears why; `--abort` hears when it is done.
        self.rollback("rolled back by hand (`gracesrv deploy --abort`)".into());
        if let (Some(r), Some(inst)) = (reply, self.instances.get_mut(&new)) {
            let line = format!(
                "rolled back: instance {new} (pid {}) stopped",
                inst.process.pid
            );
            inst.on_exit.push((r, Ok(line)));
        }
    }

    /// `deploy --promote`: the canary deploy under way takes everything.
    fn promote(&mut self, reply: Option<oneshot::Sender<Outcome>>) {
        let Some(c) = &self.canary else {
            return no_canary(reply, &self.app.name);
        };
        let (old, new) = (c.old, c.new);
        self.promote_canary("promoted by hand (`gracesrv deploy --promote`)");
        if let Some(r) = reply {
            match self.instances.get_mut(&old) {
                Some(inst) => {
                    let line = format!(
                        "promoted: instance {new} serves; instance {old} (pid {}) stopped",
                        inst.process.pid
                    );
                    inst.on_exit.push((r, Ok(line)));
                }
                None => {
                    let _ = r.send(Ok(format!("promoted: instance {new} serves")));
                }
            }
        }
    }
}

fn no_canary(reply: Option<oneshot::Sender<Outcome>>, app: &str) {
    if let Some(r) = reply {
        let _ = r.send(Err(format!("no canary deploy of {app} is under way")));
    }
}
