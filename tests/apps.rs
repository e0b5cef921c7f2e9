//! Applications behind gracesrv (`apps:`, `proxy: { app }`, `gracesrv
//! deploy`), with a real app: `tests/apps/app.py`, a Python HTTP server
//! (the standard library only) that takes its socket from fd 3 (or binds
//! `PORT`) and answers `pid P version V`.

mod util;

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use util::client::{self, Target};
use util::config::Config;
use util::load::{Kind, Load};
use util::{alive, fd_count, wait_gone, TestServer, BIN};

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/app.py");

/// The basic config with `/` of both listeners proxied to app `api`
/// (`app` overrides the app's settings).
fn config(app: Value) -> Config {
    let mut api = json!({
        "name": "api",
        "command": ["python3", APP],
        "ready": { "http": "/healthz" },
        "start_timeout": "5s",
        "stop_timeout": "5s",
    });
    if let (Some(a), Some(o)) = (api.as_object_mut(), app.as_object()) {
        a.extend(o.clone());
    }
    let proxy = json!({ "app": "api", "connect_timeout": "10s" });
    Config::basic()
        .set("pid_file", "run/gracesrv.pid")
        .set("apps", json!([api]))
        .edit("web", |l| l.route("/", "proxy", proxy.clone()))
        .edit("web-tls", |l| l.route("/", "proxy", proxy.clone()))
}

async fn start(app: Value) -> TestServer {
    TestServer::builder().config(config(app)).start().await
}

/// What the app answers on `/`: its pid and version.
async fn answer(srv: &TestServer) -> (u32, String) {
    let r = client::get(&Target::plain(srv.addr("web")), "/")
        .await
        .expect("the app answers");
    assert_eq!(r.status, 200, "{}", r.body);
    let words: Vec<&str> = r.body.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"pid"), "{}", r.body);
    (words[1].parse().unwrap(), words[3].to_string())
}

/// Sets what the next instance reads at start (`version`, `mode`).
fn set(srv: &TestServer, file: &str, value: &str) {
    std::fs::write(srv.dir.path().join(file), value).unwrap();
}

/// Starts `gracesrv deploy -c FILE api`; resolves to its exit status and output.
fn spawn_deploy(srv: &TestServer) -> tokio::task::JoinHandle<(bool, String)> {
    spawn_deploy_with(srv, None)
}

/// `gracesrv deploy -c FILE api`: exit status and output.
async fn deploy(srv: &TestServer) -> (bool, String) {
    spawn_deploy(srv).await.unwrap()
}

/// App `api` as `status` reports it: its instances and any deploy under way.
async fn app_status(srv: &TestServer) -> Value {
    let r = client::get(&Target::plain(srv.addr("web")), "/status")
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&r.body).unwrap();
    v["apps"]["api"].clone()
}

/// The app's instances, as `status` reports them.
async fn instances(srv: &TestServer) -> Vec<Value> {
    app_status(srv).await["instances"]
        .as_array()
        .unwrap()
        .clone()
}

/// Waits until `status` lists `n` instances (the worker hears of an
/// instance's exit over its link, a moment after `deploy` does).
async fn wait_instances(srv: &TestServer, n: usize) -> Vec<Value> {
    wait_status(srv, Duration::from_secs(10), |now| now.len() == n).await
}

/// Waits up to `within` until the instances `status` lists satisfy `done`;
/// returns them.
async fn wait_status(
    srv: &TestServer,
    within: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let list = |app: &Value| app["instances"].as_array().cloned().unwrap_or_default();
    list(&wait_app(srv, within, |app| done(&list(app))).await)
}

