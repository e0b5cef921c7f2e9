//! `--supervise`: a small process whose pid never changes, for terminals,
//! containers (PID 1) and process managers that track one pid.
//!
//! It owns the listening sockets and runs workers: the same binary, handed
//! the sockets with the same protocol as a restart (LISTEN_FDS, the ready
//! pipe), in a process group of their own. Restarts run the same state
//! machine as a self-restarting server (`restart::Restart`): the next worker
//! starts, and once it is ready the old one is told to drain (TERM). A
//! worker that dies unexpectedly is replaced, with back-off, through the same
//! machine; the sockets stay open meanwhile, so clients wait in the backlog
//! instead of being refused. Signals are passed on to the workers; the
//! supervisor exits when they are gone, with the serving worker's exit
//! status.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use sd_notify::NotifyState;
use tracing::{error, info, warn};

use crate::apps::Apps;
use crate::config::Config;
use crate::control::predecessors::Predecessors;
use crate::control::restart::{Event, Restart, Trigger};
use crate::control::spawn::{StartError, Started};
use crate::control::successor::{notify_systemd, remove_pid_file, status_line, write_pid_file};
use crate::observe::logging::Chain;
use crate::sys::backoff::Backoff;
use crate::sys::handoff::InheritedSocket;
use crate::sys::listeners::Listener;
use crate::sys::pid::Gen;
use crate::sys::reaper::{describe, Reaper};
use crate::sys::signals::{Sig, Signals};

/// The worker serving now.
struct Worker {
    pid: i32,
    ready_at: Instant,
}

/// What the supervisor holds while it runs.
struct Supervisor {
    pid: u32,
    restart: Restart,
    config: Config,
    /// The supervisor's own copies of the sockets, in listener order.
    listeners: Vec<Listener>,
    /// The worker serving now; `None` while a dead one's replacement is
    /// awaited.
    current: Option<Worker>,
    /// The generation of the latest worker started.
    generation: u64,
    /// Old workers draining, waited for before the supervisor exits.
    draining: Vec<i32>,
    /// The same, for the cap on draining generations (`max_draining`).
    predecessors: Predecessors,
    backoff: Backoff,
    watch: Option<crate::sys::watch::Watch>,
    /// The signal a stop passed on to the workers.
    stopping: Option<Signal>,
    /// Restarts that succeeded and failed, handed to each worker's metrics.
    restarts: (u64, u64),
    /// The application processes (`apps:`).
    apps: Apps,
    /// `gracesrv deploy` requests.
    deploys: tokio::sync::mpsc::UnboundedReceiver<crate::control::deploy::Request>,
}

