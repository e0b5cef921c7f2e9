//! `--supervise`: a supervisor whose pid never changes, running workers.

mod util;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use util::client::{self, Target};
use util::config::Config;
use util::load::{Kind, Load};
use util::{TestServer, BIN};

async fn start_supervised(config: Config) -> TestServer {
    start_supervised_log(config, "gracesrv=info").await
}

async fn start_supervised_log(config: Config, log: &str) -> TestServer {
    let srv = TestServer::builder()
        .config(config)
        .env("GRACESRV_LOG", log)
        .supervise()
        .start()
        .await;
    assert_eq!(srv.pid(), srv.first_pid(), "MAINPID is the supervisor's");
    srv
}

/// The worker serving now, as the supervisor's latest `STATUS=` says.
fn worker(srv: &TestServer) -> u32 {
    srv.serving_pid()
}

/// HUP to the supervisor; see `TestServer::supervised_restart`.
async fn supervised_restart(srv: &mut TestServer) -> u32 {
    srv.supervised_restart().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervised_restarts_under_load_keep_the_pid_and_lose_nothing() {
    let mut srv = start_supervised(Config::basic()).await;
    let sup = srv.first_pid();
    let web = Target::plain(srv.addr("web"));
    let tls = Target::tls(srv.addr("web-tls"), srv.tls());
    let mut load = Load::new();
    load.spawn(Kind::KeepAlive, web.clone(), "/", 3);
    load.spawn(Kind::NewConnection, web.clone(), "/", 2);
    load.spawn(Kind::H2 { streams: 4 }, tls.clone(), "/", 1);
    let stats = load.stats.clone();
    stats.wait_for_more(100).await;
    let mut workers = vec![worker(&srv)];
    for _ in 0..10 {
        workers.push(supervised_restart(&mut srv).await);
        stats.wait_for_more(50).await;
        assert!(util::alive(sup));
    }
    let stats = load.stop().await;
    let errors = stats.errors.lock().unwrap().clone();
    assert_eq!(stats.failed(), 0, "{errors:#?}");
    let answered = stats.pids.lock().unwrap().clone();
    assert!(answered.len() >= 10, "{} workers answered", answered.len());
    assert!(
        !answered.contains(&sup),
        "the supervisor serves nothing itself"
    );
    // A worker that exits just now is a zombie until the reaper's next
    // SIGCHLD: none may stay one.
    util::until("the supervisor has reaped every worker", || {
        util::zombie_children(sup) == 0
    })
    .await;
    for w in &workers[..workers.len() - 1] {
        util::wait_gone(*w).await;
    }
}

#[tokio::test]
async fn a_killed_worker_is_replaced_and_the_port_never_refuses() {
    let mut srv = start_supervised(Config::basic()).await;
    let web = Target::plain(srv.addr("web"));
    let w = worker(&srv);
    assert_eq!(client::get(&web, "/").await.unwrap().pid(), w);
    kill(Pid::from_raw(w as i32), Signal::SIGKILL).unwrap();
    // While no worker serves, connections queue in the supervisor's sockets.
    let during: Vec<_> = (0..5)
        .map(|_| {
            let web = web.clone();
            tokio::spawn(async move { client::get(&web, "/").await })
        })
        .collect();
    // READY=1 again, with the replacement in STATUS=.
    let ready = srv.next_notify().await;
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    let new = worker(&srv);
    assert_ne!(new, w);
    for r in during {
        assert_eq!(r.await.unwrap().unwrap().pid(), new);
    }
    srv.wait_log("worker died").await;
    assert_eq!(util::zombie_children(srv.first_pid()), 0);
}

#[tokio::test]
async fn term_finishes_the_request_in_flight_and_exits_0() {
    let mut srv = start_supervised_log(Config::basic(), "gracesrv=debug").await;
    let web = Target::plain(srv.addr("web"));
    let w = worker(&srv);
    let slow = tokio::spawn(async move { client::get(&web, "/delay").await });
    srv.wait_log("path=\"/delay\"").await;
    srv.signal_first(Signal::SIGTERM);
    let r = slow.await.unwrap().unwrap();
    assert_eq!((r.status.as_u16(), r.body), (200, format!("slow {w}\n")));
    assert_eq!(srv.wait_first_exit().await.code(), Some(0));
    assert!(!util::alive(w));
}

#[tokio::test]
async fn ctrl_c_after_five_restarts_stops_everything() {
    let mut srv = start_supervised(Config::basic()).await;
    let mut workers = vec![worker(&srv)];
    for _ in 0..5 {
        workers.push(supervised_restart(&mut srv).await);
    }
    // What a terminal does on Ctrl-C: SIGINT to the foreground process group.
    killpg(Pid::from_raw(srv.first_pid() as i32), Signal::SIGINT).unwrap();
    assert_eq!(srv.wait_first_exit().await.code(), Some(0));
    for w in workers {
        assert!(!util::alive(w), "worker {w} outlived the supervisor");
    }
}

#[tokio::test]
async fn a_failed_restart_keeps_the_worker_and_reports_ready_again() {
    let config = Config::basic().set("pid_file", "run/g.pid");
    let mut srv = start_supervised(config.clone()).await;
    let sup = srv.first_pid();
    assert_eq!(
        std::fs::read_to_string(srv.dir.path().join("run/g.pid")).unwrap(),
        format!("{sup}\n")
    );
    let w = worker(&srv);
    srv.write(
        &config
            .clone()
            .edit("web-tls", |l| l.tls_files("gone.crt", "localhost.key")),
    );
    srv.hup();
    assert!(srv.next_notify().await.contains("RELOADING=1"));
    let ready = srv.next_notify().await;
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    let line = srv.wait_log("restart failed").await;
    assert!(line.contains("no such file gone.crt"), "{line}");
    assert_eq!(srv.answering_pid().await, w);
    // `gracesrv reload` reads the same result through the supervisor's pid.
    srv.write(&config);
    let path = srv.config.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .arg("reload")
            .arg("-c")
            .arg(path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("replaces pid {sup}")));
}

