//! Proxy routes with several upstreams: balancing policies, passive and
//! active health, waiting for an upstream (`try_duration`), header rules,
//! and the config's errors. Upstreams are the tests' own servers
//! (`util::upstream`), killed and started again as processes die.

mod util;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use util::client::{self, Target};
use util::config::{Config, Listener};
use util::upstream::{who, Up};
use util::TestServer;

async fn ups(names: &[&str]) -> Vec<Up> {
    let mut out = Vec::new();
    for n in names {
        out.push(Up::start(n).await);
    }
    out
}

fn upstreams(ups: &[Up], weights: &[u32]) -> Value {
    ups.iter()
        .zip(weights.iter().chain(std::iter::repeat(&1)))
        .map(|(u, w)| json!({ "url": u.url(), "weight": w }))
        .collect()
}

/// `GET path` `n` times on one keep-alive connection, with `header`; how
/// many each upstream answered.
async fn tally(
    addr: std::net::SocketAddr,
    path: &str,
    n: usize,
    header: Option<(&str, &str)>,
) -> HashMap<String, usize> {
    let mut c = client::connect(&Target::plain(addr)).await.unwrap();
    let mut counts = HashMap::new();
    for _ in 0..n {
        let mut req = http::Request::get(path).header("host", "localhost");
        if let Some((k, v)) = header {
            req = req.header(k, v);
        }
        let r = c
            .request(req.body(http_body_util::Empty::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        *counts.entry(who(&r.body).to_string()).or_default() += 1;
    }
    counts
}

async fn status(srv: &TestServer) -> Value {
    let r = client::get(&Target::plain(srv.addr("web")), "/status")
        .await
        .unwrap();
    serde_json::from_str(&r.body).unwrap()
}

#[tokio::test]
async fn requests_are_shared_by_weight_and_policy() {
    let ups = ups(&["a", "b", "c"]).await;
    let all = |policy: &str, extra: Value| {
        let mut v = json!({ "upstreams": upstreams(&ups, &[]), "policy": policy });
        if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
        v
    };
    let config = Config::new().listener(
        Listener::plain("web")
            .route(
                "/rr",
                "proxy",
                json!({ "upstreams": upstreams(&ups, &[2, 1, 1]) }),
            )
            .route("/least", "proxy", all("least_conn", json!({})))
            .route("/two", "proxy", all("random_two", json!({})))
            .route(
                "/user",
                "proxy",
                all("hash", json!({ "hash_key": "header:x-user" })),
            )
            .route(
                "/session",
                "proxy",
                all("hash", json!({ "hash_key": "cookie:session" })),
            )
            .route("/client", "proxy", all("hash", json!({})))
            .route("/status", "status", json!({}))
            .route("/metrics", "metrics", json!({})),
    );
    let mut srv = TestServer::builder().config(config).start().await;
    let web = srv.addr("web");

    // Round robin by weight: 2:1:1, exactly, over 400 requests in a row.
    let counts = tally(web, "/rr/x", 400, None).await;
    assert_eq!(counts["a"], 200, "{counts:?}");
    assert_eq!(counts["b"], 100, "{counts:?}");
    assert_eq!(counts["c"], 100, "{counts:?}");
    // random_two uses all three.
    let counts = tally(web, "/two/x", 300, None).await;
    assert!(
        counts.len() == 3 && counts.values().all(|n| *n > 30),
        "{counts:?}"
    );

    // Hashing: one user, one upstream, over 1,000 requests; users spread.
    let mut homes = HashMap::new();
    for u in 0..20 {
        let user = format!("user-{u}");
        let counts = tally(web, "/user/x", 50, Some(("x-user", &user))).await;
        assert_eq!(counts.len(), 1, "{user} went to {counts:?}");
        homes.insert(user, counts.into_keys().next().unwrap());
    }
    let spread: std::collections::HashSet<&String> = homes.values().collect();
    assert_eq!(spread.len(), 3, "20 users all on {spread:?}");
    let counts = tally(
        web,
        "/session/x",
        100,
        Some(("cookie", "a=1; session=s42; b=2")),
    )
    .await;
    assert_eq!(counts.len(), 1, "{counts:?}");
    let session_home = counts.into_keys().next().unwrap();
    let counts = tally(web, "/client/x", 100, None).await;
    assert_eq!(counts.len(), 1, "{counts:?}");

    // ... and across a restart of gracesrv.
    srv.restart().await;
    for (user, home) in &homes {
        let counts = tally(web, "/user/x", 5, Some(("x-user", user))).await;
        assert_eq!(counts.keys().collect::<Vec<_>>(), [home], "{user} moved");
    }
    let counts = tally(web, "/session/x", 5, Some(("cookie", "session=s42"))).await;
    assert_eq!(counts.keys().collect::<Vec<_>>(), [&session_home]);

    // least_conn: two slow requests hold two upstreams; the rest go to
    // the third.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(
                async move { client::get(&Target::plain(web), "/least/slow?ms=3000").await },
            )
        })
        .collect();
    util::until("two slow requests are in flight", || {
        ups.iter()
            .map(|u| u.active.load(Ordering::Relaxed))
            .sum::<u64>()
            == 2
    })
    .await;
    let free = ups
        .iter()
        .find(|u| u.active.load(Ordering::Relaxed) == 0)
        .unwrap();
    let counts = tally(web, "/least/x", 20, None).await;
    assert_eq!(counts.get(&free.name), Some(&20), "{counts:?}");
    for s in slow {
        assert_eq!(s.await.unwrap().unwrap().status, 200);
    }

    // status and the metrics show every upstream.
    let st = status(&srv).await;
    let list = st["upstreams"].as_array().unwrap();
    let a = list
        .iter()
        .find(|u| u["route"] == "web /least" && u["upstream"] == ups[0].url())
        .unwrap_or_else(|| panic!("{st}"));
    assert_eq!(a["healthy"], true);
    assert_eq!(a["in_flight"], 0);
    let metrics = client::get(&Target::plain(web), "/metrics")
        .await
        .unwrap()
        .body;
    let line = format!(
        "gracesrv_upstream_healthy{{listener=\"web\",route=\"/rr\",upstream=\"{}\"}} 1",
        ups[0].url()
    );
    assert!(metrics.contains(&line), "{metrics}");
    // Counted across the restart: 200 before it, none since.
    let line = format!(
        "gracesrv_upstream_requests_total{{listener=\"web\",route=\"/rr\",upstream=\"{}\"}} 200",
        ups[0].url()
    );
    assert!(metrics.contains(&line), "{metrics}");
}

