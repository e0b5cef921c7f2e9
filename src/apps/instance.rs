//! One instance of an app: its process, its socket, the check that it is
//! ready, and its stop.
//!
//! The supervisor waits for each instance's exit in exactly one place (the
//! runner's exit task); nothing here waits on the pid, so a readiness check
//! or a stop never races it for the exit status.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{AppConfig, AppReady, AppSocket};
use crate::sys::handoff::{self, Group, SpawnArgs, HANDOFF_VARS};
use crate::sys::ready::Said;

/// A started instance.
pub(crate) struct Process {
    pub(crate) pid: i32,
    /// Where it serves: its socket's (or `PORT`'s) 127.0.0.1 address.
    pub(crate) addr: SocketAddr,
    pub(crate) started_at: SystemTime,
    pub(crate) started: Instant,
    /// Says why a failed exec failed; end of file once the exec succeeded.
    exec_errors: Option<OwnedFd>,
    /// `ready: notify`: where the instance sends `READY=1`.
    notify: Option<std::os::unix::net::UnixDatagram>,
}

/// Why an app instance was not started, or will never be ready.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InstanceError {
    /// The command is not an executable file, or not on `PATH`.
    #[error("{0}")]
    Program(String),
    #[error("cannot bind a socket for the app: {0}")]
    Bind(#[source] nix::Error),
    /// The system refused a socket or pipe the start needs (`what`).
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Spawn(#[from] crate::sys::handoff::HandoffError),
    /// The exec of the command failed in the child.
    #[error("cannot execute the command: {0}")]
    Exec(std::io::Error),
    #[error("no notify socket")]
    NoNotifySocket,
}

impl InstanceError {
    fn io(what: &'static str, e: impl Into<std::io::Error>) -> InstanceError {
        InstanceError::Io {
            what,
            source: e.into(),
        }
    }
}

/// Starts instance `id` of `app`. The caller watches its pid's exit (it is
/// registered with `reaper` before this returns).
pub(crate) fn start(
    app: &AppConfig,
    id: u64,
    reaper: &crate::sys::reaper::Reaper,
) -> Result<Process, InstanceError> {
    let program = app.resolve_program().map_err(InstanceError::Program)?;
    // fd: a fresh socket of its own (its accept queue is this instance's
    // only); port: a free port, which the app binds itself.
    let listener = crate::sys::listeners::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .map_err(InstanceError::Bind)?;
    let addr = listener
        .local_addr()
        .map_err(|e| InstanceError::io("app socket", e))?;
    let listener = match app.socket {
        AppSocket::Fd => Some(listener),
        AppSocket::Port => None,
    };
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !HANDOFF_VARS.iter().any(|v| k == v))
        .filter(|(k, _)| k != "NOTIFY_SOCKET" && k != "PORT")
        .filter(|(k, _)| !app.env.iter().any(|(n, _)| k == n.as_str()))
        .collect();
    env.extend(app.env.iter().map(|(k, v)| (k.into(), v.into())));
    if app.socket == AppSocket::Port {
        env.push(("PORT".into(), addr.port().to_string().into()));
    }
    let notify = match app.ready {
        AppReady::Notify => {
            let (socket, name) = notify_socket(&app.name, id)?;
            env.push(("NOTIFY_SOCKET".into(), name.into()));
            Some(socket)
        }
        _ => None,
    };
    let (errors, exec_error) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| InstanceError::io("pipe", e))?;
    let argv: Vec<OsString> = app.command.iter().map(OsString::from).collect();
    let pid = handoff::spawn(SpawnArgs {
        exe: &program,
        argv: &argv,
        env,
        sockets: listener
            .as_ref()
            .map(|l| vec![(app.name.as_str(), handoff::raw(l))])
            .unwrap_or_default(),
        fds: Vec::new(),
        exec_error: handoff::raw(&exec_error),
        generation: None,
        dir: Some(&app.dir),
        group: Group::App,
    })?;
    // Before any await: the reaper must know this pid before it can exit.
    reaper.watch(pid);
    // The instance has its own copy of the socket: when it exits, the
    // socket closes, and connecting to it is refused (which the proxy
    // retries on the next instance) rather than queued for nobody.
    drop(listener);
    drop(exec_error);
    Ok(Process {
        pid,
        addr,
        started_at: SystemTime::now(),
        started: Instant::now(),
        exec_errors: Some(errors),
        notify,
    })
}