/// Runs the service until it is stopped; returns the exit code. `restart`
/// starts workers of this process.
pub(crate) async fn run(
    mut restart: Restart,
    config: Config,
    inherited: Vec<InheritedSocket>,
    mut signals: Signals,
) -> i32 {
    let listeners = match crate::sys::listeners::open(&config.listeners, inherited) {
        Ok(l) => l,
        Err(e) => {
            error!("cannot start: {e}", e = Chain(&e));
            eprintln!("gracesrv: {e}", e = Chain(&e));
            return 1;
        }
    };
    for l in &listeners {
        info!(listener = %l.name, addr = %l.local_addr, "listening");
    }
    // The apps start beside the first worker: requests to an app wait for
    // its instance to be ready.
    let mut apps = Apps::start(&config, restart.spawner.reaper.clone());
    restart.spawner.links = Some(apps.links.clone());
    // Generation 1. TERM, INT and QUIT act at once, even now; a HUP waits.
    restart.replace(1, &listeners, &config, Vec::new(), false);
    let mut held_hup = false;
    let first = loop {
        tokio::select! {
            event = restart.next() => break event,
            sig = signals.next() => match sig {
                Sig::Restart => held_hup = true,
                Sig::Reopen | Sig::Finish => {}
                Sig::Stop | Sig::Quit => {
                    info!("stopping while the first worker starts");
                    restart.abandon().await;
                    apps.stop().await;
                    return 0;
                }
            },
        }
    };
    let outcome = match first {
        Event::Done { outcome, .. } => outcome,
        Event::Due { .. } => Err(StartError::Refused(
            "the first worker was not started".into(),
        )),
    };
    let first = match outcome {
        Ok(started) => started.ready.pid,
        Err(e) => {
            error!("cannot start: {e}", e = Chain(&e));
            eprintln!("gracesrv: {e}", e = Chain(&e));
            apps.stop().await;
            return 1;
        }
    };
    let pid = std::process::id();
    // The control socket first: a `reload` that reads the pid file finds
    // it listening.
    crate::control::reload::serve_control(&restart.spawner.config_path);
    if let Some(p) = &config.pid_file {
        if let Err(e) = write_pid_file(p, pid) {
            warn!(pid_file = %p.display(), "cannot write pid file: {e}", e = Chain(&e));
        }
    }
    let status = status_line(1, first as u32, &listeners);
    notify_systemd(&[
        NotifyState::MainPid(pid),
        NotifyState::Ready,
        NotifyState::Status(&status),
    ]);
    let deploys = crate::control::deploy::serve();
    info!(worker = first, role = "supervisor", "ready");
    let watch = start_watch(&config);
    let mut s = Supervisor {
        pid,
        restart,
        config,
        listeners,
        current: Some(Worker {
            pid: first,
            ready_at: Instant::now(),
        }),
        generation: 1,
        draining: Vec::new(),
        predecessors: Predecessors::default(),
        backoff: Backoff::default(),
        watch,
        stopping: None,
        restarts: (0, 0),
        apps,
        deploys,
    };
    // A HUP during the first start is acted on now.
    let mut trigger = held_hup.then_some(Trigger::Signal);
    let code = loop {
        if let Some(t) = trigger.take() {
            s.request(t);
        }
        let reaper = s.restart.spawner.reaper.clone();
        trigger = tokio::select! {
            sig = signals.next() => match sig {
                Sig::Restart if s.stopping.is_none() => Some(Trigger::Signal),
                Sig::Restart => None,
                Sig::Reopen => {
                    // The workers write the access log.
                    for p in s.current.iter().map(|w| w.pid).chain(s.draining.iter().copied()) {
                        let _ = kill(Pid::from_raw(p), Signal::SIGUSR1);
                    }
                    None
                }
                // For a draining generation (its workers drain on their own).
                Sig::Finish => None,
                Sig::Stop | Sig::Quit => {
                    if let Some(code) = s.stop(sig).await {
                        break code;
                    }
                    None
                }
            },
            _ = async { s.watch.as_mut().expect("guarded").changed().await }, if s.watch.is_some() && s.stopping.is_none() => {
                Some(Trigger::Watch)
            }
            status = async { reaper.wait(s.current.as_ref().expect("guarded").pid).await }, if s.current.is_some() => {
                if let Some(code) = s.worker_died(status).await {
                    break code;
                }
                None
            }
            event = s.restart.next() => match event {
                Event::Due { pending } => {
                    s.generation += 1;
                    let env = s.counters();
                    s.restart.replace(s.generation, &s.listeners, &s.config, env, pending);
                    None
                }
                Event::Done { trigger, outcome, pending, took } => s.done(trigger, outcome, pending, took),
            },
            done = wait_any(&reaper, &s.draining), if !s.draining.is_empty() => {
                s.draining.retain(|p| *p != done);
                None
            }
            Some(req) = s.deploys.recv() => {
                s.deploy(req);
                None
            }
        };
    };
    // The workers are gone: nothing proxies to the apps any more.
    s.apps.stop().await;
    code
}

