//! One connection: TLS handshake, which HTTP version it speaks, hyper's
//! connection for it, its timeouts and drain, and how it ends (a lingering
//! close). Requests go to the listener's handler through `ConnService`,
//! which counts them and, during a drain, closes HTTP/1.x connections after
//! their response.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, Version};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::Timeouts;
use crate::http::service::Handler;
use crate::observe::access_log::{AccessLog, Entry, TlsInfo};
use crate::process::context::{ListenerContext, Peer, Shared, ThreadStats};
use crate::wire::body::{Body, Reply};

/// The largest request head accepted, HTTP/1.1 and HTTP/2 alike.
const MAX_HEAD: usize = 64 * 1024;

/// Everything a thread needs to serve one listener.
#[derive(Clone)]
pub struct ListenerSpec {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub handler: Handler,
    pub ctx: Arc<ListenerContext>,
    /// Set by [`crate::serve::accept::start`]: accepted sockets get TCP_NODELAY from the listening
    /// socket, so no connection needs a `setsockopt` of its own.
    pub nodelay_inherited: bool,
    /// Where this listener's requests are logged, if anywhere.
    pub access_log: Option<Arc<AccessLog>>,
    /// What this listener counts, when the config serves `metrics: {}`.
    pub metrics: Option<Arc<crate::observe::metrics::ListenerMetrics>>,
    /// `Alt-Svc` advertising the listener's HTTP/3 (`h3=":PORT"; ma=86400`).
    pub alt_svc: Option<HeaderValue>,
}

/// hyper's connection builders, one per HTTP version (one set per thread).
pub struct Builders {
    h1: http1::Builder,
    /// For a connection whose request has more header fields than `h1`
    /// parses on its stack (see `heads::STACK_FIELDS`): up to `max_headers`.
    h1_more: Option<http1::Builder>,
    /// The fields `h1` takes.
    h1_fields: usize,
    h2: http2::Builder<TokioExecutor>,
}

impl Builders {
    /// Timeouts for heads and idle connections are ours (see `Activity`):
    /// hyper's header timer also runs while a keep-alive connection is idle.
    /// A request head over 64 KiB gets 431 (nginx allows about 32 KiB).
    /// HTTP/2 limits against floods: 256 concurrent streams a connection
    /// (more are refused), and a GOAWAY (ENHANCE_YOUR_CALM) for a client that
    /// resets streams faster than they can be accepted (CVE-2023-44487).
    /// An HTTP/1.x request may carry `max_headers` header fields: a
    /// connection starts with hyper's stack buffer, and moves to a builder
    /// with a buffer of `max_headers` (allocated per request) only when a
    /// request needs it (see `heads`).
    pub fn new(max_headers: usize) -> Builders {
        let h1_builder = |fields: Option<usize>| {
            let mut h1 = http1::Builder::new();
            h1.timer(TokioTimer::new())
                .header_read_timeout(None)
                // Both: the buffer bound alone lets a head that arrives in one
                // read (a TLS read decrypts several records) run past it.
                .max_header_size(MAX_HEAD)
                .max_buf_size(MAX_HEAD);
            if let Some(fields) = fields {
                h1.max_headers(fields);
            }
            h1
        };
        let stack = crate::wire::heads::STACK_FIELDS;
        let (h1, h1_fields, h1_more) = if max_headers > stack {
            (h1_builder(None), stack, Some(h1_builder(Some(max_headers))))
        } else {
            (h1_builder(Some(max_headers)), max_headers, None)
        };
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(256)
            .max_header_list_size(MAX_HEAD as u32)
            .max_pending_accept_reset_streams(64)
            .max_local_error_reset_streams(1024);
        Builders {
            h1,
            h1_more,
            h1_fields,
            h2,
        }
    }
}

/// The HTTP/2 connection preface, the first bytes of a client that speaks
/// HTTP/2 with prior knowledge (h2c).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a client's first bytes until they show its HTTP version: the
/// HTTP/2 preface, or anything else (HTTP/1.x). Returns the bytes read, for
/// hyper to parse, or `None` if the client closed first.
///
/// One read nearly always decides. (hyper-util's auto server reads at most
/// the preface's 24 bytes, so an HTTP/1.1 head took two reads.)
async fn sniff<T: AsyncRead + Unpin>(io: &mut T) -> std::io::Result<Option<(bool, Bytes)>> {
    let mut buf = bytes::BytesMut::with_capacity(4096);
    loop {
        if tokio::io::AsyncReadExt::read_buf(io, &mut buf).await? == 0 {
            return Ok(None);
        }
        let n = buf.len().min(PREFACE.len());
        if buf[..n] != PREFACE[..n] {
            return Ok(Some((false, buf.freeze())));
        }
        if n == PREFACE.len() {
            return Ok(Some((true, buf.freeze())));
        }
    }
}

/// A connection's transport: plain TCP or TLS over it. The lingering close
/// reads the TCP socket underneath, and asks it what is still unacknowledged.
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn tcp(&self) -> &TcpStream;
}

