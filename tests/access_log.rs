//! The access log: one line per request, across restarts and rotations.

mod util;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::signal::Signal;
use serde_json::json;
use util::client::{self, Target};
use util::config::Config;
use util::{SmallDisk, TestServer};

/// Clients sending requests with unique targets until stopped; the targets
/// that were answered 200.
struct UniqueLoad {
    stop: Arc<AtomicBool>,
    answered: Arc<Mutex<Vec<String>>>,
    failed: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl UniqueLoad {
    fn start(targets: Vec<Target>) -> UniqueLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (c, t) in targets.into_iter().enumerate() {
            let (stop, answered, failed) = (stop.clone(), answered.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                let mut conn: Option<client::Conn> = None;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let path = format!("/r?c={c}&i={i}");
                    let usable = match conn.as_mut() {
                        Some(c) => c.usable().await,
                        None => false,
                    };
                    if !usable {
                        conn = client::connect(&t).await.ok();
                    }
                    let Some(cn) = conn.as_mut() else { continue };
                    match cn.get(&path).await {
                        Ok(r) if r.status == 200 => answered.lock().unwrap().push(path),
                        // Not sent: the connection was closing; a client retries.
                        Err(e) if e.starts_with(client::NOT_SENT) => conn = None,
                        Ok(r) => failed.lock().unwrap().push(format!("{path}: {}", r.status)),
                        Err(e) => failed.lock().unwrap().push(format!("{path}: {e}")),
                    }
                }
            }));
        }
        UniqueLoad {
            stop,
            answered,
            failed,
            tasks,
        }
    }

    async fn wait_for(&self, n: usize) {
        let deadline = std::time::Instant::now() + util::WAIT;
        while self.answered.lock().unwrap().len() < n {
            assert!(std::time::Instant::now() < deadline, "load stalled");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        assert!(failed.is_empty(), "{failed:#?}");
        self.answered.lock().unwrap().clone()
    }
}

/// Stops the server (TERM to the serving generation) and waits for every
/// generation to be gone, so every line is written.
async fn stop_all(srv: &mut TestServer) {
    srv.signal(Signal::SIGTERM);
    for pid in srv.ready_pids.clone() {
        util::wait_gone(pid).await;
    }
}

/// Every line of `files` parsed as JSON; their targets, counted.
fn targets(files: &[std::path::PathBuf]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for line in text.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
            for key in [
                "time",
                "listener",
                "remote",
                "method",
                "protocol",
                "duration_ms",
            ] {
                assert!(!v[key].is_null(), "{key} in {line}");
            }
            *seen
                .entry(v["target"].as_str().unwrap().to_string())
                .or_insert(0) += 1;
        }
    }
    seen
}

fn assert_each_once(answered: &[String], seen: &HashMap<String, usize>) {
    assert!(answered.len() > 100, "only {} requests", answered.len());
    for a in answered {
        assert_eq!(seen.get(a), Some(&1), "{a} logged {:?} times", seen.get(a));
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "logged more than once: {twice:?}");
}

