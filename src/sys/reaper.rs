//! Reaps every child that exits, so none is left a zombie, and hands the exit
//! status to whoever waits for that pid.
//!
//! One reaper per process, driven by SIGCHLD: a supervisor (or a process
//! running as PID 1, which inherits every orphan) must reap children it never
//! started, and a second `waitpid` elsewhere would race it for the ones it did.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

#[derive(Clone)]
pub(crate) struct Reaper {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    exited: Notify,
}

#[derive(Default)]
struct State {
    /// Pids someone may wait for; others are reaped and forgotten.
    watched: HashSet<i32>,
    exits: HashMap<i32, WaitStatus>,
}

impl Reaper {
    /// Installs the SIGCHLD handler and starts reaping. Must run inside a
    /// tokio runtime, before any child is started.
    pub(crate) fn start() -> std::io::Result<Reaper> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Reaper {
            inner: Arc::new(Inner::default()),
        };
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Reaps every child that has exited (signals coalesce: one SIGCHLD may
    /// stand for several).
    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    let Some(pid) = status.pid() else { return };
                    let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
                    if st.watched.remove(&pid.as_raw()) {
                        st.exits.insert(pid.as_raw(), status);
                        drop(st);
                        self.inner.exited.notify_waiters();
                    }
                }
            }
        }
    }

    /// Marks `pid` (a child just started) as one whose exit will be asked for.
    pub(crate) fn watch(&self, pid: i32) {
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.watched.insert(pid);
    }

    /// The exit status of `pid` if it has exited.
    pub(crate) fn try_exit(&self, pid: i32) -> Option<WaitStatus> {
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.exits.remove(&pid)
    }

    /// Waits for `pid` (watched) to exit.
    pub(crate) async fn wait(&self, pid: i32) -> WaitStatus {
        loop {
            let notified = self.inner.exited.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(s) = self.try_exit(pid) {
                return s;
            }
            // The SIGCHLD may have come before `watch`: look again.
            self.reap_all();
            if let Some(s) = self.try_exit(pid) {
                return s;
            }
            notified.await;
        }
    }

    /// Kills `pid` and waits for it; returns how it ended, for the log.
    pub(crate) async fn kill_and_wait(&self, pid: i32) -> String {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        describe(self.wait(pid).await)
    }
}

/// "exited with status 3", "was killed", ...
pub(crate) fn describe(status: WaitStatus) -> String {
    use nix::sys::signal::Signal;
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, Signal::SIGKILL, _) => "was killed".to_string(),
        WaitStatus::Signaled(_, sig, _) => format!("died of {sig:?}"),
        other => format!("ended ({other:?})"),
    }
}
