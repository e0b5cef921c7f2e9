//! The routes of a listener: a request goes to the route with the longest
//! matching path prefix (after [`path::normalize`]), whose action answers it:
//! `respond` and `redirect` ([`respond`]), `status` ([`status`]), `static`
//! ([`crate::http::files`]) and `proxy` ([`crate::http::proxy`]).

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use hyper::body::Incoming;

use crate::config::{Action, ConfigError, ListenerConfig};
use crate::process::context::{ListenerContext, Peer};
use crate::wire::body::{hold, text, Reply, RequestBody, Unread};

/// What a route does. What a deferred answer needs is behind an `Arc`, so
/// its future takes its own handle on it.
enum Route {
    Metrics,
    Respond { fixed: Arc<Fixed>, delay: Duration },
    Static(Arc<crate::http::files::Root>),
    Redirect { to: String, status: StatusCode },
    Status,
    Proxy(Arc<crate::http::proxy::Proxy>),
}

mod path;
mod respond;
mod status;

use respond::{redirect, Fixed};

/// A route's access rules and answer rules, if it has any.
struct Guard {
    limit: Option<Arc<crate::http::limit::Limiter>>,
    /// The listener's `trusted_proxies`, for the client's address.
    trusted: Vec<ipnet::IpNet>,
    access: Option<crate::http::access::Access>,
    decorate: Option<crate::http::decorate::Decorate>,
    compress: Option<crate::config::CompressConfig>,
}

/// The routes of one listener, longest prefix first.
pub(crate) struct Router {
    routes: Vec<(Arc<str>, Route)>,
    /// Per route, in the same order.
    guards: Vec<Option<Arc<Guard>>>,
    /// Where pending ACME http-01 answers are, when this (plain) listener
    /// serves them under `/.well-known/acme-challenge/`.
    acme_http: Option<std::path::PathBuf>,
}

/// What [`Router::pick`] found: the route for a request, or its answer.
enum Picked<B> {
    Route(usize, Request<B>),
    Answered(Reply),
}