fn logged_config() -> Config {
    Config::basic().set(
        "access_log",
        json!({ "path": "access.log", "format": "json" }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_logged_once_across_twenty_restarts() {
    let mut srv = TestServer::builder()
        .config(logged_config())
        .env("GRACESRV_LOG", "gracesrv=info")
        .start()
        .await;
    let web = Target::plain(srv.addr("web"));
    let tls = Target::tls(srv.addr("web-tls"), srv.tls());
    let load = UniqueLoad::start(vec![web.clone(), web.clone(), tls.clone(), tls.h2()]);
    load.wait_for(50).await;
    for _ in 0..20 {
        srv.restart().await;
        let n = load.answered.lock().unwrap().len();
        load.wait_for(n + 20).await;
    }
    let answered = load.stop().await;
    stop_all(&mut srv).await;
    let seen = targets(&[srv.dir.path().join("access.log")]);
    assert_each_once(&answered, &seen);
    // The TLS lines carry the TLS facts.
    let text = std::fs::read_to_string(srv.dir.path().join("access.log")).unwrap();
    let line = text.lines().find(|l| l.contains("\"HTTP/2.0\"")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["tls_version"], "TLSv1.3", "{line}");
    assert_eq!(v["sni"], "localhost", "{line}");
    assert_eq!(v["status"], 200, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_under_load_loses_no_line() {
    let mut srv = TestServer::builder().config(logged_config()).start().await;
    let web = Target::plain(srv.addr("web"));
    let load = UniqueLoad::start(vec![web.clone(), web.clone(), web]);
    load.wait_for(100).await;
    // What logrotate does: rename, then USR1 (postrotate).
    let log = srv.dir.path().join("access.log");
    let rotated = srv.dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    srv.signal(Signal::SIGUSR1);
    let deadline = std::time::Instant::now() + util::WAIT;
    while !log.exists() {
        assert!(std::time::Instant::now() < deadline, "never reopened");
        let n = load.answered.lock().unwrap().len();
        load.wait_for(n + 10).await;
    }
    let n = load.answered.lock().unwrap().len();
    load.wait_for(n + 100).await;
    let answered = load.stop().await;
    stop_all(&mut srv).await;
    let seen = targets(&[rotated.clone(), log.clone()]);
    assert_each_once(&answered, &seen);
    assert!(
        std::fs::read_to_string(&log).unwrap().lines().count() > 50,
        "the new file is written"
    );
}

#[tokio::test]
async fn the_combined_format_is_what_nginx_writes() {
    let config = Config::basic().set(
        "access_log",
        json!({ "path": "access.log", "format": "combined" }),
    );
    let mut srv = TestServer::builder().config(config).start().await;
    let port = srv.addr("web").port();
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-A", "agent \"x\"", "-e", "http://ref/"])
        .arg(format!("http://127.0.0.1:{port}/q?a=1"))
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    stop_all(&mut srv).await;
    let text = std::fs::read_to_string(srv.dir.path().join("access.log")).unwrap();
    let line = text.lines().next().unwrap();
    let re = regex_lite(line);
    assert!(re, "{line}");
    assert!(
        line.ends_with(&format!(
            "\"GET /q?a=1 HTTP/1.1\" 200 {} \"http://ref/\" \"agent \\\"x\\\"\"",
            out.stdout.len()
        )),
        "{line}"
    );
}

/// `IP - - [DD/Mon/YYYY:HH:MM:SS +0000] "`
fn regex_lite(line: &str) -> bool {
    let Some((ip, rest)) = line.split_once(" - - [") else {
        return false;
    };
    ip.parse::<std::net::IpAddr>().is_ok()
        && rest.len() > 28
        && rest.as_bytes()[2] == b'/'
        && rest[26..].starts_with("] \"")
        && rest[20..26] == *" +0000"
}

/// A full disk loses lines, counted in `status`; serving goes on.
#[tokio::test]
async fn a_full_disk_drops_lines_and_counts_them() {
    let config = Config::basic().set(
        "access_log",
        json!({ "path": "logs/access.log", "format": "json" }),
    );
    let (dir, certs, path) = TestServer::prepare(&config.yaml());
    let disk = SmallDisk::mount(&dir.path().join("logs"));
    let srv = TestServer::start_in(dir, certs, path, &[]).await;
    disk.fill();
    let web = Target::plain(srv.addr("web"));
    let mut c = client::connect(&web).await.unwrap();
    let deadline = std::time::Instant::now() + util::WAIT;
    loop {
        for _ in 0..200 {
            assert_eq!(c.get("/").await.unwrap().status, 200, "serving goes on");
        }
        let s: serde_json::Value =
            serde_json::from_str(&c.get("/status").await.unwrap().body).unwrap();
        if s["access_log_dropped"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no line dropped: {s}");
    }
    srv.wait_log("access log: cannot write").await;
    drop(disk);
}
