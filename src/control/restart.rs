//! The old process's side of a restart (SPEC section 4), top to bottom. The
//! new process's side is `successor.rs`.
//!
//! 1. Something asks for a restart: a [`Trigger`].
//! 2. The one state machine both modes run, [`Restart`], starts an attempt,
//!    or notes one more if an attempt is under way:
//!
//!    ```text
//!    Idle ──request──▶ Starting ──done──▶ Idle
//!      │                 │  ▲ request: pending (one more follows)
//!      │                 │  └─ done, failed, pending: Starting again
//!      └─wait_until──▶ Waiting ──due──▶ Starting (a supervisor's worker died)
//!    any ──abandon (stop)──▶ Idle, the starting process killed and reaped
//!    ```
//!
//! 3. An attempt ([`Spawner`]) validates the new config in this process
//!    (a broken config or certificate never gets as far as a new process),
//!    opens the next generation's sockets (kept ones are duplicates of the
//!    current ones, so the accept queue is shared), forks and execs the
//!    binary with them at fds 3.., and waits on the ready pipe for `READY`,
//!    an error, an exit or `startup_timeout`.
//! 4. What success means is the mode's: a serving process drains and exits
//!    ([`control`], then [`drain`]); a supervisor tells its old worker to
//!    drain (`supervisor.rs`). Older generations still draining are capped
//!    (`predecessors.rs`).
//! 5. A replaced generation keeps its sockets until it exits and watches the
//!    new one's ready pipe: if the new generation dies, it serves again.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsString;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::control::generation::Generation;
use crate::control::predecessors::Predecessors;
use crate::http::service::Handler;
use crate::sys::handoff::{self, InheritedSocket, SpawnArgs, HANDOFF_VARS};
use crate::sys::listeners::Listener;
use crate::sys::reaper::Reaper;
use crate::sys::signals::{Sig, Signals};

/// Why a process is being started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// HUP (or `gracesrv reload`).
    Signal,
    /// A watched file changed.
    Watch,
    /// A supervisor's worker died: its replacement (no new config).
    Replace,
    /// ACME stored a new certificate.
    Certificate,
}

/// A generation's ACME orderer (`acme::run`), stopped when dropped: only a
/// serving generation orders.
struct Orderer(tokio::task::JoinHandle<()>);

impl Orderer {
    fn start(
        config: &Config,
        shown: Option<std::sync::Arc<crate::tls::acme::Status>>,
        restart: tokio::sync::mpsc::UnboundedSender<()>,
    ) -> Option<Orderer> {
        config.acme.as_ref()?;
        let config = config.clone();
        Some(Orderer(tokio::spawn(crate::tls::acme::run(
            config,
            shown,
            move || {
                let _ = restart.send(());
            },
        ))))
    }
}

impl Drop for Orderer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A new process that said `READY`, with what it was started with.
pub struct Started {
    pub ready: Ready,
    pub config: Config,
    /// Its sockets, in listener order (this process's copies).
    pub listeners: Vec<Listener>,
}

type Attempt = Pin<Box<dyn Future<Output = Result<Box<Started>, String>>>>;

/// Where the restart machine is.
enum Phase {
    /// Nothing is being started.
    Idle,
    /// A new process is starting.
    Starting {
        trigger: Trigger,
        attempt: Attempt,
        /// Its pid, once forked (to kill it if the attempt is abandoned).
        pid: Rc<Cell<Option<i32>>>,
        /// A trigger arrived meanwhile: one more attempt follows this one
        /// (the process now starting read its config before it).
        pending: bool,
        since: Instant,
    },
    /// No process serves (a supervisor's worker died): a replacement
    /// starts at `at`, after a back-off.
    Waiting {
        at: tokio::time::Instant,
        pending: bool,
    },
}