impl Socket for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Socket for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// How long a closing connection waits for a client that has nothing of
/// ours left to receive and sends nothing: a slow network's round trip, so
/// a request the client sent before our FIN reached it is read and dropped
/// instead of answered with a reset. HTTP/2 clients, and clients still
/// sending (an upload answered early), get nginx's `lingering_timeout`.
const LINGER_QUIET: Duration = Duration::from_millis(500);
const LINGER_BUSY: Duration = Duration::from_secs(5);
/// The most a connection lingers at all, as nginx's `lingering_time`.
const LINGER_MAX: Duration = Duration::from_secs(30);

/// Ends a connection without discarding what was sent on it (SPEC section 4,
/// item 8). A bare `close` with response bytes still queued, or with client
/// bytes unread, makes the kernel answer the client's next segment (an
/// HTTP/2 WINDOW_UPDATE, the rest of an upload) with a reset, and the
/// client loses the response. So: TLS close_notify, then FIN after what is
/// queued (`shutdown(SHUT_WR)`), then read and discard until the client
/// closes, or it has everything and stays quiet (see `LINGER_QUIET`), or it
/// stops taking our bytes for `timeouts.send`, or `LINGER_MAX` passes.
async fn linger<T: Socket>(mut io: T, h2: bool, send_timeout: Duration) {
    // Bounded: a client that does not read can hold the close_notify back.
    match tokio::time::timeout(send_timeout, io.shutdown()).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    let tcp = io.tcp();
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
    let mut look_at = start + LINGER_QUIET;
    let mut buf = [0u8; 1024];
    loop {
        let ticked = tick.notify.notified();
        tokio::select! {
            biased;
            ready = tcp.readable() => {
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
            let quiet = if heard { LINGER_BUSY } else { LINGER_QUIET };
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
const LINGER_TICK: Duration = Duration::from_millis(100);

/// One ticker per thread for its lingering connections, running
/// while any lingers. A timer of each connection's own would cost a wake-up
/// of the thread (an eventfd write) per connection: tokio's timer wheel
/// wakes its driver whenever a timer is set earlier than its next wake-up,
/// and a linger's is nearly always the earliest.
struct LingerTick {
    notify: std::sync::Arc<tokio::sync::Notify>,
}

thread_local! {
    static LINGER: std::cell::RefCell<std::sync::Weak<LingerTick>> =
        const { std::cell::RefCell::new(std::sync::Weak::new()) };
}

impl LingerTick {
    /// This thread's ticker, started if no connection lingers yet. It stops
    /// once the last lingering connection drops its handle.
    fn join() -> Arc<LingerTick> {
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

/// One connection's hyper state, HTTP/1.x (with upgrades) or HTTP/2.
/// Variants of unequal size are fine: it lives in the connection's boxed
/// future, never moved after it is made.
#[allow(clippy::large_enum_variant)]
enum HttpConn<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    H1(http1::UpgradeableConnection<TokioIo<TrackedIo<T>>, ConnService>),
    H2(http2::Connection<TokioIo<TrackedIo<T>>, ConnService, TokioExecutor>),
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> HttpConn<T> {
    /// HTTP/2: GOAWAY, and the open streams finish. HTTP/1.x drains
    /// differently (`Connection: close` on the next response, see
    /// `ConnService`; an idle one closes after `draining_idle`), so there is
    /// nothing to do for it here.
    fn goaway(self: Pin<&mut Self>) {
        if let HttpConn::H2(c) = self.get_mut() {
            Pin::new(c).graceful_shutdown();
        }
    }

    /// HTTP/1.x: ends hyper's connection once it is idle (at once if it
    /// is), to go on with the IO elsewhere.
    fn close_idle(self: Pin<&mut Self>) {
        if let HttpConn::H1(c) = self.get_mut() {
            Pin::new(c).graceful_shutdown();
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> std::future::Future for HttpConn<T> {
    type Output = Result<(), hyper::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            HttpConn::H1(c) => Pin::new(c).poll(cx),
            HttpConn::H2(c) => Pin::new(c).poll(cx),
        }
    }
}

/// The TLS handshake (within `timeouts.handshake`), then HTTP.
pub async fn serve_tls(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    spec: Arc<ListenerSpec>,
    stats: Arc<ThreadStats>,
    shared: Arc<Shared>,
    builder: Arc<Builders>,
) {
    let handshake = tokio::time::timeout(shared.timeouts.handshake, acceptor.accept(stream)).await;
    if let Some(m) = &spec.metrics {
        let counter = match &handshake {
            Ok(Ok(_)) => &m.handshakes,
            _ => &m.handshake_failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    match handshake {
        Ok(Ok(tls)) => {
            let peer = Peer {
                addr: peer,
                tls: true,
            };
            let session = tls.get_ref().1;
            let alpn_h2 = session.alpn_protocol().map(|p| p == b"h2");
            // What the access log says of TLS (only when there is one).
            let info = spec.access_log.as_ref().map(|_| {
                Arc::new(TlsInfo {
                    version: match session.protocol_version() {
                        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                        _ => "TLS",
                    },
                    sni: session.server_name().map(Into::into),
                })
            });
            serve_http(tls, alpn_h2, peer, info, spec, stats, shared, builder).await
        }
        Ok(Err(e)) => debug!(listener = %spec.ctx.name, %peer, "TLS handshake failed: {e}"),
        Err(_) => debug!(listener = %spec.ctx.name, %peer, "TLS handshake timed out"),
    }
}

/// Milliseconds on the kernel's coarse monotonic clock: read from the vDSO
/// without a hardware clock read, once or twice per request. It advances a
/// scheduler tick at a time ([`tick_ms`]), so deadlines add a tick.
fn now_ms() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    // Linux has had the coarse clock since 2.6.32; neither call fails there.
    clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE)
        .or_else(|_| clock_gettime(ClockId::CLOCK_MONOTONIC))
        .map_or(1, |t| {
            (t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000).max(1)
        })
}

/// The resolution of [`now_ms`], rounded up to a millisecond.
fn tick_ms() -> u64 {
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
struct Activity {
    in_flight: AtomicU32,
    /// When the connection last became idle (no request in flight).
    idle_since: AtomicU64,
    /// When the first byte of a not yet complete request head arrived; 0 if none.
    head_since: AtomicU64,
    /// HTTP/2 (known before hyper starts): heads have no timeout of their own.
    h2: bool,
    /// Switched protocols (101): the connection is a tunnel now.
    upgraded: AtomicBool,
    /// Responses whose next step waits on the client: handed to hyper and
    /// not yet polled, or a frame yielded and not yet taken (the socket is
    /// full, or HTTP/2 flow control holds it).
    parked: AtomicU32,
    /// When bytes last went out, or a parked response moved on.
    progress_at: AtomicU64,
    /// The last request asked to close the connection and had no body: the
    /// client sends nothing after it, so a plain close loses nothing (no
    /// lingering, as nginx does when nothing can be unread).
    client_done: AtomicBool,
    /// HTTP/1.x: requests handed to the service so far, and the ordinal of
    /// the one `heads` refused (0: none) with the status it gets.
    requests: AtomicU64,
    refused_at: AtomicU64,
    refused_status: AtomicU32,
    /// HTTP/1.x: a request has more header fields than the parser takes;
    /// the connection moves to a larger one once nothing is in flight,
    /// told through `moving`.
    more_fields: AtomicBool,
    moving: tokio::sync::Notify,
    /// HTTP/2 (from `h2frames`): no stream open and no frame half passed,
    /// the last stream the client opened, and a signal when it goes quiet.
    h2_quiet: AtomicBool,
    /// When it last went quiet (`now_ms`).
    h2_quiet_at: AtomicU64,
    h2_last: AtomicU32,
    h2_quieted: tokio::sync::Notify,
}

/// Why a connection's timer ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
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

impl Activity {
    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
    }

    /// What the HTTP/2 frames say now; wakes the drain when the
    /// connection goes quiet.
    fn h2_seen(&self, frames: &crate::wire::h2frames::Frames) {
        let quiet = frames.quiet();
        if quiet != self.h2_quiet.load(Ordering::Relaxed) {
            self.h2_quiet.store(quiet, Ordering::Relaxed);
            self.h2_last.store(frames.last(), Ordering::Relaxed);
            if quiet {
                self.h2_quiet_at.store(now_ms(), Ordering::Relaxed);
                self.h2_quieted.notify_one();
            }
        }
    }

    fn request_finished(&self) {
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle_since.store(now_ms(), Ordering::Relaxed);
            if self.more_fields.load(Ordering::Relaxed) {
                self.moving.notify_one();
            }
        }
    }

    /// A response handed to hyper, or a frame of it yielded: it waits on
    /// the client now.
    fn park(&self) {
        if self.parked.fetch_add(1, Ordering::Relaxed) == 0 {
            self.progress_at.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// Bytes went out: the client is taking what it is sent.
    fn wrote(&self, res: &Poll<std::io::Result<usize>>) {
        if let Poll::Ready(Ok(1..)) = res {
            self.progress_at.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// A parked response was polled again: the client took what it had.
    fn unpark(&self) {
        self.parked.fetch_sub(1, Ordering::Relaxed);
        self.progress_at.store(now_ms(), Ordering::Relaxed);
    }

    /// When the connection should be closed, and why, if nothing changes.
    /// `drain_at` is when this process started draining (0: it has not).
    /// A tick late rather than early: both ends of the wait are read from a
    /// clock that advances a tick at a time.
    fn deadline(&self, t: &Timeouts, drain_at: u64) -> Option<(u64, Expiry)> {
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
struct TrackedIo<T> {
    /// Always `Some` until dropped.
    inner: Option<T>,
    /// What was read to tell the HTTP version, for hyper to read first.
    prefix: Bytes,
    activity: Arc<Activity>,
    /// Plain TCP: hyper's `shutdown` is left to the lingering close.
    /// TLS must shut down: that sends its close_notify.
    plain: bool,
    /// The client closed its side (a read returned end of file).
    eof: bool,
    /// HTTP/1.x: the request heads hyper's parser cannot be told about.
    heads: Option<crate::wire::heads::Heads>,
    /// HTTP/2: the streams open, for the drain (`h2frames`).
    frames: Option<Box<crate::wire::h2frames::Frames>>,
    back: Option<tokio::sync::oneshot::Sender<Returned<T>>>,
}

/// What a connection's IO hands back when hyper is done with it: the IO,
/// whether the client closed its side, and the HTTP/1.x head filter (with
/// what it holds back, when the connection moves to a larger parser).
type Returned<T> = (T, bool, Option<crate::wire::heads::Heads>);

impl<T> Drop for TrackedIo<T> {
    fn drop(&mut self) {
        if let (Some(io), Some(back)) = (self.inner.take(), self.back.take()) {
            // No receiver: the connection upgraded, and the tunnel owned us.
            let _ = back.send((io, self.eof, self.heads.take()));
        }
    }
}

fn gone() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::NotConnected)
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
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
                std::task::ready!(Pin::new(inner).poll_read(cx, buf))?;
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
            if heads.wants_more_fields() && !this.activity.more_fields.swap(true, Ordering::Relaxed)
            {
                this.activity.moving.notify_one();
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
        // Moving to a larger parser: the connection goes on.
        if self.activity.more_fields.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
}

/// Serves HTTP on `io` until the connection ends, times out, or drains,
/// then closes it with a lingering close (unless the client closed first,
/// or stopped reading). `alpn_h2` is the version TLS agreed on; without one
/// (plain, or a TLS client that sent no ALPN) the client's first bytes tell.
#[allow(clippy::too_many_arguments)]
pub async fn serve_http<T: Socket>(
    mut io: T,
    alpn_h2: Option<bool>,
    peer: Peer,
    tls: Option<Arc<TlsInfo>>,
    spec: Arc<ListenerSpec>,
    stats: Arc<ThreadStats>,
    shared: Arc<Shared>,
    builder: Arc<Builders>,
) {
    let t = shared.timeouts;
    let now = now_ms();
    let (h2, prefix) = match alpn_h2 {
        Some(h2) => (h2, Bytes::new()),
        // The first request head must arrive within `timeouts.header`.
        None => match tokio::time::timeout(t.header, sniff(&mut io)).await {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                debug!(listener = %spec.ctx.name, "connection: {e}");
                return;
            }
            Err(_) => {
                debug!(listener = %spec.ctx.name, "closing connection: timed out");
                return linger(io, false, t.send).await;
            }
        },
    };
    let activity = Arc::new(Activity {
        in_flight: AtomicU32::new(0),
        idle_since: AtomicU64::new(now),
        // The first request head must arrive within `timeouts.header`.
        head_since: AtomicU64::new(now),
        h2,
        upgraded: AtomicBool::new(false),
        parked: AtomicU32::new(0),
        progress_at: AtomicU64::new(now),
        client_done: AtomicBool::new(false),
        requests: AtomicU64::new(0),
        refused_at: AtomicU64::new(0),
        refused_status: AtomicU32::new(0),
        more_fields: AtomicBool::new(false),
        moving: tokio::sync::Notify::new(),
        h2_quiet: AtomicBool::new(false),
        h2_quiet_at: AtomicU64::new(0),
        h2_last: AtomicU32::new(0),
        h2_quieted: tokio::sync::Notify::new(),
    });
    let _counted = spec.metrics.as_ref().map(|m| m.connection(h2));
    let svc = ConnService {
        peer,
        tls,
        spec: spec.clone(),
        stats,
        activity: activity.clone(),
    };
    let mut io = io;
    let mut prefix = prefix;
    // The filter asks for a larger parser only while there is one; the
    // last one answers 431 itself.
    let fields = match builder.h1_more {
        Some(_) => builder.h1_fields,
        None => usize::MAX,
    };
    let mut heads = (!h2).then(|| crate::wire::heads::Heads::new(fields));
    let mut h1 = &builder.h1;
    loop {
        let (back, mut returned) = tokio::sync::oneshot::channel();
        let tracked = TokioIo::new(TrackedIo {
            inner: Some(io),
            prefix,
            activity: activity.clone(),
            plain: !peer.tls,
            eof: false,
            heads: heads.take(),
            frames: h2.then(Box::default),
            back: Some(back),
        });
        let conn = if h2 {
            HttpConn::H2(builder.h2.serve_connection(tracked, svc.clone()))
        } else {
            HttpConn::H1(h1.serve_connection(tracked, svc.clone()).with_upgrades())
        };
        let end = drive(conn, &activity, &spec, &shared).await;
        // hyper's state is gone now, and it handed the IO back (unless an
        // upgrade took it: the tunnel closes it).
        let Ok((mut back, client_closed, filter)) = returned.try_recv() else {
            return;
        };
        if activity.more_fields.swap(false, Ordering::Relaxed) {
            if let (Some(more), Some(mut filter)) = (&builder.h1_more, filter) {
                // The same connection, on a parser that takes the request's
                // fields, from the head the filter held back.
                let (next, held) = filter.more_fields(usize::MAX);
                (io, prefix, heads, h1) = (back, held.freeze(), Some(next), more);
                continue;
            }
        }
        if end == Some(Expiry::GoAway) {
            let last = activity.h2_last.load(Ordering::Relaxed);
            let frame = crate::wire::h2frames::goaway(last);
            let sent = tokio::time::timeout(t.send, async {
                back.write_all(&frame).await?;
                back.flush().await
            })
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                return;
            }
        }
        let client_done = activity.client_done.load(Ordering::Relaxed);
        if end != Some(Expiry::Stalled) && !client_closed && !client_done {
            // An HTTP/2 client gets the long quiet wait, for frames it may
            // still send; not one idle since the drain's GOAWAY.
            let quiet = matches!(end, Some(Expiry::Drained | Expiry::GoAway));
            linger(back, h2 && !quiet, t.send).await;
        }
        return;
    }
}

/// How long an HTTP/2 connection must stay without an open stream before
/// the drain's GOAWAY goes out: a client that just got its last answer is
/// often starting its next request, and one that is mid-way (python-h2
/// between its HEADERS and its DATA) fails when it hears the GOAWAY.
const SETTLE: Duration = Duration::from_millis(1);

/// How long a draining HTTP/2 connection waits for a quiet moment that
/// lasts SETTLE; after it, the GOAWAY goes out at the next quiet moment of
/// any length. Short: a connection that keeps its generation draining is
/// cut when restarts in quick succession make `max_draining` stop it.
const QUIET_WAIT: Duration = Duration::from_millis(50);

/// A connection that has not been quiet at all for this long (many streams
/// at once, always one open) will not be: it drains in hyper's two steps
/// (GOAWAY, PING, GOAWAY), which conforming clients keep.
const QUIET_GAP: Duration = Duration::from_millis(50);

/// Runs hyper's connection until it ends (`None`) or a timer ends it.
async fn drive<T: Socket>(
    conn: HttpConn<T>,
    activity: &Activity,
    spec: &ListenerSpec,
    shared: &Shared,
) -> Option<Expiry> {
    let t = shared.timeouts;
    let h2 = activity.h2;
    tokio::pin!(conn);
    let drain = &shared.process.drain;
    let draining = drain.started();
    tokio::pin!(draining);
    // When the drain began (as `now_ms`), 0 until then.
    let mut drain_at = 0;
    // HTTP/2: hyper's own drain started (the connection was never quiet).
    let mut two_steps = false;
    // HTTP/2: QUIET_WAIT passed; the next quiet moment will do.
    let mut hurry = false;
    // HTTP/2, draining: no stream is open since a moment, and the last
    // stream then; the GOAWAY waits SETTLE more.
    let mut quiet_since: Option<u32> = None;
    let settle = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(settle);
    // The timer looks at least this often: what the connection is doing
    // changes without waking it (a head starts, a response parks), so a
    // deadline is never slept past by more than this.
    let period = t.header.min(t.idle).min(t.send);
    let timer = tokio::time::sleep(period);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            // The connection first: it is what wakes this task nearly always.
            biased;
            res = conn.as_mut() => {
                if let Err(e) = res {
                    debug!(listener = %spec.ctx.name, "connection: {e}");
                }
                return None;
            }
            _ = activity.moving.notified(), if !h2 => {
                // A request needs a larger parser: once nothing is in
                // flight, hyper closes the idle connection (the IO goes on).
                if activity.in_flight.load(Ordering::Relaxed) == 0 {
                    conn.as_mut().close_idle();
                }
            }
            _ = &mut draining, if drain_at == 0 => {
                drain_at = now_ms();
                // HTTP/2: one GOAWAY with the last stream's ID, once no stream
                // is open (now, or when the last one ends: `h2frames`); if
                // that moment does not come within QUIET_WAIT, hyper's two
                // steps (GOAWAY, PING, GOAWAY). HTTP/1.1: the next
                // response carries `Connection: close` (see ConnService), and
                // an idle connection is closed after `timeouts.draining_idle`
                // (the timer looks again now).
                if h2 && activity.h2_quiet.load(Ordering::Relaxed) {
                    quiet_since = Some(activity.h2_last.load(Ordering::Relaxed));
                    settle.as_mut().reset(tokio::time::Instant::now() + SETTLE);
                }
                timer.as_mut().reset(tokio::time::Instant::now());
            }
            _ = activity.h2_quieted.notified(), if h2 && drain_at != 0 && !two_steps => {
                if activity.h2_quiet.load(Ordering::Relaxed) {
                    if hurry {
                        return Some(Expiry::GoAway);
                    }
                    quiet_since = Some(activity.h2_last.load(Ordering::Relaxed));
                    settle.as_mut().reset(tokio::time::Instant::now() + SETTLE);
                }
            }
            _ = &mut settle, if quiet_since.is_some() => {
                // Quiet for SETTLE, and no stream opened meanwhile: the
                // client is between requests, not starting one.
                let last = quiet_since.take().unwrap_or_default();
                if activity.h2_quiet.load(Ordering::Relaxed)
                    && activity.h2_last.load(Ordering::Relaxed) == last
                {
                    return Some(Expiry::GoAway);
                }
            }
            _ = &mut timer => {
                let now = now_ms();
                let quiet_at = activity.h2_quiet_at.load(Ordering::Relaxed).max(drain_at);
                if h2 && drain_at != 0 && !two_steps {
                    if activity.h2_quiet.load(Ordering::Relaxed) {
                        if hurry || now >= drain_at + QUIET_WAIT.as_millis() as u64 {
                            return Some(Expiry::GoAway);
                        }
                    } else if now >= quiet_at + QUIET_GAP.as_millis() as u64 {
                        // Never quiet: the drain every conforming client keeps.
                        two_steps = true;
                        conn.as_mut().goaway();
                    } else if now >= drain_at + QUIET_WAIT.as_millis() as u64 {
                        hurry = true;
                    }
                }
                match activity.deadline(&t, drain_at) {
                    Some((d, why)) if d <= now => {
                        debug!(listener = %spec.ctx.name, ?why, "closing connection: timed out");
                        if h2 && why == Expiry::Idle {
                            conn.as_mut().goaway();
                            // Give the GOAWAY a moment; then drop.
                            let _ = tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await;
                        }
                        return Some(why);
                    }
                    Some((d, _)) => timer.as_mut().reset(tokio::time::Instant::now() + period.min(Duration::from_millis(d - now))),
                    None => timer.as_mut().reset(tokio::time::Instant::now() + period),
                }
                if h2 && drain_at != 0 && !two_steps {
                    // Look again when the wait for a quiet moment runs out.
                    let quiet_at = activity.h2_quiet_at.load(Ordering::Relaxed).max(drain_at);
                    let fallback = if hurry {
                        quiet_at + QUIET_GAP.as_millis() as u64
                    } else {
                        (drain_at + QUIET_WAIT.as_millis() as u64)
                            .min(quiet_at + QUIET_GAP.as_millis() as u64)
                    } + tick_ms();
                    let at = tokio::time::Instant::now() + Duration::from_millis(fallback.saturating_sub(now));
                    if at < timer.deadline() {
                        timer.as_mut().reset(at);
                    }
                }
            }
        }
    }
}

/// The per-connection hyper service: counts the request, tracks it for the
/// timeouts, and during a drain adds `Connection: close` to HTTP/1.x responses.
#[derive(Clone)]
struct ConnService {
    peer: Peer,
    /// The connection's TLS facts, when its listener has an access log.
    tls: Option<Arc<TlsInfo>>,
    spec: Arc<ListenerSpec>,
    stats: Arc<ThreadStats>,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<TrackedBody>;
    type Error = std::convert::Infallible;
    type Future = ResponseFuture;

    fn call(&self, mut req: Request<Incoming>) -> ResponseFuture {
        let version = req.version();
        self.stats.requests_total.fetch_add(1, Ordering::Relaxed);
        debug!(listener = %self.spec.ctx.name, method = %req.method(), path = req.uri().path(), "request started");
        let logged = (self.spec.access_log.is_some() || self.spec.metrics.is_some()).then(|| {
            Box::new(Logged {
                log: self.spec.access_log.clone(),
                spec: self.spec.clone(),
                remote: self.peer.addr,
                tls: self.tls.clone(),
                entry: Entry::of(&req, version),
                route: None,
            })
        });
        let finish = Finish {
            guard: InFlight::new(self.activity.clone(), self.stats.clone(), logged),
            version,
        };
        if version < Version::HTTP_2 {
            let done = asks_to_close(&req) && hyper::body::Body::is_end_stream(req.body());
            self.activity.client_done.store(done, Ordering::Relaxed);
            let a = &self.activity;
            if a.requests.fetch_add(1, Ordering::Relaxed) + 1
                == a.refused_at.load(Ordering::Relaxed)
            {
                // The head `heads` refused (an HTTP version other than 1.x,
                // a transfer coding other than chunked): nothing after it
                // was read, so the connection closes.
                let status =
                    http::StatusCode::from_u16(a.refused_status.load(Ordering::Relaxed) as u16)
                        .unwrap_or(http::StatusCode::BAD_REQUEST);
                debug!(listener = %self.spec.ctx.name, %status, "request refused");
                let msg = if status == http::StatusCode::NOT_IMPLEMENTED {
                    "transfer coding not implemented\n"
                } else {
                    "HTTP version not supported\n"
                };
                let mut res = crate::wire::body::text(status, msg);
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return ResponseFuture::Now(std::future::ready(Ok(finish.wrap(res, &self.spec))));
            }
        }
        if let Err(why) = check_host(&mut req) {
            debug!(listener = %self.spec.ctx.name, "bad request: {why}");
            let mut res = crate::wire::body::text(http::StatusCode::BAD_REQUEST, "bad request\n");
            if version < Version::HTTP_2 {
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return ResponseFuture::Now(std::future::ready(Ok(finish.wrap(res, &self.spec))));
        }
        let mut finish = finish;
        let mut route = None;
        let reply = self
            .spec
            .handler
            .call(req, &self.spec.ctx, self.peer, &mut route);
        if let Some(l) = &mut finish.guard.logged {
            l.route = route;
        }
        match reply {
            Reply::Now(res) => {
                ResponseFuture::Now(std::future::ready(Ok(finish.wrap(res, &self.spec))))
            }
            Reply::Later(fut) => ResponseFuture::Later(fut, Some((finish, self.spec.clone()))),
        }
    }
}

/// Does this HTTP/1.x request close its connection itself (`Connection:
/// close`, or HTTP/1.0 without `keep-alive`)?
fn asks_to_close<B>(req: &Request<B>) -> bool {
    let has = |token| crate::wire::body::has_token(req.headers(), header::CONNECTION, token);
    has("close") || (req.version() == Version::HTTP_10 && !has("keep-alive"))
}

/// The request's host, checked before anything uses it (RFC 9112 section
/// 3.2, RFC 9113 section 8.3.1): an HTTP/1.1 request has exactly one
/// `Host`, every host is a valid `host[:port]`, an absolute-form target's
/// authority wins over `Host` (which is set to it, so every later reader
/// sees one host), and an HTTP/2 `Host` agrees with `:authority`. Only a
/// host that passed here reaches a template, a header or a log line.
pub(crate) fn check_host<B>(req: &mut Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host");
    }
    if host.is_some_and(|h| !valid_host(h.as_bytes())) {
        return Err("invalid Host");
    }
    let authority = req.uri().authority().map(|a| a.as_str());
    if authority.is_some_and(|a| !valid_host(a.as_bytes())) {
        return Err("invalid authority");
    }
    match (req.version(), authority) {
        (Version::HTTP_2, Some(a))
            if host.is_some_and(|h| !h.as_bytes().eq_ignore_ascii_case(a.as_bytes())) =>
        {
            return Err("Host differs from :authority");
        }
        (Version::HTTP_2, _) => {}
        (_, Some(a)) => {
            // Valid above, so a valid header value.
            if let Ok(v) = HeaderValue::from_str(a) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        (Version::HTTP_11, None) if host.is_none() => return Err("no Host"),
        _ => {}
    }
    Ok(())
}

/// `host[:port]` as RFC 3986 has it: an IP literal in brackets, or a
/// reg-name (unreserved, sub-delims, percent-escapes); a port of digits.
fn valid_host(h: &[u8]) -> bool {
    let (host, port) = if h.first() == Some(&b'[') {
        let Some(end) = h.iter().position(|&b| b == b']') else {
            return false;
        };
        let inner = &h[1..end];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        match &h[end + 1..] {
            [] => (&h[..=end], None),
            [b':', port @ ..] => (&h[..=end], Some(port)),
            _ => return false,
        }
    } else {
        match h.iter().rposition(|&b| b == b':') {
            Some(i) => (&h[..i], Some(&h[i + 1..])),
            None => (h, None),
        }
    };
    if port.is_some_and(|p| p.len() > 5 || !p.iter().all(u8::is_ascii_digit)) {
        return false;
    }
    if host.first() == Some(&b'[') {
        return true;
    }
    let mut i = 0;
    while i < host.len() {
        let b = host[i];
        if b == b'%' {
            if !host
                .get(i + 1..i + 3)
                .is_some_and(|x| x.iter().all(u8::is_ascii_hexdigit))
            {
                return false;
            }
            i += 3;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b)) {
            return false;
        }
        i += 1;
    }
    !host.is_empty()
}

/// A response on its way: ready at once (no allocation), or awaited.
enum ResponseFuture {
    Now(std::future::Ready<Result<Response<TrackedBody>, std::convert::Infallible>>),
    Later(
        Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>>,
        Option<(Finish, Arc<ListenerSpec>)>,
    ),
}

impl std::future::Future for ResponseFuture {
    type Output = Result<Response<TrackedBody>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            ResponseFuture::Now(res) => Pin::new(res).poll(cx),
            ResponseFuture::Later(fut, finish) => {
                let res = std::task::ready!(fut.as_mut().poll(cx));
                match finish.take() {
                    Some((finish, spec)) => Poll::Ready(Ok(finish.wrap(res, &spec))),
                    // Polled again after it completed: it never completes again.
                    None => Poll::Pending,
                }
            }
        }
    }
}

/// What a response needs once the handler has made it.
struct Finish {
    guard: InFlight,
    /// The request's HTTP version.
    version: Version,
}

impl Finish {
    /// During a drain, an HTTP/1.x response closes its connection.
    fn wrap(mut self, mut res: Response<Body>, spec: &ListenerSpec) -> Response<TrackedBody> {
        if let Some(l) = &mut self.guard.logged {
            l.entry.status = res.status().as_u16();
        }
        if res.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            self.guard.activity.upgraded.store(true, Ordering::Relaxed);
        }
        if let Some(v) = &spec.alt_svc {
            res.headers_mut().insert(header::ALT_SVC, v.clone());
        }
        if self.version < Version::HTTP_2 && spec.ctx.process.drain.is_draining() {
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            if self.version == Version::HTTP_10 {
                // hyper reads the keep-alive of an HTTP/1.0 exchange from the
                // response's version: with 1.1 it appends `keep-alive` to our
                // `close` (`Connection: close, keep-alive`), and clients such
                // as ab keep the connection and lose their next request.
                *res.version_mut() = Version::HTTP_10;
            }
        }
        self.guard.activity.park();
        res.map(|body| TrackedBody {
            inner: body,
            parked: true,
            guard: self.guard,
        })
    }
}

/// A request counted as in flight until its response body is done, and
/// then logged, if its listener has an access log.
struct InFlight {
    activity: Arc<Activity>,
    stats: Arc<ThreadStats>,
    logged: Option<Box<Logged>>,
}

/// A request on its way to the access log and the metrics.
struct Logged {
    log: Option<Arc<AccessLog>>,
    /// The route that took it (for the metrics).
    route: Option<usize>,
    spec: Arc<ListenerSpec>,
    remote: SocketAddr,
    tls: Option<Arc<TlsInfo>>,
    entry: Entry,
}

impl InFlight {
    fn new(activity: Arc<Activity>, stats: Arc<ThreadStats>, logged: Option<Box<Logged>>) -> Self {
        activity.request_started();
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            activity,
            stats,
            logged,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.request_finished();
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(l) = self.logged.take() {
            if let Some(log) = &l.log {
                log.record(
                    self.stats.index,
                    &l.spec.ctx.name,
                    l.remote,
                    l.tls.as_deref(),
                    &l.entry,
                );
            }
            if let Some(m) = &l.spec.metrics {
                let e = &l.entry;
                m.record(
                    l.route,
                    e.status,
                    e.bytes,
                    e.started.elapsed().as_secs_f64(),
                );
            }
        }
    }
}

/// A response body, counted as in flight until it is done, and parked
/// (see `Activity::parked`) while it waits on the client.
pub struct TrackedBody {
    inner: Body,
    parked: bool,
    guard: InFlight,
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if self.parked {
            self.guard.activity.parked.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = crate::wire::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.parked {
            this.parked = false;
            this.guard.activity.unpark();
        }
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &res {
            this.parked = true;
            this.guard.activity.park();
            if let (Some(l), Some(data)) = (&mut this.guard.logged, frame.data_ref()) {
                l.entry.bytes += data.len() as u64;
            }
        }
        res
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_that_close_themselves() {
        let req = |v: Version, conn: Option<&str>| {
            let mut b = Request::builder().version(v);
            if let Some(c) = conn {
                b = b.header("connection", c);
            }
            b.body(()).unwrap()
        };
        assert!(asks_to_close(&req(Version::HTTP_11, Some("close"))));
        assert!(asks_to_close(&req(Version::HTTP_11, Some("foo, Close"))));
        assert!(!asks_to_close(&req(Version::HTTP_11, None)));
        assert!(!asks_to_close(&req(Version::HTTP_11, Some("keep-alive"))));
        assert!(asks_to_close(&req(Version::HTTP_10, None)));
        assert!(!asks_to_close(&req(Version::HTTP_10, Some("keep-alive"))));
    }

    #[test]
    fn hosts_are_checked() {
        for good in [
            "example.com",
            "example.com:8443",
            "127.0.0.1:80",
            "[::1]:8443",
            "[::1]",
            "a_b-c.example",
            "xn--bcher-kva.example",
        ] {
            assert!(valid_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            "a b",
            "a/b",
            "evil.example/phish?x=",
            "a:b",
            "user@host",
            "[::1",
            "[zz]",
            "[::1]x",
            "host:123456",
            "a\"b",
            "%zz",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
        let req = |v: Version, uri: &str, hosts: &[&str]| {
            let mut b = Request::builder().version(v).uri(uri);
            for h in hosts {
                b = b.header("host", *h);
            }
            b.body(()).unwrap()
        };
        assert!(check_host(&mut req(Version::HTTP_11, "/", &["a"])).is_ok());
        assert!(check_host(&mut req(Version::HTTP_11, "/", &[])).is_err());
        assert!(check_host(&mut req(Version::HTTP_11, "/", &["a", "b"])).is_err());
        assert!(check_host(&mut req(Version::HTTP_10, "/", &[])).is_ok());
        let mut abs = req(Version::HTTP_11, "http://a.example/p", &["b.example"]);
        assert!(check_host(&mut abs).is_ok());
        assert_eq!(
            abs.headers()["host"],
            "a.example",
            "the target's authority wins"
        );
        assert!(check_host(&mut req(Version::HTTP_2, "https://a/", &["a"])).is_ok());
        assert!(check_host(&mut req(Version::HTTP_2, "https://a/", &["b"])).is_err());
    }

    #[tokio::test]
    async fn the_first_bytes_tell_the_http_version() {
        use tokio::io::AsyncReadExt;
        let head = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        let (h2, read) = sniff(&mut &head[..]).await.unwrap().unwrap();
        assert!(!h2);
        assert_eq!(&read[..], &head[..], "one read, all of it kept for hyper");
        // The preface in pieces, then a frame: HTTP/2.
        let mut pieces = (&PREFACE[..5])
            .chain(&PREFACE[5..20])
            .chain(&PREFACE[20..])
            .chain(&b"\0\0\0\x04"[..]);
        let (h2, read) = sniff(&mut pieces).await.unwrap().unwrap();
        assert!(h2);
        assert_eq!(&read[..], &PREFACE[..]);
        // Diverging from the preface part way: HTTP/1.x.
        let (h2, _) = sniff(&mut (&b"PRI * "[..]).chain(&b"HTTP/1.1\r\n"[..]))
            .await
            .unwrap()
            .unwrap();
        assert!(!h2);
        assert!(
            sniff(&mut &b""[..]).await.unwrap().is_none(),
            "closed first"
        );
    }
}