/// Waits up to `within` until app `api`'s `status` satisfies `done`;
/// returns it.
async fn wait_app(srv: &TestServer, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let now = app_status(srv).await;
        if done(&now) {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status: {now}\n{}",
            srv.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn deploys_under_load_lose_nothing_and_leave_no_old_instance() {
    let srv = start(json!({})).await;
    let (first, version) = answer(&srv).await;
    assert_eq!(version, "0");
    let web = Target::plain(srv.addr("web"));
    let tls = Target::tls(srv.addr("web-tls"), srv.tls());
    let mut load = Load::new();
    load.spawn(Kind::KeepAlive, web.clone(), "/", 2);
    load.spawn(Kind::NewConnection, web.clone(), "/", 1);
    load.spawn(Kind::H2 { streams: 4 }, tls, "/", 1);
    load.stats.wait_for_more(50).await;
    let supervisor = srv.pid();
    let fds = fd_count(supervisor);
    let mut pids = vec![first];
    for i in 1..=10 {
        set(&srv, "version", &i.to_string());
        let (ok, out) = deploy(&srv).await;
        assert!(ok, "deploy {i}: {out}\n{}", srv.logs());
        assert!(out.contains("serves") && out.contains("stopped"), "{out}");
        let (pid, version) = answer(&srv).await;
        assert_eq!(
            version,
            i.to_string(),
            "deploy {i}: the new version answers"
        );
        assert!(!pids.contains(&pid));
        pids.push(pid);
        load.stats.wait_for_more(20).await;
    }
    let stats = load.stop().await;
    assert_eq!(
        stats.failed(),
        0,
        "failed requests: {:?}",
        stats.errors.lock().unwrap()
    );
    assert!(stats.ok() > 500, "{} requests", stats.ok());
    // Only the last instance is left.
    let left = wait_instances(&srv, 1).await;
    assert_eq!(left[0]["pid"], *pids.last().unwrap());
    for old in &pids[..pids.len() - 1] {
        assert!(!alive(*old), "old instance {old} is still running");
    }
    // Nothing leaks in the supervisor: fds flat, every instance reaped.
    assert_eq!(
        fd_count(supervisor),
        fds,
        "the supervisor's fds after 10 deploys"
    );
    assert_eq!(util::zombie_children(supervisor), 0);
}

#[tokio::test]
async fn a_broken_version_leaves_the_old_one_serving() {
    let srv = start(json!({ "start_timeout": "2s" })).await;
    let (serving, _) = answer(&srv).await;
    for (mode, reason) in [
        ("exit", "exited with status 3 before it was ready"),
        ("hang", "not ready within start_timeout"),
        ("crash-after-first", "after it was ready"),
    ] {
        set(&srv, "mode", mode);
        set(&srv, "version", mode);
        let (ok, out) = deploy(&srv).await;
        assert!(!ok, "{mode}: deploy must fail: {out}");
        assert!(out.contains(reason), "{mode}: {out}");
        assert_eq!(answer(&srv).await, (serving, "0".to_string()), "{mode}");
        wait_instances(&srv, 1).await;
    }
    // A good version deploys after all that.
    std::fs::remove_file(srv.dir.path().join("mode")).unwrap();
    set(&srv, "version", "good");
    let (ok, out) = deploy(&srv).await;
    assert!(ok, "{out}");
    assert_eq!(answer(&srv).await.1, "good");
}

#[tokio::test]
async fn a_slow_request_completes_across_a_deploy() {
    let srv = start(json!({})).await;
    let (old, _) = answer(&srv).await;
    let web = Target::plain(srv.addr("web"));
    let slow = tokio::spawn(async move { client::get(&web, "/slow").await });
    // Wait until the request is in flight on the instance.
    wait_status(&srv, Duration::from_secs(5), |now| now[0]["in_flight"] == 1).await;
    set(&srv, "version", "2");
    let started = std::time::Instant::now();
    let (ok, out) = deploy(&srv).await;
    assert!(ok, "{out}");
    let r = slow.await.unwrap().expect("the slow request completes");
    assert_eq!(r.status, 200);
    assert!(r.body.starts_with(&format!("pid {old} ")), "{}", r.body);
    // The old instance was stopped only once its request was done.
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(!alive(old));
    assert_eq!(answer(&srv).await.1, "2");
}

#[tokio::test]
async fn a_killed_instance_costs_only_its_requests_in_flight() {
    let srv = start(json!({})).await;
    let (victim, _) = answer(&srv).await;
    let web = Target::plain(srv.addr("web"));
    let mut load = Load::new();
    load.spawn(Kind::KeepAlive, web.clone(), "/", 2);
    load.spawn(Kind::NewConnection, web.clone(), "/", 1);
    load.stats.wait_for_more(50).await;
    let killed = std::time::Instant::now();
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    // The next instance serves, within its start time.
    let next = loop {
        let (pid, _) = answer(&srv).await;
        if pid != victim {
            break pid;
        }
        assert!(killed.elapsed() < Duration::from_secs(5), "no new instance");
    };
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "{:?}",
        killed.elapsed()
    );
    load.stats.wait_for_more(50).await;
    let stats = load.stop().await;
    // Three clients, each with at most one request in flight.
    assert!(
        stats.failed() <= 3,
        "{} failed: {:?}",
        stats.failed(),
        stats.errors.lock().unwrap()
    );
    assert!(stats.pids.lock().unwrap().contains(&next));
}

#[tokio::test]
async fn an_app_that_binds_port_itself() {
    let srv = start(json!({ "socket": "port" })).await;
    let (first, _) = answer(&srv).await;
    set(&srv, "version", "2");
    let (ok, out) = deploy(&srv).await;
    assert!(ok, "{out}");
    let (pid, version) = answer(&srv).await;
    assert_ne!(pid, first);
    assert_eq!(version, "2");
}

#[tokio::test]
async fn a_restart_leaves_unchanged_apps_alone_and_a_stop_stops_them() {
    let mut srv = start(json!({})).await;
    let (app, _) = answer(&srv).await;
    srv.supervised_restart().await;
    assert_eq!(answer(&srv).await.0, app, "same app instance after a HUP");
    // A changed definition is deployed by the restart.
    srv.write(&config(json!({ "env": { "APP_SETTING": "2" } })));
    srv.supervised_restart().await;
    wait_gone(app).await;
    let (next, _) = answer(&srv).await;
    assert_ne!(next, app);
    // Stopping gracesrv stops the app.
    srv.signal(Signal::SIGTERM);
    let status = srv.wait_first_exit().await;
    assert!(status.success(), "{status:?}");
    assert!(!alive(next), "the app outlived gracesrv");
}

#[tokio::test]
async fn app_config_errors_name_their_place() {
    let check = |config: &Config| {
        let (dir, _certs, path) = TestServer::prepare(&config.yaml());
        let out = Command::new(BIN)
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        drop(dir);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = check(&config(json!({})).edit("web", |l| {
        l.route("/other", "proxy", json!({ "app": "nope" }))
    }));
    assert!(!ok);
    assert!(err.contains("proxy.app: no app named \"nope\""), "{err}");
    assert!(err.contains("server.yaml:"), "{err}");
    let (ok, err) = check(&config(json!({ "command": ["no-such-program-here"] })));
    assert!(!ok);
    assert!(
        err.contains("apps[0].command: no-such-program-here is not found on PATH"),
        "{err}"
    );
    let (ok, err) = check(&config(json!({ "socket": "pipe" })));
    assert!(!ok);
    assert!(
        err.contains("apps[0].socket: \"pipe\" is not a socket kind"),
        "{err}"
    );
    let (ok, err) = check(&config(json!({ "stop_signal": "NOPE" })));
    assert!(!ok);
    assert!(err.contains("apps[0].stop_signal"), "{err}");
    // A canary's steps, limits and keys, each at its line and column.
    for (canary, want) in [
        (
            json!({ "steps": [5, 50] }),
            "apps[0].canary.steps: must end at 100",
        ),
        (
            json!({ "steps": [50, 25, 100] }),
            "apps[0].canary.steps: \"25\" is not a share from 1 to 100, above the one before",
        ),
        (
            json!({ "max_error_increase": "lots" }),
            "apps[0].canary.max_error_increase: \"lots\" is not a percentage (1%)",
        ),
        (
            json!({ "max_p99_ratio": 0.5 }),
            "apps[0].canary.max_p99_ratio: must be at least 1",
        ),
        (
            json!({ "min_requests": "many" }),
            "apps[0].canary.min_requests: \"many\" is not a whole number",
        ),
        (
            json!({ "step": "0s" }),
            "apps[0].canary.step: must be more than 0",
        ),
        (json!({ "stepz": "1s" }), "unknown field `stepz`"),
    ] {
        let (ok, err) = check(&config(json!({ "canary": canary })));
        assert!(!ok, "{canary}");
        assert!(err.contains(want), "{canary}: {err}");
        assert!(
            err.split("server.yaml:")
                .nth(1)
                .is_some_and(|r| r.split(':').take(2).all(|n| n.parse::<u32>().is_ok())),
            "file:line:column: {err}"
        );
    }
    let (ok, err) = check(&config(
        json!({ "canary": { "steps": [10, 100], "step": "5s", "max_error_increase": "0.5%", "max_p99_ratio": 2, "min_requests": 50 } }),
    ));
    assert!(ok, "{err}");
}

#[tokio::test]
async fn a_websocket_to_the_old_instance_ends_as_in_a_restart() {
    let srv = TestServer::builder()
        .config(config(json!({})).set("shutdown_timeout", "1s"))
        .start()
        .await;
    let (old, _) = answer(&srv).await;
    let mut ws = util::ws::open(srv.addr("web"), "/ws").await;
    assert_eq!(util::ws::echo(&mut ws, "hello").await.unwrap(), "hello");
    set(&srv, "version", "2");
    let deploy = spawn_deploy(&srv);
    // New requests go to the new instance; the WebSocket stays on the old.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while answer(&srv).await.1 != "2" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new version never served"
        );
    }
    assert_eq!(util::ws::echo(&mut ws, "still").await.unwrap(), "still");
    // At shutdown_timeout both ends hear "going away" (1001).
    assert_eq!(util::ws::closed(&mut ws).await, 1001);
    let (ok, out) = deploy.await.unwrap();
    assert!(ok, "{out}");
    wait_gone(old).await;
    let code = std::fs::read_to_string(srv.dir.path().join("ws-close")).unwrap();
    assert_eq!(code, "1001", "the app's end of the WebSocket");
}