/// What the machine has to say.
pub enum Event {
    /// An attempt ended; the machine is idle again.
    Done {
        trigger: Trigger,
        outcome: Result<Box<Started>, String>,
        /// A trigger arrived during the attempt.
        pending: bool,
        took: Duration,
    },
    /// The back-off is over: start the replacement.
    Due { pending: bool },
}

/// The restart state machine, for a serving process and a supervisor alike.
pub struct Restart {
    phase: Phase,
    pub spawner: Spawner,
    /// Attempts reported so far (`gracesrv reload` matches results by it).
    reported: u64,
}

impl Restart {
    pub fn new(spawner: Spawner) -> Restart {
        Restart {
            phase: Phase::Idle,
            spawner,
            reported: 0,
        }
    }

    pub fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::Idle)
    }

    /// Asks for a restart to generation `generation` from `current` sockets.
    /// Idle: the attempt starts now (true). Otherwise one more is noted, to
    /// follow the attempt or the replacement under way (false).
    pub fn request(
        &mut self,
        trigger: Trigger,
        generation: u64,
        current: &[Listener],
        env: Vec<(OsString, OsString)>,
    ) -> bool {
        match &mut self.phase {
            Phase::Starting { pending, .. } | Phase::Waiting { pending, .. } => {
                *pending = true;
                info!(
                    ?trigger,
                    "restart already in progress: one more will follow"
                );
                false
            }
            Phase::Idle => {
                info!(?trigger, "restarting");
                let pid = Rc::new(Cell::new(None));
                let attempt = self.spawner.restart(generation, current, env, pid.clone());
                self.starting(trigger, attempt, pid, false);
                true
            }
        }
    }

    /// Starts a replacement with the same sockets and config (a supervisor
    /// whose worker died, or its first worker). `pending` carries a trigger
    /// that arrived while there was none.
    pub fn replace(
        &mut self,
        generation: u64,
        listeners: &[Listener],
        config: &Config,
        env: Vec<(OsString, OsString)>,
        pending: bool,
    ) {
        let pid = Rc::new(Cell::new(None));
        let attempt = self
            .spawner
            .replacement(generation, listeners, config, env, pid.clone());
        self.starting(Trigger::Replace, attempt, pid, pending);
    }

    fn starting(
        &mut self,
        trigger: Trigger,
        attempt: Attempt,
        pid: Rc<Cell<Option<i32>>>,
        pending: bool,
    ) {
        self.phase = Phase::Starting {
            trigger,
            attempt,
            pid,
            pending,
            since: Instant::now(),
        };
    }

    /// Nothing serves: start a replacement `after` from now. Triggers
    /// meanwhile follow it.
    pub fn wait_until(&mut self, after: Duration, pending: bool) {
        self.phase = Phase::Waiting {
            at: tokio::time::Instant::now() + after,
            pending,
        };
    }

    /// The next event; never resolves while idle. Cancel-safe: the attempt
    /// lives in the machine, not in this future.
    pub async fn next(&mut self) -> Event {
        match &mut self.phase {
            Phase::Idle => std::future::pending().await,
            Phase::Waiting { at, pending } => {
                tokio::time::sleep_until(*at).await;
                let pending = *pending;
                self.phase = Phase::Idle;
                Event::Due { pending }
            }
            Phase::Starting { attempt, .. } => {
                let outcome = attempt.as_mut().await;
                let Phase::Starting {
                    trigger,
                    pending,
                    since,
                    ..
                } = std::mem::replace(&mut self.phase, Phase::Idle)
                else {
                    return std::future::pending().await;
                };
                Event::Done {
                    trigger,
                    outcome,
                    pending,
                    took: since.elapsed(),
                }
            }
        }
    }

    /// Gives up what is under way: the process being started, if any, is
    /// killed and reaped (never left to serve on its own).
    pub async fn abandon(&mut self) {
        if let Phase::Starting { pid, .. } = std::mem::replace(&mut self.phase, Phase::Idle) {
            if let Some(pid) = pid.take() {
                info!(new_pid = pid, "abandoning the restart in progress");
                self.spawner.reaper.kill_and_wait(pid).await;
            }
        }
    }

    /// Tells `reload` (and the result file next to `pid_file`) how the
    /// latest attempt ended.
    pub fn report(
        &mut self,
        pid_file: Option<&Path>,
        pid: u32,
        generation: u64,
        outcome: &Result<i32, String>,
    ) {
        self.reported += 1;
        crate::control::reload::report(pid_file, pid, self.reported, generation, outcome);
    }
}

