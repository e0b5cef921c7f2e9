//! The route actions of the config: `respond`, `static`, `redirect`, `status`.
//! A request goes to the route with the longest matching path prefix.

use std::borrow::Cow;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::config::{Action, ConfigError, ListenerConfig};
use crate::drain::Drain;
use crate::service::{full, text, Body, Reply};

/// Facts about this process that responses report.
pub struct ProcessInfo {
    pub pid: u32,
    pub generation: u64,
    pub started_at: SystemTime,
    pub started: std::time::Instant,
    /// name, address (as bound), tls.
    pub listeners: Vec<(String, String, bool)>,
    /// Per worker thread: counted where the requests run, summed on demand.
    pub workers: Vec<Arc<crate::serve::WorkerStats>>,
    pub proxied_total: AtomicU64,
    pub upstream_errors_total: AtomicU64,
    /// Proxied requests whose body the client broke (answered 400).
    pub client_errors_total: AtomicU64,
    pub drain: Drain,
}

impl ProcessInfo {
    /// Requests being answered now, over all workers.
    pub fn requests_in_flight(&self) -> u64 {
        self.workers
            .iter()
            .map(|w| w.in_flight.load(Ordering::Relaxed))
            .sum()
    }
}

/// What a request's handler knows about where it arrived.
pub struct ListenerContext {
    pub name: String,
    pub process: Arc<ProcessInfo>,
}

/// What a route does. What a deferred answer needs is behind an `Arc`, so
/// its future takes its own handle on it.
enum Handle {
    Respond { fixed: Arc<Fixed>, delay: Duration },
    Static(Arc<crate::files::Root>),
    Redirect { to: String, status: StatusCode },
    Status,
    Proxy(Arc<crate::proxy::Proxy>),
}

/// A `respond` route's response.
struct Fixed {
    status: StatusCode,
    body: Template,
    headers: Vec<(http::HeaderName, HeaderValue)>,
}

impl Fixed {
    #[inline]
    fn response<B>(&self, req: &Request<B>, ctx: &ListenerContext) -> Response<Body> {
        let body = self.body.render(ctx, req);
        let mut res = Response::new(full(body));
        *res.status_mut() = self.status;
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        for (k, v) in &self.headers {
            h.insert(k.clone(), v.clone());
        }
        res
    }
}

/// A response body with `{pid}`-style placeholders, split once at load.
/// One that names only facts of the process (`{pid}`, `{generation}`,
/// `{listener}`) is rendered once, at its first request.
enum Template {
    Fixed(Bytes),
    Parts {
        parts: Vec<Part>,
        per_request: bool,
        rendered: std::sync::OnceLock<Bytes>,
    },
}

enum Part {
    Lit(String),
    Pid,
    Generation,
    Listener,
    Host,
    Path,
}

impl Template {
    fn parse(s: &str) -> Template {
        if !s.contains('{') {
            return Template::Fixed(Bytes::copy_from_slice(s.as_bytes()));
        }
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(start) = rest.find('{') {
            let (lit, tail) = rest.split_at(start);
            let var = tail.find('}').map(|end| (&tail[1..end], end));
            let part = match var.map(|(v, _)| v) {
                Some("pid") => Some(Part::Pid),
                Some("generation") => Some(Part::Generation),
                Some("listener") => Some(Part::Listener),
                Some("host") => Some(Part::Host),
                Some("path") => Some(Part::Path),
                _ => None,
            };
            match (part, var) {
                (Some(p), Some((_, end))) => {
                    parts.push(Part::Lit(lit.to_string()));
                    parts.push(p);
                    rest = &tail[end + 1..];
                }
                _ => {
                    parts.push(Part::Lit(format!("{lit}{{")));
                    rest = &tail[1..];
                }
            }
        }
        parts.push(Part::Lit(rest.to_string()));
        Template::Parts {
            per_request: parts.iter().any(|p| matches!(p, Part::Host | Part::Path)),
            parts,
            rendered: std::sync::OnceLock::new(),
        }
    }

    fn render<B>(&self, ctx: &ListenerContext, req: &Request<B>) -> Bytes {
        match self {
            Template::Fixed(b) => b.clone(),
            Template::Parts {
                parts,
                per_request: false,
                rendered,
            } => rendered.get_or_init(|| Self::fill(parts, ctx, req)).clone(),
            Template::Parts { parts, .. } => Self::fill(parts, ctx, req),
        }
    }

    fn fill<B>(parts: &[Part], ctx: &ListenerContext, req: &Request<B>) -> Bytes {
        let mut out = String::new();
        for p in parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Pid => out.push_str(&ctx.process.pid.to_string()),
                Part::Generation => out.push_str(&ctx.process.generation.to_string()),
                Part::Listener => out.push_str(&ctx.name),
                Part::Host => out.push_str(host_of(req).unwrap_or("")),
                Part::Path => out.push_str(req.uri().path()),
            }
        }
        Bytes::from(out)
    }
}

