//! Clients that mishandle GOAWAY lose nothing at restarts either (issue
//! 26): Python's httpx over HTTP/2 (python-h2), from PyPI in the tests' venv.

mod util;

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use util::config::{Config, Listener};
use util::TestServer;

const HTTPX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/h2/httpx_client.py");

/// One TLS listener (HTTP/2 by ALPN) whose `/` answers the pid.
fn config() -> Config {
    Config::new().listener(
        Listener::tls("web-tls", "localhost.crt", "localhost.key").route(
            "/",
            "respond",
            json!({ "body": "{pid}\n" }),
        ),
    )
}

fn httpx(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(util::venv::python());
    cmd.arg(HTTPX)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// The httpx client in a mode that answers lines on stdin with JSON lines.
struct Talking {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Talking {
    fn spawn(args: &[&str]) -> Talking {
        let mut child = httpx(args).spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        Talking {
            _child: child,
            stdin,
            lines,
        }
    }

    /// Its next line, within `util::WAIT`.
    async fn next(&mut self) -> serde_json::Value {
        let line = tokio::time::timeout(util::WAIT, self.lines.next_line())
            .await
            .expect("an answer in time")
            .unwrap()
            .expect("a line");
        serde_json::from_str(&line).unwrap()
    }
}

/// Issue 26.3: an idle httpx HTTP/2 connection does not answer the drain's
/// PING (it reads nothing while idle). The old generation still exits
/// within `draining_idle` plus a second, and the client's next request
/// succeeds (on a new connection, to the new generation).
#[tokio::test]
async fn an_idle_http2_client_lets_the_old_generation_go() {
    let mut srv = TestServer::builder()
        .config(
            config()
                .set("shutdown_timeout", "30s")
                .set("timeouts", json!({ "draining_idle": "1s" })),
        )
        .start()
        .await;
    let url = format!("https://{}/", srv.addr("web-tls"));
    let mut client = Talking::spawn(&["idle", &url]);
    let old = srv.pid();
    let first = client.next().await;
    assert_eq!(first["status"], 200, "{first}");
    assert_eq!(first["http_version"], "HTTP/2", "{first}");
    assert_eq!(first["body"], format!("{old}\n"));
    let new = srv.restart().await;
    let drained = Instant::now();
    while util::alive(old) {
        assert!(
            drained.elapsed() < Duration::from_secs(2),
            "the old generation still serves the idle client after {:?}",
            drained.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.stdin.write_all(b"again\n").await.unwrap();
    let second = client.next().await;
    assert_eq!(second["status"], 200, "{second}");
    assert_eq!(second["body"], format!("{new}\n"), "{second}");
}

/// Issue 26.2: httpx, 4 tasks on one HTTP/2 connection, GETs then POSTs,
/// 20 s each, while the server restarts every 0.5 s: nothing fails.
/// python-h2 fails whatever it is doing when any GOAWAY reaches it mid-way
/// (the body of a POST whose headers just went out, every answer still
/// coming), and these tasks are never all quiet. So the drain keeps the
/// busy connection and hands its requests on to the newest generation
/// (`serve::forward`): the answers come from the new generations (their
/// pids), on the client's first connection. (With a GOAWAY at the first
/// moment with no stream open, 1-2 requests failed per restart, as many
/// as nginx and Caddy lose with this client.)
#[tokio::test]
async fn httpx_over_http2_loses_nothing_at_restarts() {
    // The default `shutdown_timeout`: a connection never quiet is kept
    // 25 s of it.
    let mut srv = TestServer::builder()
        .config(config().set("shutdown_timeout", "30s"))
        .start()
        .await;
    let url = format!("https://{}/", srv.addr("web-tls"));
    for post in [false, true] {
        let mut args = vec!["load", &url[..], "--tasks", "4"];
        if post {
            args.push("--post");
        }
        let mut child = httpx(&args).spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut restarts = 0;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            srv.restart().await;
            restarts += 1;
        }
        drop(stdin);
        let out = tokio::time::timeout(util::WAIT, child.wait_with_output())
            .await
            .expect("httpx finished in time")
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert!(restarts >= 20, "{restarts} restarts");
        assert!(v["ok"].as_u64().unwrap() > 1000, "{v}");
        assert!(
            v["pids"].as_object().unwrap().len() >= restarts / 2,
            "the requests reach the new generations: {v}"
        );
        assert_eq!(v["failed"], 0, "post={post}, {restarts} restarts: {v}");
    }
}

/// A request that starts on a busy HTTP/2 connection of a draining
/// generation is answered by the newest generation, with its config, on
/// the client's own connection, and logged there once with the client's
/// address and TLS facts; the slow request in flight finishes where it
/// started.
#[tokio::test]
async fn a_busy_connection_is_served_by_the_newest_generation() {
    let routes = |version: &str| {
        Config::new()
            .set(
                "access_log",
                json!({ "path": "access.log", "format": "json" }),
            )
            .listener(
                Listener::tls("web-tls", "localhost.crt", "localhost.key")
                    .route(
                        "/slow",
                        "respond",
                        json!({ "body": "slow {pid}\n", "delay": "2s" }),
                    )
                    .route(
                        "/",
                        "respond",
                        json!({ "body": format!("{version} {{pid}}\n") }),
                    ),
            )
    };
    let mut srv = TestServer::builder().config(routes("v1")).start().await;
    let addr = srv.addr("web-tls");
    let (url, slow) = (format!("https://{addr}/"), format!("https://{addr}/slow"));
    let mut client = Talking::spawn(&["busy", &url, &slow]);
    assert_eq!(client.next().await["started"], true);
    let old = srv.pid();
    srv.write(&routes("v2"));
    let new = srv.restart().await;
    client.stdin.write_all(b"go\n").await.unwrap();
    let (fresh, slow) = (client.next().await, client.next().await);
    assert_eq!(fresh["status"], 200, "{fresh}");
    assert_eq!(fresh["body"], format!("v2 {new}\n"), "{fresh}");
    assert_eq!(fresh["same_connection"], true, "{fresh}");
    assert_eq!(fresh["http_version"], "HTTP/2", "{fresh}");
    assert_eq!(slow["body"], format!("slow {old}\n"), "{slow}");
    // The old generation lets the connection go once it is quiet.
    let drained = Instant::now();
    while util::alive(old) {
        assert!(drained.elapsed() < util::WAIT, "the old generation stays");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(client);
    srv.signal(nix::sys::signal::Signal::SIGTERM);
    srv.wait_first_exit().await;
    let log = std::fs::read_to_string(srv.dir.path().join("access.log")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["target"] == "/")
        .collect();
    assert_eq!(lines.len(), 1, "logged once: {log}");
    let v = &lines[0];
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["pid"], new, "{v}");
    assert_eq!(v["tls_version"], "TLSv1.3", "{v}");
    // The client named an address: no SNI, here as in the old generation.
    assert_eq!(v["sni"], json!(null), "{v}");
    assert!(
        v["remote"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{v}"
    );
}

/// Issue 26.1: Chromium (headless, from Debian) over HTTP/3 loads a page of
/// 20 sub-resources 30 times while the server restarts every 0.3 s, and
/// none fails. Chromium fails the requests it has queued on a connection
/// when a GOAWAY arrives, without sending or retrying them (21 to 34 of
/// 600 with the old drain's GOAWAY at the start of the drain); a draining
/// QUIC connection now stays with its generation until it has been quiet
/// for a while, which a page load never is in its middle. The page writes
/// its count into the DOM, which `--dump-dom` prints after the load event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_over_http3_loses_no_sub_resource_across_restarts() {
    let chromium = which("chromium").expect("chromium is installed (.ci/run installs it)");
    let scripts: String = (0..20)
        .map(|i| format!("<script async src=\"/s/{i}.js\" onerror=\"bad++\"></script>\n"))
        .collect();
    let page = format!(
        "<!doctype html><html><body><div id=\"r\">loading</div>\n<script>var good = 0, bad = 0; function ok(p) {{ good++; }}\nwindow.addEventListener(\"load\", function () {{ document.getElementById(\"r\").textContent = \"good=\" + good + \" bad=\" + bad; }});</script>\n{scripts}</body></html>\n"
    );
    let config = Config::new()
        .set("access_log", json!({ "path": "access.log", "format": "json" }))
        .listener(
            Listener::tls("h3", "localhost.crt", "localhost.key")
                .set("http3", true)
                .route(
                    "/s/",
                    "respond",
                    json!({ "body": "ok('{path}');\n", "headers": { "content-type": "application/javascript" } }),
                )
                .route("/", "static", json!({ "root": "public" })),
        );
    // The page exists before the server starts: `static` checks its root.
    let mut srv = TestServer::builder()
        .config(config)
        .before(move |dir, _| {
            std::fs::create_dir(dir.join("public")).unwrap();
            std::fs::write(dir.join("public/page.html"), page).unwrap();
        })
        .spawn();
    srv.wait_ready().await;
    let port = srv.addr("h3").port();
    // Chromium trusts the test certificate by its key's hash.
    let spki = {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl x509 -in {} -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
                srv.dir.path().join("localhost.crt").display()
            ))
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let profile = srv.dir.path().join("chromium-profile");
    let load = || {
        let mut cmd = tokio::process::Command::new(&chromium);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-quic",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--origin-to-force-quic-on=localhost:{port}"))
        .arg("--host-resolver-rules=MAP localhost 127.0.0.1")
        .arg(format!("--ignore-certificate-errors-spki-list={spki}"))
        .arg("--dump-dom")
        .arg(format!("https://localhost:{port}/page.html"))
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
        cmd
    };
    let (mut good, mut bad) = (0, 0);
    let mut restarts = 0;
    let mut next_restart = Instant::now() + Duration::from_millis(300);
    for _ in 0..30 {
        let mut cmd = load();
        let mut run = tokio::spawn(async move {
            let out = tokio::time::timeout(util::WAIT, cmd.output()).await;
            out.expect("chromium finished in time").unwrap()
        });
        // HUPs every 0.3 s while Chromium loads.
        let out = loop {
            tokio::select! {
                out = &mut run => break out.unwrap(),
                _ = tokio::time::sleep_until(next_restart.into()) => {
                    srv.hup();
                    restarts += 1;
                    next_restart += Duration::from_millis(300);
                }
            }
        };
        let dom = String::from_utf8_lossy(&out.stdout);
        let counts = dom
            .split("id=\"r\">")
            .nth(1)
            .and_then(|r| r.split('<').next())
            .unwrap_or_else(|| panic!("no result in the page: {dom}"))
            .to_string();
        let n = |k: &str| -> u32 {
            counts
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(k)?.parse().ok())
                .unwrap_or_else(|| panic!("{counts}"))
        };
        good += n("good=");
        bad += n("bad=");
    }
    assert!(restarts >= 20, "{restarts} restarts");
    assert_eq!((good, bad), (600, 0), "over {restarts} restarts");
    // Every request went over HTTP/3 (the log is written within a second).
    let log = srv.dir.path().join("access.log");
    util::until("630 HTTP/3 requests are logged", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("\"protocol\":\"HTTP/3.0\"")
            .count()
            >= 630
    })
    .await;
}