impl Router {
    /// Builds the routes of `listener`; checks that static roots are directories.
    pub(crate) fn new(
        file: &Path,
        listener: &ListenerConfig,
        acme: Option<&crate::config::AcmeConfig>,
    ) -> Result<Router, ConfigError> {
        let acme_http = acme
            .filter(|a| a.challenge == crate::config::Challenge::Http01 && listener.tls.is_none())
            .map(|a| a.storage.join("challenges/http-01"));
        let mut routes = Vec::new();
        for r in &listener.routes {
            let handle = match &r.action {
                Action::Respond {
                    status,
                    body,
                    headers,
                    delay,
                } => Route::Respond {
                    fixed: Arc::new(Fixed::new(*status, body, headers.clone())),
                    delay: *delay,
                },
                Action::Static {
                    root,
                    index,
                    fallback,
                    browse,
                    file_cache,
                } => {
                    let canonical = std::fs::canonicalize(&root.path)
                        .ok()
                        .filter(|p| p.is_dir())
                        .ok_or_else(|| {
                            ConfigError::new(
                                file,
                                Some(root.pos),
                                format!("{}: {} is not a directory", root.key, root.written),
                            )
                        })?;
                    Route::Static(Arc::new(crate::http::files::Root::new(
                        canonical,
                        index.clone(),
                        fallback.clone(),
                        *browse,
                        *file_cache,
                    )))
                }
                Action::Redirect { to, status } => Route::Redirect {
                    to: to.clone(),
                    status: *status,
                },
                Action::Status => Route::Status,
                Action::Metrics => Route::Metrics,
                Action::Proxy(p) => Route::Proxy(Arc::new(crate::http::proxy::Proxy::new(
                    file,
                    format!("{} {}", listener.name, r.path),
                    p,
                )?)),
            };
            let o = &r.options;
            let guard = Guard {
                limit: o.rate_limit.as_ref().map(|l| {
                    Arc::new(crate::http::limit::Limiter::new(
                        l,
                        format!("{} {}", listener.name, r.path),
                    ))
                }),
                trusted: listener.trusted_proxies.clone(),
                access: crate::http::access::Access::new(
                    file,
                    o.allow.clone(),
                    o.deny.clone(),
                    o.basic_auth.as_ref(),
                )?,
                decorate: crate::http::decorate::Decorate::new(o.headers.clone(), o.cache.as_ref()),
                compress: o.compression(matches!(r.action, Action::Static { .. })),
            };
            let guard = (guard.limit.is_some()
                || guard.access.is_some()
                || guard.decorate.is_some()
                || guard.compress.is_some())
            .then(|| Arc::new(guard));
            routes.push((Arc::<str>::from(r.path.as_str()), handle, guard));
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
        let (routes, guards) = routes.into_iter().map(|(p, r, g)| ((p, r), g)).unzip();
        Ok(Router {
            routes,
            guards,
            acme_http,
        })
    }

    /// The rate limits, for the metrics.
    pub(crate) fn limiters(&self) -> impl Iterator<Item = &Arc<crate::http::limit::Limiter>> {
        self.guards
            .iter()
            .flatten()
            .filter_map(|g| g.limit.as_ref())
    }

    /// The proxy routes, for their upstreams' health and state.
    pub(crate) fn proxies(&self) -> impl Iterator<Item = &Arc<crate::http::proxy::Proxy>> {
        self.routes.iter().filter_map(|(_, r)| match r {
            Route::Proxy(p) => Some(p),
            _ => None,
        })
    }

    /// Answers `req`: at once for fixed responses, redirects and `status`
    /// (no allocation for the future on the hot path), or with a future for
    /// what waits (a `delay`, files, the proxy). Every route but the proxy
    /// leaves the request body to [`discard`].
    ///
    /// Also says which route took it (its index in [`Router::prefixes`],
    /// for the metrics), if one did.
    #[inline]
    pub(crate) fn handle<B: RequestBody>(
        self: &Arc<Self>,
        req: Request<B>,
        ctx: &Arc<ListenerContext>,
        peer: Peer,
    ) -> (Reply, Option<usize>) {
        match self.pick(req) {
            Picked::Route(i, req) => match &self.guards[i] {
                None => (self.run(i, req, ctx, peer), Some(i)),
                Some(guard) => (self.guarded(guard.clone(), i, req, ctx, peer), Some(i)),
            },
            Picked::Answered(reply) => (reply, None),
        }
    }

    /// Route `i` behind its access rules, its answer under its answer rules.
    fn guarded<B: RequestBody>(
        self: &Arc<Self>,
        guard: Arc<Guard>,
        i: usize,
        mut req: Request<B>,
        ctx: &Arc<ListenerContext>,
        peer: Peer,
    ) -> Reply {
        use crate::http::access::Verdict;
        use crate::http::compress;
        let compressing = guard.compress.as_ref().map(|c| {
            let mut chosen = compress::negotiate(req.headers(), &c.encodings);
            compress::request(req.headers_mut(), &mut chosen);
            // A static route serves a precompressed file of this encoding.
            req.extensions_mut().insert(chosen);
            let head = req.method() == http::Method::HEAD;
            let ranged = req.headers().contains_key(http::header::RANGE);
            (chosen, head, ranged)
        });
        // Only the header rules' `{host}` needs it (a shared handle, no copy).
        let host = guard
            .decorate
            .as_ref()
            .and_then(|_| req.headers().get(http::header::HOST).cloned());
        // The client's address, found once for the limit and the rules.
        let client = (guard.limit.is_some() || guard.access.is_some()).then(|| {
            crate::http::access::client_address(peer.addr.ip(), req.headers(), &guard.trusted)
        });
        // The limit first: a client over it costs no password check.
        let limited = match (&guard.limit, client) {
            (Some(l), Some(client)) => l.check(client, req.headers()),
            _ => None,
        };
        let verdict = match (limited, &guard.access, client) {
            (Some(res), _, _) => Verdict::Refused(res),
            (None, Some(access), Some(client)) => access.check(client, req.headers()),
            _ => Verdict::Pass,
        };
        let reply = match verdict {
            Verdict::Pass => self.run(i, req, ctx, peer),
            Verdict::Refused(res) => {
                let unread = discard(req);
                Reply::Now(hold(res, unread))
            }
            Verdict::Check(login) => {
                let (router, guard, ctx) = (self.clone(), guard.clone(), ctx.clone());
                Reply::Later(Box::pin(async move {
                    let access = guard
                        .access
                        .as_ref()
                        .expect("a login comes from access rules");
                    match access.login(login).await {
                        Ok(()) => match router.run(i, req, &ctx, peer) {
                            Reply::Now(res) => res,
                            Reply::Later(f) => f.await,
                        },
                        Err(res) => {
                            let unread = discard(req);
                            hold(res, unread)
                        }
                    }
                }))
            }
        };
        if guard.decorate.is_none() && guard.compress.is_none() {
            return reply;
        }
        // Headers and caching first: `compress` sees the final headers
        // (a `Cache-Control: no-transform` a rule added).
        let finish = move |mut res: http::Response<crate::wire::body::Body>| {
            if let Some(d) = &guard.decorate {
                let host = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("");
                d.apply(&mut res, host, peer);
            }
            match (&guard.compress, compressing) {
                (Some(c), Some((chosen, head, ranged))) => {
                    compress::response(res, chosen, c, head, ranged)
                }
                _ => res,
            }
        };
        match reply {
            Reply::Now(res) => Reply::Now(finish(res)),
            Reply::Later(f) => Reply::Later(Box::pin(async move { finish(f.await) })),
        }
    }

    /// The route for `req` (its path normalised first), or the answer when
    /// none takes it: an ACME http-01 answer, 400 for a path that leaves
    /// the root, 404.
    #[inline]
    fn pick<B: RequestBody>(&self, mut req: Request<B>) -> Picked<B> {
        let path = req.uri().path();
        if let Some(dir) = &self.acme_http {
            if let Some(token) = path.strip_prefix("/.well-known/acme-challenge/") {
                let file = crate::tls::acme::http_answer_file(dir, token);
                let unread = discard(req);
                // Read on tokio's blocking threads, not the serving thread.
                return Picked::Answered(Reply::Later(Box::pin(async move {
                    let answer = match file {
                        Some(file) => tokio::fs::read(file).await.ok(),
                        None => None,
                    };
                    let res = match answer {
                        Some(answer) => {
                            let mut res = http::Response::new(crate::wire::body::full(answer));
                            res.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("application/octet-stream"),
                            );
                            res
                        }
                        None => text(StatusCode::NOT_FOUND, "not found\n"),
                    };
                    hold(res, unread)
                })));
            }
        }
        let mut route = self.route(path);
        // Routes match the normalised path (and a proxy forwards it), so
        // `/api/../admin` is `/admin`. A static route keeps the raw path:
        // it refuses escapes from its root itself, with 404 (SPEC section 5).
        let normal = path::normalize(path);
        if !matches!(normal, Ok(Cow::Borrowed(_)))
            && !route.is_some_and(|i| matches!(self.routes[i].1, Route::Static(_)))
        {
            let Ok(normal) = normal else {
                let unread = discard(req);
                return Picked::Answered(Reply::Now(hold(
                    text(StatusCode::BAD_REQUEST, "bad request\n"),
                    unread,
                )));
            };
            let normal = normal.into_owned();
            route = self.route(&normal);
            let mut parts = req.uri().clone().into_parts();
            let pq = match req.uri().query() {
                Some(q) => format!("{normal}?{q}"),
                None => normal,
            };
            parts.path_and_query = pq.parse().ok();
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        let Some(i) = route else {
            let unread = discard(req);
            return Picked::Answered(Reply::Now(hold(
                text(StatusCode::NOT_FOUND, "not found\n"),
                unread,
            )));
        };
        Picked::Route(i, req)
    }

    /// Answers `req` with route `i`.
    #[inline]
    fn run<B: RequestBody>(
        &self,
        i: usize,
        req: Request<B>,
        ctx: &Arc<ListenerContext>,
        peer: Peer,
    ) -> Reply {
        let (prefix, handle) = &self.routes[i];
        match handle {
            Route::Metrics => {
                let unread = discard(req);
                let res = match &ctx.process.metrics {
                    Some(m) => {
                        let mut res = http::Response::new(crate::wire::body::full(m.render()));
                        res.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static(
                                "text/plain; version=0.0.4; charset=utf-8",
                            ),
                        );
                        // Each scrape on a new connection: after a restart it
                        // reaches the new generation (see `metrics`).
                        res.headers_mut().insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("close"),
                        );
                        res
                    }
                    None => text(StatusCode::NOT_FOUND, "not found\n"),
                };
                Reply::Now(hold(res, unread))
            }
            Route::Proxy(proxy) => {
                let (proxy, prefix, ctx) = (proxy.clone(), prefix.clone(), ctx.clone());
                Reply::Later(Box::pin(async move {
                    proxy.handle(req, &prefix, &ctx, peer).await
                }))
            }
            Route::Respond { fixed, delay } if delay.is_zero() => {
                let (req, unread) = without_body(req);
                Reply::Now(hold(fixed.response(&req, ctx), unread))
            }
            Route::Redirect { to, status } => {
                let (req, unread) = without_body(req);
                Reply::Now(hold(redirect(&req, to, *status), unread))
            }
            Route::Status => {
                let unread = discard(req);
                Reply::Now(hold(status::response(ctx), unread))
            }
            Route::Respond { fixed, delay } => {
                let (req, unread) = without_body(req);
                // No delay: answered at once (no boxed future, no timer).
                if delay.is_zero() {
                    return Reply::Now(hold(fixed.response(&req, ctx), unread));
                }
                let (fixed, ctx, delay) = (fixed.clone(), ctx.clone(), *delay);
                Reply::Later(Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    hold(fixed.response(&req, &ctx), unread)
                }))
            }
            Route::Static(root) => {
                let (mut req, unread) = without_body(req);
                // A hot file is answered at once, from memory.
                if let Some(res) = crate::http::files::from_memory(&mut req, prefix, root) {
                    return Reply::Now(hold(res, unread));
                }
                let file = crate::http::files::serve(req, prefix.clone(), root.clone());
                match unread {
                    None => Reply::Later(Box::pin(file)),
                    Some(unread) => {
                        Reply::Later(Box::pin(async move { hold(file.await, Some(unread)) }))
                    }
                }
            }
        }
    }
}

