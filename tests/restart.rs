//! Zero-downtime restarts (SPEC section 4): the handoff, under load, rollback,
//! listener changes, resource hygiene, and the handoff variables.

mod util;

use util::client::{self, Target};
use util::config::{Config, Listener};
use util::load::{Kind, Load};
use util::TestServer;

#[tokio::test]
async fn request_in_flight_finishes_on_the_old_pid_while_the_new_one_serves() {
    let mut srv = TestServer::builder().start().await;
    let web = Target::plain(srv.addr("web"));
    let old = srv.pid();
    let slow = tokio::spawn({
        let web = web.clone();
        async move { client::get(&web, "/delay").await }
    });
    srv.wait_log("path=\"/delay\"").await;
    let new = srv.restart().await;
    assert_ne!(new, old);
    let r = client::get(&web, "/").await.unwrap();
    assert_eq!(r.body, format!("pid {new} gen 2 web\n"));
    let r = slow.await.unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, format!("slow {old}\n"));
    util::wait_gone(old).await;
    assert_eq!(
        (srv.status().generation, srv.serving_pid()),
        (2, new),
        "the new generation reported ready"
    );
    // The new generation serves TLS too, with the ports kept.
    let r = client::get(&Target::tls(srv.addr("web-tls"), srv.tls()), "/")
        .await
        .unwrap();
    assert_eq!(r.body, format!("pid {new} gen 2 web-tls\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_restarts_under_load_lose_no_request() {
    let mut srv = TestServer::builder()
        .config(Config::basic())
        .env("GRACESRV_LOG", "gracesrv=info")
        .start()
        .await;
    let web = Target::plain(srv.addr("web"));
    let tls = Target::tls(srv.addr("web-tls"), srv.tls());
    let tls_h1 = Target::tls(srv.addr("web-tls"), srv.tls_h1());

    let mut load = Load::new();
    load.spawn(Kind::KeepAlive, web.clone(), "/", 4);
    load.spawn(Kind::KeepAlive, tls_h1.clone(), "/", 3);
    load.spawn(Kind::NewConnection, web.clone(), "/", 2);
    load.spawn(Kind::NewConnection, tls_h1.clone(), "/", 2);
    load.spawn(Kind::H2 { streams: 4 }, tls.clone(), "/", 1);
    load.spawn(Kind::H2 { streams: 4 }, web.clone(), "/", 1);
    let stats = load.stats.clone();
    stats.wait_for_more(200).await;

    let mut pids = vec![srv.pid()];
    for _ in 0..20 {
        pids.push(srv.restart().await);
        // Every generation serves some of the load before the next restart.
        stats.wait_for_more(100).await;
    }
    let stats = load.stop().await;
    let errors = stats.errors.lock().unwrap().clone();
    assert_eq!(stats.failed(), 0, "failed requests: {errors:#?}");
    let answered = stats.pids.lock().unwrap().clone();
    assert!(
        answered.len() >= 20,
        "answers came from {} pids",
        answered.len()
    );
    assert!(answered.contains(pids.last().unwrap()));
    // A GOAWAY leaves at most each HTTP/2 connection's open streams unsent:
    // two connections of four streams, once per restart.
    assert!(
        stats.retried() <= 20 * 2 * 4,
        "{} HTTP/2 requests retried over 20 restarts",
        stats.retried()
    );
    eprintln!(
        "{} requests, 0 failed, {} HTTP/2 requests retried (not sent before GOAWAY), over 20 restarts",
        stats.ok(),
        stats.retried()
    );
}

/// Starts a server, then asserts that restarting with `broken` fails with
/// `reason`, keeps the old pid serving, and that the fixed config restarts.
async fn assert_rollback(srv: &mut TestServer, broken: &str, reason: &str) {
    let web = Target::plain(srv.addr("web"));
    let old = srv.pid();
    let good = std::fs::read_to_string(&srv.config).unwrap();
    srv.write_config(broken);
    let line = srv.failed_restart().await;
    assert!(line.contains(reason), "want {reason:?} in {line:?}");
    let r = client::get(&web, "/").await.unwrap();
    assert_eq!(r.pid(), old, "the old generation keeps serving");
    assert!(util::alive(old));
    srv.write_config(&good);
    let new = srv.restart().await;
    assert_eq!(client::get(&web, "/").await.unwrap().pid(), new);
}

#[tokio::test]
async fn a_broken_config_or_certificate_leaves_the_old_generation_serving() {
    let mut srv = TestServer::builder().start().await;
    let config = Config::basic();
    srv.certs.leaf(srv.dir.path(), "other", &["other.test"], 9);

    assert_rollback(&mut srv, "listeners: [\n", "server.yaml:1:12: ").await;
    assert_rollback(
        &mut srv,
        &config
            .clone()
            .edit("web-tls", |l| l.tls_files("missing.crt", "localhost.key"))
            .yaml(),
        "no such file missing.crt",
    )
    .await;
    assert_rollback(
        &mut srv,
        &config
            .clone()
            .edit("web-tls", |l| l.tls_files("localhost.crt", "other.key"))
            .yaml(),
        "other.key does not match the certificate localhost.crt",
    )
    .await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let extra = Listener::plain("extra").set("addr", taken.local_addr().unwrap().to_string());
    let with_taken = config.listener_before("web-tls", extra).yaml();
    assert_rollback(&mut srv, &with_taken, "cannot listen on").await;
}

#[tokio::test]
async fn a_new_binary_that_crashes_or_hangs_is_rolled_back() {
    let mut srv = TestServer::builder()
        .set("startup_timeout", "1s")
        .copy_binary()
        .spawn();
    srv.wait_ready().await;
    let web = Target::plain(srv.addr("web"));
    let old = srv.pid();
    let exe = srv.dir.path().join("gracesrv");
    let real = srv.dir.path().join("gracesrv.real");
    std::fs::rename(&exe, &real).unwrap();

    for (script, reason) in [
        (
            "#!/bin/sh\nexit 3\n",
            "exited with status 3 before it was ready",
        ),
        ("#!/bin/sh\nexec sleep 60\n", "was not ready within 1s"),
    ] {
        let tmp = srv.dir.path().join("gracesrv.tmp");
        std::fs::write(&tmp, script).unwrap();
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::rename(&tmp, &exe).unwrap();
        let line = srv.failed_restart().await;
        assert!(line.contains(reason), "want {reason:?} in {line:?}");
        assert_eq!(client::get(&web, "/").await.unwrap().pid(), old);
        assert_eq!(
            util::zombie_children(old),
            0,
            "the failed process was reaped"
        );
    }
    // Put the real binary back: the next HUP picks it up from disk.
    std::fs::rename(&real, &exe).unwrap();
    let new = srv.restart().await;
    assert_eq!(client::get(&web, "/").await.unwrap().pid(), new);
}

#[tokio::test]
async fn listeners_are_added_removed_and_moved() {
    let one = "listeners:\n  - name: a\n    addr: 127.0.0.1:0\n    routes: [{ respond: { body: \"a {pid}\\n\" } }]\n  - name: b\n    addr: 127.0.0.1:0\n    routes: [{ respond: { body: \"b {pid}\\n\" } }]\n";
    let mut srv = TestServer::builder().config_text(one).start().await;
    let (a, b) = (srv.addr("a"), srv.addr("b"));

    // Remove b, add c, and move a to a fixed port picked now.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let two = format!(
        "listeners:\n  - name: c\n    addr: 127.0.0.1:0\n    routes: [{{ respond: {{ body: \"c {{pid}}\\n\" }} }}]\n  - name: a\n    addr: {free}\n    routes: [{{ respond: {{ body: \"a {{pid}}\\n\" }} }}]\n"
    );
    srv.write_config(&two);
    let old = srv.pid();
    let new = srv.restart().await;
    util::wait_gone(old).await;
    assert_eq!(srv.addr("a"), free);
    let r = client::get(&Target::plain(free), "/").await.unwrap();
    assert_eq!(r.body, format!("a {new}\n"));
    let r = client::get(&Target::plain(srv.addr("c")), "/")
        .await
        .unwrap();
    assert_eq!(r.body, format!("c {new}\n"));
    assert!(
        tokio::net::TcpStream::connect(b).await.is_err(),
        "removed listener b is closed"
    );
    assert!(
        tokio::net::TcpStream::connect(a).await.is_err(),
        "a's old address is closed"
    );

    // Port 0 keeps the port it was given across restarts.
    let c = srv.addr("c");
    srv.restart().await;
    assert_eq!(srv.addr("c"), c);
}