#[tokio::test]
async fn notify_readiness_and_a_watched_file_deploy() {
    let srv = start(json!({ "ready": "notify", "watch": ["version"] })).await;
    let (first, _) = answer(&srv).await;
    // The watch is on the file's directory; writing it deploys.
    set(&srv, "version", "watched");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (pid, version) = answer(&srv).await;
        if version == "watched" {
            assert_ne!(pid, first);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no deploy after the change"
        );
        // A deploy started by a file change has no signal for the test to wait on.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_gone(first).await;
}

#[tokio::test]
async fn an_instance_that_ignores_its_stop_signal_is_killed() {
    let srv = start(json!({ "stop_timeout": "1s" })).await;
    set(&srv, "mode", "ignore-term");
    set(&srv, "version", "stubborn");
    let (ok, out) = deploy(&srv).await;
    assert!(ok, "{out}");
    let (stubborn, _) = answer(&srv).await;
    std::fs::remove_file(srv.dir.path().join("mode")).unwrap();
    let started = std::time::Instant::now();
    let (ok, out) = deploy(&srv).await;
    assert!(ok, "{out}");
    assert!(!alive(stubborn), "killed after stop_timeout");
    assert!(started.elapsed() >= Duration::from_secs(1));
    let logs = srv.logs();
    assert!(
        logs.contains("stop_timeout (1s) reached: killing the instance"),
        "{logs}"
    );
}

