//! Upstreams for the proxy tests: small HTTP/1.1 and h2c servers that say
//! who they are, which a test can kill (every connection dropped at once,
//! as when a process dies) and start again on the same address.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

pub struct Up {
    pub name: String,
    pub addr: SocketAddr,
    /// Requests answered (health checks not counted).
    pub served: Arc<AtomicU64>,
    /// Requests being answered now.
    pub active: Arc<AtomicU64>,
    /// `/healthz` answers 200 while set, else 503.
    pub healthy: Arc<AtomicBool>,
    /// Health checks received.
    pub checks: Arc<AtomicU64>,
    /// The last request's header fields, one `name: value` line each, sorted.
    pub last_headers: Arc<Mutex<String>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Up {
    /// A new upstream on a port the kernel picks.
    pub async fn start(name: &str) -> Up {
        let mut up = Up {
            name: name.into(),
            addr: "127.0.0.1:0".parse().unwrap(),
            served: Default::default(),
            active: Default::default(),
            healthy: Arc::new(AtomicBool::new(true)),
            checks: Default::default(),
            last_headers: Default::default(),
            task: None,
        };
        up.resume().await;
        up
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops the listener and every connection at once.
    pub fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Listens again, on the same address.
    pub async fn resume(&mut self) {
        let listener = bind(self.addr).await;
        self.addr = listener.local_addr().unwrap();
        let (name, served, active, healthy, checks, last) = (
            self.name.clone(),
            self.served.clone(),
            self.active.clone(),
            self.healthy.clone(),
            self.checks.clone(),
            self.last_headers.clone(),
        );
        self.task = Some(tokio::spawn(async move {
            // Connections are tasks of this set: aborting the accept loop
            // drops the set, and with it every connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (name, served, active, healthy, checks, last) = (
                    name.clone(),
                    served.clone(),
                    active.clone(),
                    healthy.clone(),
                    checks.clone(),
                    last.clone(),
                );
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (name, served, active, healthy, checks, last) = (
                            name.clone(),
                            served.clone(),
                            active.clone(),
                            healthy.clone(),
                            checks.clone(),
                            last.clone(),
                        );
                        async move {
                            if req.uri().path() == "/healthz" {
                                checks.fetch_add(1, Ordering::Relaxed);
                                let status = if healthy.load(Ordering::Relaxed) {
                                    200
                                } else {
                                    503
                                };
                                let mut res = Response::new(Full::new(Bytes::from("ok\n")));
                                *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
                                return Ok::<_, Infallible>(res);
                            }
                            active.fetch_add(1, Ordering::Relaxed);
                            let mut lines: Vec<String> = req
                                .headers()
                                .iter()
                                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                                .collect();
                            lines.sort();
                            *last.lock().unwrap() = lines.join("\n") + "\n";
                            let ms: u64 = req
                                .uri()
                                .query()
                                .and_then(|q| q.strip_prefix("ms="))
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0);
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            if ms > 0 {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            served.fetch_add(1, Ordering::Relaxed);
                            active.fetch_sub(1, Ordering::Relaxed);
                            let len = body.map_or(0, |b| b.len());
                            let mut res = Response::new(Full::new(Bytes::from(format!(
                                "{name} {path} {len}\n"
                            ))));
                            res.headers_mut()
                                .insert("server", http::HeaderValue::from_static("test-upstream"));
                            Ok(res)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }));
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Binds `addr`, waiting while the port is still held by a connection of
/// the killed listener's (never long).
async fn bind(addr: SocketAddr) -> tokio::net::TcpListener {
    let deadline = std::time::Instant::now() + super::WAIT;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "cannot bind {addr}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The name of the upstream that answered (the body's first word).
pub fn who(body: &str) -> &str {
    body.split_whitespace().next().unwrap_or("")
}
