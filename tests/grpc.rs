//! gRPC through gracesrv: Python's grpcio (from PyPI, in the tests' venv)
//! as server and client, over h2c and TLS upstreams, across restarts.

mod util;

use std::path::Path;
use std::process::Stdio;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use util::config::{Config, Listener};
use util::TestServer;

const SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc/server.py");
const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc/client.py");

/// A grpcio server on a free port (TLS with `tls`: cert and key); killed
/// when dropped.
async fn grpc_server(tls: Option<(&Path, &Path)>) -> (tokio::process::Child, u16) {
    let port = util::free_port();
    let mut cmd = tokio::process::Command::new(util::venv::python());
    cmd.arg(SERVER).arg(port.to_string());
    if let Some((cert, key)) = tls {
        cmd.arg(cert).arg(key);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(util::WAIT, lines.next_line()).await;
    assert!(
        matches!(&first, Ok(Ok(Some(l))) if l == "ready"),
        "the gRPC server did not start: {first:?}"
    );
    (child, port)
}

/// Runs the client (`mode` for `seconds`) against `addr`; its JSON report.
async fn client(addr: std::net::SocketAddr, mode: &str, seconds: u32, ca: Option<&Path>) -> Value {
    let mut cmd = tokio::process::Command::new(util::venv::python());
    cmd.arg(CLIENT)
        .arg(addr.to_string())
        .arg(mode)
        .arg(seconds.to_string());
    if let Some(ca) = ca {
        cmd.arg(ca);
    }
    let out = cmd.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "client {mode} said: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test]
async fn grpc_calls_pass_through_restarts_over_h2c_and_tls() {
    // The upstream's certificate, from a CA gracesrv is told to trust.
    let up_dir = tempfile::tempdir().unwrap();
    let up_ca = util::Certs::new();
    up_ca.leaf(up_dir.path(), "grpc", &["localhost"], 3);
    let (_plain, plain_port) = grpc_server(None).await;
    let (_tls, tls_port) = grpc_server(Some((
        &up_dir.path().join("grpc.crt"),
        &up_dir.path().join("grpc.key"),
    )))
    .await;
    let ca_pem = up_ca.ca_pem.clone();
    let config = Config::new()
        // Every generation a bidirectional stream started on drains until
        // it ends, through 20 restarts.
        .set("max_draining", 30)
        .set("shutdown_timeout", "60s")
        .listener(Listener::plain("web").route(
            "/",
            "proxy",
            json!({ "upstream": format!("http://127.0.0.1:{plain_port}"), "protocol": "h2c" }),
        ))
        .listener(
            Listener::tls("web-tls", "localhost.crt", "localhost.key").route(
                "/",
                "proxy",
                json!({
                    "upstream": format!("https://127.0.0.1:{tls_port}"),
                    "protocol": "h2",
                    "tls": { "ca": "grpc-ca.crt", "server_name": "localhost" },
                }),
            ),
        );
    let mut srv = TestServer::builder()
        .config(config)
        .before(move |dir, _| std::fs::write(dir.join("grpc-ca.crt"), &ca_pem).unwrap())
        .start()
        .await;
    let ca = srv.dir.path().join("client-ca.pem");
    std::fs::write(&ca, &srv.certs.ca_pem).unwrap();
    let (web, web_tls) = (srv.addr("web"), srv.addr("web-tls"));

    // Unary calls carry their trailers back; server streaming over TLS.
    let r = client(web, "unary", 1, None).await;
    assert!(r["ok"].as_u64() > Some(10) && r["failed"] == 0, "{r}");
    assert_eq!(r["trailers"], json!(["x-echo-trailer=done"]), "{r}");
    let r = client(web_tls, "stream", 1, Some(&ca)).await;
    assert!(r["ok"].as_u64() > Some(0) && r["failed"] == 0, "{r}");

    // 20 restarts during unary load (h2c and TLS) and one long
    // bidirectional stream.
    let seconds = 14;
    let loads = [
        tokio::spawn(client(web, "unary", seconds, None)),
        tokio::spawn({
            let ca = ca.clone();
            async move { client(web_tls, "unary", seconds, Some(&ca)).await }
        }),
        tokio::spawn(client(web, "chat", seconds, None)),
    ];
    // Every client is connected and calling before the first restart.
    util::until("the clients call", || {
        srv.logs().matches("request started").count() >= 3
    })
    .await;
    for _ in 0..20 {
        srv.restart().await;
        // Spread over the calls (pacing, not waiting for anything).
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    for (what, load) in ["unary h2c", "unary tls", "chat"].iter().zip(loads) {
        let r = load.await.unwrap();
        assert_eq!(r["failed"], 0, "{what}: {r}");
        assert!(r["ok"].as_u64() > Some(20), "{what}: {r}");
    }
}
