//! HTTP/3 from another project: `tests/h3/client.py` on aioquic, in the
//! tests' venv (`venv.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use serde_json::Value;
use tokio::io::AsyncReadExt;

const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/h3/client.py");

/// The Python of the tests' venv (aioquic in it).
pub fn python() -> PathBuf {
    super::venv::python()
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("https://{addr}{path}")
}

/// `count` requests on one connection: `{"responses": [...], "error"}`.
pub async fn get(addr: SocketAddr, path: &str, count: usize) -> Value {
    get_with(addr, path, &["--count", &count.to_string()]).await
}

pub async fn get_with(addr: SocketAddr, path: &str, args: &[&str]) -> Value {
    run("get", addr, path, args).await
}

/// The one answer's body of a request on a connection of its own, checking
/// it is a 200.
pub async fn body(addr: SocketAddr, path: &str) -> String {
    let v = get(addr, path, 1).await;
    let mut bodies = bodies(&v);
    assert_eq!(bodies.len(), 1, "{v}");
    bodies.remove(0)
}

/// Runs the client's `command` on `addr` and `path`; its JSON output.
async fn run(command: &str, addr: SocketAddr, path: &str, args: &[&str]) -> Value {
    let out = tokio::process::Command::new(python())
        .arg(CLIENT)
        .arg(command)
        .arg(url(addr, path))
        .args(args)
        .output()
        .await
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client output: {e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The answers' bodies of a `get`, checking each is a 200.
pub fn bodies(v: &Value) -> Vec<String> {
    assert!(v["error"].is_null(), "HTTP/3 client: {v}");
    v["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["status"], 200, "{r}");
            r["body"].as_str().unwrap().to_string()
        })
        .collect()
}

/// `connections` connections at once, one request each: `{"ok", "errors"}`.
pub async fn parallel(addr: SocketAddr, connections: usize) -> Value {
    run(
        "parallel",
        addr,
        "/",
        &["--connections", &connections.to_string()],
    )
    .await
}

/// Requests on `connections` connections (and on `fresh` workers that open
/// a connection per request) until [`Load::finish`].
pub struct Load {
    child: tokio::process::Child,
}

impl Load {
    pub fn start(addr: SocketAddr, path: &str, connections: usize, fresh: usize) -> Load {
        let child = tokio::process::Command::new(python())
            .arg(CLIENT)
            .arg("load")
            .arg(url(addr, path))
            .args(["--connections", &connections.to_string()])
            .args(["--fresh", &fresh.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Load { child }
    }

    /// Stops and returns the totals (`ok`, `failed`, `retried`, `errors`,
    /// `pids`, `connections`).
    pub async fn finish(mut self) -> Value {
        drop(self.child.stdin.take());
        let mut out = String::new();
        let mut stdout = self.child.stdout.take().unwrap();
        tokio::time::timeout(
            std::time::Duration::from_secs(60),
            stdout.read_to_string(&mut out),
        )
        .await
        .expect("the HTTP/3 load client did not finish")
        .unwrap();
        let _ = self.child.wait().await;
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("load output: {e}: {out}"))
    }
}

/// The answer to each malformed request of `client.py malformed`, on one
/// connection; `proxy` is a path whose route reads request bodies.
pub async fn malformed(addr: SocketAddr, proxy: &str) -> Value {
    run("malformed", addr, "/", &["--proxy", proxy]).await
}
