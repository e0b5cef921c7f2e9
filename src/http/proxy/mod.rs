//! The `proxy` route: a reverse proxy to one or more upstreams (URLs or
//! apps), picked by the route's policy ([`balance`]), with passive and
//! active health ([`health`]), over HTTP/1.1, HTTP/2 or h2c, in the clear
//! or TLS ([`crate::wire::upstream`], [`crate::tls::upstream`]).
//!
//! Bodies stream both ways (never buffered whole), trailers included, so
//! gRPC passes. Hop-by-hop headers are removed in both directions (but
//! `TE: trailers`), `X-Forwarded-For`/`-Proto`/`-Host` and `Forwarded` are
//! set, then the route's header rules apply. An upstream that is down or
//! slow gets a short 502 or 504.
//!
//! What is retried, on another upstream when there is one: a request none
//! of which was written (the connection failed first), whatever its method;
//! and once, an idempotent request whose body was never read that failed
//! before any response byte. When every upstream is out, a request waits up
//! to `try_duration` for one to come back, trying them every 250 ms.
//!
//! `Upgrade` requests (WebSocket) are tunnelled both ways once the
//! upstream answers 101. A tunnel counts as a connection of this process, so
//! an old generation drains it like any other: it runs until it ends or
//! `shutdown_timeout` passes, and is then cut (and counted in the log).

mod balance;
mod body;
mod headers;
pub(crate) mod health;
mod retry;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use tokio::sync::watch;

use crate::apps::InFlight;
use crate::config::{ConfigError, HostRule, ProxyConfig, ProxyTarget, UpstreamProtocol};
use crate::observe::logging::Chain;
use crate::process::context::{ListenerContext, Peer};
use crate::process::upstreams::{now_ms, UpstreamState};
use crate::wire::body::{text, Body, RequestBody};
use crate::wire::upstream::{Endpoint, Pool, Pooled, SendError};

use crate::http::decorate::apply_rules;
use balance::Balancer;
use body::{Busy, ClientBody, Deadline};
use headers::{is_websocket, set_forwarded, strip_hop_by_hop, wants_trailers};
use retry::{closed_unanswered, copy, idempotent, Reclaimable};

/// How often a request waiting for an upstream (`try_duration`) tries again.
const TRY_INTERVAL: Duration = Duration::from_millis(250);

/// A proxy route, built once per generation.
pub(crate) struct Proxy {
    balancer: Balancer,
    /// Per upstream, in the balancer's order.
    targets: Vec<Target>,
    config: ProxyConfig,
    /// `listener path`, for the log and `status`.
    route: String,
    /// Errors are logged at most once a second (every request to a down
    /// upstream fails).
    errors_logged: crate::observe::logging::Throttle,
    /// Wakes requests waiting for an upstream when one comes back.
    pub(crate) changed: tokio::sync::Notify,
}

enum Target {
    Url {
        pool: Pool,
        /// `host:port`, for `host: upstream` and the health checks.
        authority: HeaderValue,
    },
    /// The serving instance of this app (see `apps::table`).
    App(String),
}

