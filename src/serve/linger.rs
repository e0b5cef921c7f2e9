//! How a connection ends: a lingering close, so that nothing already sent
//! is lost to a reset.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::connection::{RawSocket, Socket};

/// How long a closing connection waits for a client that has nothing of
/// ours left to receive and sends nothing: a slow network's round trip, so
/// a request the client sent before our FIN reached it is read and dropped
/// instead of answered with a reset. HTTP/2 clients, and clients still
/// sending (an upload answered early), get nginx's `lingering_timeout`.
pub(super) const LINGER_QUIET: Duration = Duration::from_millis(500);
/// ... but a client whose round trip the kernel has measured gets four of
/// them, at least this long: a request sent before our FIN reached it
/// arrives within one (15,000 idle connections a drain closes at once are
/// gone in 0.1 s instead of 0.5 s).
const LINGER_QUIET_MIN: Duration = Duration::from_millis(50);
pub(super) const LINGER_BUSY: Duration = Duration::from_secs(5);
/// The most a connection lingers at all, as nginx's `lingering_time`.
pub(super) const LINGER_MAX: Duration = Duration::from_secs(30);

/// Ends a connection without discarding what was sent on it (SPEC section 4,
/// item 8). A bare `close` with response bytes still queued, or with client
/// bytes unread, makes the kernel answer the client's next segment (an
/// HTTP/2 WINDOW_UPDATE, the rest of an upload) with a reset, and the
/// client loses the response. So: TLS close_notify, then FIN after what is
/// queued (`shutdown(SHUT_WR)`), then read and discard until the client
/// closes, or it has everything and stays quiet (see `LINGER_QUIET`), or it
/// stops taking our bytes for `timeouts.send`, or `LINGER_MAX` passes.
pub(super) async fn linger<T: Socket>(mut io: T, h2: bool, send_timeout: Duration) {
    // Bounded: a client that does not read can hold the close_notify back.
    match tokio::time::timeout(send_timeout, io.shutdown()).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    let tcp = io.raw();
    let tick = LingerTick::join();
    let start = tokio::time::Instant::now();
    let end = start + LINGER_MAX;
    let mut heard = h2;
    let mut quiet_since = start;
    let mut unacked = usize::MAX;
    let mut moved_at = start;
    // When to look at our queue next. The common case (the client read the
    // answer and closes) costs one wait and one read of its FIN: no timer
    // of its own, no read that finds nothing, no ioctl.
    // The quiet wait is read from the kernel (`TCP_INFO`) only then.
    let mut look_at = start + LINGER_QUIET_MIN;
    let mut quiet_wait = None;
    let mut buf = [0u8; 1024];
    loop {
        let ticked = tick.notify.notified();
        tokio::select! {
            biased;
            ready = tcp.read_ready() => {
                if ready.is_err() {
                    return;
                }
                match tcp.try_read(&mut buf) {
                    Ok(0) => return, // the client closed: it has everything
                    Ok(_) => {
                        heard = true;
                        quiet_since = tokio::time::Instant::now();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
                continue;
            }
            _ = ticked => {}
        }
        let now = tokio::time::Instant::now();
        if now >= end {
            return;
        }
        if now < look_at {
            continue;
        }
        let queued = crate::sys::handoff::unacknowledged(tcp);
        if queued < unacked {
            moved_at = now;
        }
        unacked = queued;
        look_at = if queued == 0 {
            let quiet = if heard {
                LINGER_BUSY
            } else {
                *quiet_wait.get_or_insert_with(|| {
                    crate::sys::handoff::round_trip(tcp).map_or(LINGER_QUIET, |rtt| {
                        (rtt * 4).clamp(LINGER_QUIET_MIN, LINGER_QUIET)
                    })
                })
            };
            if now >= quiet_since + quiet {
                return;
            }
            quiet_since + quiet
        } else {
            if now >= moved_at + send_timeout {
                return; // the client stopped reading
            }
            now // the queue drains without waking us: look at every tick
        };
    }
}

/// How often lingering connections look at their deadlines.
pub(super) const LINGER_TICK: Duration = Duration::from_millis(100);

/// One ticker per thread for its lingering connections, running
/// while any lingers. A timer of each connection's own would cost a wake-up
/// of the thread (an eventfd write) per connection: tokio's timer wheel
/// wakes its driver whenever a timer is set earlier than its next wake-up,
/// and a linger's is nearly always the earliest.
pub(super) struct LingerTick {
    pub(super) notify: std::sync::Arc<tokio::sync::Notify>,
}

thread_local! {
    static LINGER: std::cell::RefCell<std::sync::Weak<LingerTick>> =
        const { std::cell::RefCell::new(std::sync::Weak::new()) };
}

impl LingerTick {
    /// This thread's ticker, started if no connection lingers yet. It stops
    /// once the last lingering connection drops its handle.
    pub(super) fn join() -> Arc<LingerTick> {
        LINGER.with(|cell| {
            if let Some(tick) = cell.borrow().upgrade() {
                return tick;
            }
            let notify = std::sync::Arc::new(tokio::sync::Notify::new());
            let tick = Arc::new(LingerTick {
                notify: notify.clone(),
            });
            *cell.borrow_mut() = Arc::downgrade(&tick);
            let alive = Arc::downgrade(&tick);
            // Spawned on this thread's runtime (one thread): the ticker
            // wakes only the connections of this thread.
            tokio::spawn(async move {
                let mut every = tokio::time::interval(LINGER_TICK);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while alive.strong_count() > 0 {
                    every.tick().await;
                    notify.notify_waiters();
                }
            });
            tick
        })
    }
}
