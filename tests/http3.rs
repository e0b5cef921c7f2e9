//! HTTP/3 (SPEC section 7, issue 18): the routes over QUIC, and QUIC
//! connections that survive restarts, rollbacks and a new binary. The
//! client is aioquic (`tests/util/h3.rs`), not the server's own quinn/h3.

mod util;

use serde_json::json;
use util::client::{self, Target};
use util::config::{Config, Listener};
use util::h3;
use util::TestServer;

/// `web` (plain, with `/status`) and `h3` (TLS with `http3: true`): `/`
/// answers the pid, `/delay` after 2 s.
fn config() -> Config {
    Config::new()
        .listener(
            Listener::plain("web")
                .route("/status", "status", json!({}))
                .route("/", "respond", json!({ "body": "{pid}\n" })),
        )
        .listener(
            Listener::tls("h3", "localhost.crt", "localhost.key")
                .set("http3", true)
                .route(
                    "/delay",
                    "respond",
                    json!({ "body": "slow {pid}\n", "delay": "2s" }),
                )
                .route("/", "respond", json!({ "body": "{pid}\n" })),
        )
}

/// The serving generation's `status.http3[0]`, asked over HTTP/1.1.
async fn quic_status(srv: &TestServer) -> serde_json::Value {
    let r = client::get(&Target::plain(srv.addr("web")), "/status")
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    v["http3"][0].clone()
}

/// A tiny HTTP/1.1 upstream: answers `METHOD PATH BODYLEN`.
async fn upstream() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "upstream: head cut");
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "upstream: body cut");
                    buf.extend_from_slice(&chunk[..n]);
                }
                let mut first = head.lines().next().unwrap().split(' ');
                let body = format!("{} {} {len}", first.next().unwrap(), first.next().unwrap());
                let res = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(res.as_bytes()).await.unwrap();
            });
        }
    });
    addr
}

#[tokio::test]
async fn every_route_action_answers_over_http3_and_tcp_advertises_it() {
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("a.txt"), "0123456789").unwrap();
    let up = upstream().await;
    let srv = TestServer::builder()
        .config(config().edit("h3", |l| {
            l.route("/files", "static", json!({ "root": files.path() }))
                .route("/status", "status", json!({}))
                .route("/old", "redirect", json!({ "to": "/new" }))
                .route(
                    "/api",
                    "proxy",
                    json!({ "upstream": format!("http://{up}") }),
                )
        }))
        .start()
        .await;
    let addr = srv.addr("h3");
    let pid = srv.pid();

    let body = h3::bodies(&h3::get(addr, "/", 3).await);
    assert_eq!(
        body,
        vec![format!("{pid}\n"); 3],
        "three requests on one connection"
    );

    let r = h3::get_with(addr, "/files/a.txt", &["--header", "range: bytes=2-5"]).await;
    let r = &r["responses"][0];
    assert_eq!(r["status"], 206, "{r}");
    assert_eq!(r["body"], "2345");
    assert_eq!(r["headers"]["content-range"], "bytes 2-5/10");

    let r = h3::get(addr, "/old", 1).await;
    assert_eq!(r["responses"][0]["status"], 308, "{r}");
    assert_eq!(r["responses"][0]["headers"]["location"], "/new");

    let r = h3::get_with(
        addr,
        "/api/x?y=1",
        &["--method", "POST", "--body-size", "100000"],
    )
    .await;
    assert_eq!(
        h3::bodies(&r),
        vec!["POST /api/x?y=1 100000"],
        "the body reached the upstream"
    );

    let r = h3::get(addr, "/status", 1).await;
    let status: serde_json::Value = serde_json::from_str(h3::bodies(&r)[0].as_str()).unwrap();
    assert_eq!(status["pid"], pid);
    assert_eq!(status["http3"][0]["reading"], true);
    assert!(
        status["http3"][0]["connections"].as_u64().unwrap() >= 1,
        "{status}"
    );

    // An upload the route does not read: answered, nothing reset.
    let r = h3::get_with(addr, "/", &["--method", "POST", "--body-size", "3000000"]).await;
    assert_eq!(h3::bodies(&r), vec![format!("{pid}\n")]);

    // TCP responses on the listener advertise HTTP/3 on the same port.
    let r = client::get(&Target::tls(addr, srv.tls()), "/")
        .await
        .unwrap();
    assert_eq!(
        r.headers.get("alt-svc").and_then(|v| v.to_str().ok()),
        Some(format!("h3=\":{}\"; ma=86400", addr.port()).as_str())
    );
    let r = client::get(&Target::plain(srv.addr("web")), "/")
        .await
        .unwrap();
    assert!(
        r.headers.get("alt-svc").is_none(),
        "not on a listener without HTTP/3"
    );
}

