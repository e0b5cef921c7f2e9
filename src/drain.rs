//! Stop accepting, then drain: one small piece every accept loop and every
//! connection of a process holds.
//!
//! Starting a drain makes accept loops pause and tells connections to
//! finish: HTTP/1.1 responses carry `Connection: close`, HTTP/2 connections
//! get GOAWAY. The process then waits for the connection count to reach
//! zero, or for its deadline. A paused accept loop keeps its copy of the
//! socket (never `shutdown(2)`: the accept queue is shared with the next
//! generation): if the next generation dies right after it said ready, the
//! drain is resumed and this process accepts again (`resume`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

#[derive(Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

struct Inner {
    draining: AtomicBool,
    started: Notify,
    active: AtomicU64,
    idle: Notify,
    /// Connections upgraded (WebSocket and others) and tunnelled.
    upgraded: AtomicU64,
    tunnels_done: Notify,
    /// Turns true when the tunnels must end (see `cut_tunnels`).
    cut: tokio::sync::watch::Sender<bool>,
    /// Accept loops accepting (not paused by a drain).
    acceptors: AtomicU64,
    acceptors_done: Notify,
    /// Wakes paused accept loops: to accept again, or to close.
    resumed: Notify,
    /// Paused accept loops close their sockets (a stop, not a restart).
    closing: AtomicBool,
    /// Accept loops holding their copy of a socket, paused or not.
    sockets: AtomicU64,
    sockets_closed: Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            inner: Arc::new(Inner {
                draining: AtomicBool::new(false),
                started: Notify::new(),
                active: AtomicU64::new(0),
                idle: Notify::new(),
                upgraded: AtomicU64::new(0),
                tunnels_done: Notify::new(),
                cut: tokio::sync::watch::Sender::new(false),
                acceptors: AtomicU64::new(0),
                acceptors_done: Notify::new(),
                resumed: Notify::new(),
                closing: AtomicBool::new(false),
                sockets: AtomicU64::new(0),
                sockets_closed: Notify::new(),
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

/// Held by each accept loop while it accepts; dropped when it pauses or ends.
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

/// Held by each accept loop while it holds its copy of a socket.
pub struct SocketGuard {
    inner: Arc<Inner>,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if self.inner.sockets.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.sockets_closed.notify_waiters();
        }
    }
}

/// Held by each upgraded (tunnelled) connection.
pub struct UpgradedGuard {
    inner: Arc<Inner>,
}

impl Drop for UpgradedGuard {
    fn drop(&mut self) {
        if self.inner.upgraded.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.tunnels_done.notify_waiters();
        }
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

    /// Resolves once every accept loop has paused (or ended).
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

    /// Turns true when the tunnels must end (the tunnel's side of
    /// [`Drain::cut_tunnels`]).
    pub fn tunnel_cut(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.cut.subscribe()
    }

    /// Ends every tunnel the way a server going away does (WebSocket close
    /// 1001 to both sides, see `tunnel`), and waits until they have, or
    /// `within` passes. Called when a drain runs out of time or is stopped.
    pub async fn cut_tunnels(&self, within: Duration) {
        self.inner.cut.send_replace(true);
        let _ = tokio::time::timeout(within, async {
            loop {
                let done = self.inner.tunnels_done.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                if self.inner.upgraded.load(Ordering::Acquire) == 0 {
                    return;
                }
                done.await;
            }
        })
        .await;
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
    pub fn started(&self) -> Started<'_> {
        Started {
            draining: &self.inner.draining,
            notified: Box::pin(self.inner.started.notified()),
            registered: None,
        }
    }

    /// Starts draining: new responses close their connection, idle ones end.
    pub fn start(&self) {
        self.inner.draining.store(true, Ordering::Release);
        self.inner.started.notify_waiters();
    }

    /// Ends a drain: accept loops accept again, new connections are served
    /// as before. (Connections that were told to finish still do.)
    pub fn resume(&self) {
        self.inner.draining.store(false, Ordering::Release);
        self.inner.resumed.notify_waiters();
    }

    /// Counts an accept loop's copy of a socket, until the guard drops.
    pub fn socket(&self) -> SocketGuard {
        self.inner.sockets.fetch_add(1, Ordering::AcqRel);
        SocketGuard {
            inner: self.inner.clone(),
        }
    }

    /// Paused accept loops close their copies of the sockets: the process
    /// stops, and no new connection may wait in a queue nobody serves.
    /// Resolves once every copy is closed.
    pub async fn close_listeners(&self) {
        self.inner.closing.store(true, Ordering::Release);
        self.inner.resumed.notify_waiters();
        loop {
            let closed = self.inner.sockets_closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.inner.sockets.load(Ordering::Acquire) == 0 {
                return;
            }
            closed.await;
        }
    }

    /// For a paused accept loop: `true` when it should accept again (the
    /// drain was resumed), `false` when it should close its socket.
    pub async fn resumed(&self) -> bool {
        loop {
            let resumed = self.inner.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if self.inner.closing.load(Ordering::Acquire) {
                return false;
            }
            if !self.is_draining() {
                return true;
            }
            resumed.await;
        }
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

/// The future of [`Drain::started`]. Every connection polls one at each of
/// its wake-ups (it sits in the connection's `select!`), so after the first
/// poll it costs an atomic load and a waker comparison; the shared `Notify`
/// (and its lock) is touched again only if the task's waker changes.
pub struct Started<'a> {
    draining: &'a AtomicBool,
    notified: Pin<Box<Notified<'a>>>,
    /// The waker the `Notify` will wake.
    registered: Option<Waker>,
}

impl Future for Started<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.draining.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        // A `Notified` made before `notify_waiters` completes even if it was
        // never polled, so a drain that starts right now is not missed.
        match this.notified.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(()),
            Poll::Pending => {
                this.registered = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn started_resolves_for_waiters_and_latecomers() {
        let drain = Drain::default();
        let waiting = {
            let drain = drain.clone();
            tokio::spawn(async move { drain.started().await })
        };
        // Made before the drain starts and never polled until after it.
        let early = drain.started();
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drain.start();
        waiting.await.unwrap();
        early.await;
        // Made after: resolves at once.
        drain.started().await;
        assert!(drain.is_draining());
    }
}
