//! HTTP/3 (RFC 9114, QUIC v1) on the listeners with `http3: true`: the
//! listener's routes, certificates and SNI, on a UDP socket at its address.
//!
//! Each generation runs one QUIC endpoint per such listener on a thread of
//! its own. Only the newest generation reads the shared UDP socket and
//! passes older generations' datagrams on to them (`socket`), recognised
//! by the connection IDs they issued (`cid`); so a restart breaks no QUIC
//! connection. A draining generation sends HTTP/3 GOAWAY, lets its
//! requests finish, and closes each connection once it is idle (or the
//! client closes it), as HTTP/1.1 connections are closed after
//! `timeouts.draining_idle`.

mod cid;
mod fields;
mod socket;

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{header, HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use tracing::debug;

use crate::http::service::Handler;
use crate::observe::access_log::{Entry, TlsInfo};
use crate::process::context::{ListenerContext, Peer, QuicStats, Shared};
use crate::wire::body::{text, BoxError, IncomingBody, Reply, RequestBody};

/// Requests a client may have open at once on a connection.
const MAX_STREAMS: u32 = 100;
/// Handshakes in progress beyond which a client must first prove its
/// address with a Retry (RFC 9000 section 8.1.2): a flood of spoofed
/// Initials then costs one stateless packet each.
const RETRY_ABOVE: u64 = 64;
/// The largest request head (QPACK-decoded field section).
const MAX_HEAD: u64 = 64 * 1024;

/// One listener's HTTP/3, before it serves.
pub(crate) struct QuicListener {
    pub(crate) socket: std::net::UdpSocket,
    pub(crate) tls: Arc<rustls::ServerConfig>,
    pub(crate) handler: Handler,
    pub(crate) ctx: Arc<ListenerContext>,
    pub(crate) stats: Arc<QuicStats>,
    /// Where the listener's requests are logged and counted, as over TCP.
    pub(crate) access_log: Option<Arc<crate::observe::access_log::AccessLog>>,
    pub(crate) metrics: Option<Arc<crate::observe::metrics::ListenerMetrics>>,
}

/// `Alt-Svc` for a listener on `port`.
pub(crate) fn alt_svc(port: u16) -> HeaderValue {
    HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400"))
        .unwrap_or_else(|_| HeaderValue::from_static("clear"))
}

/// This generation's HTTP/3 endpoints, started but not reading yet.
pub(crate) struct Http3 {
    runtime: tokio::runtime::Handle,
    sockets: Vec<(String, Arc<socket::Socket>)>,
    shared: Arc<Shared>,
}

/// Starts an endpoint per listener on a thread of its own. They answer
/// nothing until [`Http3::take_over`]: before `READY` the previous
/// generation still reads the sockets.
///
/// The key of the connection IDs, the stateless reset key and the key of
/// address validation tokens (Retry, NEW_TOKEN) derive from the service's
/// secret (`tickets`): the same in every generation, so each accepts the
/// others'.
pub(crate) fn start(
    listeners: Vec<QuicListener>,
    shared: Arc<Shared>,
    tickets: &crate::tls::tickets::Tickets,
    span: tracing::Span,
) -> Result<Option<Http3>, String> {
    if listeners.is_empty() {
        return Ok(None);
    }
    let cid_secret = tickets.derive(b"gracesrv quic cid");
    let mut cid_key = [0u8; 16];
    cid_key.copy_from_slice(&cid_secret[..16]);
    let key = Arc::new(cid::Key::new(&cid_key)?);
    let reset = Arc::new(aws_lc_rs::hmac::Key::new(
        aws_lc_rs::hmac::HMAC_SHA256,
        &tickets.derive(b"gracesrv quic stateless reset"),
    ));
    let token: Arc<dyn quinn::crypto::HandshakeTokenKey> = Arc::new(
        aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, &[])
            .extract(&tickets.derive(b"gracesrv quic address token")),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let shared2 = shared.clone();
    std::thread::Builder::new()
        .name("gracesrv-h3".into())
        .spawn(move || {
            let _enter = span.enter();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(format!("HTTP/3 runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let mut sockets = Vec::new();
                for l in listeners {
                    let name = l.ctx.name.clone();
                    match endpoint(l, &key, &reset, &token, &shared2) {
                        Ok(s) => sockets.push((name, s)),
                        Err(e) => {
                            let _ = tx.send(Err(format!("listener {name}: HTTP/3: {e}")));
                            return;
                        }
                    }
                }
                let _ = tx.send(Ok((tokio::runtime::Handle::current(), sockets)));
                std::future::pending::<()>().await;
            });
        })
        .map_err(|e| format!("cannot start the HTTP/3 thread: {e}"))?;
    let (runtime, sockets) = rx
        .recv()
        .map_err(|_| "the HTTP/3 thread died at start".to_string())??;
    Ok(Some(Http3 {
        runtime,
        sockets,
        shared,
    }))
}

impl Http3 {
    /// This generation is ready: it becomes the one reading the UDP
    /// sockets (see `socket`).
    pub(crate) fn take_over(self) {
        for (name, s) in self.sockets {
            let drain = self.shared.process.drain.clone();
            self.runtime.spawn(s.keep(drain, name));
        }
    }
}

fn endpoint(
    l: QuicListener,
    key: &Arc<cid::Key>,
    reset: &Arc<aws_lc_rs::hmac::Key>,
    token: &Arc<dyn quinn::crypto::HandshakeTokenKey>,
    shared: &Arc<Shared>,
) -> Result<Arc<socket::Socket>, String> {
    let mut tls = (*l.tls).clone();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| format!("TLS for QUIC: {e}"))?;
    let t = shared.timeouts;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(t.idle.try_into().ok())
        .max_concurrent_bidi_streams(MAX_STREAMS.into())
        // A client opens 3 (control and QPACK); a little room for more.
        .max_concurrent_uni_streams(8u32.into());
    let mut server = quinn::ServerConfig::new(Arc::new(crypto), token.clone());
    server.transport_config(Arc::new(transport));
    let mut config = quinn::EndpointConfig::new(reset.clone());
    let pid = std::process::id();
    let k = key.clone();
    config.cid_generator(move || {
        Box::new(cid::Generator {
            key: k.clone(),
            pid,
        })
    });
    let socket = Arc::new(
        socket::Socket::new(l.socket, key.clone(), l.stats.clone())
            .map_err(|e| format!("UDP socket: {e}"))?,
    );
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        config,
        Some(server),
        socket.clone(),
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| e.to_string())?;
    let spec = Arc::new(Spec {
        handler: l.handler,
        ctx: l.ctx,
        stats: l.stats,
        shared: shared.clone(),
        handshaking: Default::default(),
        access_log: l.access_log,
        metrics: l.metrics,
    });
    tokio::spawn(accept(endpoint, spec));
    Ok(socket)
}

