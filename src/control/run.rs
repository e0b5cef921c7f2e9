//! A serving process's loop (step 4 of `restart`): it serves, restarts on
//! its triggers, and once replaced (or told to stop) drains and exits.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::{error, info, warn};

use crate::control::generation::Generation;
use crate::control::predecessors::Predecessors;
use crate::observe::logging::Chain;
use crate::sys::reaper::Reaper;
use crate::sys::signals::{Sig, Signals};

use super::restart::{Event, Restart, Trigger};
use super::spawn::Ready;

/// What only the serving generation runs, stopped when dropped: the ACME
/// orderer (`acme::run`), and the keeper of a fleet's ticket keys
/// (`tickets::share`).
struct Keepers(Vec<tokio::task::JoinHandle<()>>);

impl Keepers {
    fn start(gen: &Generation, restart: tokio::sync::mpsc::UnboundedSender<()>) -> Option<Keepers> {
        let mut tasks = Vec::new();
        if gen.config.acme.is_some() {
            tasks.push(tokio::spawn(crate::tls::acme::run(
                gen.config.clone(),
                gen.process.acme.clone(),
                move || {
                    let _ = restart.send(());
                },
            )));
        }
        if let Some(crate::config::TicketsConfig::Store(store)) = &gen.config.tls_tickets {
            match crate::store::Store::open(store) {
                Ok(store) => tasks.push(tokio::spawn(crate::tls::tickets::share(
                    gen.tickets.clone(),
                    store,
                ))),
                Err(e) => error!("tls_tickets: store unusable: {e}", e = Chain(&e)),
            }
        }
        (!tasks.is_empty()).then_some(Keepers(tasks))
    }
}

impl Drop for Keepers {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A generation's active health checks of proxy upstreams
/// (`proxy::health`), stopped when dropped: only a serving generation checks.
struct HealthChecks(Vec<tokio::task::JoinHandle<()>>);

impl HealthChecks {
    fn start(proxies: &[Arc<crate::http::proxy::Proxy>]) -> Option<HealthChecks> {
        let tasks: Vec<_> = proxies
            .iter()
            .filter(|p| p.has_health_check())
            .map(|p| tokio::spawn(crate::http::proxy::health::check(p.clone())))
            .collect();
        (!tasks.is_empty()).then_some(HealthChecks(tasks))
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Code an application runs at a point of its generation's life.
pub(crate) type Hook = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// An application's lifecycle hooks (`Server::on_ready`, `on_drain`,
/// `on_exit`). A supervisor has none: its serving processes run them.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    /// The generation serves (and again after a rolled-back restart).
    pub(crate) ready: Option<Hook>,
    /// The generation starts draining; the drain waits for it, within
    /// `shutdown_timeout`.
    pub(crate) drain: Option<Hook>,
    /// The process is about to exit; awaited within `shutdown_timeout`.
    pub(crate) exit: Option<Hook>,
}

impl Hooks {
    /// Runs the ready hook beside the serving (not awaited).
    pub(crate) fn ready(&self) {
        if let Some(h) = &self.ready {
            tokio::spawn(h());
        }
    }

