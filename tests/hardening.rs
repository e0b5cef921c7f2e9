//! Hostile input, strangers at the handoff, and signals at bad moments: the
//! server survives each with nothing lost.

mod util;

use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use util::client::{self, Target};
use util::config::Config;
use util::TestServer;

fn config() -> Config {
    Config::basic().set(
        "timeouts",
        serde_json::json!({ "header": "500ms", "idle": "2s", "handshake": "500ms" }),
    )
}

/// Sends `bytes` and reads what comes back until the server closes.
async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(util::WAIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_4xx_and_the_server_stays_up() {
    let srv = TestServer::builder().config(config()).start().await;
    let web = srv.addr("web");
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
        b"GET / HTTP/1.x\r\n\r\n",
        b"\x00\x01\x02\r\n\r\n",
    ] {
        let r = exchange(web, bad).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{bad:?}: {r:?}");
    }
    // Another major version: 505 (RFC 9112 section 2.3, issue 25.10).
    let r = exchange(web, b"GET / HTTP/9.9\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 505"), "{r:?}");
    // A head over the 64 KiB limit.
    let mut big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    let r = exchange(web, &big).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r:?}");
    // Garbage on the TLS port: the handshake fails, the connection closes.
    let r = exchange(srv.addr("web-tls"), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(!r.contains("200"), "{r:?}");
    // And everybody else is served as before.
    assert_eq!(
        client::get(&Target::plain(web), "/").await.unwrap().status,
        200
    );
    let tls = Target::tls(srv.addr("web-tls"), srv.tls());
    assert_eq!(client::get(&tls, "/").await.unwrap().status, 200);
}

#[tokio::test]
async fn a_head_sent_byte_by_byte_is_cut_at_the_header_timeout() {
    let srv = TestServer::builder().config(config()).start().await;
    let mut s = TcpStream::connect(srv.addr("web")).await.unwrap();
    let started = std::time::Instant::now();
    let head =
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = false;
    for b in head.iter().cycle().take(200) {
        // Slowloris: a byte every 50 ms, never finishing the head.
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            _ => {}
        }
    }
    assert!(closed, "still open after {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
}

/// Frames of HTTP/2, written by hand: what an attacker sends.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// GET / with :authority x, HPACK-encoded without state.
const GET: [u8; 6] = [0x82, 0x86, 0x84, 0x01, 0x01, b'x'];

/// Reads frames until EOF; returns (frame type, error code) of RST_STREAM and GOAWAY frames.
async fn read_frames(s: &mut TcpStream) -> Vec<(u8, u32)> {
    let mut seen = Vec::new();
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + util::WAIT;
    loop {
        let mut chunk = [0u8; 16384];
        let n = match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
            Err(_) => panic!("connection still open after {:?}", util::WAIT),
        };
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len = ((buf[0] as usize) << 16) | ((buf[1] as usize) << 8) | buf[2] as usize;
            if buf.len() < 9 + len {
                break;
            }
            let kind = buf[3];
            let payload = &buf[9..9 + len];
            match kind {
                0x3 => seen.push((kind, u32::from_be_bytes(payload[..4].try_into().unwrap()))),
                0x7 => seen.push((kind, u32::from_be_bytes(payload[4..8].try_into().unwrap()))),
                _ => {}
            }
            buf.drain(..9 + len);
        }
    }
    seen
}

