//! `metrics: {}`: Prometheus text exposition, checked by promtool and
//! scraped by a real Prometheus through restarts (`.ci/run` installs the
//! Debian package `prometheus`, which has both).

mod util;

use std::time::{Duration, Instant};

use serde_json::json;
use util::client::{self, Target};
use util::config::Config;
use util::load::{Kind, Load};
use util::TestServer;

fn metrics_config() -> Config {
    Config::basic().edit("web", |l| l.route("/metrics", "metrics", json!({})))
}

async fn scrape(srv: &TestServer) -> String {
    let r = client::get(&Target::plain(srv.addr("web")), "/metrics")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    r.body
}

/// The value of the series `series` (name and labels, exactly).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn the_exposition_passes_promtool_and_counts_what_was_served() {
    let srv = TestServer::builder().config(metrics_config()).start().await;
    let web = Target::plain(srv.addr("web"));
    for path in ["/", "/", "/status", "/missing"] {
        client::get(&web, path).await.unwrap();
    }
    client::get(&Target::tls(srv.addr("web-tls"), srv.tls()), "/")
        .await
        .unwrap();
    let text = scrape(&srv).await;
    util::promtool(&text);
    let s = |series: &str| value(&text, series).unwrap_or_else(|| panic!("{series}:\n{text}"));
    // `/missing` is taken by the catch-all `/` route too.
    assert_eq!(
        s(r#"gracesrv_requests_total{listener="web",route="/",class="2xx"}"#),
        3.0
    );
    assert_eq!(
        s(r#"gracesrv_requests_total{listener="web",route="/status",class="2xx"}"#),
        1.0
    );
    assert_eq!(
        s(r#"gracesrv_requests_total{listener="web-tls",route="/",class="2xx"}"#),
        1.0
    );
    assert_eq!(
        s(r#"gracesrv_tls_handshakes_total{listener="web-tls"}"#),
        1.0
    );
    assert_eq!(s("gracesrv_restarts_total"), 0.0);
    assert!(s(r#"gracesrv_request_duration_seconds_count{listener="web"}"#) >= 4.0);
    assert!(s("gracesrv_process_open_fds") > 0.0);
    assert!(s("gracesrv_process_resident_memory_bytes") > 0.0);
    assert!(
        s(r#"gracesrv_certificate_expiry_seconds{listener="web-tls",serial="01"}"#) > 86400.0,
        "{text}"
    );
    assert!(text.contains(r#"gracesrv_build_info{version=""#), "{text}");
}

/// A real Prometheus scrapes every 200 ms through 10 restarts under load:
/// neither the restarts counter nor any request counter ever goes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_no_counter_reset_across_ten_restarts() {
    let mut srv = TestServer::builder()
        .config(metrics_config())
        .env("GRACESRV_LOG", "gracesrv=info")
        .start()
        .await;
    let prom = Prometheus::start(srv.addr("web")).await;
    let web = Target::plain(srv.addr("web"));
    let mut load = Load::new();
    load.spawn(Kind::KeepAlive, web.clone(), "/", 2);
    load.spawn(Kind::NewConnection, web.clone(), "/", 1);
    prom.wait_for("gracesrv_build_info", |v| v.is_some()).await;
    for generation in 2..=11 {
        srv.restart().await;
        // Prometheus has scraped the new generation.
        let q = format!(r#"gracesrv_build_info{{generation="{generation}"}}"#);
        prom.wait_for(&q, |v| v.is_some()).await;
    }
    prom.wait_for("gracesrv_restarts_total", |v| v == Some(10.0))
        .await;
    let stats = load.stop().await;
    assert_eq!(stats.failed(), 0);
    for q in [
        "resets(gracesrv_restarts_total[10m])",
        "sum(resets(gracesrv_requests_total[10m]))",
        "sum(resets(gracesrv_request_duration_seconds_count[10m]))",
    ] {
        assert_eq!(prom.query(q).await, Some(0.0), "{q}");
    }
    let served = prom
        .query(r#"sum(gracesrv_requests_total{route="/",class="2xx"})"#)
        .await
        .unwrap();
    assert!(served > 100.0, "{served}");
}

/// A Prometheus server scraping `target`'s `/metrics` every 200 ms.
struct Prometheus {
    child: std::process::Child,
    api: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: std::net::SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let api: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{ scrape_interval: 200ms, scrape_timeout: 150ms }}\n\
                 scrape_configs:\n  - job_name: gracesrv\n    static_configs: [{{ targets: ['{target}'] }}]\n"
            ),
        )
        .unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={api}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .expect("prometheus runs (.ci/run installs it)");
        let p = Prometheus {
            child,
            api,
            _dir: dir,
        };
        let deadline = Instant::now() + util::WAIT;
        loop {
            let ready = client::get(&Target::plain(api), "/-/ready").await;
            if ready.is_ok_and(|r| r.status == 200) {
                return p;
            }
            assert!(Instant::now() < deadline, "prometheus not ready");
            // Prometheus has no readiness signal but its HTTP endpoint.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of an instant query (its first series), if any.
    async fn query(&self, q: &str) -> Option<f64> {
        let path = format!("/api/v1/query?query={}", encode(q));
        let r = client::get(&Target::plain(self.api), &path).await.ok()?;
        let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse().ok())
    }

    /// Waits until `q`'s value satisfies `ok`.
    async fn wait_for(&self, q: &str, ok: impl Fn(Option<f64>) -> bool) {
        let deadline = Instant::now() + util::WAIT;
        loop {
            let v = self.query(q).await;
            if ok(v) {
                return;
            }
            assert!(Instant::now() < deadline, "{q}: {v:?}");
            // Scrapes come every 200 ms; ask again within one.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