#[tokio::test]
async fn a_request_in_flight_across_a_restart_finishes_on_the_old_generation() {
    let mut srv = TestServer::builder().config(config()).start().await;
    let addr = srv.addr("h3");
    let old = srv.pid();
    let slow = tokio::spawn(async move { h3::get(addr, "/delay", 1).await });
    srv.wait_log("path=\"/delay\"").await;
    let new = srv.restart().await;
    // The new generation reads the socket now: the old one's datagrams
    // reach it only through the new one.
    assert_eq!(
        h3::bodies(&slow.await.unwrap()),
        vec![format!("slow {old}\n")]
    );
    assert_eq!(h3::body(addr, "/").await, format!("{new}\n"));
    let q = quic_status(&srv).await;
    assert!(q["forwarded_total"].as_u64().unwrap() > 0, "{q}");
    assert_eq!(q["reading"], true);
    util::wait_gone(old).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_restarts_under_http3_load_lose_no_request() {
    let mut srv = TestServer::builder().config(config()).start().await;
    let addr = srv.addr("h3");
    // Connections kept across requests, and new ones all the time (their
    // handshakes meet the switches).
    let load = h3::Load::start(addr, "/", 3, 2);
    // Served before the first restart.
    h3::body(addr, "/").await;
    let mut forwarded = 0;
    for _ in 0..20 {
        srv.restart().await;
        // Until the load's connections have moved to the new generation.
        loop {
            let q = quic_status(&srv).await;
            if q["requests_total"].as_u64().unwrap() >= 20 {
                forwarded += q["forwarded_total"].as_u64().unwrap();
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let totals = load.finish().await;
    assert_eq!(totals["failed"], 0, "{totals}");
    let ok = totals["ok"].as_u64().unwrap();
    assert!(ok > 200, "{totals}");
    // Requests the server refused unprocessed (aioquic does not read
    // GOAWAY, and keeps sending on the old connection): at most one per
    // kept connection per restart, each retried and answered.
    assert!(totals["retried"].as_u64().unwrap() <= 3 * 20, "{totals}");
    assert!(totals["connections"].as_u64().unwrap() > 40, "{totals}");
    let pids = totals["pids"].as_object().unwrap();
    assert_eq!(
        pids.len(),
        21,
        "served by every generation in turn: {totals}"
    );
    assert!(forwarded > 0, "old generations' datagrams were passed on");
    for old in &srv.ready_pids[..srv.ready_pids.len() - 1] {
        util::wait_gone(*old).await;
    }
}

#[tokio::test]
async fn a_rollback_keeps_quic_serving() {
    let mut srv = TestServer::builder().config(config()).start().await;
    let addr = srv.addr("h3");
    let old = srv.pid();
    // A broken config: the restart fails, the old generation reads on.
    srv.write_config("listeners: [ {name: web, addr: nope} ]\n");
    srv.failed_restart().await;
    assert_eq!(h3::body(addr, "/").await, format!("{old}\n"));
    // A new generation that dies right after ready: the old one reads again.
    srv.write(&config());
    srv.hup();
    let new = srv.wait_ready().await;
    assert_ne!(new, old);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(srv.wait_ready().await, old);
    assert_eq!(
        h3::bodies(&h3::get(addr, "/", 2).await),
        vec![format!("{old}\n"); 2]
    );
    assert_eq!(quic_status(&srv).await["reading"], true);
}

#[tokio::test]
async fn a_binary_replaced_on_disk_serves_http3_after_a_hup() {
    let mut srv = TestServer::builder()
        .config(config())
        .copy_binary()
        .start()
        .await;
    let addr = srv.addr("h3");
    let exe = srv.dir.path().join("gracesrv");
    let tmp = srv.dir.path().join("gracesrv.new");
    std::fs::copy(util::BIN, &tmp).unwrap();
    std::fs::rename(&tmp, &exe).unwrap();
    let old = srv.pid();
    let new = srv.restart().await;
    assert_ne!(old, new);
    assert_eq!(h3::body(addr, "/").await, format!("{new}\n"));
}

#[tokio::test]
async fn fds_and_processes_stay_flat_over_30_restarts_with_http3() {
    let mut srv = TestServer::builder().config(config()).start().await;
    let addr = srv.addr("h3");
    srv.restart().await;
    h3::get(addr, "/", 1).await;
    let fds = util::fd_count(srv.pid());
    for _ in 0..29 {
        srv.restart().await;
    }
    let pid = srv.pid();
    assert_eq!(h3::body(addr, "/").await, format!("{pid}\n"));
    assert_eq!(util::fd_count(pid), fds, "fds of the serving process");
    assert_eq!(util::zombie_children(pid), 0);
    for old in &srv.ready_pids[..srv.ready_pids.len() - 1] {
        util::wait_gone(*old).await;
    }
}

/// systemd: a `.socket` unit with `ListenStream=` and `ListenDatagram=`
/// on one address, both named after the listener (`FileDescriptorName=`).
#[tokio::test]
async fn a_datagram_socket_from_systemd_is_adopted() {
    served_on_systemd_sockets("h3:h3").await;
}

/// The same without `FileDescriptorName=`: systemd names both after the
/// unit, and they are matched by address.
#[tokio::test]
async fn a_datagram_socket_from_systemd_without_a_known_name_is_adopted_by_address() {
    served_on_systemd_sockets("gracesrv.socket:gracesrv.socket").await;
}

/// A TCP and a UDP socket bound here on one address, passed at fds 3 and 4
/// with `LISTEN_FDNAMES=names`: gracesrv serves HTTP/3 on them, and hands
/// them on in a restart.
async fn served_on_systemd_sockets(names: &str) {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    let udp = std::net::UdpSocket::bind(addr).unwrap();
    let config = Config::new().listener(
        Listener::tls("h3", "localhost.crt", "localhost.key")
            .set("addr", addr.to_string())
            .set("http3", true)
            .route("/", "respond", json!({ "body": "{pid}\n" })),
    );
    let mut cmd = std::process::Command::new("/bin/sh");
    let fds = [
        std::os::fd::AsRawFd::as_raw_fd(&tcp),
        std::os::fd::AsRawFd::as_raw_fd(&udp),
    ];
    // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            let high: Vec<i32> = fds
                .iter()
                .map(|fd| libc::fcntl(*fd, libc::F_DUPFD, 10))
                .collect();
            for (i, fd) in high.iter().enumerate() {
                if *fd < 0 || libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.arg("-c")
        .arg(format!(
            "LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES={names} exec {} \"$@\"",
            util::BIN
        ))
        .arg("sh");
    let mut srv = TestServer::builder().config(config).command(cmd).spawn();
    srv.wait_ready().await;
    drop((tcp, udp));
    // Served on the passed UDP socket: binding it again would have failed.
    assert_eq!(h3::body(addr, "/").await, format!("{}\n", srv.pid()));
    let new = srv.restart().await;
    assert_eq!(h3::body(addr, "/").await, format!("{new}\n"));
}

#[tokio::test]
async fn http3_without_tls_is_a_config_error() {
    let text = "listeners:\n  - name: web\n    addr: 127.0.0.1:0\n    http3: true\n";
    let (dir, _certs, path) = TestServer::prepare(text);
    let out = std::process::Command::new(util::bin())
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    drop(dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("server.yaml:4:") && err.contains("listeners[0].http3: HTTP/3 needs tls"),
        "{err}"
    );
    // `check` names it on a listener that has it.
    let (dir, _certs, path) = TestServer::prepare(&config().yaml());
    let out = std::process::Command::new(util::bin())
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    drop(dir);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{summary}");
    assert!(
        summary
            .lines()
            .any(|l| l.contains("h3") && l.contains("+ HTTP/3 (UDP)")),
        "{summary}"
    );
}

#[tokio::test]
async fn many_handshakes_at_once_get_a_retry_first_and_all_succeed() {
    let srv = TestServer::builder().config(config()).start().await;
    let out = h3::parallel(srv.addr("h3"), 200).await;
    assert_eq!(out["ok"], 200, "{out}");
    let q = quic_status(&srv).await;
    assert!(q["retries_total"].as_u64().unwrap() > 0, "{q}");
}

#[tokio::test]
async fn quic_connections_count_in_max_connections() {
    let srv = TestServer::builder()
        .config(config().set("max_connections", 1))
        .start()
        .await;
    let addr = srv.addr("h3");
    let pid = srv.pid();
    let slow = tokio::spawn(async move { h3::get(addr, "/delay", 1).await });
    srv.wait_log("path=\"/delay\"").await;
    let refused = h3::get(addr, "/", 1).await;
    assert!(
        !refused["error"].is_null(),
        "a second connection is refused: {refused}"
    );
    assert_eq!(
        h3::bodies(&slow.await.unwrap()),
        vec![format!("slow {pid}\n")]
    );
    // The slot is free again once the first connection is closed.
    let mut n = 0;
    loop {
        let r = h3::get(addr, "/", 1).await;
        if r["error"].is_null() {
            assert_eq!(h3::bodies(&r), vec![format!("{pid}\n")]);
            break;
        }
        n += 1;
        assert!(n < 50, "never served again: {r}");
    }
    assert!(quic_status(&srv).await["refused_total"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn an_idle_quic_connection_is_closed_after_timeouts_idle() {
    let srv = TestServer::builder()
        .config(config().set("timeouts", json!({ "idle": "1s" })))
        .start()
        .await;
    let addr = srv.addr("h3");
    let client =
        tokio::spawn(
            async move { h3::get_with(addr, "/", &["--count", "2", "--pause", "4"]).await },
        );
    // Open while the client waits, then closed by the server's timeout.
    let mut was_open = false;
    loop {
        let n = quic_status(&srv).await["connections"].as_u64().unwrap();
        if n == 1 {
            was_open = true;
        } else if was_open {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let r = client.await.unwrap();
    assert_eq!(r["responses"].as_array().unwrap().len(), 1, "{r}");
    assert!(
        !r["error"].is_null(),
        "the second request found the connection gone: {r}"
    );
}

#[tokio::test]
async fn a_supervisor_hands_the_udp_socket_to_each_new_worker() {
    let mut srv = TestServer::builder()
        .config(config())
        .supervise()
        .start()
        .await;
    let addr = srv.addr("h3");
    let old = srv.serving_pid();
    let load = h3::Load::start(addr, "/", 2, 1);
    let slow = tokio::spawn(async move { h3::get(addr, "/delay", 1).await });
    srv.wait_log("path=\"/delay\"").await;
    for _ in 0..3 {
        srv.supervised_restart().await;
    }
    let new = srv.serving_pid();
    assert_ne!(new, old);
    assert_eq!(
        h3::bodies(&slow.await.unwrap()),
        vec![format!("slow {old}\n")]
    );
    assert_eq!(h3::body(addr, "/").await, format!("{new}\n"));
    let totals = load.finish().await;
    assert_eq!(totals["failed"], 0, "{totals}");
}

#[tokio::test]
async fn http3_requests_are_in_the_access_log() {
    let srv = TestServer::builder()
        .config(config().set(
            "access_log",
            json!({ "path": "access.log", "format": "json" }),
        ))
        .start()
        .await;
    let got = h3::get_with(srv.addr("h3"), "/?q=1", &["--sni", "localhost"]).await;
    assert_eq!(h3::bodies(&got), vec![format!("{}\n", srv.pid())], "{got}");
    let path = srv.dir.path().join("access.log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let line = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("HTTP/3.0")) {
            break l.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no HTTP/3 line in {text:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["listener"], "h3", "{line}");
    assert_eq!(v["target"], "/?q=1");
    assert_eq!(v["status"], 200);
    assert_eq!(v["tls_version"], "TLSv1.3");
    // The name the client asked for (issue 26.4: it was always null).
    assert_eq!(v["sni"], "localhost", "{line}");
    assert_eq!(v["bytes"], format!("{}\n", srv.pid()).len());
}

#[tokio::test]
async fn sni_picks_the_certificate_over_http3_too() {
    let config = Config::new().listener(
        Listener::tls("h3", "localhost.crt", "localhost.key")
            .set(
                "tls",
                json!({ "cert": "localhost.crt", "key": "localhost.key",
                        "sni": [{ "cert": "other.crt", "key": "other.key" }] }),
            )
            .set("http3", true)
            .route("/", "respond", json!({ "body": "{pid}\n" })),
    );
    let srv = TestServer::builder()
        .config(config)
        .before(|dir, certs| certs.leaf(dir, "other", &["other.test"], 2))
        .start()
        .await;
    let addr = srv.addr("h3");
    let other = h3::get_with(addr, "/", &["--sni", "other.test"]).await;
    assert_eq!(h3::bodies(&other), vec![format!("{}\n", srv.pid())]);
    assert_eq!(other["sans"], json!(["other.test"]), "{other}");
    let default = h3::get_with(addr, "/", &["--sni", "localhost"]).await;
    assert_eq!(default["sans"], json!(["localhost"]), "{default}");
}

/// A client that stops reading cannot hold a stream: the response piece
/// that makes no progress for `timeouts.send` resets it. (quinn and h3 as
/// the client here: aioquic always reads.)
#[tokio::test]
async fn a_client_that_stops_reading_gets_its_stream_reset_after_timeouts_send() {
    use bytes::Buf;
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("big"), vec![b'x'; 32 << 20]).unwrap();
    let srv = TestServer::builder()
        .config(
            config()
                .set("timeouts", json!({ "send": "1s" }))
                .edit("h3", |l| {
                    l.route("/files", "static", json!({ "root": files.path() }))
                }),
        )
        .start()
        .await;
    let addr = srv.addr("h3");
    let mut tls = (*srv.tls()).clone();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
    let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
    let (mut driver, mut send) = ::h3::client::new(h3_quinn::Connection::new(conn))
        .await
        .unwrap();
    tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    let req = http::Request::get(format!("https://localhost:{}/files/big", addr.port()))
        .body(())
        .unwrap();
    let mut stream = send.send_request(req).await.unwrap();
    stream.finish().await.unwrap();
    let res = stream.recv_response().await.unwrap();
    assert_eq!(res.status(), 200);
    // Not reading: the flow-control window fills and the server waits.
    srv.wait_log("HTTP/3 response: body: no progress for 1s")
        .await;
    let mut got = 0;
    let end = loop {
        match stream.recv_data().await {
            Ok(Some(d)) => got += d.remaining(),
            Ok(None) => break "the whole body",
            Err(_) => break "reset",
        }
    };
    assert_eq!(end, "reset", "after {got} bytes");
    assert!(got < 32 << 20);
    // The connection serves on.
    assert_eq!(h3::body(addr, "/").await, format!("{}\n", srv.pid()));
}

/// An HTTP/1.1 upstream that reads each request's body to its declared
/// length (or to the end, quietly, when the proxy gives up) and answers
/// `read N`.
async fn reading_upstream() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    match s.read(&mut chunk).await {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    match s.read(&mut chunk).await {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
                let body = format!("read {len}");
                let res = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(res.as_bytes()).await;
            });
        }
    });
    addr
}

/// Issue 25.8: requests RFC 9114 sections 4.2 and 4.3 call malformed are
/// refused with H3_MESSAGE_ERROR (the stream reset and stopped), on one
/// aioquic connection that serves on afterwards; a body that breaks its
/// content-length resets its stream with H3_MESSAGE_ERROR and counts as the
/// client's error, not the upstream's; an early answer stops the body
/// with H3_NO_ERROR (0x100), not 0.
#[tokio::test]
async fn malformed_http3_requests_are_refused() {
    let up = reading_upstream().await;
    let config = config().edit("h3", |l| {
        l.route(
            "/api",
            "proxy",
            json!({ "upstream": format!("http://{up}") }),
        )
    });
    let srv = TestServer::builder().config(config).start().await;
    let v = h3::malformed(srv.addr("h3"), "/api").await;
    const MESSAGE_ERROR: u64 = 0x10e;
    for case in [
        "repeated :path",
        "pseudo-header after a regular field",
        ":status in a request",
        "connection",
        "te gzip",
        "transfer-encoding",
        "content-length not a number",
        "content-length 3 and 5",
    ] {
        let r = &v[case];
        assert_eq!(r["status"], json!(null), "{case}: not served: {v}");
        assert_eq!(r["reset"], json!(MESSAGE_ERROR), "{case}: {v}");
        assert_eq!(r["stop_sending"], json!(MESSAGE_ERROR), "{case}: {v}");
    }
    for case in ["10 declared, 5 sent", "5 declared, 10 sent"] {
        let r = &v[case];
        assert_eq!(r["status"], json!(null), "{case}: not served: {v}");
        assert_eq!(r["reset"], json!(MESSAGE_ERROR), "{case}: {v}");
    }
    assert_eq!(v["te trailers (allowed)"]["status"], 200, "{v}");
    let unread = &v["an unread body (allowed)"];
    assert_eq!(unread["status"], 200, "{v}");
    assert_eq!(unread["stop_sending"], json!(0x100), "H3_NO_ERROR: {v}");
    assert_eq!(v["good"]["status"], 200, "the connection serves on: {v}");
    let r = client::get(&Target::plain(srv.addr("web")), "/status")
        .await
        .unwrap();
    let s: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(s["http3"][0]["malformed_total"], 10, "{s}");
    assert_eq!(s["upstream_errors_total"], 0, "the client's fault: {s}");
    assert_eq!(s["client_errors_total"], 2, "{s}");
}

/// Issue 27.4: an application's own service (examples/embedded.rs, through
/// the library) serves HTTP/3 too, on a listener with `http3: true`, its
/// requests' bodies read whatever the version; across a restart.
#[tokio::test]
async fn an_applications_service_serves_http3_across_a_restart() {
    let exe = util::example("embedded");
    let config = Config::new()
        .listener(Listener::tls("app", "localhost.crt", "localhost.key").set("http3", true));
    let mut srv = TestServer::builder()
        .config(config)
        .command(std::process::Command::new(exe))
        .spawn();
    let first = srv.wait_ready().await;
    let addr = srv.addr("app");
    let hello = |pid: u32, path: &str| format!("hello from the app, pid {pid}, path {path}\n");
    assert_eq!(h3::body(addr, "/one").await, hello(first, "/one"));
    let r = h3::get_with(addr, "/up", &["--method", "POST", "--body-size", "100000"]).await;
    assert_eq!(
        h3::bodies(&r),
        [format!(
            "hello from the app, pid {first}, path /up, 100000 bytes\n"
        )]
    );
    // HTTP/2 on the same listener, from the same service.
    let r = client::get(&Target::tls(addr, srv.tls()).h2(), "/two")
        .await
        .unwrap();
    assert_eq!(r.body, hello(first, "/two"));
    let second = srv.restart().await;
    assert_eq!(h3::body(addr, "/three").await, hello(second, "/three"));
}