#[tokio::test]
async fn fds_and_zombies_stay_flat_over_50_restarts() {
    let mut srv = TestServer::builder()
        .config(Config::basic())
        .env("GRACESRV_LOG", "gracesrv=info")
        .start()
        .await;
    let web = Target::plain(srv.addr("web"));
    srv.restart().await;
    client::get(&web, "/").await.unwrap();
    let fds_after_one = util::settled_fd_count(srv.pid()).await;
    for _ in 0..49 {
        srv.restart().await;
    }
    let pid = srv.pid();
    assert_eq!(client::get(&web, "/").await.unwrap().pid(), pid);
    assert_eq!(
        util::settled_fd_count(pid).await,
        fds_after_one,
        "fds of the serving process"
    );
    assert_eq!(util::zombie_children(pid), 0);
    // Exactly one generation is left: all old ones drained and exited.
    for old in &srv.ready_pids[..srv.ready_pids.len() - 1] {
        util::wait_gone(*old).await;
    }
}

#[tokio::test]
async fn hups_during_a_restart_coalesce() {
    let mut srv = TestServer::builder()
        .config(Config::basic())
        .env("GRACESRV_LOG", "gracesrv=info")
        .start()
        .await;
    let first = srv.pid();
    for _ in 0..100 {
        srv.hup();
    }
    // One restart; HUPs that arrive while it runs make at most one more,
    // which the new generation runs (the old one passes the HUP on).
    let second = srv.wait_ready().await;
    util::wait_gone(first).await;
    let one_more = srv
        .logs()
        .contains("restart already in progress: one more will follow");
    let last = if one_more {
        srv.restart_from(second).await
    } else {
        second
    };
    let restarts = srv.logs().matches("restart complete").count();
    assert_eq!(
        restarts,
        1 + one_more as usize,
        "{restarts} restarts for 100 HUPs"
    );
    assert_eq!(srv.answering_pid().await, last);
}

