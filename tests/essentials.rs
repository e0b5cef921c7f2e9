//! What every site expects of its server, as route options: access by
//! address (behind trusted proxies too), basic_auth with `htpasswd -B`
//! users, response headers and caching headers, and a single-page app's
//! fallback and directory listings. Checked with curl, over HTTP/1.1 and
//! HTTP/2.

mod util;

use std::path::Path;
use std::process::Command;

use serde_json::json;
use util::config::{Config, Listener};
use util::TestServer;

/// curl's status, headers (lowercased) and body for `args` (`-k`, the URL...).
fn curl(args: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-k",
            "-D",
            "/dev/stderr",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .output()
        .expect("curl");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        String::from_utf8_lossy(&out.stderr).to_lowercase(),
        body.to_string(),
    )
}

fn site(dir: &Path) {
    let public = dir.join("public");
    std::fs::create_dir_all(public.join("docs/sub")).unwrap();
    std::fs::write(public.join("index.html"), "<h1>the app</h1>\n").unwrap();
    std::fs::write(public.join("app.js"), "run();\n").unwrap();
    std::fs::write(public.join("docs/b.txt"), "b\n").unwrap();
    std::fs::write(public.join("docs/a <&\"'>.txt"), "a\n").unwrap();
    let out = Command::new("htpasswd")
        .args(["-cbB", "-C", "5"])
        .arg(dir.join("users.htpasswd"))
        .args(["alice", "s3cret-Pa55"])
        .output()
        .expect("htpasswd (Debian's apache2-utils)");
    assert!(out.status.success(), "{out:?}");
    // And an argon2id user, hashed by Debian's argon2 program.
    let hash = argon2("carol-Pa55", &["-id", "-t", "2", "-m", "12", "-p", "1"]);
    let mut users = std::fs::read_to_string(dir.join("users.htpasswd")).unwrap();
    users += &format!("carol:{hash}\n");
    std::fs::write(dir.join("users.htpasswd"), users).unwrap();
}