#[tokio::test]
async fn http2_rapid_reset_and_stream_floods_are_bounded() {
    let srv = TestServer::builder().config(config()).start().await;
    let web = srv.addr("web");

    // Rapid reset: open a stream, cancel it at once, a thousand times.
    let mut s = TcpStream::connect(web).await.unwrap();
    let mut attack = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    attack.extend(frame(0x4, 0, 0, &[]));
    for i in 0..1000u32 {
        let id = 2 * i + 1;
        attack.extend(frame(0x1, 0x5, id, &GET));
        attack.extend(frame(0x3, 0, id, &8u32.to_be_bytes()));
    }
    let _ = s.write_all(&attack).await;
    let frames = read_frames(&mut s).await;
    assert!(
        frames.contains(&(0x7, 0xb)),
        "no GOAWAY ENHANCE_YOUR_CALM: {:?}",
        &frames[frames.len().saturating_sub(5)..]
    );

    // A flood: many more concurrent streams than allowed (256).
    let mut s = TcpStream::connect(web).await.unwrap();
    let mut flood = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    flood.extend(frame(0x4, 0, 0, &[]));
    for i in 0..600u32 {
        flood.extend(frame(
            0x1,
            0x5,
            2 * i + 1,
            &[
                0x82, 0x86, 0x44, 0x06, b'/', b'd', b'e', b'l', b'a', b'y', 0x01, 0x01, b'x',
            ],
        ));
    }
    let _ = s.write_all(&flood).await;
    let frames = read_frames(&mut s).await;
    assert!(
        frames.iter().any(|f| *f == (0x3, 0x7) || f.0 == 0x7),
        "streams beyond the limit are refused: {:?}",
        &frames[..frames.len().min(5)]
    );
    // The server is fine.
    assert_eq!(
        client::get(&Target::plain(web).h2(), "/")
            .await
            .unwrap()
            .status,
        200
    );
}

/// Runs the binary the way systemd would hand it fds, with fd 3 as given.
fn start_with_fd3(fd3: std::os::fd::RawFd, extra_env: &str) -> (i32, String) {
    let (dir, _certs, path) = TestServer::prepare(&Config::basic().yaml());
    let mut cmd = util::socket_activated(fd3, "web", extra_env);
    cmd.arg("-c").arg(&path).current_dir(dir.path());
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn strangers_at_the_handoff_are_refused_with_a_clear_error() {
    let file = tempfile::tempfile().unwrap();
    let (code, err) = start_with_fd3(file.as_raw_fd(), "");
    assert_eq!(code, 1);
    assert!(err.contains("LISTEN_FDS: fd 3 is not a socket"), "{err}");

    // A UDP socket is taken (HTTP/3), but only a bound one.
    let udp = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::empty(),
        None,
    )
    .unwrap();
    let (code, err) = start_with_fd3(udp.as_raw_fd(), "");
    assert_eq!(code, 1);
    assert!(err.contains("LISTEN_FDS: fd 3 is not bound"), "{err}");

    let (unix, _other) = std::os::unix::net::UnixStream::pair().unwrap();
    let (code, err) = start_with_fd3(unix.as_raw_fd(), "");
    assert_eq!(code, 1);
    assert!(err.contains("LISTEN_FDS: fd 3"), "{err}");
    assert!(err.contains("not listening"), "{err}");

    // A TCP socket that is bound but not listening.
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::empty(),
        None,
    )
    .unwrap();
    let (code, err) = start_with_fd3(sock.as_raw_fd(), "");
    assert_eq!(code, 1);
    assert!(err.contains("LISTEN_FDS: fd 3 is not listening"), "{err}");

    // A ready fd that is not open, or not a pipe.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (code, err) = start_with_fd3(listener.as_raw_fd(), "GRACESRV_READY_FD=77");
    assert_eq!(code, 1);
    assert!(
        err.contains("GRACESRV_READY_FD: fd 77 is not open"),
        "{err}"
    );
    let (code, err) = start_with_fd3(listener.as_raw_fd(), "GRACESRV_READY_FD=0");
    assert_eq!(code, 1);
    assert!(
        err.contains("GRACESRV_READY_FD=0 names a standard stream"),
        "{err}"
    );
}

#[tokio::test]
async fn a_hup_during_a_drain_is_ignored_and_the_drain_finishes() {
    let mut srv = TestServer::builder().start().await;
    let (old, slow) = srv.restart_with_request_in_flight().await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    srv.wait_log("draining: HUP ignored").await;
    let r = slow.await.unwrap().unwrap();
    assert_eq!((r.status.as_u16(), r.body), (200, format!("slow {old}\n")));
    util::wait_gone(old).await;
}