/// What a listener's connections share.
struct Spec {
    handler: Handler,
    ctx: Arc<ListenerContext>,
    stats: Arc<QuicStats>,
    shared: Arc<Shared>,
    /// Handshakes under way.
    handshaking: std::sync::atomic::AtomicU64,
    access_log: Option<Arc<crate::observe::access_log::AccessLog>>,
    metrics: Option<Arc<crate::observe::metrics::ListenerMetrics>>,
}

async fn accept(endpoint: quinn::Endpoint, spec: Arc<Spec>) {
    while let Some(incoming) = endpoint.accept().await {
        if !incoming.remote_address_validated()
            && incoming.may_retry()
            && spec.handshaking.load(Ordering::Relaxed) >= RETRY_ABOVE
        {
            spec.stats.retries_total.fetch_add(1, Ordering::Relaxed);
            let _ = incoming.retry();
            continue;
        }
        // `max_connections` counts QUIC connections too. A client cannot
        // wait in a queue here: it is refused, and tries again.
        let Ok(permit) = spec.shared.limit.clone().try_acquire_owned() else {
            debug!(listener = %spec.ctx.name, "max_connections reached: HTTP/3 connection refused");
            spec.stats.refused_total.fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        };
        let guard = spec.shared.process.drain.connection();
        let spec = spec.clone();
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            connection(incoming, &spec, &endpoint).await;
            drop(guard);
            drop(permit);
        });
    }
}