/// `password` hashed by Debian's `argon2` program, as a PHC string.
fn argon2(password: &str, args: &[&str]) -> String {
    use std::io::Write;
    let mut child = Command::new("argon2")
        .arg("gracesrv-test-salt")
        .args(args)
        .arg("-e")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("argon2 (Debian's argon2)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(password.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn access_control_and_answer_rules() {
    let config = Config::new().listener(
        Listener::plain("web")
            .set("trusted_proxies", json!(["127.0.0.2/32"]))
            .set("headers", json!({ "set": { "x-frame-options": "DENY" } }))
            .route("/open", "respond", json!({ "body": "open\n" }))
            .route("/local", "respond", json!({ "body": "local\n" }))
            .route("/blocked", "respond", json!({ "body": "blocked\n" }))
            .route("/internal", "respond", json!({ "body": "internal\n" }))
            .route("/staff", "respond", json!({ "body": "staff only\n" }))
            .route("/cached", "respond", json!({ "body": "cached\n" }))
            .route(
                "/missing",
                "respond",
                json!({ "status": 404, "body": "no\n" }),
            )
            .route("/own", "respond", json!({ "body": "own\n" })),
    );
    let mut yaml: serde_json::Value = serde_yaml_like(&config);
    // Route options, written beside each action.
    let routes = yaml["listeners"][0]["routes"].as_array_mut().unwrap();
    for r in routes.iter_mut() {
        match r["path"].as_str().unwrap() {
            "/local" => r["allow"] = json!(["127.0.0.1/32", "::1"]),
            "/blocked" => r["deny"] = json!(["127.0.0.0/8"]),
            "/internal" => r["allow"] = json!(["10.0.0.0/8"]),
            "/staff" => {
                r["basic_auth"] = json!({ "realm": "staff", "users_file": "users.htpasswd" })
            }
            "/cached" | "/missing" => r["cache"] = json!({ "max_age": "1h", "immutable": true }),
            "/own" => {
                r["headers"] =
                    json!({ "set": { "x-own": "{remote}" }, "remove": ["x-frame-options"] })
            }
            _ => {}
        }
    }
    let srv = TestServer::builder()
        .config_text(serde_json::to_string_pretty(&yaml).unwrap())
        .before(|dir, _| site(dir))
        .start()
        .await;
    let base = format!("http://{}", srv.addr("web"));
    let url = |p: &str| format!("{base}{p}");

    // The listener's headers on every route; a route's own replace them.
    let (code, head, _) = curl(&[&url("/open")]);
    assert_eq!(code, 200);
    assert!(head.contains("x-frame-options: deny"), "{head}");
    let (_, head, _) = curl(&[&url("/own")]);
    assert!(
        head.contains("x-own: 127.0.0.1") && !head.contains("x-frame-options"),
        "{head}"
    );

    // allow / deny by the client's address.
    assert_eq!(curl(&[&url("/local")]).0, 200);
    let (code, _, body) = curl(&[&url("/blocked")]);
    assert_eq!((code, body.as_str()), (403, "forbidden\n"));
    assert_eq!(curl(&[&url("/internal")]).0, 403);
    // A forwarding header counts only from a trusted proxy (127.0.0.2).
    let xff = "x-forwarded-for: 10.1.2.3";
    assert_eq!(curl(&["-H", xff, &url("/internal")]).0, 403);
    assert_eq!(
        curl(&["--interface", "127.0.0.2", "-H", xff, &url("/internal")]).0,
        200
    );
    assert_eq!(
        curl(&[
            "--interface",
            "127.0.0.2",
            "-H",
            "x-forwarded-for: 203.0.113.5",
            &url("/internal")
        ])
        .0,
        403
    );

    // basic_auth with htpasswd -B users, over HTTP/1.1 and HTTP/2.
    let (code, head, _) = curl(&[&url("/staff")]);
    assert_eq!(code, 401);
    assert!(
        head.contains("www-authenticate: basic realm=\"staff\""),
        "{head}"
    );
    assert_eq!(curl(&["-u", "alice:wrong", &url("/staff")]).0, 401);
    assert_eq!(curl(&["-u", "mallory:s3cret-Pa55", &url("/staff")]).0, 401);
    let (code, _, body) = curl(&["-u", "alice:s3cret-Pa55", &url("/staff")]);
    assert_eq!((code, body.as_str()), (200, "staff only\n"));
    // The argon2id user.
    assert_eq!(curl(&["-u", "carol:carol-Pa5", &url("/staff")]).0, 401);
    let (code, _, body) = curl(&["-u", "carol:carol-Pa55", &url("/staff")]);
    assert_eq!((code, body.as_str()), (200, "staff only\n"));
    // Remembered: the second login needs no bcrypt, and still checks.
    assert_eq!(
        curl(&[
            "--http2-prior-knowledge",
            "-u",
            "alice:s3cret-Pa55",
            &url("/staff")
        ])
        .0,
        200
    );
    assert_eq!(
        curl(&[
            "--http2-prior-knowledge",
            "-u",
            "alice:s3cret-Pa5",
            &url("/staff")
        ])
        .0,
        401
    );
    assert!(!srv.logs().contains("s3cret"), "a password reached the log");

    // Cache-Control on answers, not on errors.
    let (_, head, _) = curl(&[&url("/cached")]);
    assert!(
        head.contains("cache-control: max-age=3600, immutable"),
        "{head}"
    );
    let (code, head, _) = curl(&[&url("/missing")]);
    assert_eq!(code, 404);
    assert!(!head.contains("cache-control"), "{head}");
}

/// The config as JSON (which is YAML), to add route options to.
fn serde_yaml_like(config: &Config) -> serde_json::Value {
    serde_json::from_str(&config.yaml()).unwrap()
}

#[tokio::test]
async fn a_single_page_app_and_directory_listings() {
    let config = Config::new().listener(
        Listener::plain("web")
            .route(
                "/",
                "static",
                json!({ "root": "public", "fallback": "index.html" }),
            )
            .route(
                "/docs/",
                "static",
                json!({ "root": "public/docs", "browse": true }),
            ),
    );
    let srv = TestServer::builder()
        .config(config)
        .before(|dir, _| site(dir))
        .start()
        .await;
    let url = |p: &str| format!("http://{}{p}", srv.addr("web"));
    // A path of the app: its page.
    for p in ["/", "/users/42", "/settings/profile/"] {
        let (code, _, body) = curl(&[&url(p)]);
        assert_eq!((code, body.as_str()), (200, "<h1>the app</h1>\n"), "{p}");
    }
    assert_eq!(curl(&[&url("/app.js")]).2, "run();\n");
    // What looks like a file is a 404, never the page.
    for p in ["/missing.js", "/styles/site.css", "/a.b/c.png"] {
        assert_eq!(curl(&[&url(p)]).0, 404, "{p}");
    }
    // No escape from root, fallback or not.
    let (code, _, body) = curl(&["--path-as-is", &url("/../../etc/passwd")]);
    assert!(
        matches!(code, 400 | 404) && !body.contains("the app"),
        "{code} {body}"
    );

    // A listing: sorted, every name escaped.
    let (code, head, body) = curl(&[&url("/docs/")]);
    assert_eq!(code, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    let a = body
        .find("a &lt;&amp;&quot;&#39;&gt;.txt")
        .unwrap_or_else(|| panic!("{body}"));
    let b = body.find(">b.txt<").unwrap_or_else(|| panic!("{body}"));
    let sub = body.find(">sub/<").unwrap_or_else(|| panic!("{body}"));
    assert!(a < b && b < sub, "{body}");
    assert!(!body.contains("<&"), "{body}");
    assert!(body.contains("href=\"a%20%3C%26%22%27%3E.txt\""), "{body}");
    // Off by default: the app's root is not listed.
    assert!(!curl(&[&url("/")]).2.contains("Index of"));
}

#[tokio::test]
async fn option_errors_name_their_place() {
    let check = |route: serde_json::Value, users: &str| {
        let config = Config::new().listener(Listener::plain("web").route(
            "/",
            "respond",
            json!({ "body": "x" }),
        ));
        let mut v = serde_yaml_like(&config);
        if let (Some(r), serde_json::Value::Object(extra)) =
            (v["listeners"][0]["routes"][0].as_object_mut(), route)
        {
            r.extend(extra);
        }
        let (dir, _certs, path) = TestServer::prepare(&serde_json::to_string_pretty(&v).unwrap());
        std::fs::write(dir.path().join("users.htpasswd"), users).unwrap();
        let out = Command::new(util::BIN)
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string()
                + &String::from_utf8_lossy(&out.stdout),
        )
    };
    // A good set of options is listed, each as it is in force.
    let htpasswd = Command::new("htpasswd")
        .args(["-nbB", "-C", "5", "bob", "pw"])
        .output()
        .expect("htpasswd");
    let (ok, out) = check(
        json!({
            "compress": { "encodings": ["gzip", "br"], "min_size": "2KB", "level": 5 },
            "cache": { "max_age": "1h", "immutable": true },
            "headers": { "set": { "x-frame-options": "DENY" }, "remove": ["server"] },
            "allow": ["10.0.0.0/8", "127.0.0.1/32"],
            "deny": ["10.1.0.0/16"],
            "basic_auth": { "realm": "staff", "users_file": "users.htpasswd" },
            "rate_limit": { "requests": 100, "per": "1s", "burst": 50 },
        }),
        &String::from_utf8_lossy(&htpasswd.stdout),
    );
    assert!(ok, "{out}");
    for item in [
        "/: compress gzip,br (min 2048 B, level 5)",
        "cache max-age=3600 immutable",
        "headers set x-frame-options remove server",
        "allow 10.0.0.0/8 127.0.0.1/32",
        "deny 10.1.0.0/16",
        "basic_auth \"staff\" (users.htpasswd)",
        "rate_limit 100/1s burst 50 by remote",
    ] {
        assert!(out.contains(item), "{item} not in:\n{out}");
    }
    let md5 = "alice:$apr1$9t1Kb0zS$7c0VbwbYDbl/P6lYmQkWY0\n";
    for (route, users, expect) in [
        (
            json!({ "allow": ["10.0.0.0/33"] }),
            "",
            "allow[0]: \"10.0.0.0/33\" is not an address or a network",
        ),
        (
            json!({ "deny": ["10.0.0.1/8"] }),
            "",
            "has host bits set (did you mean 10.0.0.0/8?)",
        ),
        (
            json!({ "basic_auth": { "users_file": "nope.htpasswd" } }),
            "",
            "basic_auth.users_file: cannot read nope.htpasswd",
        ),
        (
            json!({ "basic_auth": { "users_file": "users.htpasswd" } }),
            md5,
            "users.htpasswd line 1: the hash of \"alice\" is not bcrypt or argon2",
        ),
        (
            json!({ "basic_auth": { "users_file": "users.htpasswd" } }),
            "just a line\n",
            "users.htpasswd line 1: not user:hash",
        ),
        (
            json!({ "basic_auth": { "users_file": "users.htpasswd" } }),
            &*format!(
                "dave:{}\n",
                argon2("pw", &["-id", "-t", "1", "-m", "19", "-p", "1"])
            ),
            "is more than 262144 a check may take",
        ),
        (
            json!({ "cache": { "max_age": "soon" } }),
            "",
            "cache.max_age",
        ),
        (
            json!({ "compress": { "encodings": ["gzip", "lz4"] } }),
            "",
            "compress.encodings: \"lz4\" is not an encoding",
        ),
        (
            json!({ "compress": { "level": 23 } }),
            "",
            "compress.level: \"23\" is not a level",
        ),
    ] {
        let (ok, err) = check(route.clone(), users);
        assert!(!ok, "{route} passed");
        assert!(err.contains(expect), "{route}: {err}");
        let at = err.split("server.yaml:").nth(1).unwrap_or("");
        assert!(
            at.chars().next().is_some_and(|c| c.is_ascii_digit()),
            "no line: {err}"
        );
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn rate_limits_answer_429_and_stay_bounded() {
    let config = Config::new().listener(
        Listener::plain("web")
            .route("/api", "respond", json!({ "body": "api\n" }))
            .route("/keyed", "respond", json!({ "body": "keyed\n" }))
            .route("/metrics", "metrics", json!({})),
    );
    let mut v = serde_yaml_like(&config);
    for r in v["listeners"][0]["routes"].as_array_mut().unwrap() {
        match r["path"].as_str().unwrap() {
            "/api" => r["rate_limit"] = json!({ "requests": 2, "per": "1h", "burst": 3 }),
            "/keyed" => {
                r["rate_limit"] = json!({ "requests": 1, "per": "1h", "key": "header:x-api-key" })
            }
            _ => {}
        }
    }
    let srv = TestServer::builder()
        .config_text(serde_json::to_string_pretty(&v).unwrap())
        .start()
        .await;
    let url = |p: &str| format!("http://{}{p}", srv.addr("web"));
    // One at its time and three ahead: four, then 429 with Retry-After.
    for _ in 0..4 {
        assert_eq!(curl(&[&url("/api")]).0, 200);
    }
    let (code, head, _) = curl(&[&url("/api")]);
    assert_eq!(code, 429);
    let after: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{head}"));
    assert!((1700..=1800).contains(&after), "{after}");
    // Another client is not limited.
    assert_eq!(curl(&["--interface", "127.0.0.2", &url("/api")]).0, 200);
    // Counted in the metrics.
    let metrics = curl(&[&url("/metrics")]).2;
    assert!(
        metrics.contains("gracesrv_rate_limited_total{listener=\"web\",route=\"/api\"} 1"),
        "{metrics}"
    );

    // 100,000 distinct keys, pipelined on a few connections: each key's
    // first request passes, and the server's memory stays bounded.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let before = rss_kb(srv.pid());
    let mut tasks = Vec::new();
    for c in 0..4 {
        let addr = srv.addr("web");
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut r, mut w) = s.split();
            let write = async {
                for i in 0..25_000 {
                    let req =
                        format!("GET /keyed HTTP/1.1\r\nHost: x\r\nx-api-key: k{c}-{i}\r\n\r\n");
                    w.write_all(req.as_bytes()).await.unwrap();
                }
            };
            let read = async {
                let (mut buf, mut ok, mut seen) = (vec![0u8; 65536], 0, 0);
                let mut tail = Vec::new();
                while seen < 25_000 {
                    let n = r.read(&mut buf).await.unwrap();
                    assert!(n > 0, "closed after {seen}");
                    tail.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&tail).to_string();
                    seen += text.matches("HTTP/1.1 ").count();
                    ok += text.matches("HTTP/1.1 200").count();
                    let keep = text.rfind("HTTP/1.1 ").map_or(0, |_| 0);
                    tail.drain(..tail.len() - keep);
                }
                ok
            };
            let (_, ok) = tokio::join!(write, read);
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    assert_eq!(ok, 100_000, "every new key's first request passes");
    let grown = rss_kb(srv.pid()).saturating_sub(before);
    assert!(grown < 8_000, "100,000 keys grew the server by {grown} KB");
    // A key seen once more is limited (an old key may have been pushed out
    // of the table by the 100,000 since: forgotten, never limited more).
    assert_eq!(curl(&["-H", "x-api-key: again", &url("/keyed")]).0, 200);
    assert_eq!(curl(&["-H", "x-api-key: again", &url("/keyed")]).0, 429);
}

/// A body fed event by event from a channel.
struct Events(tokio::sync::mpsc::Receiver<bytes::Bytes>);

impl hyper::body::Body for Events {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|e| e.map(|e| Ok(hyper::body::Frame::data(e))))
    }
}

