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

/// What one restart attempt ended in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestartResult {
    /// The process that ran the restart (the old generation).
    pub pid: u32,
    /// Counts this process's attempts, so a reader can tell a new result from an old one.
    pub seq: u64,
    /// `ready` or `failed`.
    pub result: String,
    pub new_pid: Option<u32>,
    pub generation: Option<u64>,
    pub reason: Option<String>,
}

/// Where the results of restarts are written for a given `pid_file`.
pub fn result_path(pid_file: &Path) -> PathBuf {
    let mut p = pid_file.as_os_str().to_owned();
    p.push(".restart");
    PathBuf::from(p)
}

/// Writes `r` atomically next to `pid_file`.
pub fn write_result(pid_file: &Path, r: &RestartResult) -> std::io::Result<()> {
    let line = serde_json::to_string(r).map_err(std::io::Error::other)? + "\n";
    write_atomically(&result_path(pid_file), line.as_bytes())
}

/// Writes `path` through a temporary file renamed over it, so a reader never
/// sees half of it; the temporary file is removed if anything fails (a full
/// disk leaves no empty files behind).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically_mode(path, bytes, 0o666)
}

/// [`write_atomically`], the file created with `mode` (before the umask)
/// from its first byte: a secret written with 0600 is never readable by
/// others, not even between its creation and a `chmod`.
pub fn write_atomically_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    // A file left by an earlier process of this pid would keep its mode.
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The name of process `pid`'s control socket, in the abstract namespace.
pub fn control_name(pid: u32) -> String {
    format!("gracesrv.{pid}")
}

/// An abstract Unix socket (no file: nothing a full or read-only disk can
/// stop, nothing left behind) that only this user, or root, may use.
pub struct OwnListener {
    listener: tokio::net::UnixListener,
    me: u32,
}

impl OwnListener {
    /// Binds `@name`, on the current tokio runtime.
    pub fn bind(name: &str) -> std::io::Result<OwnListener> {
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
    pub async fn accept(&self) -> tokio::net::UnixStream {
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

/// Who gets the outcome of each restart attempt: connected `reload`s.
static SUBSCRIBERS: std::sync::Mutex<Vec<std::os::unix::net::UnixStream>> =
    std::sync::Mutex::new(Vec::new());

/// The most `reload`s waiting at once; beyond, the oldest is dropped.
const MAX_SUBSCRIBERS: usize = 64;

/// Listens on this process's control socket (see the module doc), on the
/// current tokio runtime. Only the same user, or root, may connect.
pub fn serve_control(config: &Path) {
    let pid = std::process::id();
    let hello = serde_json::json!({ "pid": pid, "config": config }).to_string() + "\n";
    let listener = match OwnListener::bind(&control_name(pid)) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("no control socket, `gracesrv reload` will not reach this process: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let stream = listener.accept().await;
            let Ok(stream) = stream.into_std() else {
                continue;
            };
            use std::io::Write;
            let mut stream = stream;
            let ok = stream.set_nonblocking(false).is_ok()
                && stream
                    .set_write_timeout(Some(Duration::from_secs(1)))
                    .is_ok()
                && stream.write_all(hello.as_bytes()).is_ok();
            if ok {
                prune_subscribers();
                let mut subs = SUBSCRIBERS.lock().unwrap_or_else(|p| p.into_inner());
                if subs.len() >= MAX_SUBSCRIBERS {
                    subs.remove(0);
                }
                subs.push(stream);
            }
        }
    });
}

/// Forgets subscribers that hung up (a `deploy` checks the pid file on the
/// control socket and leaves; a `reload` may be interrupted): their
/// sockets would otherwise stay open until the next restart.
pub fn prune_subscribers() {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut subs = SUBSCRIBERS.lock().unwrap_or_else(|p| p.into_inner());
    subs.retain(|s| {
        let mut b = [0u8; 1];
        // Still connected: nothing to read (EAGAIN). Hung up: end of file.
        !matches!(
            recv(
                s.as_raw_fd(),
                &mut b,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
            ),
            Ok(0) | Err(nix::errno::Errno::ECONNRESET)
        )
    });
}

/// Sends `r` to every connected `reload`; they hang up after one.
fn publish(r: &RestartResult) {
    use std::io::Write;
    let Ok(line) = serde_json::to_string(r) else {
        return;
    };
    let mut subs = SUBSCRIBERS.lock().unwrap_or_else(|p| p.into_inner());
    for mut s in subs.drain(..) {
        let _ = s.write_all(format!("{line}\n").as_bytes());
    }
}

/// Records the outcome of a restart run by `pid` next to `pid_file`, if the
/// config has one: the new pid and `new_generation`, or the reason it failed.
pub fn report(
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
        tracing::warn!(pid_file = %pid_file.display(), "cannot write the restart result: {e}");
    }
}

/// Runs `gracesrv reload -c FILE`; returns the exit code.
pub fn run(config: &Path) -> i32 {
    match reload(config) {
        Ok(msg) => {
            println!("{msg}");
            0
        }
        Err(msg) => {
            eprintln!("gracesrv reload: {msg}");
            1
        }
    }
}

fn reload(config: &Path) -> Result<String, String> {
    use std::io::BufRead;
    let config = Config::load(config).map_err(|e| e.to_string())?;
    let Running {
        pid,
        pid_file,
        control,
        mut reader,
    } = running(&config, "reload")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .map_err(|e| format!("cannot signal pid {pid} from {}: {e}", pid_file.display()))?;

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
        Err(e) => return Err(format!("pid {pid}: control socket: {e}")),
    }
    let r: RestartResult = serde_json::from_str(line.trim())
        .map_err(|e| format!("pid {pid} sent an unreadable result: {e}"))?;
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
pub struct Running {
    pub pid: u32,
    pub pid_file: PathBuf,
    pub control: std::os::unix::net::UnixStream,
    pub reader: std::io::BufReader<std::os::unix::net::UnixStream>,
}

/// Finds the gracesrv serving `config` for command `what`: the pid in its
/// `pid_file`, checked (before any signal) to be a gracesrv serving this
/// very config; a stale pid file is an error.
pub fn running(config: &Config, what: &str) -> Result<Running, String> {
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
            pid_file.display()
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
    let control =
        connect_control(pid).map_err(|e| stale(format!("is not a running gracesrv ({e})")))?;
    let _ = control.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = std::io::BufReader::new(control.try_clone().map_err(|e| e.to_string())?);
    let mut hello = String::new();
    reader
        .read_line(&mut hello)
        .map_err(|e| stale(format!("did not answer on its control socket ({e})")))?;
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