/// A real application server, unchanged, deployed three times under load:
/// the answers carry the new version, no request fails, every old instance
/// (the server's master process) is stopped.
async fn real_server_deploys_under_load(command: Value) {
    let srv = start(json!({
        "command": command,
        "ready": { "http": "/" },
        "start_timeout": "10s",
    }))
    .await;
    let (_, version) = answer(&srv).await;
    assert_eq!(version, "0");
    let master = instances(&srv).await[0]["pid"].as_u64().unwrap() as u32;
    let web = Target::plain(srv.addr("web"));
    let mut load = Load::new();
    load.spawn(Kind::KeepAlive, web.clone(), "/", 2);
    load.spawn(Kind::NewConnection, web, "/", 1);
    load.stats.wait_for_more(50).await;
    let mut masters = vec![master];
    for i in 1..=3 {
        set(&srv, "version", &i.to_string());
        let (ok, out) = deploy(&srv).await;
        assert!(ok, "deploy {i}: {out}");
        assert_eq!(answer(&srv).await.1, i.to_string());
        masters.push(wait_instances(&srv, 1).await[0]["pid"].as_u64().unwrap() as u32);
        load.stats.wait_for_more(20).await;
    }
    let stats = load.stop().await;
    assert_eq!(stats.failed(), 0, "{:?}", stats.errors.lock().unwrap());
    for old in &masters[..3] {
        wait_gone(*old).await;
    }
}

