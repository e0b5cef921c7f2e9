//! `gracesrv reload`: restart a running server and say how it went.
//!
//! How the outcome reaches it: after every restart attempt, the process that
//! ran it writes one JSON line to `<pid_file>.restart` (atomically, like the
//! pid file): its own pid, a sequence number, and either the new generation's
//! pid or the reason the restart failed. `reload` reads the pid from
//! `pid_file`, sends it SIGHUP, and waits for a result written by that pid
//! after the signal.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    let path = result_path(pid_file);
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let line = serde_json::to_string(r).map_err(std::io::Error::other)? + "\n";
    std::fs::write(&tmp, line)?;
    std::fs::rename(&tmp, &path)
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
    let Some(pid_file) = pid_file else { return };
    let r = RestartResult {
        pid,
        seq,
        result: if outcome.is_ok() { "ready" } else { "failed" }.into(),
        new_pid: outcome.as_ref().ok().map(|p| *p as u32),
        generation: outcome.as_ref().ok().map(|_| new_generation),
        reason: outcome.as_ref().err().cloned(),
    };
    if let Err(e) = write_result(pid_file, &r) {
        tracing::warn!(pid_file = %pid_file.display(), "cannot write the restart result: {e}");
    }
}

fn read_result(pid_file: &Path) -> Option<RestartResult> {
    let text = std::fs::read_to_string(result_path(pid_file)).ok()?;
    serde_json::from_str(text.trim()).ok()
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
    let config = Config::load(config).map_err(|e| e.to_string())?;
    let pid_file = config.pid_file.clone().ok_or_else(|| {
        format!(
            "{}: reload needs a pid_file in the config",
            config.path.display()
        )
    })?;
    let text = std::fs::read_to_string(&pid_file).map_err(|e| {
        format!(
            "cannot read pid_file {}: {e} (is gracesrv running?)",
            pid_file.display()
        )
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| format!("pid_file {} does not hold a pid", pid_file.display()))?;
    let before = read_result(&pid_file).filter(|r| r.pid == pid as u32);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .map_err(|e| format!("cannot signal pid {pid} from {}: {e}", pid_file.display()))?;

    // Validation, the new process's start, and a margin.
    let deadline = Instant::now() + config.startup_timeout + Duration::from_secs(5);
    loop {
        if let Some(r) = read_result(&pid_file) {
            let fresh = r.pid == pid as u32 && before.as_ref().is_none_or(|b| r.seq > b.seq);
            if fresh {
                return match (r.result.as_str(), r.new_pid) {
                    ("ready", Some(new_pid)) => Ok(format!(
                        "reloaded: pid {new_pid} (generation {}) replaces pid {pid}",
                        r.generation.unwrap_or(0)
                    )),
                    _ => Err(format!(
                        "restart failed: {}",
                        r.reason.unwrap_or_else(|| "no reason given".into())
                    )),
                };
            }
        }
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
            return Err(format!("pid {pid} exited without reporting a restart"));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no restart result from pid {pid} within {:?}",
                config.startup_timeout
            ));
        }
        // A file has no readiness signal here without a watcher; a CLI can poll.
        std::thread::sleep(Duration::from_millis(20));
    }
}
