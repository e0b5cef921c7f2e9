//! The server without restarts: listeners, TLS, protocols, routes, config
//! errors, `check`, and stopping.

mod util;

use std::process::Command;

use nix::sys::signal::Signal;
use serde_json::json;
use util::client::{self, Target};
use util::config::Config;
use util::{TestServer, BIN};

#[tokio::test]
async fn plain_and_tls_listeners_answer_http1_and_h2() {
    let srv = TestServer::builder().start().await;
    let web = Target::plain(srv.addr("web"));
    let tls = Target::tls(srv.addr("web-tls"), srv.tls());

    let r = client::get(&web, "/").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.version, http::Version::HTTP_11);
    assert_eq!(r.body, format!("pid {} gen 1 web\n", srv.pid()));

    // h2c with prior knowledge on the plain listener.
    let r = client::get(&web.clone().h2(), "/").await.unwrap();
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.body, format!("pid {} gen 1 web\n", srv.pid()));

    // TLS: ALPN picks h2 when offered, HTTP/1.1 otherwise.
    let mut c = client::connect(&tls).await.unwrap();
    assert_eq!(c.alpn.as_deref(), Some(&b"h2"[..]));
    let r = c.get("/").await.unwrap();
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.body, format!("pid {} gen 1 web-tls\n", srv.pid()));

    let mut c = client::connect(&Target::tls(srv.addr("web-tls"), srv.tls_h1()))
        .await
        .unwrap();
    assert_eq!(c.alpn.as_deref(), Some(&b"http/1.1"[..]));
    let r = c.get("/").await.unwrap();
    assert_eq!(r.version, http::Version::HTTP_11);
    // Keep-alive: a second request on the same connection.
    assert_eq!(c.get("/").await.unwrap().status, 200);
}