/// What the next process is.
pub enum Role {
    /// The next generation of a self-restarting server.
    Generation,
    /// A worker of the supervisor with this pid: a process group of its own
    /// (a terminal's Ctrl-C reaches it once, through the supervisor), and no
    /// pid file or systemd notification of its own.
    Worker(u32),
}

/// Starts the next process: the one spawner of both modes.
pub struct Spawner {
    /// Absolute path of the executable, resolved at start: a binary replaced
    /// on disk (by rename) is what the next generation runs.
    pub exe: PathBuf,
    pub argv: Vec<OsString>,
    pub config_path: PathBuf,
    pub services: HashMap<String, Handler>,
    pub reaper: Reaper,
    pub role: Role,
    /// The service's TLS session ticket secret, handed to every process
    /// started (unless its config names a key file, which wins).
    pub tickets: std::sync::Arc<crate::tls::tickets::Tickets>,
    /// A supervisor with apps: each worker gets a link to it (see
    /// `apps::link`).
    pub links: Option<crate::apps::Links>,
}

impl Spawner {
    /// A restart: validate the config, open its sockets (duplicates of
    /// `current` for kept listeners, fresh ones for new addresses; removed
    /// ones close with the old set), start the process, wait for it.
    fn restart(
        &self,
        generation: u64,
        current: &[Listener],
        env: Vec<(OsString, OsString)>,
        pid: Rc<Cell<Option<i32>>>,
    ) -> Attempt {
        let opened = crate::control::prepare::prepare(&self.config_path, &self.services)
            .map_err(|e| e.to_string())
            .and_then(|p| {
                if matches!(self.role, Role::Generation) && !p.config.apps.is_empty() {
                    return Err(format!(
                        "{}: apps need the supervisor, which owns their processes: stop gracesrv and start it again (with apps in the config it runs supervised)",
                        p.config.path.display()
                    ));
                }
                let listeners = crate::sys::listeners::open(&p.config.listeners, duplicates(current)?)?;
                Ok((p.config, listeners))
            });
        self.start(opened, generation, env, pid)
    }

    /// A replacement: the same sockets and config, started and waited for.
    fn replacement(
        &self,
        generation: u64,
        listeners: &[Listener],
        config: &Config,
        env: Vec<(OsString, OsString)>,
        pid: Rc<Cell<Option<i32>>>,
    ) -> Attempt {
        let opened = duplicates(listeners)
            .and_then(|dups| crate::sys::listeners::open(&config.listeners, dups))
            .map(|listeners| (config.clone(), listeners));
        self.start(opened, generation, env, pid)
    }

    /// Starts the process on `opened` (its config and sockets), noting its
    /// pid in `pid`; the attempt waits until it is ready.
    fn start(
        &self,
        opened: Result<(Config, Vec<Listener>), String>,
        generation: u64,
        env: Vec<(OsString, OsString)>,
        pid: Rc<Cell<Option<i32>>>,
    ) -> Attempt {
        let started = opened.and_then(|(config, listeners)| {
            let child = self.spawn(&listeners, generation, env)?;
            pid.set(Some(child.pid));
            Ok((child, config, listeners))
        });
        let reaper = self.reaper.clone();
        Box::pin(async move {
            let (child, config, listeners) = started?;
            let ready = child.ready(config.startup_timeout, &reaper).await?;
            Ok(Box::new(Started {
                ready,
                config,
                listeners,
            }))
        })
    }

