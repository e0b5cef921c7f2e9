//! An HTTP/3 load generator for `bench/run` (quinn and h3 as the client):
//! `--conns` connections, each with `--streams` requests in flight, for
//! `--duration` seconds; prints `ok= failed= retried= rps= p50_ms= p99_ms=`.
//!
//! Like a real client at a GOAWAY it opens a new connection, and a request
//! the server did not process (the connection was closing when it was sent,
//! or it was refused with H3_REQUEST_REJECTED) is retried and counted as
//! `retried`. Anything else without a complete 2xx answer is `failed`.
//!
//!   h3load --url https://127.0.0.1:8443/ --conns 20 --streams 10 --duration 6

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};

#[path = "common/mod.rs"]
mod common;
use common::{percentile, AnyCert};

struct Target {
    addr: SocketAddr,
    uri: http::Uri,
    config: quinn::ClientConfig,
}

type Sender = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

async fn connect(t: &Target) -> Result<(quinn::Endpoint, quinn::Connection, Sender), String> {
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(t.config.clone());
    let conn = endpoint
        .connect(t.addr, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut driver, sender) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    Ok((endpoint, conn, sender))
}

enum Outcome {
    Ok,
    /// Not processed by the server: retry on a new connection.
    NotProcessed,
    Failed(String),
}

/// Refused unprocessed, or never sent: the connection was going away
/// (GOAWAY), or was closed gracefully (H3_NO_ERROR) before any answer came.
/// gracesrv closes a draining connection only once every request it took
/// is answered and the client has closed or been idle for
/// `draining_idle`, so an answerless request on it was not taken (RFC 9114
/// section 5.2: its stream ID is past the GOAWAY's).
fn not_processed(e: &h3::error::StreamError) -> bool {
    match e {
        h3::error::StreamError::ConnectionError { 0: c, .. } => c.is_h3_no_error(),
        h3::error::StreamError::RemoteClosing => true,
        h3::error::StreamError::RemoteTerminate { code, .. } => {
            *code == h3::error::Code::H3_REQUEST_REJECTED
        }
        _ => false,
    }
}

async fn request(s: &mut Sender, t: &Target) -> Outcome {
    let req = http::Request::get(t.uri.clone()).body(()).unwrap();
    let mut stream = match s.send_request(req).await {
        Ok(s) => s,
        Err(e) if not_processed(&e) => return Outcome::NotProcessed,
        Err(e) => return Outcome::Failed(format!("send: {e}")),
    };
    if let Err(e) = stream.finish().await {
        return if not_processed(&e) {
            Outcome::NotProcessed
        } else {
            Outcome::Failed(format!("finish: {e}"))
        };
    }
    let res = match stream.recv_response().await {
        Ok(r) => r,
        Err(e) if not_processed(&e) => return Outcome::NotProcessed,
        Err(e) => return Outcome::Failed(format!("response: {e}")),
    };
    loop {
        match stream.recv_data().await {
            Ok(Some(mut d)) => d.advance(d.remaining()),
            Ok(None) => break,
            Err(e) => return Outcome::Failed(format!("body: {e}")),
        }
    }
    if res.status().is_success() {
        Outcome::Ok
    } else {
        Outcome::Failed(format!("status {}", res.status()))
    }
}

#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    stop: AtomicBool,
    latencies: Mutex<Vec<u32>>,
    errors: Mutex<Vec<String>>,
}

/// One connection with `streams` requests in flight, replaced when the
/// server closes it or sends GOAWAY.
async fn client(t: Arc<Target>, streams: usize, stats: Arc<Stats>) {
    while !stats.stop.load(Ordering::Relaxed) {
        let (_endpoint, conn, sender) = match connect(&t).await {
            Ok(c) => c,
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                stats.errors.lock().unwrap().push(format!("connect: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let closing = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..streams)
            .map(|_| {
                let (t, stats, closing) = (t.clone(), stats.clone(), closing.clone());
                let mut s = sender.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    while !stats.stop.load(Ordering::Relaxed) && !closing.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        match request(&mut s, &t).await {
                            Outcome::Ok => {
                                stats.ok.fetch_add(1, Ordering::Relaxed);
                                lat.push(
                                        started.elapsed().as_micros().min(u32::MAX as u128) as u32
                                    );
                            }
                            Outcome::NotProcessed => {
                                stats.retried.fetch_add(1, Ordering::Relaxed);
                                closing.store(true, Ordering::Relaxed);
                            }
                            Outcome::Failed(e) => {
                                stats.failed.fetch_add(1, Ordering::Relaxed);
                                stats.errors.lock().unwrap().push(e);
                                closing.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                    stats.latencies.lock().unwrap().extend(lat);
                })
            })
            .collect();
        drop(sender);
        for task in tasks {
            let _ = task.await;
        }
        // Done with it (GOAWAY, or the end): close it, as browsers do.
        conn.close(quinn::VarInt::from_u32(0x100), b"");
    }
}

fn main() {
    let mut url: http::Uri = "https://127.0.0.1:8443/".parse().unwrap();
    let (mut conns, mut streams, mut duration) = (20usize, 10usize, 6.0f64);
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--url" => url = v.parse().expect("--url"),
            "--conns" => conns = v.parse().expect("--conns"),
            "--streams" => streams = v.parse().expect("--streams"),
            "--duration" => duration = v.parse().expect("--duration"),
            _ => panic!("unknown argument {k}"),
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let addr: SocketAddr = url
        .authority()
        .expect("--url needs host:port")
        .as_str()
        .parse()
        .expect("an IP:port");
    let t = Arc::new(Target {
        addr,
        uri: url,
        config: quinn::ClientConfig::new(Arc::new(crypto)),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let stats = Arc::new(Stats::default());
        let start = Instant::now();
        let clients: Vec<_> = (0..conns)
            .map(|_| tokio::spawn(client(t.clone(), streams, stats.clone())))
            .collect();
        tokio::time::sleep(Duration::from_secs_f64(duration)).await;
        stats.stop.store(true, Ordering::Relaxed);
        let elapsed = start.elapsed();
        for c in clients {
            let _ = c.await;
        }
        let mut lat = std::mem::take(&mut *stats.latencies.lock().unwrap());
        lat.sort_unstable();
        let ok = stats.ok.load(Ordering::Relaxed);
        println!(
            "ok={ok} failed={} retried={} rps={:.0} p50_ms={:.2} p99_ms={:.2}",
            stats.failed.load(Ordering::Relaxed),
            stats.retried.load(Ordering::Relaxed),
            ok as f64 / elapsed.as_secs_f64(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        );
        for e in stats.errors.lock().unwrap().iter().take(5) {
            eprintln!("error: {e}");
        }
    });
}
