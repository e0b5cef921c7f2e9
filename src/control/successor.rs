//! The new process's side of a restart (SPEC section 4), top to bottom. The
//! old process's side is `restart.rs`.
//!
//! 1. Before any thread exists, [`Inherited::from_env`] reads and removes
//!    the handoff variables (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`,
//!    `GRACESRV_READY_FD`, `GRACESRV_GENERATION`, `GRACESRV_SUPERVISOR`,
//!    `GRACESRV_DRAINING`) and adopts the fds they name.
//! 2. The process reads its config and starts serving: `Generation::start`
//!    matches the inherited sockets with the configured listeners by name
//!    (`listeners::open`) and wraps them in TLS with the certificates it
//!    finds now.
//! 3. It says `READY` on the pipe ([`Predecessor`]), or `ERROR reason` if
//!    it cannot start ([`report_error`]); then writes `pid_file` and tells
//!    systemd (`MAINPID=`, `READY=1`). A supervised worker tells only its
//!    supervisor.
//! 4. It keeps the pipe open while it serves, so the old generation can
//!    take over again if this one dies, and says `DONE` when it ends on
//!    purpose ([`Predecessor::done`]).
//! 5. It stops the oldest predecessors beyond `max_draining`
//!    (`predecessors.rs`).

use std::io::Write;
use std::os::fd::{OwnedFd, RawFd};
use std::path::Path;

use tracing::warn;

use crate::control::predecessors::Predecessors;
use crate::observe::logging::Chain;
use crate::sys::handoff::{self, HandoffError, InheritedSocket};
use crate::sys::ready::Said;

/// What a process received from whoever started it.
#[derive(Debug, Default)]
pub(crate) struct Inherited {
    pub(crate) sockets: Vec<InheritedSocket>,
    /// Where to report `READY` or an error; `None` when started by hand or by systemd.
    pub(crate) ready: Option<OwnedFd>,
    /// This process's generation: 1 unless a restart started it.
    pub(crate) generation: u64,
    /// The supervisor's pid, when this process is a supervised worker.
    pub(crate) supervisor: Option<u32>,
    /// Older generations still draining, oldest first.
    pub(crate) draining: Predecessors,
    /// The TLS session ticket secret of the service (see `tickets`).
    pub(crate) tickets: Option<crate::tls::tickets::Tickets>,
    /// The counters handed over (see `metrics`), as JSON.
    pub(crate) metrics: Option<String>,
    /// The health of proxy upstreams (see `process::upstreams`), as JSON.
    pub(crate) upstreams: Option<String>,
    /// A supervised worker's link to its supervisor (see `apps::link`).
    pub(crate) apps_link: Option<OwnedFd>,
    /// The socket requests are handed on through, and the newest
    /// generation's pid (see `sys::forward`).
    pub(crate) forward: Option<OwnedFd>,
    pub(crate) forward_newest: Option<OwnedFd>,
}

impl Inherited {
    /// Reads the handoff variables, and removes them if `remove`. They are
    /// honoured only when `LISTEN_PID` is this process's pid: the variables
    /// are inherited by every child, and a grandchild that believed them
    /// would serve on fds it does not own (or close someone else's).
    ///
    /// With `remove`, must run before any thread is started (it edits the
    /// environment).
    pub(crate) fn from_env(remove: bool) -> Result<Inherited, HandoffError> {
        let get = |k: &str| std::env::var(k).ok();
        let (pid, fds, names, ready, generation, supervisor) = (
            get("LISTEN_PID"),
            get("LISTEN_FDS"),
            get("LISTEN_FDNAMES"),
            get("GRACESRV_READY_FD"),
            get("GRACESRV_GENERATION"),
            get("GRACESRV_SUPERVISOR"),
        );
        let draining = get("GRACESRV_DRAINING");
        let tickets = get(crate::sys::handoff::TICKET_SECRET_VAR);
        let metrics = get(crate::sys::handoff::METRICS_VAR);
        let upstreams = get(crate::sys::handoff::UPSTREAMS_VAR);
        let apps_link = get(crate::sys::handoff::APPS_FD);
        let forward = get(crate::sys::forward::FD_VAR);
        let forward_newest = get(crate::sys::forward::NEWEST_VAR);
        for k in handoff::HANDOFF_VARS.iter().filter(|_| remove) {
            // SAFETY (of the call, which is safe in edition 2021): no other
            // thread exists yet, see the doc comment.
            std::env::remove_var(k);
        }
        let mut inherited = Inherited {
            generation: 1,
            ..Default::default()
        };
        let ours = pid
            .as_deref()
            .and_then(|p| p.parse::<i32>().ok())
            .is_some_and(|p| p == std::process::id() as i32);
        if !ours {
            return Ok(inherited);
        }
        if let Some(g) = generation.and_then(|g| g.parse::<u64>().ok()) {
            inherited.generation = g.max(1);
        }
        inherited.supervisor = supervisor.and_then(|s| s.parse().ok());
        inherited.tickets = tickets.and_then(|t| crate::tls::tickets::Tickets::from_handover(&t));
        inherited.metrics = metrics;
        inherited.upstreams = upstreams;
        inherited.draining = draining
            .map(|d| Predecessors::parse(&d))
            .unwrap_or_default();
        if let Some(f) = forward {
            let fd = fd_number(crate::sys::forward::FD_VAR, &f)?;
            inherited.forward = Some(handoff::adopt_forward(fd)?);
        }
        if let Some(f) = forward_newest {
            let fd = fd_number(crate::sys::forward::NEWEST_VAR, &f)?;
            inherited.forward_newest = Some(handoff::adopt_newest(fd)?);
        }
        if let Some(l) = apps_link {
            let fd = fd_number(crate::sys::handoff::APPS_FD, &l)?;
            inherited.apps_link = Some(handoff::adopt_link(fd)?);
        }
        if let Some(r) = ready {
            let fd = fd_number("GRACESRV_READY_FD", &r)?;
            inherited.ready = Some(handoff::adopt_ready_fd(fd)?);
        }
        let count: i32 = match fds {
            None => 0,
            Some(n) => n
                .parse()
                .ok()
                .filter(|n| (0..=4096).contains(n))
                .ok_or_else(|| HandoffError::Variable {
                    var: "LISTEN_FDS".into(),
                    value: n.clone(),
                    kind: "a count of file descriptors",
                })?,
        };
        let names: Vec<String> = names
            .map(|n| n.split(':').map(str::to_string).collect())
            .unwrap_or_default();
        for i in 0..count {
            let fd = handoff::LISTEN_FDS_START + i;
            let socket = handoff::adopt_listener(fd)?;
            let name = names.get(i as usize).cloned().unwrap_or_default();
            inherited.sockets.push(InheritedSocket { name, socket });
        }
        Ok(inherited)
    }
}