/// A datagram socket for `NOTIFY_SOCKET`, in the abstract namespace (no
/// file to clean up), named after this process, the app and the instance.
fn notify_socket(
    app: &str,
    id: u64,
) -> Result<(std::os::unix::net::UnixDatagram, String), InstanceError> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("gracesrv.{}.{app}.{id}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name)
        .map_err(|e| InstanceError::io("notify socket", e))?;
    let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr)
        .map_err(|e| InstanceError::io("notify socket", e))?;
    Ok((socket, format!("@{name}")))
}

impl Process {
    /// Resolves once the instance is ready, or says why it never will be
    /// (its exec failed). The caller bounds it with `start_timeout`, and
    /// drops it if the instance exits.
    pub(crate) fn ready(
        &mut self,
        how: &AppReady,
    ) -> impl std::future::Future<Output = Result<(), InstanceError>> + Send + 'static {
        let errors = self.exec_errors.take();
        let notify = self.notify.take();
        let addr = self.addr;
        let how = how.clone();
        async move {
            if let Some(errors) = errors {
                exec_succeeded(errors).await?;
            }
            match how {
                AppReady::Notify => match notify {
                    Some(socket) => notified(socket).await,
                    None => Err(InstanceError::NoNotifySocket),
                },
                AppReady::Http(path) => answers(addr, &path, true).await,
                AppReady::Answers => answers(addr, "/", false).await,
            }
        }
    }

    /// Asks the instance to stop (its `stop_signal`).
    pub(crate) fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid), sig);
    }

    /// Kills the instance and every process of its group (what it started).
    pub(crate) fn kill(&self) {
        let _ = kill(Pid::from_raw(-self.pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
    }
}

/// End of file on the close-on-exec pipe: the exec succeeded. Anything
/// read is the child's `ERROR exec:<errno>`.
async fn exec_succeeded(errors: OwnedFd) -> Result<(), InstanceError> {
    let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(errors)
        .map_err(|e| InstanceError::io("exec pipe", e))?;
    let mut said = Vec::new();
    let _ = rx.read_to_end(&mut said).await;
    let said = String::from_utf8_lossy(&said);
    match Said::parse(said.trim()).and_then(|s| s.exec_errno()) {
        None => Ok(()),
        Some(errno) => Err(InstanceError::Exec(std::io::Error::from_raw_os_error(
            errno,
        ))),
    }
}

/// Polls `GET path` until it is answered (with 2xx or 3xx when `success`).
async fn answers(addr: SocketAddr, path: &str, success: bool) -> Result<(), InstanceError> {
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(status) = get_status(addr, path).await {
            if !success || (200..400).contains(&status) {
                return Ok(());
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// The status of `GET path` on `addr`, if it answers within a second.
async fn get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: gracesrv-ready-check\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.ok()?;
        // Read the whole answer (it ends the connection), so the app never
        // writes to a closed socket; a little of it is enough to look at.
        let mut head = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let got = s.read(&mut chunk).await.ok()?;
            if got == 0 || head.len() > 64 * 1024 {
                break;
            }
            head.extend_from_slice(&chunk[..got]);
        }
        let line = std::str::from_utf8(head.get(..12)?).ok()?;
        line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(1), ask)
        .await
        .ok()?
}

/// Waits for `READY=1` on the notify socket.
async fn notified(socket: std::os::unix::net::UnixDatagram) -> Result<(), InstanceError> {
    let io = |e| InstanceError::io("notify socket", e);
    socket.set_nonblocking(true).map_err(io)?;
    let socket = tokio::net::UnixDatagram::from_std(socket).map_err(io)?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).await.map_err(io)?;
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l.trim() == "READY=1")
        {
            return Ok(());
        }
    }
}
