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
//! 3. An attempt (`spawn::Spawner`) validates the new config in this process
//!    (a broken config or certificate never gets as far as a new process),
//!    opens the next generation's sockets (kept ones are duplicates of the
//!    current ones, so the accept queue is shared), forks and execs the
//!    binary with them at fds 3.., and waits on the ready pipe for `READY`,
//!    an error, an exit or `startup_timeout`.
//! 4. What success means is the mode's: a serving process drains and exits
//!    (`run::control`, then `run::drain`); a supervisor tells its old worker to
//!    drain (`supervisor.rs`). Older generations still draining are capped
//!    (`predecessors.rs`).
//! 5. A replaced generation keeps its sockets until it exits and watches the
//!    new one's ready pipe: if the new generation dies, it serves again.

use std::cell::Cell;
use std::ffi::OsString;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tracing::info;

use crate::config::Config;
use crate::sys::listeners::Listener;

use super::spawn::{Attempt, Spawner, StartError, Started};

/// Why a process is being started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// HUP (or `gracesrv reload`).
    Signal,
    /// A watched file changed.
    Watch,
    /// A supervisor's worker died: its replacement (no new config).
    Replace,
    /// ACME stored a new certificate.
    Certificate,
}

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
pub(crate) enum Event {
    /// An attempt ended; the machine is idle again.
    Done {
        trigger: Trigger,
        outcome: Result<Box<Started>, StartError>,
        /// A trigger arrived during the attempt.
        pending: bool,
        took: Duration,
    },
    /// The back-off is over: start the replacement.
    Due { pending: bool },
}

/// The restart state machine, for a serving process and a supervisor alike.
pub(crate) struct Restart {
    phase: Phase,
    pub(crate) spawner: Spawner,
    /// Attempts reported so far (`gracesrv reload` matches results by it).
    reported: u64,
}

impl Restart {
    pub(crate) fn new(spawner: Spawner) -> Restart {
        Restart {
            phase: Phase::Idle,
            spawner,
            reported: 0,
        }
    }

    pub(crate) fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::Idle)
    }

    /// Asks for a restart to generation `generation` from `current` sockets.
    /// Idle: the attempt starts now (true). Otherwise one more is noted, to
    /// follow the attempt or the replacement under way (false).
    pub(crate) fn request(
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
    pub(crate) fn replace(
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
    pub(crate) fn wait_until(&mut self, after: Duration, pending: bool) {
        self.phase = Phase::Waiting {
            at: tokio::time::Instant::now() + after,
            pending,
        };
    }

    /// The next event; never resolves while idle. Cancel-safe: the attempt
    /// lives in the machine, not in this future.
    pub(crate) async fn next(&mut self) -> Event {
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
    pub(crate) async fn abandon(&mut self) {
        if let Phase::Starting { pid, .. } = std::mem::replace(&mut self.phase, Phase::Idle) {
            if let Some(pid) = pid.take() {
                info!(new_pid = pid, "abandoning the restart in progress");
                self.spawner.reaper.kill_and_wait(pid).await;
            }
        }
    }

    /// Tells `reload` (and the result file next to `pid_file`) how the
    /// latest attempt ended.
    pub(crate) fn report(
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