#[tokio::test]
async fn handoff_variables_for_another_pid_are_ignored() {
    // A listening socket at fd 3 announced for some other process.
    let stranger = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stranger_addr = stranger.local_addr().unwrap();
    let mut cmd = std::process::Command::new(util::BIN);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stranger);
    util::pass_as_fd3(&mut cmd, fd);
    cmd.env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "web")
        .env("LISTEN_PID", "1");
    let mut srv = TestServer::builder()
        .config(Config::basic())
        .command(cmd)
        .spawn();
    srv.wait_ready().await;
    assert_ne!(
        srv.addr("web"),
        stranger_addr,
        "must not serve on a socket meant for another pid"
    );
    assert_eq!(srv.answering_pid().await, srv.pid());
}

#[tokio::test]
async fn socket_activation_hands_in_named_sockets() {
    // What systemd-socket-activate does: the socket at fd 3, LISTEN_PID set
    // to the server's own pid (the shell execs the server, keeping its pid).
    let activated = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = activated.local_addr().unwrap();
    let cmd = util::socket_activated(std::os::fd::AsRawFd::as_raw_fd(&activated), "web", "");
    let mut srv = TestServer::builder()
        .config(Config::basic())
        .command(cmd)
        .spawn();
    srv.wait_ready().await;
    assert_eq!(srv.addr("web"), addr);
    drop(activated);
    assert_eq!(
        client::get(&Target::plain(addr), "/").await.unwrap().pid(),
        srv.pid()
    );
    // And it restarts with the activated socket.
    let new = srv.restart().await;
    assert_eq!(
        client::get(&Target::plain(addr), "/").await.unwrap().pid(),
        new
    );
}

#[tokio::test]
async fn a_keep_alive_connection_gets_its_next_request_served_with_connection_close() {
    let mut srv = TestServer::builder().start().await;
    let web = Target::plain(srv.addr("web"));
    let old = srv.pid();
    let mut conn = client::connect(&web).await.unwrap();
    let r = conn.get("/").await.unwrap();
    assert_eq!(r.pid(), old);
    assert!(r.headers.get("connection").is_none());
    srv.restart().await;
    // The old generation is draining; this connection is idle on it. Its
    // next request is served, not cut, and the response closes it.
    let r = conn.get("/").await.unwrap();
    assert_eq!(r.pid(), old);
    assert_eq!(r.headers["connection"], "close");
    assert!(
        !conn.usable().await,
        "the client sees the connection closed"
    );
    util::wait_gone(old).await;
}

