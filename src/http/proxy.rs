//! The `proxy` route: a reverse proxy to an HTTP upstream.
//!
//! Bodies stream both ways (never buffered whole); upstream connections are
//! pooled and kept alive. Hop-by-hop headers are removed in both directions,
//! and `X-Forwarded-For`/`-Proto`/`-Host` and `Forwarded` are set; `Host` passes
//! through. An upstream that is down or slow gets a short 502 or 504.
//!
//! `Upgrade` requests (WebSocket and others) are tunnelled both ways once the
//! upstream answers 101. A tunnel counts as a connection of this process, so
//! an old generation drains it like any other: it runs until it ends or
//! `shutdown_timeout` passes, and is then cut (and counted in the log).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use tokio::sync::watch;

use crate::apps::InFlight;
use crate::config::ProxyTarget;
use crate::process::context::{ListenerContext, Peer};
use crate::wire::body::{has_token, text, Body, BoxError, RequestBody};
use crate::wire::upstream::Pools;

/// A proxy route, built once per generation.
pub(crate) struct Proxy {
    target: Target,
    /// Where this route sends requests, for the log.
    label: String,
    /// Largest request body forwarded (413 beyond it).
    max_body: Option<u64>,
    /// How long a request waits for an app instance to be ready.
    connect_timeout: Duration,
    timeout: Duration,
    strip_prefix: bool,
    /// Upstream failures are logged at most once a second (every request
    /// to a down upstream fails).
    errors_logged: crate::observe::logging::Throttle,
}

enum Target {
    /// `http://host:port`, without a trailing slash, and its pool.
    Upstream { uri: Uri, pools: Pools },
    /// The serving instance of this app (see `apps::table`).
    App(String),
}

/// Headers that describe one hop, not the message (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, and those the `Connection` header names.
/// `Upgrade` (and `Connection: upgrade`) are kept when `upgrade` is set.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(n);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// A WebSocket upgrade: the only upgrade that is tunnelled. Any other
/// (`h2c` above all: a tunnel would carry requests past routing) is
/// forwarded as a plain request, its `Upgrade` removed with the hop-by-hop
/// headers.
fn is_websocket<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    has_token(h, header::CONNECTION, "upgrade") && has_token(h, header::UPGRADE, "websocket")
}

impl Proxy {
    pub(crate) fn new(
        target: &ProxyTarget,
        connect_timeout: Duration,
        timeout: Duration,
        strip_prefix: bool,
        max_body: Option<u64>,
    ) -> Proxy {
        let label = match target {
            ProxyTarget::Upstream(uri) => uri.to_string(),
            ProxyTarget::App(app) => format!("app {app}"),
        };
        let target = match target {
            ProxyTarget::Upstream(uri) => Target::Upstream {
                uri: uri.clone(),
                pools: Pools::new(connect_timeout),
            },
            ProxyTarget::App(name) => Target::App(name.clone()),
        };
        Proxy {
            target,
            label,
            max_body,
            connect_timeout,
            timeout,
            strip_prefix,
            errors_logged: Default::default(),
        }
    }

