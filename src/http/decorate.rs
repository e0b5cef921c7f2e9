//! What a route does to its answers: `headers` (`set`, `add`, `remove`,
//! with `{host}`, `{remote}`, `{pid}`) and `cache` (`Cache-Control` for
//! answers that are not errors). The proxy's `request_headers` and
//! `response_headers` use the same rules.

use http::header::{self, HeaderMap, HeaderValue};

use crate::config::{Cache, HeaderRules, Piece, Template};
use crate::process::context::Peer;

/// A route's rules for its answers.
pub(crate) struct Decorate {
    headers: Option<HeaderRules>,
    /// The `Cache-Control` value.
    cache: Option<HeaderValue>,
}

impl Decorate {
    pub(crate) fn new(headers: Option<HeaderRules>, cache: Option<&Cache>) -> Option<Decorate> {
        let cache = cache.and_then(|c| {
            let mut v = match c.public {
                Some(true) => "public, ".to_string(),
                Some(false) => "private, ".to_string(),
                None => String::new(),
            };
            v += &format!("max-age={}", c.max_age.as_secs());
            if c.immutable {
                v.push_str(", immutable");
            }
            HeaderValue::from_str(&v).ok()
        });
        (headers.is_some() || cache.is_some()).then_some(Decorate { headers, cache })
    }

    /// Applies the rules to an answer to a request for `host` from `peer`.
    pub(crate) fn apply(
        &self,
        res: &mut http::Response<crate::wire::body::Body>,
        host: &str,
        peer: Peer,
    ) {
        if let Some(cache) = &self.cache {
            // Errors are not to be kept (RFC 9111 lets caches keep some).
            if res.status().as_u16() < 400 {
                res.headers_mut()
                    .insert(header::CACHE_CONTROL, cache.clone());
            }
        }
        if let Some(rules) = &self.headers {
            apply_rules(res.headers_mut(), rules, host, peer);
        }
    }
}

/// The route's `set`, `add` and `remove`, in that order.
pub(crate) fn apply_rules(h: &mut HeaderMap, rules: &HeaderRules, host: &str, peer: Peer) {
    if rules.is_empty() {
        return;
    }
    for name in &rules.remove {
        h.remove(name);
    }
    for (name, t) in &rules.set {
        if let Some(v) = render(t, host, peer) {
            h.insert(name.clone(), v);
        }
    }
    for (name, t) in &rules.add {
        if let Some(v) = render(t, host, peer) {
            h.append(name.clone(), v);
        }
    }
}

/// A rule's value with its placeholders filled in (none if the result is
/// not a valid field value, which only a client's `Host` could cause).
fn render(t: &Template, host: &str, peer: Peer) -> Option<HeaderValue> {
    if let [Piece::Text(s)] = t.0.as_slice() {
        return HeaderValue::from_str(s).ok();
    }
    let mut out = String::new();
    for p in &t.0 {
        match p {
            Piece::Text(s) => out.push_str(s),
            Piece::Host => out.push_str(host),
            Piece::Remote => out.push_str(&peer.addr.ip().to_string()),
            Piece::Pid => out.push_str(&std::process::id().to_string()),
        }
    }
    HeaderValue::from_str(&out).ok()
}
