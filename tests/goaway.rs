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
    let mut child = httpx(&["idle", &url]).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> serde_json::Value {
        let line = tokio::time::timeout(util::WAIT, lines.next_line())
            .await
            .expect("an answer in time")
            .unwrap()
            .expect("a line");
        serde_json::from_str(&line).unwrap()
    };
    let old = srv.pid();
    let first = next().await;
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
    stdin.write_all(b"again\n").await.unwrap();
    let second = next().await;
    assert_eq!(second["status"], 200, "{second}");
    assert_eq!(second["body"], format!("{new}\n"), "{second}");
}

/// Issue 26.2: httpx, 4 tasks on one HTTP/2 connection, GETs then POSTs,
/// while the server restarts every 0.5 s. The drain's one GOAWAY, sent when
/// no stream is open and carrying the last one's ID, leaves httpx nothing
/// to trip on: no PING and no answer after it (python-h2 fails on either,
/// in its CLOSED state; with hyper's two-step drain 51 requests of 8,000
/// failed that way over 16 restarts). What is left is httpcore's own race
/// (a request its pool gave the connection just before the GOAWAY fails
/// as `ConnectionTerminated`, whatever the server), which nginx reloaded
/// under the same load shows as often: 6 GETs and 11 POSTs over 16 reloads.
#[tokio::test]
async fn httpx_over_http2_trips_on_nothing_the_server_sends_at_restarts() {
    let mut srv = TestServer::builder().config(config()).start().await;
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
        while started.elapsed() < Duration::from_secs(8) {
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
        assert!(restarts >= 10, "{restarts} restarts");
        assert!(v["ok"].as_u64().unwrap() > 500, "{v}");
        assert!(
            v["pids"].as_object().unwrap().len() >= restarts / 2,
            "the client moves on to new generations: {v}"
        );
        for e in v["errors"].as_array().unwrap() {
            assert!(
                e.as_str().unwrap().contains("ConnectionTerminated"),
                "post={post}: a failure the server caused: {v}"
            );
        }
        // The race's count is noisy (nginx: 0.4 to 0.7 a reload here);
        // the old two-step drain lost 3 a restart, all of them its own.
        assert!(
            v["failed"].as_u64().unwrap() <= 2 * restarts as u64,
            "post={post}, {restarts} restarts: {v}"
        );
    }
}
