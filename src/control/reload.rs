//! `gracesrv reload`: restart a running server and say how it went.
//!
//! How the outcome reaches it: every serving process (and the supervisor)
//! listens on a control socket, an abstract Unix socket named after its pid
//! (`@gracesrv.<pid>`: no file, so nothing a full or read-only disk can
//! stop, and nothing left behind). `reload` reads the pid from `pid_file`,
//! connects there, and is told the pid and config the process serves; a pid
//! with no such socket, or serving another config, is a stale pid file and
//! is never signalled. Subscribed, `reload` sends SIGHUP and waits for the
//! outcome of the next restart attempt, which the process sends to every
//! subscriber: the new generation's pid, or the reason it failed.
//!
//! Every outcome is also written to `<pid_file>.restart` (atomically, like
//! the pid file), for other tools.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::observe::logging::Chain;

/// What one restart attempt ended in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct RestartResult {
    /// The process that ran the restart (the old generation).
    pub(crate) pid: u32,
    /// Counts this process's attempts, so a reader can tell a new result from an old one.
    pub(crate) seq: u64,
    /// `ready` or `failed`.
    pub(crate) result: String,
    pub(crate) new_pid: Option<u32>,
    pub(crate) generation: Option<u64>,
    pub(crate) reason: Option<String>,
}

/// Where the results of restarts are written for a given `pid_file`.
pub(crate) fn result_path(pid_file: &Path) -> PathBuf {
    let mut p = pid_file.as_os_str().to_owned();
    p.push(".restart");
    PathBuf::from(p)
}

/// Writes `r` atomically next to `pid_file`.
pub(crate) fn write_result(pid_file: &Path, r: &RestartResult) -> std::io::Result<()> {
    let line = serde_json::to_string(r).map_err(std::io::Error::other)? + "\n";
    crate::sys::atomic::write_atomically(&result_path(pid_file), line.as_bytes())
}

/// The name of process `pid`'s control socket, in the abstract namespace.
pub(crate) fn control_name(pid: u32) -> String {
    format!("gracesrv.{pid}")
}

/// An abstract Unix socket (no file: nothing a full or read-only disk can
/// stop, nothing left behind) that only this user, or root, may use.
pub(crate) struct OwnListener {
    listener: tokio::net::UnixListener,
    me: u32,
}

impl OwnListener {
    /// Binds `@name`, on the current tokio runtime.
    pub(crate) fn bind(name: &str) -> std::io::Result<OwnListener> {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        let l = std::os::unix::net::UnixListener::bind_addr(&addr)?;
        l.set_nonblocking(true)?;
        Ok(OwnListener {
            listener: tokio::net::UnixListener::from_std(l)?,
            me: nix::unistd::geteuid().as_raw(),
        })
    }

    /// The next connection from this user or root; others are dropped.
    pub(crate) async fn accept(&self) -> tokio::net::UnixStream {
        loop {
            let Ok((stream, _)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let uid = stream.peer_cred().map(|c| c.uid());
            if uid.is_ok_and(|u| u == 0 || u == self.me) {
                return stream;
            }
        }
    }
}

/// Who gets the outcome of the next restart attempt: each connected
/// `reload`'s queue. A subscriber's socket is written by a task of its own,
/// with a deadline, so one that stops reading delays nobody: not the
/// control loop, not the restart that publishes, not another `reload`.
static SUBSCRIBERS: std::sync::Mutex<Vec<tokio::sync::mpsc::Sender<std::sync::Arc<str>>>> =
    std::sync::Mutex::new(Vec::new());

/// The most `reload`s waiting at once; beyond, the oldest is dropped.
const MAX_SUBSCRIBERS: usize = 64;
/// How long a subscriber may take to accept a line before it is dropped.
const WRITE_WITHIN: Duration = Duration::from_secs(1);

/// Listens on this process's control socket (see the module doc), on the
/// current tokio runtime. Only the same user, or root, may connect.
pub(crate) fn serve_control(config: &Path) {
    let pid = std::process::id();
    let hello: std::sync::Arc<str> =
        (serde_json::json!({ "pid": pid, "config": config }).to_string() + "\n").into();
    let listener = match OwnListener::bind(&control_name(pid)) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(
                "no control socket, `gracesrv reload` will not reach this process: {e}",
                e = Chain(&e)
            );
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let stream = listener.accept().await;
            // One result at most is ever queued (it is the last line).
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            {
                let mut subs = SUBSCRIBERS.lock().unwrap_or_else(|p| p.into_inner());
                subs.retain(|s| !s.is_closed());
                if subs.len() >= MAX_SUBSCRIBERS {
                    subs.remove(0);
                }
                subs.push(tx);
            }
            tokio::spawn(subscriber(stream, hello.clone(), rx));
        }
    });
}

