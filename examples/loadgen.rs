//! A load generator for `bench/run`: HTTP/1.1 keep-alive, a new connection per
//! request, or HTTP/2, plain or TLS; counts every failed request, records
//! requests per 100 ms (for the plot) and latency percentiles.
//!
//! Unlike h2load it behaves like a real HTTP/2 client at a GOAWAY: it
//! reconnects, and a stream the server did not process (RFC 9113 6.8) is
//! retried and reported as `retried`, not as failed. Anything sent and not
//! answered with a 2xx is `failed`.
//!
//!   loadgen --url http://127.0.0.1:8080/ --mode keepalive --conns 50 --duration 10
//!   loadgen --url http://127.0.0.1:8080/ --conns 50 --rate 200   (paced: 200 req/s each)
//!   loadgen --url https://127.0.0.1:8443/ --mode h2 --streams 10 --timeline t.csv
//!   loadgen --url http://127.0.0.1:8080/ --restart-latency 50 --restart-cmd "kill -HUP 123" --old-pids 123

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    KeepAlive,
    Close,
    H2,
}

struct Args {
    url: http::Uri,
    mode: Mode,
    conns: usize,
    streams: usize,
    duration: Duration,
    timeline: Option<String>,
    restart_latency: usize,
    restart_cmd: String,
    old_pids: Vec<u32>,
    /// Requests a second per connection (HTTP/1.1), paced; unpaced if unset.
    rate: Option<f64>,
}

fn args() -> Args {
    let mut a = Args {
        url: "http://127.0.0.1:8080/".parse().unwrap(),
        mode: Mode::KeepAlive,
        conns: 50,
        streams: 10,
        duration: Duration::from_secs(10),
        timeline: None,
        restart_latency: 0,
        restart_cmd: String::new(),
        old_pids: Vec::new(),
        rate: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--url" => a.url = v.parse().expect("--url"),
            "--mode" => {
                a.mode = match v.as_str() {
                    "keepalive" => Mode::KeepAlive,
                    "close" => Mode::Close,
                    "h2" => Mode::H2,
                    _ => panic!("--mode keepalive|close|h2"),
                }
            }
            "--conns" => a.conns = v.parse().expect("--conns"),
            "--rate" => a.rate = Some(v.parse().expect("--rate")),
            "--streams" => a.streams = v.parse().expect("--streams"),
            "--duration" => a.duration = Duration::from_secs_f64(v.parse().expect("--duration")),
            "--timeline" => a.timeline = Some(v),
            "--restart-latency" => a.restart_latency = v.parse().expect("--restart-latency"),
            "--restart-cmd" => a.restart_cmd = v,
            "--old-pids" => {
                a.old_pids = v.split(',').filter_map(|p| p.trim().parse().ok()).collect()
            }
            _ => panic!("unknown argument {k}"),
        }
    }
    a
}

#[path = "common/mod.rs"]
mod common;
use common::{percentile, AnyCert};

fn tls_connector(h2: bool) -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

struct Target {
    addr: String,
    host: String,
    path: String,
    tls: Option<tokio_rustls::TlsConnector>,
    h2: bool,
    /// TLS handshakes, and those that resumed a session (a ticket the
    /// server accepted): the client keeps rustls' default session store.
    handshakes: AtomicU64,
    resumed: AtomicU64,
}

async fn connect(t: &Target) -> Result<Sender, String> {
    let tcp = TcpStream::connect(&t.addr)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    macro_rules! handshake {
        ($io:expr) => {
            if t.h2 {
                let (s, c) = http2::handshake(TokioExecutor::new(), $io)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(c);
                Sender::H2(s)
            } else {
                let (s, c) = http1::handshake($io).await.map_err(|e| e.to_string())?;
                tokio::spawn(c);
                Sender::H1(s)
            }
        };
    }
    Ok(match &t.tls {
        None => handshake!(TokioIo::new(tcp)),
        Some(c) => {
            let name = ServerName::try_from("localhost").unwrap();
            let tls = c.connect(name, tcp).await.map_err(|e| e.to_string())?;
            let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            t.handshakes.fetch_add(1, Ordering::Relaxed);
            if resumed {
                t.resumed.fetch_add(1, Ordering::Relaxed);
            }
            handshake!(TokioIo::new(tls))
        }
    })
}

enum Outcome {
    Ok(Bytes),
    /// Not processed by the server: never sent, or refused by a GOAWAY.
    NotProcessed,
    Failed(String),
}