/// All workers accept from one queue; a burst of keep-alive connections
/// must not all land on whichever worker woke first (one core busy, the
/// other idle).
#[tokio::test]
async fn keep_alive_connections_spread_over_the_workers() {
    let srv = TestServer::builder()
        .config(Config::basic())
        .env("GRACESRV_THREADS", "2")
        .start()
        .await;
    let web = Target::plain(srv.addr("web"));
    let mut conns = Vec::new();
    for _ in 0..24 {
        let mut c = client::connect(&web).await.unwrap();
        assert_eq!(c.get("/").await.unwrap().status, 200);
        conns.push(c);
    }
    let r = conns[0].get("/status").await.unwrap();
    let s: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let per_worker: Vec<u64> = s["threads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["connections"].as_u64().unwrap())
        .collect();
    assert_eq!(per_worker.len(), 2, "{s}");
    assert_eq!(per_worker.iter().sum::<u64>(), 24, "{s}");
    assert!(
        per_worker.iter().all(|&n| n >= 5),
        "connections per worker: {per_worker:?}"
    );
}

#[tokio::test]
async fn sni_picks_the_certificate_that_covers_the_name() {
    let config = r#"listeners:
  - name: web-tls
    addr: 127.0.0.1:0
    tls:
      cert: localhost.crt
      key: localhost.key
      sni:
        - { cert: other.crt, key: other.key }
    routes:
      - respond: { body: "ok\n" }
"#;
    let srv = TestServer::builder()
        .config_text(config)
        .before(|dir, certs| certs.leaf(dir, "other", &["other.test"], 2))
        .start()
        .await;
    let addr = srv.addr("web-tls");

    let mut other = Target::tls(addr, srv.tls());
    other.tls.as_mut().unwrap().1 = "other.test".into();
    let c = client::connect(&other).await.unwrap();
    let default = client::connect(&Target::tls(addr, srv.tls()))
        .await
        .unwrap();
    assert_ne!(
        c.peer_cert, default.peer_cert,
        "SNI other.test must get the other certificate"
    );
    let other_der = std::fs::read_to_string(srv.dir.path().join("other.crt")).unwrap();
    let other_der = rustls_pki_types::pem::PemObject::from_pem_slice(other_der.as_bytes())
        .map(|c: rustls_pki_types::CertificateDer| c.to_vec())
        .unwrap();
    assert_eq!(c.peer_cert.as_deref(), Some(&other_der[..]));
}

#[tokio::test]
async fn routes_respond_redirect_status_static() {
    let config = Config::basic().edit("web", |l| {
        l.route(
            "/go",
            "redirect",
            json!({ "to": "https://{host}:8443{uri}" }),
        )
        .route("/files", "static", json!({ "root": "public" }))
        .route(
            "/teapot",
            "respond",
            json!({
                "status": 418,
                "body": "short and stout {path}\n",
                "headers": { "x-kind": "teapot" },
            }),
        )
    });
    let srv = TestServer::builder()
        .config(config)
        .before(|dir, _| {
            let public = dir.join("public");
            std::fs::create_dir_all(public.join("sub")).unwrap();
            std::fs::write(public.join("index.html"), "<h1>index</h1>\n").unwrap();
            std::fs::write(public.join("a.txt"), "0123456789").unwrap();
            std::fs::write(public.join("sub/index.html"), "sub index\n").unwrap();
            std::fs::write(dir.join("secret.txt"), "secret").unwrap();
            std::os::unix::fs::symlink(dir.join("secret.txt"), public.join("link.txt")).unwrap();
        })
        .start()
        .await;
    let web = Target::plain(srv.addr("web"));

    let r = client::get(&web, "/go/x?y=1").await.unwrap();
    assert_eq!(r.status, 308);
    let host = srv.addr("web").ip().to_string();
    assert_eq!(
        r.headers["location"],
        format!("https://{host}:8443/go/x?y=1")
    );

    let r = client::get(&web, "/teapot/pot").await.unwrap();
    assert_eq!(r.status, 418);
    assert_eq!(r.headers["x-kind"], "teapot");
    assert_eq!(r.body, "short and stout /teapot/pot\n");

    let r = client::get(&web, "/status").await.unwrap();
    assert_eq!(r.headers["content-type"], "application/json");
    let s: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(s["pid"], srv.pid());
    assert_eq!(s["generation"], 1);
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["requests_total"].as_u64().unwrap() >= 3);
    assert!(s["connections_active"].as_u64().unwrap() >= 1);
    assert!(s["uptime_s"].as_f64().unwrap() >= 0.0);
    assert!(s["started_at"].as_str().unwrap().ends_with('Z'));
    let listeners = s["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 2);
    assert_eq!(listeners[1]["name"], "web-tls");
    assert_eq!(listeners[1]["tls"], true);
    assert_eq!(listeners[0]["addr"], srv.addr("web").to_string());

    // Static: index, a file with type and validators, conditional GET, Range.
    let r = client::get(&web, "/files/").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.body.as_str()),
        (200, "<h1>index</h1>\n")
    );
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let r = client::get(&web, "/files/sub").await.unwrap();
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "/files/sub/");
    assert_eq!(
        client::get(&web, "/files/sub/").await.unwrap().body,
        "sub index\n"
    );
    let r = client::get(&web, "/files/a.txt").await.unwrap();
    assert_eq!(r.body, "0123456789");
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let modified = r.headers["last-modified"].clone();
    let mut c = client::connect(&web).await.unwrap();
    let req = |h: &str, v: &http::HeaderValue| {
        http::Request::get("/files/a.txt")
            .header("host", "x")
            .header(h, v)
            .body(http_body_util::Empty::new())
            .unwrap()
    };
    let r = c
        .request(req("if-modified-since", &modified))
        .await
        .unwrap();
    assert_eq!(r.status, 304);
    let r = c
        .request(req("range", &http::HeaderValue::from_static("bytes=2-4")))
        .await
        .unwrap();
    assert_eq!((r.status.as_u16(), r.body.as_str()), (206, "234"));

    // Nothing outside the root, however it is asked for.
    for bad in [
        "/files/../secret.txt",
        "/files/%2e%2e/secret.txt",
        "/files/sub%2f..%2f..%2fsecret.txt",
        "/files/link.txt",
        "/files/a.txt%00",
        "/files//etc/passwd",
        "/files/missing.txt",
    ] {
        let r = client::get(&web, bad).await.unwrap();
        assert_eq!(r.status, 404, "{bad}: {}", r.body);
        assert!(!r.body.contains("secret"), "{bad}");
    }
}

