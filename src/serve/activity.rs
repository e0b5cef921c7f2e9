//! What a connection is doing, for its timeouts: the coarse clock they are
//! measured on, the connection's activity (requests in flight, heads
//! arriving, bytes going out, the HTTP/2 streams open), and the IO wrapper
//! that sees it.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::Timeouts;

/// Milliseconds on the kernel's coarse monotonic clock: read from the vDSO
/// without a hardware clock read, once or twice per request. It advances a
/// scheduler tick at a time ([`tick_ms`]), so deadlines add a tick.
pub(super) fn now_ms() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    // Linux has had the coarse clock since 2.6.32; neither call fails there.
    clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE)
        .or_else(|_| clock_gettime(ClockId::CLOCK_MONOTONIC))
        .map_or(1, |t| {
            (t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000).max(1)
        })
}

/// The resolution of [`now_ms`], rounded up to a millisecond.
pub(super) fn tick_ms() -> u64 {
    static TICK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICK.get_or_init(|| {
        use nix::time::{clock_getres, ClockId};
        clock_getres(ClockId::CLOCK_MONOTONIC_COARSE)
            .map(|r| (r.tv_sec() as u64 * 1000 + (r.tv_nsec() as u64).div_ceil(1_000_000)).max(1))
            .unwrap_or(1)
    })
}

/// What a connection is doing, for its timeouts. Shared by the IO wrapper
/// (which sees bytes arrive) and the service (which sees requests start and
/// their response bodies end).
pub(super) struct Activity {
    pub(super) in_flight: AtomicU32,
    /// When the connection last became idle (no request in flight).
    pub(super) idle_since: AtomicU64,
    /// When the first byte of a not yet complete request head arrived; 0 if none.
    pub(super) head_since: AtomicU64,
    /// HTTP/2 (known before hyper starts): heads have no timeout of their own.
    pub(super) h2: bool,
    /// Switched protocols (101): the connection is a tunnel now.
    pub(super) upgraded: AtomicBool,
    /// Responses whose next step waits on the client: handed to hyper and
    /// not yet polled, or a frame yielded and not yet taken (the socket is
    /// full, or HTTP/2 flow control holds it).
    pub(super) parked: AtomicU32,
    /// When bytes last went out, or a parked response moved on.
    pub(super) progress_at: AtomicU64,
    /// The last request asked to close the connection and had no body: the
    /// client sends nothing after it, so a plain close loses nothing (no
    /// lingering, as nginx does when nothing can be unread).
    pub(super) client_done: AtomicBool,
    /// HTTP/1.x: requests handed to the service so far, and the ordinal of
    /// the one `heads` refused (0: none) with the status it gets.
    pub(super) requests: AtomicU64,
    pub(super) refused_at: AtomicU64,
    pub(super) refused_status: AtomicU32,
    /// HTTP/1.x: a request has more header fields than the parser takes;
    /// the connection moves to a larger one once nothing is in flight.
    /// Set while hyper's connection is polled (by the head filter), and
    /// looked at after each of its polls (`drive`): no wake-up needed.
    pub(super) more_fields: AtomicBool,
    /// HTTP/2: what wakes a draining connection's loop when it goes quiet.
    pub(super) signal: tokio::sync::Notify,
    /// HTTP/1.x, idle for [`REST`]: hyper is let go (its buffers with it),
    /// and the connection rests with nothing but its socket until the
    /// client sends again (see `serve_http`).
    pub(super) resting: AtomicBool,
    /// HTTP/2 (from `h2frames`): no stream open and no frame half passed,
    /// and the last stream the client opened (`signal` when it goes quiet).
    pub(super) h2_quiet: AtomicBool,
    /// When it last went quiet (`now_ms`).
    pub(super) h2_quiet_at: AtomicU64,
    pub(super) h2_last: AtomicU32,
    /// HTTP/2 handed on by a draining generation (`forward`): its client is
    /// that generation, which takes the drain's two steps.
    pub(super) forwarded: bool,
    /// HTTP/2, draining: requests starting now go to the newest generation,
    /// through `forward` (made with the first of them).
    pub(super) forwarding: AtomicBool,
    pub(super) forward: std::sync::OnceLock<Box<super::forward::Forwarder>>,
}

/// Why a connection's timer ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expiry {
    /// Idle, or a head too slow: closed with a linger.
    Idle,
    /// HTTP/2, draining: no stream open. hyper is dropped here, and one
    /// GOAWAY with the last stream's ID goes out (`h2frames`).
    GoAway,
    /// Idle while draining, `draining_idle` after the drain began (HTTP/2:
    /// its GOAWAY went out then): closed with a short linger, whether or
    /// not the client answered.
    Drained,
    /// A response made no progress for `timeouts.send`: the client is not
    /// reading, so there is nothing to linger for. Cut.
    Stalled,
}

