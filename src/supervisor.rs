//! `--supervise`: a small process whose pid never changes, for terminals,
//! containers (PID 1) and process managers that track one pid.
//!
//! It owns the listening sockets and runs workers: the same binary, handed
//! the sockets with the same protocol as a restart (LISTEN_FDS, the ready
//! pipe), in a process group of their own. A restart starts the next worker,
//! waits for it to be ready, then tells the old one to drain (TERM). A worker
//! that dies unexpectedly is replaced, with back-off; the sockets stay open
//! meanwhile, so clients wait in the backlog instead of being refused.
//! Signals are passed on to the workers; the supervisor exits when they are
//! gone, with the serving worker's exit status.

use std::collections::HashMap;
use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use sd_notify::NotifyState;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::generation::{notify_systemd, remove_pid_file, write_pid_file};
use crate::handoff::InheritedSocket;
use crate::listeners::Listener;
use crate::reaper::{describe, Reaper};
use crate::restart::{await_ready, spawn_successor, Starting, Trigger, Worker as Spawn};
use crate::service::Handler;
use crate::signals::{Sig, Signals};

pub struct Supervisor {
    pub exe: PathBuf,
    pub argv: Vec<OsString>,
    pub config_path: PathBuf,
    pub apps: HashMap<String, Handler>,
    pub reaper: Reaper,
}

/// The worker serving now.
struct Worker {
    pid: i32,
    generation: u64,
    ready_at: Instant,
}

/// A worker starting to replace one that died: its pid once ready.
type Replacement = Pin<Box<dyn Future<Output = Result<i32, String>>>>;

/// A restart's result: the new worker, its sockets, and its config.
type Attempt = Pin<Box<dyn Future<Output = Result<(i32, Vec<Listener>, Config), String>>>>;

/// Back-off for replacing workers that die: doubles up to a cap, and starts
/// over once a worker has served for a while.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);
    /// A worker that served this long before dying resets the back-off.
    const STABLE: Duration = Duration::from_secs(30);

    fn take(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
}