async fn request(s: &mut Sender, t: &Target, close: bool) -> Outcome {
    let mut req = http::Request::get(t.path.as_str());
    let res = match s {
        Sender::H1(s) => {
            req = req.header("host", t.host.as_str());
            if close {
                req = req.header("connection", "close");
            }
            s.try_send_request(req.body(Empty::new()).unwrap()).await
        }
        Sender::H2(s) => {
            let uri = format!("https://{}{}", t.host, t.path);
            let req = http::Request::get(uri)
                .version(http::Version::HTTP_2)
                .body(Empty::new())
                .unwrap();
            s.try_send_request(req).await
        }
    };
    let res = match res {
        Ok(r) => r,
        Err(mut e) => {
            let unsent = e.take_message().is_some();
            let detail = format!("{:?}", e.error());
            if unsent || (detail.contains("GoAway(") && detail.contains("NO_ERROR")) {
                return Outcome::NotProcessed;
            }
            return Outcome::Failed(detail);
        }
    };
    let status = res.status();
    match res.into_body().collect().await {
        Ok(b) if status.is_success() => Outcome::Ok(b.to_bytes()),
        Ok(_) => Outcome::Failed(format!("status {status}")),
        Err(e) => Outcome::Failed(format!("body: {e}")),
    }
}

struct Stats {
    start: Instant,
    ok: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    stop: AtomicBool,
    /// Successes and failures per 100 ms.
    timeline: Mutex<Vec<(u64, u64)>>,
    latencies: Mutex<Vec<u32>>,
    errors: Mutex<Vec<String>>,
}