/// One connected `reload` (or `deploy`, checking the pid file): told the
/// pid and config, then the outcome of the next restart, then hung up on.
/// Ends early when it hangs up, or stops reading for [`WRITE_WITHIN`]; its
/// queue closes with it, and the next publish or connection forgets it.
async fn subscriber(
    stream: tokio::net::UnixStream,
    hello: std::sync::Arc<str>,
    mut results: tokio::sync::mpsc::Receiver<std::sync::Arc<str>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut read, mut write) = stream.into_split();
    let sent = tokio::time::timeout(WRITE_WITHIN, write.write_all(hello.as_bytes())).await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    let mut ignored = [0u8; 64];
    loop {
        tokio::select! {
            line = results.recv() => {
                if let Some(line) = line {
                    let _ = tokio::time::timeout(WRITE_WITHIN, write.write_all(line.as_bytes())).await;
                }
                return;
            }
            n = read.read(&mut ignored) => {
                // Hung up (or an error): nobody is waiting.
                if !matches!(n, Ok(n) if n > 0) {
                    return;
                }
            }
        }
    }
}

/// Forgets subscribers that hung up (a `deploy` checks the pid file on the
/// control socket and leaves; a `reload` may be interrupted).
pub(crate) fn prune_subscribers() {
    let mut subs = SUBSCRIBERS.lock().unwrap_or_else(|p| p.into_inner());
    subs.retain(|s| !s.is_closed());
}

/// Queues `r` for every connected `reload`; each gets one result and is
/// hung up on. Never waits: a subscriber whose queue is full is dropped.
fn publish(r: &RestartResult) {
    let Ok(line) = serde_json::to_string(r) else {
        return;
    };
    let line: std::sync::Arc<str> = (line + "\n").into();
    let mut subs = SUBSCRIBERS.lock().unwrap_or_else(|p| p.into_inner());
    for s in subs.drain(..) {
        let _ = s.try_send(line.clone());
    }
}

/// Records the outcome of a restart run by `pid` next to `pid_file`, if the
/// config has one: the new pid and `new_generation`, or the reason it failed.
pub(crate) fn report(
    pid_file: Option<&Path>,
    pid: u32,
    seq: u64,
    new_generation: u64,
    outcome: &Result<i32, String>,
) {
    let r = RestartResult {
        pid,
        seq,
        result: if outcome.is_ok() { "ready" } else { "failed" }.into(),
        new_pid: outcome.as_ref().ok().map(|p| *p as u32),
        generation: outcome.as_ref().ok().map(|_| new_generation),
        reason: outcome.as_ref().err().cloned(),
    };
    publish(&r);
    let Some(pid_file) = pid_file else { return };
    if let Err(e) = write_result(pid_file, &r) {
        tracing::warn!(pid_file = %pid_file.display(), "cannot write the restart result: {e}", e = Chain(&e));
    }
}

/// Why `gracesrv reload` or `gracesrv deploy` did not succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The config cannot be read, or is not valid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// No gracesrv serves this config, or it cannot be asked.
    #[error("{0}")]
    NotRunning(String),
    /// The server was asked, and the restart or deploy failed (or no
    /// answer came): why.
    #[error("{0}")]
    Failed(String),
}

/// `gracesrv reload`: restarts the server running on `config` and waits
/// for the outcome, a line to print.
pub(crate) fn reload(config: &Path) -> Result<String, ControlError> {
    let config = Config::load(config)?;
    let running = running(&config, "reload").map_err(ControlError::NotRunning)?;
    restart(&config, running).map_err(ControlError::Failed)
}