impl Supervisor {
    /// Runs the service until it is stopped; returns the exit code.
    pub async fn run(
        self,
        config: Config,
        inherited: Vec<InheritedSocket>,
        mut signals: Signals,
    ) -> i32 {
        let pid = std::process::id();
        let mut listeners = match crate::listeners::open(&config.listeners, inherited) {
            Ok(l) => l,
            Err(e) => {
                error!("cannot start: {e}");
                eprintln!("gracesrv: {e}");
                return 1;
            }
        };
        for l in &listeners {
            info!(listener = %l.name, addr = %l.local_addr, "listening");
        }
        // Generation 1. TERM, INT and QUIT act at once, even now.
        let starting = Starting::default();
        let first = {
            let start = self.start_worker(&listeners, 1, config.startup_timeout, &starting);
            tokio::pin!(start);
            let mut held_hup = false;
            loop {
                tokio::select! {
                    r = &mut start => break r,
                    sig = signals.next() => match sig {
                        Sig::Restart => held_hup = true,
                        Sig::Stop | Sig::Quit => {
                            info!("stopping while the first worker starts");
                            starting.abandon(&self.reaper).await;
                            return 0;
                        }
                    },
                }
            }
            .map(|p| (p, held_hup))
        };
        starting.set(None);
        let (first, held_hup) = match first {
            Ok(p) => p,
            Err(e) => {
                error!("cannot start: {e}");
                eprintln!("gracesrv: {e}");
                return 1;
            }
        };
        let mut current = Worker {
            pid: first,
            generation: 1,
            ready_at: Instant::now(),
        };
        let mut config = config;
        if let Some(p) = &config.pid_file {
            if let Err(e) = write_pid_file(p, pid) {
                warn!(pid_file = %p.display(), "cannot write pid file: {e}");
            }
        }
        notify_systemd(&[NotifyState::MainPid(pid), NotifyState::Ready]);
        crate::reload::serve_control(&self.config_path);
        info!(worker = first, role = "supervisor", "ready");

        let mut watch = self.start_watch(&config);
        let mut draining: Vec<i32> = Vec::new();
        // Of those, the ones stopped at once by the cap (still to be reaped).
        let mut quit: Vec<i32> = Vec::new();
        let mut attempt: Option<Attempt> = None;
        // A replacement for a worker that died, starting.
        let mut replacing: Option<Replacement> = None;
        // A HUP during the first start is acted on now.
        let mut pending = held_hup;
        let mut started = Instant::now();
        let mut seq = 0u64;
        let mut backoff = Backoff {
            next: Backoff::FIRST,
        };
        let mut stopping: Option<Signal> = None;
        let mut replace_at: Option<tokio::time::Instant> = None;

        loop {
            let mut trigger = None;
            tokio::select! {
                sig = signals.next() => match sig {
                    Sig::Restart if stopping.is_none() => trigger = Some(Trigger::Signal),
                    Sig::Restart => {}
                    Sig::Stop | Sig::Quit => {
                        let s = if sig == Sig::Quit { Signal::SIGQUIT } else { Signal::SIGTERM };
                        info!(signal = ?s, workers = 1 + draining.len(), "stopping: passing the signal to the workers");
                        stopping = Some(s);
                        // A worker being started (a restart, or a replacement)
                        // is killed and reaped, never left to serve alone.
                        if attempt.take().is_some() {
                            info!("abandoning the restart in progress");
                        }
                        let was_replacing = replacing.take().is_some();
                        starting.abandon(&self.reaper).await;
                        if replace_at.take().is_some() || was_replacing {
                            // No worker serves (one died, its replacement was
                            // pending): only draining ones are left to wait for.
                            for p in std::mem::take(&mut draining) {
                                let _ = kill(Pid::from_raw(p), s);
                                self.reaper.wait(p).await;
                            }
                            if let Some(p) = &config.pid_file {
                                remove_pid_file(p, pid);
                            }
                            info!("workers gone: exiting");
                            return 0;
                        }
                        for p in std::iter::once(current.pid).chain(draining.iter().copied()) {
                            let _ = kill(Pid::from_raw(p), s);
                        }
                    }
                },
                _ = async { watch.as_mut().expect("guarded").changed().await }, if watch.is_some() && stopping.is_none() => {
                    trigger = Some(Trigger::Watch);
                }
                status = self.reaper.wait(current.pid), if replace_at.is_none() => {
                    if stopping.is_some() {
                        // The serving worker is gone; wait for the draining ones.
                        for p in std::mem::take(&mut draining) {
                            self.reaper.wait(p).await;
                        }
                        if let Some(p) = &config.pid_file {
                            remove_pid_file(p, pid);
                        }
                        info!(status = %describe(status), "workers gone: exiting");
                        return exit_code(status);
                    }
                    if current.ready_at.elapsed() > Backoff::STABLE {
                        backoff.next = Backoff::FIRST;
                    }
                    let delay = backoff.take();
                    error!(worker = current.pid, status = %describe(status), "worker died: replacing it in {delay:?}");
                    replace_at = Some(tokio::time::Instant::now() + delay);
                }
                _ = async { tokio::time::sleep_until(replace_at.expect("guarded")).await }, if replace_at.is_some() && attempt.is_none() && replacing.is_none() => {
                    replacing = Some(Box::pin(self.start_worker(&listeners, current.generation + 1, config.startup_timeout, &starting)));
                }
                started = async { replacing.as_mut().expect("guarded").await }, if replacing.is_some() => {
                    replacing = None;
                    starting.set(None);
                    replace_at = None;
                    let generation = current.generation + 1;
                    match started {
                        Ok(p) => {
                            info!(worker = p, generation, "worker replaced");
                            current = Worker { pid: p, generation, ready_at: Instant::now() };
                        }
                        Err(e) => {
                            let delay = backoff.take();
                            error!("cannot replace the worker: {e}; trying again in {delay:?}");
                            current.generation = generation;
                            replace_at = Some(tokio::time::Instant::now() + delay);
                        }
                    }
                }
                outcome = async { attempt.as_mut().expect("guarded").await }, if attempt.is_some() => {
                    attempt = None;
                    starting.set(None);
                    seq += 1;
                    let took_ms = started.elapsed().as_millis() as u64;
                    let result = match outcome {
                        Ok((new_pid, new_listeners, new_config)) => {
                            let generation = current.generation + 1;
                            let old = std::mem::replace(
                                &mut current,
                                Worker { pid: new_pid, generation, ready_at: Instant::now() },
                            );
                            info!(old_pid = old.pid, new_pid, generation = current.generation, took_ms, "restart complete: the old worker drains");
                            let _ = kill(Pid::from_raw(old.pid), Signal::SIGTERM);
                            draining.push(old.pid);
                            // The same cap as self-restarts (see `draining`).
                            while draining.len() - quit.len() > new_config.max_draining {
                                let Some(oldest) = draining.iter().copied().find(|p| !quit.contains(p)) else { break };
                                warn!(pid = oldest, "too many generations draining: stopping the oldest at once");
                                match crate::predecessors::Gen::of(oldest) {
                                    Some(gen) => crate::predecessors::stop(gen),
                                    None => { let _ = kill(Pid::from_raw(oldest), Signal::SIGQUIT); }
                                }
                                quit.push(oldest);
                            }
                            // Sockets of removed listeners close here; the
                            // old worker closes its own copies as it drains.
                            listeners = new_listeners;
                            let watch_changed = new_config.watch != config.watch || new_config.watched_files() != config.watched_files();
                            config = new_config;
                            if watch_changed {
                                watch = self.start_watch(&config);
                            }
                            Ok(new_pid)
                        }
                        Err(reason) => {
                            error!(took_ms, "restart failed: {reason}");
                            Err(reason)
                        }
                    };
                    crate::reload::report(config.pid_file.as_deref(), pid, seq, current.generation, &result);
                    notify_systemd(&[NotifyState::Ready]);
                    if std::mem::take(&mut pending) {
                        trigger = Some(Trigger::Signal);
                    }
                }
                done = wait_any(&self.reaper, &draining), if !draining.is_empty() => {
                    draining.retain(|p| *p != done);
                    quit.retain(|p| *p != done);
                }
            }
            if let Some(trigger) = trigger {
                if attempt.is_some() || replace_at.is_some() {
                    pending = true;
                    info!(
                        ?trigger,
                        "restart already in progress: one more will follow"
                    );
                } else {
                    info!(?trigger, "restarting");
                    // For Type=notify-reload: RELOADING=1 with the time, then READY=1.
                    let mut states = vec![NotifyState::Reloading];
                    states.extend(NotifyState::monotonic_usec_now().ok());
                    notify_systemd(&states);
                    started = Instant::now();
                    attempt = Some(self.restart(&listeners, current.generation + 1, &starting));
                }
            }
        }
    }

