//! Stop accepting, then drain: one small piece every accept loop and every
//! connection of a process holds.
//!
//! Two phases, two signals. `stop_accepting` makes accept loops drop their
//! listeners (closing this process's copies of the shared sockets; never
//! `shutdown(2)`, which would empty the accept queue the next generation is
//! serving from). `draining` tells connections to finish: HTTP/1.1 responses
//! carry `Connection: close`, HTTP/2 connections get GOAWAY. The process then
//! waits for the connection count to reach zero, or for its deadline.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

#[derive(Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

struct Inner {
    draining: AtomicBool,
    signal: watch::Sender<bool>,
    active: AtomicU64,
    idle: Notify,
    /// Connections upgraded (WebSocket and others) and tunnelled.
    upgraded: AtomicU64,
    /// Accept loops still holding a socket.
    acceptors: AtomicU64,
    acceptors_done: Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            inner: Arc::new(Inner {
                draining: AtomicBool::new(false),
                signal: watch::channel(false).0,
                active: AtomicU64::new(0),
                idle: Notify::new(),
                upgraded: AtomicU64::new(0),
                acceptors: AtomicU64::new(0),
                acceptors_done: Notify::new(),
            }),
        }
    }
}

/// Held by each open connection; dropping it counts the connection closed.
pub struct ConnectionGuard {
    inner: Arc<Inner>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.inner.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

/// Held by each accept loop; dropping it means its copy of the socket is closed.
pub struct AcceptorGuard {
    inner: Arc<Inner>,
}

impl Drop for AcceptorGuard {
    fn drop(&mut self) {
        if self.inner.acceptors.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.acceptors_done.notify_waiters();
        }
    }
}

/// Held by each upgraded (tunnelled) connection.
pub struct UpgradedGuard {
    inner: Arc<Inner>,
}

impl Drop for UpgradedGuard {
    fn drop(&mut self) {
        self.inner.upgraded.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What was still open when a drain ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub connections: u64,
    pub upgraded: u64,
}

impl Drain {
    pub fn connection(&self) -> ConnectionGuard {
        self.inner.active.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard {
            inner: self.inner.clone(),
        }
    }

    pub fn acceptor(&self) -> AcceptorGuard {
        self.inner.acceptors.fetch_add(1, Ordering::AcqRel);
        AcceptorGuard {
            inner: self.inner.clone(),
        }
    }

    /// Resolves once every accept loop has ended and closed its socket.
    pub async fn stopped_accepting(&self) {
        loop {
            let notified = self.inner.acceptors_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.acceptors.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Counts an upgraded connection (it also holds a `connection()`).
    pub fn upgraded(&self) -> UpgradedGuard {
        self.inner.upgraded.fetch_add(1, Ordering::Relaxed);
        UpgradedGuard {
            inner: self.inner.clone(),
        }
    }

    pub fn upgraded_active(&self) -> u64 {
        self.inner.upgraded.load(Ordering::Relaxed)
    }

    pub fn active(&self) -> u64 {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Is this process draining? Read once per response, so it is an atomic
    /// load, not a channel.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Resolves when draining starts (at once if it has).
    pub async fn started(&self) {
        let mut rx = self.inner.signal.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Starts draining: new responses close their connection, idle ones end.
    pub fn start(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
        self.inner.signal.send_replace(true);
    }

    /// Waits until no connection is left, or `timeout` passes; returns what
    /// was still open at the deadline.
    pub async fn wait(&self, timeout: Duration) -> Option<Cut> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active() == 0 {
                return None;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Some(Cut {
                        connections: self.active(),
                        upgraded: self.inner.upgraded.load(Ordering::Relaxed),
                    });
                }
            }
        }
    }
}