#[tokio::test]
async fn a_killed_upstream_costs_no_request_and_comes_back() {
    let mut ups = ups(&["a", "b", "c"]).await;
    let config = Config::new().listener(
        Listener::plain("web")
            .route(
                "/api",
                "proxy",
                json!({
                    "upstreams": upstreams(&ups, &[]),
                    "health": { "path": "/healthz", "interval": "200ms", "timeout": "1s" },
                    "passive": { "max_fails": 1, "fail_timeout": "1h" },
                }),
            )
            .route("/status", "status", json!({})),
    );
    let srv = TestServer::builder().config(config).start().await;
    let web = srv.addr("web");
    // wrk, keep-alive, while b dies and comes back.
    let wrk = tokio::process::Command::new("wrk")
        .args(["-t2", "-c16", "-d6s", "--latency"])
        .arg(format!("http://{web}/api/x"))
        .output();
    let wrk = tokio::spawn(wrk);
    util::until("b serves", || ups[1].served.load(Ordering::Relaxed) > 100).await;
    ups[1].kill();
    let others = || ups[0].served.load(Ordering::Relaxed) + ups[2].served.load(Ordering::Relaxed);
    let before = others();
    util::until("a and c take b's share", || others() > before + 1000).await;
    // (Requests b was answering as it died may still have been counted.)
    let at_kill = ups[1].served.load(Ordering::Relaxed);
    let before = others();
    util::until("a and c take b's share", || others() > before + 1000).await;
    assert_eq!(ups[1].served.load(Ordering::Relaxed), at_kill);
    let st = status(&srv).await;
    let b = st["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["upstream"] == ups[1].url())
        .unwrap()
        .clone();
    assert_eq!(b["healthy"], false, "{st}");
    // Back: the health check (not fail_timeout, an hour) brings it back.
    ups[1].resume().await;
    util::until("b serves again", || {
        ups[1].served.load(Ordering::Relaxed) > at_kill + 100
    })
    .await;
    let out = wrk.await.unwrap().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    let requests: u64 = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(requests > 5000, "{out}");
    assert!(
        !out.contains("Non-2xx") && !out.contains("Socket errors"),
        "requests failed while an upstream died:\n{out}"
    );
    assert!(srv
        .logs()
        .contains("upstream is back: its health check passed"));
}

#[tokio::test]
async fn with_every_upstream_down_a_request_waits_for_one() {
    let mut ups = ups(&["a", "b"]).await;
    let config = Config::new().listener(Listener::plain("web").route(
        "/api",
        "proxy",
        json!({ "upstreams": upstreams(&ups, &[]), "try_duration": "5s", "passive": { "fail_timeout": "1h" } }),
    ).route("/quick", "proxy", json!({ "upstreams": upstreams(&ups, &[]) })));
    let srv = TestServer::builder().config(config).start().await;
    let web = srv.addr("web");
    assert_eq!(
        client::get(&Target::plain(web), "/api/x")
            .await
            .unwrap()
            .status,
        200
    );
    ups[0].kill();
    ups[1].kill();
    // Without try_duration: 502 at once.
    let r = client::get(&Target::plain(web), "/quick/x").await.unwrap();
    assert_eq!(r.status, 502);
    let started = Instant::now();
    let waiting = tokio::spawn(async move { client::get(&Target::plain(web), "/api/x").await });
    // The request tries both, then waits; b comes back within try_duration.
    util::until("the request tried every upstream", || {
        srv.logs().contains("upstream is out")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // b is down a while
    ups[1].resume().await;
    let r = waiting.await.unwrap().unwrap();
    assert_eq!((r.status.as_u16(), who(&r.body)), (200, "b"), "{}", r.body);
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Both down longer than try_duration: 502 after it.
    ups[1].kill();
    let started = Instant::now();
    let r = client::get(&Target::plain(web), "/api/x").await.unwrap();
    assert_eq!(r.status, 502);
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn header_rules_apply_both_ways() {
    let up = Up::start("a").await;
    let config = Config::new().listener(
        Listener::plain("web")
            .route(
                "/api",
                "proxy",
                json!({
                    "upstream": up.url(),
                    "request_headers": {
                        "set": { "x-env": "prod", "x-client": "{remote} via {host}" },
                        "add": { "x-tag": "added" },
                        "remove": ["x-debug"],
                    },
                    "response_headers": { "set": { "x-served-by": "gracesrv {pid}" }, "remove": ["server"] },
                    "host": "upstream",
                }),
            )
            .route("/fixed", "proxy", json!({ "upstream": up.url(), "host": "api.internal" })),
    );
    let srv = TestServer::builder().config(config).start().await;
    let web = srv.addr("web");
    // (tokio's Command: the upstream runs on this test's runtime.)
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-D",
            "-",
            "-H",
            "x-debug: 1",
            "-H",
            "x-tag: client",
            "-H",
            "x-env: dev",
        ])
        .arg(format!("http://{web}/api/x"))
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        out.contains(&format!("x-served-by: gracesrv {}", srv.pid())),
        "{out}"
    );
    assert!(!out.contains("server:"), "{out}");
    let seen = up.last_headers.lock().unwrap().clone();
    assert!(
        seen.contains("x-env: prod\n") && !seen.contains("x-env: dev"),
        "{seen}"
    );
    assert!(!seen.contains("x-debug"), "{seen}");
    assert!(
        seen.contains("x-tag: client\n") && seen.contains("x-tag: added\n"),
        "{seen}"
    );
    assert!(
        seen.contains(&format!("x-client: 127.0.0.1 via {web}\n")),
        "{seen}"
    );
    assert!(seen.contains(&format!("host: {}\n", up.addr)), "{seen}");
    let out = tokio::process::Command::new("curl")
        .args(["-sS"])
        .arg(format!("http://{web}/fixed/x"))
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let seen = up.last_headers.lock().unwrap().clone();
    assert!(seen.contains("host: api.internal\n"), "{seen}");
}

#[tokio::test]
async fn proxy_config_errors_name_their_place() {
    let check = |route: Value| {
        let config = Config::new().listener(Listener::plain("web").route("/api", "proxy", route));
        let (dir, _certs, path) = TestServer::prepare(&config.yaml());
        std::fs::write(dir.path().join("not-a-cert.pem"), "hello\n").unwrap();
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
    let up = "http://127.0.0.1:9";
    for (route, expect) in [
        (
            json!({ "upstreams": [{ "url": up }], "policy": "fastest" }),
            "proxy.policy: \"fastest\" is not a policy",
        ),
        (
            json!({ "upstreams": [{ "url": up, "weight": 0 }] }),
            "proxy.upstreams[0].weight: 0 is not a weight",
        ),
        (
            json!({ "upstream": "http://127.0.0.1:9/api" }),
            "has a path",
        ),
        (
            json!({ "upstream": "https://127.0.0.1:9", "tls": { "ca": "not-a-cert.pem" } }),
            "proxy.tls.ca: not-a-cert.pem",
        ),
        (
            json!({ "upstream": up, "protocol": "h2" }),
            "h2 is spoken over TLS",
        ),
        (
            json!({ "upstreams": [{ "url": up }], "hash_key": "remote" }),
            "only with policy: hash",
        ),
        (
            json!({ "upstream": up, "request_headers": { "set": { "x-a": "{nope}" } } }),
            "unknown placeholder {nope}",
        ),
    ] {
        let (ok, err) = check(route.clone());
        assert!(!ok, "{route} passed");
        assert!(err.contains(expect), "{route}: {err}");
        // file:line:column
        assert!(
            err.contains("server.yaml:")
                && err
                    .split("server.yaml:")
                    .nth(1)
                    .is_some_and(|r| r.chars().next().is_some_and(|c| c.is_ascii_digit())),
            "{err}"
        );
    }
    // `check` reports each upstream.
    let (ok, out) = check(
        json!({ "upstreams": [{ "url": up, "weight": 3 }, { "url": "https://127.0.0.1:8443" }], "policy": "least_conn", "protocol": "h2", "tls_insecure_skip_verify": true }),
    );
    assert!(!ok, "h2 with an http:// upstream is refused: {out}");
    let (ok, out) = check(
        json!({ "upstreams": [{ "url": up, "weight": 3 }, { "url": "http://127.0.0.1:10" }], "policy": "least_conn", "health": { "path": "/healthz" } }),
    );
    assert!(ok, "{out}");
    assert!(out.contains("proxy /api: least_conn to http://127.0.0.1:9 (weight 3), http://127.0.0.1:10, checked at /healthz every 5s"), "{out}");
}

#[tokio::test]
async fn https_upstreams_are_verified_and_client_certificates_shown() {
    // nginx with a CA of its own, over TLS (HTTP/1.1 and HTTP/2), and a
    // second server that requires a client certificate from another CA.
    let nginx_dir = tempfile::tempdir().unwrap();
    let upstream_ca = util::Certs::new();
    upstream_ca.leaf(nginx_dir.path(), "up", &["localhost", "127.0.0.1"], 7);
    let client_ca = util::Certs::new();
    std::fs::write(nginx_dir.path().join("client-ca.pem"), &client_ca.ca_pem).unwrap();
    let (p1, p2) = (util::free_port(), util::free_port());
    let d = nginx_dir.path().display();
    let servers = format!(
        "server {{ listen 127.0.0.1:{p1} ssl http2; ssl_certificate {d}/up.crt; ssl_certificate_key {d}/up.key;\n\
           location / {{ return 200 \"nginx $server_protocol $ssl_server_name $http_host\\n\"; }} }}\n\
         server {{ listen 127.0.0.1:{p2} ssl; ssl_certificate {d}/up.crt; ssl_certificate_key {d}/up.key;\n\
           ssl_client_certificate {d}/client-ca.pem; ssl_verify_client on;\n\
           location / {{ return 200 \"nginx-mtls $ssl_client_verify $ssl_client_s_dn\\n\"; }} }}\n"
    );
    let a1: std::net::SocketAddr = format!("127.0.0.1:{p1}").parse().unwrap();
    let a2: std::net::SocketAddr = format!("127.0.0.1:{p2}").parse().unwrap();
    let _nginx = util::nginx::Nginx::start(nginx_dir.path(), &servers, &[a1, a2]).await;

    let ca_pem = upstream_ca.ca_pem.clone();
    let client_dir = tempfile::tempdir().unwrap();
    client_ca.leaf(client_dir.path(), "client", &["gracesrv-client"], 9);
    let client_dir_path = client_dir.path().to_path_buf();
    let tls = |extra: Value| {
        let mut v = json!({ "tls": { "ca": "upstream-ca.crt", "server_name": "localhost" } });
        if let (Some(tls), Value::Object(extra)) = (v["tls"].as_object_mut(), extra) {
            tls.extend(extra);
        }
        v["tls"].clone()
    };
    let one = format!("https://{a1}");
    let config = Config::new().listener(
        Listener::plain("web")
            .route("/tls", "proxy", json!({ "upstream": one, "tls": tls(json!({})) }))
            .route("/h2", "proxy", json!({ "upstream": one, "tls": tls(json!({})), "protocol": "h2" }))
            .route("/by-ip", "proxy", json!({ "upstream": one, "tls": { "ca": "upstream-ca.crt" } }))
            .route("/untrusted", "proxy", json!({ "upstream": one }))
            .route("/insecure", "proxy", json!({ "upstream": one, "tls_insecure_skip_verify": true }))
            .route("/mtls-none", "proxy", json!({ "upstream": format!("https://{a2}"), "tls": tls(json!({})) }))
            .route(
                "/mtls",
                "proxy",
                json!({ "upstream": format!("https://{a2}"), "tls": tls(json!({ "cert": "client.crt", "key": "client.key" })) }),
            ),
    );
    let srv = TestServer::builder()
        .config(config)
        .before(move |dir, _| {
            std::fs::write(dir.join("upstream-ca.crt"), &ca_pem).unwrap();
            for f in ["client.crt", "client.key"] {
                std::fs::copy(client_dir_path.join(f), dir.join(f)).unwrap();
            }
        })
        .start()
        .await;
    let web = Target::plain(srv.addr("web"));
    let get = |path: &'static str| {
        let web = web.clone();
        async move { client::get(&web, path).await.unwrap() }
    };
    let r = get("/tls/x").await;
    assert_eq!(r.status, 200, "{}", r.body);
    // SNI from server_name; the client's Host kept (host: keep).
    assert_eq!(
        r.body,
        format!("nginx HTTP/1.1 localhost {}\n", srv.addr("web"))
    );
    let r = get("/h2/x").await;
    assert_eq!(
        r.body,
        format!("nginx HTTP/2.0 localhost {}\n", srv.addr("web")),
        "{}",
        r.body
    );
    // No server_name: the URL's address, which the certificate names.
    assert_eq!(get("/by-ip/x").await.status, 200);
    // The system's roots do not know nginx's CA.
    assert_eq!(get("/untrusted/x").await.status, 502);
    // The log names the cause, at the end of the chain (issue 31). The
    // line is read from the server's stderr: waited for, not looked up.
    let line = srv.wait_log("UnknownIssuer").await;
    assert!(line.contains("invalid peer certificate"), "{line}");
    assert_eq!(get("/insecure/x").await.status, 200);
    assert!(srv.logs().contains("tls_insecure_skip_verify"));
    // mTLS: refused without the client certificate, taken with it.
    let r = get("/mtls-none/x").await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = get("/mtls/x").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.starts_with("nginx-mtls SUCCESS"), "{}", r.body);
}