/// How long an HTTP/1.x connection stays idle before it rests: hyper's
/// buffers (16 KB) and state are dropped, and come back with the next
/// request. Long enough that a busy keep-alive connection never pays for it.
pub(super) const REST: Duration = Duration::from_secs(1);

impl Activity {
    /// HTTP/1.x: idle since [`REST`] (nothing in flight, no byte of a next
    /// head read, no upgrade or move pending): hyper can be let go.
    pub(super) fn can_rest(&self, now: u64) -> bool {
        !self.h2
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
            && !self.upgraded.load(Ordering::Relaxed)
            && !self.more_fields.load(Ordering::Relaxed)
            && now >= self.idle_since.load(Ordering::Relaxed) + REST.as_millis() as u64
    }

    /// HTTP/2: no stream has been open for `d`.
    pub(super) fn h2_quiet_for(&self, d: Duration) -> bool {
        self.h2
            && self.h2_quiet.load(Ordering::Relaxed)
            && now_ms() >= self.h2_quiet_at.load(Ordering::Relaxed) + d.as_millis() as u64
    }

    pub(super) fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
    }

    /// What the HTTP/2 frames say now; wakes the drain when the
    /// connection goes quiet.
    pub(super) fn h2_seen(&self, frames: &crate::wire::h2frames::Frames) {
        let quiet = frames.quiet();
        if quiet != self.h2_quiet.load(Ordering::Relaxed) {
            self.h2_quiet.store(quiet, Ordering::Relaxed);
            self.h2_last.store(frames.last(), Ordering::Relaxed);
            if quiet {
                self.h2_quiet_at.store(now_ms(), Ordering::Relaxed);
                self.signal.notify_one();
            }
        }
    }

    pub(super) fn request_finished(&self) {
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle_since.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// A response handed to hyper, or a frame of it yielded: it waits on
    /// the client now.
    pub(super) fn park(&self) {
        if self.parked.fetch_add(1, Ordering::Relaxed) == 0 {
            self.progress_at.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// Bytes went out: the client is taking what it is sent.
    pub(super) fn wrote(&self, res: &Poll<std::io::Result<usize>>) {
        if let Poll::Ready(Ok(1..)) = res {
            self.progress_at.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// A parked response was polled again: the client took what it had.
    pub(super) fn unpark(&self) {
        self.parked.fetch_sub(1, Ordering::Relaxed);
        self.progress_at.store(now_ms(), Ordering::Relaxed);
    }

    /// When the connection should be closed, and why, if nothing changes.
    /// `drain_at` is when this process started draining (0: it has not).
    /// A tick late rather than early: both ends of the wait are read from a
    /// clock that advances a tick at a time.
    pub(super) fn deadline(&self, t: &Timeouts, drain_at: u64) -> Option<(u64, Expiry)> {
        let ms = |d: Duration| d.as_millis() as u64 + tick_ms();
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            if self.parked.load(Ordering::Relaxed) == 0 {
                return None;
            }
            let at = self.progress_at.load(Ordering::Relaxed) + ms(t.send);
            return Some((at, Expiry::Stalled));
        }
        let head = self.head_since.load(Ordering::Relaxed);
        if head != 0 && !self.h2 {
            return Some((head + ms(t.header), Expiry::Idle));
        }
        let idle_since = self.idle_since.load(Ordering::Relaxed);
        let at = idle_since + ms(t.idle);
        if drain_at != 0 {
            // Idle while draining: closed soon, but never sooner than
            // `draining_idle` after the drain began. HTTP/2 too: a client
            // that never answers the GOAWAY's PING (httpx) would otherwise
            // hold the old generation until `shutdown_timeout`.
            let drained = idle_since.max(drain_at) + ms(t.draining_idle);
            if drained <= at {
                return Some((drained, Expiry::Drained));
            }
        }
        Some((at, Expiry::Idle))
    }
}

/// The connection's IO, noting when a new request head starts arriving,
/// when bytes go out, and whether the client closed its side. When hyper
/// drops it, the IO goes back to `serve_http` through `back`, which ends
/// the connection with a lingering close.
pub(super) struct TrackedIo<T> {
    /// Always `Some` until dropped.
    pub(super) inner: Option<T>,
    /// What was read to tell the HTTP version, for hyper to read first.
    pub(super) prefix: Bytes,
    pub(super) activity: Arc<Activity>,
    /// Plain TCP: hyper's `shutdown` is left to the lingering close.
    /// TLS must shut down: that sends its close_notify.
    pub(super) plain: bool,
    /// The client closed its side (a read returned end of file).
    pub(super) eof: bool,
    /// HTTP/1.x: the request heads hyper's parser cannot be told about.
    pub(super) heads: Option<crate::wire::heads::Heads>,
    /// HTTP/2: the streams open, for the drain (`h2frames`).
    pub(super) frames: Option<Box<crate::wire::h2frames::Frames>>,
    pub(super) back: Option<tokio::sync::oneshot::Sender<Returned<T>>>,
}

/// What a connection's IO hands back when hyper is done with it: the IO,
/// whether the client closed its side, and the HTTP/1.x head filter (with
/// what it holds back, when the connection moves to a larger parser).
pub(super) type Returned<T> = (T, bool, Option<crate::wire::heads::Heads>);

impl<T> Drop for TrackedIo<T> {
    fn drop(&mut self) {
        if let (Some(io), Some(back)) = (self.inner.take(), self.back.take()) {
            // No receiver: the connection upgraded, and the tunnel owned us.
            let _ = back.send((io, self.eof, self.heads.take()));
        }
    }
}

pub(super) fn gone() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::NotConnected)
}

impl<T: super::connection::Socket> AsyncRead for TrackedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.heads.as_mut().is_some_and(|h| h.pending(buf)) {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            if !this.prefix.is_empty() {
                let n = this.prefix.len().min(buf.remaining());
                buf.put_slice(&this.prefix.split_to(n));
            } else {
                let Some(inner) = this.inner.as_mut() else {
                    return Poll::Ready(Err(gone()));
                };
                let read = Pin::new(&mut *inner).poll_read(cx, buf);
                if read.is_pending() {
                    // HTTP/2 never rests (hyper keeps the connection): its
                    // transport's buffers go once it has been quiet a while.
                    if this.activity.h2_quiet_for(REST) {
                        inner.release_buffers();
                    }
                    return Poll::Pending;
                }
                std::task::ready!(read)?;
                if buf.filled().len() == before {
                    if buf.remaining() > 0 {
                        this.eof = true;
                    }
                    return Poll::Ready(Ok(()));
                }
                let a = &this.activity;
                if a.in_flight.load(Ordering::Relaxed) == 0
                    && a.head_since.load(Ordering::Relaxed) == 0
                {
                    a.head_since.store(now_ms(), Ordering::Relaxed);
                }
            }
            if let Some(frames) = this.frames.as_mut() {
                frames.read(&buf.filled()[before..]);
                this.activity.h2_seen(frames);
            }
            let Some(heads) = this.heads.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            heads.filter(buf, before);
            if let Some((at, status)) = heads.refused() {
                this.activity.refused_at.store(at, Ordering::Relaxed);
                this.activity
                    .refused_status
                    .store(status.as_u16().into(), Ordering::Relaxed);
            }
            if heads.wants_more_fields() {
                this.activity.more_fields.store(true, Ordering::Relaxed);
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            // All of it held back (part of a head) or queued: read on.
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        let res = Pin::new(inner).poll_write(cx, buf);
        this.activity.wrote(&res);
        if let (Some(frames), Poll::Ready(Ok(n))) = (this.frames.as_mut(), &res) {
            frames.wrote(&buf[..*n]);
            this.activity.h2_seen(frames);
        }
        res
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        let res = Pin::new(inner).poll_write_vectored(cx, bufs);
        this.activity.wrote(&res);
        if let (Some(frames), Poll::Ready(Ok(n))) = (this.frames.as_mut(), &res) {
            let mut left = *n;
            for b in bufs {
                let take = left.min(b.len());
                frames.wrote(&b[..take]);
                left -= take;
            }
            this.activity.h2_seen(frames);
        }
        res
    }
    /// Not vectored: hyper then flattens a response's head and body into
    /// one buffer, so it goes out as one write (and, over TLS, one record).
    fn is_write_vectored(&self) -> bool {
        false
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_flush(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // Plain TCP: the lingering close shuts down, once hyper is done. An
        // upgraded connection (a proxied WebSocket) is another matter: its
        // tunnel half-closes, and the other direction goes on.
        if self.plain && !self.activity.upgraded.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        // Moving to a larger parser, or resting: the connection goes on.
        if self.activity.more_fields.load(Ordering::Relaxed)
            || self.activity.resting.load(Ordering::Relaxed)
        {
            return Poll::Ready(Ok(()));
        }
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
}