#[tokio::test]
async fn a_hup_sent_to_a_worker_restarts_through_the_supervisor() {
    let mut srv = start_supervised(Config::basic()).await;
    let w = worker(&srv);
    kill(Pid::from_raw(w as i32), Signal::SIGHUP).unwrap();
    assert!(srv.next_notify().await.contains("RELOADING=1"));
    let ready = srv.next_notify().await;
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert_ne!(worker(&srv), w);
    srv.wait_log("HUP passed on to the supervisor").await;
}

#[tokio::test]
async fn workers_do_not_outlive_a_killed_supervisor() {
    let mut srv = start_supervised(Config::basic()).await;
    let w = worker(&srv);
    srv.signal_first(Signal::SIGKILL);
    srv.wait_first_exit().await;
    util::wait_gone(w).await;
}

/// Issue 14.6: TERM acts at once while a replacement worker is stuck in its
/// start (here reading a certificate that is a FIFO nobody writes): the
/// stuck worker is killed, the supervisor exits, the ports close.
#[tokio::test]
async fn term_acts_at_once_while_a_worker_is_stuck_starting() {
    let mut srv = start_supervised(Config::basic().set("startup_timeout", "60s")).await;
    let web = srv.addr("web");
    let w = worker(&srv);
    let crt = srv.dir.path().join("localhost.crt");
    std::fs::remove_file(&crt).unwrap();
    nix::unistd::mkfifo(&crt, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let seen = srv.log_count();
    nix::sys::signal::kill(Pid::from_raw(w as i32), Signal::SIGKILL).unwrap();
    srv.wait_log_after(seen, |l| l.contains("new process started"))
        .await;
    let asked = std::time::Instant::now();
    srv.signal_first(Signal::SIGTERM);
    srv.wait_first_exit().await;
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(5),
        "TERM took {:?}",
        asked.elapsed()
    );
    let refused = tokio::net::TcpStream::connect(web).await;
    assert!(refused.is_err(), "nothing listens any more");
}

/// One restart machine for both modes: a HUP that arrives while a dead
/// worker's replacement is pending is not lost; the restart follows the
/// replacement.
#[tokio::test]
async fn a_hup_during_a_replacement_restarts_after_it() {
    let mut srv = start_supervised(Config::basic()).await;
    let w = worker(&srv);
    kill(Pid::from_raw(w as i32), Signal::SIGKILL).unwrap();
    // The supervisor saw it die: the replacement is pending (100 ms back-off).
    srv.wait_log("worker died").await;
    srv.hup();
    let ready = srv.next_notify().await;
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    let replaced = worker(&srv);
    assert_ne!(replaced, w);
    let reloading = srv.next_notify().await;
    assert!(reloading.contains("RELOADING=1"), "{reloading}");
    let ready = srv.next_notify().await;
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert_ne!(worker(&srv), replaced, "the HUP restarted the replacement");
}