    /// Runs the exit hook, for at most `limit`.
    pub(crate) async fn exit(&self, limit: Duration) {
        if let Some(h) = &self.exit {
            if tokio::time::timeout(limit, h()).await.is_err() {
                warn!("on_exit hook not done within shutdown_timeout ({limit:?}): exiting");
            }
        }
    }
}

/// Runs a serving process (not a supervisor) until it should exit; returns
/// its exit code. A worker of `supervisor` passes restart triggers on to
/// it, which runs them.
pub(crate) async fn control(
    mut gen: Generation,
    mut restart: Restart,
    mut signals: Signals,
    mut watch: Option<crate::sys::watch::Watch>,
    mut predecessors: Predecessors,
    supervisor: Option<u32>,
    hooks: &Hooks,
) -> i32 {
    let mut retry = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let (certificate, mut certificates) = tokio::sync::mpsc::unbounded_channel();
    let mut keepers = Keepers::start(&gen, certificate.clone());
    let mut checks = HealthChecks::start(&gen.proxies);
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
                Sig::Finish => {
                    info!("USR2 ignored: only a draining generation finishes early");
                    None
                }
                Sig::Stop => {
                    info!("stopping: draining connections");
                    drop(keepers.take());
                    drop(checks.take());
                    gen.ending();
                    restart.abandon().await;
                    return match drain(&mut gen, &mut signals, Why::Stop, &restart.spawner.reaper, hooks).await {
                        Drained::Exit(code) => code,
                        Drained::RolledBack(_) => unreachable!("only a replaced generation rolls back"),
                    };
                }
                Sig::Quit => {
                    info!(connections = gen.process.drain.active(), "quit: closing every connection");
                    drop(keepers.take());
                    drop(checks.take());
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
                let pid = outcome.as_ref().map(|s| s.ready.pid).map_err(|e| crate::observe::logging::causes(e));
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
                        drop(keepers.take());
                    drop(checks.take());
                        gen.ending();
                        // The new process has its own copies of the sockets.
                        drop(started.listeners);
                        match drain(&mut gen, &mut signals, Why::Replaced(started.ready), &restart.spawner.reaper, hooks).await {
                            Drained::Exit(code) => return code,
                            Drained::RolledBack(status) => {
                                let reason = "new generation died after ready (rolled back)".to_string();
                                error!(new_pid, status, "restart failed: {reason}");
                                restart.report(gen.config.pid_file.as_deref(), gen.process.pid, next_generation, &Err(reason));
                                restart_failed(&gen);
                                // This generation serves again: it is the one
                                // the pid file and systemd must name.
                                gen.report_ready(None, supervisor.is_some());
                                hooks.ready();
                                keepers = Keepers::start(&gen, certificate.clone());
                                checks = HealthChecks::start(&gen.proxies);
                                None
                            }
                        }
                    }
                    Err(reason) => {
                        error!(took_ms, "restart failed: {}", Chain(&reason));
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
            if !gen.process.upstreams.is_empty() {
                let health = crate::process::upstreams::hand_over(
                    gen.process.upstreams.iter().map(|u| &**u),
                );
                env.push((crate::sys::handoff::UPSTREAMS_VAR.into(), health.into()));
            }
        }
        restart.request(trigger, gen.process.generation + 1, &gen.listeners, env);
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
async fn drain(
    gen: &mut Generation,
    signals: &mut Signals,
    why: Why,
    reaper: &Reaper,
    hooks: &Hooks,
) -> Drained {
    // A replaced generation leaves the pid file alone: it names the new
    // generation by now, or is about to (checking and then removing it would
    // race the new generation's write).
    let replaced = matches!(why, Why::Replaced(_));
    let drain = gen.process.drain.clone();
    drain.start();
    // The application's drain hook runs beside the drain, which waits for it.
    let mut hook = hooks.drain.as_ref().map(|h| tokio::spawn(h()));
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
    // QUIT, or a second TERM: nothing more is waited for.
    let mut stopping_now = false;
    let grace = tokio::time::sleep_until((started + SUCCESSOR_GRACE).into());
    tokio::pin!(grace);
    // Told to finish (USR2, see `Sig::Finish`): what is left is cut then.
    let finish_by = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(finish_by);
    let mut finishing = false;
    loop {
        tokio::select! {
            _ = &mut finish_by, if finishing => {
                warn!(connections = drain.active(), "told to finish: cutting what is left");
                stopping_now = true;
                break;
            }
            _ = &mut grace, if drained => {
                info!(took_ms = started.elapsed().as_millis() as u64, "drained: exiting");
                break;
            }
            status = &mut successor_died, if watching => {
                watching = false;
                let Some(status) = status else {
                    // The new generation ends on purpose (replaced in
                    // turn): nothing to take over; drained, this one goes.
                    if drained {
                        info!(took_ms = started.elapsed().as_millis() as u64, "drained: exiting");
                        break;
                    }
                    continue;
                };
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
                    None if watching && !stopping && !finishing && started.elapsed() < SUCCESSOR_GRACE => {
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
                    Sig::Finish => {
                        if drained {
                            break;
                        }
                        if !finishing {
                            info!(connections = drain.active(), "told to finish: HTTP/2 connections get their GOAWAY now");
                            finishing = true;
                            drain.finish();
                            finish_by.as_mut().reset(tokio::time::Instant::now() + crate::sys::signals::FINISH_WITHIN);
                        }
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
                stopping_now = true;
                break;
            }
        }
    }
    if let Some(h) = hook.take() {
        let left = (started + timeout).saturating_duration_since(Instant::now());
        if !stopping_now && tokio::time::timeout(left, h).await.is_err() {
            warn!("on_drain hook not done within shutdown_timeout ({timeout:?}): exiting");
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