#[tokio::test]
async fn compressed_files_decode_byte_for_byte_and_events_stream() {
    // An upstream of server-sent events, sent when the test says.
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
    let rx = std::sync::Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let rx = rx.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let rx = rx.clone();
                    async move {
                        let rx = rx.lock().await.take().expect("one stream");
                        let mut res = http::Response::new(Events(rx));
                        res.headers_mut()
                            .insert("content-type", "text/event-stream".parse().unwrap());
                        Ok::<_, std::convert::Infallible>(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), service)
                    .await;
            });
        }
    });
    let config = Config::new().listener(
        Listener::plain("web")
            .route("/", "static", json!({ "root": "public" }))
            .route(
                "/events",
                "proxy",
                json!({ "upstream": format!("http://{upstream}") }),
            ),
    );
    let mut v = serde_yaml_like(&config);
    v["listeners"][0]["routes"][1]["compress"] = json!({ "encodings": ["gzip"] });
    let srv = TestServer::builder()
        .config_text(serde_json::to_string_pretty(&v).unwrap())
        .before(|dir, _| {
            let words = [
                "graceful", "restart", "socket", "listener", "drain", "handoff",
            ];
            let text: String = (0..30_000)
                .map(|i| words[(i * 7 + i / 3) % 6])
                .collect::<Vec<_>>()
                .join(" ");
            std::fs::create_dir_all(dir.join("public")).unwrap();
            std::fs::write(dir.join("public/page.html"), format!("<p>{text}</p>\n")).unwrap();
        })
        .start()
        .await;
    let url = |p: &str| format!("http://{}{p}", srv.addr("web"));
    let page = std::fs::read(srv.dir.path().join("public/page.html")).unwrap();
    // Each encoding, decoded by Debian's own program, is the file.
    for (enc, decoder) in [("gzip", "gzip"), ("br", "brotli"), ("zstd", "zstd")] {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "-D", "/dev/stderr", "-H"])
            .arg(format!("Accept-Encoding: {enc}"))
            .arg(url("/page.html"))
            .output()
            .await
            .unwrap();
        let head = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(head.contains(&format!("content-encoding: {enc}")), "{head}");
        assert!(head.contains("vary: accept-encoding"), "{head}");
        assert!(
            out.stdout.len() < page.len() / 3,
            "{enc}: {} bytes",
            out.stdout.len()
        );
        let mut d = tokio::process::Command::new(decoder)
            .args(["-dc"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{decoder}: {e}"));
        use tokio::io::AsyncWriteExt;
        let mut stdin = d.stdin.take().unwrap();
        stdin.write_all(&out.stdout).await.unwrap();
        drop(stdin);
        let decoded = d.wait_with_output().await.unwrap();
        assert!(
            decoded.stdout == page,
            "{enc}: decoded by {decoder}, not the file"
        );
    }
    // No Accept-Encoding, or identity only: the file as it is.
    let plain = curl(&[&url("/page.html")]);
    assert_eq!(plain.2.len(), page.len());
    assert!(!plain.1.contains("content-encoding"), "{}", plain.1);
    let none = curl(&[
        "-H",
        "Accept-Encoding: gzip;q=0, identity",
        &url("/page.html"),
    ]);
    assert!(!none.1.contains("content-encoding"), "{}", none.1);
    // A range request is served as it asks, never compressed.
    let range = curl(&[
        "-H",
        "Accept-Encoding: gzip",
        "-H",
        "Range: bytes=0-9",
        &url("/page.html"),
    ]);
    assert_eq!((range.0, range.2.as_str()), (206, "<p>gracefu"));

    // Events: each one reaches curl (decompressing) before the next is sent.
    let head = srv.dir.path().join("events.head");
    let mut events = tokio::process::Command::new("curl")
        .args(["-sSN", "--compressed", "-H", "Accept-Encoding: gzip", "-D"])
        .arg(&head)
        .arg(url("/events"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(events.stdout.take().unwrap()).lines();
    for i in 0..3 {
        tx.send(bytes::Bytes::from(format!("data: event {i}\n\n")))
            .await
            .unwrap();
        let line = tokio::time::timeout(util::WAIT, lines.next_line()).await;
        assert!(
            matches!(&line, Ok(Ok(Some(l))) if *l == format!("data: event {i}")),
            "{line:?}"
        );
        let blank = lines.next_line().await.unwrap();
        assert_eq!(blank.as_deref(), Some(""));
    }
    drop(tx);
    assert_eq!(lines.next_line().await.unwrap(), None);
    let head = std::fs::read_to_string(head).unwrap().to_lowercase();
    assert!(head.contains("content-encoding: gzip"), "{head}");
}

/// One listener serving `public` as a `static` route at `/`.
fn static_public() -> Config {
    Config::new().listener(Listener::plain("web").route("/", "static", json!({ "root": "public" })))
}

/// Sets `path`'s modification time to `t`.
fn set_mtime(path: &Path, t: std::time::SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[tokio::test]
async fn precompressed_siblings_are_served_when_newer() {
    let config = static_public();
    let srv = TestServer::builder()
        .config(config)
        .before(|dir, _| {
            let public = dir.join("public");
            std::fs::create_dir_all(&public).unwrap();
            let text = "precompressed, or not. ".repeat(500);
            std::fs::write(public.join("fresh.html"), &text).unwrap();
            std::fs::write(public.join("stale.html"), &text).unwrap();
            // Made by Debian's programs: gzip -k, and a stale .br older than its file.
            for (prog, args, file) in [
                ("gzip", ["-k", "-9"], "fresh.html"),
                ("brotli", ["-k", "-q"], "stale.html"),
            ] {
                let mut cmd = Command::new(prog);
                cmd.args(args);
                if prog == "brotli" {
                    cmd.arg("11");
                }
                assert!(cmd.arg(public.join(file)).status().unwrap().success());
            }
            // The file changed after its .br was made.
            let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
            set_mtime(&public.join("stale.html.br"), old);
        })
        .start()
        .await;
    let url = |p: &str| format!("http://{}{p}", srv.addr("web"));
    let public = srv.dir.path().join("public");
    let get = |enc: &str, path: &str| {
        Command::new("curl")
            .args(["-sS", "-D", "/dev/stderr", "-H"])
            .arg(format!("Accept-Encoding: {enc}"))
            .arg(url(path))
            .output()
            .unwrap()
    };
    // The sibling's own bytes, as the file in gzip.
    let out = get("gzip", "/fresh.html");
    let head = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        head.contains("content-encoding: gzip") && head.contains("content-type: text/html"),
        "{head}"
    );
    assert!(
        head.contains("-gzip\"") && head.contains("vary: accept-encoding"),
        "{head}"
    );
    assert_eq!(
        out.stdout,
        std::fs::read(public.join("fresh.html.gz")).unwrap()
    );
    // A stale sibling is not used: compressed afresh.
    let out = get("br", "/stale.html");
    let head = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(head.contains("content-encoding: br"), "{head}");
    assert_ne!(
        out.stdout,
        std::fs::read(public.join("stale.html.br")).unwrap()
    );
}

/// Small files are answered from memory (issue 29's precompressed row):
/// every kind of change on disk is seen by the very next request, on every
/// connection: written in place, replaced by a rename, touched, given a
/// newer precompressed sibling, reached through a retargeted symlink, a
/// renamed directory, a hard link changed from outside the root, deleted.
#[tokio::test]
async fn files_in_memory_follow_every_change_at_once() {
    let config = static_public();
    let srv = TestServer::builder()
        .config(config)
        .before(|dir, _| {
            let public = dir.join("public");
            std::fs::create_dir_all(public.join("docs")).unwrap();
            std::fs::create_dir_all(dir.join("outside")).unwrap();
            std::fs::write(public.join("page.html"), "v1\n").unwrap();
            std::fs::write(public.join("docs/a.txt"), "docs a\n").unwrap();
            std::fs::write(public.join("one.txt"), "one\n").unwrap();
            std::fs::write(public.join("two.txt"), "two\n").unwrap();
            std::os::unix::fs::symlink("one.txt", public.join("link.txt")).unwrap();
            std::fs::write(dir.join("outside/shared.txt"), "shared 1\n").unwrap();
            std::fs::hard_link(dir.join("outside/shared.txt"), public.join("hard.txt")).unwrap();
        })
        .start()
        .await;
    let base = format!("http://{}", srv.addr("web"));
    let dir = srv.dir.path().to_path_buf();
    let public = dir.join("public");
    // Four requests on each of three connections, so that both serving
    // threads have the file in memory; all must agree with `want`.
    let check = |path: &str, extra: &[&str], want: &str, step: &str| -> String {
        let mut heads = String::new();
        for _ in 0..3 {
            let url = format!("{base}{path}");
            let out = Command::new("curl")
                .args(["-sS", "-D", "/dev/stderr"])
                .args(extra)
                .args([&url, &url, &url, &url])
                .output()
                .expect("curl");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                want.repeat(4),
                "{step}: {path}"
            );
            heads = String::from_utf8_lossy(&out.stderr).to_lowercase();
        }
        heads
    };
    let etag = |heads: &str| {
        heads
            .lines()
            .find_map(|l| l.strip_prefix("etag: "))
            .map(|t| t.trim().to_string())
    };
    let first = check("/page.html", &[], "v1\n", "first read");
    // Written in place (same inode, same length).
    std::fs::write(public.join("page.html"), "v2\n").unwrap();
    let second = check("/page.html", &[], "v2\n", "written in place");
    assert!(etag(&first).is_some());
    // Replaced by a rename, as deploy tools do.
    std::fs::write(public.join(".page.tmp"), "v3, renamed over\n").unwrap();
    std::fs::rename(public.join(".page.tmp"), public.join("page.html")).unwrap();
    check("/page.html", &[], "v3, renamed over\n", "renamed over");
    // Touched only: a new modification time is a new ETag.
    let before = check("/page.html", &[], "v3, renamed over\n", "before touch");
    set_mtime(
        &public.join("page.html"),
        std::time::SystemTime::now() + std::time::Duration::from_secs(60),
    );
    let after = check("/page.html", &[], "v3, renamed over\n", "touched");
    assert_ne!(etag(&before), etag(&after), "{before}\n{after}");
    assert_ne!(etag(&first), etag(&second));
    // A precompressed sibling newer than the file appears.
    let gz = ["-H", "Accept-Encoding: gzip"];
    check("/page.html", &gz, "v3, renamed over\n", "no sibling yet");
    std::fs::write(public.join("page.html.gz"), b"not really gzip").unwrap();
    set_mtime(
        &public.join("page.html.gz"),
        std::time::SystemTime::now() + std::time::Duration::from_secs(120),
    );
    let heads = check("/page.html", &gz, "not really gzip", "sibling made");
    assert!(heads.contains("content-encoding: gzip"), "{heads}");
    // A symlink retargeted.
    check("/link.txt", &[], "one\n", "link to one");
    std::fs::remove_file(public.join("link.txt")).unwrap();
    std::os::unix::fs::symlink("two.txt", public.join("link.txt")).unwrap();
    check("/link.txt", &[], "two\n", "link to two");
    // A directory renamed away and another put in its place.
    check("/docs/a.txt", &[], "docs a\n", "docs");
    std::fs::rename(public.join("docs"), public.join("old-docs")).unwrap();
    std::fs::create_dir(public.join("docs")).unwrap();
    std::fs::write(public.join("docs/a.txt"), "new docs a\n").unwrap();
    check("/docs/a.txt", &[], "new docs a\n", "docs replaced");
    // A hard link whose other name, outside the root, is written.
    check("/hard.txt", &[], "shared 1\n", "hard link");
    std::fs::write(dir.join("outside/shared.txt"), "shared 2\n").unwrap();
    check(
        "/hard.txt",
        &[],
        "shared 2\n",
        "written through the other link",
    );
    // Deleted.
    std::fs::remove_file(public.join("two.txt")).unwrap();
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{base}/link.txt"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
}

/// REDbot (mnot's HTTP linter, from PyPI) finds nothing to warn about on
/// a compressed static file and on a response proxied from nginx and
/// compressed by gracesrv: `Vary`, ETags of each variant, 304s with the
/// headers their 200 has, ranges, freshness from `cache`.
#[tokio::test]
async fn redbot_finds_nothing_to_warn_about() {
    let page = "<!DOCTYPE html><html><body><p>".to_string()
        + &"lint me, REDbot, as a cache would see me. ".repeat(400)
        + "</p></body></html>\n";
    let up = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(up.path().join("www/app")).unwrap();
    std::fs::write(up.path().join("www/app/page.html"), &page).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", util::free_port()).parse().unwrap();
    let _nginx = util::nginx::Nginx::start(
        up.path(),
        &format!(
            "server {{ listen {addr}; root {}/www; types {{ text/html html; }} }}",
            up.path().display()
        ),
        &[addr],
    )
    .await;
    let config = Config::new().listener(
        Listener::plain("web")
            .set("compress", true)
            .set("cache", json!({ "max_age": "10m" }))
            .route("/", "static", json!({ "root": "public" }))
            .route(
                "/app",
                "proxy",
                json!({ "upstream": format!("http://{addr}") }),
            ),
    );
    let srv = TestServer::builder()
        .config(config)
        .before(move |dir, _| {
            std::fs::create_dir_all(dir.join("public")).unwrap();
            std::fs::write(dir.join("public/page.html"), &page).unwrap();
        })
        .start()
        .await;
    let redbot = |path: &str| {
        let out = Command::new(util::venv::python())
            .args(["-m", "redbot.cli", "-o", "har"])
            .arg(format!("http://{}{path}", srv.addr("web")))
            .output()
            .expect("redbot");
        let har: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&out.stderr)));
        har["log"]["entries"][0]["_red_messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    for path in ["/page.html", "/app/page.html"] {
        let notes = redbot(path);
        let ids: Vec<&str> = notes.iter().filter_map(|n| n["note_id"].as_str()).collect();
        // What REDbot checked, so that nothing passes by not being looked at.
        for id in ["CONNEG_GZIP_GOOD", "INM_304", "RANGE_CORRECT"] {
            assert!(ids.contains(&id), "{path}: no {id} in {ids:?}");
        }
        let bad: Vec<String> = notes
            .iter()
            .filter(|n| matches!(n["level"].as_str(), Some("WARN" | "BAD")))
            .map(|n| format!("{}: {}", n["note_id"], n["summary"]))
            .collect();
        assert!(bad.is_empty(), "{path}: {bad:#?}");
    }
}

