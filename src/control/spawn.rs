//! Starting the next process (step 3 of `restart`): the config checked in
//! this process, the next generation's sockets, fork and exec, and the
//! ready pipe, read until `READY`, an error, an exit or `startup_timeout`;
//! then watched, so that a new generation that dies is noticed.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsString;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tracing::info;

use crate::config::Config;
use crate::http::service::Handler;
use crate::sys::handoff::{self, InheritedSocket, SpawnArgs, HANDOFF_VARS};
use crate::sys::listeners::Listener;
use crate::sys::ready::Said;
use crate::sys::reaper::Reaper;

/// A new process that said `READY`, with what it was started with.
pub(crate) struct Started {
    pub(crate) ready: Ready,
    pub(crate) config: Config,
    /// Its sockets, in listener order (this process's copies).
    pub(crate) listeners: Vec<Listener>,
}

pub(super) type Attempt = Pin<Box<dyn Future<Output = Result<Box<Started>, StartError>>>>;

/// Why the next process was not started, or did not become ready.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    /// The new config, or a certificate or file it names, is not valid:
    /// nothing was started.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A config this mode cannot run (apps without the supervisor).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Listen(#[from] crate::sys::listeners::ListenError),
    #[error("listener {listener}: {source}")]
    Duplicate {
        listener: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Handoff(#[from] crate::sys::handoff::HandoffError),
    /// The supervisor's link to the new worker (`apps::link`).
    #[error("apps: {0}")]
    Link(#[source] std::io::Error),
    #[error(transparent)]
    NotReady(#[from] NotReady),
}

/// What the next process is.
pub(crate) enum Role {
    /// The next generation of a self-restarting server.
    Generation,
    /// A worker of the supervisor with this pid: a process group of its own
    /// (a terminal's Ctrl-C reaches it once, through the supervisor), and no
    /// pid file or systemd notification of its own.
    Worker(u32),
}

/// Starts the next process: the one spawner of both modes.
pub(crate) struct Spawner {
    /// Absolute path of the executable, resolved at start: a binary replaced
    /// on disk (by rename) is what the next generation runs.
    pub(crate) exe: PathBuf,
    pub(crate) argv: Vec<OsString>,
    pub(crate) config_path: PathBuf,
    pub(crate) services: HashMap<String, Handler>,
    pub(crate) reaper: Reaper,
    pub(crate) role: Role,
    /// The service's TLS session ticket secret, handed to every process
    /// started (unless its config names a key file, which wins).
    pub(crate) tickets: std::sync::Arc<crate::tls::tickets::Tickets>,
    /// A supervisor with apps: each worker gets a link to it (see
    /// `apps::link`).
    pub(crate) links: Option<crate::apps::Links>,
    /// The socket requests are handed on through (`serve::forward`), handed
    /// to every process started.
    pub(crate) forward: Option<std::sync::Arc<crate::sys::forward::ForwardSocket>>,
}

impl Spawner {
    /// A restart: validate the config, open its sockets (duplicates of
    /// `current` for kept listeners, fresh ones for new addresses; removed
    /// ones close with the old set), start the process, wait for it.
    pub(super) fn restart(
        &self,
        generation: u64,
        current: &[Listener],
        env: Vec<(OsString, OsString)>,
        pid: Rc<Cell<Option<i32>>>,
    ) -> Attempt {
        let opened = crate::control::prepare::prepare(&self.config_path, &self.services)
            .map_err(StartError::from)
            .and_then(|p| {
                if matches!(self.role, Role::Generation) && !p.config.apps.is_empty() {
                    return Err(StartError::Refused(format!(
                        "{}: apps need the supervisor, which owns their processes: stop gracesrv and start it again (with apps in the config it runs supervised)",
                        p.config.path.display()
                    )));
                }
                let listeners =
                    crate::sys::listeners::open(&p.config.listeners, duplicates(current)?)?;
                Ok((p.config, listeners))
            });
        self.start(opened, generation, env, pid)
    }

    /// A replacement: the same sockets and config, started and waited for.
    pub(super) fn replacement(
        &self,
        generation: u64,
        listeners: &[Listener],
        config: &Config,
        env: Vec<(OsString, OsString)>,
        pid: Rc<Cell<Option<i32>>>,
    ) -> Attempt {
        let opened = duplicates(listeners)
            .and_then(|dups| Ok(crate::sys::listeners::open(&config.listeners, dups)?))
            .map(|listeners| (config.clone(), listeners));
        self.start(opened, generation, env, pid)
    }

    /// Starts the process on `opened` (its config and sockets), noting its
    /// pid in `pid`; the attempt waits until it is ready.
    fn start(
        &self,
        opened: Result<(Config, Vec<Listener>), StartError>,
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
    ) -> Result<Child, StartError> {
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
            self.tickets.handover().into(),
        ));
        env.extend(extra);
        let link = match &self.links {
            Some(links) if worker => Some(links.open().map_err(StartError::Link)?),
            _ => None,
        };
        let mut fds = vec![("GRACESRV_READY_FD", handoff::raw(&write))];
        if let Some(f) = &self.forward {
            let (socket, newest) = f.raw();
            fds.push((crate::sys::forward::FD_VAR, socket));
            fds.push((crate::sys::forward::NEWEST_VAR, newest));
        }
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
fn duplicates(listeners: &[Listener]) -> Result<Vec<InheritedSocket>, StartError> {
    let mut out = Vec::new();
    for l in listeners {
        let err = |source| StartError::Duplicate {
            listener: l.name.clone(),
            source,
        };
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

/// Why a new process did not become ready (and was killed and reaped).
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotReady {
    #[error("ready pipe: {0}")]
    Pipe(std::io::Error),
    #[error("ready pipe: message too long")]
    TooLong,
    /// The exec of the new binary failed in the child.
    #[error("cannot execute the new binary: {0}")]
    Exec(std::io::Error),
    /// What the new process said was wrong (`ERROR reason`).
    #[error("{0}")]
    Reported(String),
    #[error("unexpected message on the ready pipe: {0:?}")]
    Unexpected(String),
    /// It closed its ready pipe without a word: it ended (`status`).
    #[error("new process {pid} {status} before it was ready")]
    Exited { pid: i32, status: String },
    #[error("new process {pid} was not ready within {timeout:?}")]
    Timeout { pid: i32, timeout: Duration },
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
    async fn ready(self, startup_timeout: Duration, reaper: &Reaper) -> Result<Ready, NotReady> {
        let pid = self.pid;
        let waited = async {
            let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(self.ready)
                .map_err(NotReady::Pipe)?;
            let mut pipe = ReadyPipe {
                rx,
                buf: Vec::new(),
            };
            let Some(line) = pipe.line().await? else {
                return Err(NotReady::Exited {
                    pid,
                    status: String::new(),
                });
            };
            match Said::parse(&line) {
                Some(Said::Ready) => Ok(pipe),
                Some(said) if said.exec_errno().is_some() => Err(NotReady::Exec(
                    std::io::Error::from_raw_os_error(said.exec_errno().unwrap_or(0)),
                )),
                Some(Said::Error(reason)) => Err(NotReady::Reported(reason)),
                _ => Err(NotReady::Unexpected(line)),
            }
        };
        let outcome = match tokio::time::timeout(startup_timeout, waited).await {
            Ok(Ok(pipe)) => return Ok(Ready { pid, pipe }),
            Ok(Err(why)) => why,
            Err(_) => NotReady::Timeout {
                pid,
                timeout: startup_timeout,
            },
        };
        let status = reaper.kill_and_wait(pid).await;
        Err(match outcome {
            // How it ended is known only now.
            NotReady::Exited { pid, .. } => NotReady::Exited { pid, status },
            why => why,
        })
    }
}

/// A successor that said `READY`, and its ready pipe, still open.
pub(crate) struct Ready {
    pub(crate) pid: i32,
    pipe: ReadyPipe,
}

/// The read end of a ready pipe, and what was read past the last line.
struct ReadyPipe {
    rx: tokio::net::unix::pipe::Receiver,
    buf: Vec<u8>,
}

impl ReadyPipe {
    /// The next line; `None` when the writer closed the pipe first.
    async fn line(&mut self) -> Result<Option<String>, NotReady> {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line = String::from_utf8_lossy(&self.buf[..end]).to_string();
                self.buf.drain(..=end);
                return Ok(Some(line));
            }
            if self.buf.len() > 64 * 1024 {
                return Err(NotReady::TooLong);
            }
            let n = self.rx.read(&mut chunk).await.map_err(NotReady::Pipe)?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl Ready {
    /// Resolves when the successor ends: `None` when it said `DONE` (it
    /// ends on purpose: replaced, or stopping), else how it ended.
    pub(super) async fn died(mut self, reaper: &Reaper) -> Option<String> {
        loop {
            match self.pipe.line().await {
                Ok(Some(line)) if Said::parse(&line) == Some(Said::Done) => return None,
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
        // Its end closed: it is exiting (or has).
        Some(
            match tokio::time::timeout(Duration::from_secs(1), reaper.wait(self.pid)).await {
                Ok(status) => crate::sys::reaper::describe(status),
                Err(_) => "closed its ready pipe".into(),
            },
        )
    }
}
