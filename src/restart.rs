//! The restart (SPEC section 4), top to bottom, and the control loop that
//! runs it: what a serving process does when it is signalled.
//!
//! The states are explicit: `Serving` (idle), `Restarting` (a new process is
//! starting; further triggers are coalesced into one pending restart),
//! and then either back to `Serving` (the attempt failed: an ordinary,
//! retryable error) or `Draining` (the new process is ready; this one stops
//! accepting, finishes its connections and exits).

use std::collections::HashMap;
use std::ffi::OsString;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tracing::{error, info, warn};

use crate::generation::Generation;
use crate::handoff::{self, SpawnArgs, HANDOFF_VARS};
use crate::listeners::Listener;
use crate::reaper::Reaper;
use crate::service::Handler;
use crate::signals::{Sig, Signals};

/// How this process re-executes itself.
pub struct Restarter {
    /// Absolute path of the executable, resolved at start: a binary replaced
    /// on disk (by rename) is what the next generation runs.
    pub exe: PathBuf,
    pub argv: Vec<OsString>,
    pub config_path: PathBuf,
    pub apps: HashMap<String, Handler>,
    pub reaper: Reaper,
    /// Set when this process is a worker of a supervisor (`--supervise`):
    /// the supervisor runs restarts, so a HUP here is passed on to it.
    pub supervisor: Option<u32>,
    /// Older generations still draining (this one joins them when replaced).
    pub draining: Vec<crate::predecessors::Gen>,
}

/// Why a restart was asked for.
#[derive(Debug, Clone, Copy)]
pub enum Trigger {
    Signal,
    Watch,
}

enum State {
    Serving,
    Restarting {
        /// A trigger arrived during this attempt: run one more after it.
        pending: bool,
    },
}

type Attempt = Pin<Box<dyn Future<Output = Result<Ready, String>>>>;

/// The pid of the process a restart attempt is starting, so that a stop
/// during the attempt can take it down too (else it would become an orphan
/// serving on its own).
#[derive(Clone, Default)]
pub struct Starting(std::rc::Rc<std::cell::Cell<Option<i32>>>);

impl Starting {
    /// Notes the process being started (`None`: none now).
    pub fn set(&self, pid: Option<i32>) {
        self.0.set(pid);
    }

    /// Kills and reaps the process being started, if any.
    pub async fn abandon(&self, reaper: &Reaper) {
        if let Some(pid) = self.0.take() {
            info!(new_pid = pid, "abandoning the restart in progress");
            reaper.kill_and_wait(pid).await;
        }
    }
}

/// Runs until the process should exit; returns its exit code.
pub async fn control(
    mut gen: Generation,
    restarter: Restarter,
    mut signals: Signals,
    mut watch: Option<crate::watch::Watch>,
) -> i32 {
    let mut state = State::Serving;
    let mut seq = 0u64;
    let mut attempt: Option<Attempt> = None;
    let mut started = Instant::now();
    let starting = Starting::default();
    let mut retry = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    loop {
        let trigger = tokio::select! {
            // The pid file could not be written (a full disk): again, until it is.
            _ = retry.tick(), if gen.pid_file_pending => {
                gen.retry_pid_file();
                None
            }
            sig = signals.next() => match sig {
                Sig::Restart => Some(Trigger::Signal),
                Sig::Stop => {
                    info!("stopping: draining connections");
                    gen.ending();
                    drop(attempt.take());
                    starting.abandon(&restarter.reaper).await;
                    return match drain(&mut gen, &mut signals, Why::Stop, &restarter.reaper).await {
                        Drained::Exit(code) => code,
                        Drained::RolledBack(_) => unreachable!("only a replaced generation rolls back"),
                    };
                }
                Sig::Quit => {
                    info!(connections = gen.process.drain.active(), "quit: closing every connection");
                    gen.ending();
                    drop(attempt.take());
                    starting.abandon(&restarter.reaper).await;
                    gen.process.drain.cut_tunnels(TUNNEL_CLOSE).await;
                    gen.remove_pid_file();
                    return 0;
                }
            },
            _ = async { watch.as_mut().expect("guarded by the if").changed().await }, if watch.is_some() => {
                Some(Trigger::Watch)
            }
            outcome = async { attempt.as_mut().expect("guarded by the if").await }, if attempt.is_some() => {
                attempt = None;
                starting.0.set(None);
                report(&gen, &mut seq, &outcome.as_ref().map(|r| r.pid).map_err(Clone::clone));
                let pending = matches!(state, State::Restarting { pending: true });
                state = State::Serving;
                match outcome {
                    Ok(ready) => {
                        let new_pid = ready.pid;
                        info!(
                            old_pid = gen.process.pid,
                            new_pid,
                            generation = gen.process.generation + 1,
                            took_ms = started.elapsed().as_millis() as u64,
                            "restart complete: draining the old generation"
                        );
                        if pending {
                            // The new process read its config before this
                            // trigger: pass it on so nothing is missed.
                            let _ = kill(Pid::from_raw(new_pid), Signal::SIGHUP);
                        }
                        gen.ending();
                        match drain(&mut gen, &mut signals, Why::Replaced(ready), &restarter.reaper).await {
                            Drained::Exit(code) => return code,
                            Drained::RolledBack(status) => {
                                let reason = "new generation died after ready (rolled back)".to_string();
                                error!(new_pid, status, "restart failed: {reason}");
                                report(&gen, &mut seq, &Err(reason));
                                // This generation serves again: it is the one
                                // the pid file and systemd must name.
                                gen.report_ready(None, restarter.supervisor.is_some());
                                None
                            }
                        }
                    }
                    Err(reason) => {
                        error!(took_ms = started.elapsed().as_millis() as u64, "restart failed: {reason}");
                        if pending { Some(Trigger::Signal) } else { None }
                    }
                }
            }
        };
        if let (Some(_), Some(supervisor)) = (trigger, restarter.supervisor) {
            info!(
                supervisor,
                "HUP passed on to the supervisor, which runs restarts"
            );
            let _ = kill(Pid::from_raw(supervisor as i32), Signal::SIGHUP);
            continue;
        }
        if let Some(trigger) = trigger {
            match &mut state {
                State::Restarting { pending } => {
                    *pending = true;
                    info!(
                        ?trigger,
                        "restart already in progress: one more will follow"
                    );
                }
                State::Serving => {
                    info!(?trigger, "restarting");
                    state = State::Restarting { pending: false };
                    started = Instant::now();
                    attempt = Some(Box::pin(restart(&restarter, &gen, starting.clone())));
                }
            }
        }
    }
}