fn restart(config: &Config, running: Running) -> Result<String, String> {
    use std::io::BufRead;
    let Running {
        pid,
        pid_file,
        control,
        mut reader,
    } = running;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .map_err(|e| {
        format!(
            "cannot signal pid {pid} from {}: {e}",
            pid_file.display(),
            e = Chain(&e)
        )
    })?;

    // Validation, the new process's start, and a margin.
    let waited = config.startup_timeout + Duration::from_secs(5);
    let _ = control.set_read_timeout(Some(waited));
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => return Err(format!("pid {pid} exited without reporting a restart")),
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Err(format!(
                "no restart result from pid {pid} within {waited:?}"
            ));
        }
        Err(e) => return Err(format!("pid {pid}: control socket: {e}", e = Chain(&e))),
    }
    let r: RestartResult = serde_json::from_str(line.trim())
        .map_err(|e| format!("pid {pid} sent an unreadable result: {e}", e = Chain(&e)))?;
    let outcome = match (r.result.as_str(), r.new_pid) {
        ("ready", Some(new_pid)) => format!(
            "reloaded: pid {new_pid} (generation {}) replaces pid {pid}",
            r.generation.unwrap_or(0)
        ),
        _ => {
            return Err(format!(
                "restart failed: {}",
                r.reason.unwrap_or_else(|| "no reason given".into())
            ))
        }
    };
    // The new process writes the pid file right after it says ready; say so
    // if it does not (a full disk), so the next reload is no surprise. A
    // file offers nothing to wait on: a CLI may poll it, briefly.
    let names_new = || {
        let named = std::fs::read_to_string(&pid_file).unwrap_or_default();
        r.new_pid.is_some_and(|n| named.trim() == n.to_string())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !names_new() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !names_new() {
        return Ok(format!(
            "{outcome}\nwarning: pid_file {} still names pid {pid}: the new generation could not write it (it retries; see its log)",
            pid_file.display()
        ));
    }
    Ok(outcome)
}

/// The gracesrv serving `config`, found through its `pid_file` and asked on
/// its control socket (subscribed to its restart results).
pub(crate) struct Running {
    pub(crate) pid: u32,
    pub(crate) pid_file: PathBuf,
    pub(crate) control: std::os::unix::net::UnixStream,
    pub(crate) reader: std::io::BufReader<std::os::unix::net::UnixStream>,
}

/// Finds the gracesrv serving `config` for command `what`: the pid in its
/// `pid_file`, checked (before any signal) to be a gracesrv serving this
/// very config; a stale pid file is an error.
pub(crate) fn running(config: &Config, what: &str) -> Result<Running, String> {
    use std::io::BufRead;
    let pid_file = config.pid_file.clone().ok_or_else(|| {
        format!(
            "{}: {what} needs a pid_file in the config",
            config.path.display()
        )
    })?;
    let text = std::fs::read_to_string(&pid_file).map_err(|e| {
        format!(
            "cannot read pid_file {}: {e} (is gracesrv running?)",
            pid_file.display(),
            e = Chain(&e)
        )
    })?;
    let pid: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("pid_file {} does not hold a pid", pid_file.display()))?;
    let stale = |why: String| {
        format!(
            "stale pid file {}: pid {pid} {why}; not signalled",
            pid_file.display()
        )
    };
    let control = connect_control(pid)
        .map_err(|e| stale(format!("is not a running gracesrv ({e})", e = Chain(&e))))?;
    let _ = control.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = std::io::BufReader::new(control.try_clone().map_err(|e| e.to_string())?);
    let mut hello = String::new();
    reader.read_line(&mut hello).map_err(|e| {
        stale(format!(
            "did not answer on its control socket ({e})",
            e = Chain(&e)
        ))
    })?;
    let hello: serde_json::Value =
        serde_json::from_str(hello.trim()).map_err(|_| stale("is not a gracesrv".into()))?;
    let serves = hello["config"].as_str().map(PathBuf::from);
    let same = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if serves.as_deref().map(same) != Some(same(&config.path)) {
        return Err(stale(format!(
            "serves {}",
            serves.map_or("another config".into(), |p| p.display().to_string())
        )));
    }
    Ok(Running {
        pid,
        pid_file,
        control,
        reader,
    })
}

/// Connects to process `pid`'s control socket.
fn connect_control(pid: u32) -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(control_name(pid))?;
    std::os::unix::net::UnixStream::connect_addr(&addr)
}