    pub(crate) async fn handle<B: RequestBody>(
        &self,
        mut req: Request<B>,
        prefix: &str,
        ctx: &ListenerContext,
        peer: Peer,
    ) -> Response<Body> {
        let stats = &ctx.process;
        stats.proxied_total.fetch_add(1, Ordering::Relaxed);
        if let Some(max) = self.max_body {
            let declared = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > max) {
                return text(StatusCode::PAYLOAD_TOO_LARGE, "payload too large\n");
            }
        }
        let websocket = is_websocket(&req);
        let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));

        // The path (without the route's prefix if asked) and query.
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let pq = match self.strip_prefix {
            true => {
                let rest = pq.strip_prefix(prefix.trim_end_matches('/')).unwrap_or(pq);
                if rest.starts_with('/') {
                    rest.to_string()
                } else {
                    format!("/{rest}")
                }
            }
            false => pq.to_string(),
        };
        let host = req.headers().get(header::HOST).cloned().or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        *req.version_mut() = http::Version::HTTP_11;
        let h = req.headers_mut();
        strip_hop_by_hop(h, websocket);
        set_forwarded(h, peer, host.as_ref());
        if let Some(host) = host {
            h.insert(header::HOST, host);
        }

        // A body without a length (chunked, HTTP/2) is cut at `max_body`.
        // A body the client breaks (bad chunked framing, a reset stream) is
        // noted, so that failure is the client's 400, not an upstream's 502.
        let client_failed = Arc::new(AtomicBool::new(false));
        let (parts, body) = req.into_parts();
        let body = ClientBody {
            inner: body,
            failed: client_failed.clone(),
        };
        let body = match self.max_body {
            Some(max) => Body::new(http_body_util::Limited::new(
                body,
                usize::try_from(max).unwrap_or(usize::MAX),
            )),
            None => Body::new(body),
        };
        let sent = match &self.target {
            Target::Upstream { uri, pools } => {
                let client = pools.get();
                let Some(req) = request(parts, uri.authority(), &pq, body) else {
                    return text(StatusCode::BAD_REQUEST, "bad request\n");
                };
                self.send(client, req).await.map(|res| (res, None))
            }
            Target::App(app) => match self.send_to_app(app, &parts, &pq, body, ctx).await {
                Ok(sent) => Ok(sent),
                Err(Failed::Response(res)) => return res,
                Err(failed) => Err(failed),
            },
        };
        let (res, in_flight) = match sent {
            Ok(sent) => sent,
            Err(failed) => return self.failed(failed, &client_failed, ctx),
        };

        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                return self.tunnel(res, client_upgrade, websocket, ctx, in_flight);
            }
        }
        let (mut parts, body) = res.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        let deadline = tokio::time::Instant::now() + self.timeout;
        Response::from_parts(parts, Body::new(Deadline::new(body, deadline, in_flight)))
    }

    /// Sends `req` upstream within the route's `timeout`.
    async fn send(
        &self,
        client: &Client<HttpConnector, Body>,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, Failed> {
        match tokio::time::timeout(self.timeout, client.request(req)).await {
            Ok(Ok(res)) => Ok(res),
            Ok(Err(e)) => Err(Failed::Upstream(e)),
            Err(_) => Err(Failed::TimedOut),
        }
    }

    /// Sends the request to the serving instance of `app`, waiting up to
    /// `connect_timeout` for one to be ready. A connection refused before
    /// anything was sent (the instance just died) is tried again on the
    /// next instance. The response holds the request's place in flight on
    /// the instance (see `apps::table`).
    async fn send_to_app(
        &self,
        app: &str,
        parts: &http::request::Parts,
        pq: &str,
        body: Body,
        ctx: &ListenerContext,
    ) -> Result<(Response<Incoming>, Option<InFlight>), Failed> {
        let table = &ctx.process.apps;
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let body = Arc::new(Reclaimable::new(body));
        let mut except = None;
        loop {
            let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(instance) = table.pick(app, except, wait).await else {
                ctx.process
                    .upstream_errors_total
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.errors_logged.allow() {
                    warn!(app, wait = ?self.connect_timeout, suppressed, "no instance of the app is ready");
                }
                return Err(Failed::Response(text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service unavailable\n",
                )));
            };
            let Some(req) = request(
                copy(parts),
                instance.authority.as_ref(),
                pq,
                Body::new(body.attempt()),
            ) else {
                return Err(Failed::Response(text(
                    StatusCode::BAD_REQUEST,
                    "bad request\n",
                )));
            };
            let in_flight = InFlight::new(instance.clone());
            match self.send(instance.pools.get(), req).await {
                Ok(res) => return Ok((res, Some(in_flight))),
                Err(Failed::Upstream(e))
                    if !body.touched()
                        && (e.is_connect()
                            || (idempotent(&parts.method) && closed_unanswered(&e))) =>
                {
                    debug!(
                        app,
                        instance = instance.id,
                        "the instance is gone: trying the next one: {}",
                        crate::observe::logging::causes(&e)
                    );
                    except = Some(instance.id);
                }
                Err(failed) => return Err(failed),
            }
        }
    }

    /// The answer to a request that got no response upstream.
    fn failed(
        &self,
        failed: Failed,
        client_failed: &AtomicBool,
        ctx: &ListenerContext,
    ) -> Response<Body> {
        let stats = &ctx.process;
        let upstream = &self.label;
        match failed {
            Failed::Response(res) => res,
            Failed::Upstream(e) if over_limit(&e) => {
                text(StatusCode::PAYLOAD_TOO_LARGE, "payload too large\n")
            }
            Failed::Upstream(e) if client_failed.load(Ordering::Relaxed) => {
                stats.client_errors_total.fetch_add(1, Ordering::Relaxed);
                debug!(
                    upstream,
                    "request body from the client failed: {}",
                    crate::observe::logging::causes(&e)
                );
                text(StatusCode::BAD_REQUEST, "bad request\n")
            }
            Failed::Upstream(e) => {
                stats.upstream_errors_total.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.errors_logged.allow() {
                    warn!(
                        upstream,
                        suppressed,
                        "upstream error: {}",
                        crate::observe::logging::causes(&e)
                    );
                }
                text(StatusCode::BAD_GATEWAY, "bad gateway\n")
            }
            Failed::TimedOut => {
                stats.upstream_errors_total.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.errors_logged.allow() {
                    warn!(upstream, timeout = ?self.timeout, suppressed, "upstream timed out");
                }
                text(StatusCode::GATEWAY_TIMEOUT, "gateway timeout\n")
            }
        }
    }

    /// Answers 101 to the client and joins the two upgraded connections.
    fn tunnel(
        &self,
        res: Response<Incoming>,
        client: hyper::upgrade::OnUpgrade,
        websocket: bool,
        ctx: &ListenerContext,
        in_flight: Option<InFlight>,
    ) -> Response<Body> {
        let (mut parts, _) = res.into_parts();
        let upstream = hyper::upgrade::on(Response::from_parts(parts.clone(), ()));
        strip_hop_by_hop(&mut parts.headers, true);
        // Counted as a connection (and as an upgraded one) until it ends.
        let guard = ctx.process.drain.connection();
        let upgraded = ctx.process.drain.upgraded();
        let cut = match &in_flight {
            // Cut when this process stops, or when the instance is retired
            // and its tunnels outlive shutdown_timeout.
            Some(i) => either_cut(ctx.process.drain.tunnel_cut(), i.cut()),
            None => ctx.process.drain.tunnel_cut(),
        };
        let listener = ctx.name.clone();
        tokio::spawn(async move {
            let (client, upstream) = match tokio::join!(client, upstream) {
                (Ok(c), Ok(u)) => (c, u),
                (Err(e), _) | (_, Err(e)) => {
                    debug!(%listener, "upgrade failed: {e}");
                    return;
                }
            };
            let (up, down) = crate::http::tunnel::relay(
                TokioIo::new(client),
                TokioIo::new(upstream),
                websocket,
                cut,
            )
            .await;
            debug!(%listener, up, down, "upgraded connection ended");
            drop(in_flight);
            drop(upgraded);
            drop(guard);
        });
        Response::from_parts(parts, crate::wire::body::full(Bytes::new()))
    }
}