/// The request without its body, which [`RequestBody::discard`] takes in;
/// and what the end of the answer waits for (see [`crate::wire::body::hold`]).
fn without_body<B: RequestBody>(req: Request<B>) -> (Request<()>, Option<Unread>) {
    let (parts, body) = req.into_parts();
    let unread = body.discard(parts.version);
    (Request::from_parts(parts, ()), unread)
}

/// Takes in the body of a request a route answers without it; what the end
/// of the answer waits for.
fn discard<B: RequestBody>(req: Request<B>) -> Option<Unread> {
    let version = req.version();
    req.into_body().discard(version)
}

impl Router {
    /// The routes' paths, in the order `handle` numbers them.
    pub(crate) fn prefixes(&self) -> Vec<String> {
        self.routes.iter().map(|(p, _)| p.to_string()).collect()
    }

    /// The route for `path`: the longest matching prefix.
    fn route(&self, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|(prefix, _)| path.starts_with(&**prefix))
    }
}

/// The most of an unused request body that is read and dropped.
const DISCARD_MAX: u64 = 16 * 1024 * 1024;
/// How long the next piece of an unused body may take.
const DISCARD_STALL: Duration = Duration::from_secs(10);

/// A request body that the route does not use is read and dropped, as
/// nginx's discard-body does, bounded in size and pace.
///
/// HTTP/1.1: after the answer, so the connection stays usable and the
/// client is never cut off mid-upload before it reads the answer; past a
/// bound the connection closes after the response, with a lingering close.
///
/// HTTP/2: the answer's head and data go out at once, and its END_STREAM
/// waits until the body is in (RFC 9113 section 8.1 lets a server answer
/// early; this is the way every client keeps): a client that stops reading
/// the connection once it has the whole answer (curl 7.88 does, and then
/// stalls on flow control, or fails on a reset) finishes its upload first,
/// and a client that sends its body only after the answer's head (issue
/// 12.3) is not kept waiting. The stream ends without a reset, so no DATA
/// ever arrives for a closed stream (h2 counts those, and ends the
/// connection at 1024). Past a bound the body is dropped: once the answer
/// is complete, h2 resets the stream with NO_ERROR.
impl RequestBody for Incoming {
    fn discard(self, version: http::Version) -> Option<Unread> {
        if hyper::body::Body::is_end_stream(&self) {
            return None;
        }
        if version == http::Version::HTTP_2 {
            return Some(Box::pin(read_and_drop(self)));
        }
        tokio::spawn(read_and_drop(self));
        None
    }
}

/// Reads `body` to its end, or to [`DISCARD_MAX`] bytes, or until a piece
/// takes longer than [`DISCARD_STALL`], and drops it.
async fn read_and_drop(mut body: Incoming) {
    use http_body_util::BodyExt;
    let mut read = 0u64;
    while read <= DISCARD_MAX {
        match tokio::time::timeout(DISCARD_STALL, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            _ => return,
        }
    }
}
