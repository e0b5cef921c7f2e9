//! Load for restart tests: clients of every kind, each counting every request
//! that was sent and did not get its full 200 response.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::client::{self, Conn, Target};

#[derive(Default)]
pub struct Stats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Requests the client never sent because the connection was going away
    /// (HTTP/2 GOAWAY); retried on a new connection, as real clients do.
    pub retried: AtomicU64,
    /// Pids that answered.
    pub pids: Mutex<HashSet<u32>>,
    /// The first few failures, for the assertion message.
    pub errors: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Stats {
    fn record(&self, kind: &str, res: Result<client::Resp, String>) {
        match res {
            Ok(r) if r.status == 200 => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                if let Some(pid) = r
                    .body
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                {
                    self.pids.lock().unwrap().insert(pid);
                }
            }
            Err(e) if e.starts_with(client::NOT_SENT) => {
                self.retried.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut e = self.errors.lock().unwrap();
                if e.len() < 20 {
                    e.push(format!("{kind}: {other:?}"));
                }
            }
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more requests have succeeded.
    pub async fn wait_for_more(&self, n: u64) {
        let target = self.ok() + n;
        let deadline = tokio::time::Instant::now() + super::WAIT;
        while self.ok() < target {
            assert!(
                tokio::time::Instant::now() < deadline,
                "load stalled: {} ok, {} failed",
                self.ok(),
                self.failed()
            );
            // A counter has no readiness signal; this polls a condition, it
            // does not stand in for one.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Running clients.
pub struct Load {
    pub stats: Arc<Stats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// HTTP/1.1, one connection reused; a new one only once the server closed it.
    KeepAlive,
    /// HTTP/1.1, a new connection for each request.
    NewConnection,
    /// HTTP/2, one connection with `streams` concurrent streams.
    H2 { streams: usize },
}

impl Load {
    pub fn new() -> Load {
        Load {
            stats: Arc::new(Stats::default()),
            tasks: Vec::new(),
        }
    }

    pub fn spawn(&mut self, kind: Kind, target: Target, path: &'static str, clients: usize) {
        for _ in 0..clients {
            let stats = self.stats.clone();
            let target = target.clone();
            self.tasks.push(tokio::spawn(async move {
                match kind {
                    Kind::KeepAlive => keep_alive(target, path, stats).await,
                    Kind::NewConnection => new_connection(target, path, stats).await,
                    Kind::H2 { streams } => h2(target.h2(), path, streams, stats).await,
                }
            }));
        }
    }

    /// Stops the clients, lets in-flight requests finish, returns the stats.
    /// (Every request has a deadline, so this cannot wait forever.)
    pub async fn stop(self) -> Arc<Stats> {
        self.stats.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.stats
    }
}

/// A connection that can take a request, reconnecting if the server closed
/// the old one. A failed connect counts as a failed request.
async fn usable(conn: &mut Option<Conn>, target: &Target, stats: &Stats, kind: &str) -> bool {
    if let Some(c) = conn {
        if c.usable().await {
            return true;
        }
    }
    *conn = None;
    match client::connect(target).await {
        Ok(c) => {
            *conn = Some(c);
            true
        }
        Err(e) => {
            stats.record(kind, Err(e));
            false
        }
    }
}

async fn keep_alive(target: Target, path: &str, stats: Arc<Stats>) {
    let mut conn = None;
    while !stats.stopped() {
        if !usable(&mut conn, &target, &stats, "keep-alive").await {
            continue;
        }
        let res = conn.as_mut().unwrap().get(path).await;
        if res.is_err() {
            conn = None;
        }
        stats.record("keep-alive", res);
    }
}

async fn new_connection(target: Target, path: &str, stats: Arc<Stats>) {
    while !stats.stopped() {
        let res = client::get(&target, path).await;
        stats.record("new-connection", res);
    }
}

async fn h2(target: Target, path: &'static str, streams: usize, stats: Arc<Stats>) {
    let mut conn = None;
    while !stats.stopped() {
        if !usable(&mut conn, &target, &stats, "h2").await {
            continue;
        }
        // Run `streams` requests at once on this connection, then check it.
        let handles: Vec<_> = (0..streams)
            .map(|_| {
                let mut c = conn.as_ref().unwrap().h2_clone().unwrap();
                let stats = stats.clone();
                tokio::spawn(async move {
                    let res = c.get(path).await;
                    stats.record("h2", res);
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
    }
}