#[tokio::test]
async fn an_h2_connection_gets_goaway_and_its_open_stream_finishes() {
    let mut srv = TestServer::builder().start().await;
    let tls = Target::tls(srv.addr("web-tls"), srv.tls());
    let old = srv.pid();
    let conn = client::connect(&tls).await.unwrap();
    assert_eq!(conn.alpn.as_deref(), Some(&b"h2"[..]));
    let mut stream = conn.h2_clone().unwrap();
    let slow = tokio::spawn(async move { stream.get("/delay").await });
    srv.wait_log("path=\"/delay\"").await;
    let new = srv.restart().await;
    let r = slow.await.unwrap().unwrap();
    assert_eq!(
        (r.status.as_u16(), r.body.clone()),
        (200, format!("slow {old}\n"))
    );
    // The GOAWAY comes once the client is quiet (300 ms, see
    // `serve::forward`), and closes the connection.
    let mut conn = conn;
    let quiet = std::time::Instant::now();
    while conn.usable().await {
        assert!(
            quiet.elapsed() < util::WAIT,
            "GOAWAY closes the connection once its streams are done"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        quiet.elapsed() >= std::time::Duration::from_millis(250),
        "{:?}",
        quiet.elapsed()
    );
    assert_eq!(client::get(&tls, "/").await.unwrap().pid(), new);
}

#[tokio::test]
async fn a_hup_that_reaches_a_new_process_during_its_start_is_not_fatal() {
    let mut srv = TestServer::builder()
        .config(Config::basic())
        .env("GRACESRV_LOG", "gracesrv=info")
        .start()
        .await;
    let first = srv.pid();
    srv.hup();
    // HUP the new process the moment it exists: SIGHUP is held across exec
    // until its handler is installed, then acted on once it is ready.
    let line = srv.wait_log("new process started").await;
    let child: i32 = util::field(&line, "new_pid").parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let second = srv.wait_ready().await;
    assert_eq!(second as i32, child);
    // The held HUP restarts the second generation in turn.
    let third = srv.wait_ready().await;
    assert_ne!(third, second);
    util::wait_gone(first).await;
    util::wait_gone(second).await;
    assert_eq!(srv.answering_pid().await, third);
}

#[tokio::test]
async fn an_embedded_application_restarts_the_same_way() {
    // examples/embedded.rs (Server::run from a plain main) and
    // examples/tokio_app.rs (Server::serve inside #[tokio::main]): an
    // application serving its own service through the library, with the
    // config's routes on its other listener.
    for example in ["embedded", "tokio_app"] {
        let exe = util::example(example);
        let config = Config::new()
            .listener(Listener::plain("app"))
            .listener(Listener::plain("admin").route("/status", "status", serde_json::json!({})));
        let mut srv = TestServer::builder()
            .config(config)
            .command(std::process::Command::new(exe))
            .spawn();
        srv.wait_ready().await;
        let app = Target::plain(srv.addr("app"));
        let r = client::get(&app, "/hello").await.unwrap();
        assert_eq!(
            r.body,
            format!("hello from the app, pid {}, path /hello\n", srv.pid()),
            "{example}"
        );
        let r = client::get(&Target::plain(srv.addr("admin")), "/status")
            .await
            .unwrap();
        assert!(r.body.contains("\"generation\":1"), "{}", r.body);
        let new = srv.restart().await;
        let r = client::get(&app, "/").await.unwrap();
        assert_eq!(
            r.body,
            format!("hello from the app, pid {new}, path /\n"),
            "{example}"
        );
    }
}

/// Issue 31: an axum `Router` as a listener's service (examples/axum.rs,
/// docs/library.md), restarted with a slow request in flight: the old
/// process answers it, the new one answers what follows, nothing fails.
#[tokio::test]
async fn an_axum_router_restarts_with_a_slow_request_in_flight() {
    let exe = util::example("axum");
    let mut srv = TestServer::builder()
        .config(Config::new().listener(Listener::plain("app")))
        .command(std::process::Command::new(exe))
        .spawn();
    let old = srv.wait_ready().await;
    let app = Target::plain(srv.addr("app"));
    let r = client::get(&app, "/").await.unwrap();
    assert_eq!(r.body, format!("hello from axum, pid {old}\n"));
    let slow = tokio::spawn({
        let app = app.clone();
        async move { client::get(&app, "/slow?ms=1500").await }
    });
    srv.wait_log("path=\"/slow\"").await;
    let new = srv.restart().await;
    let r = client::get(&app, "/").await.unwrap();
    assert_eq!(r.body, format!("hello from axum, pid {new}\n"));
    let r = slow.await.unwrap().unwrap();
    assert_eq!(
        (r.status.as_u16(), r.body),
        (200, format!("slept 1500 ms, pid {old}\n")),
        "the slow request is answered by the process that took it"
    );
    util::wait_gone(old).await;
}

/// Issue 27.4: an embedded application's lifecycle hooks (examples/hooks.rs)
/// across a HUP and a TERM: the new generation runs `on_ready`; the old one
/// runs `on_drain`, and its drain waits for the hook (1.5 s, past the drain
/// itself), then `on_exit`; on TERM the same. Each hook runs once per
/// process, in that order.
#[tokio::test]
async fn an_embedded_application_runs_its_hooks_across_hup_and_term() {
    let exe = util::example("hooks");
    let config = Config::new().listener(Listener::plain("web").route(
        "/",
        "respond",
        serde_json::json!({ "body": "{pid}\n" }),
    ));
    let mut srv = TestServer::builder()
        .config(config)
        .env("HOOKS_LOG", "hooks.log")
        .env("HOOKS_DRAIN_MS", "1500")
        .command(std::process::Command::new(exe))
        .spawn();
    let log = srv.dir.path().join("hooks.log");
    let first = srv.wait_ready().await;
    let events = |pid: u32| -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{pid} ")).map(str::to_string))
            .collect()
    };
    util::until("the first generation ran on_ready", || {
        events(first) == ["ready"]
    })
    .await;
    let second = srv.restart().await;
    util::wait_gone(first).await;
    assert_eq!(
        events(first),
        ["ready", "drain-start", "drain-done", "exit"],
        "the old generation's drain waited for its hook"
    );
    util::until("the new generation ran on_ready", || {
        events(second) == ["ready"]
    })
    .await;
    let r = client::get(&Target::plain(srv.addr("web")), "/")
        .await
        .unwrap();
    assert_eq!(r.body, format!("{second}\n"));
    srv.signal(nix::sys::signal::Signal::SIGTERM);
    util::wait_gone(second).await;
    assert_eq!(
        events(second),
        ["ready", "drain-start", "drain-done", "exit"]
    );
}

