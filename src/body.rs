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
pub struct Body(Kind);

enum Kind {
    Full(Option<Bytes>),
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl Body {
    /// Boxes any body.
    pub fn new<B>(body: B) -> Body
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

/// A request body as the routes see it: hyper's (HTTP/1.1, HTTP/2) or
/// HTTP/3's (`quic::serve`).
pub trait RequestBody:
    http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
    /// The route does not read the body: let the client know it may stop
    /// sending, without losing the answer (see `routes::discard`; HTTP/3
    /// asks with STOP_SENDING, RFC 9114 section 4.1.1).
    fn discard(self);
}

/// A body holding `data`.
pub fn full(data: impl Into<Bytes>) -> Body {
    let data: Bytes = data.into();
    Body(Kind::Full((!data.is_empty()).then_some(data)))
}

/// Does a comma-separated header (`Connection`, `Upgrade`, ...) list
/// `token`, in any of its lines, ignoring case?
pub fn has_token(headers: &http::HeaderMap, name: http::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// A short plain-text response.
pub fn text(status: http::StatusCode, msg: &'static str) -> Response<Body> {
    let mut res = Response::new(full(msg));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// A handler's answer: a response now, or one to wait for.
pub enum Reply {
    Now(Response<Body>),
    Later(Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>>),
}