#[tokio::test]
async fn a_restart_keeps_what_is_known_of_upstream_health() {
    let mut ups = ups(&["a", "b"]).await;
    let config = Config::new().listener(
        Listener::plain("web")
            .route(
                "/api",
                "proxy",
                json!({ "upstreams": upstreams(&ups, &[]), "passive": { "fail_timeout": "1h" } }),
            )
            .route("/status", "status", json!({})),
    );
    let mut srv = TestServer::builder().config(config).start().await;
    let web = srv.addr("web");
    ups[1].kill();
    // Round robin reaches b within two requests: it fails, is out, and the
    // request goes to a.
    for _ in 0..2 {
        let r = client::get(&Target::plain(web), "/api/x").await.unwrap();
        assert_eq!((r.status.as_u16(), who(&r.body)), (200, "a"));
    }
    let b_of = |st: &Value| {
        st["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["upstream"] == ups[1].url())
            .cloned()
            .unwrap()
    };
    let b = b_of(&status(&srv).await);
    assert_eq!(
        (b["healthy"].clone(), b["failures_total"].clone()),
        (json!(false), json!(1)),
        "{b}"
    );
    srv.restart().await;
    // The new generation knows b is out: it sends it nothing, so it sees
    // no failure of its own.
    for _ in 0..10 {
        let r = client::get(&Target::plain(web), "/api/x").await.unwrap();
        assert_eq!((r.status.as_u16(), who(&r.body)), (200, "a"));
    }
    let st = status(&srv).await;
    assert_eq!(st["pid"], srv.pid());
    let b = b_of(&st);
    assert_eq!(
        (
            b["healthy"].clone(),
            b["failures_total"].clone(),
            b["requests_total"].clone()
        ),
        (json!(false), json!(0), json!(0)),
        "{st}"
    );
    assert!(b["out_for_s"].as_f64().is_some_and(|s| s > 3000.0), "{b}");
}