#[tokio::test]
async fn the_old_process_killed_mid_handoff_leaves_the_new_one_serving() {
    // SIGKILL to the old generation the moment its successor exists: the
    // successor's READY goes nowhere, and it serves anyway.
    let mut srv = TestServer::builder()
        .config(Config::basic())
        .env("GRACESRV_LOG", "gracesrv=info")
        .start()
        .await;
    let old = srv.pid();
    srv.hup();
    let line = srv.wait_log("new process started").await;
    let new: u32 = util::field(&line, "new_pid").parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(srv.wait_ready().await, new);
    assert_eq!(srv.answering_pid().await, new);
}

/// Sends a `/delay` request to the serving generation and waits until that
/// generation has started it; returns its pid and the request.
async fn slow_request_on(
    srv: &TestServer,
    web: &Target,
) -> (u32, tokio::task::JoinHandle<Result<client::Resp, String>>) {
    let pid = srv.pid();
    let seen = srv.log_count();
    let w = web.clone();
    let slow = tokio::spawn(async move { client::get(&w, "/delay").await });
    let tag = format!("pid={pid} ");
    srv.wait_log_after(seen, |l| l.contains(&tag) && l.contains("path=\"/delay\""))
        .await;
    (pid, slow)
}

#[tokio::test]
async fn at_most_three_old_generations_drain_at_once() {
    let config = Config::basic()
        .every_route("delay", "20s")
        .set("shutdown_timeout", "30s");
    let mut srv = TestServer::builder().config(config).start().await;
    let web = Target::plain(srv.addr("web"));
    let mut olds = Vec::new();
    let mut slows = Vec::new();
    // Five generations, each left draining a long request.
    for _ in 0..5 {
        let (pid, slow) = slow_request_on(&srv, &web).await;
        slows.push(slow);
        olds.push(pid);
        srv.restart().await;
    }
    // The two oldest were stopped at once; three drain on.
    util::wait_gone(olds[0]).await;
    util::wait_gone(olds[1]).await;
    for p in &olds[2..] {
        assert!(util::alive(*p), "generation {p} should still drain");
    }
    assert_eq!(
        srv.logs().matches("too many generations draining").count(),
        2,
        "{}",
        srv.logs()
    );
    for s in slows.drain(..2) {
        assert!(
            s.await.unwrap().is_err(),
            "the cut generation's request is cut"
        );
    }
}

/// Issue 12.7: a generation past `max_draining` that does not finish when
/// told (USR2; here it is SIGSTOPped) is killed two seconds later, so
/// stopped generations never pile up beyond the cap.
#[tokio::test]
async fn a_stopped_generation_past_the_cap_is_killed() {
    let config = Config::basic()
        .set("max_draining", 1)
        .every_route("delay", "30s")
        .set("shutdown_timeout", "60s");
    let mut srv = TestServer::builder().config(config).start().await;
    let web = Target::plain(srv.addr("web"));
    let mut pids = Vec::new();
    let mut slows = Vec::new();
    // Two generations left draining a long request each.
    for _ in 0..2 {
        let (pid, slow) = slow_request_on(&srv, &web).await;
        slows.push(slow);
        pids.push(pid);
        if pids.len() == 1 {
            srv.restart().await;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGSTOP,
            )
            .unwrap();
        }
    }
    srv.restart().await;
    util::wait_gone(pids[0]).await;
    srv.wait_log("still there after being told to finish: killing it")
        .await;
    assert!(util::alive(pids[1]), "the younger one drains on");
}

/// Runs the server under `prlimit --nofile=SOFT:HARD`.
async fn start_with_nofile(limit: &str) -> TestServer {
    start_with_nofile_on(limit, Config::basic(), |_| {}).await
}

/// [`start_with_nofile`] on `config`, `prepare` filling its directory first.
async fn start_with_nofile_on(
    limit: &str,
    config: Config,
    prepare: impl FnOnce(&std::path::Path),
) -> TestServer {
    let (dir, certs, path) = TestServer::prepare(&config.yaml());
    prepare(dir.path());
    let mut cmd = std::process::Command::new("prlimit");
    cmd.arg(format!("--nofile={limit}"))
        .arg("--")
        .arg(util::bin());
    let mut srv = TestServer::spawn_cmd(dir, certs, path, &[], cmd);
    srv.wait_ready().await;
    srv
}

fn nofile_of(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    line.split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>()
        .join(":")
}