/// A count held while it is alive.
struct Held<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> Held<'a> {
    fn new(n: &'a std::sync::atomic::AtomicU64) -> Held<'a> {
        n.fetch_add(1, Ordering::Relaxed);
        Held(n)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(incoming: quinn::Incoming, spec: &Arc<Spec>, endpoint: &quinn::Endpoint) {
    let t = spec.shared.timeouts;
    let handshaking = Held::new(&spec.handshaking);
    let handshake = async {
        let connecting = incoming.accept().map_err(|e| e.to_string())?;
        match tokio::time::timeout(t.handshake, connecting).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("handshake timed out".to_string()),
        }
    };
    let conn = handshake.await;
    drop(handshaking);
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            debug!(listener = %spec.ctx.name, "HTTP/3 handshake: {e}");
            return;
        }
    };
    let _open = Held::new(&spec.stats.connections);
    let peer = Peer {
        addr: conn.remote_address(),
        tls: true,
    };
    // For the access log: QUIC is always TLS 1.3, and the client's SNI.
    let tls = spec.access_log.as_ref().map(|_| {
        let sni = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.server_name)
            .map(String::into_boxed_str);
        Arc::new(TlsInfo {
            version: "TLSv1.3",
            sni,
        })
    });
    let h3 = h3::server::builder()
        .max_field_section_size(MAX_HEAD)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn.clone()))
        .await;
    let mut h3 = match h3 {
        Ok(h) => h,
        Err(e) => {
            debug!(listener = %spec.ctx.name, "HTTP/3 connection: {e}");
            return;
        }
    };
    let drain = &spec.shared.process.drain;
    let draining = drain.started();
    tokio::pin!(draining);
    let mut cut = drain.tunnel_cut();
    let in_flight = Arc::new(InFlight::default());
    // 0: serving; 3: draining, waiting for a quiet moment (no request in
    // flight, none started for QUIET): then one GOAWAY, and the connection
    // closes. If none comes within QUIET_WAIT, the two steps of RFC 9114
    // section 5.2: 1: a first GOAWAY (with the largest stream ID: open no
    // more) sent; 2: the real one, two round trips later (so requests the
    // client sent before it heard the first are not refused).
    //
    // Why wait: the connection can stay with this generation (the new one
    // passes its datagrams on), and Chromium fails the requests it has
    // queued on a connection when a GOAWAY arrives, without sending them
    // and without retrying (21 to 34 of 600 sub-resources, HUP every 0.3 s).
    // Between two bursts of requests it has none queued.
    let mut phase = 0;
    let step = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(step);
    let mut last_started = tokio::time::Instant::now();
    // The last request stream taken, and once the final GOAWAY is out, the
    // ID it names: streams from there on are refused unprocessed (h3 0.0.8
    // serves the stream the ID names, which RFC 9114 section 5.2 says was
    // not processed; its GOAWAY IDs are right).
    let mut last_id: Option<u64> = None;
    let mut refuse_from = u64::MAX;
    let mut wait_until = tokio::time::Instant::now();
    let code = quinn::VarInt::from_u32(0x100); // H3_NO_ERROR
    loop {
        tokio::select! {
            _ = &mut draining, if phase == 0 => {
                phase = 3;
                wait_until = tokio::time::Instant::now() + QUIET_WAIT;
                step.as_mut().reset((last_started + QUIET).min(wait_until));
            }
            _ = &mut step, if phase == 1 || phase == 3 => {
                if phase == 1 {
                    phase = 2;
                    refuse_from = last_id.map_or(0, |id| id + 4);
                    if let Err(e) = h3.shutdown(1).await {
                        debug!(listener = %spec.ctx.name, "HTTP/3 GOAWAY: {e}");
                        break;
                    }
                    if in_flight.count.load(Ordering::Acquire) == 0 {
                        break;
                    }
                    continue;
                }
                let now = tokio::time::Instant::now();
                let quiet = in_flight.count.load(Ordering::Acquire) == 0 && now >= last_started + QUIET;
                if quiet {
                    // One GOAWAY naming the stream after the last one taken.
                    refuse_from = last_id.map_or(0, |id| id + 4);
                    if let Err(e) = h3.shutdown(1).await {
                        debug!(listener = %spec.ctx.name, "HTTP/3 GOAWAY: {e}");
                    }
                    break;
                }
                if now >= wait_until {
                    phase = 1;
                    if let Err(e) = h3.shutdown(usize::MAX >> 8).await {
                        debug!(listener = %spec.ctx.name, "HTTP/3 GOAWAY: {e}");
                        break;
                    }
                    let rtt = conn.rtt();
                    step.as_mut().reset(now + 2 * rtt + Duration::from_millis(10));
                } else {
                    let next = if in_flight.count.load(Ordering::Acquire) == 0 {
                        last_started + QUIET
                    } else {
                        now + Duration::from_millis(5)
                    };
                    step.as_mut().reset(next.min(wait_until));
                }
            }
            _ = in_flight.idle.notified(), if phase == 2 => {
                if in_flight.count.load(Ordering::Acquire) == 0 {
                    break;
                }
            }
            _ = cut.changed() => {
                conn.close(code, b"shutting down");
                return;
            }
            accepted = h3.accept() => match accepted {
                Ok(Some(mut resolver)) => {
                    let id = resolver.frame_stream.id().into_inner();
                    if id >= refuse_from {
                        refuse(&mut resolver);
                        continue;
                    }
                    last_id = Some(id);
                    last_started = tokio::time::Instant::now();
                    spec.stats.requests_total.fetch_add(1, Ordering::Relaxed);
                    in_flight.count.fetch_add(1, Ordering::AcqRel);
                    let (spec, in_flight, tls) = (spec.clone(), in_flight.clone(), tls.clone());
                    tokio::spawn(async move {
                        request(resolver, &spec, peer, tls.as_deref()).await;
                        if in_flight.count.fetch_sub(1, Ordering::AcqRel) == 1 {
                            in_flight.idle.notify_one();
                        }
                    });
                }
                // The client's GOAWAY, and every request done.
                Ok(None) => break,
                Err(e) => {
                    debug!(listener = %spec.ctx.name, "HTTP/3 connection: {e}");
                    return;
                }
            }
        }
    }
    // Every request is answered, but maybe not yet acknowledged, and a
    // CONNECTION_CLOSE makes the client drop what it has not read: close
    // once the client closes, or after draining_idle.
    let wait = async {
        while in_flight.count.load(Ordering::Acquire) > 0 {
            in_flight.idle.notified().await;
        }
        // Streams below the GOAWAY's ID that arrive late are served; those
        // the client opened from it on before it heard the GOAWAY are
        // refused (H3_REQUEST_REJECTED: by h3 past the ID, by `refuse` at
        // it); until the client closes (`accept` fails then).
        loop {
            match h3.accept().await {
                Ok(Some(mut resolver))
                    if resolver.frame_stream.id().into_inner() >= refuse_from =>
                {
                    refuse(&mut resolver)
                }
                Ok(Some(resolver)) => request(resolver, spec, peer, tls.as_deref()).await,
                Ok(None) => {}
                Err(_) => break,
            }
        }
    };
    let _ = tokio::time::timeout(t.draining_idle, wait).await;
    conn.close(code, b"");
    // Let the endpoint send the CONNECTION_CLOSE before the process may exit.
    let _ = tokio::time::timeout(Duration::from_millis(100), endpoint.wait_idle()).await;
}