fn check(config: &str) -> (i32, String, String) {
    let (dir, certs, path) = TestServer::prepare(config);
    certs.leaf(dir.path(), "other", &["other.test"], 2);
    // A key that belongs to no certificate here.
    Command::new("cp")
        .arg(dir.path().join("other.key"))
        .arg(dir.path().join("wrong.key"))
        .status()
        .unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let file = path.display().to_string();
    (
        out.status.code().unwrap(),
        stdout,
        stderr.replace(&file, "FILE"),
    )
}

#[test]
fn check_accepts_a_valid_config_and_summarises_it() {
    let (code, out, err) = check(&Config::basic().yaml());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("web-tls") && out.contains("https://127.0.0.1:0"),
        "{out}"
    );
}

#[test]
fn check_names_file_line_and_column_of_each_error() {
    let l = "listeners:\n  - name: web\n    addr: 127.0.0.1:0\n";
    let cases: &[(String, &str)] = &[
        ("listeners: [\n".into(), "FILE:1:12: "),
        (format!("{l}    bogus: 1\n"), "FILE:4:5: unknown field `bogus`"),
        (format!("shutdown_timeout: 3 weeks\n{l}"), "FILE:1:19: shutdown_timeout: duration \"3 weeks\""),
        (format!("{l}  - name: web\n    addr: 127.0.0.1:1\n"), "FILE:4:11: listeners[1].name: duplicate listener name \"web\""),
        (
            "listeners:\n  - {name: a, addr: '127.0.0.1:9'}\n  - {name: b, addr: '127.0.0.1:9'}\n".into(),
            "FILE:3:21: listeners[1].addr: 127.0.0.1:9 is used by another listener",
        ),
        (format!("{l}    routes:\n      - path: /x\n"), "FILE:5:9: listeners[0].routes[0]: route has no action"),
        (
            format!("{l}    routes:\n      - {{ path: /x, status: {{}}, respond: {{}} }}\n"),
            "listeners[0].routes[0]: route has more than one action",
        ),
        (format!("{l}    tls: {{ cert: nope.crt, key: localhost.key }}\n"), "FILE:4:18: listeners[0].tls.cert: no such file nope.crt"),
        (
            format!("{l}    tls: {{ cert: localhost.crt, key: wrong.key }}\n"),
            "FILE:4:38: listeners[0].tls.key: wrong.key does not match the certificate localhost.crt",
        ),
        (format!("{l}    routes:\n      - static: {{ root: nowhere }}\n"), "listeners[0].routes[0].static.root: nowhere is not a directory"),
        ("listeners:\n  - {name: Web!, addr: '127.0.0.1:9'}\n".into(), "listeners[0].name: \"Web!\" must be made of"),
        ("listeners:\n  - {name: a, addr: 'localhost'}\n".into(), "listeners[0].addr: \"localhost\" is not host:port"),
        (
            format!("{l}    tls: {{ acme: [a.example] }}\n"),
            "FILE:4:18: listeners[0].tls.acme: needs an `acme:` section (directory, storage)",
        ),
        (
            format!("acme: {{ directory: https://ca.example/dir }}\n{l}    tls: {{ acme: [localhost] }}\n"),
            "FILE:5:19: listeners[0].tls.acme: \"localhost\" is not a DNS name",
        ),
        (
            format!("acme: {{ directory: https://ca.example/dir, challenge: dns-01 }}\n{l}"),
            "FILE:1:55: acme.challenge: \"dns-01\" is not supported (use tls-alpn-01 or http-01)",
        ),
        (
            format!("acme: {{ directory: ftp://x }}\n{l}"),
            "FILE:1:20: acme.directory: \"ftp://x\" is not an http(s) URL",
        ),
        (
            format!("{l}    routes:\n      - proxy: {{ upstream: \"https://x:1/p\" }}\n"),
            "FILE:5:28: listeners[0].routes[0].proxy.upstream: \"https://x:1/p\" has a path",
        ),
        (
            format!("{l}    routes:\n      - proxy: {{ upstream: \"ftp://x:1\" }}\n"),
            "FILE:5:28: listeners[0].routes[0].proxy.upstream: \"ftp://x:1\" is not http://host:port or https://host:port",
        ),
    ];
    for (config, want) in cases {
        let (code, _, err) = check(config);
        assert_eq!(code, 1, "config {config:?} should be invalid");
        assert!(
            err.contains(want),
            "config {config:?}\nwant {want:?}\ngot  {err:?}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    }
}

#[test]
fn start_fails_with_one_message_and_exit_1() {
    let (_dir, _certs, path) = TestServer::prepare("listeners:\n  - {name: a, addr: 'nope'}\n");
    let out = Command::new(BIN).arg("-c").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":2:21: listeners[0].addr"), "{err}");

    // An address that is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = format!(
        "listeners:\n  - {{name: a, addr: '{}'}}\n",
        taken.local_addr().unwrap()
    );
    let (_dir, _certs, path) = TestServer::prepare(&cfg);
    let out = Command::new(BIN).arg("-c").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on"), "{err}");
}