/// The routes of one listener, longest prefix first.
pub struct Router {
    routes: Vec<(Arc<str>, Handle)>,
}

impl Router {
    /// Builds the routes of `listener`; checks that static roots are directories.
    pub fn new(file: &Path, listener: &ListenerConfig) -> Result<Router, ConfigError> {
        let mut routes = Vec::new();
        for r in &listener.routes {
            let handle = match &r.action {
                Action::Respond {
                    status,
                    body,
                    headers,
                    delay,
                } => Handle::Respond {
                    fixed: Arc::new(Fixed {
                        status: *status,
                        body: Template::parse(body),
                        headers: headers.clone(),
                    }),
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
                    Handle::Static(Arc::new(crate::files::Root {
                        dir: tower_http::services::ServeDir::new(&canonical)
                            .append_index_html_on_directories(false),
                        root: canonical,
                        index: index.clone(),
                    }))
                }
                Action::Redirect { to, status } => Handle::Redirect {
                    to: to.clone(),
                    status: *status,
                },
                Action::Status => Handle::Status,
                Action::Proxy {
                    upstream,
                    connect_timeout,
                    timeout,
                    strip_prefix,
                    max_body,
                } => Handle::Proxy(Arc::new(crate::proxy::Proxy::new(
                    upstream,
                    *connect_timeout,
                    *timeout,
                    *strip_prefix,
                    *max_body,
                ))),
            };
            routes.push((Arc::<str>::from(r.path.as_str()), handle));
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
        Ok(Router { routes })
    }

    /// Answers `req`: at once for fixed responses, redirects and `status`
    /// (no allocation for the future on the hot path), or with a future for
    /// what waits (a `delay`, files, the proxy). Every route but the proxy
    /// leaves the request body to [`discard`].
    #[inline]
    pub fn handle(
        &self,
        mut req: Request<Incoming>,
        ctx: &Arc<ListenerContext>,
        peer: crate::proxy::Peer,
    ) -> Reply {
        let path = req.uri().path();
        let mut route = self.route(path);
        // Routes match the normalised path (and a proxy forwards it), so
        // `/api/../admin` is `/admin`. A static route keeps the raw path:
        // it refuses escapes from its root itself, with 404 (SPEC section 5).
        let normal = normalize(path);
        if !matches!(normal, Ok(Cow::Borrowed(_)))
            && !route.is_some_and(|i| matches!(self.routes[i].1, Handle::Static(_)))
        {
            let Ok(normal) = normal else {
                discard(req.into_body());
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
            discard(req.into_body());
            return Reply::Now(text(StatusCode::NOT_FOUND, "not found\n"));
        };
        let (prefix, handle) = &self.routes[i];
        match handle {
            Handle::Proxy(proxy) => {
                let (proxy, prefix, ctx) = (proxy.clone(), prefix.clone(), ctx.clone());
                Reply::Later(Box::pin(async move {
                    proxy.handle(req, &prefix, &ctx, peer).await
                }))
            }
            Handle::Respond { fixed, delay } if delay.is_zero() => {
                Reply::Now(fixed.response(&without_body(req), ctx))
            }
            Handle::Redirect { to, status } => {
                Reply::Now(redirect(&without_body(req), to, *status))
            }
            Handle::Status => {
                discard(req.into_body());
                Reply::Now(status_response(ctx))
            }
            Handle::Respond { fixed, delay } => {
                let (req, fixed, ctx, delay) =
                    (without_body(req), fixed.clone(), ctx.clone(), *delay);
                Reply::Later(Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    fixed.response(&req, &ctx)
                }))
            }
            Handle::Static(root) => Reply::Later(Box::pin(crate::files::serve(
                without_body(req),
                prefix.clone(),
                root.clone(),
            ))),
        }
    }
}

/// The request without its body, which [`discard`] reads and drops.
fn without_body(req: Request<Incoming>) -> Request<()> {
    let (parts, body) = req.into_parts();
    discard(body);
    Request::from_parts(parts, ())
}

impl Router {
    /// The route for `path`: the longest matching prefix.
    fn route(&self, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|(prefix, _)| path.starts_with(&**prefix))
    }
}

/// The path routes match (RFC 3986 section 6.2.2): escapes of unreserved
/// characters decoded, other escapes upper-cased, dot segments removed.
/// Borrowed when there is nothing to change (nearly always). `Err` for what
/// no route may see: an encoded `/`, `\` or NUL (they would change what
/// the path means to whoever decodes it next), a malformed escape, or dot
/// segments that climb above the root.
fn normalize(path: &str) -> Result<Cow<'_, str>, ()> {
    if !path.contains('%') && !path.contains("/.") {
        return Ok(Cow::Borrowed(path));
    }
    let b = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            decoded.push(b[i] as char);
            i += 1;
            continue;
        }
        let hex = b.get(i + 1..i + 3).ok_or(())?;
        let hex = std::str::from_utf8(hex).map_err(|_| ())?;
        let byte = u8::from_str_radix(hex, 16).map_err(|_| ())?;
        match byte {
            b'/' | b'\\' | 0 => return Err(()),
            c if c.is_ascii_alphanumeric() || b"-._~".contains(&c) => decoded.push(c as char),
            c => decoded.push_str(&format!("%{c:02X}")),
        }
        i += 3;
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    for (n, seg) in segments.iter().enumerate() {
        let last = n + 1 == segments.len();
        match *seg {
            "." => {}
            ".." => {
                out.pop().ok_or(())?;
            }
            s => out.push(s),
        }
        // A trailing `.` or `..` leaves a directory: keep its slash.
        if last && (*seg == "." || *seg == "..") {
            out.push("");
        }
    }
    let normal = format!("/{}", out.join("/"));
    Ok(if normal == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(normal)
    })
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

