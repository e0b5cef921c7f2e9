//! One connection: TLS handshake, which HTTP version it speaks, hyper's
//! connection for it, and its drain. Beside it: what the connection is
//! doing, for its timeouts (`activity`), each request and response on it
//! (`exchange`), and how it ends (`linger`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tracing::debug;

use crate::http::service::Handler;
use crate::observe::access_log::{AccessLog, TlsInfo};
use crate::observe::logging::Chain;
use crate::process::context::{ListenerContext, Peer, Shared, ThreadStats};
use crate::tls::stream::TlsStream;

use super::activity::{now_ms, tick_ms, Activity, Expiry, TrackedIo, REST};
use super::exchange::ConnService;
use super::inline::Inline;
use super::linger::linger;

/// The largest request head accepted, HTTP/1.1 and HTTP/2 alike.
const MAX_HEAD: usize = 64 * 1024;

/// What every connection of one serving thread is served with: the
/// thread's counters, the settings all connections share, and the hyper
/// builders, made once per thread.
pub(crate) struct Thread {
    pub(crate) stats: Arc<ThreadStats>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) builders: Builders,
}

/// Everything a thread needs to serve one listener.
#[derive(Clone)]
pub(crate) struct ListenerSpec {
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) handler: Handler,
    pub(crate) ctx: Arc<ListenerContext>,
    /// Set by [`crate::serve::accept::start`]: accepted sockets get TCP_NODELAY from the listening
    /// socket, so no connection needs a `setsockopt` of its own.
    pub(crate) nodelay_inherited: bool,
    /// Where this listener's requests are logged, if anywhere.
    pub(crate) access_log: Option<Arc<AccessLog>>,
    /// What this listener counts, when the config serves `metrics: {}`.
    pub(crate) metrics: Option<Arc<crate::observe::metrics::ListenerMetrics>>,
    /// `Alt-Svc` advertising the listener's HTTP/3 (`h3=":PORT"; ma=86400`).
    pub(crate) alt_svc: Option<HeaderValue>,
}

/// hyper's connection builders, one per HTTP version (one set per thread).
pub(crate) struct Builders {
    h1: http1::Builder,
    /// For a connection whose request has more header fields than `h1`
    /// parses on its stack (see `heads::STACK_FIELDS`): up to `max_headers`.
    h1_more: Option<http1::Builder>,
    /// The fields `h1` takes.
    h1_fields: usize,
    h2: http2::Builder<Inline>,
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
    pub(crate) fn new(max_headers: usize) -> Builders {
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
        let mut h2 = http2::Builder::new(Inline);
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

/// A connection's transport: plain TCP, TLS over it, or (a request a
/// draining generation hands on, see `forward`) a Unix socket. The
/// lingering close and the rest read the socket underneath, and the
/// linger asks it what is still unacknowledged.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Raw: RawSocket;
    fn raw(&self) -> &Self::Raw;
    /// The connection rests: buffers that hold nothing are freed.
    fn release_buffers(&mut self) {}
}

/// The socket under a connection's transport.
pub(crate) trait RawSocket: std::os::fd::AsRawFd + Sync {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize>;

    /// Resolves when the socket is readable. Through the socket's one
    /// reader waker rather than `readable()`, whose future (152 bytes, a
    /// waiter in the socket's list) every resting connection would carry;
    /// nothing else reads a socket while this waits.
    fn read_ready(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        std::future::poll_fn(|cx| self.poll_read_ready(cx))
    }
}

impl RawSocket for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        TcpStream::try_read(self, buf)
    }
}

impl RawSocket for UnixStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        UnixStream::poll_read_ready(self, cx)
    }
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        UnixStream::try_read(self, buf)
    }
}

impl Socket for TcpStream {
    type Raw = TcpStream;
    fn raw(&self) -> &TcpStream {
        self
    }
}

impl Socket for UnixStream {
    type Raw = UnixStream;
    fn raw(&self) -> &UnixStream {
        self
    }
}

/// A TLS connection is served boxed: the connection's futures move and
/// keep its IO in several places (the first read, hyper, the rest, the
/// lingering close), and a pointer there costs 8 bytes where rustls's
/// state costs kilobytes in each.
impl Socket for Box<TlsStream> {
    type Raw = TcpStream;
    fn raw(&self) -> &TcpStream {
        self.get_ref()
    }
    fn release_buffers(&mut self) {
        TlsStream::release_buffers(self)
    }
}

/// One connection's hyper state, HTTP/1.x (with upgrades) or HTTP/2.
/// Variants of unequal size are fine: it lives in the connection's boxed
/// future, never moved after it is made.
#[allow(clippy::large_enum_variant)]
enum HttpConn<T: Socket> {
    H1(http1::UpgradeableConnection<TokioIo<TrackedIo<T>>, ConnService>),
    H2(http2::Connection<TokioIo<TrackedIo<T>>, ConnService, Inline>),
}