#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--config"));
}

#[tokio::test]
async fn term_lets_a_request_in_flight_finish_then_exits_0() {
    for stop in [Signal::SIGTERM, Signal::SIGINT] {
        term_or_int_drains(stop).await;
    }
}

async fn term_or_int_drains(stop: Signal) {
    let mut srv = TestServer::builder().start().await;
    let web = Target::plain(srv.addr("web"));
    let pid = srv.pid();
    let slow = tokio::spawn({
        let web = web.clone();
        async move { client::get(&web, "/delay").await }
    });
    srv.wait_log("request started").await;
    srv.signal(stop);
    srv.wait_log("stopped accepting").await;
    // No new connections once stopping.
    let refused = tokio::net::TcpStream::connect(web.addr).await;
    assert!(refused.is_err(), "listener should be closed while draining");
    let r = slow.await.unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, format!("slow {pid}\n"));
    assert_eq!(r.headers["connection"], "close");
    let status = srv.wait_first_exit().await;
    assert_eq!(status.code(), Some(0));
    srv.wait_log("drained: exiting").await;
}

#[tokio::test]
async fn second_term_or_quit_stops_at_once() {
    for second in [Signal::SIGTERM, Signal::SIGQUIT] {
        let mut srv = TestServer::builder()
            .set("shutdown_timeout", "60s")
            .start()
            .await;
        let web = Target::plain(srv.addr("web"));
        let slow = tokio::spawn({
            let web = web.clone();
            async move { client::get(&web, "/delay").await }
        });
        srv.wait_log("request started").await;
        srv.signal(Signal::SIGTERM);
        srv.wait_log("stopping: draining").await;
        srv.signal(second);
        assert_eq!(srv.wait_first_exit().await.code(), Some(0));
        assert!(slow.await.unwrap().is_err(), "the in-flight request is cut");
    }
}

#[tokio::test]
async fn quit_closes_everything_at_once() {
    let mut srv = TestServer::builder().start().await;
    let web = Target::plain(srv.addr("web"));
    let slow = tokio::spawn(async move { client::get(&web, "/delay").await });
    srv.wait_log("request started").await;
    srv.signal(Signal::SIGQUIT);
    assert_eq!(srv.wait_first_exit().await.code(), Some(0));
    assert!(slow.await.unwrap().is_err());
}

fn timeouts_config(header: &str) -> Config {
    Config::basic().set(
        "timeouts",
        json!({ "header": header, "idle": "300ms", "handshake": "300ms" }),
    )
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_to_close(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(util::WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("connection still open after {:?}", util::WAIT),
        }
    }
}

#[tokio::test]
async fn stalled_clients_are_timed_out() {
    use tokio::io::AsyncWriteExt;
    let srv = TestServer::builder()
        .config(timeouts_config("400ms"))
        .start()
        .await;

    // A request head that never completes: closed at timeouts.header.
    let started = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(srv.addr("web"))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    read_to_close(&mut s).await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(350));

    // A TLS client that never finishes its handshake: closed at timeouts.handshake.
    let mut s = tokio::net::TcpStream::connect(srv.addr("web-tls"))
        .await
        .unwrap();
    s.write_all(b"\x16\x03\x01").await.unwrap();
    read_to_close(&mut s).await;
    srv.wait_log("TLS handshake timed out").await;
}

#[tokio::test]
async fn idle_keep_alive_connections_close_at_the_idle_timeout() {
    use tokio::io::AsyncWriteExt;
    // header (2s) is longer than idle (300ms): an idle connection ends at idle.
    let srv = TestServer::builder()
        .config(timeouts_config("2s"))
        .start()
        .await;
    let mut s = tokio::net::TcpStream::connect(srv.addr("web"))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let got = read_to_close(&mut s).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1900),
        "closed by the idle timeout, not the header one"
    );
}

