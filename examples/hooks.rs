//! An application's lifecycle hooks: code it runs when its generation is
//! ready, when it starts draining (the drain waits for it), and when the
//! process is about to exit. Each event is appended to the file named by
//! `HOOKS_LOG` as `PID EVENT`; the drain hook takes `HOOKS_DRAIN_MS`
//! (default 300) between `drain-start` and `drain-done`, as closing a
//! database pool's connections might.
//!
//! Run: `HOOKS_LOG=hooks.log cargo run --example hooks -- -c app.yaml`,
//! then `kill -HUP <pid>` and `kill -TERM <new pid>`.

use std::io::Write;
use std::time::Duration;

fn note(log: &str, event: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        // One write per line: old and new generations append at once.
        let line = format!("{} {event}\n", std::process::id());
        let _ = f.write_all(line.as_bytes());
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let config = match args.iter().position(|a| a == "-c" || a == "--config") {
        Some(i) if i + 1 < args.len() => args[i + 1].clone(),
        _ => "app.yaml".to_string(),
    };
    let log = std::env::var("HOOKS_LOG").unwrap_or_else(|_| "hooks.log".into());
    let drain_ms: u64 = std::env::var("HOOKS_DRAIN_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let (ready, drain, exit) = (log.clone(), log.clone(), log);
    let code = gracesrv::Server::new(config)
        .on_ready(move || {
            let log = ready.clone();
            async move { note(&log, "ready") }
        })
        .on_drain(move || {
            let log = drain.clone();
            async move {
                note(&log, "drain-start");
                tokio::time::sleep(Duration::from_millis(drain_ms)).await;
                note(&log, "drain-done");
            }
        })
        .on_exit(move || {
            let log = exit.clone();
            async move { note(&log, "exit") }
        })
        .run();
    std::process::exit(code);
}
