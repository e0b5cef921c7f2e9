//! The service a listener serves: the routes from the config, or an
//! application's own tower/hyper service (SPEC section 6), behind one type.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body type every service is turned into.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `data`.
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
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
            .map_response(|res: Response<B>| res.map(|b| b.map_err(Into::into).boxed_unsync()))
            .map_err(Into::into);
        Handler::App(BoxCloneSyncService::new(svc))
    }

    pub async fn call(
        &self,
        mut req: Request<Incoming>,
        ctx: &crate::routes::ListenerContext,
        peer: crate::proxy::Peer,
    ) -> Response<Body> {
        match self {
            Handler::Routes(router) => router.handle(req, ctx, peer).await,
            Handler::App(svc) => {
                // An application may want to know who is asking.
                req.extensions_mut().insert(peer);
                svc.clone().oneshot(req).await.unwrap_or_else(|e| {
                    tracing::error!("service error: {e}");
                    text(
                        http::StatusCode::INTERNAL_SERVER_ERROR,
                        "internal server error\n",
                    )
                })
            }
        }
    }
}