/// Reads from `s` until `n` whole answers (with a content-length) came.
async fn answers<S: tokio::io::AsyncRead + Unpin>(s: &mut S, n: usize) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        let whole = text
            .split("HTTP/1.1 ")
            .skip(1)
            .filter(|a| {
                let len: usize = a
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().to_string())
                    })
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(usize::MAX);
                a.split_once("\r\n\r\n")
                    .is_some_and(|(_, body)| body.len() >= len)
            })
            .count();
        if whole >= n {
            return text;
        }
        match tokio::time::timeout(util::WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => panic!("closed after {text:?}"),
            Ok(Ok(k)) => got.extend_from_slice(&buf[..k]),
            Err(_) => panic!("no answer: {text:?}"),
        }
    }
}

/// A keep-alive connection idle for a second rests (hyper and its buffers
/// are let go: issue 30). The client's next requests on it, two at once,
/// are served, over plain TCP and TLS; the idle timeout still counts from
/// the last answer, rest or not.
#[tokio::test]
async fn resting_connections_serve_the_next_request_and_still_time_out() {
    use tokio::io::AsyncWriteExt;
    let srv = TestServer::builder()
        .config(Config::basic().set("timeouts", json!({ "idle": "4s" })))
        .start()
        .await;
    let one = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut tcp = tokio::net::TcpStream::connect(srv.addr("web"))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(srv.tls_h1())
        .connect(
            name,
            tokio::net::TcpStream::connect(srv.addr("web-tls"))
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    tcp.write_all(one.as_bytes()).await.unwrap();
    tls.write_all(one.as_bytes()).await.unwrap();
    answers(&mut tcp, 1).await;
    answers(&mut tls, 1).await;
    // Idle past the rest (1 s, and the timer's look after it): at rest.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let two = one.repeat(2);
    tcp.write_all(two.as_bytes()).await.unwrap();
    tls.write_all(two.as_bytes()).await.unwrap();
    let text = answers(&mut tcp, 2).await;
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    let text = answers(&mut tls, 2).await;
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    // Then idle again: closed at the idle timeout (4 s), not before, at
    // rest all the while.
    let last = std::time::Instant::now();
    assert!(read_to_close(&mut tcp).await.is_empty());
    let waited = last.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(3500)
            && waited < std::time::Duration::from_secs(6),
        "closed after {waited:?}"
    );
}

#[tokio::test]
async fn beyond_max_connections_accept_waits() {
    let srv = TestServer::builder()
        .set("max_connections", 2)
        .start()
        .await;
    let web = Target::plain(srv.addr("web"));
    let mut a = client::connect(&web).await.unwrap();
    let mut b = client::connect(&web).await.unwrap();
    assert_eq!(a.get("/").await.unwrap().status, 200);
    assert_eq!(b.get("/").await.unwrap().status, 200);
    // The third is not refused: it is accepted (status counts it) and held
    // until a slot frees, unserved.
    let third = tokio::spawn(async move { client::get(&web, "/").await });
    let deadline = std::time::Instant::now() + util::WAIT;
    loop {
        assert!(std::time::Instant::now() < deadline, "third never accepted");
        let s: serde_json::Value =
            serde_json::from_str(&a.get("/status").await.unwrap().body).unwrap();
        if s["connections_active"] == 3 {
            break;
        }
        // The count has no notification to wait on; ask again shortly.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(
        !third.is_finished(),
        "third connection was served beyond max_connections"
    );
    // Existing connections are unaffected.
    assert_eq!(a.get("/").await.unwrap().status, 200);
    drop(b);
    let r = third.await.unwrap().unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn json_logs_carry_pid_and_generation() {
    let config = Config::basic().set("log", json!({ "format": "json" }));
    let mut srv = TestServer::builder().config(config).spawn();
    let line = srv.wait_log("\"listening\"").await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["fields"]["message"], "listening");
    assert_eq!(v["span"]["generation"], 1);
    assert_eq!(v["span"]["pid"], srv.first_pid());
    assert_eq!(v["level"], "INFO");
    srv.signal_first(Signal::SIGTERM);
    assert_eq!(srv.wait_first_exit().await.code(), Some(0));
    for l in srv.logs().lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert_eq!(v["span"]["pid"], srv.first_pid(), "{l}");
    }
}