    /// Forks and execs the next process with `listeners` at fds 3.. (SPEC 4.3).
    fn spawn(
        &self,
        listeners: &[Listener],
        generation: u64,
        extra: Vec<(OsString, OsString)>,
    ) -> Result<Child, String> {
        let (read, write) = handoff::ready_pipe()?;
        let worker = matches!(self.role, Role::Worker(_));
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| !HANDOFF_VARS.iter().any(|v| k == v))
            .filter(|(k, _)| !worker || k != "NOTIFY_SOCKET")
            .collect();
        if let Role::Worker(pid) = self.role {
            env.push(("GRACESRV_SUPERVISOR".into(), pid.to_string().into()));
        }
        env.push((
            crate::sys::handoff::TICKET_SECRET_VAR.into(),
            self.tickets.to_hex().into(),
        ));
        env.extend(extra);
        let link = match &self.links {
            Some(links) if worker => Some(links.open()?),
            _ => None,
        };
        let mut fds = vec![("GRACESRV_READY_FD", handoff::raw(&write))];
        fds.extend(
            link.as_ref()
                .map(|l| (crate::sys::handoff::APPS_FD, handoff::raw(l))),
        );
        let pid = handoff::spawn(SpawnArgs {
            exe: &self.exe,
            argv: &self.argv,
            env,
            sockets: listeners.iter().flat_map(Listener::handed_over).collect(),
            fds,
            exec_error: handoff::raw(&write),
            generation: Some(generation),
            dir: None,
            group: if worker {
                handoff::Group::Worker
            } else {
                handoff::Group::Same
            },
        })?;
        // Before any await: the reaper must know this pid before it can exit.
        self.reaper.watch(pid);
        drop(write);
        drop(link);
        info!(
            new_pid = pid,
            generation, "new process started; waiting for it to be ready"
        );
        Ok(Child { pid, ready: read })
    }
}

/// Duplicates of `listeners`, handed to `listeners::open` as if inherited.
fn duplicates(listeners: &[Listener]) -> Result<Vec<InheritedSocket>, String> {
    let mut out = Vec::new();
    for l in listeners {
        let err = |e: std::io::Error| format!("listener {}: {e}", l.name);
        out.push(InheritedSocket {
            name: l.name.clone(),
            socket: handoff::Socket::Stream(l.socket.try_clone().map_err(err)?),
        });
        if let Some(q) = &l.quic {
            out.push(InheritedSocket {
                name: q.name.clone(),
                socket: handoff::Socket::Datagram(q.socket.try_clone().map_err(err)?),
            });
        }
    }
    Ok(out)
}

/// A new process, started with the sockets, not yet ready.
struct Child {
    pid: i32,
    ready: OwnedFd,
}

impl Child {
    /// Waits for `READY` (SPEC 4.4-4.6), keeping the pipe: the new process
    /// keeps its end open while it serves and says `DONE` before it ends on
    /// purpose, so end of file without `DONE` means it died (see
    /// [`Ready::died`]). On an error report, an exit, or silence past
    /// `startup_timeout`, kills and reaps it and returns why.
    async fn ready(self, startup_timeout: Duration, reaper: &Reaper) -> Result<Ready, String> {
        let pid = self.pid;
        let waited = async {
            let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(self.ready)
                .map_err(|e| format!("ready pipe: {e}"))?;
            let mut pipe = ReadyPipe {
                rx,
                buf: Vec::new(),
            };
            match pipe.line().await? {
                None => Err(String::new()),
                Some(line) if line == "READY" => Ok(pipe),
                Some(line) => match line.strip_prefix("ERROR ") {
                    Some(exec) if exec.starts_with("exec:") => {
                        let errno = exec["exec:".len()..].parse().unwrap_or(0);
                        Err(format!(
                            "cannot execute the new binary: {}",
                            std::io::Error::from_raw_os_error(errno)
                        ))
                    }
                    Some(reason) => Err(reason.to_string()),
                    None => Err(format!("unexpected message on the ready pipe: {line:?}")),
                },
            }
        };
        let outcome = match tokio::time::timeout(startup_timeout, waited).await {
            Ok(Ok(pipe)) => return Ok(Ready { pid, pipe }),
            Ok(Err(reason)) => reason,
            Err(_) => format!("new process {pid} was not ready within {startup_timeout:?}"),
        };
        let status = reaper.kill_and_wait(pid).await;
        Err(if outcome.is_empty() {
            format!("new process {pid} {status} before it was ready")
        } else {
            outcome
        })
    }
}

