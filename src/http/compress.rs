//! `compress:` answers in zstd, Brotli or gzip, as the client's
//! `Accept-Encoding` prefers (RFC 9110 section 12.5.3, q-values,
//! `identity;q=0`), the route's order breaking ties.
//!
//! An answer is compressed when it is a 200 with a compressible type (text,
//! JSON, JavaScript, XML, SVG, WebAssembly, fonts), at least `min_size` when
//! its length is known, without a `Content-Encoding` or `Cache-Control:
//! no-transform`, and not for a range request. `Vary: Accept-Encoding` goes on
//! every answer of a compressible type, compressed or not. A compressed
//! answer's ETag is the identity one with `-gzip`, `-br` or `-zstd` before its
//! closing quote; the request's `If-None-Match` is given back its identity
//! tags, so a route's own conditional logic answers 304 for either.
//!
//! Bodies compress as they stream (async-compression's encoders): what the
//! route has ready is compressed together, and whatever is compressed is
//! flushed whenever the route has nothing more ready, so server-sent events
//! arrive one by one.

use std::pin::Pin;
use std::task::{Context, Poll};

use async_compression::tokio::write::{BrotliEncoder, GzipEncoder, ZstdEncoder};
use async_compression::Level;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use hyper::body::{Frame, SizeHint};
use tokio::io::AsyncWrite;

use crate::config::{CompressConfig, CompressLevel, Encoding};
use crate::wire::body::{Body, BoxError};

/// Output gathered before it is sent on, when the route has more ready.
const CHUNK: usize = 32 * 1024;

/// The type of the representation a 304 stands for, when the route knows
/// it (a 304 carries no `Content-Type`).
#[derive(Clone)]
pub(crate) struct Representation(pub(crate) HeaderValue);

/// What the negotiation chose for a request, and whether its
/// `If-None-Match` named that variant.
#[derive(Clone, Copy)]
pub(crate) struct Chosen(Option<Encoding>, bool);

impl Chosen {
    pub(crate) fn encoding(&self) -> Option<Encoding> {
        self.0
    }
}

/// An answer a route made in encoding `e` (a precompressed file): marked as
/// such, with the variant's validator (`tag`, if the route made it already
/// with [`variant_etag`]) and `Vary`.
pub(crate) fn precompressed(res: &mut Response<Body>, e: Encoding, tag: Option<HeaderValue>) {
    res.headers_mut().insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(e.token()),
    );
    res.headers_mut().remove(header::ACCEPT_RANGES);
    match tag {
        Some(tag) => {
            res.headers_mut().insert(header::ETAG, tag);
        }
        None => variant_tag(res, e),
    }
    vary(res.headers_mut());
}

/// The encoding `accept` (the request's `Accept-Encoding`) prefers among
/// `offered` (in the route's order of preference).
pub(crate) fn negotiate(headers: &HeaderMap, offered: &[Encoding]) -> Chosen {
    // The q-value each encoding is first named with (no allocation: this
    // runs for every request of a compressing route).
    let mut named: [Option<u16>; 3] = [None; 3];
    let mut star: Option<u16> = None;
    for v in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',') {
            let mut parts = item.split(';');
            let token = parts.next().unwrap_or("").trim();
            let q = parts
                .filter_map(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .or_else(|| p.trim().strip_prefix("Q="))
                })
                .find_map(qvalue)
                .unwrap_or(1000);
            if token == "*" {
                star = Some(q);
                continue;
            }
            let kind = [Encoding::Zstd, Encoding::Br, Encoding::Gzip]
                .into_iter()
                .find(|e| {
                    token.eq_ignore_ascii_case(e.token())
                        || (*e == Encoding::Gzip && token.eq_ignore_ascii_case("x-gzip"))
                });
            if let Some(e) = kind {
                named[e as usize].get_or_insert(q);
            }
        }
    }
    let mut best: Option<(u16, usize, Encoding)> = None;
    for (rank, e) in offered.iter().enumerate() {
        let q = named[*e as usize].or(star).unwrap_or(0);
        if q > 0 && best.is_none_or(|(bq, br, _)| q > bq || (q == bq && rank < br)) {
            best = Some((q, rank, *e));
        }
    }
    Chosen(best.map(|(_, _, e)| e), false)
}

/// A q-value: 0 to 1 with up to three decimals, in thousandths.
fn qvalue(s: &str) -> Option<u16> {
    let v: f32 = s.trim().parse().ok()?;
    (0.0..=1.0)
        .contains(&v)
        .then(|| (v * 1000.0).round() as u16)
}

impl Encoding {
    pub(crate) fn token(self) -> &'static str {
        match self {
            Encoding::Zstd => "zstd",
            Encoding::Br => "br",
            Encoding::Gzip => "gzip",
        }
    }
}