/// A draining QUIC connection is quiet once no request is in flight and
/// none has started for this long (see `connection`).
const QUIET: Duration = Duration::from_millis(300);
/// How long a draining QUIC connection waits for a quiet moment before it
/// drains in two steps; below `max_draining` generations' lifetime under
/// restarts in quick succession.
const QUIET_WAIT: Duration = Duration::from_millis(600);

/// A connection's requests in flight, and a signal when none is left.
#[derive(Default)]
struct InFlight {
    count: std::sync::atomic::AtomicU64,
    idle: tokio::sync::Notify,
}

type Stream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Refuses a request stream unprocessed (RFC 9114 section 4.1.1): the
/// client may send it again on a new connection, whatever its method.
fn refuse(resolver: &mut h3::server::RequestResolver<h3_quinn::Connection, Bytes>) {
    use h3::quic::SendStream;
    resolver
        .frame_stream
        .reset(h3::error::Code::H3_REQUEST_REJECTED.value());
}

async fn request(
    mut resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
    spec: &Arc<Spec>,
    peer: Peer,
    tls: Option<&TlsInfo>,
) {
    // The head as sent, for the checks h3 does not make (`fields`).
    let frame = std::future::poll_fn(|cx| resolver.frame_stream.poll_next(cx)).await;
    let order = match &frame {
        Ok(Some(h3::proto::frame::Frame::Headers(section))) => fields::check(section),
        _ => Ok(()),
    };
    let resolved = match resolver.accept_with_frame(frame) {
        Ok(r) => r.resolve().await,
        Err(e) => Err(e),
    };
    let (req, mut stream): (Request<()>, Stream) = match resolved {
        Ok(r) => r,
        Err(e) => {
            debug!(listener = %spec.ctx.name, "HTTP/3 request: {e}");
            return;
        }
    };
    if let Err(why) = order.and_then(|()| malformed(&req)) {
        // A stream error (RFC 9114 section 4.1.2); the connection serves on.
        debug!(listener = %spec.ctx.name, "HTTP/3 malformed request: {why}");
        spec.stats.malformed_total.fetch_add(1, Ordering::Relaxed);
        stream.stop_sending(h3::error::Code::H3_MESSAGE_ERROR);
        stream.stop_stream(h3::error::Code::H3_MESSAGE_ERROR);
        return;
    }
    let declared = content_length(&req);
    // Set if the body breaks its declared length (see `H3Body`).
    let broke = declared.map(|_| Arc::new(std::sync::atomic::AtomicBool::new(false)));
    debug!(listener = %spec.ctx.name, method = %req.method(), path = req.uri().path(), "request started");
    let mut entry = (spec.access_log.is_some() || spec.metrics.is_some())
        .then(|| Entry::of(&req, http::Version::HTTP_3));
    let (mut send, recv) = stream.split();
    let mut req = req.map(|()| H3Body {
        stream: recv,
        done: false,
        reading: false,
        declared,
        received: 0,
        broke: broke.clone(),
        stop: h3::error::Code::H3_NO_ERROR,
    });
    let (res, route) = if let Err(why) = crate::http::host::check_host(&mut req) {
        debug!(listener = %spec.ctx.name, "bad request: {why}");
        drop(req);
        (text(http::StatusCode::BAD_REQUEST, "bad request\n"), None)
    } else {
        match spec.handler.call(req, &spec.ctx, peer) {
            (Reply::Now(res), route) => (res, route),
            (Reply::Later(fut), route) => (fut.await, route),
        }
    };
    if broke.is_some_and(|b| b.load(Ordering::Relaxed)) {
        // Whatever the route made of it, the request was malformed: the
        // stream ends with H3_MESSAGE_ERROR (RFC 9114 section 4.1.2).
        debug!(listener = %spec.ctx.name, "HTTP/3 request body does not match its content-length");
        spec.stats.malformed_total.fetch_add(1, Ordering::Relaxed);
        send.stop_stream(h3::error::Code::H3_MESSAGE_ERROR);
        return;
    }
    let status = res.status().as_u16();
    let mut sent = 0;
    if let Err(e) = respond(&mut send, res, spec.shared.timeouts.send, &mut sent).await {
        debug!(listener = %spec.ctx.name, "HTTP/3 response: {e}");
        send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
    }
    if let Some(e) = &mut entry {
        e.status = status;
        e.bytes = sent;
        if let Some(log) = &spec.access_log {
            // The buffer of the first serving thread: this thread has none.
            log.record(0, &spec.ctx.name, peer.addr, tls, e);
        }
        if let Some(m) = &spec.metrics {
            m.record(route, e.status, e.bytes, e.started.elapsed().as_secs_f64());
        }
    }
}