    /// Starts a worker with `listeners`; the future waits until it is
    /// ready. The worker's pid is in `starting` meanwhile.
    fn start_worker(
        &self,
        listeners: &[Listener],
        generation: u64,
        timeout: Duration,
        starting: &Starting,
    ) -> impl Future<Output = Result<i32, String>> + 'static {
        let spawned = spawn_successor(
            &self.exe,
            &self.argv,
            listeners,
            generation,
            Spawn::Supervised(std::process::id()),
            &self.reaper,
        );
        if let Ok(s) = &spawned {
            starting.set(Some(s.pid));
        }
        let reaper = self.reaper.clone();
        async move { await_ready(spawned?, timeout, &reaper).await }
    }

    /// One restart: validate, re-read the listener list (binding new
    /// addresses; the sockets of removed ones close after the swap), start
    /// the next worker, wait for it.
    fn restart(&self, listeners: &[Listener], generation: u64, starting: &Starting) -> Attempt {
        let prepared =
            crate::prepare::prepare(&self.config_path, &self.apps).map_err(|e| e.to_string());
        // Duplicates of the current sockets, handed to `open` as if inherited:
        // kept listeners reuse them, removed ones are closed with the old set.
        let dups: Result<Vec<InheritedSocket>, String> = listeners
            .iter()
            .map(|l| {
                l.socket
                    .try_clone()
                    .map(|socket| InheritedSocket {
                        name: l.name.clone(),
                        socket,
                    })
                    .map_err(|e| e.to_string())
            })
            .collect();
        let started = prepared.and_then(|p| {
            let config = p.config;
            let new = crate::listeners::open(&config.listeners, dups?)?;
            let s = spawn_successor(
                &self.exe,
                &self.argv,
                &new,
                generation,
                Spawn::Supervised(std::process::id()),
                &self.reaper,
            )?;
            starting.set(Some(s.pid));
            Ok((s, new, config))
        });
        let reaper = self.reaper.clone();
        Box::pin(async move {
            let (s, new, config) = started?;
            let pid = await_ready(s, config.startup_timeout, &reaper).await?;
            Ok((pid, new, config))
        })
    }

    fn start_watch(&self, config: &Config) -> Option<crate::watch::Watch> {
        if !config.watch {
            return None;
        }
        let files = config.watched_files();
        let loaded = crate::watch::fingerprint(&files);
        crate::watch::Watch::start(files, loaded)
            .map_err(|e| error!("cannot watch files, restart with HUP instead: {e}"))
            .ok()
    }
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