#[tokio::test]
async fn chromium_loads_a_compressed_page() {
    let text = "A page that only works decompressed. ".repeat(300);
    let page = format!(
        "<!doctype html><html><body><div id=\"r\">not run</div><p>{text}</p><script src=\"/app.js\"></script></body></html>\n"
    );
    let script = format!(
        "// {}\ndocument.getElementById('r').textContent = 'ran ' + document.querySelector('p').textContent.length;\n",
        "padding so that the script is worth compressing. ".repeat(60)
    );
    let config = Config::new()
        .set(
            "access_log",
            json!({ "path": "access.log", "format": "json" }),
        )
        .listener(
            Listener::tls("web", "localhost.crt", "localhost.key").route(
                "/",
                "static",
                json!({ "root": "public" }),
            ),
        );
    let (page_len, script_len) = (page.len(), script.len());
    let srv = TestServer::builder()
        .config(config)
        .before(move |dir, _| {
            std::fs::create_dir_all(dir.join("public")).unwrap();
            std::fs::write(dir.join("public/page.html"), &page).unwrap();
            std::fs::write(dir.join("public/app.js"), &script).unwrap();
        })
        .start()
        .await;
    let profile = srv.dir.path().join("chromium-profile");
    let out = tokio::time::timeout(
        util::WAIT,
        tokio::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--ignore-certificate-errors",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("--dump-dom")
            .arg(format!(
                "https://127.0.0.1:{}/page.html",
                srv.addr("web").port()
            ))
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished in time")
    .expect("chromium (Debian's) runs");
    let dom = String::from_utf8_lossy(&out.stdout);
    // The script ran (so it was decoded) and read the decoded page.
    assert!(dom.contains(&format!("ran {}", text.len())), "{dom}");
    // Both went compressed: fewer bytes on the wire than in the files.
    let log_path = srv.dir.path().join("access.log");
    let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // The access log is written in batches: wait for both lines.
    util::until("both requests are in the access log", || {
        let log = read();
        log.contains("/page.html") && log.contains("/app.js")
    })
    .await;
    let log = read();
    for (path, len) in [("/page.html", page_len), ("/app.js", script_len)] {
        let line: serde_json::Value = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["target"] == path)
            .unwrap_or_else(|| panic!("{path} not in {log}"));
        let bytes = line["bytes"].as_u64().unwrap();
        assert!(
            bytes > 0 && (bytes as usize) < len / 4,
            "{path}: {bytes} of {len} bytes: {line}"
        );
    }
}