/// Why a request got no response upstream.
enum Failed {
    /// The answer is decided already.
    Response(Response<Body>),
    Upstream(hyper_util::client::legacy::Error),
    TimedOut,
}

/// The upstream request: `parts` (method, headers) to `authority`, with
/// this path and query.
fn request(
    mut parts: http::request::Parts,
    authority: Option<&http::uri::Authority>,
    pq: &str,
    body: Body,
) -> Option<Request<Body>> {
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(authority?.as_str())
        .path_and_query(pq)
        .build()
        .ok()?;
    Some(Request::from_parts(parts, body))
}

/// A copy of `parts` for one attempt: a request to an app may be sent again.
fn copy(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// RFC 9110 section 9.2.2: a request that may be sent twice.
fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// The connection closed (or was reset) before any response: an instance
/// that just died, with this request written to a connection it had open.
fn closed_unanswered(e: &hyper_util::client::legacy::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cur {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) {
                return true;
            }
        }
        cur = c.source();
    }
    false
}

/// A tunnel cut signal that fires when either `a` or `b` does.
fn either_cut(mut a: watch::Receiver<bool>, mut b: watch::Receiver<bool>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = a.wait_for(|c| *c) => {}
            _ = b.wait_for(|c| *c) => {}
            _ = tx.closed() => return,
        }
        let _ = tx.send(true);
    });
    rx
}