impl Supervisor {
    /// The restart counters for a new worker's metrics (see `metrics`).
    fn counters(&self) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
        let (ok, failed) = self.restarts;
        let json = format!(
            r#"{{"gracesrv_restarts_total":{ok},"gracesrv_restart_failures_total":{failed}}}"#
        );
        vec![(crate::sys::handoff::METRICS_VAR.into(), json.into())]
    }

    /// `gracesrv deploy APP`: the app as the config file defines it now.
    fn deploy(&self, req: crate::control::deploy::Request) {
        let path = &self.restart.spawner.config_path;
        let outcome = Config::load(path).map_err(|e| e.to_string()).and_then(|c| {
            let app = c.apps.iter().find(|a| a.name == req.app).ok_or_else(|| {
                format!("{}: no app named {:?} in apps:", c.path.display(), req.app)
            })?;
            app.resolve_program()
                .map_err(|e| format!("{}: {e}", c.path.display()))?;
            info!(app = %app.name, "deploy requested");
            Ok(self.apps.deploy(app, c.shutdown_timeout, req.how))
        });
        match outcome {
            Ok(pending) => {
                tokio::spawn(async move {
                    let outcome = pending
                        .await
                        .unwrap_or_else(|_| Err("the app was stopped".into()));
                    let _ = req.reply.send(outcome);
                });
            }
            Err(e) => {
                warn!(app = %req.app, "deploy refused: {e}");
                let _ = req.reply.send(Err(e));
            }
        }
    }

    /// A restart is asked for.
    fn request(&mut self, trigger: Trigger) {
        if self.restart.is_idle() {
            // For Type=notify-reload: RELOADING=1 with the time, then READY=1.
            let mut states = vec![NotifyState::Reloading];
            states.extend(NotifyState::monotonic_usec_now().ok());
            notify_systemd(&states);
        }
        let env = self.counters();
        self.restart
            .request(trigger, self.generation + 1, &self.listeners, env);
    }

    /// An attempt ended. Returns a trigger to act on next.
    fn done(
        &mut self,
        trigger: Trigger,
        outcome: Result<Box<Started>, StartError>,
        pending: bool,
        took: Duration,
    ) -> Option<Trigger> {
        let took_ms = took.as_millis() as u64;
        if trigger == Trigger::Replace {
            self.generation += 1;
            return match outcome {
                Ok(started) => {
                    info!(
                        worker = started.ready.pid,
                        generation = self.generation,
                        "worker replaced"
                    );
                    self.current = Some(Worker {
                        pid: started.ready.pid,
                        ready_at: Instant::now(),
                    });
                    self.notify_ready();
                    pending.then_some(Trigger::Signal)
                }
                Err(e) => {
                    let delay = self.backoff.take();
                    error!(
                        "cannot replace the worker: {e}; trying again in {delay:?}",
                        e = Chain(&e)
                    );
                    self.restart.wait_until(delay, pending);
                    None
                }
            };
        }
        let result = match outcome {
            Ok(started) => {
                let new_pid = started.ready.pid;
                self.generation += 1;
                let old = self.current.replace(Worker {
                    pid: new_pid,
                    ready_at: Instant::now(),
                });
                info!(
                    old_pid = old.as_ref().map(|w| w.pid),
                    new_pid,
                    generation = self.generation,
                    took_ms,
                    "restart complete: the old worker drains"
                );
                if let Some(old) = old {
                    let _ = kill(Pid::from_raw(old.pid), Signal::SIGTERM);
                    self.draining.push(old.pid);
                    if let Some(gen) = Gen::of(old.pid) {
                        self.predecessors.push(gen);
                    }
                }
                // The same cap as self-restarts.
                self.predecessors.enforce(started.config.max_draining);
                self.restarts.0 += 1;
                self.adopt(started);
                Ok(new_pid)
            }
            Err(reason) => {
                let reason = crate::observe::logging::causes(&reason);
                error!(took_ms, "restart failed: {reason}");
                self.restarts.1 += 1;
                Err(reason)
            }
        };
        self.restart.report(
            self.config.pid_file.as_deref(),
            self.pid,
            self.generation,
            &result,
        );
        self.notify_ready();
        if self.current.is_none() {
            // The worker died during a failed attempt: replace it.
            let delay = self.backoff.take();
            self.restart.wait_until(delay, pending);
            return None;
        }
        pending.then_some(Trigger::Signal)
    }

    /// `READY=1` (after `RELOADING=1`, or a replacement), with the serving
    /// worker in `STATUS=`.
    fn notify_ready(&self) {
        let status = self
            .current
            .as_ref()
            .map(|w| status_line(self.generation, w.pid as u32, &self.listeners));
        let mut states = vec![NotifyState::Ready];
        states.extend(status.as_deref().map(NotifyState::Status));
        notify_systemd(&states);
    }

    /// Takes on a restart's sockets and config. Sockets of removed
    /// listeners close here; the old worker closes its own as it drains.
    fn adopt(&mut self, started: Box<Started>) {
        let Started {
            config, listeners, ..
        } = *started;
        self.listeners = listeners;
        let watch_changed = config.watch != self.config.watch
            || config.watched_files() != self.config.watched_files();
        self.apps.apply(&config);
        self.config = config;
        if watch_changed {
            self.watch = start_watch(&self.config);
        }
    }

    /// The serving worker exited. Returns the exit code if the supervisor
    /// is done.
    async fn worker_died(&mut self, status: WaitStatus) -> Option<i32> {
        let worker = self.current.take()?;
        if self.stopping.is_some() {
            // The serving worker is gone; wait for the draining ones.
            self.wait_draining(None).await;
            info!(status = %describe(status), "workers gone: exiting");
            return Some(exit_code(status));
        }
        self.backoff.served(worker.ready_at.elapsed());
        if self.restart.is_idle() {
            let delay = self.backoff.take();
            error!(worker = worker.pid, status = %describe(status), "worker died: replacing it in {delay:?}");
            self.restart.wait_until(delay, false);
        } else {
            // A worker is starting already; if it fails, `done` replaces.
            error!(worker = worker.pid, status = %describe(status), "worker died while the next one starts");
        }
        None
    }

    /// TERM, INT or QUIT: passed on to the workers. Returns the exit code
    /// if no worker serves (the supervisor is done at once).
    async fn stop(&mut self, sig: Sig) -> Option<i32> {
        let s = if sig == Sig::Quit {
            Signal::SIGQUIT
        } else {
            Signal::SIGTERM
        };
        let workers = usize::from(self.current.is_some()) + self.draining.len();
        info!(signal = ?s, workers, "stopping: passing the signal to the workers");
        self.stopping = Some(s);
        // A worker being started (a restart, or a replacement) is killed
        // and reaped, never left to serve alone.
        self.restart.abandon().await;
        let Some(current) = &self.current else {
            // No worker serves: only draining ones are left to wait for.
            self.wait_draining(Some(s)).await;
            info!("workers gone: exiting");
            return Some(0);
        };
        for p in std::iter::once(current.pid).chain(self.draining.iter().copied()) {
            let _ = kill(Pid::from_raw(p), s);
        }
        None
    }

    /// Waits for every draining worker (signalled first, if `sig`), then
    /// removes the pid file.
    async fn wait_draining(&mut self, sig: Option<Signal>) {
        for p in std::mem::take(&mut self.draining) {
            if let Some(sig) = sig {
                let _ = kill(Pid::from_raw(p), sig);
            }
            self.restart.spawner.reaper.wait(p).await;
        }
        if let Some(p) = &self.config.pid_file {
            remove_pid_file(p, self.pid);
        }
    }
}

fn start_watch(config: &Config) -> Option<crate::sys::watch::Watch> {
    if !config.watch {
        return None;
    }
    let files = config.watched_files();
    let loaded = crate::sys::watch::fingerprint(&files);
    crate::sys::watch::Watch::start(files, loaded)
        .map_err(|e| {
            error!(
                "cannot watch files, restart with HUP instead: {e}",
                e = Chain(&e)
            )
        })
        .ok()
}

/// Resolves with the pid of the first of `pids` to exit.
async fn wait_any(reaper: &Reaper, pids: &[i32]) -> i32 {
    let mut waits: Vec<Pin<Box<dyn Future<Output = i32> + '_>>> = pids
        .iter()
        .map(|p| {
            let p = *p;
            Box::pin(async move {
                reaper.wait(p).await;
                p
            }) as Pin<Box<dyn Future<Output = i32> + '_>>
        })
        .collect();
    std::future::poll_fn(|cx| {
        for f in waits.iter_mut() {
            if let std::task::Poll::Ready(p) = f.as_mut().poll(cx) {
                return std::task::Poll::Ready(p);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => 1,
    }
}