#[tokio::test]
async fn route_options_hold_over_http3() {
    let config = Config::new().listener(
        Listener::tls("web", "localhost.crt", "localhost.key")
            .set("http3", true)
            .route("/", "static", json!({ "root": "public" }))
            .route("/staff", "respond", json!({ "body": "staff only\n" }))
            .route("/limited", "respond", json!({ "body": "limited\n" })),
    );
    let mut v = serde_yaml_like(&config);
    for r in v["listeners"][0]["routes"].as_array_mut().unwrap() {
        match r["path"].as_str().unwrap() {
            "/staff" => {
                r["basic_auth"] = json!({ "realm": "staff", "users_file": "users.htpasswd" })
            }
            "/limited" => r["rate_limit"] = json!({ "requests": 1, "per": "1h" }),
            _ => {}
        }
    }
    let srv = TestServer::builder()
        .config_text(serde_json::to_string_pretty(&v).unwrap())
        .before(|dir, _| {
            site(dir);
            std::fs::write(
                dir.join("public/big.html"),
                "over HTTP/3, compressed. ".repeat(400),
            )
            .unwrap();
        })
        .start()
        .await;
    let addr = srv.addr("web");
    let status = |v: &serde_json::Value| v["responses"][0]["status"].as_u64();
    // basic_auth: 401 with the challenge, then 200 with the password.
    let r = util::h3::get_with(addr, "/staff", &[]).await;
    assert_eq!(status(&r), Some(401), "{r}");
    let login = "authorization: Basic YWxpY2U6czNjcmV0LVBhNTU="; // alice:s3cret-Pa55
    let r = util::h3::get_with(addr, "/staff", &["--header", login]).await;
    assert_eq!(status(&r), Some(200), "{r}");
    // rate_limit: the second request in the hour is refused.
    let r = util::h3::get_with(addr, "/limited", &["--count", "2"]).await;
    let statuses: Vec<_> = r["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["status"].as_u64())
        .collect();
    assert_eq!(statuses, [Some(200), Some(429)], "{r}");
    // compress: a static page in zstd.
    let r = util::h3::get_with(addr, "/big.html", &["--header", "accept-encoding: zstd"]).await;
    assert_eq!(status(&r), Some(200), "{r}");
    let headers = r["responses"][0]["headers"].to_string().to_lowercase();
    assert!(
        headers.contains("content-encoding") && headers.contains("zstd"),
        "{r}"
    );
}