impl Stats {
    fn bucket(&self) -> usize {
        (self.start.elapsed().as_millis() / 100) as usize
    }
    fn record(&self, ok: bool, latency: Duration, lat: &mut Vec<u32>) {
        let b = self.bucket();
        {
            let mut t = self.timeline.lock().unwrap();
            if t.len() <= b {
                t.resize(b + 1, (0, 0));
            }
            if ok {
                t[b].0 += 1;
            } else {
                t[b].1 += 1;
            }
        }
        if ok {
            self.ok.fetch_add(1, Ordering::Relaxed);
            lat.push(latency.as_micros().min(u32::MAX as u128) as u32);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn client(t: Arc<Target>, mode: Mode, streams: usize, rate: Option<f64>, stats: Arc<Stats>) {
    let mut lat = Vec::new();
    let mut conn: Option<Sender> = None;
    let mut next = tokio::time::Instant::now();
    while !stats.stop.load(Ordering::Relaxed) {
        let usable = match &mut conn {
            Some(Sender::H1(s)) => s.ready().await.is_ok(),
            Some(Sender::H2(s)) => s.ready().await.is_ok(),
            None => false,
        };
        if !usable || mode == Mode::Close {
            conn = match connect(&t).await {
                Ok(c) => Some(c),
                Err(e) => {
                    stats.record(false, Duration::ZERO, &mut lat);
                    stats.errors.lock().unwrap().push(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
        }
        let Some(sender) = conn.as_mut() else {
            continue;
        };
        let batch: Vec<_> = match sender {
            Sender::H2(s) => (0..streams).map(|_| Sender::H2(s.clone())).collect(),
            Sender::H1(_) => Vec::new(),
        };
        if batch.is_empty() {
            let started = Instant::now();
            match request(sender, &t, mode == Mode::Close).await {
                Outcome::Ok(_) => stats.record(true, started.elapsed(), &mut lat),
                Outcome::NotProcessed => {
                    stats.retried.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                }
                Outcome::Failed(e) => {
                    stats.record(false, started.elapsed(), &mut lat);
                    stats.errors.lock().unwrap().push(e);
                    conn = None;
                }
            }
            if let Some(r) = rate {
                next += Duration::from_secs_f64(1.0 / r);
                tokio::time::sleep_until(next).await;
            }
        } else {
            let handles: Vec<_> = batch
                .into_iter()
                .map(|mut s| {
                    let (t, stats) = (t.clone(), stats.clone());
                    tokio::spawn(async move {
                        let mut lat = Vec::new();
                        let started = Instant::now();
                        let mut out = request(&mut s, &t, false).await;
                        // Unprocessed: retried on a new connection, as clients do.
                        while matches!(out, Outcome::NotProcessed)
                            && !stats.stop.load(Ordering::Relaxed)
                        {
                            stats.retried.fetch_add(1, Ordering::Relaxed);
                            match connect(&t).await {
                                Ok(mut c) => out = request(&mut c, &t, false).await,
                                Err(e) => out = Outcome::Failed(format!("reconnect: {e}")),
                            }
                        }
                        match out {
                            Outcome::Ok(_) => stats.record(true, started.elapsed(), &mut lat),
                            Outcome::NotProcessed => {}
                            Outcome::Failed(e) => {
                                stats.record(false, started.elapsed(), &mut lat);
                                stats.errors.lock().unwrap().push(e);
                            }
                        }
                        lat
                    })
                })
                .collect();
            for h in handles {
                if let Ok(l) = h.await {
                    lat.extend(l);
                }
            }
        }
    }
    stats.latencies.lock().unwrap().extend(lat);
}

/// HUP to new generation serving: runs `cmd`, then asks with new connections
/// until a response comes from a pid not in `old`.
async fn restart_latency(t: &Target, n: usize, cmd: &str, old: &[u32]) {
    let mut old: HashSet<u32> = old.iter().copied().collect();
    let mut samples = Vec::new();
    for _ in 0..n {
        let started = Instant::now();
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .status()
            .expect("restart command");
        assert!(status.success(), "restart command failed");
        let new_pid = loop {
            if let Ok(mut s) = connect(t).await {
                if let Outcome::Ok(body) = request(&mut s, t, true).await {
                    let pid = String::from_utf8_lossy(&body)
                        .split_whitespace()
                        .find_map(|w| w.parse::<u32>().ok())
                        .unwrap_or(0);
                    if !old.contains(&pid) {
                        break pid;
                    }
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no new generation after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        samples.push(started.elapsed().as_micros() as u32);
        old.insert(new_pid);
        // Let the old generation finish draining before the next restart.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    samples.sort_unstable();
    println!(
        "restarts={n} p50_ms={:.1} p99_ms={:.1} max_ms={:.1}",
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        percentile(&samples, 1.0)
    );
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tls = a.url.scheme_str() == Some("https");
        let authority = a
            .url
            .authority()
            .expect("--url needs host:port")
            .to_string();
        let t = Arc::new(Target {
            addr: authority.clone(),
            host: authority,
            path: a
                .url
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or("/".into()),
            tls: tls.then(|| tls_connector(a.mode == Mode::H2)),
            h2: a.mode == Mode::H2,
            handshakes: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
        });
        if a.restart_latency > 0 {
            restart_latency(&t, a.restart_latency, &a.restart_cmd, &a.old_pids).await;
            return;
        }
        let stats = Arc::new(Stats {
            start: Instant::now(),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            timeline: Mutex::new(Vec::new()),
            latencies: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
        });
        let clients: Vec<_> = (0..a.conns)
            .map(|_| tokio::spawn(client(t.clone(), a.mode, a.streams, a.rate, stats.clone())))
            .collect();
        tokio::time::sleep(a.duration).await;
        stats.stop.store(true, Ordering::Relaxed);
        let elapsed = stats.start.elapsed();
        for c in clients {
            let _ = c.await;
        }
        let mut lat = std::mem::take(&mut *stats.latencies.lock().unwrap());
        lat.sort_unstable();
        let ok = stats.ok.load(Ordering::Relaxed);
        let handshakes = t.handshakes.load(Ordering::Relaxed);
        println!(
            "ok={ok} failed={} retried={} rps={:.0} p50_ms={:.2} p99_ms={:.2} handshakes={handshakes} resumed_pct={:.1}",
            stats.failed.load(Ordering::Relaxed),
            stats.retried.load(Ordering::Relaxed),
            ok as f64 / elapsed.as_secs_f64(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            100.0 * t.resumed.load(Ordering::Relaxed) as f64 / handshakes.max(1) as f64
        );
        for e in stats.errors.lock().unwrap().iter().take(5) {
            eprintln!("error: {e}");
        }
        if let Some(path) = a.timeline {
            let t = stats.timeline.lock().unwrap();
            let csv: String = t
                .iter()
                .enumerate()
                .map(|(i, (ok, failed))| format!("{},{ok},{failed}\n", i * 100))
                .collect();
            std::fs::write(path, format!("t_ms,ok,failed\n{csv}")).expect("write timeline");
        }
    });
}