/// Before the route runs: `If-None-Match` tags of the chosen variant become
/// the identity's, which the route knows.
pub(crate) fn request(headers: &mut HeaderMap, chosen: &mut Chosen) {
    let Chosen(Some(e), _) = *chosen else { return };
    let Some(v) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    let suffix = format!("-{}\"", e.token());
    if !v.contains(&suffix) {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(&v.replace(&suffix, "\"")) {
        headers.insert(header::IF_NONE_MATCH, v);
        chosen.1 = true;
    }
}

/// After the route: the answer, compressed with `chosen` if it qualifies.
pub(crate) fn response(
    mut res: Response<Body>,
    chosen: Chosen,
    c: &CompressConfig,
    head: bool,
    ranged: bool,
) -> Response<Body> {
    let status = res.status();
    let h = res.headers();
    if status == StatusCode::NOT_MODIFIED {
        // A 304 has the `Vary` its 200 would have: by the type the route
        // says it stands for, or always when it cannot say (a proxied
        // 304, whose 200 may be compressed).
        let would_vary = res
            .extensions()
            .get::<Representation>()
            .is_none_or(|r| type_compressible(r.0.to_str().unwrap_or("")));
        if !would_vary {
            return res;
        }
    } else if h.contains_key(header::CONTENT_ENCODING) || !compressible(h) {
        return res;
    }
    vary(res.headers_mut());
    let Chosen(Some(e), asked_variant) = chosen else {
        return res;
    };
    if status == StatusCode::NOT_MODIFIED {
        // Not modified: the variant the client holds, if it asked by it.
        if asked_variant {
            variant_tag(&mut res, e);
        }
        return res;
    }
    let h = res.headers();
    let no_transform = h
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("no-transform"));
    let small = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .or_else(|| hyper::body::Body::size_hint(res.body()).exact())
        .is_some_and(|n| n < c.min_size);
    if status != StatusCode::OK || no_transform || ranged || small {
        return res;
    }
    variant_tag(&mut res, e);
    let h = res.headers_mut();
    h.remove(header::CONTENT_LENGTH);
    h.remove(header::ACCEPT_RANGES);
    h.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(e.token()),
    );
    if head {
        return res;
    }
    res.map(|body| Body::new(Compressed::new(body, e, c.level)))
}

/// The ETag of the `e` variant: the identity's with `-e` before its quote.
fn variant_tag(res: &mut Response<Body>, e: Encoding) {
    let tag = res
        .headers()
        .get(header::ETAG)
        .and_then(|v| variant_etag(v.to_str().ok()?, e));
    if let Some(tag) = tag {
        res.headers_mut().insert(header::ETAG, tag);
    }
}

/// `etag` (the identity's) as the `e` variant's.
pub(crate) fn variant_etag(etag: &str, e: Encoding) -> Option<HeaderValue> {
    let open = etag.strip_suffix('"')?;
    HeaderValue::from_str(&format!("{open}-{}\"", e.token())).ok()
}

