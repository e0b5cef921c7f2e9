//! `gracesrv deploy -c FILE APP`: start a new instance of an app, switch
//! to it once it is ready, stop the old one once nothing is in flight on
//! it, and say how it went.
//!
//! The supervisor listens for deploys on a second abstract Unix socket,
//! `@gracesrv.<pid>.deploy` (same user or root only). `deploy` first finds
//! the running gracesrv as `reload` does (the pid file, checked on the
//! control socket), then sends `APP` on a line (`APP --canary`,
//! `APP --abort`, `APP --promote`) and reads one JSON line back:
//! `{"ok": true, "message": ...}` or `{"ok": false, "message": why}`.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::apps::{How, Outcome};
use crate::config::Config;
use crate::control::reload::ControlError;
use crate::observe::logging::Chain;

/// A deploy asked for, and where its outcome goes.
pub(crate) struct Request {
    pub(crate) app: String,
    pub(crate) how: How,
    pub(crate) reply: oneshot::Sender<Outcome>,
}

/// The flag on a request's line for each way but the plain one.
const FLAGS: [(How, &str); 3] = [
    (How::Canary, "--canary"),
    (How::Abort, "--abort"),
    (How::Promote, "--promote"),
];

fn socket_name(pid: u32) -> String {
    format!("{}.deploy", crate::control::reload::control_name(pid))
}

/// Listens for deploys (see the module doc), on the current runtime.
pub(crate) fn serve() -> mpsc::UnboundedReceiver<Request> {
    let (tx, rx) = mpsc::unbounded_channel();
    let listener = match crate::control::reload::OwnListener::bind(&socket_name(std::process::id()))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(
                "no deploy socket, `gracesrv deploy` will not reach this process: {e}",
                e = Chain(&e)
            );
            return rx;
        }
    };
    tokio::spawn(async move {
        loop {
            let stream = listener.accept().await;
            let tx = tx.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                let mut read = tokio::io::BufReader::new(read).take(256);
                let asked =
                    tokio::time::timeout(Duration::from_secs(5), read.read_line(&mut line)).await;
                if !matches!(asked, Ok(Ok(n)) if n > 0) {
                    return;
                }
                // The deploy command's check on the control socket is over.
                crate::control::reload::prune_subscribers();
                let (reply, outcome) = oneshot::channel();
                let mut words = line.split_whitespace();
                let app = words.next().unwrap_or_default().to_string();
                let how = match words.next() {
                    None => Some(How::Switch),
                    Some(flag) => FLAGS.iter().find(|(_, f)| *f == flag).map(|(h, _)| *h),
                };
                match how {
                    Some(how) => {
                        let _ = tx.send(Request { app, how, reply });
                    }
                    None => {
                        let _ = reply.send(Err(format!("unknown request: {:?}", line.trim())));
                    }
                }
                let outcome = outcome
                    .await
                    .unwrap_or_else(|_| Err("gracesrv ended the deploy".into()));
                let answer = match outcome {
                    Ok(m) => serde_json::json!({ "ok": true, "message": m }),
                    Err(m) => serde_json::json!({ "ok": false, "message": m }),
                };
                let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
            });
        }
    });
    rx
}

/// `gracesrv deploy -c FILE APP`: a new instance of `app` on the running
/// service; what it says once the instance serves.
pub(crate) fn deploy(config: &Path, app: &str, how: How) -> Result<String, ControlError> {
    use std::os::linux::net::SocketAddrExt;
    let config = Config::load(config)?;
    let Some(def) = config.apps.iter().find(|a| a.name == app) else {
        return Err(ControlError::NotRunning(format!(
            "{}: no app named {app:?} in apps:",
            config.path.display()
        )));
    };
    let running =
        crate::control::reload::running(&config, "deploy").map_err(ControlError::NotRunning)?;
    let pid = running.pid;
    // Only the check was wanted, not restart results.
    drop(running);
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(socket_name(pid))
        .map_err(|e| ControlError::NotRunning(e.to_string()))?;
    let stream = std::os::unix::net::UnixStream::connect_addr(&addr).map_err(|e| {
        ControlError::NotRunning(format!(
            "pid {pid} takes no deploys ({e}): is it running with apps, under its supervisor?",
            e = Chain(&e)
        ))
    })?;
    ask(&config, def, pid, stream, app, how).map_err(ControlError::Failed)
}

/// Asks the supervisor `pid` on `stream` to deploy `app`, and waits.
fn ask(
    config: &Config,
    def: &crate::config::AppConfig,
    pid: u32,
    mut stream: std::os::unix::net::UnixStream,
    app: &str,
    how: How,
) -> Result<String, String> {
    // Starting, proving itself (or every canary step), the old one's
    // requests and its stop.
    let steps = match how {
        How::Canary => def.canary.step * def.canary.steps.len() as u32,
        _ => crate::apps::PROBATION,
    };
    let waited = def.start_timeout
        + steps
        + config.shutdown_timeout
        + def.stop_timeout
        + Duration::from_secs(10);
    let _ = stream.set_read_timeout(Some(waited));
    let flag = FLAGS.iter().find(|(h, _)| *h == how).map_or("", |(_, f)| f);
    stream
        .write_all(format!("{app} {flag}\n").as_bytes())
        .map_err(|e| format!("pid {}: {e}", pid, e = Chain(&e)))?;
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| {
            format!(
                "no answer from pid {} within {waited:?}: {e}",
                pid,
                e = Chain(&e)
            )
        })?;
    let answer: serde_json::Value = serde_json::from_str(line.trim())
        .map_err(|_| format!("pid {} gave no answer (did it stop?)", pid))?;
    let message = answer["message"].as_str().unwrap_or("").to_string();
    match answer["ok"].as_bool() {
        Some(true) => Ok(message),
        _ => Err(message),
    }
}
