//! Serving: one current-thread tokio runtime per core, each accepting on every
//! listener and serving its own connections (see `connection.rs`).
//!
//! Why not one multi-thread runtime: its LIFO slot makes hyper flush once per
//! HTTP/2 response, and work stealing buys nothing for a server whose
//! connections are independent. Each thread holds a duplicate of every
//! listening socket; all of them accept from the same kernel queue.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::observe::logging::Chain;
use crate::process::context::{Peer, Shared, ThreadStats};
use crate::serve::connection::{self, ListenerSpec};

/// Why the serving threads did not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ThreadsError {
    #[error("thread runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("listener {listener}: {source}")]
    Listener {
        listener: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("thread died at start")]
    Died,
}

/// Starts `threads` threads serving `listeners`. Each accept loop ends, and
/// drops its copy of the socket, when the process starts draining.
/// `listeners` holds a duplicate of each socket for the threads; the caller
/// keeps its own for the handoff.
pub(crate) fn start(
    threads: usize,
    listeners: Vec<(std::net::TcpListener, ListenerSpec)>,
    shared: Arc<Shared>,
    span: tracing::Span,
) -> Result<(), ThreadsError> {
    let listeners: Vec<(Arc<std::net::TcpListener>, ListenerSpec)> = listeners
        .into_iter()
        .map(|(s, mut spec)| {
            spec.nodelay_inherited = nodelay_for_accepted(&s);
            (Arc::new(s), spec)
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::channel::<Result<(), ThreadsError>>();
    for w in 0..threads {
        let listeners = listeners.clone();
        let w = w % shared.process.threads.len();
        let stats = shared.process.threads[w].clone();
        let shared = shared.clone();
        let span = span.clone();
        let tx = tx.clone();
        std::thread::Builder::new()
            .name(format!("gracesrv-w{w}"))
            .spawn(move || {
                let _enter = span.enter();
                crate::wire::upstream::set_serving_thread(w);
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(ThreadsError::Runtime(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut sockets = Vec::new();
                    for (socket, spec) in &listeners {
                        match socket
                            .try_clone()
                            .and_then(tokio::net::TcpListener::from_std)
                        {
                            Ok(l) => sockets.push(l),
                            Err(e) => {
                                let _ = tx.send(Err(ThreadsError::Listener {
                                    listener: spec.ctx.name.clone(),
                                    source: e,
                                }));
                                return;
                            }
                        }
                    }
                    let thread = Arc::new(connection::Thread {
                        stats,
                        builders: connection::Builders::new(shared.max_headers),
                        shared,
                    });
                    // This thread's own allocation of each spec: cloning it per
                    // request touches no cache line another thread writes.
                    let specs: Vec<Arc<ListenerSpec>> = listeners
                        .into_iter()
                        .map(|(_, spec)| Arc::new(spec))
                        .collect();
                    // Requests handed on by draining generations: one thread
                    // accepts them (see `forward`).
                    if let (0, Some(socket)) = (w, &thread.shared.process.forward) {
                        if let Err(e) = super::forward::serve(socket, specs.clone(), thread.clone())
                        {
                            warn!("cannot accept forwarded requests: {e}", e = Chain(&e));
                        }
                    }
                    for (spec, socket) in specs.into_iter().zip(sockets) {
                        let thread = thread.clone();
                        let drain = thread.shared.process.drain.clone();
                        // Counted as accepting from now, so a drain that
                        // starts before the task runs still waits for it.
                        let guard = drain.acceptor();
                        let held = drain.socket();
                        tokio::spawn(async move {
                            // Locals drop in reverse order: the socket is
                            // closed before `_held` counts it closed.
                            let _held = held;
                            let mut socket = socket;
                            let mut guard = Some(guard);
                            loop {
                                accept_loop(&socket, w, &spec, &thread).await;
                                match pause(socket, &drain, &mut guard, &spec.ctx.name).await {
                                    Some(s) => socket = s,
                                    None => return,
                                }
                            }
                        });
                    }
                    let _ = tx.send(Ok(()));
                    drop(tx);
                    // Connections live on this runtime until the process exits.
                    std::future::pending::<()>().await;
                });
            })
            .map_err(ThreadsError::Spawn)?;
    }
    drop(tx);
    for _ in 0..threads {
        rx.recv().map_err(|_| ThreadsError::Died)??;
    }
    Ok(())
}

/// A listening socket that can leave this thread's epoll while a drain
/// pauses its accept loop, and come back.
pub(super) trait Pausable: Sized {
    type Std;
    fn pause(self) -> std::io::Result<Self::Std>;
    fn resume(std: Self::Std) -> std::io::Result<Self>;
}

impl Pausable for tokio::net::TcpListener {
    type Std = std::net::TcpListener;
    fn pause(self) -> std::io::Result<Self::Std> {
        self.into_std()
    }
    fn resume(std: Self::Std) -> std::io::Result<Self> {
        Self::from_std(std)
    }
}

impl Pausable for tokio::net::UnixListener {
    type Std = std::os::unix::net::UnixListener;
    fn pause(self) -> std::io::Result<Self::Std> {
        self.into_std()
    }
    fn resume(std: Self::Std) -> std::io::Result<Self> {
        Self::from_std(std)
    }
}

/// After an accept loop returned (the process drains): holds `socket`
/// paused until the drain is resumed (it is given back, to accept again) or
/// the listeners close (`None`: the caller drops it). `guard` counts the
/// loop as accepting, and is let go meanwhile.
pub(super) async fn pause<L: Pausable>(
    socket: L,
    drain: &crate::process::drain::Drain,
    guard: &mut Option<crate::process::drain::Counted>,
    name: &str,
) -> Option<L> {
    // Paused, with the socket kept: the next generation may die right after
    // it said ready, and this process serve again. Out of this thread's
    // epoll meanwhile, or every connection to the next generation would
    // wake this one too.
    drop(guard.take());
    let paused = match socket.pause() {
        Ok(s) => s,
        Err(e) => {
            warn!(listener = %name, "cannot pause the listener: {e}", e = Chain(&e));
            return None;
        }
    };
    if !drain.resumed().await {
        debug!(listener = %name, "listener closed");
        return None;
    }
    match L::resume(paused) {
        Ok(s) => {
            *guard = Some(drain.acceptor());
            debug!(listener = %name, "accepting again");
            Some(s)
        }
        Err(e) => {
            warn!(listener = %name, "cannot accept again: {e}", e = Chain(&e));
            None
        }
    }
}

/// Sets TCP_NODELAY on a listening socket: Linux copies it to the sockets
/// the listener accepts. (The previous generation's copy of the socket gets
/// it too, which changes nothing for its connections.)
fn nodelay_for_accepted(listener: &std::net::TcpListener) -> bool {
    nix::sys::socket::setsockopt(listener, nix::sys::socket::sockopt::TcpNoDelay, &true).is_ok()
}

/// How long, at most, a busier thread pauses accepting, leaving new
/// connections to the others.
const DEFER: Duration = Duration::from_millis(2);

/// A thread defers to the others while it serves this many connections more
/// than the least busy one.
const SLACK: u64 = 4;

/// Should thread `me` leave the next connection to a less busy thread?
///
/// All threads accept from the same queue, and the kernel wakes all of them
/// for each connection: left alone, whichever runs first takes it, and a
/// burst of keep-alive connections can land on one core while the other
/// idles.
fn should_defer(threads: &[Arc<ThreadStats>], me: usize) -> bool {
    let mine = threads[me].connections.load(Ordering::Relaxed);
    let least = threads
        .iter()
        .map(|w| w.connections.load(Ordering::Relaxed))
        .min()
        .unwrap_or(mine);
    mine > least + SLACK
}

/// The first pause after a failed accept, and the longest.
const ACCEPT_PAUSE_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Accepts until the process drains.
///
/// `max_connections` is enforced after accept: a loop that reaches the limit
/// holds its one accepted connection until a slot frees and stops accepting
/// meanwhile, so further clients queue in the kernel's backlog instead of
/// being refused. (Taking a slot *before* accepting would let the idle accept
/// loops of other listeners and threads hoard slots.)
async fn accept_loop(
    listener: &tokio::net::TcpListener,
    me: usize,
    spec: &Arc<ListenerSpec>,
    thread: &Arc<connection::Thread>,
) {
    let (stats, shared) = (&thread.stats, &thread.shared);
    let drain = shared.process.drain.clone();
    let threads = &shared.process.threads;
    let stop = drain.started();
    tokio::pin!(stop);
    let mut pause = ACCEPT_PAUSE_FIRST;
    loop {
        if should_defer(threads, me) {
            // Leave the connections arriving now to less busy threads, until
            // this one has closed enough of its own or DEFER has passed (the
            // others may be busy too).
            stats.deferring.fetch_add(1, Ordering::Relaxed);
            let until = tokio::time::sleep(DEFER);
            tokio::pin!(until);
            let stopping = loop {
                tokio::select! {
                    biased;
                    _ = &mut stop => break true,
                    _ = &mut until => break false,
                    _ = stats.closed.notified() => {
                        if !should_defer(threads, me) {
                            break false;
                        }
                    }
                }
            };
            stats.deferring.fetch_sub(1, Ordering::Relaxed);
            if stopping {
                break;
            }
        }
        let accepted = tokio::select! {
            biased;
            _ = &mut stop => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                pause = ACCEPT_PAUSE_FIRST;
                a
            }
            Err(e) => {
                // Out of fds (EMFILE/ENFILE: static files, upstream and app
                // connections share the limit with clients) or buffers
                // (ENOBUFS/ENOMEM): the clients wait in the queue meanwhile.
                // Back off, doubling up to a second as mini-redis does, and
                // log at most a line a second for the whole process.
                if let Some(m) = &spec.metrics {
                    m.accept_errors.fetch_add(1, Ordering::Relaxed);
                }
                static LOGGED: crate::observe::logging::Throttle =
                    crate::observe::logging::Throttle::new();
                if let Some(suppressed) = LOGGED.allow() {
                    warn!(listener = %spec.ctx.name, suppressed, "accept: {e}; retrying in {pause:?}", e = Chain(&e));
                }
                tokio::select! {
                    biased;
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                continue;
            }
        };
        debug!(listener = %spec.ctx.name, %peer, "accepted");
        // Counted from accept, so a drain waits for it too.
        let guard = drain.connection();
        let conn = Accepted {
            stream,
            peer,
            spec: spec.clone(),
            thread: thread.clone(),
            guard,
            on_thread: OnThread::new(stats),
        };
        match shared.limit.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(conn.serve(permit));
            }
            Err(_) => {
                debug!(listener = %spec.ctx.name, "max_connections reached: waiting for a slot");
                let limit = shared.limit.clone();
                let wait = limit.acquire_owned();
                tokio::select! {
                    permit = wait => match permit {
                        Ok(permit) => { tokio::spawn(conn.serve(permit)); }
                        Err(_) => break,
                    },
                    _ = &mut stop => {
                        // Stopping: this connection is still served once a slot frees.
                        let limit = shared.limit.clone();
                        tokio::spawn(async move {
                            if let Ok(permit) = limit.acquire_owned().await {
                                conn.serve(permit).await;
                            }
                        });
                        break;
                    }
                }
            }
        }
    }
    debug!(listener = %spec.ctx.name, "accept loop paused");
}

