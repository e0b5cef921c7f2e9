//! `respond` (a fixed answer, with `{pid}`-style placeholders) and
//! `redirect`.

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};

use crate::process::context::ListenerContext;
use crate::wire::body::{full, text, Body};

/// A `respond` route's response.
pub(super) struct Fixed {
    status: StatusCode,
    body: Template,
    headers: Vec<(http::HeaderName, HeaderValue)>,
}

impl Fixed {
    pub(super) fn new(
        status: StatusCode,
        body: &str,
        headers: Vec<(http::HeaderName, HeaderValue)>,
    ) -> Fixed {
        Fixed {
            status,
            body: Template::parse(body),
            headers,
        }
    }

    #[inline]
    pub(super) fn response<B>(&self, req: &Request<B>, ctx: &ListenerContext) -> Response<Body> {
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

/// A redirect to `to`, with `{host}` and `{uri}` filled in from `req`.
pub(super) fn redirect<B>(req: &Request<B>, to: &str, status: StatusCode) -> Response<Body> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