/// Tells `reload` (and the result file) how attempt number `seq + 1` ended.
fn report(gen: &Generation, seq: &mut u64, outcome: &Result<i32, String>) {
    *seq += 1;
    crate::reload::report(
        gen.config.pid_file.as_deref(),
        gen.process.pid,
        *seq,
        gen.process.generation + 1,
        outcome,
    );
}

/// One restart attempt. Returns the new process's pid once it is ready; on
/// any failure the new process is gone and this one serves on unchanged.
fn restart(
    r: &Restarter,
    gen: &Generation,
    starting: Starting,
) -> impl Future<Output = Result<Ready, String>> + 'static {
    // 2. Validate in-process first: a broken config or certificate never
    // gets as far as a new process.
    let spawned = crate::prepare::prepare(&r.config_path, &r.apps)
        .map(|p| p.config.startup_timeout)
        .map_err(|e| e.to_string())
        .and_then(|startup_timeout| {
            // 3. Spawn the new process with the sockets at 3.., in listener order.
            // The successor learns which generations drain, this one included.
            let mut draining = r.draining.clone();
            draining.extend(crate::predecessors::Gen::current());
            let env = vec![(
                "GRACESRV_DRAINING".into(),
                crate::predecessors::format(&draining).into(),
            )];
            let s = spawn_successor(
                &r.exe,
                &r.argv,
                &gen.listeners,
                gen.process.generation + 1,
                Worker::Successor(env),
                &r.reaper,
            )?;
            starting.0.set(Some(s.pid));
            Ok((s, startup_timeout))
        });
    let reaper = r.reaper.clone();
    async move {
        let (s, startup_timeout) = spawned?;
        // 4-6. Wait for READY, an error, its exit, or the startup timeout.
        await_ready_watched(s, startup_timeout, &reaper).await
    }
}

/// A new process, started with the sockets, not yet ready.
pub struct Successor {
    pub pid: i32,
    ready: OwnedFd,
}

/// What the new process will be.
pub enum Worker {
    /// The next generation of a self-restarting server, with extra variables.
    Successor(Vec<(OsString, OsString)>),
    /// A worker of the supervisor with this pid: a process group of its own
    /// (a terminal's Ctrl-C reaches it once, through the supervisor), and no
    /// pid file or systemd notification of its own.
    Supervised(u32),
}

/// Forks and execs the next generation with `listeners` at fds 3.. (SPEC 4.3).
pub fn spawn_successor(
    exe: &std::path::Path,
    argv: &[OsString],
    listeners: &[Listener],
    generation: u64,
    worker: Worker,
    reaper: &Reaper,
) -> Result<Successor, String> {
    let (read, write) = handoff::ready_pipe()?;
    let supervised = matches!(worker, Worker::Supervised(_));
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !HANDOFF_VARS.iter().any(|v| k == v))
        .filter(|(k, _)| !supervised || k != "NOTIFY_SOCKET")
        .collect();
    match worker {
        Worker::Supervised(pid) => env.push(("GRACESRV_SUPERVISOR".into(), pid.to_string().into())),
        Worker::Successor(extra) => env.extend(extra),
    }
    let pid = handoff::spawn(SpawnArgs {
        exe,
        argv,
        env,
        sockets: listeners
            .iter()
            .map(|l| (l.name.as_str(), handoff::raw(&l.socket)))
            .collect(),
        ready: handoff::raw(&write),
        generation,
        own_group: supervised,
    })?;
    // Before any await: the reaper must know this pid before it can exit.
    reaper.watch(pid);
    drop(write);
    info!(
        new_pid = pid,
        generation, "new process started; waiting for it to be ready"
    );
    Ok(Successor { pid, ready: read })
}

/// Waits for a successor's `READY` (SPEC 4.4-4.6). On an error report, an
/// exit, or silence past `startup_timeout`, kills and reaps it and returns why.
pub async fn await_ready(
    s: Successor,
    startup_timeout: Duration,
    reaper: &Reaper,
) -> Result<i32, String> {
    await_ready_watched(s, startup_timeout, reaper)
        .await
        .map(|ready| ready.pid)
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

/// [`await_ready`], keeping the pipe: a successor keeps its end open while
/// it serves, and says `DONE` before it ends on purpose, so its end of file
/// without `DONE` means it died (see [`Ready::died`]).
async fn await_ready_watched(
    s: Successor,
    startup_timeout: Duration,
    reaper: &Reaper,
) -> Result<Ready, String> {
    let pid = s.pid;
    let waited = async {
        let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(s.ready)
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
            Ok(status) => crate::reaper::describe(status),
            Err(_) => "closed its ready pipe".into(),
        }
    }
}

/// Stops accepting and drains: in-flight requests finish, then the process
/// exits; at `shutdown_timeout` whatever is left is cut. A second TERM/INT,
/// or QUIT, stops at once.
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
    info!("stopped accepting");
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
