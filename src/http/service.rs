//! The service a listener serves: the routes from the config, or an
//! application's own tower/hyper service (SPEC section 6), behind one type.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

use crate::observe::logging::Chain;
use crate::process::context::{ListenerContext, Peer};
use crate::wire::body::{text, Body, BoxError, IncomingBody, Reply, RequestBody};

/// What handles the requests of one listener.
#[derive(Clone)]
pub(crate) enum Handler {
    /// The routes of the config file.
    Routes(Arc<crate::http::routes::Router>),
    /// An application's service, over every HTTP version.
    Service(BoxCloneSyncService<Request<IncomingBody>, Response<Body>, BoxError>),
}

impl Handler {
    /// Wraps any tower service (an axum `Router`, a `service_fn`, …).
    /// A service error becomes a 500 response and a log line.
    pub(crate) fn service<S, B>(svc: S) -> Handler
    where
        S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let svc = svc
            .map_response(|res: Response<B>| res.map(Body::new))
            .map_err(Into::into);
        Handler::Service(BoxCloneSyncService::new(svc))
    }

    /// Answers `req`, at once when the answer needs no waiting.
    #[inline]
    pub(crate) fn call<B>(
        &self,
        req: Request<B>,
        ctx: &Arc<ListenerContext>,
        peer: Peer,
    ) -> (Reply, Option<usize>)
    where
        B: RequestBody,
        IncomingBody: From<B>,
    {
        match self {
            Handler::Routes(router) => router.handle(req, ctx, peer),
            Handler::Service(svc) => {
                let mut req = req.map(IncomingBody::from);
                // An application may want to know who is asking.
                req.extensions_mut().insert(peer);
                let call = svc.clone().oneshot(req);
                let reply = Reply::Later(Box::pin(async move {
                    call.await.unwrap_or_else(|e| {
                        tracing::error!("service error: {e}", e = Chain(&*e));
                        text(
                            http::StatusCode::INTERNAL_SERVER_ERROR,
                            "internal server error\n",
                        )
                    })
                }));
                (reply, None)
            }
        }
    }
}