/// The fd number variable `var` holds.
fn fd_number(var: &str, value: &str) -> Result<RawFd, HandoffError> {
    value.parse().map_err(|_| HandoffError::Variable {
        var: var.into(),
        value: value.into(),
        kind: "a file descriptor number",
    })
}

/// The write end of the ready pipe to the previous generation, kept open
/// after `READY`: while it is open, the previous generation (still
/// draining) can take over again if this one dies.
pub(crate) struct Predecessor(std::fs::File);

impl Predecessor {
    /// Says `READY`; the pipe stays open while this process serves.
    pub(crate) fn ready(fd: OwnedFd) -> Option<Predecessor> {
        let mut f = std::fs::File::from(fd);
        match f.write_all(Said::Ready.line().as_bytes()) {
            Ok(()) => Some(Predecessor(f)),
            Err(e) => {
                warn!(
                    "cannot report ready to the previous generation: {e}",
                    e = Chain(&e)
                );
                None
            }
        }
    }

    /// This generation ends on purpose (replaced, or stopping): the previous
    /// one, if it still drains, must not take over when this one exits.
    pub(crate) fn done(mut self) {
        let _ = self.0.write_all(Said::Done.line().as_bytes());
    }
}

/// A supervised worker that serves: if its supervisor dies, it drains
/// (TERM) rather than being killed mid-request, as it is while it starts.
/// If the supervisor is already gone, it drains now.
pub(crate) fn serving_under_supervisor(supervisor: u32) {
    use nix::sys::signal::Signal;
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM) {
        warn!(
            "cannot ask for TERM when the supervisor dies: {e}",
            e = Chain(&e)
        );
    }
    if nix::unistd::getppid().as_raw() as u32 != supervisor {
        warn!("the supervisor is gone: draining");
        let _ = nix::sys::signal::raise(Signal::SIGTERM);
    }
}

/// Reports a failed start on the ready pipe, so the previous generation can
/// log the reason instead of only "exited".
pub(crate) fn report_error(ready: Option<OwnedFd>, msg: &str) {
    if let Some(fd) = ready {
        let mut f = std::fs::File::from(fd);
        let _ = f.write_all(Said::Error(msg.into()).line().as_bytes());
    }
}

/// The `STATUS=` line a serving process (or a supervisor, for its worker)
/// sends with `READY=1`: what `systemctl status` shows, and what tools and
/// tests read the bound addresses from, e.g.
/// `serving generation 3 (pid 1234) on web=127.0.0.1:8080 web-tls=[::]:8443`.
pub(crate) fn status_line(
    generation: u64,
    pid: u32,
    listeners: &[crate::sys::listeners::Listener],
) -> String {
    let mut line = format!("serving generation {generation} (pid {pid}) on");
    for l in listeners {
        line.push_str(&format!(" {}={}", l.name, l.local_addr));
    }
    line
}

pub(crate) fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, state) {
            warn!("cannot notify systemd: {e}", e = Chain(&e));
        }
    }
}

/// Removes the pid file at `path` if it still names `pid`.
pub(crate) fn remove_pid_file(path: &Path, pid: u32) {
    let ours = std::fs::read_to_string(path).is_ok_and(|s| s.trim() == pid.to_string());
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

/// Why the pid file was not written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PidFileError {
    #[error("cannot create directory {}: something that is not a directory is in the way", dir.display())]
    InTheWay { dir: std::path::PathBuf },
    #[error("cannot create directory {}: {source}", dir.display())]
    Dir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `hint` says what a person can do about it (a full disk, read-only).
    #[error("{source}{hint}")]
    Write {
        #[source]
        source: std::io::Error,
        hint: &'static str,
    },
}

/// Writes the pid atomically: a temporary file renamed over the old one, so a
/// reader never sees a half-written pid.
pub(crate) fn write_pid_file(path: &Path, pid: u32) -> Result<(), PidFileError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists || dir.exists() && !dir.is_dir() {
                PidFileError::InTheWay {
                    dir: dir.to_path_buf(),
                }
            } else {
                PidFileError::Dir {
                    dir: dir.to_path_buf(),
                    source: e,
                }
            }
        })?;
    }
    crate::sys::atomic::write_atomically(path, format!("{pid}\n").as_bytes()).map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ": the disk holding it is full",
            Some(libc::EROFS) => ": the disk holding it is read-only",
            _ => "",
        };
        PidFileError::Write { source: e, hint }
    })
}