const APPS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps");

/// gunicorn (Debian's), two workers, a WSGI app. gunicorn adopts
/// `LISTEN_FDS` by itself; `--bind fd://3` as well would make gunicorn 20
/// adopt fd 3 twice and fail with EBADF.
#[tokio::test]
async fn gunicorn_deploys_under_load() {
    real_server_deploys_under_load(json!([
        "gunicorn",
        "--workers",
        "2",
        "--pythonpath",
        APPS_DIR,
        "wsgi:application"
    ]))
    .await;
}

/// uvicorn (Debian's python3-uvicorn, which has no `uvicorn` script: run as
/// a module of Debian's python3), an ASGI app, given the socket as `--fd 3`.
#[tokio::test]
async fn uvicorn_deploys_under_load() {
    real_server_deploys_under_load(json!([
        "/usr/bin/python3",
        "-m",
        "uvicorn",
        "--fd",
        "3",
        "--app-dir",
        APPS_DIR,
        "asgi:application"
    ]))
    .await;
}

/// `gracesrv deploy -c FILE api [FLAG]` (`--canary`, `--abort`,
/// `--promote`), started now; resolves to its exit status and output.
fn spawn_deploy_with(
    srv: &TestServer,
    flag: Option<&'static str>,
) -> tokio::task::JoinHandle<(bool, String)> {
    let config = srv.config.clone();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(BIN)
            .args(["deploy", "-c"])
            .arg(&config)
            .arg("api")
            .args(flag)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    })
}

/// The canary deploy under way, as `status` shows it (`null` if none).
async fn canary_status(srv: &TestServer) -> Value {
    app_status(srv).await["deploy"].clone()
}

/// Waits until the canary deploy's status satisfies `done`; returns it.
async fn wait_canary(srv: &TestServer, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    wait_app(srv, within, |app| done(&app["deploy"])).await["deploy"].clone()
}

/// The app's config with `canary` (and `/metrics`), each instance waiting
/// `delay_ms` per answer (the first one too: the file is there before it
/// starts).
async fn start_canary(canary: Value, delay_ms: u32) -> TestServer {
    let config = config(json!({ "canary": canary }))
        .edit("web", |l| l.route("/metrics", "metrics", json!({})));
    TestServer::builder()
        .config(config)
        .before(move |dir, _| std::fs::write(dir.join("delay"), delay_ms.to_string()).unwrap())
        .start()
        .await
}