/// Issue 14.4: the soft open-file limit is raised to the hard one; where
/// `max_connections` cannot fit under it, fewer connections are taken at
/// once (with a warning) and a restart can still open what it needs, with
/// more clients connected than the limit.
#[tokio::test]
async fn the_fd_limit_is_raised_and_a_restart_fits_under_it() {
    let srv = start_with_nofile("1024:20000").await;
    assert_eq!(nofile_of(srv.pid()), "20000:20000");
    drop(srv);

    let mut srv = start_with_nofile("200:200").await;
    srv.wait_log("max_connections does not fit under the open-file limit")
        .await;
    let mut clients = Vec::new();
    for _ in 0..300 {
        clients.push(TcpStream::connect(srv.addr("web")).await.unwrap());
    }
    let new = srv.restart().await;
    assert_eq!(nofile_of(new), "200:200");
    drop(clients);
    assert_eq!(srv.answering_pid().await, new);
    assert!(
        !srv.logs().contains("Too many open files"),
        "{}",
        srv.logs()
    );
}

/// Issue 25.4: with the fd limit used up by files a route holds open, the
/// failing accepts back off and are logged at most once a second (with a
/// count of the lines left out), counted in the metrics, and the clients
/// waiting in the queue are served once fds are free again.
#[tokio::test]
async fn accept_errors_back_off_and_do_not_flood_the_log() {
    let config = Config::basic()
        .edit("web", |l| {
            l.route("/metrics", "metrics", serde_json::json!({}))
        })
        .edit("web-tls", |l| {
            l.route("/files/", "static", serde_json::json!({ "root": "public" }))
        });
    let mut srv = start_with_nofile_on("120:120", config, |dir| {
        std::fs::create_dir(dir.join("public")).unwrap();
        std::fs::write(dir.join("public/big.bin"), vec![7u8; 8 << 20]).unwrap();
    })
    .await;
    // One HTTP/2 connection holds the file open on 100 streams it does not
    // read: the process runs out of fds.
    let tls = Target::tls(srv.addr("web-tls"), srv.tls()).h2();
    let h2 = client::connect(&tls).await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..100 {
        let mut c = h2.h2_clone().unwrap();
        streams.push(tokio::spawn(
            async move { c.get_unread("/files/big.bin").await },
        ));
    }
    let mut held = Vec::new();
    for s in streams {
        held.push(s.await.unwrap().unwrap());
    }
    assert!(held.iter().any(|r| r.status() == 200));
    assert!(
        util::fd_count(srv.pid()) >= 115,
        "the fds are used up: {}",
        util::fd_count(srv.pid())
    );
    // Clients arrive: the kernel queues them, accept fails.
    let seen = srv.log_count();
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(srv.addr("web")).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        waiting.push(s);
    }
    srv.wait_log_after(seen, |l| l.contains("accept: ")).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lines: Vec<String> = srv
        .logs()
        .lines()
        .skip(seen)
        .filter(|l| l.contains("accept: "))
        .map(String::from)
        .collect();
    assert!(
        lines.len() <= 5,
        "at most a line a second: {} lines\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert!(
        lines
            .iter()
            .skip(1)
            .any(|l| l.contains("suppressed=") && !l.contains("suppressed=0")),
        "the lines left out are counted: {}",
        lines.join("\n")
    );
    // The fds come back; every client in the queue is served.
    drop(held);
    drop(h2);
    for mut s in waiting {
        let mut out = Vec::new();
        tokio::time::timeout(util::WAIT, s.read_to_end(&mut out))
            .await
            .expect("served once fds are free")
            .unwrap();
        assert!(
            out.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }
    let metrics = client::get(&Target::plain(srv.addr("web")), "/metrics")
        .await
        .unwrap();
    let failed: u64 = metrics
        .body
        .lines()
        .find(|l| l.starts_with("gracesrv_accept_errors_total{listener=\"web\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or_else(|| panic!("{}", metrics.body));
    assert!(failed >= 2, "{}", metrics.body);
    srv.signal(nix::sys::signal::Signal::SIGTERM);
    srv.wait_first_exit().await;
}
