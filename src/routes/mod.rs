//! The routes of a listener: a request goes to the route with the longest
//! matching path prefix (after [`path::normalize`]), whose action answers it:
//! `respond` and `redirect` ([`respond`]), `status` ([`status`]), `static`
//! ([`crate::files`]) and `proxy` ([`crate::proxy`]).

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use hyper::body::Incoming;

use crate::body::{text, Reply, RequestBody};
use crate::config::{Action, ConfigError, ListenerConfig};
use crate::context::{ListenerContext, Peer};

/// What a route does. What a deferred answer needs is behind an `Arc`, so
/// its future takes its own handle on it.
enum Route {
    Metrics,
    Respond { fixed: Arc<Fixed>, delay: Duration },
    Static(Arc<crate::files::Root>),
    Redirect { to: String, status: StatusCode },
    Status,
    Proxy(Arc<crate::proxy::Proxy>),
}

mod path;
mod respond;
mod status;

use respond::{redirect, Fixed};

/// The routes of one listener, longest prefix first.
pub struct Router {
    routes: Vec<(Arc<str>, Route)>,
    /// Where pending ACME http-01 answers are, when this (plain) listener
    /// serves them under `/.well-known/acme-challenge/`.
    acme_http: Option<std::path::PathBuf>,
}

impl Router {
    /// Builds the routes of `listener`; checks that static roots are directories.
    pub fn new(
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
                Action::Static { root, index } => {
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
                    Route::Static(Arc::new(crate::files::Root {
                        root: canonical,
                        index: index.clone(),
                    }))
                }
                Action::Redirect { to, status } => Route::Redirect {
                    to: to.clone(),
                    status: *status,
                },
                Action::Status => Route::Status,
                Action::Metrics => Route::Metrics,
                Action::Proxy {
                    target,
                    connect_timeout,
                    timeout,
                    strip_prefix,
                    max_body,
                } => Route::Proxy(Arc::new(crate::proxy::Proxy::new(
                    target,
                    *connect_timeout,
                    *timeout,
                    *strip_prefix,
                    *max_body,
                ))),
            };
            routes.push((Arc::<str>::from(r.path.as_str()), handle));
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
        Ok(Router { routes, acme_http })
    }

    /// Answers `req`: at once for fixed responses, redirects and `status`
    /// (no allocation for the future on the hot path), or with a future for
    /// what waits (a `delay`, files, the proxy). Every route but the proxy
    /// leaves the request body to [`discard`].
    #[inline]
    pub fn handle<B: RequestBody>(
        &self,
        mut req: Request<B>,
        ctx: &Arc<ListenerContext>,
        peer: Peer,
        taken: &mut Option<usize>,
    ) -> Reply {
        let path = req.uri().path();
        if let Some(dir) = &self.acme_http {
            if let Some(token) = path.strip_prefix("/.well-known/acme-challenge/") {
                let file = crate::acme::http_answer_file(dir, token);
                req.into_body().discard();
                // Read on tokio's blocking threads, not the serving thread.
                return Reply::Later(Box::pin(async move {
                    let answer = match file {
                        Some(file) => tokio::fs::read(file).await.ok(),
                        None => None,
                    };
                    match answer {
                        Some(answer) => {
                            let mut res = http::Response::new(crate::body::full(answer));
                            res.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("application/octet-stream"),
                            );
                            res
                        }
                        None => text(StatusCode::NOT_FOUND, "not found\n"),
                    }
                }));
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
                req.into_body().discard();
                return Reply::Now(text(StatusCode::BAD_REQUEST, "bad request\n"));
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
            req.into_body().discard();
            return Reply::Now(text(StatusCode::NOT_FOUND, "not found\n"));
        };
        *taken = Some(i);
        let (prefix, handle) = &self.routes[i];
        match handle {
            Route::Metrics => {
                req.into_body().discard();
                Reply::Now(match &ctx.process.metrics {
                    Some(m) => {
                        let mut res = http::Response::new(crate::body::full(m.render()));
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
                })
            }
            Route::Proxy(proxy) => {
                let (proxy, prefix, ctx) = (proxy.clone(), prefix.clone(), ctx.clone());
                Reply::Later(Box::pin(async move {
                    proxy.handle(req, &prefix, &ctx, peer).await
                }))
            }
            Route::Respond { fixed, delay } if delay.is_zero() => {
                Reply::Now(fixed.response(&without_body(req), ctx))
            }
            Route::Redirect { to, status } => Reply::Now(redirect(&without_body(req), to, *status)),
            Route::Status => {
                req.into_body().discard();
                Reply::Now(status::response(ctx))
            }
            Route::Respond { fixed, delay } => {
                let (req, fixed, ctx, delay) =
                    (without_body(req), fixed.clone(), ctx.clone(), *delay);
                Reply::Later(Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    fixed.response(&req, &ctx)
                }))
            }
            Route::Static(root) => Reply::Later(Box::pin(crate::files::serve(
                without_body(req),
                prefix.clone(),
                root.clone(),
            ))),
        }
    }
}

/// The request without its body, which [`discard`] reads and drops.
fn without_body<B: RequestBody>(req: Request<B>) -> Request<()> {
    let (parts, body) = req.into_parts();
    body.discard();
    Request::from_parts(parts, ())
}

impl Router {
    /// The routes' paths, in the order `handle` numbers them.
    pub fn prefixes(&self) -> Vec<String> {
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

/// Reads and drops a request body that the route does not use, as nginx's
/// discard-body does, so that answering early loses nothing: on HTTP/2 the
/// stream ends without a reset (resets count against the connection, and
/// h2 tears it down at its limit with other requests in flight); on
/// HTTP/1.1 the connection stays usable, and the client is never cut off
/// mid-upload before it reads the answer. Bounded in size and pace: past
/// either bound the body is dropped (HTTP/2: RST_STREAM; HTTP/1.1: the
/// connection closes after the response, with a lingering close).
impl RequestBody for Incoming {
    fn discard(self) {
        discard(self)
    }
}

/// See [`RequestBody::discard`].
fn discard(body: Incoming) {
    use http_body_util::BodyExt;
    if hyper::body::Body::is_end_stream(&body) {
        return;
    }
    tokio::spawn(async move {
        let mut body = body;
        let mut read = 0u64;
        while read <= DISCARD_MAX {
            match tokio::time::timeout(DISCARD_STALL, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    read += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                _ => return,
            }
        }
    });
}