impl<T: Socket> HttpConn<T> {
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

impl<T: Socket> std::future::Future for HttpConn<T> {
    type Output = Result<(), hyper::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            HttpConn::H1(c) => Pin::new(c).poll(cx),
            // The streams hyper hands over run once it returns (`inline`).
            HttpConn::H2(c) => super::inline::poll_with(|| Pin::new(&mut *c).poll(cx)),
        }
    }
}

/// The TLS handshake (within `timeouts.handshake`), then HTTP.
pub(crate) async fn serve_tls(
    config: Arc<rustls::ServerConfig>,
    stream: TcpStream,
    peer: SocketAddr,
    spec: Arc<ListenerSpec>,
    thread: Arc<Thread>,
) {
    // Boxed: the handshake's state is not carried for the connection's
    // life. The stream it yields is boxed inside it: held inline, its slot
    // (rustls's state, 2.5 KB) stayed in this future while it served.
    let handshake = Box::pin(async {
        let keep_sni = spec.access_log.is_some();
        let accept = TlsStream::accept(stream, config, keep_sni);
        let tls = tokio::time::timeout(thread.shared.timeouts.handshake, accept);
        tls.await.map(|tls| tls.map(Box::new))
    })
    .await;
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
            let session = &tls;
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
            serve_http(tls, alpn_h2, peer, info, spec, thread, false).await
        }
        Ok(Err(e)) => {
            debug!(listener = %spec.ctx.name, %peer, "TLS handshake failed: {e}", e = Chain(&e))
        }
        Err(_) => debug!(listener = %spec.ctx.name, %peer, "TLS handshake timed out"),
    }
}

/// An HTTP/2 connection a draining generation hands on (see `forward`),
/// served as a connection of `peer` on `spec`'s listener.
pub(crate) async fn serve_forwarded(
    io: UnixStream,
    peer: Peer,
    tls: Option<Arc<TlsInfo>>,
    spec: Arc<ListenerSpec>,
    thread: Arc<Thread>,
) {
    Box::pin(serve_http(io, Some(true), peer, tls, spec, thread, true)).await
}