#[tokio::test]
async fn a_stop_during_a_restart_takes_the_starting_process_down_too() {
    for stop in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGQUIT,
    ] {
        let mut srv = TestServer::builder()
            .config(Config::basic())
            .copy_binary()
            .spawn();
        srv.wait_ready().await;
        // The next generation hangs in its start.
        let exe = srv.dir.path().join("gracesrv");
        let tmp = srv.dir.path().join("gracesrv.tmp");
        std::fs::write(&tmp, "#!/bin/sh\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::rename(&tmp, &exe).unwrap();
        srv.hup();
        let line = srv.wait_log("new process started").await;
        let child: u32 = util::field(&line, "new_pid").parse().unwrap();
        srv.signal(stop);
        assert_eq!(srv.wait_first_exit().await.code(), Some(0));
        assert!(
            !util::alive(child),
            "{stop:?}: the starting process must not outlive the stop"
        );
    }
}

#[tokio::test]
async fn pid_file_follows_the_serving_generation() {
    let mut srv = TestServer::builder()
        .set("pid_file", "run/gracesrv.pid")
        .start()
        .await;
    let pid_file = srv.dir.path().join("run/gracesrv.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{}\n", srv.pid())
    );
    let old = srv.pid();
    let new = srv.restart().await;
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{new}\n")
    );
    // The old generation exits without removing the new one's pid file,
    // however quickly it drains (it used to race the new one's write).
    util::wait_gone(old).await;
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{new}\n")
    );
    // (An old generation stays at least a second, see SUCCESSOR_GRACE.)
    for _ in 0..5 {
        let old = srv.pid();
        let new = srv.restart().await;
        util::wait_gone(old).await;
        assert_eq!(
            std::fs::read_to_string(&pid_file).unwrap(),
            format!("{new}\n")
        );
    }
}

#[tokio::test]
async fn a_drain_that_outlasts_shutdown_timeout_is_cut_and_logged() {
    let mut srv = TestServer::builder()
        .set("shutdown_timeout", "500ms")
        .start()
        .await;
    let (old, slow) = srv.restart_with_request_in_flight().await;
    let tag = format!("pid={old} ");
    let line = srv
        .wait_log_after(0, |l| {
            l.contains(&tag) && l.contains("shutdown_timeout (500ms) reached")
        })
        .await;
    assert!(
        line.contains("connections=1") && line.contains("requests=1"),
        "{line}"
    );
    assert!(
        slow.await.unwrap().is_err(),
        "the request was cut at shutdown_timeout"
    );
    util::wait_gone(old).await;
}