/// `name` on the PATH.
fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Issue 26.4: the GOAWAY IDs a draining generation sends on an HTTP/3
/// connection never increase (RFC 9114 section 5.2), read by aioquic from
/// the server's control stream: on a connection that has taken no request
/// (one GOAWAY, 0), and on one busy with requests one after another, which
/// is never quiet and so drains in two steps (a first GOAWAY that allows
/// every stream, then the real one). Every request below the last ID is
/// answered; none is failed.
#[tokio::test]
async fn http3_goaway_ids_never_increase() {
    let config = Config::new()
        .set("timeouts", json!({ "draining_idle": "1s" }))
        .listener(
            Listener::tls("h3", "localhost.crt", "localhost.key")
                .set("http3", true)
                .route("/", "respond", json!({ "body": "{pid}\n" })),
        );
    let mut srv = TestServer::builder().config(config).start().await;
    let url = format!("https://{}/", srv.addr("h3"));
    let client = |busy: bool| {
        let mut cmd = tokio::process::Command::new(util::venv::python());
        cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/h3/client.py"))
            .args(["goaway", &url])
            .args(busy.then_some("--busy"))
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        cmd.spawn().unwrap()
    };
    let (mut idle, mut busy) = (client(false), client(true));
    for child in [&mut idle, &mut busy] {
        let mut out = tokio::io::BufReader::new(child.stdout.as_mut().unwrap());
        let mut line = String::new();
        tokio::time::timeout(util::WAIT, out.read_line(&mut line))
            .await
            .expect("connected in time")
            .unwrap();
        assert_eq!(line.trim(), "connected");
    }
    // The busy client is past its first answers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    srv.restart().await;
    for (name, child) in [("idle", idle), ("busy", busy)] {
        let out = tokio::time::timeout(util::WAIT, child.wait_with_output())
            .await
            .expect("the client finished in time")
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        let ids: Vec<u64> = v["goaways"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_u64().unwrap())
            .collect();
        assert!(!ids.is_empty(), "{name}: no GOAWAY: {v}");
        assert!(
            ids.windows(2).all(|w| w[1] <= w[0]),
            "{name}: the GOAWAY ID increased: {v}"
        );
        assert_eq!(v["closed"], true, "{name}: the server closed: {v}");
        assert_eq!(v["failed"], json!([]), "{name}: {v}");
        let last = *ids.last().unwrap();
        let answered = v["answered"].as_array().unwrap();
        assert!(
            answered.iter().all(|id| id.as_u64().unwrap() < last),
            "{name}: {v}"
        );
        if name == "idle" {
            assert_eq!(ids, [0], "{v}");
        } else {
            assert!(answered.len() > 10, "{v}");
            assert_eq!(ids.len(), 2, "two steps: {v}");
            assert_eq!(
                last,
                answered.last().unwrap().as_u64().unwrap() + 4,
                "the last GOAWAY names the stream after the last one served: {v}"
            );
        }
    }
}
