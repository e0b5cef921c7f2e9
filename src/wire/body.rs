//! Response bodies and small responses shared by every route action and by
//! the connection code: [`Body`] (a known buffer, or any body boxed),
//! [`Reply`] (a response now, or one to wait for), and helpers.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body::{Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body type every service is turned into: bytes known in
/// full (the fixed responses of the hot path: no allocation, no dynamic
/// dispatch), or any other body, boxed.
pub(crate) struct Body(Kind);

enum Kind {
    Full(Option<Bytes>),
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl Body {
    /// No body at all (a GET's).
    pub(crate) const fn empty() -> Body {
        Body(Kind::Full(None))
    }

    /// Boxes any body.
    pub(crate) fn new<B>(body: B) -> Body
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Body(Kind::Boxed(body.map_err(Into::into).boxed_unsync()))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }
    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Full(data) => data.is_none(),
            Kind::Boxed(b) => b.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Kind::Boxed(b) => b.size_hint(),
        }
    }
}

/// A request's body as an application's service gets it, whichever HTTP
/// version brought it: HTTP/1.1 and HTTP/2 (hyper's), or HTTP/3. It is an
/// [`http_body::Body`] of [`Bytes`], as axum and tower services take.
pub struct IncomingBody(Incoming);

enum Incoming {
    Hyper(hyper::body::Incoming),
    Other(Pin<Box<dyn http_body::Body<Data = Bytes, Error = BoxError> + Send + 'static>>),
}

impl IncomingBody {
    /// Any other body (HTTP/3's).
    pub(crate) fn boxed(
        b: impl http_body::Body<Data = Bytes, Error = BoxError> + Send + 'static,
    ) -> IncomingBody {
        IncomingBody(Incoming::Other(Box::pin(b)))
    }
}

impl From<hyper::body::Incoming> for IncomingBody {
    fn from(b: hyper::body::Incoming) -> IncomingBody {
        IncomingBody(Incoming::Hyper(b))
    }
}

impl std::fmt::Debug for IncomingBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IncomingBody")
    }
}

impl http_body::Body for IncomingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Incoming::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Incoming::Other(b) => b.as_mut().poll_frame(cx),
        }
    }
    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Incoming::Hyper(b) => b.is_end_stream(),
            Incoming::Other(b) => b.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Incoming::Hyper(b) => b.size_hint(),
            Incoming::Other(b) => b.size_hint(),
        }
    }
}

/// A request body as the routes see it: hyper's (HTTP/1.1, HTTP/2) or
/// HTTP/3's (`quic::serve`).
pub(crate) trait RequestBody:
    http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
    /// The route does not read the body of a request of `version`: take
    /// it in without losing the answer (see `routes`; HTTP/3 asks the client
    /// to stop with STOP_SENDING, RFC 9114 section 4.1.1). What the end of
    /// the answer must wait for, if anything: see [`hold`].
    fn discard(self, version: http::Version) -> Option<Unread>;
}

/// The reading and dropping of a request body the route did not use, which
/// the end of the answer waits for (HTTP/2: see `routes`).
pub(crate) type Unread = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// `res`, whose last frame (HTTP/2: END_STREAM) waits for `unread`; its
/// head and data go out at once, without a Content-Length (a client that
/// has all the bytes it announced stops reading, and would stall on its
/// upload). An answer of 300 or more does not wait: clients stop sending
/// on those (curl ends its upload short of its Content-Length), and the
/// rest of the body is read and dropped after it.
pub(crate) fn hold(mut res: Response<Body>, unread: Option<Unread>) -> Response<Body> {
    match unread {
        None => res,
        Some(unread) if res.status().as_u16() >= 300 => {
            tokio::spawn(unread);
            res
        }
        Some(unread) => {
            res.headers_mut().remove(http::header::CONTENT_LENGTH);
            res.map(|body| {
                Body::new(Held {
                    body,
                    unread: Some(unread),
                })
            })
        }
    }
}

/// See [`hold`].
struct Held {
    body: Body,
    unread: Option<Unread>,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if !this.body.is_end_stream() {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(None) => {}
                other => return other,
            }
        }
        if let Some(unread) = &mut this.unread {
            std::task::ready!(unread.as_mut().poll(cx));
            this.unread = None;
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.unread.is_none() && self.body.is_end_stream()
    }
}

/// A body holding `data`.
pub(crate) fn full(data: impl Into<Bytes>) -> Body {
    let data: Bytes = data.into();
    Body(Kind::Full((!data.is_empty()).then_some(data)))
}

/// The answer to a HEAD request: `res`'s head, with the length its body
/// would have had, and no body (RFC 9110 section 9.3.2). hyper does this
/// over HTTP/1.x; over HTTP/2 and HTTP/3 the body went out after the
/// head, and clients (curl, nghttp) reset the stream as a protocol error.
pub(crate) fn head_only(mut res: Response<Body>) -> Response<Body> {
    let bodiless = res.status().is_informational()
        || res.status() == http::StatusCode::NO_CONTENT
        || res.status() == http::StatusCode::NOT_MODIFIED;
    let len = http_body::Body::size_hint(res.body()).exact();
    if let (Some(len), false) = (len, bodiless) {
        res.headers_mut()
            .entry(http::header::CONTENT_LENGTH)
            .or_insert_with(|| http::HeaderValue::from(len));
    }
    res.map(|_| Body::empty())
}

/// Does a comma-separated header (`Connection`, `Upgrade`, ...) list
/// `token`, in any of its lines, ignoring case?
pub(crate) fn has_token(headers: &http::HeaderMap, name: http::HeaderName, token: &str) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// The tokens of a comma-separated header, in all of its lines, trimmed
/// (lines that are not visible ASCII are skipped).
pub(crate) fn tokens(
    headers: &http::HeaderMap,
    name: http::HeaderName,
) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(str::trim))
}

/// A short plain-text response.
pub(crate) fn text(status: http::StatusCode, msg: &'static str) -> Response<Body> {
    let mut res = Response::new(full(msg));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// A handler's answer: a response now, or one to wait for.
pub(crate) enum Reply {
    Now(Response<Body>),
    Later(Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>>),
}
