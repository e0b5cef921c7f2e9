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
pub(crate) struct Drain {
    inner: Arc<Inner>,
}

struct Inner {
    draining: AtomicBool,
    started: Notify,
    /// Open connections (tunnels included).
    active: Arc<Count>,
    /// Connections upgraded (WebSocket and others) and tunnelled.
    upgraded: Arc<Count>,
    /// Turns true when the tunnels must end (see `cut_tunnels`).
    cut: tokio::sync::watch::Sender<bool>,
    /// Accept loops accepting (not paused by a drain).
    acceptors: Arc<Count>,
    /// Wakes paused accept loops: to accept again, or to close.
    resumed: Notify,
    /// Paused accept loops close their sockets (a stop, not a restart).
    closing: AtomicBool,
    /// Accept loops holding their copy of a socket, paused or not.
    sockets: Arc<Count>,
    /// Told to finish now (`Sig::Finish`): HTTP/2 connections stop waiting
    /// for a quiet moment.
    finishing: AtomicBool,
    finish: Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            inner: Arc::new(Inner {
                draining: AtomicBool::new(false),
                started: Notify::new(),
                active: Count::new(),
                upgraded: Count::new(),
                cut: tokio::sync::watch::Sender::new(false),
                acceptors: Count::new(),
                resumed: Notify::new(),
                closing: AtomicBool::new(false),
                sockets: Count::new(),
                finishing: AtomicBool::new(false),
                finish: Notify::new(),
            }),
        }
    }
}

/// How many of something are open (connections, accept loops, ...), and a
/// signal when none is left. Each holds a [`Counted`] while it is open.
struct Count {
    n: AtomicU64,
    zero: Notify,
}

impl Count {
    fn new() -> Arc<Count> {
        Arc::new(Count {
            n: AtomicU64::new(0),
            zero: Notify::new(),
        })
    }

    fn enter(self: &Arc<Self>) -> Counted {
        self.n.fetch_add(1, Ordering::AcqRel);
        Counted(self.clone())
    }

    fn get(&self) -> u64 {
        self.n.load(Ordering::Acquire)
    }

    /// Resolves once none is open (at once if none is).
    async fn zero(&self) {
        loop {
            let notified = self.zero.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One open thing of a [`Count`]: a connection, an accept loop, a tunnel,
/// a copy of a socket. Dropping it counts it closed.
pub(crate) struct Counted(Arc<Count>);

impl Drop for Counted {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

/// Held by each open connection.
pub(crate) type ConnectionGuard = Counted;

/// What was still open when a drain ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cut {
    pub(crate) connections: u64,
    pub(crate) upgraded: u64,
}

impl Drain {
    /// Counts an open connection, until the guard drops.
    pub(crate) fn connection(&self) -> ConnectionGuard {
        self.inner.active.enter()
    }

    /// Counts an accept loop while it accepts.
    pub(crate) fn acceptor(&self) -> Counted {
        self.inner.acceptors.enter()
    }

    /// Resolves once every accept loop has paused (or ended).
    pub(crate) async fn stopped_accepting(&self) {
        self.inner.acceptors.zero().await
    }

    /// Counts an upgraded connection (it also holds a `connection()`).
    pub(crate) fn upgraded(&self) -> Counted {
        self.inner.upgraded.enter()
    }

    /// Turns true when the tunnels must end (the tunnel's side of
    /// [`Drain::cut_tunnels`]).
    pub(crate) fn tunnel_cut(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.cut.subscribe()
    }

    /// Ends every tunnel the way a server going away does (WebSocket close
    /// 1001 to both sides, see `tunnel`), and waits until they have, or
    /// `within` passes. Called when a drain runs out of time or is stopped.
    pub(crate) async fn cut_tunnels(&self, within: Duration) {
        self.inner.cut.send_replace(true);
        let _ = tokio::time::timeout(within, self.inner.upgraded.zero()).await;
    }

    pub(crate) fn upgraded_active(&self) -> u64 {
        self.inner.upgraded.get()
    }

    pub(crate) fn active(&self) -> u64 {
        self.inner.active.get()
    }

    /// Is this process draining? Read once per response, so it is an atomic
    /// load, not a channel.
    pub(crate) fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Resolves when draining starts (at once if it has).
    pub(crate) fn started(&self) -> Started<'_> {
        Started {
            draining: &self.inner.draining,
            notified: Box::pin(self.inner.started.notified()),
            registered: None,
        }
    }

    /// Starts draining: new responses close their connection, idle ones end.
    pub(crate) fn start(&self) {
        self.inner.draining.store(true, Ordering::Release);
        self.inner.started.notify_waiters();
    }

    /// Tells the connections to finish now (see `Sig::Finish`).
    pub(crate) fn finish(&self) {
        self.inner.finishing.store(true, Ordering::Release);
        self.inner.finish.notify_waiters();
    }

    /// Resolves when the connections are told to finish now.
    pub(crate) fn finishing(&self) -> Started<'_> {
        Started {
            draining: &self.inner.finishing,
            notified: Box::pin(self.inner.finish.notified()),
            registered: None,
        }
    }

    /// Ends a drain: accept loops accept again, new connections are served
    /// as before. (Connections that were told to finish still do.)
    pub(crate) fn resume(&self) {
        self.inner.draining.store(false, Ordering::Release);
        self.inner.resumed.notify_waiters();
    }

    /// Counts an accept loop's copy of a socket, until the guard drops.
    pub(crate) fn socket(&self) -> Counted {
        self.inner.sockets.enter()
    }

    /// Paused accept loops close their copies of the sockets: the process
    /// stops, and no new connection may wait in a queue nobody serves.
    /// Resolves once every copy is closed.
    pub(crate) async fn close_listeners(&self) {
        self.inner.closing.store(true, Ordering::Release);
        self.inner.resumed.notify_waiters();
        self.inner.sockets.zero().await
    }

    /// For a paused accept loop: `true` when it should accept again (the
    /// drain was resumed), `false` when it should close its socket.
    pub(crate) async fn resumed(&self) -> bool {
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
    pub(crate) async fn wait(&self, timeout: Duration) -> Option<Cut> {
        let drained = tokio::time::timeout(timeout, self.inner.active.zero()).await;
        drained.is_err().then(|| Cut {
            connections: self.active(),
            upgraded: self.upgraded_active(),
        })
    }
}

/// The future of [`Drain::started`] (and of [`Drain::finishing`]). Every
/// connection polls one at each of its wake-ups (it sits in the
/// connection's `select!`), so after the first poll it costs an atomic load
/// and a waker comparison; the shared `Notify` (and its lock) is touched
/// again only if the task's waker changes.
pub(crate) struct Started<'a> {
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