/// Runs a serving process (not a supervisor) until it should exit; returns
/// its exit code. A worker of `supervisor` passes restart triggers on to
/// it, which runs them.
pub async fn control(
    mut gen: Generation,
    mut restart: Restart,
    mut signals: Signals,
    mut watch: Option<crate::sys::watch::Watch>,
    mut predecessors: Predecessors,
    supervisor: Option<u32>,
) -> i32 {
    let mut retry = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let (certificate, mut certificates) = tokio::sync::mpsc::unbounded_channel();
    let mut orderer = Orderer::start(&gen.config, gen.process.acme.clone(), certificate.clone());
    loop {
        let trigger = tokio::select! {
            Some(()) = certificates.recv() => Some(Trigger::Certificate),
            // The pid file could not be written (a full disk): again, until it is.
            _ = retry.tick(), if gen.pid_file_pending => {
                gen.retry_pid_file();
                None
            }
            sig = signals.next() => match sig {
                Sig::Restart => Some(Trigger::Signal),
                Sig::Reopen => {
                    crate::observe::access_log::reopen_all();
                    None
                }
                Sig::Stop => {
                    info!("stopping: draining connections");
                    drop(orderer.take());
                    gen.ending();
                    restart.abandon().await;
                    return match drain(&mut gen, &mut signals, Why::Stop, &restart.spawner.reaper).await {
                        Drained::Exit(code) => code,
                        Drained::RolledBack(_) => unreachable!("only a replaced generation rolls back"),
                    };
                }
                Sig::Quit => {
                    info!(connections = gen.process.drain.active(), "quit: closing every connection");
                    drop(orderer.take());
                    gen.ending();
                    restart.abandon().await;
                    gen.process.drain.cut_tunnels(TUNNEL_CLOSE).await;
                    gen.remove_pid_file();
                    return 0;
                }
            },
            _ = async { watch.as_mut().expect("guarded by the if").changed().await }, if watch.is_some() => {
                Some(Trigger::Watch)
            }
            event = restart.next() => {
                let Event::Done { outcome, pending, took, .. } = event else {
                    continue; // a serving process never waits to replace itself
                };
                let next_generation = gen.process.generation + 1;
                let pid = outcome.as_ref().map(|s| s.ready.pid).map_err(Clone::clone);
                restart.report(gen.config.pid_file.as_deref(), gen.process.pid, next_generation, &pid);
                let took_ms = took.as_millis() as u64;
                match outcome {
                    Ok(started) => {
                        let new_pid = started.ready.pid;
                        info!(
                            old_pid = gen.process.pid,
                            new_pid,
                            generation = next_generation,
                            took_ms,
                            "restart complete: draining the old generation"
                        );
                        if pending {
                            // The new process read its config before this
                            // trigger: pass it on so nothing is missed.
                            let _ = kill(Pid::from_raw(new_pid), Signal::SIGHUP);
                        }
                        drop(orderer.take());
                        gen.ending();
                        // The new process has its own copies of the sockets.
                        drop(started.listeners);
                        match drain(&mut gen, &mut signals, Why::Replaced(started.ready), &restart.spawner.reaper).await {
                            Drained::Exit(code) => return code,
                            Drained::RolledBack(status) => {
                                let reason = "new generation died after ready (rolled back)".to_string();
                                error!(new_pid, status, "restart failed: {reason}");
                                restart.report(gen.config.pid_file.as_deref(), gen.process.pid, next_generation, &Err(reason));
                                restart_failed(&gen);
                                // This generation serves again: it is the one
                                // the pid file and systemd must name.
                                gen.report_ready(None, supervisor.is_some());
                                orderer = Orderer::start(&gen.config, gen.process.acme.clone(), certificate.clone());
                                None
                            }
                        }
                    }
                    Err(reason) => {
                        error!(took_ms, "restart failed: {reason}");
                        restart_failed(&gen);
                        pending.then_some(Trigger::Signal)
                    }
                }
            }
        };
        let Some(trigger) = trigger else { continue };
        if let Some(supervisor) = supervisor {
            info!(
                supervisor,
                "HUP passed on to the supervisor, which runs restarts"
            );
            let _ = kill(Pid::from_raw(supervisor as i32), Signal::SIGHUP);
            continue;
        }
        // The next generation learns which generations drain, this one included.
        predecessors.forget_exited();
        let draining = predecessors.with_current();
        let mut env = vec![("GRACESRV_DRAINING".into(), draining.into())];
        if restart.is_idle() {
            // The counters the new generation counts on from (see `metrics`).
            if let Some(m) = &gen.process.metrics {
                env.push((crate::sys::handoff::METRICS_VAR.into(), m.freeze().into()));
            }
        }
        restart.request(trigger, gen.process.generation + 1, &gen.listeners, env);
    }
}