/// Adds `Accept-Encoding` to `Vary` (once).
fn vary(h: &mut HeaderMap) {
    let has = h
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("accept-encoding") || t.trim() == "*");
    if !has {
        h.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// Types worth compressing: text and its kin, not media or archives (which
/// are compressed already).
fn compressible(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(type_compressible)
}

/// Is a `Content-Type` value of a type worth compressing?
fn type_compressible(ct: &str) -> bool {
    let ct = ct.split(';').next().unwrap_or("").trim();
    // Lowercased only if it must be (types are written lowercase).
    let ct: std::borrow::Cow<str> = match ct.bytes().any(|b| b.is_ascii_uppercase()) {
        true => ct.to_ascii_lowercase().into(),
        false => ct.into(),
    };
    ct.starts_with("text/")
        || ct.ends_with("+json")
        || ct.ends_with("+xml")
        || matches!(
            ct.as_ref(),
            "application/json"
                | "application/javascript"
                | "application/x-javascript"
                | "application/ecmascript"
                | "application/xml"
                | "application/wasm"
                | "application/manifest+json"
                | "image/svg+xml"
                | "image/x-icon"
                | "image/vnd.microsoft.icon"
                | "font/ttf"
                | "font/otf"
                | "application/vnd.ms-fontobject"
        )
}

/// Brotli's state is large (5.6 KB): boxed, so the others do not pay for it.
enum Encoder {
    Gzip(GzipEncoder<Vec<u8>>),
    Br(Box<BrotliEncoder<Vec<u8>>>),
    Zstd(ZstdEncoder<Vec<u8>>),
}

impl Encoder {
    fn writer(&mut self) -> Pin<&mut (dyn AsyncWrite + Send + Unpin)> {
        match self {
            Encoder::Gzip(e) => Pin::new(e),
            Encoder::Br(e) => Pin::new(&mut **e),
            Encoder::Zstd(e) => Pin::new(e),
        }
    }

    fn output(&mut self) -> &mut Vec<u8> {
        match self {
            Encoder::Gzip(e) => e.get_mut(),
            Encoder::Br(e) => e.get_mut(),
            Encoder::Zstd(e) => e.get_mut(),
        }
    }

    /// Writing to a `Vec` never waits: each call completes.
    fn write(&mut self, mut data: &[u8], cx: &mut Context<'_>) -> std::io::Result<()> {
        while !data.is_empty() {
            match self.writer().poll_write(cx, data) {
                Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => data = &data[n..],
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Err(std::io::ErrorKind::WouldBlock.into()),
            }
        }
        Ok(())
    }

    fn flush(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        match self.writer().poll_flush(cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }

    fn finish(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        match self.writer().poll_shutdown(cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }

    fn take(&mut self) -> Option<Bytes> {
        let out = std::mem::take(self.output());
        (!out.is_empty()).then(|| Bytes::from(out))
    }
}

/// A body compressed as it streams.
struct Compressed {
    inner: Body,
    encoder: Encoder,
    /// Trailers that came after the data, sent once the rest is.
    trailers: Option<HeaderMap>,
    done: bool,
}

impl Compressed {
    fn new(inner: Body, e: Encoding, level: CompressLevel) -> Compressed {
        let level = match (level, e) {
            (CompressLevel::Default, Encoding::Gzip) => Level::Precise(6),
            (CompressLevel::Default, Encoding::Br) => Level::Precise(4),
            (CompressLevel::Default, Encoding::Zstd) => Level::Precise(3),
            (CompressLevel::Fastest, _) => Level::Fastest,
            (CompressLevel::Best, _) => Level::Best,
            (CompressLevel::Precise(n), _) => Level::Precise(n),
        };
        let out = Vec::new();
        let encoder = match e {
            Encoding::Gzip => Encoder::Gzip(GzipEncoder::with_quality(out, level)),
            Encoding::Br => Encoder::Br(Box::new(BrotliEncoder::with_quality(out, level))),
            Encoding::Zstd => Encoder::Zstd(ZstdEncoder::with_quality(out, level)),
        };
        Compressed {
            inner,
            encoder,
            trailers: None,
            done: false,
        }
    }
}

impl hyper::body::Body for Compressed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.encoder.write(&data, cx)?;
                        if this.encoder.output().len() >= CHUNK {
                            if let Some(out) = this.encoder.take() {
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                        }
                    }
                    Err(frame) => {
                        // Trailers end the body.
                        this.trailers = frame.into_trailers().ok();
                        this.encoder.finish(cx)?;
                        this.done = true;
                        if let Some(out) = this.encoder.take() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    this.encoder.finish(cx)?;
                    this.done = true;
                    if let Some(out) = this.encoder.take() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Poll::Pending => {
                    // Nothing more ready: send what is compressed so far.
                    this.encoder.flush(cx)?;
                    return match this.encoder.take() {
                        Some(out) => Poll::Ready(Some(Ok(Frame::data(out)))),
                        None => Poll::Pending,
                    };
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, v.parse().unwrap());
        h
    }

    const ALL: [Encoding; 3] = [Encoding::Zstd, Encoding::Br, Encoding::Gzip];

    #[test]
    fn negotiation_follows_q_values_then_our_order() {
        let pick = |v: &str| negotiate(&accept(v), &ALL).0.map(|e| e.token());
        assert_eq!(pick("gzip, br, zstd"), Some("zstd"));
        assert_eq!(pick("gzip, br"), Some("br"));
        assert_eq!(pick("gzip;q=1, br;q=0.5"), Some("gzip"));
        assert_eq!(pick("br;q=0, gzip;q=0.1"), Some("gzip"));
        assert_eq!(pick("*"), Some("zstd"));
        assert_eq!(pick("*;q=0.5, zstd;q=0"), Some("br"));
        assert_eq!(pick("identity"), None);
        assert_eq!(pick("deflate"), None);
        assert_eq!(pick("x-gzip"), Some("gzip"));
        assert_eq!(negotiate(&HeaderMap::new(), &ALL).0, None);
    }

    #[test]
    fn a_variant_s_tag_is_given_back_as_the_identity_s() {
        let mut h = HeaderMap::new();
        h.insert(
            header::IF_NONE_MATCH,
            "\"abc-br\", \"def\"".parse().unwrap(),
        );
        let mut chosen = Chosen(Some(Encoding::Br), false);
        request(&mut h, &mut chosen);
        assert_eq!(h[header::IF_NONE_MATCH], "\"abc\", \"def\"");
        assert!(chosen.1);
    }
}