/// Serves HTTP on `io` until the connection ends, times out, or drains,
/// then closes it with a lingering close (unless the client closed first,
/// or stopped reading). `alpn_h2` is the version TLS agreed on; without one
/// (plain, or a TLS client that sent no ALPN) the client's first bytes tell.
/// `forwarded`: handed on by a draining generation.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_http<T: Socket>(
    mut io: T,
    alpn_h2: Option<bool>,
    peer: Peer,
    tls: Option<Arc<TlsInfo>>,
    spec: Arc<ListenerSpec>,
    thread: Arc<Thread>,
    forwarded: bool,
) {
    let (shared, builder) = (&thread.shared, &thread.builders);
    // By reference: the connection's future carries what is live across
    // its waits, and a copy would cost 80 bytes in every resting one.
    let t = &shared.timeouts;
    let now = now_ms();
    let (h2, prefix) = match alpn_h2 {
        Some(h2) => (h2, Bytes::new()),
        // The first request head must arrive within `timeouts.header`.
        None => match Box::pin(tokio::time::timeout(t.header, sniff(&mut io))).await {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                debug!(listener = %spec.ctx.name, "connection: {e}", e = Chain(&e));
                return;
            }
            Err(_) => {
                debug!(listener = %spec.ctx.name, "closing connection: timed out");
                return Box::pin(linger(io, false, t.send)).await;
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
        resting: AtomicBool::new(false),
        signal: tokio::sync::Notify::new(),
        h2_quiet: AtomicBool::new(false),
        h2_quiet_at: AtomicU64::new(0),
        h2_last: AtomicU32::new(0),
        forwarded,
        forwarding: AtomicBool::new(false),
        forward: std::sync::OnceLock::new(),
    });
    let _counted = spec.metrics.as_ref().map(|m| m.connection(h2));
    let svc = ConnService {
        peer,
        tls,
        spec,
        stats: thread.stats.clone(),
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
            plain: !svc.peer.tls,
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
        // Boxed: while the connection rests, the task holds none of it.
        let mut end = Box::pin(drive(conn, &activity, &svc.spec, shared)).await;
        // hyper's state is gone now, and it handed the IO back (unless an
        // upgrade took it: the tunnel closes it).
        // Into the same locals as before (not new ones): the future keeps
        // one IO and one filter across the rest, not two of each.
        let client_closed;
        (io, client_closed, heads) = match returned.try_recv() {
            Ok(back) => back,
            Err(_) => return,
        };
        drop(returned);
        prefix = Bytes::new();
        if activity.resting.swap(false, Ordering::Relaxed) && !client_closed {
            io.release_buffers();
            match Box::pin(rest(&io, &activity, shared)).await {
                // The client sent again: a new hyper, from where the filter is.
                None => continue,
                why => end = why,
            }
        }
        if activity.more_fields.swap(false, Ordering::Relaxed) {
            if let (Some(more), Some(mut filter)) = (&builder.h1_more, heads.take()) {
                // The same connection, on a parser that takes the request's
                // fields, from the head the filter held back.
                let (next, held) = filter.more_fields(usize::MAX);
                (prefix, heads, h1) = (held.freeze(), Some(next), more);
                continue;
            }
        }
        let mut back = io;
        if end == Some(Expiry::GoAway) {
            debug!(listener = %svc.spec.ctx.name, forwarded = activity.forwarded, "draining: quiet, one GOAWAY");
            let last = activity.h2_last.load(Ordering::Relaxed);
            let frame = crate::wire::h2frames::goaway(last);
            let sent = Box::pin(tokio::time::timeout(t.send, async {
                back.write_all(&frame).await?;
                back.flush().await
            }))
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
            // Boxed, as hyper's part: what only the end of a connection
            // needs (a read buffer) is not carried while it rests.
            Box::pin(linger(back, h2 && !quiet, t.send)).await;
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

/// HTTP/2, draining: if no stream is open now, the GOAWAY is due once none
/// has opened for `wait` (`settle` fires then); returns the last stream
/// now, for that check.
fn settle_if_quiet(
    activity: &Activity,
    settle: Pin<&mut tokio::time::Sleep>,
    wait: Duration,
) -> Option<u32> {
    if !activity.h2_quiet.load(Ordering::Relaxed) {
        return None;
    }
    settle.reset(tokio::time::Instant::now() + wait);
    Some(activity.h2_last.load(Ordering::Relaxed))
}

/// An HTTP/1.x connection at rest: waits, holding only the socket (no
/// hyper, no buffers), until the client sends again (`None`), or the
/// connection's idle deadline (or, once the process drains,
/// `draining_idle`) ends it.
async fn rest<T: Socket>(io: &T, activity: &Activity, shared: &Shared) -> Option<Expiry> {
    let t = &shared.timeouts;
    let draining = shared.process.drain.started();
    tokio::pin!(draining);
    let mut drain_at = 0;
    loop {
        let (at, why) = activity.deadline(t, drain_at)?;
        let wait = Duration::from_millis(at.saturating_sub(now_ms()));
        tokio::select! {
            biased;
            ready = io.raw().read_ready() => return ready.err().map(|_| Expiry::Idle),
            _ = &mut draining, if drain_at == 0 => drain_at = now_ms(),
            _ = tokio::time::sleep(wait) => return Some(why),
        }
    }
}

/// Runs hyper's connection until it ends (`None`) or a timer ends it.
async fn drive<T: Socket>(
    conn: HttpConn<T>,
    activity: &Activity,
    spec: &ListenerSpec,
    shared: &Shared,
) -> Option<Expiry> {
    let t = &shared.timeouts;
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
    // HTTP/2, draining with a forward socket: requests go on to the newest
    // generation (`forward`), and the GOAWAY waits for the client to be
    // quiet for `quiet_for`, until `forward_for` has passed.
    let mut patient = false;
    // HTTP/2, draining: since when the GOAWAY waits for SETTLE of quiet.
    let mut wait_from = 0;
    let quiet_for = super::forward::QUIET.min(t.draining_idle);
    let forward_for = shared.forward_for.as_millis() as u64;
    // HTTP/2, draining: no stream is open since a moment, and the last
    // stream then; the GOAWAY waits SETTLE more.
    let mut quiet_since: Option<u32> = None;
    let settle = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(settle);
    // HTTP/2, draining: told to finish now (`Sig::Finish`); made when the
    // drain starts, so a connection pays for it only then.
    let mut finishing = None;
    // The timer looks at least this often: what the connection is doing
    // changes without waking it (a head starts, a response parks), so a
    // deadline is never slept past by more than this.
    let mut period = t.header.min(t.idle).min(t.send);
    if !h2 {
        period = period.min(REST);
    }
    let timer = tokio::time::sleep(period);
    tokio::pin!(timer);
    // HTTP/1.x: hyper was told to close once idle, for a larger parser.
    let mut moving = false;
    loop {
        // The connection first: it is what wakes this task nearly always.
        let serving = std::future::poll_fn(|cx| loop {
            let res = std::future::Future::poll(conn.as_mut(), cx);
            if res.is_ready() || h2 || moving {
                return res;
            }
            // A request needs a larger parser (the head filter said so
            // while hyper read): once nothing is in flight, hyper closes
            // the idle connection, and the IO goes on.
            if activity.more_fields.load(Ordering::Relaxed)
                && activity.in_flight.load(Ordering::Relaxed) == 0
            {
                moving = true;
                conn.as_mut().close_idle();
                continue;
            }
            return res;
        });
        tokio::select! {
            biased;
            res = serving => {
                if let Err(e) = res {
                    debug!(listener = %spec.ctx.name, "connection: {}", crate::observe::logging::causes(&e));
                }
                return None;
            }
            _ = &mut draining, if drain_at == 0 => {
                drain_at = now_ms();
                // HTTP/2: one GOAWAY with the last stream's ID, once no stream
                // is open and none started for `quiet_for` (`h2frames`);
                // meanwhile new requests go on to the newest generation
                // (`forward`). After `forward_for` (or at once, without a
                // forward socket): the GOAWAY once no stream is open for
                // SETTLE, and hyper's two steps (GOAWAY, PING, GOAWAY) if
                // that moment does not come within QUIET_WAIT. HTTP/1.1:
                // the next response carries `Connection: close` (see
                // ConnService), and an idle connection is closed after
                // `timeouts.draining_idle` (the timer looks again now).
                if h2 {
                    finishing = Some(drain.finishing());
                    // A connection handed on by an older generation is not
                    // handed on again: its client moves to the newest
                    // generation by itself (see `forward`).
                    patient = spec.ctx.process.forward.is_some();
                    activity.forwarding.store(patient && !activity.forwarded, Ordering::Relaxed);
                    wait_from = drain_at;
                    let wait = if patient { quiet_for } else { SETTLE };
                    if let Some(last) = settle_if_quiet(activity, settle.as_mut(), wait) {
                        quiet_since = Some(last);
                    }
                }
                timer.as_mut().reset(tokio::time::Instant::now());
            }
            _ = async { finishing.as_mut().expect("guarded by the if").await }, if finishing.is_some() && !two_steps => {
                // An older generation stopped for `max_draining`: the drain
                // every conforming client keeps, at once.
                debug!(listener = %spec.ctx.name, "told to finish: GOAWAY in two steps");
                two_steps = true;
                patient = false;
                conn.as_mut().goaway();
            }
            _ = activity.signal.notified(), if h2 && drain_at != 0 && !two_steps => {
                if hurry && activity.h2_quiet.load(Ordering::Relaxed) {
                    return Some(Expiry::GoAway);
                }
                let wait = if patient { quiet_for } else { SETTLE };
                if let Some(last) = settle_if_quiet(activity, settle.as_mut(), wait) {
                    quiet_since = Some(last);
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
                if drain_at == 0 && !activity.resting.load(Ordering::Relaxed) && activity.can_rest(now) {
                    // hyper ends at once (it is idle) and hands the IO back.
                    activity.resting.store(true, Ordering::Relaxed);
                    conn.as_mut().close_idle();
                    continue;
                }
                if patient && now >= drain_at + forward_for {
                    // Never quiet for long: the GOAWAY at the next quiet
                    // moment, while there is time for a drain.
                    debug!(listener = %spec.ctx.name, "draining: never quiet for long, GOAWAY at the next quiet moment");
                    patient = false;
                    wait_from = now;
                    if let Some(last) = settle_if_quiet(activity, settle.as_mut(), SETTLE) {
                        quiet_since = Some(last);
                    }
                }
                let quiet_at = activity.h2_quiet_at.load(Ordering::Relaxed).max(wait_from);
                if h2 && drain_at != 0 && !two_steps && !patient {
                    if activity.h2_quiet.load(Ordering::Relaxed) {
                        if hurry || now >= wait_from + QUIET_WAIT.as_millis() as u64 {
                            return Some(Expiry::GoAway);
                        }
                    } else if now >= quiet_at + QUIET_GAP.as_millis() as u64 {
                        // Never quiet: the drain every conforming client keeps.
                        two_steps = true;
                        conn.as_mut().goaway();
                    } else if now >= wait_from + QUIET_WAIT.as_millis() as u64 {
                        hurry = true;
                    }
                }
                match activity.deadline(t, drain_at) {
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
                if patient {
                    let at = tokio::time::Instant::now()
                        + Duration::from_millis((drain_at + forward_for + tick_ms()).saturating_sub(now));
                    if at < timer.deadline() {
                        timer.as_mut().reset(at);
                    }
                } else if h2 && drain_at != 0 && !two_steps {
                    // Look again when the wait for a quiet moment runs out.
                    let quiet_at = activity.h2_quiet_at.load(Ordering::Relaxed).max(wait_from);
                    let fallback = if hurry {
                        quiet_at + QUIET_GAP.as_millis() as u64
                    } else {
                        (wait_from + QUIET_WAIT.as_millis() as u64)
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

#[cfg(test)]
mod tests {
    use super::*;

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