/// A successor that said `READY`, and its ready pipe, still open.
pub struct Ready {
    pub pid: i32,
    pipe: ReadyPipe,
}

/// The read end of a ready pipe, and what was read past the last line.
struct ReadyPipe {
    rx: tokio::net::unix::pipe::Receiver,
    buf: Vec<u8>,
}

impl ReadyPipe {
    /// The next line; `None` when the writer closed the pipe first.
    async fn line(&mut self) -> Result<Option<String>, String> {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line = String::from_utf8_lossy(&self.buf[..end]).to_string();
                self.buf.drain(..=end);
                return Ok(Some(line));
            }
            if self.buf.len() > 64 * 1024 {
                return Err("ready pipe: message too long".into());
            }
            let n = self
                .rx
                .read(&mut chunk)
                .await
                .map_err(|e| format!("ready pipe: {e}"))?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl Ready {
    /// Resolves if the successor dies without saying `DONE` (how it ended);
    /// never, once it said it ends on purpose.
    async fn died(mut self, reaper: &Reaper) -> String {
        loop {
            match self.pipe.line().await {
                Ok(Some(line)) if line == "DONE" => return std::future::pending().await,
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
        // Its end closed: it is exiting (or has).
        match tokio::time::timeout(Duration::from_secs(1), reaper.wait(self.pid)).await {
            Ok(status) => crate::sys::reaper::describe(status),
            Err(_) => "closed its ready pipe".into(),
        }
    }
}

/// A restart failed (or was rolled back): this generation counts on.
fn restart_failed(gen: &Generation) {
    if let Some(m) = &gen.process.metrics {
        m.restart_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        m.unfreeze();
    }
}

/// Why a generation drains.
enum Why {
    /// TERM/INT: a second one stops at once.
    Stop,
    /// This generation took over. A first TERM (systemd sends one to every
    /// process of the unit on stop) keeps draining; a second stops at once.
    Replaced(Ready),
}

/// How a drain ended.
enum Drained {
    /// The process exits with this code.
    Exit(i32),
    /// The new generation died before this one finished draining (how it
    /// ended is given): this one serves again.
    RolledBack(String),
}

/// Stops accepting and drains: in-flight requests finish, then the process
/// exits; at `shutdown_timeout` whatever is left is cut. A second TERM/INT,
/// or QUIT, stops at once.
async fn drain(gen: &mut Generation, signals: &mut Signals, why: Why, reaper: &Reaper) -> Drained {
    // A replaced generation leaves the pid file alone: it names the new
    // generation by now, or is about to (checking and then removing it would
    // race the new generation's write).
    let replaced = matches!(why, Why::Replaced(_));
    let drain = gen.process.drain.clone();
    drain.start();
    // The accept loops pause. This process keeps its copies of the sockets
    // until it exits (never shutdown(2): the accept queue is shared with the
    // next generation, and nothing in it may be lost), so that if the next
    // generation dies before this drain ends, this one accepts again and no
    // client is refused.
    drain.stopped_accepting().await;
    if !replaced {
        // A stop: nothing to take over again, and no client may wait in a
        // queue nobody will serve. Close every copy of the sockets.
        gen.listeners.clear();
        drain.close_listeners().await;
    }
    info!(
        connections = drain.active(),
        quic_connections = crate::quic::open_connections(&gen.process.http3),
        "stopped accepting"
    );
    let timeout = gen.config.shutdown_timeout;
    let started = Instant::now();
    let wait = drain.wait(timeout);
    tokio::pin!(wait);
    let (successor, mut stopping) = match why {
        Why::Replaced(ready) => (Some(ready), false),
        Why::Stop => (None, true),
    };
    let mut watching = successor.is_some();
    let successor_died = async move {
        match successor {
            Some(ready) => ready.died(reaper).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(successor_died);
    // Drained while still watching the new generation (see SUCCESSOR_GRACE).
    let mut drained = false;
    let grace = tokio::time::sleep_until((started + SUCCESSOR_GRACE).into());
    tokio::pin!(grace);
    loop {
        tokio::select! {
            _ = &mut grace, if drained => {
                info!(took_ms = started.elapsed().as_millis() as u64, "drained: exiting");
                break;
            }
            status = &mut successor_died, if watching => {
                watching = false;
                // Stopping (systemd sends TERM to every process of the
                // unit): the new generation's exit is no reason to serve.
                if stopping {
                    continue;
                }
                drain.resume();
                return Drained::RolledBack(status);
            }
            cut = &mut wait, if !drained => {
                match cut {
                    // Drained, but the new generation has not yet been up
                    // for SUCCESSOR_GRACE: stay, paused, to take over if it
                    // dies right after it said ready.
                    None if watching && !stopping && started.elapsed() < SUCCESSOR_GRACE => {
                        drained = true;
                        continue;
                    }
                    None => info!(took_ms = started.elapsed().as_millis() as u64, "drained: exiting"),
                    Some(cut) => warn!(
                        connections = cut.connections,
                        requests = gen.process.requests_in_flight(),
                        upgraded = cut.upgraded,
                        "shutdown_timeout ({timeout:?}) reached: cutting what is left"
                    ),
                }
                break;
            }
            sig = signals.next() => {
                match sig {
                    Sig::Restart => {
                        info!("draining: HUP ignored (the new generation handles restarts)");
                        continue;
                    }
                    Sig::Reopen => {
                        crate::observe::access_log::reopen_all();
                        continue;
                    }
                    Sig::Stop if !stopping => {
                        info!("stop requested: still draining (a second TERM or INT stops at once)");
                        stopping = true;
                        if drained {
                            info!("drained: exiting");
                            break;
                        }
                        continue;
                    }
                    Sig::Stop | Sig::Quit => {}
                }
                warn!(connections = drain.active(), "stopping at once: cutting every connection");
                break;
            }
        }
    }
    // What is left is cut; tunnels first hear that this side is going away.
    drain.cut_tunnels(TUNNEL_CLOSE).await;
    if !replaced {
        gen.remove_pid_file();
    }
    Drained::Exit(0)
}

/// How long a replaced generation stays, at least, ready to take over
/// again if the new one dies right after it said ready, even when it has
/// nothing left to drain.
const SUCCESSOR_GRACE: Duration = Duration::from_secs(1);

/// How long a stopping process waits for its tunnels to send their close
/// frames (see `tunnel`).
const TUNNEL_CLOSE: Duration = Duration::from_secs(1);