/// An accepted connection, counted, waiting for its slot.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    spec: Arc<ListenerSpec>,
    thread: Arc<connection::Thread>,
    guard: crate::process::drain::ConnectionGuard,
    on_thread: OnThread,
}

/// A connection counted on its thread until it is dropped.
struct OnThread(Arc<ThreadStats>);

impl OnThread {
    fn new(stats: &Arc<ThreadStats>) -> OnThread {
        stats.connections.fetch_add(1, Ordering::Relaxed);
        OnThread(stats.clone())
    }
}

impl Drop for OnThread {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        if self.0.deferring.load(Ordering::Relaxed) > 0 {
            self.0.closed.notify_waiters();
        }
    }
}

impl Accepted {
    async fn serve(self, permit: tokio::sync::OwnedSemaphorePermit) {
        let Accepted {
            stream,
            peer,
            spec,
            thread,
            guard,
            on_thread,
        } = self;
        if !spec.nodelay_inherited {
            let _ = stream.set_nodelay(true);
        }
        // Inline in the task, not boxed: what a connection keeps across its
        // waits is well under a KiB (what only a moment needs, hyper, the
        // handshake, the rest, is boxed inside), and a box of its own cost
        // an allocation and its size class's slack on every connection.
        match spec.tls.clone() {
            None => {
                let peer = Peer {
                    addr: peer,
                    tls: false,
                };
                connection::serve_http(stream, None, peer, None, spec, thread, false).await
            }
            Some(config) => connection::serve_tls(config, stream, peer, spec, thread).await,
        }
        // Counted until here: the connection is closed.
        drop(guard);
        drop(on_thread);
        drop(permit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn threads(conns: &[u64]) -> Vec<Arc<ThreadStats>> {
        conns
            .iter()
            .map(|&c| {
                let w = ThreadStats::default();
                w.connections.store(c, Ordering::Relaxed);
                Arc::new(w)
            })
            .collect()
    }

    #[test]
    fn accepted_sockets_inherit_nodelay() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(nodelay_for_accepted(&l));
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        assert!(a.nodelay().unwrap());
    }

    #[test]
    fn a_busier_worker_defers_to_the_least_busy() {
        let w = threads(&[10, 10 - SLACK, 20]);
        assert!(!should_defer(&w, 0), "within the slack");
        assert!(!should_defer(&w, 1), "the least busy never defers");
        assert!(should_defer(&w, 2));
        let one = threads(&[1000]);
        assert!(!should_defer(&one, 0), "a lone thread never defers");
    }
}