/// A request body that can be sent again while none of it has been read:
/// a connection refused by a dying instance leaves it untouched, for the
/// next instance.
struct Reclaimable {
    body: std::sync::Mutex<Body>,
    touched: AtomicBool,
}

impl Reclaimable {
    fn new(body: Body) -> Reclaimable {
        Reclaimable {
            body: std::sync::Mutex::new(body),
            touched: AtomicBool::new(false),
        }
    }

    fn touched(&self) -> bool {
        self.touched.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Body> {
        self.body.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The body of one attempt.
    fn attempt(self: &Arc<Self>) -> Attempt {
        Attempt(self.clone())
    }
}

struct Attempt(Arc<Reclaimable>);

impl hyper::body::Body for Attempt {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.touched.store(true, Ordering::Relaxed);
        let mut body = self.0.lock();
        Pin::new(&mut *body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.0.lock().is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.0.lock().size_hint()
    }
}

/// Did the request body pass `max_body` (http-body-util's `Limited`,
/// somewhere in the chain of causes)?
fn over_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = c.source();
    }
    false
}

/// Sets `X-Forwarded-For` (appended), `-Proto`, `-Host` and `Forwarded`.
fn set_forwarded(h: &mut HeaderMap, peer: Peer, host: Option<&HeaderValue>) {
    let ip = peer.addr.ip().to_string();
    let proto = if peer.tls { "https" } else { "http" };
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.clone(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    let host_str = host.and_then(|v| v.to_str().ok());
    if let Some(v) = host.cloned() {
        h.insert("x-forwarded-host", v);
    }
    // RFC 7239: an IPv6 address is quoted and bracketed.
    let for_ = if peer.addr.is_ipv6() {
        format!("\"[{ip}]\"")
    } else {
        ip
    };
    let mut fwd = format!("for={for_};proto={proto}");
    if let Some(host) = host_str {
        // A quoted-string (RFC 7239 section 4): `"` and `\` escaped, so a
        // host can never end the value and add fields of its own.
        let quoted = host.replace('\\', "\\\\").replace('"', "\\\"");
        fwd.push_str(&format!(";host=\"{quoted}\""));
    }
    let fwd = match h.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {fwd}"),
        None => fwd,
    };
    if let Ok(v) = HeaderValue::from_str(&fwd) {
        h.insert(header::FORWARDED, v);
    }
}

/// The client's request body on its way upstream, noting whether the
/// client broke it.
struct ClientBody<B> {
    inner: B,
    failed: Arc<AtomicBool>,
}

impl<B: RequestBody> hyper::body::Body for ClientBody<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.failed.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that ends in an error at `deadline` (the route's
/// `timeout` covers the whole response), streamed frame by frame.
struct Deadline {
    inner: Incoming,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// An app instance's count of this request, until the body ends.
    _in_flight: Option<InFlight>,
}

impl Deadline {
    fn new(inner: Incoming, deadline: tokio::time::Instant, in_flight: Option<InFlight>) -> Self {
        Deadline {
            inner,
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            _in_flight: in_flight,
        }
    }
}

impl hyper::body::Body for Deadline {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err("upstream response timed out".into()))),
            Poll::Pending => Poll::Pending,
        }
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
    fn hop_by_hop_headers_go_both_ways() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain.len(), 1, "{plain:?}");
        assert!(plain.contains_key("x-kept"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(!h.contains_key("x-private"));
    }

    #[test]
    fn forwarding_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let peer = Peer {
            addr: "127.0.0.1:5000".parse().unwrap(),
            tls: true,
        };
        set_forwarded(&mut h, peer, Some(&HeaderValue::from_static("example.com")));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(
            h["forwarded"],
            "for=127.0.0.1;proto=https;host=\"example.com\""
        );
        // A host can never close the quoted string and add fields.
        let mut h = HeaderMap::new();
        let sneaky = HeaderValue::from_static("a\";for=evil\\");
        set_forwarded(&mut h, peer, Some(&sneaky));
        assert_eq!(
            h["forwarded"],
            "for=127.0.0.1;proto=https;host=\"a\\\";for=evil\\\\\""
        );
    }
}