impl Proxy {
    /// Builds the route `route` (`listener path`), loading what its TLS
    /// names; errors name the config file's line.
    pub(crate) fn new(
        file: &std::path::Path,
        route: String,
        config: &ProxyConfig,
    ) -> Result<Proxy, ConfigError> {
        let h2 = config.protocol != UpstreamProtocol::H1;
        let mut tls = None;
        let mut targets = Vec::new();
        let mut states = Vec::new();
        for u in &config.upstreams {
            let label = u.target.to_string();
            let target = match &u.target {
                ProxyTarget::App(app) => Target::App(app.clone()),
                ProxyTarget::Upstream(uri) => {
                    let https = uri.scheme_str() == Some("https");
                    let host = uri.host().unwrap_or_default();
                    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
                    let addr = format!("{host}:{port}");
                    let tls = match https {
                        false => None,
                        true => {
                            let client = match &tls {
                                Some(c) => Arc::clone(c),
                                None => {
                                    let c = crate::tls::upstream::client_config(
                                        file,
                                        &config.tls,
                                        h2,
                                        &route,
                                    )?;
                                    tls = Some(c.clone());
                                    c
                                }
                            };
                            let name = crate::tls::upstream::server_name(&config.tls, host)
                                .map_err(|e| {
                                    ConfigError::new(
                                        file,
                                        None,
                                        format!(
                                            "route {route}: upstream {label}: {e}",
                                            e = Chain(&e)
                                        ),
                                    )
                                })?;
                            Some((client, name))
                        }
                    };
                    let authority = HeaderValue::from_str(&addr).map_err(|_| {
                        ConfigError::new(file, None, format!("route {route}: upstream {label}"))
                    })?;
                    Target::Url {
                        pool: Pool::new(Endpoint {
                            addr,
                            tls,
                            h2,
                            connect_timeout: config.connect_timeout,
                        }),
                        authority,
                    }
                }
            };
            targets.push(target);
            states.push((Arc::new(UpstreamState::new(route.clone(), label)), u.weight));
        }
        Ok(Proxy {
            balancer: Balancer::new(config.policy.clone(), states),
            targets,
            config: config.clone(),
            route,
            errors_logged: Default::default(),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// Each upstream's state, for `status`, the metrics and the handover.
    pub(crate) fn states(&self) -> &[Arc<UpstreamState>] {
        &self.balancer.states
    }

    pub(crate) fn has_health_check(&self) -> bool {
        self.config.health.is_some()
    }

    /// The route's upstreams and policy, for `gracesrv check`.
    pub(crate) fn summary(&self) -> String {
        let c = &self.config;
        let upstreams: Vec<String> = c
            .upstreams
            .iter()
            .map(|u| match u.weight {
                1 => u.target.to_string(),
                w => format!("{} (weight {w})", u.target),
            })
            .collect();
        let policy = match self.balancer.policy() {
            crate::config::Policy::RoundRobin => "round_robin".to_string(),
            crate::config::Policy::LeastConn => "least_conn".to_string(),
            crate::config::Policy::RandomTwo => "random_two".to_string(),
            crate::config::Policy::Hash(k) => match k {
                crate::config::HashKey::Remote => "hash on the client address".to_string(),
                crate::config::HashKey::Header(h) => format!("hash on header {h}"),
                crate::config::HashKey::Cookie(c) => format!("hash on cookie {c}"),
            },
        };
        let route = self.route.split_once(' ').map_or("", |r| r.1);
        let mut s = format!("{route}: {policy} to {}", upstreams.join(", "));
        if c.protocol != UpstreamProtocol::H1 {
            s.push_str(&format!(", {:?}", c.protocol).to_lowercase());
        }
        if let Some(h) = &c.health {
            s.push_str(&format!(", checked at {} every {:?}", h.path, h.interval));
        }
        s
    }

    /// Passive health applies when there is another upstream to turn to
    /// (as nginx, a lone upstream is never taken out).
    fn passive(&self) -> Option<(u32, Duration, Duration)> {
        let p = &self.config.passive;
        (self.targets.len() > 1).then_some((p.max_fails, p.fail_window, p.fail_timeout))
    }

    /// A failure of upstream `i`, which may take it out.
    fn failure(&self, i: usize) {
        let state = &self.balancer.states[i];
        if state.failed(self.passive()) {
            warn!(
                route = %self.route,
                upstream = %state.upstream,
                out_for = ?self.config.passive.fail_timeout,
                failures = self.config.passive.max_fails,
                "upstream is out"
            );
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
        if let Some(max) = self.config.max_body {
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

        // The path (without the route's prefix if asked) and query, in
        // origin form.
        let pq = req.uri().path_and_query().cloned();
        let target = match (self.config.strip_prefix, pq) {
            (false, Some(pq)) => http::Uri::from(pq),
            (strip, pq) => {
                let pq = pq.as_ref().map_or("/", |p| p.as_str());
                let rest = match strip {
                    true => pq.strip_prefix(prefix.trim_end_matches('/')).unwrap_or(pq),
                    false => pq,
                };
                let target = match rest.starts_with('/') {
                    true => rest.parse::<http::Uri>(),
                    false => format!("/{rest}").parse::<http::Uri>(),
                };
                let Ok(target) = target else {
                    return text(StatusCode::BAD_REQUEST, "bad request\n");
                };
                target
            }
        };
        let host = req.headers().get(header::HOST).cloned().or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let key = self.balancer.key(&req, peer.addr.ip());
        *req.uri_mut() = target;
        *req.version_mut() = http::Version::HTTP_11;
        let trailers = wants_trailers(req.headers());
        let h = req.headers_mut();
        strip_hop_by_hop(h, websocket);
        if trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        set_forwarded(h, peer, host.as_ref());
        if let Some(host) = &host {
            h.insert(header::HOST, host.clone());
        }
        let client_host = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("");
        apply_rules(h, &self.config.request_headers, client_host, peer);

        // A body without a length (chunked, HTTP/2) is cut at `max_body`.
        // A body the client breaks (bad chunked framing, a reset stream) is
        // noted, so that failure is the client's 400, not an upstream's 502.
        // No body at all (most requests) needs none of this.
        let (parts, body) = req.into_parts();
        let client_failed = match body.is_end_stream() {
            true => None,
            false => Some(Arc::new(AtomicBool::new(false))),
        };
        let body = match &client_failed {
            None => Held::Empty,
            Some(client_failed) => {
                let body = ClientBody {
                    inner: body,
                    failed: client_failed.clone(),
                };
                let body = match self.config.max_body {
                    Some(max) => Body::new(http_body_util::Limited::new(
                        body,
                        usize::try_from(max).unwrap_or(usize::MAX),
                    )),
                    None => Body::new(body),
                };
                // Kept, so that a request whose body was never read can be
                // sent again.
                Held::Kept(Arc::new(Reclaimable::new(body)))
            }
        };
        // An idempotent request may be sent again after it was written.
        let again = (idempotent(&parts.method) && !websocket).then(|| copy(&parts));
        let mut req = Request::from_parts(parts, body.attempt());
        let mut again = again;
        let mut deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let mut tried: Vec<usize> = Vec::new();
        let mut probing = false;
        let mut app_except = None;
        let mut last: Option<Failed> = None;
        let give_up = tokio::time::Instant::now() + self.config.try_duration;
        let (res, busy, in_flight) = loop {
            let now = now_ms();
            let picked = self.balancer.pick(key, &tried, now).or_else(|| {
                // Every upstream is out: while waiting, they are tried anyway.
                probing
                    .then(|| self.balancer.pick(key, &tried, u64::MAX))
                    .flatten()
            });
            let Some(i) = picked else {
                let left = give_up.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    let failed = last.unwrap_or(Failed::NoneHealthy);
                    return self.failed(failed, &client_failed, ctx);
                }
                let changed = self.changed.notified();
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep(left.min(TRY_INTERVAL)) => {}
                }
                tried.clear();
                probing = true;
                continue;
            };
            let state = &self.balancer.states[i];
            match (&self.config.host, &self.targets[i]) {
                (HostRule::Upstream, Target::Url { authority, .. }) => {
                    req.headers_mut().insert(header::HOST, authority.clone());
                }
                (HostRule::Fixed(v), _) => {
                    req.headers_mut().insert(header::HOST, v.clone());
                }
                _ => {}
            }
            state.requests_total.fetch_add(1, Ordering::Relaxed);
            let busy = Busy::new(state.clone());
            let sent = match &self.targets[i] {
                Target::Url { pool, .. } => {
                    // One timer for the whole response (see `Deadline`).
                    let sleep = deadline
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(self.config.timeout)));
                    tokio::select! {
                        biased;
                        sent = pool.send(req) => sent.map(|res| (res, None)).map_err(Failed::Send),
                        _ = sleep.as_mut() => Err(Failed::TimedOut),
                    }
                }
                Target::App(app) => self
                    .send_to_app(app, req, ctx, &mut app_except, key)
                    .await
                    .map(|(res, f)| (res, Some(f))),
            };
            let failed = match sent {
                Ok((res, in_flight)) => {
                    if self
                        .config
                        .passive
                        .unhealthy_status
                        .contains(&res.status().as_u16())
                    {
                        self.failure(i);
                    } else if probing {
                        state.answered();
                    }
                    break (res, busy, in_flight);
                }
                Err(failed) => failed,
            };
            self.failure(i);
            req = match failed {
                Failed::Send(SendError::NotSent { request, error }) => {
                    tried.push(i);
                    debug!(route = %self.route, upstream = %state.upstream, "not sent, trying again: {}", crate::observe::logging::causes(&*error));
                    last = Some(Failed::Connect(error));
                    *request
                }
                Failed::Send(SendError::Failed(e))
                    if !body.touched()
                        && closed_unanswered(&e)
                        && again.is_some()
                        && !client_failed
                            .as_ref()
                            .is_some_and(|f| f.load(Ordering::Relaxed)) =>
                {
                    debug!(route = %self.route, upstream = %state.upstream, "closed unanswered, sending again: {}", crate::observe::logging::causes(&e));
                    last = Some(Failed::Send(SendError::Failed(e)));
                    // Another upstream if there is one, else this one again.
                    if self.targets.len() > 1 {
                        tried.push(i);
                    }
                    let parts = again.take().expect("checked above");
                    Request::from_parts(parts, body.attempt())
                }
                Failed::Response(res) => return res,
                other => return self.failed(other, &client_failed, ctx),
            };
        };

        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                return self.tunnel(res, client_upgrade, websocket, ctx, in_flight, busy);
            }
        }
        let (mut parts, body) = res.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        apply_rules(
            &mut parts.headers,
            &self.config.response_headers,
            client_host,
            peer,
        );
        let deadline =
            deadline.unwrap_or_else(|| Box::pin(tokio::time::sleep(self.config.timeout)));
        Response::from_parts(
            parts,
            Body::new(Deadline::new(body, deadline, (in_flight, busy))),
        )
    }

    /// Sends the request to the serving instance of `app`, waiting up to
    /// `connect_timeout` for one to be ready. A request a dying instance
    /// never read goes to the next instance. The response holds the
    /// request's place in flight on the instance (see `apps::table`).
    async fn send_to_app(
        &self,
        app: &str,
        mut req: Request<Body>,
        ctx: &ListenerContext,
        except: &mut Option<u64>,
        key: Option<u64>,
    ) -> Result<(Response<Pooled>, InFlight), Failed> {
        let table = &ctx.process.apps;
        let deadline = tokio::time::Instant::now() + self.config.connect_timeout;
        loop {
            let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(instance) = table.pick(app, *except, wait, key).await else {
                ctx.process
                    .upstream_errors_total
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.errors_logged.allow() {
                    warn!(app, wait = ?self.config.connect_timeout, suppressed, "no instance of the app is ready");
                }
                return Err(Failed::Response(text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service unavailable\n",
                )));
            };
            let in_flight = InFlight::new(instance.clone());
            let started = tokio::time::Instant::now();
            let sent = tokio::time::timeout(self.config.timeout, instance.pool.send(req)).await;
            *except = Some(instance.id);
            // What a canary deploy compares: each instance's answers.
            let answered = match &sent {
                Ok(Ok(res)) => Some(Some(res.status().as_u16())),
                Ok(Err(SendError::NotSent { .. })) => None,
                _ => Some(None),
            };
            if let Some(status) = answered {
                instance.record(status, started.elapsed());
            }
            match sent {
                Ok(Ok(res)) => return Ok((res, in_flight)),
                Ok(Err(SendError::NotSent { request, error })) => {
                    debug!(
                        app,
                        instance = instance.id,
                        "the instance is gone: trying the next one: {}",
                        crate::observe::logging::causes(&*error)
                    );
                    req = *request;
                }
                Ok(Err(failed)) => return Err(Failed::Send(failed)),
                Err(_) => return Err(Failed::TimedOut),
            }
        }
    }

    /// The answer to a request that got no response upstream.
    fn failed(
        &self,
        failed: Failed,
        client_failed: &Option<Arc<AtomicBool>>,
        ctx: &ListenerContext,
    ) -> Response<Body> {
        let stats = &ctx.process;
        let route = &self.route;
        let error: &(dyn std::error::Error + 'static) = match &failed {
            Failed::Response(_) => {
                let Failed::Response(res) = failed else {
                    unreachable!()
                };
                return res;
            }
            Failed::TimedOut => {
                stats.upstream_errors_total.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.errors_logged.allow() {
                    warn!(%route, timeout = ?self.config.timeout, suppressed, "upstream timed out");
                }
                return text(StatusCode::GATEWAY_TIMEOUT, "gateway timeout\n");
            }
            Failed::NoneHealthy => {
                stats.upstream_errors_total.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.errors_logged.allow() {
                    warn!(%route, try_duration = ?self.config.try_duration, suppressed, "no upstream is up");
                }
                return text(StatusCode::BAD_GATEWAY, "bad gateway\n");
            }
            Failed::Send(e) => e,
            Failed::Connect(e) => &**e,
        };
        if over_limit(error) {
            return text(StatusCode::PAYLOAD_TOO_LARGE, "payload too large\n");
        }
        if client_failed
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Relaxed))
        {
            stats.client_errors_total.fetch_add(1, Ordering::Relaxed);
            debug!(%route, "request body from the client failed: {}", crate::observe::logging::causes(error));
            return text(StatusCode::BAD_REQUEST, "bad request\n");
        }
        stats.upstream_errors_total.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.errors_logged.allow() {
            warn!(%route, suppressed, "upstream error: {}", crate::observe::logging::causes(error));
        }
        text(StatusCode::BAD_GATEWAY, "bad gateway\n")
    }

    /// Answers 101 to the client and joins the two upgraded connections.
    fn tunnel(
        &self,
        res: Response<Pooled>,
        client: hyper::upgrade::OnUpgrade,
        websocket: bool,
        ctx: &ListenerContext,
        in_flight: Option<InFlight>,
        busy: Busy,
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
                    debug!(%listener, "upgrade failed: {e}", e = Chain(&e));
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
            drop((in_flight, busy, upgraded, guard));
        });
        Response::from_parts(parts, crate::wire::body::full(Bytes::new()))
    }
}

/// The request's body, held for the attempts.
enum Held {
    Empty,
    Kept(Arc<Reclaimable>),
}

impl Held {
    fn attempt(&self) -> Body {
        match self {
            Held::Empty => Body::empty(),
            Held::Kept(b) => Body::new(b.attempt()),
        }
    }

    /// Was any of it read (so it cannot be sent again)?
    fn touched(&self) -> bool {
        matches!(self, Held::Kept(b) if b.touched())
    }
}

/// Why a request got no response upstream.
enum Failed {
    /// The answer is decided already.
    Response(Response<Body>),
    Send(SendError),
    /// No upstream would take it (connections refused, reset, TLS).
    Connect(Box<dyn std::error::Error + Send + Sync>),
    TimedOut,
    /// Every upstream was out for all of `try_duration`.
    NoneHealthy,
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
