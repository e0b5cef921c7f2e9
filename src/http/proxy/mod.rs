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

mod body;
mod headers;
mod retry;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use tokio::sync::watch;

use crate::apps::InFlight;
use crate::config::ProxyTarget;
use crate::process::context::{ListenerContext, Peer};
use crate::wire::body::{text, Body, RequestBody};
use crate::wire::upstream::Pools;

use body::{ClientBody, Deadline};
use headers::{is_websocket, set_forwarded, strip_hop_by_hop};
use retry::{closed_unanswered, copy, idempotent, Reclaimable};

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