/// Headers that mean nothing in HTTP/3 (RFC 9114 section 4.2): a request
/// with one is malformed, and a response never carries one.
const CONNECTION_SPECIFIC: [header::HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
];

/// Sends `res`; each piece must leave within `send` (a client that stops
/// reading cannot hold the stream forever).
async fn respond(
    send: &mut h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>,
    res: Response<crate::wire::body::Body>,
    within: Duration,
    sent: &mut u64,
) -> Result<(), String> {
    let (mut parts, mut body) = res.into_parts();
    for h in &CONNECTION_SPECIFIC {
        parts.headers.remove(h);
    }
    let timed = |what: &'static str| move |_| format!("{what}: no progress for {within:?}");
    tokio::time::timeout(within, send.send_response(Response::from_parts(parts, ())))
        .await
        .map_err(timed("head"))?
        .map_err(|e| e.to_string())?;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        match frame.into_data() {
            Ok(data) => {
                if !data.is_empty() {
                    *sent += data.len() as u64;
                    tokio::time::timeout(within, send.send_data(data))
                        .await
                        .map_err(timed("body"))?
                        .map_err(|e| e.to_string())?;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    tokio::time::timeout(within, send.send_trailers(trailers))
                        .await
                        .map_err(timed("trailers"))?
                        .map_err(|e| e.to_string())?;
                    return Ok(());
                }
            }
        }
    }
    tokio::time::timeout(within, send.finish())
        .await
        .map_err(timed("end"))?
        .map_err(|e| e.to_string())
}