/// Issue 33: a good version goes through 5, 25, 50 and 100% under load,
/// each step compared with the old one, and is promoted; no request fails.
#[tokio::test]
async fn a_canary_deploy_goes_through_every_step_and_is_promoted_with_nothing_lost() {
    let canary = json!({ "steps": [5, 25, 50, 100], "step": "1500ms", "min_requests": 20, "max_p99_ratio": 3 });
    let srv = start_canary(canary, 10).await;
    let mut load = Load::new();
    load.spawn(Kind::KeepAlive, Target::plain(srv.addr("web")), "/", 4);
    load.stats.wait_for_more(50).await;
    set(&srv, "version", "1");
    let deploy = spawn_deploy_with(&srv, Some("--canary"));
    // Every step shows in `status`, with both versions' figures.
    let mut shares = Vec::new();
    let mut compared = false;
    while !deploy.is_finished() {
        let d = canary_status(&srv).await;
        if let Some(share) = d["share"].as_u64() {
            if shares.last() != Some(&share) {
                shares.push(share);
            }
            compared |=
                d["new"]["requests"].as_u64() > Some(0) && d["old"]["requests"].as_u64() > Some(0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, out) = deploy.await.unwrap();
    assert!(ok, "{out}\n{}", srv.logs());
    assert!(
        out.contains("every step passed") && out.contains("stopped"),
        "{out}"
    );
    assert_eq!(shares, [5, 25, 50, 100], "the shares status showed");
    assert!(compared, "status showed both versions' figures");
    assert_eq!(answer(&srv).await.1, "1");
    let stats = load.stop().await;
    assert_eq!(
        stats.failed(),
        0,
        "failed: {:?}",
        stats.errors.lock().unwrap()
    );
    assert_eq!(wait_instances(&srv, 1).await[0]["state"], "serving");
    assert_eq!(
        canary_status(&srv).await,
        Value::Null,
        "no deploy under way"
    );
}

/// Issue 33: a version that answers 500 to one request in ten is rolled
/// back at the first step; `deploy` exits 1 with both versions' figures,
/// and under 1% of all requests failed meanwhile.
#[tokio::test]
async fn a_canary_with_errors_is_rolled_back_at_the_first_step() {
    let canary = json!({ "step": "30s", "min_requests": 30, "max_p99_ratio": 100 });
    let (srv, old, stats, out) = rolled_back(canary, 0, ("mode", "errors")).await;
    assert!(out.contains("rolled back at step 1 (5%): 5xx"), "{out}");
    assert!(
        out.contains("old (instance 1)") && out.contains("new (instance 2)"),
        "{out}"
    );
    let all = stats.ok() + stats.failed();
    assert!(
        stats.failed() * 100 < all,
        "{} of {all} failed: {:?}",
        stats.failed(),
        stats.errors.lock().unwrap()
    );
    assert_eq!(
        answer(&srv).await,
        (old, "0".to_string()),
        "the old one serves"
    );
    assert_eq!(wait_instances(&srv, 1).await[0]["pid"], old);
}

/// A canary deploy of version 1, with `new` written for it (file, value),
/// under load, that must fail: the server, the old instance's pid, the
/// load's figures and what `deploy` said.
async fn rolled_back(
    canary: Value,
    delay_ms: u32,
    new: (&str, &str),
) -> (TestServer, u32, std::sync::Arc<util::load::Stats>, String) {
    let srv = start_canary(canary, delay_ms).await;
    let (old, _) = answer(&srv).await;
    let mut load = Load::new();
    load.spawn(Kind::KeepAlive, Target::plain(srv.addr("web")), "/", 4);
    load.stats.wait_for_more(50).await;
    set(&srv, "version", "1");
    set(&srv, new.0, new.1);
    let (ok, out) = spawn_deploy_with(&srv, Some("--canary")).await.unwrap();
    assert!(!ok, "{out}");
    (srv, old, load.stop().await, out)
}

/// Issue 33: a version three times slower is rolled back on its p99.
#[tokio::test]
async fn a_slower_canary_is_rolled_back_on_latency() {
    let canary = json!({ "step": "30s", "min_requests": 30 });
    let (srv, _, stats, out) = rolled_back(canary, 10, ("delay", "40")).await;
    assert!(out.contains("rolled back at step 1 (5%): p99"), "{out}");
    assert_eq!(
        stats.failed(),
        0,
        "failed: {:?}",
        stats.errors.lock().unwrap()
    );
    assert_eq!(answer(&srv).await.1, "0");
}

/// Issue 33: a restart (HUP) in the middle of a canary deploy keeps its
/// step, its figures and its instances; the deploy then completes.
#[tokio::test]
async fn a_restart_keeps_a_canary_deploy_where_it_was() {
    let canary =
        json!({ "steps": [10, 50, 100], "step": "3s", "min_requests": 10, "max_p99_ratio": 3 });
    let mut srv = start_canary(canary, 5).await;
    let mut load = Load::new();
    load.spawn(Kind::KeepAlive, Target::plain(srv.addr("web")), "/", 3);
    load.stats.wait_for_more(50).await;
    set(&srv, "version", "1");
    let deploy = spawn_deploy_with(&srv, Some("--canary"));
    let before = wait_canary(&srv, Duration::from_secs(20), |d| {
        d["step"] == 2 && d["new"]["requests"].as_u64() > Some(0)
    })
    .await;
    srv.supervised_restart().await;
    let after = canary_status(&srv).await;
    assert_eq!(after["canary"], before["canary"], "{before}\n{after}");
    assert!(after["step"].as_u64() >= Some(2), "{before}\n{after}");
    if after["step"] == 2 {
        assert!(
            after["new"]["requests"].as_u64() >= before["new"]["requests"].as_u64(),
            "the step's figures go on: {before}\n{after}"
        );
    }
    // The metrics carry the deploy, by version; promtool takes them.
    let text = client::get(&Target::plain(srv.addr("web")), "/metrics")
        .await
        .unwrap()
        .body;
    if !deploy.is_finished() {
        for series in [
            "gracesrv_app_canary_share{app=\"api\"}",
            "gracesrv_app_canary_requests{app=\"api\",version=\"new\",instance=\"2\"}",
            "gracesrv_app_canary_requests{app=\"api\",version=\"old\",instance=\"1\"}",
        ] {
            assert!(text.contains(series), "{series}:\n{text}");
        }
    }
    util::promtool(&text);
    let (ok, out) = deploy.await.unwrap();
    assert!(ok, "{out}\n{}", srv.logs());
    assert_eq!(answer(&srv).await.1, "1");
    let stats = load.stop().await;
    assert_eq!(
        stats.failed(),
        0,
        "failed: {:?}",
        stats.errors.lock().unwrap()
    );
}

/// Issue 33: on a route that hashes on a client key, a client on the
/// canary stays on it through the step and the next; `--abort` rolls it
/// back by hand.
#[tokio::test]
async fn a_hashed_client_stays_on_the_canary_and_abort_rolls_back() {
    let proxy = json!({ "app": "api", "connect_timeout": "10s", "policy": "hash", "hash_key": "header:x-user" });
    let api = json!({
        "name": "api",
        "command": ["python3", APP],
        "ready": { "http": "/healthz" },
        "canary": { "steps": [5, 25, 100], "step": "8s", "min_requests": 1000 },
    });
    let config = Config::basic()
        .set("pid_file", "run/gracesrv.pid")
        .set("apps", json!([api]))
        .edit("web", |l| l.route("/", "proxy", proxy.clone()));
    let srv = TestServer::builder().config(config).start().await;
    let addr = srv.addr("web");
    let version = |user: &str| {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-H",
                &format!("x-user: {user}"),
                &format!("http://{addr}/"),
            ])
            .output()
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout).to_string();
        body.split_whitespace()
            .nth(3)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(version("first"), "0", "the first instance serves");
    set(&srv, "version", "1");
    let deploy = spawn_deploy_with(&srv, Some("--canary"));
    wait_canary(&srv, Duration::from_secs(20), |d| d["share"] == 5).await;
    let users: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let on: Vec<&String> = users.iter().filter(|u| version(u) == "1").collect();
    // About 5% of the clients, each for all its requests.
    assert!(
        (1..=30).contains(&on.len()),
        "{} of 200 on the canary",
        on.len()
    );
    let off = users.iter().find(|u| !on.contains(u)).unwrap();
    for _ in 0..10 {
        assert_eq!(version(on[0]), "1");
        assert_eq!(version(off), "0");
    }
    wait_canary(&srv, Duration::from_secs(20), |d| d["share"] == 25).await;
    for u in &on {
        assert_eq!(version(u), "1", "{u} stays on the canary at 25%");
    }
    let (ok, out) = spawn_deploy_with(&srv, Some("--abort")).await.unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("rolled back"), "{out}");
    let (ok, out) = deploy.await.unwrap();
    assert!(!ok && out.contains("by hand"), "{out}");
    assert_eq!(version(on[0]), "0", "back on the old version");
    assert_eq!(wait_instances(&srv, 1).await.len(), 1);
}
