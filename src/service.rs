//! The service a listener serves: the routes from the config, or an
//! application's own tower/hyper service (SPEC section 6), behind one type.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

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

/// What handles the requests of one listener.
#[derive(Clone)]
pub enum Handler {
    /// The routes of the config file.
    Routes(Arc<crate::routes::Router>),
    /// An application's service.
    App(BoxCloneSyncService<Request<Incoming>, Response<Body>, BoxError>),
}

impl Handler {
    /// Wraps any tower service (an axum `Router`, a `service_fn`, …).
    /// A service error becomes a 500 response and a log line.
    pub fn app<S, B>(svc: S) -> Handler
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let svc = svc
            .map_response(|res: Response<B>| res.map(Body::new))
            .map_err(Into::into);
        Handler::App(BoxCloneSyncService::new(svc))
    }

    /// Answers `req`, at once when the answer needs no waiting.
    #[inline]
    pub fn call(
        &self,
        mut req: Request<Incoming>,
        ctx: &Arc<crate::routes::ListenerContext>,
        peer: crate::proxy::Peer,
    ) -> Reply {
        match self {
            Handler::Routes(router) => router.handle(req, ctx, peer),
            Handler::App(svc) => {
                // An application may want to know who is asking.
                req.extensions_mut().insert(peer);
                let call = svc.clone().oneshot(req);
                Reply::Later(Box::pin(async move {
                    call.await.unwrap_or_else(|e| {
                        tracing::error!("service error: {e}");
                        text(
                            http::StatusCode::INTERNAL_SERVER_ERROR,
                            "internal server error\n",
                        )
                    })
                }))
            }
        }
    }
}