/// Why `req` is malformed (RFC 9114 section 4.2, and RFC 9110 section 8.6
/// for `content-length`), in what h3 does not check: connection-specific
/// fields, `te` other than `trailers`, a length that is not one number.
fn malformed(req: &Request<()>) -> Result<(), &'static str> {
    let h = req.headers();
    if CONNECTION_SPECIFIC.iter().any(|name| h.contains_key(name)) {
        return Err("a connection-specific field");
    }
    if h.get_all(header::TE)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        return Err("te other than trailers");
    }
    let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next() {
        let valid = |v: &HeaderValue| !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit);
        if !valid(first) || first.len() > 19 || lengths.any(|v| v != first) {
            return Err("content-length is not one number");
        }
    }
    Ok(())
}

/// The request's `content-length` (checked by [`malformed`]).
fn content_length(req: &Request<()>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// An HTTP/3 request's body, for the routes. Its DATA must add up to the
/// request's `content-length` (RFC 9114 section 4.1.2): more, or fewer at
/// the end, is the client's error, and the stream's.
pub(crate) struct H3Body {
    stream: h3::server::RequestStream<h3_quinn::RecvStream, Bytes>,
    done: bool,
    /// A read is under way: h3-quinn holds the QUIC stream inside it, and
    /// cannot stop it meanwhile.
    reading: bool,
    declared: Option<u64>,
    received: u64,
    /// Set when the body breaks `declared`, for the request to see.
    broke: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// What STOP_SENDING says if the body is let go unread.
    stop: h3::error::Code,
}

impl H3Body {
    /// The client sent a body that does not match its `content-length`.
    fn mismatch(&mut self, why: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(b) = &self.broke {
            b.store(true, Ordering::Relaxed);
        }
        self.stop = h3::error::Code::H3_MESSAGE_ERROR;
        self.stop_reading();
        self.done = true;
        Poll::Ready(Some(Err(why.into())))
    }

    fn stop_reading(&mut self) {
        if !self.done && !self.reading {
            self.stream.stop_sending(self.stop);
            self.done = true;
        }
    }
}

impl http_body::Body for H3Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let polled = self.stream.poll_recv_data(cx);
        self.reading = polled.is_pending();
        match polled {
            Poll::Ready(Ok(Some(mut data))) => {
                let n = data.remaining();
                self.received += n as u64;
                if self.declared.is_some_and(|d| self.received > d) {
                    return self.mismatch("request body longer than its content-length");
                }
                Poll::Ready(Some(Ok(Frame::data(data.copy_to_bytes(n)))))
            }
            Poll::Ready(Ok(None)) => {
                self.done = true;
                if self.declared.is_some_and(|d| self.received != d) {
                    return self.mismatch("request body shorter than its content-length");
                }
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => {
                self.done = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// A body let go unread tells the client to stop sending, with H3_NO_ERROR
/// (RFC 9114 section 4.1.1: the answer does not need the rest), or
/// H3_MESSAGE_ERROR for a body that broke its length; quinn would say 0.
impl Drop for H3Body {
    fn drop(&mut self) {
        self.stop_reading();
    }
}

impl From<H3Body> for IncomingBody {
    fn from(b: H3Body) -> IncomingBody {
        IncomingBody::boxed(b)
    }
}

impl RequestBody for H3Body {
    /// HTTP/3 needs no read-and-drop: STOP_SENDING (on drop) tells the
    /// client the answer does not need the rest. (Also when the request
    /// had no body: h3 cannot tell before a read.)
    fn discard(self, _: http::Version) -> Option<crate::wire::body::Unread> {
        None
    }
}

/// This process's open QUIC connections, for the restart log.
pub(crate) fn open_connections(stats: &[Arc<QuicStats>]) -> u64 {
    stats
        .iter()
        .map(|s| s.connections.load(Ordering::Relaxed))
        .sum()
}