#[tokio::test]
async fn a_first_term_to_a_draining_old_generation_keeps_it_draining() {
    // What `systemctl stop` does: TERM to every process of the unit.
    let mut srv = TestServer::builder().start().await;
    let (old, slow) = srv.restart_with_request_in_flight().await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    srv.wait_log("stop requested: still draining").await;
    let r = slow.await.unwrap().unwrap();
    assert_eq!((r.status.as_u16(), r.body), (200, format!("slow {old}\n")));
}

#[tokio::test]
async fn activated_sockets_without_a_known_name_match_by_address() {
    // One systemd .socket unit with several ListenStream= names every fd
    // after the unit; gracesrv then matches them by address.
    let activated = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = activated.local_addr().unwrap();
    let config = format!("listeners:\n  - name: web\n    addr: {addr}\n    routes: [{{ respond: {{ body: \"pid {{pid}}\\n\" }} }}]\n");
    let cmd = util::socket_activated(
        std::os::fd::AsRawFd::as_raw_fd(&activated),
        "gracesrv.socket",
        "",
    );
    let mut srv = TestServer::builder()
        .config_text(config)
        .command(cmd)
        .spawn();
    srv.wait_ready().await;
    drop(activated);
    // Served on the activated socket (bound by us, not by gracesrv: binding
    // the same address again would have failed with EADDRINUSE).
    assert_eq!(
        client::get(&Target::plain(addr), "/").await.unwrap().pid(),
        srv.pid()
    );
}

/// Issue 14.5: a new generation that dies right after it said ready is not
/// an outage. The old generation kept its sockets (paused, not closed),
/// takes over again, and says so. Under a load of new connections across
/// five such deaths, no connection is refused: the only requests lost are
/// the ones the killed process had accepted (at most one per client per
/// death).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_generation_that_dies_after_ready_is_rolled_back() {
    let mut srv = TestServer::builder().start().await;
    let web = Target::plain(srv.addr("web"));
    let old = srv.pid();
    let mut load = Load::new();
    load.spawn(Kind::NewConnection, web.clone(), "/", 2);
    let stats = load.stats.clone();
    stats.wait_for_more(50).await;
    for _ in 0..5 {
        srv.hup();
        let new = srv.wait_ready().await;
        assert_ne!(new, old);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(new as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // The old generation reports ready again (pid file, systemd).
        assert_eq!(srv.wait_ready().await, old);
        let tag = format!("new_pid={new} ");
        srv.wait_log_after(0, |l| {
            l.contains(&tag) && l.contains("new generation died after ready (rolled back)")
        })
        .await;
        assert_eq!(srv.answering_pid().await, old);
        stats.wait_for_more(50).await;
    }
    let stats = load.stop().await;
    let errors = stats.errors.lock().unwrap().join("\n");
    assert!(!errors.contains("refused"), "{errors}");
    assert!(stats.failed() <= 2 * 5, "{errors}");
    // And it still restarts normally.
    let new = srv.restart().await;
    assert_eq!(srv.answering_pid().await, new);
    util::wait_gone(old).await;
}

/// Issue 14.7: a binary that cannot be executed is reported with the
/// reason (the child's errno, over the ready pipe), not "status 127", and
/// the old generation serves on.
#[tokio::test]
async fn an_unexecutable_binary_is_reported_with_its_reason() {
    let mut srv = TestServer::builder()
        .config(Config::basic())
        .copy_binary()
        .spawn();
    let old = srv.wait_ready().await;
    let exe = srv.dir.path().join("gracesrv");
    std::fs::remove_file(&exe).unwrap();
    std::fs::write(&exe, "not a program\n").unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    srv.hup();
    let line = srv.failed_restart().await;
    assert!(
        line.contains("cannot execute the new binary: Exec format error"),
        "{line}"
    );
    assert_eq!(srv.answering_pid().await, old);
}

/// Issue 14.7: a pid file whose directory is blocked by a file says so
/// plainly (not "File exists"), and the server serves on.
#[tokio::test]
async fn a_blocked_pid_directory_is_named() {
    let srv = TestServer::builder()
        .config(Config::basic().set("pid_file", "run/g.pid"))
        .before(|dir, _| std::fs::write(dir.join("run"), "a file, not a directory").unwrap())
        .start()
        .await;
    let line = srv.wait_log("cannot write pid file").await;
    assert!(line.contains("is not a directory is in the way"), "{line}");
    let r = client::get(&Target::plain(srv.addr("web")), "/")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}