/// A redirect to `to`, with `{host}` and `{uri}` filled in from `req`.
fn redirect<B>(req: &Request<B>, to: &str, status: StatusCode) -> Response<Body> {
    let host = strip_port(host_of(req).unwrap_or("localhost"));
    let uri = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let location = to.replace("{host}", host).replace("{uri}", uri);
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            let mut res = Response::new(full(Bytes::new()));
            *res.status_mut() = status;
            res.headers_mut().insert(header::LOCATION, v);
            res
        }
        Err(_) => text(StatusCode::BAD_REQUEST, "bad request\n"),
    }
}

/// The request's host: the `Host` header (HTTP/1.1) or the URI authority (HTTP/2).
fn host_of<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

fn strip_port(host: &str) -> &str {
    if let Some(end) = host.strip_prefix('[').and_then(|h| h.find(']')) {
        return &host[..end + 2];
    }
    host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
}

fn status_response(ctx: &ListenerContext) -> Response<Body> {
    let p = &ctx.process;
    let listeners: Vec<serde_json::Value> = p
        .listeners
        .iter()
        .map(|(name, addr, tls)| serde_json::json!({"name": name, "addr": addr, "tls": tls}))
        .collect();
    let body = serde_json::json!({
        "pid": p.pid,
        "generation": p.generation,
        "version": env!("CARGO_PKG_VERSION"),
        "started_at": rfc3339(p.started_at),
        "uptime_s": p.started.elapsed().as_secs_f64(),
        "listeners": listeners,
        "connections_active": p.drain.active(),
        "requests_total": p.workers.iter().map(|w| w.requests_total.load(Ordering::Relaxed)).sum::<u64>(),
        "proxied_total": p.proxied_total.load(Ordering::Relaxed),
        "upstream_errors_total": p.upstream_errors_total.load(Ordering::Relaxed),
        "client_errors_total": p.client_errors_total.load(Ordering::Relaxed),
        "upgraded_active": p.drain.upgraded_active(),
        "workers": p.workers.iter().map(|w| serde_json::json!({
            "connections": w.connections.load(Ordering::Relaxed),
            "requests_total": w.requests_total.load(Ordering::Relaxed),
        })).collect::<Vec<_>>(),
        "draining": p.drain.is_draining(),
    });
    let mut res = Response::new(full(body.to_string() + "\n"));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// `2026-11-25T21:01:55Z` from a system time (UTC, seconds).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_640_515);
        assert_eq!(rfc3339(t), "2026-11-25T21:01:55Z");
    }

    #[test]
    fn paths_are_normalised_for_routing() {
        let n = |p| normalize(p).map(|c| c.into_owned());
        assert_eq!(n("/api/x"), Ok("/api/x".into()));
        assert!(matches!(normalize("/api/x"), Ok(Cow::Borrowed(_))));
        assert_eq!(n("/api/../admin"), Ok("/admin".into()));
        assert_eq!(n("/api/%2e%2e/admin"), Ok("/admin".into()));
        assert_eq!(n("/api/./a/./b"), Ok("/api/a/b".into()));
        assert_eq!(n("/a/b/.."), Ok("/a/".into()));
        assert_eq!(n("/%7euser/%41"), Ok("/~user/A".into()));
        assert_eq!(n("/a%20b/%c3%a9"), Ok("/a%20b/%C3%A9".into()));
        assert_eq!(n("/.well-known/x"), Ok("/.well-known/x".into()));
        assert_eq!(n("/api/a%2fb"), Err(()));
        assert_eq!(n("/api/a%00"), Err(()));
        assert_eq!(n("/api/a%5cb"), Err(()));
        assert_eq!(n("/../etc"), Err(()));
        assert_eq!(n("/a/%zz"), Err(()));
    }

    #[test]
    fn templates_and_hosts() {
        assert_eq!(strip_port("example.com:8443"), "example.com");
        assert_eq!(strip_port("[::1]:8443"), "[::1]");
        assert_eq!(strip_port("example.com"), "example.com");
        assert!(matches!(
            Template::parse("x {nope} y"),
            Template::Parts {
                per_request: false,
                ..
            }
        ));
        assert!(matches!(
            Template::parse("{pid} {path}"),
            Template::Parts {
                per_request: true,
                ..
            }
        ));
    }
}
